"""Section 8, Server-Sent Events, seen from the client: the bytes of the
event stream (WHATWG HTML §9.2), the decline path, and the end of a stream.
"""
import socket
import threading

import pagi_ref
from apputil import req, wait_until
from conftest import serve
from wire import Reader, connect


def sse_req(path="/", method="GET", body=b"", extra=()):
    headers = [("Accept", "text/event-stream")] + list(extra)
    if body:
        headers.append(("Content-Length", str(len(body))))
    return req(path, method, headers, body)


def read_stream(port, raw):
    with connect(port) as s:
        s.sendall(raw)
        return Reader(s).read_response()


def test_a_stream_is_chunked_text_event_stream_with_the_dispatch_format():
    seen = {}

    def app(scope, receive, send):
        seen["type"] = scope["type"]
        seen["keys"] = set(scope)
        event = yield receive()
        seen["request"] = event
        yield send({"type": "sse.start"})
        yield send({"type": "sse.send", "data": "one\r\ntwo\rthree\nfour", "event": "multi",
                    "id": "7", "retry": 1500})
        yield send({"type": "sse.send", "data": ""})
        yield send({"type": "sse.comment", "comment": "hello"})
        yield send({"type": "sse.comment", "comment": ":already"})

    with serve(app) as srv:
        resp = read_stream(srv.port, sse_req("/anything"))
    assert seen["type"] == "sse"
    assert "pagi.connection" not in seen["keys"] and "pagi.transport" in seen["keys"]
    assert seen["request"] == {"type": "sse.request", "body": b"", "more": 0}
    assert resp.status == 200 and resp.chunked and resp.complete
    assert resp.header("content-type") == b"text/event-stream"
    assert resp.header("cache-control") == b"no-cache"
    assert resp.header("connection") == b"keep-alive"
    assert resp.body == (b"event: multi\ndata: one\ndata: two\ndata: three\ndata: four\n"
                         b"id: 7\nretry: 1500\n\n" b"data: \n\n" b":hello\n\n" b":already\n\n")


def test_any_method_with_a_body_is_an_sse_scope():
    got = []

    def app(scope, receive, send):
        while True:
            event = yield receive()
            got.append(event)
            if not event["more"]:
                break
        yield send({"type": "sse.start", "status": 200})
        yield send({"type": "sse.send", "data": scope["method"]})

    with serve(app) as srv:
        resp = read_stream(srv.port, sse_req("/", "POST", b'{"q": 1}'))
    assert b"".join(e["body"] for e in got) == b'{"q": 1}'
    assert all(e["type"] == "sse.request" for e in got)
    assert resp.body == b"data: POST\n\n"


def test_invalid_fields_fail_the_send_and_write_nothing():
    errors = []

    def app(scope, receive, send):
        yield send({"type": "sse.start"})
        for bad in ({"type": "sse.send", "data": "x", "event": "a\nb"},
                    {"type": "sse.send", "data": "x", "id": "1\r"},
                    {"type": "sse.send", "data": "x", "retry": -1},
                    {"type": "sse.send", "data": b"bytes"},
                    {"type": "sse.comment", "comment": "a\nb"},
                    {"type": "http.response.body", "body": b"x"}):
            try:
                yield send(bad)
            except pagi_ref.EventError as exc:
                errors.append(str(exc))
        yield send({"type": "sse.send", "data": "ok"})

    with serve(app) as srv:
        resp = read_stream(srv.port, sse_req())
    assert resp.body == b"data: ok\n\n"
    assert len(errors) == 6
    assert "'event'" in errors[0] and "'id'" in errors[1] and "'retry'" in errors[2]
    assert "'data'" in errors[3] and "'comment'" in errors[4]
    assert "http.response.body" in errors[5]


def test_decline_with_an_http_response_then_stream_events_fail():
    errors = []

    def app(scope, receive, send):
        yield send({"type": "sse.http.response.start", "status": 204, "headers": []})
        yield send({"type": "sse.http.response.body", "body": b""})
        try:
            yield send({"type": "sse.start"})
        except pagi_ref.EventError as exc:
            errors.append(str(exc))

    with serve(app) as srv, connect(srv.port) as s:
        s.sendall(sse_req())
        reader = Reader(s)
        resp = reader.read_response()
        assert reader.read_all() == b""           # and the connection closes
    assert resp.status == 204
    assert errors and "first send wins" in errors[0]


def test_sse_close_ends_the_stream_while_the_app_goes_on():
    after = []
    done = threading.Event()

    def app(scope, receive, send):
        yield send({"type": "sse.start"})
        yield send({"type": "sse.send", "data": "last"})
        yield send({"type": "sse.close", "reason": "job_complete"})
        yield send({"type": "sse.close"})              # ignored
        try:
            yield send({"type": "sse.send", "data": "too late"})
        except pagi_ref.EventError:
            after.append("refused")
        yield pagi_ref.sleep(0.05)
        done.set()

    with serve(app) as srv:
        resp = read_stream(srv.port, sse_req())
        assert done.wait(5)
    assert resp.complete and resp.body == b"data: last\n\n"
    assert after == ["refused"]


def test_keepalive_comments_and_the_client_leaving():
    events = []

    def app(scope, receive, send):
        yield send({"type": "sse.start"})
        yield send({"type": "sse.keepalive", "interval": 0.05, "comment": "ka"})
        yield receive()                    # the (empty) request body
        event = yield receive()            # waits until the client leaves
        events.append(event)

    with serve(app) as srv:
        with connect(srv.port) as s:
            s.sendall(sse_req())
            reader = Reader(s)
            reader.read_until(b"\r\n\r\n")
            got = b""
            while got.count(b":ka\n\n") < 3:
                got += reader.read_exact(1)
        assert wait_until(lambda: events, 5)
    assert events == [{"type": "sse.disconnect", "reason": "client_closed"}]


def test_a_request_without_the_accept_header_stays_http():
    def app(scope, receive, send):
        yield send({"type": "http.response.start", "status": 200, "headers": []})
        yield send({"type": "http.response.body", "body": scope["type"].encode()})

    with serve(app) as srv:
        resp = read_stream(srv.port, req("/", headers=[("Accept", "text/html")]))
    assert resp.body == b"http"
