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


def expect_error(addr, raw, status, pieces=None, ref=False):
    resp, closed = send_until_answer(addr, pieces or [raw])
    assert resp.status == status, (resp, raw[:200])
    check_generated(resp, closed, ref)
    return resp


def check_generated(resp, closed, ref=False):
    """Only with ref (pagi_ref's REF-HTTP-GEN-1 and the type of HTTP-GEN-1):
    a short text/plain body with a Content-Length, Connection: close, and
    the connection closed.  The portable tests check the status only, and
    test_generated_responses_are_text_plain checks HTTP-GEN-1."""
    if ref:
        assert resp.header("content-type", b"").startswith(b"text/plain"), resp.headers
        assert len(resp.body) < 1024
        assert resp.header("content-length") is not None
        assert int(resp.header("content-length")) == len(resp.body)
        assert 0 < len(resp.body)
        assert resp.header("connection", b"").lower() == b"close"
        assert closed


GENERATED = [
    (b"GET /hello HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400),
    (b"GET /hello HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n", 413),
    (b"GET /raise-before HTTP/1.1\r\nHost: x\r\n\r\n", 500),
    (b"GET /no-response HTTP/1.1\r\nHost: x\r\n\r\n", 500),
]


@clause("HTTP-GEN-1")
@pytest.mark.parametrize("raw,status", GENERATED, ids=["400-line", "400-length", "413",
                                                       "500-raise", "500-backstop"])
def test_generated_responses_are_text_plain(addr, raw, status):
    resp, _closed = send_until_answer(addr, [raw])
    assert resp.status == status, resp
    assert resp.header("content-type", b"").startswith(b"text/plain"), resp.headers
    assert len(resp.body) < 1024


@clause("REF-HTTP-GEN-1")
@pytest.mark.parametrize("raw,status", [
    (b"GET /hello HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400),
    (b"GET /hello HTTP/1.1\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"GET /raise-before HTTP/1.1\r\nHost: x\r\n\r\n", 500),
    (b"GET /no-response HTTP/1.1\r\nHost: x\r\n\r\n", 500),
], ids=["400-line", "400-host", "501", "500-raise", "500-backstop"])
def test_generated_responses_are_length_framed_and_close(addr, raw, status):
    expect_error(addr, raw, status, ref=True)


@clause("HTTP-GEN-2")
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


@clause("HTTP-GEN-3")
@pytest.mark.parametrize("fields", [
    b"X-A : b\r\n",
    b"X-A b\r\n",
    b": nameless\r\n",
    b"X[A]: b\r\n",
])
def test_malformed_header_field(addr, fields):
    expect_error(addr, b"GET /hello HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n", 400)


@clause("REF-HTTP-GEN-3")
@pytest.mark.parametrize("fields", [
    b"X-A: b\r\n c\r\n",
    b"X-A: a\x01b\r\n",
    b"X-A: a\x00b\r\n",
], ids=["obs-fold", "ctl", "nul"])
def test_header_field_pagi_ref_refuses(addr, fields):
    expect_error(addr, b"GET /hello HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n", 400,
                 ref=True)


@clause("REF-HTTP-GEN-3")
def test_bare_lf_line_ends(addr):
    expect_error(addr, b"GET /hello HTTP/1.1\nHost: x\n\n", 400, ref=True)


@clause("HTTP-GEN-4")
@pytest.mark.parametrize("raw", [
    b"GET /hello HTTP/1.1\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /hello HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
])
def test_host_rules(addr, raw):
    expect_error(addr, raw, 400)


@clause("HTTP-GEN-4")
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


@clause("HTTP-GEN-5")
@pytest.mark.parametrize("fields", [
    b"Content-Length: abc\r\n",
    b"Content-Length: -1\r\n",
    b"Content-Length: +5\r\n",
])
def test_invalid_content_length(addr, fields):
    expect_error(addr, b"POST /echo HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\nhello", 400)


@clause("REF-HTTP-GEN-5")
@pytest.mark.parametrize("fields", [
    b"Content-Length: 5\r\nContent-Length: 5\r\n",
    b"Content-Length: 5, 5\r\n",
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
], ids=["twice", "list", "with-te"])
def test_content_length_pagi_ref_refuses(addr, fields):
    expect_error(addr, b"POST /echo HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\nhello", 400,
                 ref=True)


LAST_NOT_CHUNKED = [
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
]


@clause("HTTP-GEN-6")
@pytest.mark.parametrize("raw", LAST_NOT_CHUNKED, ids=["gzip", "chunked-gzip"])
def test_bad_transfer_encoding(addr, raw):
    # RFC 9112 says 400 (the last coding is not chunked), PAGI says 501 (an
    # unrecognised coding): either refuses the body (deviations.md, questions).
    resp, closed = send_until_answer(addr, [raw])
    assert resp.status in (400, 501), resp
    check_generated(resp, closed)


@clause("REF-HTTP-GEN-6")
@pytest.mark.parametrize("raw", LAST_NOT_CHUNKED, ids=["gzip", "chunked-gzip"])
def test_bad_transfer_encoding_is_400(addr, raw):
    expect_error(addr, raw, 400, ref=True)


@clause("REF-HTTP-GEN-6")
@pytest.mark.parametrize("raw", [
    b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
], ids=["http10", "chunked-twice"])
def test_transfer_encoding_pagi_ref_refuses(addr, raw):
    expect_error(addr, raw, 400, ref=True)


@clause("HTTP-GEN-7")
def test_unimplemented_transfer_coding(addr):
    expect_error(addr, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked"
                       b"\r\n\r\n", 501)


@clause("HTTP-GEN-8")
def test_declared_body_too_large(addr, max_body_size):
    raw = (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (max_body_size + 1))
    expect_error(addr, raw, 413)


@clause("HTTP-GEN-8")
def test_chunked_body_grows_too_large(addr, max_body_size):
    piece = b"x" * 65536
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    full, rest = divmod(max_body_size, len(piece))
    pieces = [b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"]
    pieces += [chunk] * full
    if rest:
        pieces.append(b"%x\r\n%s\r\n" % (rest, b"y" * rest))
    pieces.append(b"1\r\nz\r\n")   # one byte past the limit
    resp, closed = send_until_answer(addr, pieces, timeout=15, poll=0)
    assert resp.status == 413
    check_generated(resp, closed)


LONG = 256     # pieces of 4 KiB: 1 MiB, more than any server's header limit


@clause("HTTP-GEN-9")
def test_request_line_too_long(addr):
    pieces = [b"GET /hello?"] + [b"a" * 4096] * LONG + [b" HTTP/1.1\r\nHost: x\r\n\r\n"]
    resp, closed = send_until_answer(addr, pieces)
    assert resp.status == 414
    check_generated(resp, closed)


@clause("HTTP-GEN-10")
def test_header_block_too_large(addr):
    pieces = ([b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: "] + [b"b" * 4096] * LONG
              + [b"\r\n\r\n"])
    resp, closed = send_until_answer(addr, pieces)
    assert resp.status == 431
    check_generated(resp, closed)


@clause("REF-HTTP-GEN-10")
@pytest.mark.parametrize("head,status", [(b"GET /hello?", 414),
                                         (b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: ", 431)],
                         ids=["line", "headers"])
def test_too_long_answered_before_the_end(addr, head, status):
    # the line or header block never ends: the answer must come anyway
    resp, closed = send_until_answer(addr, [head] + [b"a" * 4096] * 32)
    assert resp.status == status
    check_generated(resp, closed, ref=True)


@clause("HTTP-GEN-10")
def test_too_many_header_fields(addr):
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(1000))
    resp, closed = send_until_answer(
        addr, [b"GET /hello HTTP/1.1\r\nHost: x\r\n", fields[:1200], fields[1200:], b"\r\n"])
    assert resp.status == 431
    check_generated(resp, closed)


@clause("HTTP-GEN-18")
def test_higher_minor_version_is_read_as_http11(addr):
    resp, _ = send_until_answer(addr, [b"GET /hello HTTP/1.2\r\nHost: x\r\n"
                                       b"Connection: close\r\n\r\n"])
    assert resp.status == 200 and resp.body == b"hello"


@clause("HTTP-GEN-11")
@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/3.0"])
def test_unsupported_version(addr, version):
    expect_error(addr, b"GET /hello " + version + b"\r\nHost: x\r\n\r\n", 505, ref=True)


@clause("HTTP-GEN-12")
@pytest.mark.parametrize("body", [b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXX0\r\n\r\n"])
def test_malformed_chunked_body(addr, body):
    expect_error(addr, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + body, 400)


@clause("HTTP-GEN-13")
def test_empty_lines_before_request_are_ignored(addr):
    resp, _ = send_until_answer(addr, [b"\r\n\r\n" + build_request("GET", "/hello", close=True)])
    assert resp.status == 200 and resp.body == b"hello"


@clause("HTTP-GEN-14")
def test_header_timeout_408(own_server):
    with own_server(["--header-timeout", "0.5"]) as srv:
        with Client(srv.addr, timeout=5) as c:
            c.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
            start = time.monotonic()
            resp = c.read()
            elapsed = time.monotonic() - start
            assert resp.status == 408
            check_generated(resp, c.closed(), ref=True)
        assert elapsed < 4.0


@clause("HTTP-GEN-14")
def test_keepalive_timeout_closes_silently(own_server):
    with own_server(["--keepalive-timeout", "0.5"]) as srv:
        with Client(srv.addr, timeout=5) as c:
            assert c.request("GET", "/hello").body == b"hello"
            assert c.closed(timeout=4.0)


@clause("HTTP-GEN-15")
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
                check_generated(resp, extra.closed(), ref=True)
            for c in held:
                c.send(b"Host: x\r\n\r\n")
                assert c.read().body == b"hello"
                assert c.request("GET", "/hello").body == b"hello"
        finally:
            for c in held:
                c.close()


@clause("HTTP-GEN-17")
def test_connect_is_501(addr):
    expect_error(addr, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501,
                 ref=True)


@clause("HTTP-GEN-7")
def test_transfer_coding_list_split_over_two_fields(addr):
    expect_error(addr, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n", 501)


@clause("REF-HTTP-GEN-8")
def test_huge_chunk_size_is_413(addr):
    expect_error(addr, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"FFFFFFFFFFFFFFFFFFFF\r\n", 413, ref=True)
