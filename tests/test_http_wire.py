"""Section 4, the sans-I/O HTTP/1.1 parser and serializer, tested with bytes.

One table of (bytes on the wire, expected events or error status) feeds every
case three ways, as h11's tests do: in one block, one byte at a time, and
with trailing bytes of a next request after it.
"""
import pytest

import pagi_ref
from pagi_ref import Config, EndOfMessage, HTTPError, RequestHead, RequestParser


def events_of(parser):
    out = []
    while True:
        ev = parser.next_event()
        if ev is None:
            return out
        out.append(ev)
        if isinstance(ev, EndOfMessage):
            return out


def summarize(events):
    """Comparable form: heads as tuples, body pieces joined, trailers kept."""
    out = []
    body = b""
    for ev in events:
        if isinstance(ev, RequestHead):
            out.append(("head", ev.method, ev.target, ev.http_version, ev.path,
                        ev.query_string, tuple(ev.headers), ev.keep_alive,
                        ev.expect_continue, ev.content_length, ev.chunked))
        elif isinstance(ev, bytes):
            body += ev
        else:
            out.append(("body", body))
            out.append(("end", tuple(ev.trailers)))
            body = b""
    if body:
        out.append(("partial body", body))   # a message not yet complete
    return out


def parse_whole(data, **config):
    parser = RequestParser(Config(**config))
    parser.feed(data)
    return summarize(events_of(parser))


def parse_bytewise(data, **config):
    parser = RequestParser(Config(**config))
    events = []
    for i in range(len(data)):
        parser.feed(data[i:i + 1])
        while True:
            ev = parser.next_event()
            if ev is None:
                break
            events.append(ev)
            if isinstance(ev, EndOfMessage):
                break
    return summarize(events)


GOOD = [
    ("simple GET",
     b"GET /a?b=c HTTP/1.1\r\nHost: x\r\n\r\n",
     [("head", "GET", b"/a?b=c", "1.1", b"/a", b"b=c", ((b"host", b"x"),), True, False, 0, False),
      ("body", b""), ("end", ())]),
    ("leading empty lines (RFC 9112 §2.2)",
     b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
     [("head", "GET", b"/", "1.1", b"/", b"", ((b"host", b"x"),), True, False, 0, False),
      ("body", b""), ("end", ())]),
    ("HTTP/1.0 closes by default",
     b"GET / HTTP/1.0\r\n\r\n",
     [("head", "GET", b"/", "1.0", b"/", b"", (), False, False, 0, False),
      ("body", b""), ("end", ())]),
    ("HTTP/1.0 keep-alive opt-in",
     b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
     [("head", "GET", b"/", "1.0", b"/", b"", ((b"connection", b"Keep-Alive"),), True, False, 0,
       False), ("body", b""), ("end", ())]),
    ("Connection: close",
     b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
     [("head", "GET", b"/", "1.1", b"/", b"", ((b"host", b"x"), (b"connection", b"close")), False,
       False, 0, False), ("body", b""), ("end", ())]),
    ("Content-Length body, OWS trimmed, names lower-cased",
     b"POST /p HTTP/1.1\r\nHOST:  x \t\r\nContent-Length: 5\r\n\r\nhello",
     [("head", "POST", b"/p", "1.1", b"/p", b"", ((b"host", b"x"), (b"content-length", b"5")),
       True, False, 5, False), ("body", b"hello"), ("end", ())]),
    ("chunked with extensions and trailers",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 1\r\n\r\n",
     [("head", "POST", b"/", "1.1", b"/", b"", ((b"host", b"x"), (b"transfer-encoding", b"chunked")),
       True, False, 0, True), ("body", b"hello world"), ("end", ((b"x-sum", b"1"),))]),
    ("Expect: 100-continue",
     b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\nz",
     [("head", "PUT", b"/", "1.1", b"/", b"", ((b"host", b"x"), (b"expect", b"100-Continue"),
                                               (b"content-length", b"1")), True, True, 1, False),
      ("body", b"z"), ("end", ())]),
    ("absolute-form target: its authority replaces Host (RFC 9112 §3.2.2)",
     b"GET http://example.com:80/p/q?x=1 HTTP/1.1\r\nHost: other.example\r\nX-A: 1\r\n\r\n",
     [("head", "GET", b"http://example.com:80/p/q?x=1", "1.1", b"/p/q", b"x=1",
       ((b"x-a", b"1"), (b"host", b"example.com:80")), True, False, 0, False),
      ("body", b""), ("end", ())]),
    ("absolute-form target without a path",
     b"GET https://example.com?x=1 HTTP/1.1\r\nHost: example.com\r\n\r\n",
     [("head", "GET", b"https://example.com?x=1", "1.1", b"/", b"x=1",
       ((b"host", b"example.com"),), True, False, 0, False), ("body", b""), ("end", ())]),
    ("HTTP/1.2 is read as HTTP/1.1 (RFC 9110 §2.5)",
     b"GET / HTTP/1.2\r\nHost: x\r\n\r\n",
     [("head", "GET", b"/", "1.1", b"/", b"", ((b"host", b"x"),), True, False, 0, False),
      ("body", b""), ("end", ())]),
    ("one empty line before the request line (RFC 9112 §2.2)",
     b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
     [("head", "GET", b"/", "1.1", b"/", b"", ((b"host", b"x"),), True, False, 0, False),
      ("body", b""), ("end", ())]),
    ("Content-Length with many leading zeros",
     b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"0" * 5000 + b"3\r\n\r\nabc",
     [("head", "POST", b"/", "1.1", b"/", b"",
       ((b"host", b"x"), (b"content-length", b"0" * 5000 + b"3")), True, False, 3, False),
      ("body", b"abc"), ("end", ())]),
    ("chunk size with leading zeros and an extension",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0000000000000000000000003;a=b\r\nabc\r\n0\r\n\r\n",
     [("head", "POST", b"/", "1.1", b"/", b"",
       ((b"host", b"x"), (b"transfer-encoding", b"chunked")), True, False, 0, True),
      ("body", b"abc"), ("end", ())]),
    ("asterisk-form for OPTIONS",
     b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
     [("head", "OPTIONS", b"*", "1.1", b"*", b"", ((b"host", b"x"),), True, False, 0, False),
      ("body", b""), ("end", ())]),
    ("several Cookie fields joined",
     b"GET / HTTP/1.1\r\nHost: x\r\nCookie: a=1\r\nCookie: b=2; c=3\r\n\r\n",
     [("head", "GET", b"/", "1.1", b"/", b"", ((b"host", b"x"), (b"cookie", b"a=1; b=2; c=3")),
       True, False, 0, False), ("body", b""), ("end", ())]),
    ("empty field value and HTAB inside a value",
     b"GET / HTTP/1.1\r\nHost: x\r\nX-E:\r\nX-T: a\tb\r\n\r\n",
     [("head", "GET", b"/", "1.1", b"/", b"", ((b"host", b"x"), (b"x-e", b""), (b"x-t", b"a\tb")),
       True, False, 0, False), ("body", b""), ("end", ())]),
]


@pytest.mark.parametrize("name,data,expected", GOOD, ids=[g[0] for g in GOOD])
def test_good_requests_whole_and_bytewise(name, data, expected):
    assert parse_whole(data) == expected
    assert parse_bytewise(data) == expected


@pytest.mark.parametrize("name,data,expected", GOOD, ids=[g[0] for g in GOOD])
def test_good_requests_with_trailing_bytes(name, data, expected):
    """Bytes of the next request stay in the parser, untouched."""
    parser = RequestParser(Config())
    parser.feed(data + b"GET /next HTTP/1.1\r\nHost: y\r\n\r\n")
    assert summarize(events_of(parser)) == expected
    head = parser.next_event()
    assert isinstance(head, RequestHead) and head.target == b"/next"


BAD = [
    ("two spaces in request line", b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("lower-case version", b"GET / http/1.1\r\nHost: x\r\n\r\n", 400),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    ("HTTP/2.1", b"GET / HTTP/2.1\r\nHost: x\r\n\r\n", 505),
    ("HTTP/0.9", b"GET / HTTP/0.9\r\nHost: x\r\n\r\n", 505),
    ("raw UTF-8 in the target (RFC 9112 §3.2)", b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("byte 0xFF in the target", b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("userinfo in an absolute-form target (RFC 9110 §4.2.4)",
     b"GET http://user:pw@evil.example/x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("empty host in an absolute-form target (RFC 9110 §4.2.1)",
     b"GET http:///x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("absolute-form target still needs Host in 1.1",
     b"GET http://a.example/x HTTP/1.1\r\n\r\n", 400),
    ("bare LF after one CRLF before the request line",
     b"\r\n\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("seventeen empty lines before the request line",
     b"\r\n" * 17 + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("TE with an empty first element", b"POST / HTTP/1.1\r\nHost: x\r\n"
     b"Transfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n", 400),
    ("TE with an empty second field", b"POST / HTTP/1.1\r\nHost: x\r\n"
     b"Transfer-Encoding: chunked\r\nTransfer-Encoding:\r\n\r\n0\r\n\r\n", 400),
    ("Content-Length of 19 significant digits", b"POST / HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: 1000000000000000000\r\n\r\n", 413),
    ("Content-Length of 5,000 digits", b"POST / HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n", 413),
    ("chunk size of 17 significant hex digits", b"POST / HTTP/1.1\r\nHost: x\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n10000000000000000\r\n", 413),
    ("bare LF in trailers", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\nX-T: 1\n\r\n", 400),
    ("control byte in a trailer", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\nX-T: a\x01\r\n\r\n", 400),
    ("method not a token", b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("control byte in target", b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("asterisk with GET", b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("CONNECT", b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n", 501),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
    ("NUL in value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    ("CR in value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400),
    ("DEL in value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n", 400),
    ("no colon", b"GET / HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n", 400),
    ("missing Host in 1.1", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("two Content-Lengths", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                            b"Content-Length: 1\r\n\r\nz", 400),
    ("Content-Length list", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 1\r\n\r\nz", 400),
    ("Content-Length sign", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\nz", 400),
    ("CL with TE", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n", 400),
    ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ("TE final not chunked", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
    ("TE chunked twice", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400),
    ("TE not implemented", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    ("bad chunk size", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ("chunk without CRLF", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"1\r\nab\r\n", 400),
    ("bare LF line ends", b"GET / HTTP/1.1\nHost: x\n\n", 400),
]


def run_until_error(data, bytewise, **config):
    parser = RequestParser(Config(**config))
    chunks = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
    for piece in chunks:
        parser.feed(piece)
        while True:
            ev = parser.next_event()
            if ev is None or isinstance(ev, EndOfMessage):
                break
    return None


@pytest.mark.parametrize("bytewise", [False, True], ids=["block", "bytewise"])
@pytest.mark.parametrize("name,data,status", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_raise_the_status(name, data, status, bytewise):
    with pytest.raises(HTTPError) as info:
        run_until_error(data, bytewise)
    assert info.value.status == status, info.value.message


def test_limits():
    big_line = b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    with pytest.raises(HTTPError) as info:
        run_until_error(big_line, False)
    assert info.value.status == 414
    # The request line alone, still incomplete, past the limit: 414 too.
    with pytest.raises(HTTPError) as info:
        run_until_error(b"GET /" + b"a" * 9000, False)
    assert info.value.status == 414
    big_headers = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: " + b"b" * 9000 + b"\r\n\r\n"
    with pytest.raises(HTTPError) as info:
        run_until_error(big_headers, False)
    assert info.value.status == 431
    many = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(100)) + b"\r\n"
    with pytest.raises(HTTPError) as info:
        run_until_error(many, False)
    assert info.value.status == 431
    exactly = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(99)) + b"\r\n"
    assert parse_whole(exactly)[0][0] == "head"


def test_body_limits():
    declared = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n"
    with pytest.raises(HTTPError) as info:
        run_until_error(declared, False, max_body_size=10)
    assert info.value.status == 413
    chunked = (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"6\r\nabcdef\r\n6\r\nabcdef\r\n0\r\n\r\n")
    with pytest.raises(HTTPError) as info:
        run_until_error(chunked, False, max_body_size=10)
    assert info.value.status == 413
    assert parse_whole(chunked, max_body_size=12)[1] == ("body", b"abcdef" * 2)


def test_body_is_handed_out_piece_by_piece():
    parser = RequestParser(Config())
    parser.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nab")
    assert isinstance(parser.next_event(), RequestHead)
    assert parser.next_event() == b"ab"
    assert parser.next_event() is None
    parser.feed(b"cdef")
    assert parser.next_event() == b"cdef"
    assert isinstance(parser.next_event(), EndOfMessage)


def test_accept_is_kept_for_the_server_and_the_parser_knows_no_scope_type():
    """RFC 9110 §5.3: several Accept lines are one list.  Which scope type
    the request gets (sse for text/event-stream) is section 8's choice."""
    parser = RequestParser(Config())
    parser.feed(b"GET / HTTP/1.1\r\nHost: x\r\nAccept: text/html\r\n"
                b"Accept: TEXT/event-stream\r\n\r\n")
    head = parser.next_event()
    assert head.accept == b"text/html, TEXT/event-stream"
    assert not hasattr(head, "event_stream")
    assert pagi_ref.exchange_kind(head) is pagi_ref.SSEExchange
    parser = RequestParser(Config())
    parser.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = parser.next_event()
    assert head.accept is None and pagi_ref.exchange_kind(head) is pagi_ref.Exchange


def test_serializer_pieces():
    assert pagi_ref.status_line(200) == b"HTTP/1.1 200 OK\r\n"
    assert pagi_ref.status_line(599) == b"HTTP/1.1 599 \r\n"
    assert pagi_ref.chunk(b"hello") == b"5\r\nhello\r\n"
    assert pagi_ref.LAST_CHUNK == b"0\r\n\r\n"
    assert pagi_ref.trailer_section([(b"x-a", b"1")]) == b"0\r\nx-a: 1\r\n\r\n"
    resp = pagi_ref.error_response(400, "Bad Request")
    head, _, body = resp.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"content-type: text/plain; charset=utf-8" in head
    assert b"connection: close" in head
    assert b"content-length: %d" % len(body) in head


def test_decode_path():
    assert pagi_ref.decode_path(b"/a%20b") == "/a b"
    assert pagi_ref.decode_path(b"/caf%C3%A9") == "/caf\u00e9"
    # Not UTF-8: the percent-decoded bytes, one character per byte.
    assert pagi_ref.decode_path(b"/%FF%FE") == "/\xff\xfe"


# -- segmentation independence ---------------------------------------------------
#
# The answer to a byte stream never depends on how it was split into
# packets: the same events, or the same error (status and message), whether
# it arrives whole, one byte at a time, or in two pieces split at any offset.

def outcome(pieces, **config):
    """('ok', summary) or ('error', status, message) for bytes fed in pieces."""
    parser = RequestParser(Config(**config))
    events = []
    try:
        for piece in pieces:
            parser.feed(piece)
            while True:
                ev = parser.next_event()
                if ev is None:
                    break
                events.append(ev)
    except HTTPError as err:
        assert err.__cause__ is None, "a bug in the parser: %r" % err.__cause__
        return ("error", err.status, err.message)
    return ("ok", summarize(events))


def splits(data):
    yield [data]
    yield [data[i:i + 1] for i in range(len(data))]
    for cut in range(1, len(data)):
        yield [data[:cut], data[cut:]]


SPLIT_CASES = ([(name, data) for name, data, _ in GOOD] + [(name, data) for name, data, _ in BAD]
               + [("pipelined", GOOD[0][1] + GOOD[1][1] + b"\r\n" + GOOD[0][1])])


@pytest.mark.parametrize("name,data", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_every_split_gives_the_same_outcome(name, data):
    if len(data) > 600:
        pytest.skip("long case: covered whole and bytewise above")
    expected = outcome([data])
    for pieces in splits(data):
        assert outcome(pieces) == expected, [len(p) for p in pieces]


@pytest.mark.parametrize("limit", [40, 41, 42, 43, 60])
def test_limits_do_not_depend_on_splits(limit):
    """At and around the size limits: the request line, the header block,
    the trailers, and the line ends right at the limit."""
    for data in (b"GET /" + b"a" * 30 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"b" * 20 + b"\r\n\r\n",
                 b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\nX-T: " + b"t" * 25 + b"\r\nX-U: 1\r\n\r\n",
                 b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        expected = outcome([data], max_header_size=limit)
        for pieces in splits(data):
            assert outcome(pieces, max_header_size=limit) == expected, (data, [len(p) for p in pieces])


def test_the_parser_is_dead_after_an_error():
    parser = RequestParser(Config())
    parser.feed(b"GET / HTTP/1.1\r\nHost : x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(HTTPError) as first:
        parser.next_event()
    parser.feed(b"GET /more HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(HTTPError) as again:
        parser.next_event()
    assert again.value is first.value
    assert parser.buffered == 0


def test_a_bug_in_the_parser_is_a_400_not_an_escape():
    """Only HTTPError leaves the parser: any other exception becomes a 400
    whose __cause__ is the bug, and the parser is dead after it."""
    class Broken(RequestParser):
        def _frame(self, request):
            raise ValueError("a bug")
    parser = Broken(Config())
    parser.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(HTTPError) as info:
        parser.next_event()
    assert info.value.status == 400
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(HTTPError):
        parser.next_event()


def test_smuggling_through_a_long_content_length_is_a_body():
    """The 4,300-digit Content-Length that used to escape int(): the bytes
    it declares are the body, never a second request."""
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    data = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"0" * 4300
            + b"%d\r\n\r\n" % len(smuggled) + smuggled)
    result = outcome([data])
    assert result[0] == "ok"
    assert [e[0] for e in result[1]] == ["head", "body", "end"]
    assert result[1][1] == ("body", smuggled)
