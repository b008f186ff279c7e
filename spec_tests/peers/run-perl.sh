#!/usr/bin/env bash
# Run the portable profile of the conformance suite against the Perl
# PAGI::Server 0.002005 (the protocol's original server), through the
# conformance application written in Perl from spec_tests/APP.md.
#
#   spec_tests/peers/run-perl.sh                 # the portable profile
#   spec_tests/peers/run-perl.sh --clauses -rA   # extra arguments go to pytest
#   PAGI_PERL_TESTS=spec_tests/test_spec_sse.py spec_tests/peers/run-perl.sh
#
# What it does, from the shared reference folder (../shared next to the
# repository, or $PAGI_SHARED):
#   1. checks the Perl modules the server needs; when they are missing and it
#      runs as root with apt-get, installs the Debian 12 packages (about a
#      minute), else says which to install and stops;
#   2. unpacks reference/pagi-server/PAGI-Server-0.002005.tar.gz in a
#      temporary folder;
#   3. starts `perl -Ilib bin/pagi-server -E development` on 127.0.0.1 with
#      an OS-picked port and the app spec_tests/peers/perl/app.pl, with the
#      server's limits passed both to the server and to the app (/limits);
#   4. runs `python3 -m pytest spec_tests --server 127.0.0.1:PORT
#      --profile portable`, then stops the server.
# The exit status is pytest's.  spec_tests/PEERS.md records a run.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
shared="${PAGI_SHARED:-$root/../shared}"
tarball="$shared/reference/pagi-server/PAGI-Server-0.002005.tar.gz"
packages="libio-async-perl libfuture-perl libfuture-asyncawait-perl libhttp-parser-xs-perl
libprotocol-websocket-perl liburi-perl libfuture-io-perl libio-async-loop-epoll-perl
libjson-maybexs-perl"
# The server's limits (its defaults, given explicitly so the app can report them).
max_body_size=10000000
max_ws_frame_size=65536

if [ ! -f "$tarball" ]; then
    echo "run-perl.sh: $tarball not found (set PAGI_SHARED to the shared folder)" >&2
    exit 2
fi

modules_ok() {
    perl -MIO::Async::Loop -MIO::Async::Loop::Epoll -MFuture -MFuture::AsyncAwait \
         -MFuture::IO -MHTTP::Parser::XS -MProtocol::WebSocket -MURI -MJSON::MaybeXS \
         -e 1 2>/dev/null
}
if ! modules_ok; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "run-perl.sh: installing the Debian packages PAGI::Server needs" >&2
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $packages >/dev/null
    else
        echo "run-perl.sh: Perl modules missing; install: apt-get install -y" $packages >&2
        exit 2
    fi
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/pagi-perl-peer.XXXXXX")"
supervisor_pid=""
cleanup() {
    if [ -n "$supervisor_pid" ]; then
        kill -TERM "$supervisor_pid" 2>/dev/null || true       # stops the restart loop
        if [ -f "$work/server.pid" ]; then
            pid="$(cat "$work/server.pid")"
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -rf "$work"
}
trap cleanup EXIT

tar -xzf "$tarball" -C "$work"
src="$work/PAGI-Server-0.002005"
log="$work/server.log"
: >"$log"
# A port picked by the OS, kept across restarts.
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

# Some bad events take PAGI::Server down (PEERS.md); the loop starts it again
# so that the clauses after such a test are still checked.  Each exit is
# logged; the suite waits for the listening socket before every test.
(
    trap 'exit 0' TERM
    cd "$src"
    export PAGI_SPEC_MAX_BODY_SIZE="$max_body_size" PAGI_SPEC_WS_MAX_SIZE="$max_ws_frame_size"
    while :; do
        perl -Ilib bin/pagi-server -E development --no-access-log -o 127.0.0.1 -p "$port" \
            --max-body-size "$max_body_size" --max-ws-frame-size "$max_ws_frame_size" \
            "$here/perl/app.pl" </dev/null >>"$log" 2>&1 &
        echo $! >"$work/server.pid"
        rc=0
        wait $! || rc=$?
        echo "run-perl.sh: PAGI::Server exited (status $rc); restarting it" >>"$log"
        sleep 0.2
    done
) &
supervisor_pid=$!

started=""
for _ in $(seq 200); do
    if grep -q "listening on http://127.0.0.1:$port/" "$log"; then started=1; break; fi
    sleep 0.1
done
if [ -z "$started" ]; then
    echo "run-perl.sh: PAGI::Server did not start:" >&2
    cat "$log" >&2
    exit 2
fi
echo "run-perl.sh: PAGI::Server 0.002005 on 127.0.0.1:$port" >&2

cd "$root"
status=0
# shellcheck disable=SC2086
python3 -m pytest ${PAGI_PERL_TESTS:-spec_tests} -p no:cacheprovider \
    --server "127.0.0.1:$port" --profile portable "$@" || status=$?
restarts="$(grep -c '^run-perl.sh: PAGI::Server exited' "$log" || true)"
echo "run-perl.sh: PAGI::Server went down $restarts time(s) during the run" >&2
if [ -n "${PAGI_PERL_LOG:-}" ]; then cp "$log" "$PAGI_PERL_LOG"; fi
exit "$status"
