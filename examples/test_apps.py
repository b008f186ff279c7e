"""Tests for the example applications, written as an application author
writes them: pytest and pagi_ref.TestClient (docs/tutorial.md, "Testing
applications").  From the directory that holds pagi_ref.py:

    python -m pytest examples/test_apps.py

Each test serves an application with a real pagi_ref server on 127.0.0.1
(a port the OS picks) and talks to it over sockets, as any client would.
"""
import pytest

import pagi_ref

import echo
import errors
import hello
import lifespan
import sse_clock
import stream
import ws_echo


def test_hello():
    with pagi_ref.TestClient(hello.app) as client:
        response = client.get("/")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.text == "Hello, world!\n"


def test_echo_sends_the_body_back():
    with pagi_ref.TestClient(echo.app) as client:
        response = client.post("/", content=b"hello")
        assert response.content == b"hello"
        assert response.headers["x-body-events"] == "1"
        # An iterable goes out chunked, one piece at a time.
        response = client.post("/", content=[b"one ", b"two"])
        assert response.content == b"one two"


def test_a_body_over_the_limit_never_reaches_the_application():
    with pagi_ref.TestClient(echo.app, max_body_size=4) as client:
        assert client.post("/", content=b"too long").status_code == 413


# -- lifespan: a fixture that starts the application once per test ------------

@pytest.fixture
def client():
    with pagi_ref.TestClient(lifespan.app) as client:    # startup runs here
        yield client
    # ... and shutdown here, when the test is over


def test_every_request_uses_the_pool_of_the_startup(client):
    assert client.get("/").text == "query 1 through the pool\n"
    assert client.get("/").text == "query 2 through the pool\n"
    assert client.state["pool"].queries == 2     # the very object requests used


def test_the_pool_is_closed_at_shutdown():
    with pagi_ref.TestClient(lifespan.app) as client:
        pool = client.state["pool"]
        client.get("/")
    assert pool.closed


# -- streaming ----------------------------------------------------------------

def test_stream_sends_one_line_per_event():
    with pagi_ref.TestClient(stream.app) as client:
        with client.stream("GET", "/?count=3&interval=0") as response:
            assert response.headers["transfer-encoding"] == "chunked"
            lines = list(response.iter_lines())
    assert lines == ["line 1 of 3", "line 2 of 3", "line 3 of 3"]


# -- errors ---------------------------------------------------------------------

def test_an_exception_in_the_application_fails_the_test():
    with pagi_ref.TestClient(errors.app) as client:
        with pytest.raises(RuntimeError, match="failed before http.response.start"):
            client.get("/before")


def test_what_a_client_sees_when_the_application_fails():
    with pagi_ref.TestClient(errors.app, raise_server_exceptions=False) as client:
        assert client.get("/before").status_code == 500
        with pytest.raises(pagi_ref.TestClientError, match="cut short") as cut:
            client.get("/after")
    assert cut.value.response.content == b"partial "


# -- WebSocket and Server-Sent Events ------------------------------------------

def test_ws_echo():
    with pagi_ref.TestClient(ws_echo.app) as client:
        with client.websocket_connect("/") as ws:
            ws.send_text("hello")
            assert ws.receive_text() == "hello"
            ws.send_bytes(b"\x00\x01")
            assert ws.receive_bytes() == b"\x00\x01"


def test_sse_clock():
    app = sse_clock.make_app(interval=0.01)     # a fast clock: no test waits a second
    with pagi_ref.TestClient(app) as client:
        with client.sse("/clock?count=2") as events:
            received = list(events)
    assert [(e.event, e.id) for e in received] == [
        ("message", "1"), ("message", "2"), ("bye", "2")]
    assert received[0].retry == 5000
    assert received[-1].data == "2 ticks"
