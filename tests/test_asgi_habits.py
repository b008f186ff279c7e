"""ASGI habits fail loudly (pagi_ref.ASGI_KEYS, pagi_ref.ASGI_TYPES).

An ASGI application that sends ``"more_body": True`` used to be accepted
(PAGI allows extra fields): ``more`` defaulted to 0, the response ended
early, and the next send failed with an error that never said why.  Each
ASGI key or event type that PAGI spells differently now fails the send with
an EventError that names the PAGI way.  The application reports what it
caught on the wire, and the test reads it there.
"""
import pytest

import pagi_ref
from conftest import serve
from spec_wire import exchange
from apputil import body, req, respond, start

BODY = "http.response.body"

CASES = {
    # path: (the ASGI event, the words the message must contain)
    "more-body-true": ({"type": BODY, "body": b"x", "more_body": True}, ["'more'", "'more_body'"]),
    "more-body-false": ({"type": BODY, "body": b"x", "more_body": False}, ["'more'", "'more_body'"]),
    "pathsend": ({"type": "http.response.pathsend", "path": "/etc/hostname"},
                 ["'file'", "http.response.pathsend"]),
    "zerocopy": ({"type": "http.response.zerocopy", "file": 0, "count": 1},
                 ["'fh'", "'length'", "http.response.zerocopy"]),
    "push": ({"type": "http.response.push", "path": "/x", "headers": []}, ["server push"]),
    "early-hint": ({"type": "http.response.early_hint", "links": []}, ["interim"]),
}


@pytest.fixture(scope="module")
def srv():
    def app(scope, receive, send):
        name = scope["path"].lstrip("/")
        yield start(send, 200, [(b"content-type", b"text/plain")], trailers=name == "trailers")
        if name == "trailers":
            yield body(send, b"x")
            event = {"type": "http.response.trailers", "headers": [], "more_trailers": False}
        else:
            event = CASES[name][0]
        try:
            yield send(event)
        except pagi_ref.EventError as exc:
            message = "EventError|%s" % exc
        else:
            message = "accepted"
        if name == "trailers":
            yield send({"type": "http.response.trailers",
                        "headers": [(b"x-msg", message.encode("ascii", "replace"))]})
        else:
            yield body(send, message.encode("utf-8"))

    with serve(app) as running:
        yield running


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_asgi_habit_fails_the_send_and_names_the_pagi_way(srv, name):
    resp = exchange(srv.port, req("/" + name, headers=[("Connection", "close")]))
    text = resp.body.decode()
    assert resp.status == 200 and resp.complete, text
    assert text.startswith("EventError|"), text
    for words in CASES[name][1]:
        assert words in text, (words, text)


def test_more_trailers_fails_the_send(srv):
    resp = exchange(srv.port, req("/trailers", headers=[("Connection", "close")]))
    assert resp.status == 200 and resp.body == b"x"
    message = dict(resp.trailers)[b"x-msg"].decode()
    assert message.startswith("EventError|") and "'more_trailers'" in message, message


def test_asgi_more_body_on_a_websocket_denial_fails_the_send():
    """websocket.http.response.body carries 'more' too."""
    seen = []

    def app(scope, receive, send):
        yield receive()     # websocket.connect
        yield send({"type": "websocket.http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain")]})
        try:
            yield send({"type": "websocket.http.response.body", "body": b"no",
                        "more_body": False})
        except pagi_ref.EventError as exc:
            seen.append(str(exc))
            yield send({"type": "websocket.http.response.body", "body": b"denied"})

    with serve(app) as running:
        resp = exchange(running.port, req("/ws", headers=[
            ("Upgrade", "websocket"), ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")]))
    assert resp.status == 403 and resp.body == b"denied"
    assert len(seen) == 1 and "'more_body'" in seen[0] and "'more'" in seen[0], seen


def test_the_pagi_keys_still_work(srv):
    """The same events in PAGI's words are accepted (a control)."""
    def app(scope, receive, send):
        yield start(send, 200, [(b"content-type", b"text/plain")])
        yield send({"type": BODY, "body": b"a", "more": True})
        yield send({"type": BODY, "body": b"b", "more": 0})

    with serve(app) as running:
        resp = exchange(running.port, req("/", headers=[("Connection", "close")]))
    assert resp.status == 200 and resp.body == b"ab"
