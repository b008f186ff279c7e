"""Section 4 over the wire: every server-generated status for malformed or
over-limit requests, and the parser's tolerance where RFC 9112 asks for it.

RFC 9112 §2.2 (empty lines before a request), §3 (request line), §5
(field syntax, no white space before the colon, obs-fold), §6.1 and §6.3
(Transfer-Encoding / Content-Length), §7.1 (chunked), RFC 9110 §5.5
(field values), §15.6.6 (505).  Limits: max_header_size (414 / 431),
max_header_count (431), max_body_size (413).

Each server-generated response: `Content-Type: text/plain; charset=utf-8`,
a Content-Length matching a short non-empty body, `Connection: close`, and
the connection closed after it.
"""
import socket

import pytest

from conftest import serve
from spec_wire import Reader, connect
from apputil import nodelay, read_body, req, respond


@pytest.fixture(scope="module")
def srv():
    calls = []

    def app(scope, receive, send):
        calls.append(scope["path"])
        data = yield from read_body(receive)
        if data is None:
            return
        yield from respond(send, 200, b"ok:%d:" % len(data) + data[:64])

    with serve(app, max_body_size=1000) as running:
        running.calls = calls
        yield running


def read_server_error(reader):
    resp = reader.read_response()
    if (resp.header("connection") or b"").lower() != b"close":
        return resp, None     # not a server-generated error: fail without waiting
    return resp, reader.read_all()


def assert_server_error(resp, rest, status):
    assert resp.status == status, resp
    assert resp.header("content-type") == b"text/plain; charset=utf-8"
    assert resp.header("content-length") == str(len(resp.body)).encode()
    assert resp.header("transfer-encoding") is None
    assert 0 < len(resp.body) < 1024
    assert (resp.header("connection") or b"").lower() == b"close"
    assert rest == b"", "bytes after a server-generated error: %r" % rest[:200]


H = b"Host: test\r\n"
LONG = b"a" * 9000

CASES = [
    # 400: request line
    ("garbage-line", b"GARBAGE\r\n\r\n", 400),
    ("missing-version", b"GET /\r\n" + H + b"\r\n", 400),
    ("double-space", b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("extra-token", b"GET / HTTP/1.1 x\r\n" + H + b"\r\n", 400),
    ("bad-version-syntax", b"GET / HTTP/1.x\r\n" + H + b"\r\n", 400),
    ("target-not-origin", b"GET foo HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("method-not-token", b"G(T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    # 400: header fields
    ("space-before-colon", b"GET / HTTP/1.1\r\nHost : test\r\n\r\n", 400),
    ("tab-before-colon", b"GET / HTTP/1.1\r\n" + H + b"X-A\t: 1\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: one\r\n two\r\n\r\n", 400),
    ("obs-fold-tab", b"GET / HTTP/1.1\r\n" + H + b"X-A: one\r\n\ttwo\r\n\r\n", 400),
    ("no-colon", b"GET / HTTP/1.1\r\n" + H + b"NoColonHere\r\n\r\n", 400),
    ("empty-name", b"GET / HTTP/1.1\r\n" + H + b": value\r\n\r\n", 400),
    ("name-not-token", b"GET / HTTP/1.1\r\n" + H + b"X@A: 1\r\n\r\n", 400),
    ("space-in-name", b"GET / HTTP/1.1\r\n" + H + b"X A: 1\r\n\r\n", 400),
    ("value-ctl-01", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n\r\n", 400),
    ("value-nul", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    ("value-lone-cr", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", 400),
    ("value-ctl-1f", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x1fb\r\n\r\n", 400),
    ("value-del", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x7fb\r\n\r\n", 400),
    # 400: Host
    ("missing-host-11", b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n", 400),
    ("two-hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    # 400: Content-Length
    ("duplicate-cl", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    ("cl-list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello", 400),
    ("cl-plus", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello", 400),
    ("cl-negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    ("cl-hex", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\nhello", 400),
    ("cl-alpha", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5a\r\n\r\nhello", 400),
    ("cl-empty", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: \r\n\r\n", 400),
    # 400: Transfer-Encoding
    ("cl-and-te", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-in-http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-final-not-chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
    ("te-gzip-only", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n", 400),
    ("te-chunked-twice", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n", 400),
    # 400: chunked framing
    ("chunk-size-not-hex", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                           b"zz\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-data-no-crlf", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                           b"5\r\nhelloXX0\r\n\r\n", 400),
    # 501
    ("te-gzip-chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501),
    ("te-unknown-chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: x-foo, chunked\r\n\r\n", 501),
    # 505
    ("http-2.0", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("http-2.1", b"GET / HTTP/2.1\r\n" + H + b"\r\n", 505),
    ("http-3.0", b"GET / HTTP/3.0\r\n" + H + b"\r\n", 505),
    ("http-0.9", b"GET / HTTP/0.9\r\n" + H + b"\r\n", 505),
    # 414
    ("long-request-line", b"GET /" + LONG + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    ("long-request-line-unterminated", b"GET /" + LONG, 414),
    # 431
    ("long-header", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + LONG + b"\r\n\r\n", 431),
    ("long-header-unterminated", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + LONG, 431),
    ("many-bytes-of-headers", b"GET / HTTP/1.1\r\n" + H
     + b"".join(b"X-H%02d: %s\r\n" % (i, b"v" * 200) for i in range(50)) + b"\r\n", 431),
    ("101-fields", b"GET / HTTP/1.1\r\n" + H
     + b"".join(b"X-H%03d: v\r\n" % i for i in range(100)) + b"\r\n", 431),
    # 413 (max_body_size=1000 in this module's server)
    ("declared-too-large", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1001\r\n\r\n", 413),
    ("declared-huge", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999\r\n\r\n", 413),
    ("declared-too-large-expect", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5000\r\n"
                                  b"Expect: 100-continue\r\n\r\n", 413),
]

# The application is not involved in these: the server answers on its own.
# (Chunked framing errors are found while the application reads the body.)
NOT_DISPATCHED = {name for name, _, status in CASES if not name.startswith("chunk-")}


@pytest.mark.parametrize("name,raw,status", CASES, ids=[c[0] for c in CASES])
def test_server_generated_status(srv, name, raw, status):
    n = len(srv.calls)
    with connect(srv.port) as s:
        s.sendall(raw)
        resp, rest = read_server_error(Reader(s))
    assert_server_error(resp, rest, status)
    if name in NOT_DISPATCHED:
        assert len(srv.calls) == n, "the application was called for %s" % name


def test_chunked_body_discovered_too_large_gets_413(srv):
    with connect(srv.port) as s:
        nodelay(s)
        s.sendall(b"POST /chunked HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                  + b"258\r\n" + b"a" * 600 + b"\r\n")
        s.sendall(b"258\r\n" + b"b" * 600 + b"\r\n0\r\n\r\n")
        resp, rest = read_server_error(Reader(s))
    assert_server_error(resp, rest, 413)


def test_bytes_after_a_bad_request_are_not_answered(srv):
    with connect(srv.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n" + req("/after"))
        resp, rest = read_server_error(Reader(s))
    assert_server_error(resp, rest, 400)


def test_bad_request_after_a_good_pipelined_one(srv):
    with connect(srv.port) as s:
        s.sendall(req("/good") + b"GET / HTTP/1.1\r\nHost: test\r\nX-A: a\x00b\r\n\r\n" + req("/never"))
        r = Reader(s)
        good = r.read_response()
        assert good.status == 200 and good.body == b"ok:0:"
        resp, rest = read_server_error(r)
    assert_server_error(resp, rest, 400)


@pytest.mark.parametrize("host", [b"a b", b"bad/host", b"user@evil", b"ex\xffample"],
                         ids=["space", "slash", "userinfo", "non-ascii"])
def test_invalid_host_value_is_400(srv, host):
    # RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status
    # code to any HTTP/1.1 request message that lacks a Host header field and
    # to any request message that contains more than one Host header field
    # line or a Host header field with an invalid field value."  Host =
    # uri-host [ ":" port ] (RFC 9110 §7.2).
    n = len(srv.calls)
    with connect(srv.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        resp, rest = read_server_error(Reader(s))
    assert_server_error(resp, rest, 400)
    assert len(srv.calls) == n


@pytest.mark.parametrize("host", [b"example.com", b"example.com:8080", b"127.0.0.1:80",
                                  b"[::1]:8000", b"xn--bcher-kva.example", b""])
def test_valid_host_values_accepted(srv, host):
    ok(srv, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")


# -- accepted at the limits ---------------------------------------------------------

def ok(srv, raw, expect_len=0):
    with connect(srv.port) as s:
        s.sendall(raw)
        resp = Reader(s).read_response()
    assert resp.status == 200, resp
    assert resp.body.startswith(b"ok:%d:" % expect_len), resp.body
    return resp


def test_declared_body_at_the_limit(srv):
    ok(srv, req("/", "POST", [("Content-Length", "1000")], b"z" * 1000), 1000)


def test_chunked_body_at_the_limit(srv):
    ok(srv, req("/", "POST", [("Transfer-Encoding", "chunked")],
                b"1f4\r\n" + b"a" * 500 + b"\r\n1F4\r\n" + b"b" * 500 + b"\r\n0\r\n\r\n"), 1000)


def test_hundred_fields_accepted(srv):
    fields = [("X-H%03d" % i, "v") for i in range(99)]  # + Host = 100
    ok(srv, req("/", headers=fields))


def test_header_count_limit_from_config():
    def app(scope, receive, send):
        yield from respond(send, 200, b"ok")

    with serve(app, max_header_count=5) as running:
        for count, status in [(4, 200), (6, 431)]:
            with connect(running.port) as s:
                s.sendall(req("/", headers=[("X-H%d" % i, "v") for i in range(count)]))
                r = Reader(s)
                resp = r.read_response()
                assert resp.status == status
                if status == 431:
                    assert_server_error(resp, r.read_all(), 431)


def test_long_but_allowed_request_line_and_headers(srv):
    ok(srv, req("/" + "p" * 3000, headers=[("X-Big", "v" * 3000)]))


def test_empty_lines_before_a_request_are_tolerated(srv):
    ok(srv, b"\r\n" + req("/"))
    ok(srv, b"\r\n\r\n" + req("/"))


def test_empty_line_between_pipelined_requests_is_tolerated(srv):
    with connect(srv.port) as s:
        r = Reader(s)
        s.sendall(req("/1", "POST", [("Content-Length", "2")], b"ab") + b"\r\n" + req("/2"))
        assert r.read_response().body == b"ok:2:ab"
        assert r.read_response().body == b"ok:0:"


def test_http10_without_host_is_fine(srv):
    ok(srv, req("/", version="HTTP/1.0", host=False))


def test_transfer_encoding_is_case_insensitive(srv):
    ok(srv, req("/", "POST", [("Transfer-Encoding", "Chunked")], b"2\r\nhi\r\n0\r\n\r\n"), 2)


def test_tab_and_obs_text_in_header_values_accepted():
    seen = []

    def app(scope, receive, send):
        seen.append(dict(scope["headers"]))
        yield from respond(send, 200, b"ok")

    with serve(app) as running, connect(running.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nX-Tab: a\tb\r\nX-Obs: caf\xe9\r\n\r\n")
        assert Reader(s).read_response().status == 200
    assert seen[0][b"x-tab"] == b"a\tb"
    assert seen[0][b"x-obs"] == b"caf\xe9"


# -- the parser fed one byte at a time gives the same result as one block ---------------

FULL_REQUEST = (b"\r\nPOST /up/%C3%A9?x=1 HTTP/1.1\r\nHost: test\r\nX-One: 1\r\n"
                b"Cookie: a=1\r\nCookie: b=2\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3;ext=\"q\"\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trail: t\r\n\r\n")


def test_one_byte_at_a_time_equals_one_block():
    seen = []

    def app(scope, receive, send):
        data = yield from read_body(receive)
        seen.append((scope["method"], scope["path"], scope["raw_path"], scope["query_string"],
                     [tuple(h) for h in scope["headers"]], data))
        yield from respond(send, 200, data)

    with serve(app) as running:
        with connect(running.port) as s:
            s.sendall(FULL_REQUEST)
            block = Reader(s).read_response()
        with connect(running.port) as s:
            nodelay(s)
            for i in range(len(FULL_REQUEST)):
                s.sendall(FULL_REQUEST[i:i + 1])
            bytewise = Reader(s).read_response()
    assert block.status == bytewise.status == 200
    assert block.body == bytewise.body == b"abc0123456789abcdef"
    assert len(seen) == 2 and seen[0] == seen[1]
    assert seen[0][1] == "/up/\u00e9"


def test_one_byte_at_a_time_bad_request_still_400(srv):
    raw = b"GET / HTTP/1.1\r\nHost: test\r\nX-A : b\r\n\r\n"
    with connect(srv.port) as s:
        nodelay(s)
        try:
            for i in range(len(raw)):
                s.sendall(raw[i:i + 1])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer at the colon; the response is still readable
        resp, rest = read_server_error(Reader(s))
    assert_server_error(resp, rest, 400)
