"""Section 7, the lifespan scope (docs/spec.md LIFE-1..8), seen from outside:
the order of startup, requests and shutdown is a recorded trace; what the
client sees is read off the wire; exit statuses from real processes.
"""
import socket
import textwrap
import threading
import time

import pytest

import pagi_ref
from apputil import ServerProcess, respond, req
from conftest import serve
from spec_wire import Reader, connect, exchange


def lifespan_app(trace, on_startup=None, on_shutdown=None, http=None):
    """A generator app that records its lifespan events in ``trace``."""
    def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                event = yield receive()
                trace.append(event["type"])
                if event["type"] == "lifespan.startup":
                    if on_startup is not None:
                        yield from on_startup(scope, send)
                    else:
                        scope["state"]["shared"] = []
                        scope["state"]["name"] = "startup"
                        yield send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    if on_shutdown is not None:
                        yield from on_shutdown(scope, send)
                    else:
                        yield send({"type": "lifespan.shutdown.complete"})
                    return
            return
        trace.append("request " + scope["path"])
        if http is not None:
            yield from http(scope, receive, send)
        else:
            yield from respond(send, 200, b"ok")
    return app


def test_startup_runs_before_the_first_request_and_fills_state():
    trace = []
    gate = threading.Event()

    def on_startup(scope, send):
        yield pagi_ref.to_thread(gate.wait, 10)     # a slow startup (a DB pool, say)
        scope["state"]["shared"] = []
        yield send({"type": "lifespan.startup.complete"})
        trace.append("started")

    def http(scope, receive, send):
        keys = repr(sorted(scope["state"])).encode()
        scope["state"]["shared"].append(scope["path"])
        scope["state"]["name"] = "changed by " + scope["path"]   # private to this copy
        yield from respond(send, 200, keys)

    with serve(lifespan_app(trace, on_startup=on_startup, http=http), lifespan="auto") as srv:
        with connect(srv.port) as s:
            s.sendall(req("/first"))
            s.settimeout(0.3)
            with pytest.raises(socket.timeout):
                s.recv(1)                     # not served while startup runs
            gate.set()
            s.settimeout(10)
            first = Reader(s).read_response()
        second = exchange(srv.port, req("/second", headers=[("Connection", "close")]))
        state = srv.server.state
    assert trace[:3] == ["lifespan.startup", "started", "request /first"]
    assert first.status == 200 and first.body == b"['shared']"
    assert second.body == b"['shared']"
    # Values are shared objects; top-level keys set by a request stay its own.
    assert state["shared"] == ["/first", "/second"]
    assert "name" not in state


def test_shutdown_comes_after_the_last_connection_and_is_awaited():
    trace = []

    def on_shutdown(scope, send):
        yield pagi_ref.sleep(0.05)
        trace.append("cleaned up")
        yield send({"type": "lifespan.shutdown.complete"})

    with serve(lifespan_app(trace, on_shutdown=on_shutdown), lifespan="auto") as srv:
        assert exchange(srv.port, req("/", headers=[("Connection", "close")])).status == 200
    assert trace == ["lifespan.startup", "request /", "lifespan.shutdown", "cleaned up"]


@pytest.mark.parametrize("how", ["raises", "returns"])
def test_an_application_that_declines_lifespan_is_served_anyway(how):
    def app(scope, receive, send):
        if scope["type"] != "http":
            if how == "raises":
                raise ValueError("no lifespan here")
            return
        yield from respond(send, 200, b"served")

    with serve(app, lifespan="auto") as srv:
        resp = exchange(srv.port, req("/", headers=[("Connection", "close")]))
        log = srv.log
        errors = srv.errors
    assert resp.status == 200 and resp.body == b"served"
    assert any("declined lifespan" in line for line in log if line.startswith("INFO"))
    assert errors == []


def test_startup_failed_means_no_connection_is_ever_accepted():
    def on_startup(scope, send):
        yield send({"type": "lifespan.startup.failed", "message": "no database"})

    app = lifespan_app([], on_startup=on_startup)
    server = pagi_ref.Server(app, pagi_ref.Config(port=0, lifespan="auto"))
    host, port = server.bind()
    assert server.serve() is False
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=2).close()


def test_an_exception_after_startup_is_logged_and_serving_goes_on():
    def on_startup(scope, send):
        yield send({"type": "lifespan.startup.complete"})
        raise RuntimeError("background task crashed")

    with serve(lifespan_app([], on_startup=on_startup), lifespan="auto") as srv:
        assert exchange(srv.port, req("/", headers=[("Connection", "close")])).status == 200
        errors = srv.errors
    assert any(line.startswith("ERROR") and "background task crashed" in line
               for line in errors), errors


def test_shutdown_failed_is_logged_with_its_message_and_the_server_stops():
    def on_shutdown(scope, send):
        yield send({"type": "lifespan.shutdown.failed", "message": "pool did not close"})

    # shutdown_timeout=30: stopping in much less shows that the failure, not
    # the timeout, ended the wait.
    with serve(lifespan_app([], on_shutdown=on_shutdown), lifespan="auto",
               shutdown_timeout=30) as srv:
        assert exchange(srv.port, req("/", headers=[("Connection", "close")])).status == 200
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5
    assert any(line.startswith("ERROR") and "lifespan.shutdown.failed: pool did not close"
               in line for line in srv.errors), srv.errors


def test_shutdown_wait_is_bounded_by_shutdown_timeout():
    trace = []

    def on_shutdown(scope, send):
        yield pagi_ref.Future()          # never answers

    with serve(lifespan_app(trace, on_shutdown=on_shutdown), lifespan="auto",
               shutdown_timeout=0.5) as srv:
        assert exchange(srv.port, req("/", headers=[("Connection", "close")])).status == 200
    assert trace[-1] == "lifespan.shutdown"


def test_invalid_lifespan_event_fails_the_send_naming_the_event():
    seen = []

    def on_startup(scope, send):
        try:
            yield send({"type": "lifespan.startup.failed", "message": b"bytes, not str"})
        except pagi_ref.EventError as exc:
            seen.append(str(exc))
        yield send({"type": "lifespan.startup.complete"})

    with serve(lifespan_app([], on_startup=on_startup), lifespan="auto") as srv:
        assert exchange(srv.port, req("/", headers=[("Connection", "close")])).status == 200
    assert seen and "lifespan.startup.failed" in seen[0] and "'message'" in seen[0]


APP_SOURCE = textwrap.dedent('''
    import os

    def app(scope, receive, send):
        if scope["type"] == "lifespan":
            event = yield receive()
            if os.environ.get("MODE") == "fail":
                yield send({"type": "lifespan.startup.failed", "message": "refusing to start"})
                return
            if os.environ.get("MODE") == "decline":
                raise ValueError("http only")
            yield send({"type": "lifespan.startup.complete"})
            event = yield receive()
            with open(os.environ["MARKER"], "a") as f:
                f.write(event["type"] + "\\n")
            yield send({"type": "lifespan.shutdown.complete"})
            return
        yield send({"type": "http.response.start", "status": 200, "headers": []})
        yield send({"type": "http.response.body", "body": b"up"})
''')


@pytest.fixture
def app_file(tmp_path):
    path = tmp_path / "lifeapp.py"
    path.write_text(APP_SOURCE)
    return str(path)


def test_cli_startup_failed_exits_3_without_listening(app_file, tmp_path):
    with ServerProcess(["pagi_ref.py", app_file + ":app", "--port", "0"],
                       env={"MODE": "fail", "MARKER": str(tmp_path / "m")}) as proc:
        rc = proc.p.wait(10)
        proc.reader.join(5)
        stderr = "\n".join(proc.stderr)
    assert rc == 3
    assert "refusing to start" in stderr
    assert "listening on" not in stderr


def test_cli_lifespan_on_makes_a_decline_fatal(app_file, tmp_path):
    with ServerProcess(["pagi_ref.py", app_file + ":app", "--port", "0", "--lifespan", "on"],
                       env={"MODE": "decline", "MARKER": str(tmp_path / "m")}) as proc:
        assert proc.p.wait(10) == 3


def test_cli_sigterm_delivers_lifespan_shutdown(app_file, tmp_path):
    marker = tmp_path / "marker"
    with ServerProcess(["pagi_ref.py", app_file + ":app", "--port", "0"],
                       env={"MODE": "ok", "MARKER": str(marker)}) as proc:
        host, port = proc.wait_listening()
        assert exchange(port, req("/", headers=[("Connection", "close")])).body == b"up"
        assert proc.stop() == 0
    assert marker.read_text() == "lifespan.shutdown\n"
