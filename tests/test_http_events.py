"""Section 6, `http` events: http.request piece by piece, the response events,
http.disconnect, and validation of what the application sends.

PAGI www spec: "Request - receive event", "Response Start/Body/Trailers",
"Disconnect - receive event", "Header byte safety" (RFC 9110 §5.5,
RFC 9112 §11.1).  pagi_ref: an invalid event fails the send Future with
pagi_ref.EventError (a ValueError) naming the event and the field.
"""
import threading

import pytest

import pagi_ref
from conftest import serve
from spec_wire import Reader, connect, exchange
from apputil import body, nodelay, read_body, req, respond, start, wait_until


# -- http.request -------------------------------------------------------------

def recording_app(events):
    def app(scope, receive, send):
        while True:
            event = yield receive()
            events.append((event["type"], bytes(event.get("body", b"")), event.get("more", 0)))
            if event["type"] != "http.request" or not event.get("more"):
                break
        data = b"".join(e[1] for e in events)
        yield from respond(send, 200, b"got:" + data)
    return app


def joined(events):
    return b"".join(e[1] for e in list(events))


def test_chunked_upload_arrives_as_several_http_request_events():
    events = []
    with serve(recording_app(events)) as srv, connect(srv.port) as s:
        nodelay(s)
        r = Reader(s)
        s.sendall(req("/", "POST", [("Transfer-Encoding", "chunked")]) + b"5\r\nhello\r\n")
        assert wait_until(lambda: joined(events) == b"hello"), events
        s.sendall(b"6\r\n world\r\n")
        assert wait_until(lambda: joined(events) == b"hello world"), events
        s.sendall(b"1;ext=1\r\n!\r\n")
        assert wait_until(lambda: joined(events) == b"hello world!"), events
        s.sendall(b"0\r\n\r\n")
        resp = r.read_response()
    assert resp.status == 200 and resp.body == b"got:hello world!"
    assert all(e[0] == "http.request" for e in events)
    assert len(events) >= 3
    assert all(e[2] for e in events[:-1]), events      # more=1 before the last
    assert not events[-1][2], events                    # more=0 last
    assert sum(1 for e in events if e[2] and e[1]) >= 3  # three data pieces seen separately


def test_content_length_upload_arrives_piece_by_piece():
    events = []
    with serve(recording_app(events)) as srv, connect(srv.port) as s:
        nodelay(s)
        r = Reader(s)
        s.sendall(req("/", "PUT", [("Content-Length", "10")]) + b"first")
        assert wait_until(lambda: joined(events) == b"first"), events
        assert events[0][2], "first piece must carry more=1"
        s.sendall(b"-last")
        resp = r.read_response()
    assert resp.body == b"got:first-last"
    assert not events[-1][2]


def test_request_without_body_gives_one_empty_event():
    events = []
    with serve(recording_app(events)) as srv:
        resp = exchange(srv.port, req("/"))
    assert resp.body == b"got:"
    assert events == [("http.request", b"", events[0][2])] and not events[0][2]


def test_empty_chunked_body_gives_one_final_event():
    events = []
    with serve(recording_app(events)) as srv:
        resp = exchange(srv.port, req("/", "POST", [("Transfer-Encoding", "chunked")],
                                      b"0\r\n\r\n"))
    assert resp.body == b"got:"
    assert len(events) == 1 and events[0][:2] == ("http.request", b"") and not events[0][2]


def test_chunked_request_with_extensions_and_trailers():
    events = []
    raw = req("/", "POST", [("Transfer-Encoding", "chunked")]) + (
        b"4;name=value;x\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n"
        b"0\r\nX-Trailer: yes\r\nX-Other: 1\r\n\r\n")
    with serve(recording_app(events)) as srv:
        resp = exchange(srv.port, raw)
    assert resp.status == 200
    assert resp.body == b"got:Wikipedia in\r\n\r\nchunks."


# -- response events ------------------------------------------------------------

def test_streamed_response_with_trailers():
    def app(scope, receive, send):
        yield start(send, 200, [(b"content-type", b"text/plain")], trailers=True)
        yield body(send, b"hello ", more=True)
        yield body(send, b"world", more=False)
        yield send({"type": "http.response.trailers",
                    "headers": [(b"x-checksum", b"abc123"), (b"x-count", b"2")]})

    with serve(app) as srv, connect(srv.port) as s:
        r = Reader(s)
        s.sendall(req("/"))
        resp = r.read_response()
        assert resp.status == 200 and resp.chunked and resp.complete
        assert resp.body == b"hello world"
        assert resp.trailers == [(b"x-checksum", b"abc123"), (b"x-count", b"2")]
        # the connection is still usable: the trailer section ended the message
        s.sendall(req("/"))
        assert r.read_response().trailers == resp.trailers


def test_trailers_with_empty_header_list():
    def app(scope, receive, send):
        yield start(send, 200, [], trailers=True)
        yield body(send, b"x")
        yield send({"type": "http.response.trailers"})

    with serve(app) as srv:
        resp = exchange(srv.port, req("/", headers=[("Connection", "close")]))
    assert resp.status == 200 and resp.complete and resp.body == b"x"
    assert resp.trailers == []


def test_http_disconnect_after_the_response():
    seen = []
    done = threading.Event()

    def app(scope, receive, send):
        first = yield receive()
        seen.append(first["type"])
        yield from respond(send, 200, b"ok")
        after = yield receive()
        seen.append(after["type"])
        done.set()

    with serve(app) as srv, connect(srv.port) as s:
        s.sendall(req("/"))
        resp = Reader(s).read_response()
        assert resp.status == 200
        # connection kept open: http.disconnect still arrives once the response is sent
        assert done.wait(5), seen
    assert seen == ["http.request", "http.disconnect"]


def test_receive_pending_across_the_response_gets_http_disconnect_when_client_leaves():
    # A watcher task waits on receive() to learn of a disconnect while the
    # app responds (the usual "listen for disconnect" pattern).  The response
    # ends, the client closes: the pending receive() must resolve with
    # http.disconnect (spec: "If the client disconnects ... servers MUST send
    # an explicit http.disconnect event to the application").
    seen = []
    done = threading.Event()

    def app(scope, receive, send):
        yield receive()                       # the (empty) request body

        def watcher():
            event = yield receive()
            seen.append(event["type"])
        task = pagi_ref.spawn(watcher())
        yield from respond(send, 200, b"ok")
        first = yield pagi_ref.wait_any(task, pagi_ref.sleep(2))
        seen.append("watcher-ended" if first is task else "watcher-still-pending")
        done.set()

    with serve(app) as srv:
        with connect(srv.port) as s:
            s.sendall(req("/"))
            assert Reader(s).read_response().status == 200
        assert done.wait(10)
    assert seen == ["http.disconnect", "watcher-ended"]


def test_pipelined_request_not_blocked_by_receive_pending_across_the_response():
    # Same pattern on a keep-alive connection: after the response the
    # pending receive() resolves (http.disconnect: the request is over),
    # the app returns, and the next pipelined request is served.
    seen = []

    def app(scope, receive, send):
        yield receive()

        def watcher():
            event = yield receive()
            seen.append(event["type"])
        task = pagi_ref.spawn(watcher())
        yield from respond(send, 200, scope["path"].encode())
        yield task

    with serve(app) as srv, connect(srv.port, timeout=5) as s:
        r = Reader(s)
        s.sendall(req("/1") + req("/2"))
        assert r.read_response().body == b"/1"
        assert r.read_response().body == b"/2"
    assert seen[:1] == ["http.disconnect"]


def test_event_extras_and_accepted_types():
    # docs/spec.md CORE-TYPE-4, REF-CORE-TYPE-1, REF-CORE-TYPE-3: the Python-only
    # types pagi_ref accepts on send (tuples, bytearray, memoryview, bools).
    def app(scope, receive, send):
        yield send({"type": "http.response.start", "status": 200,
                    "headers": ((b"content-type", b"text/plain"), [b"x-list", b"1"]),
                    "x-extra-field": object()})
        yield send({"type": "http.response.body", "body": bytearray(b"ab"), "more": True})
        yield send({"type": "http.response.body", "body": memoryview(b"cd"), "more": False,
                    "x-extra": 1})

    with serve(app) as srv:
        resp = exchange(srv.port, req("/"))
    assert resp.status == 200 and resp.body == b"abcd"
    assert resp.header("x-list") == b"1"


def test_body_without_more_defaults_to_final():
    def app(scope, receive, send):
        yield send({"type": "http.response.start", "status": 200})
        yield send({"type": "http.response.body", "body": b"done"})

    with serve(app) as srv, connect(srv.port) as s:
        r = Reader(s)
        s.sendall(req("/") + req("/"))
        assert r.read_response().body == b"done"
        assert r.read_response().body == b"done"


# -- validation -------------------------------------------------------------------

START = "http.response.start"
BODY = "http.response.body"
TRAILERS = "http.response.trailers"

INVALID_START = {
    "missing-status": ({"type": START, "headers": []}, START, "status"),
    "status-str": ({"type": START, "status": "200", "headers": []}, START, "status"),
    "headers-not-list": ({"type": START, "status": 200, "headers": "x-a: b"}, START, "headers"),
    "header-value-crlf": ({"type": START, "status": 200,
                           "headers": [(b"x-a", b"v\r\nInjected: 1")]}, START, "headers"),
    "header-value-lf": ({"type": START, "status": 200,
                         "headers": [(b"x-a", b"v\nInjected: 1")]}, START, "headers"),
    "header-value-cr": ({"type": START, "status": 200,
                         "headers": [(b"x-a", b"v\rInjected: 1")]}, START, "headers"),
    "header-value-nul": ({"type": START, "status": 200,
                          "headers": [(b"x-a", b"v\x00Injected")]}, START, "headers"),
    "header-name-crlf": ({"type": START, "status": 200,
                          "headers": [(b"x-a\r\nInjected", b"v")]}, START, "headers"),
    "header-name-upper": ({"type": START, "status": 200,
                           "headers": [(b"X-Injected", b"v")]}, START, "headers"),
    "header-name-control": ({"type": START, "status": 200,
                             "headers": [(b"x-\x01injected", b"v")]}, START, "headers"),
    "header-not-pair": ({"type": START, "status": 200,
                         "headers": [(b"x-injected", b"v", b"w")]}, START, "headers"),
    "status-bool": ({"type": START, "status": True, "headers": []}, START, "status"),
    "status-out-of-range": ({"type": START, "status": 1000, "headers": []}, START, "status"),
    "trailers-str": ({"type": START, "status": 200, "headers": [], "trailers": "1"},
                     START, "trailers"),
    "header-name-str": ({"type": START, "status": 200, "headers": [("x-a", b"v")]},
                        START, "headers"),
    "header-value-str": ({"type": START, "status": 200, "headers": [(b"x-a", "v")]},
                         START, "headers"),
    "unknown-type": ({"type": "http.response.bogus", "status": 200}, "http.response.bogus", "type"),
    "missing-type": ({"status": 200, "headers": []}, "", "type"),
}


@pytest.fixture(scope="module")
def vsrv():
    def app(scope, receive, send):
        name = scope["path"].lstrip("/")
        if name in INVALID_START:
            bad = INVALID_START[name][0]
            try:
                yield send(bad)
            except pagi_ref.EventError as exc:
                msg = "%s|%s" % (type(exc).__name__, exc)
                ok = isinstance(exc, ValueError)
                yield from respond(send, 200, msg.encode("utf-8", "replace"),
                                   [(b"x-valueerror", b"%d" % ok)])
                return
            except Exception as exc:  # the wrong exception type: say so on the wire
                yield from respond(send, 500, ("wrong|%r" % exc).encode("utf-8", "replace"))
                return
            yield from respond(send, 500, b"accepted")
            return
        # Validation of events after a valid start.
        yield start(send, 200, [(b"content-type", b"text/plain")], trailers=name == "trailers")
        if name == "body-str":
            bad = {"type": BODY, "body": "text", "more": 0}
        elif name == "more-str":
            bad = {"type": BODY, "body": b"x", "more": "yes"}
        elif name == "trailers":
            yield body(send, b"x", more=False)
            bad = {"type": TRAILERS, "headers": [(b"x-t", b"a\r\nInjected: 1")]}
        else:
            bad = {"type": "http.response.start", "status": 200, "headers": []}  # twice
        try:
            yield send(bad)
        except Exception as exc:
            msg = "%s|%s" % (type(exc).__name__, exc)
        else:
            msg = "accepted"
        if name == "trailers":
            yield send({"type": TRAILERS, "headers": [(b"x-msg", msg.encode("ascii", "replace")
                                                       .replace(b"\r", b" ").replace(b"\n", b" "))]})
        else:
            yield body(send, msg.encode("utf-8", "replace"))

    with serve(app) as running:
        yield running


@pytest.mark.parametrize("name", sorted(INVALID_START))
def test_invalid_start_event_fails_the_send_with_event_error(vsrv, name):
    _, event_type, field = INVALID_START[name]
    resp = exchange(vsrv.port, req("/" + name, headers=[("Connection", "close")]))
    text = resp.body.decode("utf-8", "replace")
    assert resp.status == 200, text
    assert text.startswith("EventError|"), text
    assert resp.header("x-valueerror") == b"1"
    assert event_type in text and field in text, text
    assert b"Injected" not in resp.raw_head and b"injected" not in resp.raw_head


def test_body_as_str_fails_the_send(vsrv):
    resp = exchange(vsrv.port, req("/body-str", headers=[("Connection", "close")]))
    text = resp.body.decode()
    assert resp.status == 200 and resp.complete
    assert text.startswith("EventError|"), text
    assert BODY in text and "body" in text.replace(BODY, ""), text


def test_more_as_str_fails_the_send(vsrv):
    resp = exchange(vsrv.port, req("/more-str", headers=[("Connection", "close")]))
    text = resp.body.decode()
    assert resp.status == 200 and resp.complete
    assert text.startswith("EventError|") and BODY in text and "more" in text, text


def test_invalid_trailers_fail_the_send(vsrv):
    resp = exchange(vsrv.port, req("/trailers", headers=[("Connection", "close")]))
    assert resp.status == 200 and resp.complete and resp.body == b"x"
    names = [k for k, _ in resp.trailers]
    assert names == [b"x-msg"], resp.trailers
    msg = resp.trailers[0][1].decode()
    assert msg.startswith("EventError|") and TRAILERS in msg and "headers" in msg, msg


def test_second_response_start_fails_the_send(vsrv):
    resp = exchange(vsrv.port, req("/start-twice", headers=[("Connection", "close")]))
    assert resp.status == 200 and resp.complete
    assert resp.body != b"accepted" and b"http.response.start" in resp.body, resp.body
