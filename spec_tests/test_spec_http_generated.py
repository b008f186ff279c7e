"""HTTP: responses the server generates itself (docs/spec.md section 2.6)."""
import select
import time

import pytest

from spec_wire import Client, build_request

clause = pytest.mark.clause


def send_until_answer(addr, pieces, timeout=5.0, poll=0.02):
    """Send the pieces one by one, stopping as soon as the server answers
    (so that a server that answers early does not meet unread bytes and
    reset the connection before the client has read the answer)."""
    c = Client(addr, timeout=timeout)
    try:
        for piece in pieces:
            try:
                c.send(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            r, _, _ = select.select([c.sock], [], [], poll)
            if r:
                break
        resp = c.read()
        closed = c.closed()
    finally:
        c.close()
    return resp, closed


def expect_error(addr, raw, status, pieces=None):
    resp, closed = send_until_answer(addr, pieces or [raw])
    assert resp.status == status, (resp, raw[:200])
    check_generated(resp, closed)
    return resp


def check_generated(resp, closed):
    """HTTP-GEN-1: text/plain body, Content-Length, Connection: close, closed."""
    assert resp.header("content-type", b"").startswith(b"text/plain"), resp.headers
    assert resp.header("content-length") is not None
    assert int(resp.header("content-length")) == len(resp.body)
    assert 0 < len(resp.body) < 1024
    assert resp.header("connection", b"").lower() == b"close"
    assert closed


@clause("HTTP-GEN-2", "HTTP-GEN-1")
@pytest.mark.parametrize("line", [
    b"GET /hello\r\n",
    b"GET  /hello HTTP/1.1\r\n",
    b"G(T /hello HTTP/1.1\r\n",
    b"GET /hello HTTP/1.x\r\n",
    b"GET /hello http/1.1\r\n",
    b"GET /he\x01llo HTTP/1.1\r\n",
    b"GET /hello HTTP/1.1 extra\r\n",
])
def test_malformed_request_line(addr, line):
    expect_error(addr, line + b"Host: x\r\n\r\n", 400)


@clause("HTTP-GEN-3", "HTTP-GEN-1")
@pytest.mark.parametrize("fields", [
    b"X-A : b\r\n",
    b"X-A: b\r\n c\r\n",
    b"X-A b\r\n",
    b"X-A: a\x01b\r\n",
    b"X-A: a\x00b\r\n",
    b": nameless\r\n",
    b"X[A]: b\r\n",
])
def test_malformed_header_field(addr, fields):
    expect_error(addr, b"GET /hello HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n", 400)


@clause("HTTP-GEN-3", "HTTP-GEN-1")
def test_bare_lf_line_ends(addr):
    expect_error(addr, b"GET /hello HTTP/1.1\nHost: x\n\n", 400)


@clause("HTTP-GEN-4", "HTTP-GEN-1")
@pytest.mark.parametrize("raw", [
    b"GET /hello HTTP/1.1\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /hello HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
])
def test_host_rules(addr, raw):
    expect_error(addr, raw, 400)


@clause("HTTP-GEN-4", "HTTP-GEN-1")
@pytest.mark.parametrize("host", [b"a b", b"bad/host", b"user@evil", b"ex\xffample",
                                  b"host:port"], ids=["space", "slash", "userinfo",
                                                      "non-ascii", "bad-port"])
def test_invalid_host_value(addr, host):
    expect_error(addr, b"GET /hello HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", 400)


@clause("HTTP-GEN-4")
@pytest.mark.parametrize("host", [b"example.com", b"example.com:8080", b"127.0.0.1:1",
                                  b"[::1]:80", b"xn--caf-dma.example"])
def test_valid_host_values(addr, host):
    resp, _ = send_until_answer(addr, [b"GET /hello HTTP/1.1\r\nHost: " + host
                                       + b"\r\nConnection: close\r\n\r\n"])
    assert resp.status == 200 and resp.body == b"hello"


@clause("HTTP-GEN-4")
def test_http10_without_host_is_fine(addr):
    resp, _ = send_until_answer(addr, [b"GET /hello HTTP/1.0\r\n\r\n"])
    assert resp.status == 200 and resp.body == b"hello"


@clause("HTTP-GEN-5", "HTTP-GEN-1")
@pytest.mark.parametrize("fields", [
    b"Content-Length: abc\r\n",
    b"Content-Length: -1\r\n",
    b"Content-Length: +5\r\n",
    b"Content-Length: 5\r\nContent-Length: 5\r\n",
    b"Content-Length: 5, 5\r\n",
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
])
def test_invalid_content_length(addr, fields):
    expect_error(addr, b"POST /echo HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\nhello", 400)


@clause("HTTP-GEN-6", "HTTP-GEN-1")
@pytest.mark.parametrize("raw", [
    b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
])
def test_bad_transfer_encoding(addr, raw):
    expect_error(addr, raw, 400)


@clause("HTTP-GEN-7", "HTTP-GEN-1")
def test_unimplemented_transfer_coding(addr):
    expect_error(addr, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked"
                       b"\r\n\r\n", 501)


@clause("HTTP-GEN-8", "HTTP-GEN-1")
def test_declared_body_too_large(addr, max_body_size):
    raw = (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (max_body_size + 1))
    expect_error(addr, raw, 413)


@clause("HTTP-GEN-8", "HTTP-GEN-1")
def test_chunked_body_grows_too_large(addr, max_body_size):
    piece = b"x" * 65536
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    full, rest = divmod(max_body_size, len(piece))
    pieces = [b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"]
    pieces += [chunk] * full
    if rest:
        pieces.append(b"%x\r\n%s\r\n" % (rest, b"y" * rest))
    pieces.append(b"1\r\n")   # one byte past the limit: the server must answer now
    resp, closed = send_until_answer(addr, pieces, timeout=15, poll=0)
    assert resp.status == 413
    check_generated(resp, closed)


@clause("HTTP-GEN-9", "HTTP-GEN-1")
def test_request_line_too_long(addr):
    head = b"GET /hello?"
    pieces = [head] + [b"a" * 4096] * 32     # up to 128 KiB, sent until answered
    resp, closed = send_until_answer(addr, pieces)
    assert resp.status == 414
    check_generated(resp, closed)


@clause("HTTP-GEN-10", "HTTP-GEN-1")
def test_header_block_too_large(addr):
    pieces = [b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: "] + [b"b" * 4096] * 32
    resp, closed = send_until_answer(addr, pieces)
    assert resp.status == 431
    check_generated(resp, closed)


@clause("HTTP-GEN-10", "HTTP-GEN-1")
def test_too_many_header_fields(addr):
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(1000))
    resp, closed = send_until_answer(
        addr, [b"GET /hello HTTP/1.1\r\nHost: x\r\n", fields[:1200], fields[1200:], b"\r\n"])
    assert resp.status == 431
    check_generated(resp, closed)


@clause("HTTP-GEN-11", "HTTP-GEN-1")
@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/3.0"])
def test_unsupported_version(addr, version):
    expect_error(addr, b"GET /hello " + version + b"\r\nHost: x\r\n\r\n", 505)


@clause("HTTP-GEN-12", "HTTP-GEN-1")
@pytest.mark.parametrize("body", [b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXX0\r\n\r\n"])
def test_malformed_chunked_body(addr, body):
    expect_error(addr, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + body, 400)


@clause("HTTP-GEN-13")
def test_empty_lines_before_request_are_ignored(addr):
    resp, _ = send_until_answer(addr, [b"\r\n\r\n" + build_request("GET", "/hello", close=True)])
    assert resp.status == 200 and resp.body == b"hello"


@clause("HTTP-GEN-14", "HTTP-GEN-1")
def test_header_timeout_408(own_server):
    with own_server(["--header-timeout", "0.5"]) as srv:
        with Client(srv.addr, timeout=5) as c:
            c.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
            start = time.monotonic()
            resp = c.read()
            elapsed = time.monotonic() - start
            assert resp.status == 408
            check_generated(resp, c.closed())
        assert elapsed < 4.0


@clause("HTTP-GEN-14")
def test_keepalive_timeout_closes_silently(own_server):
    with own_server(["--keepalive-timeout", "0.5"]) as srv:
        with Client(srv.addr, timeout=5) as c:
            assert c.request("GET", "/hello").body == b"hello"
            assert c.closed(timeout=4.0)


@clause("HTTP-GEN-15", "HTTP-GEN-1")
def test_admission_control_503(own_server):
    with own_server(["--max-connections", "2"]) as srv:
        held = [Client(srv.addr, timeout=5) for _ in range(2)]
        try:
            for c in held:
                assert c.request("GET", "/hello").body == b"hello"
                # Busy: the next head has begun (an idle one could be closed
                # to make room instead).
                c.send(b"GET /hello HTTP/1.1\r\n")
            with Client(srv.addr, timeout=5) as extra:
                resp = extra.read()
                assert resp.status == 503
                assert resp.header("retry-after") == b"5"
                check_generated(resp, extra.closed())
            for c in held:
                c.send(b"Host: x\r\n\r\n")
                assert c.read().body == b"hello"
                assert c.request("GET", "/hello").body == b"hello"
        finally:
            for c in held:
                c.close()


@clause("HTTP-GEN-17", "HTTP-GEN-1")
def test_connect_is_501(addr):
    expect_error(addr, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501)


@clause("HTTP-GEN-7", "HTTP-GEN-1")
def test_transfer_coding_list_split_over_two_fields(addr):
    expect_error(addr, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n", 501)


@clause("HTTP-GEN-8", "HTTP-GEN-1")
def test_huge_chunk_size_is_413(addr):
    expect_error(addr, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"FFFFFFFFFFFFFFFFFFFF\r\n", 413)
