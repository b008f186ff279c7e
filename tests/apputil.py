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
        time.sleep(0.002)
    return bool(predicate())


def nodelay(sock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
