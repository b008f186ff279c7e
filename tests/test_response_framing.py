"""Section 4, response framing: frame_response, one pure function for every
head the server writes, tested as a table of inputs -> exact head bytes and
framing decision (body mode, Content-Length, keep-alive).

RFC 9112 §6.1-§6.3 (message body length), §7.1 (chunked), §9.3
(persistence); RFC 9110 §6.4.1 and §15.2 (1xx), §7.8 (101 and Upgrade),
§8.6 (no Content-Length in 1xx or 204), §9.3.2 (HEAD), §15.3.5 (204),
§15.4.5 (304).  The last tests check the two bugs the single function fixed,
on the wire.
"""
import pytest

import pagi_ref
from pagi_ref import BODY_CHUNKED, BODY_CLOSE, BODY_LENGTH, BODY_NONE, frame_response
from conftest import serve
from spec_wire import Reader, connect
from apputil import body, start

DATE = b"Fri, 27 Nov 2026 12:00:00 GMT"


class FixedClock:
    def get(self):
        return DATE


STAMP = pagi_ref.ResponseStamp(clock=FixedClock())
STAMPED = b"date: " + DATE + b"\r\nserver: pagi_ref\r\n"
CT = [(b"content-type", b"text/plain")]
CT_LINE = b"content-type: text/plain\r\n"
CL5 = [(b"content-type", b"text/plain"), (b"content-length", b"5")]
CL5_LINES = CT_LINE + b"content-length: 5\r\n"

# (id, status, headers, keyword arguments,
#  head after the status line, body mode, Content-Length, keep_alive)
TABLE = [
    # known size, HTTP/1.1: Content-Length, persistent, no Connection field
    ("1.1 known size", 200, CT, dict(final_size=5),
     CT_LINE + STAMPED + b"content-length: 5\r\n", BODY_LENGTH, 5, True),
    ("1.1 empty body", 200, [], dict(final_size=0),
     STAMPED + b"content-length: 0\r\n", BODY_LENGTH, 0, True),
    ("1.1 unknown size: chunked", 200, CT, dict(),
     CT_LINE + STAMPED + b"transfer-encoding: chunked\r\n", BODY_CHUNKED, None, True),
    ("1.1 announce keep-alive (SSE)", 200, CT, dict(announce_keep_alive=True),
     CT_LINE + STAMPED + b"transfer-encoding: chunked\r\nconnection: keep-alive\r\n",
     BODY_CHUNKED, None, True),
    ("1.1 trailers: chunked though the size is known", 200, CT,
     dict(final_size=5, trailers=True),
     CT_LINE + STAMPED + b"transfer-encoding: chunked\r\n", BODY_CHUNKED, None, True),
    ("1.1 application content-length", 200, CL5, dict(length=5),
     CL5_LINES + STAMPED, BODY_LENGTH, 5, True),
    ("1.1 application content-length wins over final size", 200, CL5,
     dict(length=5, final_size=3), CL5_LINES + STAMPED, BODY_LENGTH, 5, True),
    ("1.1 application Connection: close", 200, CT, dict(final_size=5, app_close=True),
     CT_LINE + STAMPED + b"content-length: 5\r\nconnection: close\r\n",
     BODY_LENGTH, 5, False),
    ("1.1 keep-alive off", 200, CT, dict(final_size=5, keep_alive=False),
     CT_LINE + STAMPED + b"content-length: 5\r\nconnection: close\r\n",
     BODY_LENGTH, 5, False),
    ("1.1 keep-alive off, chunked", 200, CT, dict(keep_alive=False),
     CT_LINE + STAMPED + b"transfer-encoding: chunked\r\nconnection: close\r\n",
     BODY_CHUNKED, None, False),
    # HTTP/1.0: persistent only when it says keep-alive; no chunked coding
    ("1.0 known size", 200, CT, dict(http_version="1.0", final_size=5),
     CT_LINE + STAMPED + b"content-length: 5\r\nconnection: keep-alive\r\n",
     BODY_LENGTH, 5, True),
    ("1.0 unknown size: close-delimited", 200, CT, dict(http_version="1.0"),
     CT_LINE + STAMPED + b"connection: close\r\n", BODY_CLOSE, None, False),
    ("1.0 trailers, known size: Content-Length", 200, CT,
     dict(http_version="1.0", final_size=5, trailers=True),
     CT_LINE + STAMPED + b"content-length: 5\r\nconnection: keep-alive\r\n",
     BODY_LENGTH, 5, True),
    ("1.0 keep-alive off", 200, CT, dict(http_version="1.0", final_size=5, keep_alive=False),
     CT_LINE + STAMPED + b"content-length: 5\r\nconnection: close\r\n",
     BODY_LENGTH, 5, False),
    ("1.0 application Connection: close", 200, CT,
     dict(http_version="1.0", final_size=5, app_close=True),
     CT_LINE + STAMPED + b"content-length: 5\r\nconnection: close\r\n",
     BODY_LENGTH, 5, False),
    # HEAD: no body; the length the GET would have when the app gave it
    ("HEAD with the body's size", 200, CT, dict(method="HEAD", final_size=5),
     CT_LINE + STAMPED + b"content-length: 5\r\n", BODY_NONE, 5, True),
    ("HEAD, empty body: no Content-Length", 200, CT, dict(method="HEAD", final_size=0),
     CT_LINE + STAMPED, BODY_NONE, None, True),
    ("HEAD, size unknown", 200, CT, dict(method="HEAD"),
     CT_LINE + STAMPED, BODY_NONE, None, True),
    ("HEAD, application content-length", 200, CL5, dict(method="HEAD", length=5),
     CL5_LINES + STAMPED, BODY_NONE, 5, True),
    ("HEAD over 1.0", 200, CT, dict(method="HEAD", http_version="1.0"),
     CT_LINE + STAMPED + b"connection: keep-alive\r\n", BODY_NONE, None, True),
    # 204 and 304: no body, and never a Content-Length in a 204
    ("204", 204, [], dict(final_size=0), STAMPED, BODY_NONE, None, True),
    ("204 drops the application's content-length", 204, [(b"content-length", b"5")],
     dict(length=5), STAMPED, BODY_NONE, None, True),
    ("204 to HEAD with a body given: no Content-Length", 204, [],
     dict(method="HEAD", final_size=3), STAMPED, BODY_NONE, None, True),
    ("304 keeps the application's content-length", 304, [(b"content-length", b"5")],
     dict(length=5), b"content-length: 5\r\n" + STAMPED, BODY_NONE, 5, True),
    ("304 size unknown: no chunked", 304, [], dict(), STAMPED, BODY_NONE, None, True),
    ("304 keep-alive off", 304, [], dict(keep_alive=False),
     STAMPED + b"connection: close\r\n", BODY_NONE, None, False),
    # 1xx: interim, no body framing at all; a 101 says Connection: Upgrade
    ("101", 101, [(b"upgrade", b"websocket"), (b"sec-websocket-accept", b"abc=")], dict(),
     b"upgrade: websocket\r\nsec-websocket-accept: abc=\r\n" + STAMPED
     + b"connection: Upgrade\r\n", None, None, True),
    ("103 interim", 103, [(b"link", b"</a.css>; rel=preload")], dict(final_size=5),
     b"link: </a.css>; rel=preload\r\n" + STAMPED, None, None, True),
    # the application's own Server and Date are kept, ours not added
    ("application server and date", 200,
     [(b"server", b"mine"), (b"date", b"then")], dict(final_size=0),
     b"server: mine\r\ndate: then\r\ncontent-length: 0\r\n", BODY_LENGTH, 0, True),
]


@pytest.mark.parametrize("case", TABLE, ids=[row[0] for row in TABLE])
def test_frame_response_table(case):
    _id, status, headers, kwargs, lines, mode, length, keep_alive = case
    given = list(headers)
    head, fields, body, content_length, persists = frame_response(
        status, headers, stamp=STAMP, **kwargs)
    assert head == pagi_ref.status_line(status) + lines + b"\r\n"
    assert (body, content_length, persists) == (mode, length, keep_alive)
    assert headers == given, "frame_response changed the caller's list"
    assert b"".join(n + b": " + v + b"\r\n" for n, v in fields) == lines


def test_stamp_off_and_told_what_the_headers_hold():
    off = pagi_ref.ResponseStamp(server=False, date=False)
    assert frame_response(200, [], final_size=0, stamp=off)[0] == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    # has_server/has_date given: the headers are not searched again
    head = frame_response(200, [], final_size=0, stamp=STAMP, has_server=True,
                          has_date=False)[0]
    assert head == b"HTTP/1.1 200 OK\r\ndate: " + DATE + b"\r\ncontent-length: 0\r\n\r\n"


def test_error_response_is_framed_by_frame_response():
    resp = pagi_ref.error_response(426, "Upgrade Required", [(b"sec-websocket-version", b"13")],
                                   STAMP)
    assert resp == (b"HTTP/1.1 426 Upgrade Required\r\n"
                    b"content-type: text/plain; charset=utf-8\r\n"
                    b"sec-websocket-version: 13\r\n" + STAMPED
                    + b"content-length: 17\r\nconnection: close\r\n\r\nUpgrade Required\n")


# -- the bugs one function fixed, on the wire -----------------------------------

def test_head_to_a_204_with_a_body_has_no_content_length():
    """RFC 9110 §8.6: before, a HEAD answered 204 by an application that
    gave a body got ``content-length`` with the body's size."""
    def app(scope, receive, send):
        yield start(send, 204, [])
        yield body(send, b"abc")

    with serve(app) as srv, connect(srv.port) as s:
        r = Reader(s)
        s.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(2):
            head = r.read_until(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 204 ")
            assert b"content-length" not in head.lower(), head


def _ws_denial_app(status, more):
    def app(scope, receive, send):
        yield receive()
        yield send({"type": "websocket.http.response.start", "status": status,
                    "headers": [(b"content-length", b"3")]})
        if more:
            yield send({"type": "websocket.http.response.body", "body": b"abc", "more": 1})
        yield send({"type": "websocket.http.response.body", "body": b"abc"})
    return app


@pytest.mark.parametrize("more", [False, True])
def test_websocket_denial_204_has_no_body_and_no_framing(more):
    """RFC 9110 §8.6, §15.3.5: before, a 204 denial got content-length (or
    chunked coding) and its body bytes."""
    with serve(_ws_denial_app(204, more)) as srv, connect(srv.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  b"Sec-WebSocket-Version: 13\r\n\r\n")
        r = Reader(s)
        head = r.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 204 ")
        assert b"content-length" not in head.lower() and b"chunked" not in head.lower(), head
        assert b"\r\nconnection: close\r\n" in head
        assert r.read_all() == b""


def test_websocket_denial_content_length_is_the_servers():
    with serve(_ws_denial_app(403, False)) as srv, connect(srv.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  b"Sec-WebSocket-Version: 13\r\n\r\n")
        r = Reader(s)
        head = r.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403 ")
        assert head.lower().count(b"content-length") == 1
        assert r.read_all() == b"abc"
