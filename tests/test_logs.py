"""The logs people expect (issue 14): the access log on by default in the
`pagi` format, one line per WebSocket session and event stream, what a
response cut short really delivered, early refusals with their request
line; the error log's listening and shutdown lines, tracebacks that say
where, and client departures at DEBUG.

The wire figures of the access log (`in=`, `out=`) are checked against
what the client itself sent and received, byte for byte.
"""
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, serve
from spec_wire import Reader, WebSocket, connect, ws_handshake
from apputil import ServerProcess, nodelay, req

SCRIPT = os.path.join(ROOT, "pagi_ref.py")
CLF_TIME = r"\[(\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4})\]"
PAGI_LINE = re.compile(r'^(\S+) - - ' + CLF_TIME + r' "([^"]*)" (\d{3}|-) (\d+|-) (\d+)us '
                       r'in=(\d+) out=(\d+) (\S+)$')

APP = r'''
import pagi_ref

def app(scope, receive, send):
    if scope["type"] == "lifespan":
        raise ValueError("no lifespan")
    path = scope["path"]
    if scope["type"] == "websocket":
        yield receive()
        yield send({"type": "websocket.accept"})
        while True:
            event = yield receive()
            if event["type"] == "websocket.disconnect":
                return
            yield send({"type": "websocket.send", "text": event.get("text") or ""})
    if scope["type"] == "sse":
        yield receive()
        yield send({"type": "sse.start"})
        yield send({"type": "sse.send", "data": "one"})
        while True:
            event = yield receive()
            if event["type"] == "sse.disconnect":
                return
    if path == "/big":
        yield send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % (5 * 1024 * 1024))]})
        for _ in range(80):
            yield send({"type": "http.response.body", "body": b"x" * 65536, "more": 1})
        return
    if path == "/hold":
        while True:
            event = yield receive()
            if not event.get("more"):
                break
    body = b"hello"
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"5")]})
    yield send({"type": "http.response.body", "body": body})
'''


@pytest.fixture
def app_spec(tmp_path):
    path = tmp_path / "logapp.py"
    path.write_text(APP)
    return "%s:app" % path


class Logged(ServerProcess):
    """The server with its access log on stdout (the default), read line by line."""

    def __init__(self, args):
        ServerProcess.__init__(self, [SCRIPT] + args, stdout=subprocess.PIPE)
        self.access = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self):
        for raw in iter(self.p.stdout.readline, b""):
            self.access.put(raw.decode("utf-8", "replace").rstrip("\n"))

    def access_line(self, timeout=10):
        line = self.access.get(timeout=timeout)
        m = PAGI_LINE.match(line)
        assert m, line
        return m

    def stderr_line(self, needle, timeout=10):
        while True:
            line = self.lines.get(timeout=timeout)
            assert line is not None, "process ended; stderr: %r" % self.stderr
            if needle in line:
                return line


def read_exact_response(sock):
    """The raw bytes of one Content-Length response, and its body."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536)
    head, _, rest = raw.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest, rest


def test_access_log_is_on_by_default_and_counts_the_wire(app_spec):
    with Logged([app_spec, "--port", "0"]) as proc:
        _, port = proc.wait_listening()
        raw = req("/hello?x=1", headers=[("Connection", "close")])
        with connect(port) as s:
            s.sendall(raw)
            received, body = read_exact_response(s)
        m = proc.access_line()
        assert m.group(3) == "GET /hello?x=1 HTTP/1.1" and m.group(4) == "200"
        assert m.group(5) == "5" and body == b"hello"
        assert int(m.group(7)) == len(raw)            # in=: what the client sent
        assert int(m.group(8)) == len(received)       # out=: what it received
        assert m.group(9) == "done"
        assert proc.stop() == 0


def test_no_access_log_turns_it_off(app_spec):
    with Logged([app_spec, "--port", "0", "--no-access-log"]) as proc:
        _, port = proc.wait_listening()
        with connect(port) as s:
            s.sendall(req("/", headers=[("Connection", "close")]))
            read_exact_response(s)
        assert proc.stop() == 0
        proc.p.stdout.close()
    assert proc.access.empty()


def test_a_response_cut_short_logs_what_reached_the_socket(app_spec):
    total = 5 * 1024 * 1024
    with Logged([app_spec, "--port", "0"]) as proc:
        _, port = proc.wait_listening()
        with connect(port) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            s.sendall(req("/big"))
            got = 0
            while got < 256 * 1024:
                got += len(s.recv(65536))
            # Leave with a reset: what the kernel still held is lost.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        m = proc.access_line()
        assert m.group(4) == "200"
        assert m.group(9).startswith("cut:"), m.group(0)
        body = int(m.group(5))
        assert got - 1024 <= body < total, (got, body)      # not the 5 MiB handed over
        assert int(m.group(8)) >= body
        assert proc.stop() == 0


def test_an_early_refusal_is_logged_with_its_request_line(app_spec):
    with Logged([app_spec, "--port", "0", "--max-body-size", "10"]) as proc:
        _, port = proc.wait_listening()
        raw = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n"
        with connect(port) as s:
            s.sendall(raw)
            received = Reader(s).read_all()
        assert received.startswith(b"HTTP/1.1 413 ")
        m = proc.access_line()
        assert (m.group(3), m.group(4)) == ("POST /upload HTTP/1.1", "413")
        assert int(m.group(7)) == len(raw) and int(m.group(8)) == len(received)
        # Refused before the request line was read: "-".
        with connect(port) as s:
            s.sendall(b"GARBAGE\r\n\r\n")
            Reader(s).read_all()
        m = proc.access_line()
        assert (m.group(3), m.group(4)) == ("-", "400")
        assert proc.stop() == 0


def test_one_line_per_websocket_session(app_spec):
    with Logged([app_spec, "--port", "0"]) as proc:
        _, port = proc.wait_listening()
        client, resp = ws_handshake(("127.0.0.1", port), "/chat")
        assert resp.status == 101
        ws = WebSocket(client)
        ws.text("hi")
        assert ws.recv() == ("text", "hi")
        ws.close(1000)
        assert ws.recv()[0] == "close"
        client.close()
        m = proc.access_line()
        assert (m.group(3), m.group(4)) == ("GET /chat HTTP/1.1", "101")
        assert m.group(9) == "close:1000"
        assert int(m.group(7)) > 0 and int(m.group(8)) > 0
        assert proc.stop() == 0


def test_one_line_per_event_stream(app_spec):
    with Logged([app_spec, "--port", "0"]) as proc:
        _, port = proc.wait_listening()
        with connect(port) as s:
            s.sendall(req("/events", headers=[("Accept", "text/event-stream")]))
            data = b""
            while b"data: one" not in data:
                data += s.recv(65536)
        m = proc.access_line()
        assert (m.group(3), m.group(4)) == ("GET /events HTTP/1.1", "200")
        assert m.group(9) == "ended:client_closed", m.group(0)
        assert proc.stop() == 0


def test_shutdown_says_what_it_waits_for(app_spec):
    with Logged([app_spec, "--port", "0"]) as proc:
        _, port = proc.wait_listening()
        with connect(port) as s:
            nodelay(s)
            s.sendall(b"POST /hold HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
            # The request is in progress (its body is not all here): stop.
            proc.p.send_signal(signal.SIGTERM)
            line = proc.stderr_line("waiting for")
            assert "waiting for 1 connection to finish (up to 30 s); " \
                   "press Ctrl-C again to stop now" in line, line
            s.sendall(b"cde")
            received, body = read_exact_response(s)
        assert body == b"hello"
        assert proc.p.wait(10) == 0


def test_the_listening_line_has_the_log_format(app_spec):
    with Logged([app_spec, "--port", "0", "--log-level", "error"]) as proc:
        proc.wait_listening()
        line = [l for l in proc.stderr if "listening on" in l][0]
        assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO pagi_ref: listening on "
                        r"http://127\.0\.0\.1:\d+$", line), line
        assert proc.stop() == 0


# -- in-process: the error log's lines ---------------------------------------------------

def test_application_raised_when_called_names_the_path():
    def app(scope, receive, send):
        raise RuntimeError("not even a generator")

    with serve(app) as running:
        with connect(running.port) as s:
            s.sendall(req("/boom?x=1", headers=[("Connection", "close")]))
            assert Reader(s).read_response().status == 500
    assert any("application raised when called: GET /boom?x=1" in l for l in running.errors), \
        running.errors


def test_a_client_that_leaves_is_a_debug_line():
    left = threading.Event()

    def app(scope, receive, send):
        yield send({"type": "http.response.start", "status": 200, "headers": []})
        yield send({"type": "http.response.body", "body": b"part", "more": 1})
        while (yield receive())["type"] != "http.disconnect":
            pass                         # the request's (empty) body first
        left.set()

    with serve(app) as running:
        with connect(running.port) as s:
            s.sendall(req("/stream"))
            assert Reader(s).read_until(b"part")
            # A reset: a FIN alone after a complete request is a half-close.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert left.wait(10)
    debug = [l for l in running.log if l.startswith("DEBUG")]
    assert any("GET /stream HTTP/1.1 ended early: client_closed" in l for l in debug), debug
    assert not running.errors
