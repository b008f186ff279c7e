# The PAGI conformance application (spec_tests/APP.md), in Perl, for the
# Perl PAGI::Server:
#
#   perl -Ilib bin/pagi-server -E development --no-access-log -o 127.0.0.1 -p 0 \
#       .../spec_tests/peers/perl/app.pl
#
# Written from APP.md alone, route by route, as an implementer of another PAGI
# server would; spec_tests/peers/run-perl.sh starts it and runs the suite.
# Every handler is an `async sub` returning a Future; `app` itself is a plain
# sub returning the handler's Future (CORE-APP-3).  The journal lives in this
# process: run it without workers.
use strict;
use warnings;

use B ();
use File::Spec ();
use Future;
use Future::AsyncAwait;
use Future::IO;
use JSON::MaybeXS ();
use Scalar::Util qw(blessed);

my $JSON = JSON::MaybeXS->new(utf8 => 1, canonical => 1, allow_nonref => 1);
my $TRUE = JSON::MaybeXS::true();
my $FALSE = JSON::MaybeXS::false();
sub bool { $_[0] ? $TRUE : $FALSE }

# token -> [records]; "lifespan" is written by the lifespan scope.
my %JOURNAL;
# token -> [pagi.connection objects] (for /conn?mode=identity)
my %KEEP;

my $FILE_SIZE = 262144;    # /file serves a file where byte i is i % 256

sub record {
    my ($token, $entry) = @_;
    push @{ $JOURNAL{$token} }, $entry if defined $token && length $token;
}

# -- vocabulary (APP.md "Notation and vocabulary") ---------------------------------

# The kind of a value.  Perl has one string type for text and bytes: a string
# is reported as "string"; a scalar holding an integer value (IOK) as
# "integer", another number as "float".
sub kind {
    my ($v) = @_;
    return 'null' unless defined $v;
    if (my $r = ref $v) {
        return 'boolean' if JSON::MaybeXS::is_bool($v);
        return 'list' if $r eq 'ARRAY';
        return 'map' if $r eq 'HASH';
        return 'object';
    }
    my $flags = B::svref_2object(\$v)->FLAGS;
    return 'integer' if $flags & B::SVf_IOK;
    return 'float' if $flags & B::SVf_NOK;
    return 'string';
}

# A value as JSON: strings as themselves (a string of bytes then reads as
# latin-1, one character per byte), lists and maps recursively, anything else
# as a short description.
sub jsonable {
    my ($v) = @_;
    return undef unless defined $v;
    my $r = ref $v;
    return $v unless $r;
    return $v if JSON::MaybeXS::is_bool($v);
    return [map { jsonable($_) } @$v] if $r eq 'ARRAY';
    return { map { ($_ => jsonable($v->{$_})) } keys %$v } if $r eq 'HASH';
    return "$r";
}

# The error category of a send failure.  PAGI::Server raises text only, so
# apart from files the application cannot tell an invalid event from another
# error: "other".
sub category {
    my ($err) = @_;
    return 'not-found' if $err =~ /No such file|not found|does not exist/i;
    return 'permission-denied' if $err =~ /Permission denied/i;
    return 'other';
}

sub report {
    my ($err) = @_;
    return { raised => $FALSE } unless defined $err;
    my $text = "$err";
    $text =~ s/\s+\z//;
    return { raised => $TRUE, category => category($text), message => $text };
}

# Try a send: the report of whether it raised, at once or through its Future.
async sub try_send {
    my ($send, $event) = @_;
    my $f = eval { $send->($event) };
    return report($@ || 'send died') unless $f;
    my $err;
    await $f->followed_by(sub {
        my ($g) = @_;
        $err = ($g->failure)[0] // 'failed' if $g->is_failed;
        $err = 'cancelled' if $g->is_cancelled;
        return Future->done;
    });
    return report($err);
}

sub query {
    my ($scope) = @_;
    my %q;
    for my $part (split /&/, $scope->{query_string} // '') {
        next unless length $part;
        my ($k, $v) = split /=/, $part, 2;
        $q{$k} = $v // '';
    }
    return \%q;
}

sub qint {
    my ($q, $name, $default) = @_;
    my $v = $q->{$name};
    return (defined $v && $v =~ /^-?\d+\z/) ? 0 + $v : $default;
}

sub sleep_ms { Future::IO->sleep($_[0] / 1000) }

# All http.request events: (body, number of events, gone).
async sub read_body {
    my ($receive) = @_;
    my ($body, $n) = ('', 0);
    while (1) {
        my $event = await $receive->();
        $n++;
        return ($body, $n, 1) if $event->{type} ne 'http.request';
        $body .= $event->{body} // '';
        return ($body, $n, 0) unless $event->{more};
    }
}

async sub respond {
    my ($send, $status, $body, $ctype, @extra) = @_;
    await $send->({ type => 'http.response.start', status => $status,
                    headers => [['content-type', $ctype // 'text/plain'],
                                ['content-length', length($body)], @extra] });
    await $send->({ type => 'http.response.body', body => $body, more => 0 });
}

async sub respond_json {
    my ($send, $obj, $status, @extra) = @_;
    await respond($send, $status // 200, $JSON->encode($obj), 'application/json', @extra);
}

my @CONNECTION_METHODS = qw(is_connected disconnect_reason on_disconnect on_complete
                            response_started response_complete disconnect_future);
my @TRANSPORT_METHODS = qw(buffered_amount high_water_mark low_water_mark
                           on_high_water on_drain);

sub has_method { my ($obj, $m) = @_; blessed($obj) && $obj->can($m) }

sub describe {
    my ($scope) = @_;
    my %out;
    for my $key (qw(type pagi http_version method scheme path raw_path query_string
                    root_path headers client server subprotocols)) {
        $out{$key} = jsonable($scope->{$key}) if exists $scope->{$key};
    }
    $out{keys} = [sort keys %$scope];
    $out{kinds} = { map { ($_ => kind($scope->{$_})) } keys %$scope };
    $out{pagi_kinds} = ref $scope->{pagi} eq 'HASH'
        ? { map { ($_ => kind($scope->{pagi}{$_})) } keys %{ $scope->{pagi} } } : undef;
    my $h = $scope->{headers};
    $out{headers_ok} = bool(ref $h eq 'ARRAY' && !grep {
        !(ref $_ eq 'ARRAY' && @$_ == 2 && defined $_->[0] && defined $_->[1]
          && !ref $_->[0] && !ref $_->[1])
    } @$h);
    for my $key (qw(client server)) {
        my $v = $scope->{$key};
        $out{"${key}_kinds"} = ref $v eq 'ARRAY' ? [map { kind($_) } @$v] : undef;
    }
    my $ext = $scope->{extensions};
    $out{extensions} = ref $ext eq 'HASH' ? { map { ($_ => kind($ext->{$_})) } keys %$ext }
                                          : undef;
    my $state = $scope->{state};
    $out{state} = ref $state eq 'HASH' ? [sort keys %$state] : undef;
    my $conn = $scope->{'pagi.connection'};
    $out{connection_methods} = defined $conn
        ? [grep { has_method($conn, $_) } @CONNECTION_METHODS] : undef;
    my $t = $scope->{'pagi.transport'};
    if (defined $t) {
        my %d = (methods => [grep { has_method($t, $_) } @TRANSPORT_METHODS]);
        for my $m (qw(buffered_amount high_water_mark low_water_mark)) {
            next unless has_method($t, $m);
            my $v = $t->$m();
            $d{$m} = $v;
            $d{"${m}_kind"} = kind($v);
        }
        $out{transport} = \%d;
    }
    else {
        $out{transport} = undef;
    }
    return \%out;
}

# -- http routes ----------------------------------------------------------------

my %HTTP;

$HTTP{'/hello'} = async sub {
    my ($scope, $receive, $send) = @_;
    await respond($send, 200, 'hello');
};

$HTTP{'/echo'} = async sub {
    my ($scope, $receive, $send) = @_;
    my ($body, $n, $gone) = await read_body($receive);
    return if $gone;
    await respond($send, 200, $body, 'application/octet-stream', ['x-request-events', $n]);
};

$HTTP{'/events'} = async sub {
    my ($scope, $receive, $send) = @_;
    my @out;
    while (1) {
        my $event = await $receive->();
        push @out, { type => $event->{type}, type_kind => kind($event->{type}),
                     body_len => length($event->{body} // ''),
                     body_kind => kind($event->{body}),
                     more => $event->{more}, more_kind => kind($event->{more}),
                     keys => [sort keys %$event] };
        last if $event->{type} ne 'http.request' || !$event->{more};
    }
    await respond_json($send, \@out);
};

$HTTP{'/first-event'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $event = await $receive->();
    await respond_json($send, { type => $event->{type}, body => $event->{body} // '',
                                more => $event->{more} });
};

my $r_scope = async sub {
    my ($scope, $receive, $send) = @_;
    my (undef, undef, $gone) = await read_body($receive);
    return if $gone;
    my $desc = describe($scope);
    $scope->{'spec.mark'} = 1;     # CORE-SCOPE-5: must not leak into later scopes
    await respond_json($send, $desc);
};

$HTTP{'/stream'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $q = query($scope);
    my ($n, $size, $delay) = (qint($q, 'n', 3), qint($q, 'size', 10), qint($q, 'delay', 0));
    my @headers = (['content-type', 'text/plain']);
    push @headers, ['content-length', $n * $size] if ($q->{cl} // '') eq '1';
    await $send->({ type => 'http.response.start', status => 200, headers => \@headers });
    for my $i (0 .. $n - 1) {
        await sleep_ms($delay) if $i && $delay;
        await $send->({ type => 'http.response.body', body => chr(97 + $i % 26) x $size,
                        more => 1 });
        await $send->({ type => 'http.response.body', body => '', more => 1 })
            if ($q->{empty} // '') eq '1';
    }
    await $send->({ type => 'http.response.body', body => '', more => 0 });
};

$HTTP{'/raise-before'} = async sub {
    die "spec-app: raise-before\n";
};

$HTTP{'/raise-after'} = async sub {
    my ($scope, $receive, $send) = @_;
    my @headers = (['content-type', 'text/plain']);
    push @headers, ['content-length', 100] if (query($scope)->{cl} // '') eq '1';
    await $send->({ type => 'http.response.start', status => 200, headers => \@headers });
    await $send->({ type => 'http.response.body', body => 'partial', more => 1 });
    die "spec-app: raise-after\n";
};

$HTTP{'/return-mid-stream'} = async sub {
    my ($scope, $receive, $send) = @_;
    await $send->({ type => 'http.response.start', status => 200,
                    headers => [['content-type', 'text/plain']] });
    await $send->({ type => 'http.response.body', body => 'partial', more => 1 });
    return;
};

$HTTP{'/no-response'} = async sub { return };

# Perl has one application style (async sub): /async is written like the rest.
$HTTP{'/async'} = async sub {
    my ($scope, $receive, $send) = @_;
    my ($body) = await read_body($receive);
    await $send->({ type => 'http.response.start', status => 200,
                    headers => [['content-type', 'text/plain']] });
    await $send->({ type => 'http.response.body', body => "async:$body", more => 0 });
};

$HTTP{'/return-value'} = async sub {
    my ($scope, $receive, $send) = @_;
    await respond($send, 200, 'ok');
    return { framework => 'value' };
};

my %BAD_HEADERS = (
    'cr-value'   => ['x-bad', "a\rb"],
    'lf-value'   => ['x-bad', "a\nb"],
    'crlf-value' => ['x-bad', "a\r\nx-injected: 1"],
    'nul-value'  => ['x-bad', "a\x00b"],
    'cr-name'    => ["x-b\rad", 'v'],
    'lf-name'    => ["x-b\nad", 'v'],
    'nul-name'   => ["x-b\x00ad", 'v'],
    'ctl-name'   => ["x-b\x01ad", 'v'],
    'del-name'   => ["x-b\x7fad", 'v'],
    'space-name' => ['x bad', 'v'],
    'colon-name' => ['x:bad', 'v'],
    'empty-name' => ['', 'v'],
);

$HTTP{'/bad-header'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $case = query($scope)->{case} // '';
    my $header = $BAD_HEADERS{$case} or return await respond($send, 404, 'no such case');
    my $rep = await try_send($send, { type => 'http.response.start', status => 200,
                                      headers => [['content-type', 'text/plain'], $header] });
    $rep->{case} = $case;
    my $body = $JSON->encode($rep);
    if (!$rep->{raised}) {     # the bad start went out: finish as best we can
        await $send->({ type => 'http.response.body', body => $body, more => 0 });
        return;
    }
    await respond($send, 200, $body, 'application/json');
};

my %START_OK = (type => 'http.response.start', status => 200,
                headers => [['content-type', 'application/json']]);

# case -> [phase, bad event]: "pre" before any start, "body" after a valid one.
my %BAD_EVENTS = (
    'missing-status'   => [pre => { type => 'http.response.start', headers => [] }],
    'status-text'       => [pre => { type => 'http.response.start', status => 'two hundred',
                                    headers => [] }],
    'status-range'     => [pre => { type => 'http.response.start', status => 1000, headers => [] }],
    'status-100'       => [pre => { type => 'http.response.start', status => 100, headers => [] }],
    'status-101'       => [pre => { type => 'http.response.start', status => 101, headers => [] }],
    'status-103'       => [pre => { type => 'http.response.start', status => 103, headers => [] }],
    'content-length-invalid' => [pre => { type => 'http.response.start', status => 200,
                                          headers => [['content-length', 'abc']] }],
    'headers-not-list' => [pre => { type => 'http.response.start', status => 200,
                                    headers => 'x-a: b' }],
    'header-text-value' => [pre => { type => 'http.response.start', status => 200,
                                    headers => [['x-a', "\x{263a}"]] }],
    'header-triple'    => [pre => { type => 'http.response.start', status => 200,
                                    headers => [['x-a', 'b', 'c']] }],
    'unknown-type'     => [pre => { type => 'http.response.bogus', status => 200 }],
    'no-type'          => [pre => { status => 200, headers => [] }],
    'not-a-map'       => [pre => [type => 'http.response.start']],
    'unadvertised-extension' => [pre => { type => 'ext.spec.unknown' }],
    'body-before-start' => [pre => { type => 'http.response.body', body => 'x', more => 0 }],
    'extra-field-start' => [pre => { %START_OK, x_spec_extra => { any => 'thing' } }],
    'body-text'         => [body => { type => 'http.response.body', body => "caf\x{e9} \x{263a}",
                                     more => 1 }],
    'body-integer'         => [inexpressible => undef],    # 5 and "5" are one Perl scalar
    'more-text'         => [body => { type => 'http.response.body', body => '', more => 'yes' }],
    'double-start'     => [body => { %START_OK }],
    'trailers-unannounced' => [body => { type => 'http.response.trailers',
                                         headers => [['x-t', '1']] }],
    'extra-field-body' => [body => { type => 'http.response.body', body => '', more => 1,
                                     x_spec_extra => 1 }],
);

$HTTP{'/bad-event'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $case = query($scope)->{case} // '';
    my $entry = $BAD_EVENTS{$case} or return await respond($send, 404, 'no such case');
    my ($phase, $event) = @$entry;
    if ($phase eq 'inexpressible') {
        return await respond_json($send, { case => $case, inexpressible => $TRUE });
    }
    if ($phase eq 'pre') {
        my $rep = await try_send($send, $event);
        $rep->{case} = $case;
        my $body = $JSON->encode($rep);
        if (!$rep->{raised} && $case eq 'extra-field-start') {
            await $send->({ type => 'http.response.body', body => $body, more => 0 });
            return;
        }
        return if !$rep->{raised} && $case eq 'body-before-start';
        await respond($send, 200, $body, 'application/json');
        return;
    }
    await $send->({ %START_OK });
    my $rep = await try_send($send, $event);
    $rep->{case} = $case;
    await $send->({ type => 'http.response.body', body => $JSON->encode($rep), more => 0 });
};

$HTTP{'/after-complete'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $token = query($scope)->{token};
    await read_body($receive);
    await respond($send, 200, 'done');
    my $rep = await try_send($send, { type => 'http.response.body', body => 'EXTRA', more => 0 });
    record($token, { %$rep, step => 'send-after-complete' });
    my $event = await $receive->();
    record($token, { step => 'receive-after-complete', type => $event->{type} });
};

$HTTP{'/receive-across'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $token = query($scope)->{token};
    await read_body($receive);
    my $waiter = (async sub {
        my $event = await $receive->();
        record($token, { at => 'waiter', type => $event->{type} });
    })->();
    await respond($send, 200, 'sent');
    record($token, { at => 'response_sent' });
    await Future->wait_any($waiter->without_cancel, Future::IO->sleep(3));
    record($token, { at => 'end', waiter_done => bool($waiter->is_ready) });
};

$HTTP{'/trailers'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $q = query($scope);
    my @headers = (['content-type', 'text/plain'], ['trailer', 'x-checksum']);
    push @headers, ['content-length', 10] if ($q->{cl} // '') eq '1';
    await $send->({ type => 'http.response.start', status => 200, trailers => 1,
                    headers => \@headers });
    await $send->({ type => 'http.response.body', body => 'part1', more => 1 });
    await $send->({ type => 'http.response.body', body => 'part2', more => 0 });
    my $rep = await try_send($send, { type => 'http.response.trailers',
                                      headers => [['x-checksum', 'abc123'], ['x-count', '2']] });
    record($q->{token}, $rep);
};

$HTTP{'/cl-short'} = async sub {
    my ($scope, $receive, $send) = @_;
    await $send->({ type => 'http.response.start', status => 200,
                    headers => [['content-type', 'text/plain'], ['content-length', 10]] });
    await $send->({ type => 'http.response.body', body => '12345', more => 0 });
};

$HTTP{'/cl-long'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $token = query($scope)->{token};
    await $send->({ type => 'http.response.start', status => 200,
                    headers => [['content-type', 'text/plain'], ['content-length', 5]] });
    my $rep = await try_send($send, { type => 'http.response.body', body => '0123456789',
                                      more => 0 });
    record($token, { %$rep, step => 'ten-bytes' });
    if ($rep->{raised}) {
        my $rep2 = await try_send($send, { type => 'http.response.body', body => 'abcde',
                                           more => 0 });
        record($token, { %$rep2, step => 'five-bytes' });
    }
};

$HTTP{'/continue'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $q = query($scope);
    if (($q->{read} // '') eq '0') {
        return await respond($send, 200, 'no-read');
    }
    my $ms = qint($q, 'sleep_ms', 0);
    await sleep_ms($ms) if $ms;
    my ($body, undef, $gone) = await read_body($receive);
    return if $gone;
    await respond($send, 200, "got:$body");
};

$HTTP{'/pipeline'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $q = query($scope);
    my ($token, $tag) = ($q->{token}, $q->{tag} // '');
    record($token, "start:$tag");
    await read_body($receive);
    my $ms = qint($q, 'delay_ms', 0);
    await sleep_ms($ms) if $ms;
    record($token, "end:$tag");
    await respond($send, 200, $tag);
};

$HTTP{'/status'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $q = query($scope);
    my @headers = (['content-type', 'text/plain']);
    push @headers, ['content-length', $q->{cl}] if length($q->{cl} // '');
    await $send->({ type => 'http.response.start', status => qint($q, 'code', 200),
                    headers => \@headers });
    await $send->({ type => 'http.response.body', body => $q->{body} // '', more => 0 });
};

$HTTP{'/headers'} = async sub {
    my ($scope, $receive, $send) = @_;
    await respond($send, 200, 'ok', undef, ['set-cookie', 'a=1'], ['x-order', 'first'],
                  ['set-cookie', 'b=2'], ['x-order', 'second']);
};

$HTTP{'/app-te'} = async sub {
    my ($scope, $receive, $send) = @_;
    await $send->({ type => 'http.response.start', status => 200,
                    headers => [['content-type', 'text/plain'], ['transfer-encoding', 'gzip']] });
    await $send->({ type => 'http.response.body', body => 'hello', more => 0 });
};

$HTTP{'/date'} = async sub {
    my ($scope, $receive, $send) = @_;
    await respond($send, 200, 'dated', undef, ['date', 'Mon, 01 Jan 2001 00:00:00 GMT']);
};

$HTTP{'/app-close'} = async sub {
    my ($scope, $receive, $send) = @_;
    await respond($send, 200, 'bye', undef, ['connection', 'close']);
};

$HTTP{'/limits'} = async sub {
    my ($scope, $receive, $send) = @_;
    await read_body($receive);
    my $t = $scope->{'pagi.transport'};
    my %report = (
        max_body_size => $ENV{PAGI_SPEC_MAX_BODY_SIZE} ? 0 + $ENV{PAGI_SPEC_MAX_BODY_SIZE} : undef,
        ws_max_size   => $ENV{PAGI_SPEC_WS_MAX_SIZE} ? 0 + $ENV{PAGI_SPEC_WS_MAX_SIZE} : undef,
        write_high_watermark => has_method($t, 'high_water_mark') ? $t->high_water_mark : undef,
        write_low_watermark  => has_method($t, 'low_water_mark') ? $t->low_water_mark : undef,
    );
    await respond_json($send, \%report);
};

$HTTP{'/fullflush'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $advertised = exists(($scope->{extensions} // {})->{fullflush});
    await $send->({ type => 'http.response.start', status => 200,
                    headers => [['content-type', 'text/plain'],
                                ['x-fullflush', $advertised ? 'advertised' : 'absent']] });
    await $send->({ type => 'http.response.body', body => 'a', more => 1 });
    if ($advertised) {
        my $rep = await try_send($send, { type => 'http.fullflush' });
        if ($rep->{raised}) {
            await $send->({ type => 'http.response.body', body => '!rejected', more => 0 });
            return;
        }
    }
    await $send->({ type => 'http.response.body', body => 'b', more => 0 });
};

sub spec_file {
    my $path = File::Spec->catfile(File::Spec->tmpdir, 'pagi-spec-file-v1.bin');
    if (!-e $path || -s $path != $FILE_SIZE) {
        my $tmp = "$path.$$.tmp";
        open my $fh, '>:raw', $tmp or die "spec-app: $tmp: $!";
        print {$fh} join('', map { chr } 0 .. 255) x ($FILE_SIZE / 256);
        close $fh or die "spec-app: $tmp: $!";
        rename $tmp, $path or die "spec-app: rename $tmp: $!";
    }
    return $path;
}

$HTTP{'/file'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $q = query($scope);
    my $mode = $q->{mode} // 'file';
    my %event = (type => 'http.response.body');
    $event{offset} = qint($q, 'offset', 0) if exists $q->{offset};
    $event{length} = qint($q, 'length', 0) if exists $q->{length};
    await $send->({ type => 'http.response.start', status => 200,
                    headers => [['content-type', 'application/octet-stream']] });
    my $fh;
    if ($mode eq 'file') {
        $event{file} = spec_file();
    }
    elsif ($mode eq 'missing') {
        $event{file} = File::Spec->catfile(File::Spec->tmpdir, 'pagi-spec-no-such-file');
    }
    elsif ($mode eq 'fh') {
        open $fh, '<:raw', spec_file() or die "spec-app: open: $!";
        $event{fh} = $fh;
    }
    elsif ($mode eq 'both') {
        $event{file} = spec_file();
        $event{body} = 'x';
    }
    my $rep = await try_send($send, \%event);
    close $fh if $fh;
    if ($rep->{raised}) {
        await $send->({ type => 'http.response.body', body => "!error:$rep->{category}",
                        more => 0 });
    }
};

$HTTP{'/slow'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $q = query($scope);
    my $token = $q->{token};
    my ($n, $size) = (qint($q, 'n', 128), qint($q, 'size', 65536));
    my $t = $scope->{'pagi.transport'};
    my $conn = $scope->{'pagi.connection'};
    if (!defined $t) {
        return await respond_json($send, { transport => undef }, 501);
    }
    my @callbacks;
    $t->on_high_water(sub { push @callbacks, 'high:A:' . scalar(@_) });
    $t->on_high_water(sub { push @callbacks, 'high:B:' . scalar(@_) });
    $t->on_drain(sub { push @callbacks, 'drain:A:' . scalar(@_) });
    $t->on_drain(sub { push @callbacks, 'drain:B:' . scalar(@_) });
    my %summary = (initial_buffered => $t->buffered_amount, initial_callbacks => [@callbacks],
                   high => $t->high_water_mark, low => $t->low_water_mark,
                   max_buffered => 0, suspended => 0, immediate_high => undef,
                   sent => 0, disconnected => undef, types_ok => $TRUE);
    await $send->({ type => 'http.response.start', status => 200,
                    headers => [['content-type', 'application/octet-stream'],
                                ['content-length', $n * $size]] });
    my $high = $summary{high};
    for my $i (0 .. $n - 1) {
        if ($conn && !$conn->is_connected) {
            $summary{disconnected} = $conn->disconnect_reason;
            last;
        }
        my $f = $send->({ type => 'http.response.body', body => chr($i % 256) x $size,
                          more => $i < $n - 1 ? 1 : 0 });
        my $amount = $t->buffered_amount;
        $summary{types_ok} = $FALSE unless kind($amount) eq 'integer';
        $summary{max_buffered} = $amount if $amount > $summary{max_buffered};
        if (!$f->is_ready) {
            $summary{suspended}++;
            if (defined $high && $amount >= $high && !defined $summary{immediate_high}) {
                my @fired;
                $t->on_high_water(sub { push @fired, 1 });
                $summary{immediate_high} = bool(@fired);
            }
        }
        my $err;
        await $f->followed_by(sub {
            $err = ($_[0]->failure)[0] // 'failed' if $_[0]->is_failed;
            Future->done;
        });
        if (defined $err) {
            $summary{send_error} = "$err";
            last;
        }
        $summary{sent}++;
    }
    if ($conn && !$conn->is_connected && !defined $summary{disconnected}) {
        $summary{disconnected} = $conn->disconnect_reason;
    }
    $summary{callbacks} = \@callbacks;
    record($token, \%summary);
};

$HTTP{'/conn'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $q = query($scope);
    my ($token, $mode) = ($q->{token}, $q->{mode} // 'complete');
    my $conn = $scope->{'pagi.connection'};

    my $state = sub {
        my ($label) = @_;
        my %s = (at => $label, is_connected => bool($conn->is_connected),
                 disconnect_reason => $conn->disconnect_reason,
                 response_started => bool($conn->response_started));
        if (has_method($conn, 'response_complete')) {
            my $c = $conn->response_complete;
            $s{response_complete} = defined $c ? bool($c) : undef;
        }
        else {
            $s{response_complete} = undef;
        }
        my $f = has_method($conn, 'disconnect_future') ? $conn->disconnect_future : undef;
        $s{disconnect_future_done} = defined $f ? bool($f->is_ready) : undef;
        return \%s;
    };
    my $callback = sub {
        my ($label) = @_;
        return sub { my $e = $state->($label); $e->{args} = jsonable([@_]); record($token, $e) };
    };

    if ($mode eq 'identity') {
        my $kept = $KEEP{$token // ''} //= [];
        my $same = grep { $_ == $conn } @$kept;
        push @$kept, $conn;
        record($token, { same_as_previous => bool($same), count => scalar @$kept });
        await read_body($receive);
        return await respond($send, 200, 'ok');
    }

    $conn->on_disconnect($callback->('on_disconnect:1'));
    $conn->on_disconnect($callback->('on_disconnect:2'));
    my $has_on_complete = has_method($conn, 'on_complete');
    if ($has_on_complete) {
        $conn->on_complete($callback->('on_complete:1'));
        $conn->on_complete($callback->('on_complete:2'));
    }
    record($token, { %{ $state->('begin') }, has_on_complete => bool($has_on_complete) });

    if ($mode eq 'complete') {
        await read_body($receive);
        await $send->({ type => 'http.response.start', status => 200,
                        headers => [['content-type', 'text/plain']] });
        record($token, $state->('after_start'));
        await $send->({ type => 'http.response.body', body => 'a', more => 1 });
        record($token, $state->('streaming'));
        await $send->({ type => 'http.response.body', body => 'b', more => 0 });
        record($token, $state->('after_end'));
        return;
    }
    if ($mode eq 'body') {
        my $event;
        while (1) {
            $event = await $receive->();
            record($token, { at => 'event', type => $event->{type},
                             body_len => length($event->{body} // ''), more => $event->{more} });
            last if $event->{type} ne 'http.request' || !$event->{more};
        }
        if ($event->{type} eq 'http.request') {
            return await respond($send, 200, 'complete');
        }
        record($token, $state->('after_disconnect_event'));
        my @late;
        $conn->on_disconnect(sub { push @late, [@_] });
        record($token, { at => 'late_on_disconnect', ran_at_once => bool(@late),
                         args => @late ? jsonable($late[0]) : undef });
        my $rep = await try_send($send, { type => 'http.response.start', status => 200,
                                          headers => [] });
        record($token, { %$rep, at => 'send_after_disconnect' });
        record($token, { at => 'end' });
        return;     # no response: the client is gone
    }
    if ($mode eq 'stream') {
        await read_body($receive);
        await $send->({ type => 'http.response.start', status => 200,
                        headers => [['content-type', 'text/plain']] });
        my @raised;
        for my $k (1 .. 500) {
            last unless $conn->is_connected;
            my $rep = await try_send($send, { type => 'http.response.body', body => 'x' x 1024,
                                              more => 1 });
            push @raised, $rep->{message} if $rep->{raised};
            await sleep_ms(10);
        }
        for my $k (1 .. 3) {
            my $rep = await try_send($send, { type => 'http.response.body', body => 'y',
                                              more => 1 });
            push @raised, $rep->{message} if $rep->{raised};
        }
        record($token, { at => 'stream_end', raised => \@raised,
                         is_connected => bool($conn->is_connected) });
        my $event = await $receive->();
        record($token, { at => 'receive', type => $event->{type} });
        record($token, { at => 'end' });
        return;
    }
    await respond($send, 404, 'no such mode');
};

$HTTP{'/state'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $q = query($scope);
    await read_body($receive);
    my $state = $scope->{state};
    my %rep = (has_state => bool(ref $state eq 'HASH'));
    if (ref $state eq 'HASH') {
        $rep{keys} = [sort keys %$state];
        my $shared = $state->{'spec.shared'};
        $rep{shared} = ref $shared eq 'ARRAY' ? [@$shared] : undef;
        if (($q->{op} // '') eq 'mutate') {
            push @$shared, $q->{value} // 'x' if ref $shared eq 'ARRAY';
            $state->{'spec.private'} = 'set-by-request';
        }
    }
    await respond_json($send, \%rep);
};

$HTTP{'/journal'} = async sub {
    my ($scope, $receive, $send) = @_;
    await respond_json($send, $JOURNAL{ query($scope)->{token} // '' } // []);
};

my $r_wrong_scope = async sub {
    my ($scope, $receive, $send) = @_;
    await respond($send, 404, 'wrong scope type: http', undef,
                  ['x-spec-app', 'wrong-scope-type']);
};

my $r_not_found = async sub {
    my ($scope, $receive, $send) = @_;
    await respond($send, 404, 'not found');
};

# -- websocket routes -------------------------------------------------------------

my %WS;

$WS{'/ws/echo'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $q = query($scope);
    my $token = $q->{token};
    my $event = await $receive->();
    record($token, { first_event => $event->{type} });
    my %accept = (type => 'websocket.accept');
    if (($q->{subprotocol} // '') eq '1' && @{ $scope->{subprotocols} // [] }) {
        $accept{subprotocol} = $scope->{subprotocols}[0];
    }
    $accept{headers} = [['x-spec-accept', 'yes']] if ($q->{header} // '') eq '1';
    await $send->(\%accept);
    if (length($q->{keepalive_ms} // '')) {
        await $send->({ type => 'websocket.keepalive',
                        interval => qint($q, 'keepalive_ms', 0) / 1000 });
    }
    while (1) {
        $event = await $receive->();
        if ($event->{type} eq 'websocket.receive') {
            my $is_text = defined $event->{text};
            record($token, { received => $is_text ? 'text' : 'bytes',
                             both => bool($is_text && defined $event->{bytes}) });
            await $send->($is_text ? { type => 'websocket.send', text => $event->{text} }
                                   : { type => 'websocket.send', bytes => $event->{bytes} });
        }
        elsif ($event->{type} eq 'websocket.disconnect') {
            record($token, { disconnect => $TRUE, code => $event->{code},
                             reason => $event->{reason} });
            my $rep = await try_send($send, { type => 'websocket.send', text => 'late' });
            record($token, { %$rep, at => 'send_after_disconnect' });
            return;
        }
    }
};

$WS{'/ws/scope'} = async sub {
    my ($scope, $receive, $send) = @_;
    await $receive->();
    await $send->({ type => 'websocket.accept' });
    await $send->({ type => 'websocket.send',
                    text => JSON::MaybeXS->new(canonical => 1)->encode(describe($scope)) });
    while (1) {
        my $event = await $receive->();
        return if $event->{type} eq 'websocket.disconnect';
    }
};

my $ws_reject = async sub {
    my ($scope, $receive, $send) = @_;
    await $receive->();
    await $send->({ type => 'websocket.close' });
};
$WS{'/ws/reject'} = $ws_reject;

$WS{'/ws/close'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $q = query($scope);
    await $receive->();
    await $send->({ type => 'websocket.accept' });
    await $send->({ type => 'websocket.close', code => qint($q, 'code', 1000),
                    reason => $q->{reason} // '' });
    my $event = await $receive->();
    record($q->{token}, { type => $event->{type}, code => $event->{code} });
};

$WS{'/ws/deny'} = async sub {
    my ($scope, $receive, $send) = @_;
    await $receive->();
    if (exists(($scope->{extensions} // {})->{'websocket.http.response'})) {
        await $send->({ type => 'websocket.http.response.start', status => 401,
                        headers => [['content-type', 'text/plain'],
                                    ['www-authenticate', 'Bearer']] });
        await $send->({ type => 'websocket.http.response.body', body => 'denied', more => 0 });
    }
    else {
        await $send->({ type => 'websocket.close' });
    }
};

$WS{'/ws/bad-send'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $token = query($scope)->{token};
    await $receive->();
    await $send->({ type => 'websocket.accept' });
    my $rep = await try_send($send, { type => 'websocket.send', text => 'a', bytes => 'b' });
    record($token, { %$rep, case => 'both' });
    $rep = await try_send($send, { type => 'websocket.send' });
    record($token, { %$rep, case => 'neither' });
    if (exists(($scope->{extensions} // {})->{'websocket.http.response'})) {
        $rep = await try_send($send, { type => 'websocket.http.response.start', status => 401,
                                       headers => [] });
        record($token, { %$rep, case => 'deny-after-accept' });
    }
    await $send->({ type => 'websocket.send', text => 'still-open' });
    while (1) {
        my $event = await $receive->();
        return if $event->{type} eq 'websocket.disconnect';
    }
};

# -- sse routes ---------------------------------------------------------------------

async sub sse_read {
    my ($receive) = @_;
    my $body = '';
    while (1) {
        my $event = await $receive->();
        return undef if $event->{type} ne 'sse.request';
        $body .= $event->{body} // '';
        return $body unless $event->{more};
    }
}

my %SSE;

$SSE{'/sse/events'} = async sub {
    my ($scope, $receive, $send) = @_;
    await sse_read($receive);
    await $send->({ type => 'sse.start', status => 200 });
    await $send->({ type => 'sse.send', data => 'one' });
    await $send->({ type => 'sse.send', event => 'update', data => "line1\nline2", id => '7' });
    await $send->({ type => 'sse.send', data => "caf\x{e9}", retry => 1500 });
    await $send->({ type => 'sse.comment', comment => 'ping' });
    await $send->({ type => 'sse.comment', comment => ':already' });
};

$SSE{'/sse/post'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $body = (await sse_read($receive)) // '';
    utf8::decode($body);
    await $send->({ type => 'sse.start', status => 200 });
    await $send->({ type => 'sse.send', data => $body });
};

my $sse_scope = async sub {
    my ($scope, $receive, $send) = @_;
    await sse_read($receive);
    await $send->({ type => 'sse.start', status => 200 });
    await $send->({ type => 'sse.send',
                    data => JSON::MaybeXS->new(canonical => 1)->encode(describe($scope)) });
};
$SSE{'/sse/scope'} = $sse_scope;

$SSE{'/sse/bad-field'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $token = query($scope)->{token};
    await sse_read($receive);
    await $send->({ type => 'sse.start', status => 200 });
    for my $case (['event-lf', { type => 'sse.send', event => "a\nb", data => 'x' }],
                  ['event-cr', { type => 'sse.send', event => "a\rb", data => 'x' }],
                  ['id-lf', { type => 'sse.send', id => "1\n2", data => 'x' }],
                  ['retry-negative', { type => 'sse.send', data => 'x', retry => -1 }],
                  ['no-data', { type => 'sse.send', event => 'x' }]) {
        my $rep = await try_send($send, $case->[1]);
        record($token, { %$rep, case => $case->[0] });
    }
    await $send->({ type => 'sse.send', data => 'done' });
};

$SSE{'/sse/close'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $token = query($scope)->{token};
    await sse_read($receive);
    await $send->({ type => 'sse.start', status => 200 });
    await $send->({ type => 'sse.send', data => 'a' });
    await $send->({ type => 'sse.close', reason => 'job_complete' });
    for my $case (['send-after-close', { type => 'sse.send', data => 'b' }],
                  ['comment-after-close', { type => 'sse.comment', comment => 'c' }],
                  ['second-close', { type => 'sse.close' }]) {
        my $rep = await try_send($send, $case->[1]);
        record($token, { %$rep, case => $case->[0] });
    }
    await Future::IO->sleep(2);     # the stream must already be over on the wire
    record($token, { case => 'returned' });
};

$SSE{'/sse/decline'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $token = query($scope)->{token};
    await sse_read($receive);
    await $send->({ type => 'sse.http.response.start', status => 401,
                    headers => [['content-type', 'text/plain'], ['www-authenticate', 'Bearer']] });
    my $rep = await try_send($send, { type => 'sse.send', data => 'x' });
    record($token, { %$rep, case => 'send-after-decline' });
    await $send->({ type => 'sse.http.response.body', body => 'Unauthorized', more => 0 });
};

$SSE{'/sse/start-then-decline'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $token = query($scope)->{token};
    await sse_read($receive);
    my $rep = await try_send($send, { type => 'sse.send', data => 'too early' });
    record($token, { %$rep, case => 'send-before-start' });
    $rep = await try_send($send, { type => 'sse.comment', comment => 'too early' });
    record($token, { %$rep, case => 'comment-before-start' });
    await $send->({ type => 'sse.start', status => 200 });
    $rep = await try_send($send, { type => 'sse.http.response.start', status => 401,
                                   headers => [] });
    record($token, { %$rep, case => 'decline-after-start' });
    await $send->({ type => 'sse.send', data => 'ok' });
};

$SSE{'/sse/keepalive'} = async sub {
    my ($scope, $receive, $send) = @_;
    await sse_read($receive);
    await $send->({ type => 'sse.start', status => 200 });
    await $send->({ type => 'sse.keepalive', interval => 0.1, comment => 'ka' });
    await Future::IO->sleep(0.6);
    await $send->({ type => 'sse.keepalive', interval => 0 });
    await $send->({ type => 'sse.send', data => 'end' });
};

$SSE{'/sse/wait'} = async sub {
    my ($scope, $receive, $send) = @_;
    my $token = query($scope)->{token};
    await sse_read($receive);
    await $send->({ type => 'sse.start', status => 200 });
    await $send->({ type => 'sse.send', data => 'hi' });
    my $event = await $receive->();
    record($token, { type => $event->{type}, reason => $event->{reason} });
    my $rep = await try_send($send, { type => 'sse.send', data => 'late' });
    record($token, { %$rep, at => 'send_after_disconnect' });
};

$SSE{'/sse/headers'} = async sub {
    my ($scope, $receive, $send) = @_;
    await sse_read($receive);
    await $send->({ type => 'sse.start', status => 200,
                    headers => [['content-type', 'text/event-stream; charset=utf-8'],
                                ['x-spec', 'sse']] });
    await $send->({ type => 'sse.send', data => 'x' });
};

my $sse_unknown = async sub {
    my ($scope, $receive, $send) = @_;
    await sse_read($receive);
    await $send->({ type => 'sse.http.response.start', status => 404,
                    headers => [['content-type', 'text/plain']] });
    await $send->({ type => 'sse.http.response.body', body => 'not found' });
};

# -- lifespan -----------------------------------------------------------------------

async sub lifespan {
    my ($scope, $receive, $send) = @_;
    record('lifespan', { scope => { type => $scope->{type}, pagi => jsonable($scope->{pagi}),
                                    state => kind($scope->{state}) } });
    while (1) {
        my $event = await $receive->();
        record('lifespan', { event => $event->{type} });
        if ($event->{type} eq 'lifespan.startup') {
            if (($ENV{PAGI_SPEC_LIFESPAN} // '') eq 'fail') {
                await $send->({ type => 'lifespan.startup.failed',
                                message => 'spec-app: startup refused' });
                return;
            }
            if (ref $scope->{state} eq 'HASH') {
                $scope->{state}{'spec.shared'} = [];
                $scope->{state}{'spec.started'} = 1;
            }
            await $send->({ type => 'lifespan.startup.complete' });
        }
        elsif ($event->{type} eq 'lifespan.shutdown') {
            if (my $marker = $ENV{PAGI_SPEC_LIFESPAN_FILE}) {
                open my $fh, '>>', $marker or die "spec-app: $marker: $!";
                print {$fh} "shutdown\n";
                close $fh;
            }
            await $send->({ type => 'lifespan.shutdown.complete' });
            return;
        }
    }
}

# -- the dispatcher -------------------------------------------------------------------

sub app {
    my ($scope, $receive, $send) = @_;
    my $type = $scope->{type} // '';
    my $path = $scope->{path} // '';
    return lifespan($scope, $receive, $send) if $type eq 'lifespan';
    if ($type eq 'http') {
        return undef if $path eq '/not-an-app';    # CORE-APP-4: not a Future
        return $r_wrong_scope->($scope, $receive, $send) if $path =~ m{^/(?:ws|sse)/};
        return $r_scope->($scope, $receive, $send) if $path eq '*' || $path =~ m{^/scope};
        return ($HTTP{$path} // $r_not_found)->($scope, $receive, $send);
    }
    if ($type eq 'websocket') {
        return ($WS{$path} // $ws_reject)->($scope, $receive, $send);
    }
    if ($type eq 'sse') {
        return $sse_scope->($scope, $receive, $send) if $path =~ m{^/scope};
        return ($SSE{$path} // $sse_unknown)->($scope, $receive, $send);
    }
    die "spec-app: unsupported scope type $type\n";     # CORE-APP-5
}

\&app;
