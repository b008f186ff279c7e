"""HTTP: framing, persistent connections, server-supplied behaviour
(docs/spec.md sections 2.4 and 2.5)."""
import email.utils
import re
import time

import pytest

from spec_wire import Client, build_request, new_token, raw_exchange, wait_journal

clause = pytest.mark.clause

IMF_FIXDATE = re.compile(rb"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|"
                         rb"Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT$")


def split_raw(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


@clause("HTTP-FRAME-1")
def test_chunked_framing(addr):
    with Client(addr) as c:
        resp = c.request("GET", "/stream?n=3&size=5")
        assert resp.chunked and resp.complete
        assert resp.body == b"aaaaabbbbbccccc"
        assert c.request("GET", "/hello").body == b"hello"


@clause("REF-HTTP-FRAME-1")
@pytest.mark.parametrize("empty", ["0", "1"])
def test_one_chunk_per_event(addr, empty):
    raw = raw_exchange(addr[1], build_request("GET", "/stream?n=3&size=5&empty=" + empty,
                                              close=True))
    head, body = split_raw(raw)
    assert b"\r\ntransfer-encoding: chunked" in head.lower()
    assert body == b"5\r\naaaaa\r\n5\r\nbbbbb\r\n5\r\nccccc\r\n0\r\n\r\n"


@clause("HTTP-FRAME-2")
def test_empty_body_event_does_not_end_the_body(addr):
    with Client(addr) as c:
        resp = c.request("GET", "/stream?n=3&size=5&empty=1")
        assert resp.complete and resp.body == b"aaaaabbbbbccccc"
        assert c.request("GET", "/hello").body == b"hello"


@clause("HTTP-FRAME-3")
def test_http10_without_content_length_is_close_delimited(addr):
    with Client(addr) as c:
        c.send(build_request("GET", "/stream?n=3&size=5", version="1.0"))
        resp = c.read()
    assert resp.version == b"HTTP/1.0" or resp.version == b"HTTP/1.1"
    assert resp.header("transfer-encoding") is None
    assert resp.header("content-length") is None
    assert resp.header("connection", b"").lower() == b"close"
    assert resp.body == b"aaaaabbbbbccccc"


@clause("HTTP-FRAME-4")
def test_http10_keep_alive_with_content_length(addr):
    with Client(addr) as c:
        resp = c.request("GET", "/hello", version="1.0", headers=[("Connection", "keep-alive")])
        assert resp.body == b"hello"
        assert resp.header("connection", b"").lower() == b"keep-alive"
        resp = c.request("GET", "/hello", version="1.0", headers=[("Connection", "keep-alive")])
        assert resp.body == b"hello"


@clause("HTTP-FRAME-4")
def test_http10_without_keep_alive_is_closed(addr):
    with Client(addr) as c:
        resp = c.request("GET", "/hello", version="1.0")
        assert resp.body == b"hello"
        assert c.closed()


@clause("HTTP-FRAME-5")
def test_http11_persistent_by_default(addr):
    with Client(addr) as c:
        assert c.request("GET", "/hello").body == b"hello"
        assert not c.closed(0.3)
        assert c.request("GET", "/hello").body == b"hello"


@clause("HTTP-FRAME-6")
def test_client_connection_close(addr):
    with Client(addr) as c:
        resp = c.request("GET", "/hello", close=True)
        assert resp.body == b"hello"
        assert c.closed()


@clause("HTTP-FRAME-14")
def test_client_connection_close_is_echoed(addr):
    with Client(addr) as c:
        resp = c.request("GET", "/hello", close=True)
        assert resp.header("connection", b"").lower() == b"close"


@clause("HTTP-FRAME-6")
def test_nothing_after_connection_close_is_answered(addr):
    with Client(addr) as c:
        c.send(build_request("GET", "/hello", close=True) + build_request("GET", "/hello"))
        resp = c.read()
        assert resp.body == b"hello"
        assert c.closed()


@clause("HTTP-FRAME-10")
def test_unread_chunked_body_is_never_parsed_as_a_request(addr):
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in
                    [b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"] * 50) + b"0\r\n\r\n"
    with Client(addr) as c:
        c.send(build_request("POST", "/hello", headers=[("Transfer-Encoding", "chunked")])
               + body + build_request("GET", "/hello", close=True))
        first = c.read()
        assert first.status == 200 and first.body == b"hello"
        try:
            second = c.read()
        except (EOFError, ConnectionResetError):
            return
        assert second.status == 200 and second.body == b"hello"
        assert c.closed()


@clause("HTTP-FRAME-7")
def test_application_connection_close(addr):
    with Client(addr) as c:
        resp = c.request("GET", "/app-close")
        assert resp.body == b"bye"
        assert b"close" in resp.header("connection", b"").lower()
        assert c.closed()


def pipelined(addr):
    token = new_token()
    reqs = b"".join([
        build_request("GET", "/pipeline?token=%s&tag=1&delay_ms=200" % token),
        build_request("GET", "/pipeline?token=%s&tag=2" % token),
        build_request("GET", "/hello", close=True),
    ])
    with Client(addr) as c:
        c.send(reqs)
        bodies = [c.read().body for _ in range(3)]
    return token, bodies


@clause("HTTP-FRAME-8")
def test_pipelined_requests_answered_in_order(addr):
    _token, bodies = pipelined(addr)
    assert bodies == [b"1", b"2", b"hello"]


@clause("HTTP-FRAME-9")
def test_pipelined_requests_one_at_a_time(addr):
    token, _bodies = pipelined(addr)
    entries = wait_journal(addr, token, lambda es: len(es) >= 4)
    assert entries == ["start:1", "end:1", "start:2", "end:2"]


@clause("HTTP-FRAME-10")
@pytest.mark.parametrize("size", [1000, 300000])
def test_unread_body_is_never_parsed_as_a_request(addr, size):
    body = (b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n" * (size // 32 + 1))[:size]
    with Client(addr) as c:
        c.send(build_request("POST", "/hello", body=body))
        c.send(build_request("GET", "/hello", close=True))
        first = c.read()
        assert first.status == 200 and first.body == b"hello"
        try:
            second = c.read()
        except (EOFError, ConnectionResetError):
            return   # the server chose to close: allowed
        assert second.status == 200 and second.body == b"hello"
        assert c.closed()   # and nothing else was answered


@clause("HTTP-SRV-1")
def test_date_added(addr):
    with Client(addr) as c:
        resp = c.request("GET", "/hello")
    dates = resp.header_all("date")
    assert len(dates) == 1
    assert IMF_FIXDATE.match(dates[0]), dates
    when = email.utils.parsedate_to_datetime(dates[0].decode()).timestamp()
    assert abs(when - time.time()) < 120


@clause("HTTP-SRV-2")
def test_application_date_kept_and_not_duplicated(addr):
    with Client(addr) as c:
        resp = c.request("GET", "/date")
    assert resp.header_all("date") == [b"Mon, 01 Jan 2001 00:00:00 GMT"]


def continue_head(path, version="1.1", length=5):
    return ("POST %s HTTP/%s\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n"
            "Connection: close\r\n\r\n" % (path, version, length)).encode()


@clause("HTTP-SRV-3")
def test_100_continue(addr):
    with Client(addr) as c:
        c.send(continue_head("/continue"))
        interim = c.read()
        assert interim.status == 100
        assert interim.version == b"HTTP/1.1"
        c.send(b"hello")
        resp = c.read()
    assert resp.status == 200 and resp.body == b"got:hello"


@clause("HTTP-SRV-4")
def test_100_continue_comes_while_the_application_waits_for_the_body(addr):
    with Client(addr) as c:
        c.send(continue_head("/continue?sleep_ms=300"))
        interim = c.read()     # the client sends nothing until the 100
        assert interim.status == 100
        c.send(b"hello")
        resp = c.read()
    assert resp.body == b"got:hello"


@clause("REF-HTTP-SRV-4")
def test_100_continue_waits_for_first_receive(addr):
    with Client(addr) as c:
        c.send(continue_head("/continue?sleep_ms=600"))
        assert c.quiet(0.3), "100 Continue was sent before the application called receive()"
        interim = c.read()
        assert interim.status == 100
        c.send(b"hello")
        resp = c.read()
    assert resp.body == b"got:hello"


@clause("HTTP-SRV-5")
def test_no_100_continue_when_answered_first(addr):
    with Client(addr) as c:
        c.send(continue_head("/continue?read=0"))
        resp = c.read()
    assert resp.status == 200
    assert resp.body == b"no-read"


@clause("HTTP-SRV-6")
def test_expect_ignored_for_http10(addr):
    with Client(addr) as c:
        c.send(continue_head("/continue", version="1.0") + b"hello")
        resp = c.read()
    assert resp.status == 200
    assert resp.body == b"got:hello"


@clause("HTTP-SRV-5")
def test_body_sent_after_an_early_answer_is_not_a_request(addr):
    with Client(addr) as c:
        c.send(continue_head("/continue?read=0").replace(b"Connection: close\r\n", b""))
        resp = c.read()
        assert resp.status == 200 and resp.body == b"no-read"
        try:
            c.send(b"hello" + build_request("GET", "/hello", close=True))
            second = c.read()
        except (EOFError, ConnectionResetError, BrokenPipeError):
            return   # the server closed instead of draining: allowed
        assert second.status == 200 and second.body == b"hello", second


@clause("HTTP-FRAME-3")
def test_http10_keep_alive_without_content_length_still_closes(addr):
    with Client(addr) as c:
        resp = c.request("GET", "/stream?n=2&size=3", version="1.0",
                         headers=[("Connection", "keep-alive")])
        assert resp.header("connection", b"").lower() == b"close"
        assert resp.body == b"aaabbb"


@clause("HTTP-FRAME-12")
@pytest.mark.parametrize("path,body", [("/hello", b"hello"),
                                       ("/stream?n=3&size=1000&delay=20",
                                        b"a" * 1000 + b"b" * 1000 + b"c" * 1000)])
def test_half_closed_client_gets_the_response(addr, path, body):
    import socket
    with Client(addr) as c:
        c.send(build_request("GET", path))
        c.sock.shutdown(socket.SHUT_WR)
        resp = c.read()
        assert resp.status == 200 and resp.body == body
        assert resp.complete
        assert c.closed()


@clause("HTTP-FRAME-13", "HTTP-REQ-2")
def test_request_one_byte_at_a_time(addr):
    raw = (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
           b"Connection: close\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    with Client(addr) as c:
        for i in range(len(raw)):
            c.send(raw[i:i + 1])
            if i % 16 == 0:
                time.sleep(0.001)   # pacing: lets the bytes reach the server in several reads
        resp = c.read()
    assert resp.status == 200 and resp.body == b"hello world"
