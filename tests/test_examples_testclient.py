"""The applications of examples/, tested the way their authors would test
them: with pagi_ref.TestClient (docs/tutorial.md, "Testing applications").

tests/test_examples.py checks the same applications byte by byte on the
wire; here they are checked through the client an application author uses,
which drives them through the same server.  The tutorial's own test file,
examples/test_apps.py, is run here as the tutorial says to run it.
"""
import importlib.util
import os
import subprocess
import sys
import threading

import pytest

import pagi_ref
from pagi_ref import LifespanFailed, TestClient, TestClientError, WebSocketDisconnect, \
    WebSocketRejected
from conftest import ROOT

EXAMPLES = os.path.join(ROOT, "examples")


def load(name):
    """A fresh instance of examples/NAME.py (some keep state in module globals)."""
    path = os.path.join(EXAMPLES, name + ".py")
    spec = importlib.util.spec_from_file_location("pagi_example_tc_" + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- hello, echo, stream, producer -------------------------------------------------------

def test_hello_both_forms():
    with TestClient(load("hello").app) as client:
        response = client.get("/")
    assert response.status_code == 200
    assert response.text == "Hello, world!\n"
    with TestClient(load("hello_async").app) as client:
        response = client.post("/caf\u00e9")
    assert response.text == "Hello from POST /caf\u00e9\n"
    assert response.headers["content-length"] == str(len(response.content))


@pytest.mark.parametrize("attr", ["app", "async_app"])
def test_echo_sends_the_body_back(attr):
    with TestClient(getattr(load("echo"), attr)) as client:
        assert client.post("/", content=b"hello").content == b"hello"
        assert client.get("/").content == b""
        chunked = client.post("/", content=(b"%d," % i for i in range(1000)))
    assert chunked.content == b"".join(b"%d," % i for i in range(1000))


def test_echo_over_max_body_size_is_413_and_the_application_never_runs():
    with TestClient(load("echo").app, max_body_size=1000) as client:
        assert client.post("/", content=b"x" * 1001).status_code == 413
        assert client.post("/", content=b"x" * 1000).status_code == 200


def test_stream_lines_arrive_one_per_event():
    with TestClient(load("stream").app) as client:
        with client.stream("GET", "/", params={"count": 4, "interval": 0}) as response:
            assert response.headers["transfer-encoding"] == "chunked"
            lines = list(response.iter_lines())
    assert lines == ["line %d of 4" % i for i in range(1, 5)]


def test_stream_stops_when_the_client_leaves():
    # A thousand lines, one every 10 ms; the client leaves after the first.
    # The with block ends once the application has returned, which it does
    # only by noticing that the client has gone.
    with TestClient(load("stream").app) as client:
        with client.stream("GET", "/?count=1000&interval=0.01") as response:
            for line in response.iter_lines():
                assert line == "line 1 of 1000"
                break


def test_producer_sends_every_row():
    with TestClient(load("producer").app) as client:
        with client.stream("GET", "/?rows=20000") as response:
            body = response.read()
    lines = body.split(b"\n")
    assert lines[0] == b"n,square" and lines[-1] == b""
    assert len(lines) == 20002
    assert lines[-2] == b"19999,%d" % (19999 * 19999)


def test_ticker_counts_and_says_done():
    with TestClient(load("ticker").make_app(interval=0.001, ticks=5)) as client:
        lines = client.get("/").text.splitlines()
    assert lines == ["tick %d skipped 0" % i for i in range(5)] + ["done 5 skipped 0"]


# -- concurrency helpers, long polling ------------------------------------------------------

@pytest.mark.parametrize("path, result", [
    ("/all", [{"source": "users", "delay": 0.2}, {"source": "orders", "delay": 0.1}]),
    ("/any", {"source": "mirror-a", "delay": 0.05}),
    ("/inline", [{"source": "first", "delay": 0.05}, {"source": "second", "delay": 0.05}]),
])
def test_concurrency_helpers(path, result):
    with TestClient(load("concurrency").app) as client:
        assert client.get(path).json()["result"] == result


def test_concurrency_to_thread():
    with TestClient(load("concurrency").app) as client:
        digest = client.get("/thread").json()["result"]["pbkdf2"]
    assert digest == load("concurrency").slow_hash(b"secret")


def test_longpoll_a_published_message_reaches_the_waiter():
    # The waiter blocks in its own thread; the test publishes once the
    # application says (in /stats) that someone waits.
    app = load("longpoll").LongPoll()
    with TestClient(app) as client:
        answers = []
        waiter = threading.Thread(target=lambda: answers.append(client.get("/wait?timeout=30")))
        waiter.start()
        for _ in range(1000):
            if client.get("/stats").json()["waiting"] == 1:
                break
        else:
            pytest.fail("the waiter never arrived")
        assert client.post("/publish", content=b"news").text == "delivered to 1\n"
        waiter.join(10)
        stats = client.get("/stats").json()
    assert answers[0].status_code == 200 and answers[0].content == b"news"
    assert stats["delivered"] == 1 and stats["waiting"] == 0


def test_longpoll_deadline_is_a_204():
    with TestClient(load("longpoll").LongPoll()) as client:
        response = client.get("/wait", params={"timeout": 0})
    assert response.status_code == 204 and response.content == b""


# -- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path, message", [
    ("/before", "failed before http.response.start"),
    ("/after", "failed in the middle of the body"),
])
def test_errors_the_applications_exception_is_raised_in_the_test(path, message):
    with TestClient(load("errors").app) as client:
        with pytest.raises(RuntimeError, match=message):
            client.get(path)


def test_errors_what_a_client_sees():
    with TestClient(load("errors").app, raise_server_exceptions=False) as client:
        assert client.get("/before").status_code == 500
        with pytest.raises(TestClientError, match="cut short") as cut:
            client.get("/after")
        nothing = client.get("/nothing")
        bad_event = client.get("/bad-event")
    assert cut.value.response.status_code == 200
    assert cut.value.response.content == b"partial "
    assert nothing.status_code == 500
    assert bad_event.status_code == 500
    assert bad_event.text.startswith("http.response.start: 'headers'[0]")


def test_errors_returning_without_a_response_is_a_500_not_an_exception():
    with TestClient(load("errors").app) as client:
        assert client.get("/nothing").status_code == 500


# -- lifespan ---------------------------------------------------------------------------------

def test_lifespan_pool_is_shared_and_closed_at_exit(capsys):
    with TestClient(load("lifespan").app) as client:
        pool = client.state["pool"]
        assert client.get("/").text == "query 1 through the pool\n"
        assert client.get("/").text == "query 2 through the pool\n"
        assert pool.queries == 2 and not pool.closed
    assert pool.closed
    assert "pool closed after 2 queries" in capsys.readouterr().err


def test_lifespan_a_pool_that_cannot_open_keeps_the_client_from_starting():
    module = load("lifespan")
    module.POOL_SIZE = 0
    with pytest.raises(LifespanFailed, match="a pool needs at least one connection, not 0"):
        with TestClient(module.app):
            pass


def test_lifespan_off_the_application_answers_503():
    with TestClient(load("lifespan").app, lifespan="off") as client:
        assert client.get("/").status_code == 503


# -- WebSocket ------------------------------------------------------------------------------

def test_ws_echo():
    with TestClient(load("ws_echo").app) as client:
        with client.websocket_connect("/") as ws:
            ws.send_text("hello")
            assert ws.receive_text() == "hello"
            ws.send_bytes(b"\x00\xff")
            assert ws.receive_bytes() == b"\x00\xff"
            ws.send_text("\u00e9" * 40000)
            assert ws.receive_text() == "\u00e9" * 40000


def test_ws_chat_join_broadcast_quit():
    with TestClient(load("ws_chat").ChatRoom()) as client:
        with client.websocket_connect("/?name=alice") as alice:
            assert alice.receive_text() == "* alice joined"
            with client.websocket_connect("/?name=bob") as bob:
                assert bob.receive_text() == "* bob joined"
                assert alice.receive_text() == "* bob joined"
                with pytest.raises(WebSocketRejected) as taken:
                    client.websocket_connect("/?name=bob")
                assert taken.value.response.status_code == 403
                alice.send_text("hello")
                assert alice.receive_text() == "alice: hello"
                assert bob.receive_text() == "alice: hello"
                bob.send_text("/quit")
                with pytest.raises(WebSocketDisconnect) as bye:
                    bob.receive_text()
                assert (bye.value.code, bye.value.reason) == (1000, "bye")
            assert alice.receive_text() == "* bob left"


def test_ws_chat_an_http_request_raises_in_the_test():
    with TestClient(load("ws_chat").ChatRoom()) as client:
        with pytest.raises(ValueError, match="serves websocket only"):
            client.get("/")


# -- Server-Sent Events -------------------------------------------------------------------------

def test_sse_clock_ticks_then_says_bye():
    with TestClient(load("sse_clock").make_app(interval=0.001)) as client:
        with client.sse("/clock?count=3") as events:
            got = list(events)
    assert [(e.event, e.id) for e in got] == [("message", "1"), ("message", "2"),
                                              ("message", "3"), ("bye", "3")]
    assert got[0].retry == 5000 and got[1].retry is None
    assert got[-1].data == "3 ticks"
    assert all(len(e.data) == len("2026-11-26T09:39:51Z") for e in got[:3])


def test_sse_clock_counts_on_from_last_event_id():
    with TestClient(load("sse_clock").make_app(interval=0.001)) as client:
        with client.sse("/clock?count=2", last_event_id="41") as events:
            assert [e.id for e in events] == ["42", "43", "43"]


def test_sse_clock_declines_other_paths_and_serves_its_page():
    with TestClient(load("sse_clock").app) as client:
        with client.sse("/nowhere") as events:
            assert events.response.status_code == 404
            assert events.response.text == "no event stream here: GET /clock\n"
        page = client.get("/")
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert b"new EventSource(\"/clock\")" in page.content


def test_sse_clock_stops_when_the_client_leaves():
    # A tick a second, forever: the with block ends (the application has
    # returned) only because the clock notices the client leave.
    with TestClient(load("sse_clock").app) as client:
        with client.sse("/clock") as events:
            first = next(iter(events))
    assert first.id == "1"


# -- the tutorial's test file ---------------------------------------------------------------------

def test_the_tutorials_test_file_passes_as_the_tutorial_runs_it():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "examples/test_apps.py"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    output = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, output
    assert " passed" in output and "warning" not in output.lower(), output
