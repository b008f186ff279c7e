"""Section 8, Server-Sent Events, seen from the client: the bytes of the
event stream (WHATWG HTML §9.2), the decline path, and the end of a stream.
"""
import socket
import threading

import pagi_ref
from apputil import req, wait_until
from conftest import serve
from spec_wire import Reader, connect


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
    assert seen["keys"] == {"type", "pagi", "http_version", "method", "scheme", "path",
                            "raw_path", "query_string", "root_path", "headers", "client",
                            "server", "state", "extensions", "pagi.transport"}
    assert seen["request"] == {"type": "sse.request", "body": b"", "more": 0}
    assert resp.status == 200 and resp.chunked and resp.complete
    assert resp.header("content-type") == b"text/event-stream"
    assert resp.header("cache-control") == b"no-cache"
    assert resp.header("connection") == b"keep-alive"
    assert resp.header("date") is not None
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


def test_what_must_come_first_and_what_comes_after_the_end():
    refused = []
    received = []

    def app(scope, receive, send):
        def attempt(event):
            try:
                yield send(event)
            except pagi_ref.EventError as exc:
                refused.append(str(exc))

        for event in ({"type": "sse.send", "data": "x"}, {"type": "sse.comment", "comment": "x"},
                      {"type": "sse.keepalive", "interval": 1}, {"type": "sse.close"}):
            yield from attempt(event)                      # before sse.start
        yield send({"type": "sse.start", "status": 201,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        yield from attempt({"type": "sse.http.response.start", "status": 404})
        received.append((yield receive()))
        yield send({"type": "sse.close"})
        for event in ({"type": "sse.comment", "comment": "x"},
                      {"type": "sse.keepalive", "interval": 1}):
            yield from attempt(event)                      # after sse.close
        received.append((yield receive()))                 # the application ended it

    with serve(app) as srv:
        resp = read_stream(srv.port, sse_req())
        assert wait_until(lambda: len(received) == 2)
    assert resp.status == 201 and resp.complete and resp.body == b""
    assert resp.header_all("content-type") == [b"text/event-stream; charset=utf-8"]
    assert resp.header("cache-control") == b"no-cache"
    assert len(refused) == 7, refused
    assert all("send sse.start first" in e for e in refused[:4])
    assert "first send wins" in refused[4]
    assert all("the stream is closed" in e for e in refused[5:])
    assert received == [{"type": "sse.request", "body": b"", "more": 0},
                        {"type": "sse.disconnect", "reason": ""}]


def test_keepalive_the_last_event_wins_and_zero_stops_it():
    def app(scope, receive, send):
        yield send({"type": "sse.start"})
        yield send({"type": "sse.keepalive", "interval": 0.02, "comment": "a"})
        yield send({"type": "sse.keepalive", "interval": 0.02, "comment": "b"})
        yield pagi_ref.sleep(0.15)
        yield send({"type": "sse.keepalive", "interval": 0})
        yield send({"type": "sse.send", "data": "stopped"})
        yield pagi_ref.sleep(0.15)
        yield send({"type": "sse.send", "data": "end"})

    with serve(app) as srv:
        resp = read_stream(srv.port, sse_req())
    before, _, after = resp.body.partition(b"data: stopped\n\n")
    assert b":a" not in resp.body and before.count(b":b\n\n") >= 2, resp.body
    assert after == b"data: end\n\n"


def test_a_fin_from_the_client_ends_the_stream():
    """Unlike HTTP (a half-close still gets its response), an event-stream
    client that sends FIN has left: the stream ends with client_closed."""
    events = []

    def app(scope, receive, send):
        yield send({"type": "sse.start"})
        yield send({"type": "sse.send", "data": "hi"})
        yield receive()                    # the (empty) request body
        events.append((yield receive()))

    with serve(app) as srv, connect(srv.port) as s:
        s.sendall(sse_req())
        reader = Reader(s)
        reader.read_until(b"data: hi\n\n\r\n")
        s.shutdown(socket.SHUT_WR)
        assert wait_until(lambda: events, 5)
        assert reader.read_all() == b""    # and the server closes its side
    assert events == [{"type": "sse.disconnect", "reason": "client_closed"}]


def test_the_connection_after_a_stream():
    def app(scope, receive, send):
        yield send({"type": "sse.start"})
        yield send({"type": "sse.send", "data": scope["http_version"]})

    with serve(app) as srv:
        with connect(srv.port) as s:       # HTTP/1.1: kept alive for the next request
            s.sendall(sse_req())
            reader = Reader(s)
            first = reader.read_response()
            s.sendall(sse_req(extra=[("Connection", "close")]))
            second = reader.read_response()
        old = read_stream(srv.port, req("/", headers=[("Accept", "text/event-stream")],
                                        version="HTTP/1.0"))
    assert first.header("connection") == b"keep-alive" and first.body == b"data: 1.1\n\n"
    assert second.header("connection") == b"close" and second.body == b"data: 1.1\n\n"
    # HTTP/1.0 has no chunked coding: the close ends the stream.
    assert old.header("connection") == b"close" and not old.chunked
    assert old.body == b"data: 1.0\n\n"


def test_server_shutdown_ends_a_stream_and_tells_the_application():
    """An event stream never ends by itself: on shutdown the server ends it
    (the last chunk) and the application gets sse.disconnect server_shutdown."""
    events = []
    streaming = threading.Event()

    def app(scope, receive, send):
        yield receive()
        yield send({"type": "sse.start"})
        yield send({"type": "sse.send", "data": "hi"})
        streaming.set()
        events.append((yield receive()))

    with serve(app, shutdown_timeout=10) as srv:
        with connect(srv.port) as s:
            s.sendall(sse_req())
            assert streaming.wait(5)
            srv.server.stop()
            resp = Reader(s).read_response()
    assert resp.complete and resp.body == b"data: hi\n\n"
    assert resp.header_all("connection") == [b"keep-alive"]
    assert events == [{"type": "sse.disconnect", "reason": "server_shutdown"}]


def test_decline_errors_name_the_sse_events():
    errors = []

    def app(scope, receive, send):
        try:
            yield send({"type": "sse.http.response.body", "body": b"x"})
        except pagi_ref.EventError as exc:
            errors.append(str(exc))
        yield send({"type": "sse.http.response.start", "status": 404, "headers": []})
        yield send({"type": "sse.http.response.body", "body": b"no"})

    with serve(app) as srv:
        resp = read_stream(srv.port, sse_req())
    assert resp.status == 404 and resp.body == b"no"
    assert errors and errors[0].startswith("sse.http.response.body:"), errors
