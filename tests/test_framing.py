"""Section 6, response framing: Content-Length, chunked, close-delimited,
bodiless responses, the Date header.

RFC 9112 §6.1-6.3 (message body length), §7.1 (chunked); RFC 9110 §6.6.1
(Date), §9.3.2 (HEAD), §15.3.5 (204), §15.4.5 (304); PAGI www spec
"Server-Supplied Headers and Behaviors" (application Transfer-Encoding ignored).
"""
import email.utils
import re
import threading
import time

import pytest

import pagi_ref
from conftest import serve
from spec_wire import Reader, connect, exchange
from apputil import body, req, start


def test_app_content_length_honoured():
    def app(scope, receive, send):
        yield start(send, 200, [(b"content-type", b"text/plain"), (b"content-length", b"10")])
        yield body(send, b"hello", more=True)
        yield body(send, b"", more=True)
        yield body(send, b"world")

    with serve(app) as srv, connect(srv.port) as s:
        r = Reader(s)
        s.sendall(req("/"))
        head = r.read_until(b"\r\n\r\n")
        assert b"transfer-encoding" not in head.lower()
        assert re.search(rb"(?i)\r\ncontent-length: *10\r\n", head)
        assert r.read_exact(10) == b"helloworld"
        s.sendall(req("/"))  # nothing extra was written: the next response parses
        resp = r.read_response()
        assert resp.status == 200 and resp.body == b"helloworld"


def test_more_bytes_than_declared_fails_the_send():
    errors = []

    def app(scope, receive, send):
        yield start(send, 200, [(b"content-length", b"3")])
        try:
            yield body(send, b"hello", more=True)
        except ValueError as exc:
            errors.append(str(exc))
        yield body(send, b"abc")

    with serve(app) as srv, connect(srv.port) as s:
        r = Reader(s)
        s.sendall(req("/"))
        resp = r.read_response()
    assert len(errors) == 1, "sending 5 bytes under Content-Length: 3 did not fail"
    assert "content-length" in errors[0].lower(), errors
    assert resp.status == 200 and resp.body == b"abc"


def test_fewer_bytes_than_declared_closes_the_connection():
    ended = threading.Event()

    def app(scope, receive, send):
        yield start(send, 200, [(b"content-length", b"10")])
        yield body(send, b"short")
        ended.set()

    with serve(app) as srv, connect(srv.port) as s:
        r = Reader(s)
        s.sendall(req("/"))
        resp = r.read_response()
        assert resp.status == 200
        assert resp.body == b"short"
        assert not resp.complete        # EOF before the declared length
        assert r.eof
        assert ended.wait(5)


def test_no_content_length_is_chunked_in_http11():
    def app(scope, receive, send):
        yield start(send, 200, [(b"content-type", b"text/plain")])
        yield body(send, b"hello", more=True)
        yield body(send, b"", more=True)            # an empty piece is not the end
        yield pagi_ref.sleep(0.01)
        yield body(send, b"world!", more=True)
        yield body(send, b"")

    with serve(app) as srv, connect(srv.port) as s:
        r = Reader(s)
        s.sendall(req("/"))
        head = r.read_until(b"\r\n\r\n")
        assert re.search(rb"(?i)\r\ntransfer-encoding: *chunked\r\n", head)
        assert b"content-length" not in head.lower()
        wire = r.read_until(b"0\r\n\r\n")
        assert wire == b"5\r\nhello\r\n6\r\nworld!\r\n0\r\n\r\n"
        s.sendall(req("/"))
        assert r.read_response().body == b"helloworld!"


def test_no_content_length_is_close_delimited_in_http10():
    def app(scope, receive, send):
        yield start(send, 200, [(b"content-type", b"text/plain")])
        yield body(send, b"abc", more=True)
        yield body(send, b"def")

    with serve(app) as srv:
        resp = exchange(srv.port, req("/", version="HTTP/1.0", host=False))
    assert resp.status == 200
    assert resp.header("transfer-encoding") is None
    assert resp.header("content-length") is None
    assert resp.body == b"abcdef"


def test_app_transfer_encoding_ignored_without_length():
    def app(scope, receive, send):
        yield start(send, 200, [(b"transfer-encoding", b"gzip"), (b"content-type", b"text/plain")])
        yield body(send, b"plain", more=True)
        yield body(send, b"")

    with serve(app) as srv:
        resp = exchange(srv.port, req("/", headers=[("Connection", "close")]))
    assert resp.status == 200
    assert resp.header_all("transfer-encoding") == [b"chunked"]
    assert resp.body == b"plain"


def test_app_transfer_encoding_ignored_with_length():
    def app(scope, receive, send):
        yield start(send, 200, [(b"transfer-encoding", b"chunked"), (b"content-length", b"5")])
        yield body(send, b"plain")

    with serve(app) as srv, connect(srv.port) as s:
        r = Reader(s)
        s.sendall(req("/"))
        resp = r.read_response()
        assert resp.header("transfer-encoding") is None
        assert resp.header("content-length") == b"5"
        assert resp.body == b"plain"
        s.sendall(req("/"))
        assert r.read_response().body == b"plain"


@pytest.mark.parametrize("with_length", [True, False])
def test_head_carries_no_body(with_length):
    def app(scope, receive, send):
        headers = [(b"content-type", b"text/plain")]
        if with_length:
            headers.append((b"content-length", b"5"))
        yield start(send, 200, headers)
        yield body(send, b"hello")

    with serve(app) as srv, connect(srv.port) as s:
        r = Reader(s)
        s.sendall(req("/", "HEAD"))
        head = r.read_response(head_request=True)
        assert head.status == 200
        if with_length:
            assert head.header("content-length") == b"5"
        # no body bytes followed the head: the next response starts right here
        s.sendall(req("/", "GET"))
        got = r.read_response()
        assert got.status == 200 and got.body == b"hello"


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_carry_no_body(status):
    def app(scope, receive, send):
        yield start(send, status, [(b"etag", b'"v1"')])
        yield body(send, b"")

    with serve(app) as srv, connect(srv.port) as s:
        r = Reader(s)
        s.sendall(req("/"))
        head = r.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d" % status)
        low = head.lower()
        assert b"transfer-encoding" not in low
        if status == 204:
            assert b"content-length" not in low
        s.sendall(req("/"))
        nxt = r.read_response()   # would fail to parse if a chunk or body followed
        assert nxt.status == status


def test_interim_100_carries_no_body():
    def app(scope, receive, send):
        yield receive()
        yield start(send, 200, [(b"content-length", b"2")])
        yield body(send, b"ok")

    with serve(app) as srv, connect(srv.port) as s:
        r = Reader(s)
        s.sendall(req("/", "POST", [("Content-Length", "1"), ("Expect", "100-continue")]))
        interim = r.read_until(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 ")
        assert b"content-length" not in interim.lower()
        assert b"transfer-encoding" not in interim.lower()
        s.sendall(b"x")
        final = r.read_response()
        assert final.status == 200 and final.body == b"ok"


IMF_FIXDATE = re.compile(
    rb"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    rb"\d{4} \d\d:\d\d:\d\d GMT$")


def test_date_added_when_absent():
    def app(scope, receive, send):
        yield start(send, 200, [(b"content-length", b"0")])
        yield body(send, b"")

    with serve(app) as srv:
        resp = exchange(srv.port, req("/", headers=[("Connection", "close")]))
    dates = resp.header_all("date")
    assert len(dates) == 1
    assert IMF_FIXDATE.match(dates[0]), dates[0]
    stamp = email.utils.parsedate_to_datetime(dates[0].decode()).timestamp()
    assert abs(stamp - time.time()) < 120


def test_date_kept_when_given():
    given = b"Sun, 06 Nov 1994 08:49:37 GMT"

    def app(scope, receive, send):
        yield start(send, 200, [(b"date", given), (b"content-length", b"0")])
        yield body(send, b"")

    with serve(app) as srv:
        resp = exchange(srv.port, req("/", headers=[("Connection", "close")]))
    assert resp.header_all("date") == [given]


def test_status_line_reason_phrases():
    def app(scope, receive, send):
        status = int(scope["path"].strip("/"))
        yield start(send, status, [(b"content-length", b"0")])
        yield body(send, b"")

    with serve(app) as srv:
        for status, reason in [(200, b"OK"), (201, b"Created"), (404, b"Not Found"),
                               (418, None), (599, None)]:
            resp = exchange(srv.port, req("/%d" % status, headers=[("Connection", "close")]))
            assert resp.status == status
            assert resp.raw_head.startswith(b"HTTP/1.1 %d " % status)
            if reason is not None:
                assert resp.reason == reason
