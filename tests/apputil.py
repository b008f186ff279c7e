"""Small helpers shared by the server tests: generator applications and raw requests.

Applications here are written the way the contract says applications are
written: a generator that yields the Futures `receive()` and `send()`
return (`yield from respond(send, ...)` composes them).
"""
import socket
import time


# -- application side -------------------------------------------------------

def start(send, status=200, headers=(), trailers=False):
    event = {"type": "http.response.start", "status": status,
             "headers": [tuple(h) for h in headers]}
    if trailers:
        event["trailers"] = 1
    return send(event)


def body(send, data=b"", more=False):
    return send({"type": "http.response.body", "body": data, "more": 1 if more else 0})


def respond(send, status=200, data=b"", headers=None):
    """A whole response with a Content-Length: `yield from respond(send, ...)`."""
    if headers is None:
        headers = [(b"content-type", b"text/plain")]
    headers = list(headers) + [(b"content-length", str(len(data)).encode())]
    yield start(send, status, headers)
    yield body(send, data)


def read_body(receive):
    """`data = yield from read_body(receive)`; None when the client left."""
    chunks = []
    while True:
        event = yield receive()
        if event["type"] == "http.disconnect":
            return None
        chunks.append(bytes(event.get("body", b"")))
        if not event.get("more"):
            return b"".join(chunks)


# -- client side -------------------------------------------------------------

def req(path="/", method="GET", headers=(), body=b"", version="HTTP/1.1", host=True):
    """Raw request bytes; Content-Length is the caller's business."""
    lines = ["%s %s %s" % (method, path, version)]
    if host:
        lines.append("Host: test")
    lines += ["%s: %s" % (k, v) for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def wait_until(predicate, timeout=5.0):
    """Poll a condition set by the server thread (bounded); returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)   # poll interval of a bounded wait, not a proof
    return bool(predicate())


def nodelay(sock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# -- a pagi_ref server in its own process ------------------------------------------

import os
import queue
import re
import signal
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "pagi_ref.py")
LISTENING = re.compile(r" INFO pagi_ref: listening on https?://([0-9.]+):(\d+)$")


class ServerProcess:
    """`python pagi_ref.py ...` with stderr read line by line in a thread.

    For tests about processes (the command line, signals) and for timing-
    sensitive ones, where a server thread sharing this process's GIL with
    the test's own threads would measure the test harness, not the server.
    """

    def __init__(self, args, cwd=ROOT, env=None, new_session=False, preexec_fn=None,
                 stdout=subprocess.DEVNULL, pass_fds=()):
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.p = subprocess.Popen([sys.executable] + list(args), cwd=cwd, env=full_env,
                                  stdin=subprocess.DEVNULL, stdout=stdout,
                                  stderr=subprocess.PIPE, start_new_session=new_session,
                                  preexec_fn=preexec_fn, pass_fds=pass_fds)
        self.lines = queue.Queue()
        self.stderr = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in iter(self.p.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_listening(self, timeout=10):
        """(host, port) from the startup line."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError("no listening line; stderr so far: %r" % self.stderr)
            if line is None:
                raise AssertionError("process ended before listening (rc=%r): %r"
                                     % (self.p.wait(5), self.stderr))
            m = LISTENING.search(line)
            if m:
                return m.group(1), int(m.group(2))

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Send sig, wait for the exit; returns the exit status."""
        self.p.send_signal(sig)
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(5)
            raise AssertionError("did not stop within %ss after %s" % (timeout, sig))
        self.reader.join(5)
        return rc

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)
        if self.p.stdout is not None:
            self.p.stdout.close()
        self.p.stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
