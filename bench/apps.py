"""The bench's PAGI application, served by pagi_ref.

    python pagi_ref.py bench/apps.py:app --port 8000 --no-access-log

Routes (bench/asgi_apps.py has the same ones for uvicorn):

    /                                   "Hello, world!" (13 bytes, Content-Length)
    /stream?chunks=20&interval=0.1      20 small chunks, 100 ms apart (2 s), chunked
    /bytes?total=N&chunk=65536          N bytes in chunks, as fast as send() allows
    /file?path=/tmp/...                 a file, sent with http.response.body "file"
    /upload                             reads the request body, answers "got N" (N bytes)

Every route is written as a generator application: ``event = yield
receive()``, ``yield send({...})``, ``yield pagi_ref.sleep(0.1)``.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pagi_ref  # noqa: E402

HELLO = b"Hello, world!"
HELLO_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"13")]
TEXT = [(b"content-type", b"text/plain")]
# /file serves only the bench's own temporary files.
FILE_PREFIX = "/tmp/pagi_bench"

_blocks = {}


def _block(size):
    """A shared block of `size` bytes, so /bytes sends without building data."""
    block = _blocks.get(size)
    if block is None:
        block = _blocks[size] = b"x" * size
    return block


def _query(scope):
    """The query string as a dict of str -> str (last value wins)."""
    out = {}
    for part in scope.get("query_string", b"").decode("latin-1").split("&"):
        if part:
            name, _, value = part.partition("=")
            out[name] = value
    return out


def app(scope, receive, send):
    kind = scope["type"]
    if kind == "lifespan":
        while True:
            event = yield receive()
            if event["type"] == "lifespan.startup":
                yield send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                yield send({"type": "lifespan.shutdown.complete"})
                return
    if kind != "http":
        return
    path = scope["path"]
    if path == "/":
        yield send({"type": "http.response.start", "status": 200, "headers": HELLO_HEADERS})
        yield send({"type": "http.response.body", "body": HELLO})
    elif path == "/stream":
        yield from _stream(scope, send)
    elif path == "/bytes":
        yield from _bytes(scope, send)
    elif path == "/file":
        yield from _file(scope, send)
    elif path == "/upload":
        yield from _upload(receive, send)
    else:
        yield from _plain(send, 404, b"not found\n")


def _upload(receive, send):
    size = 0
    while True:
        event = yield receive()
        if event["type"] != "http.request":
            return                      # http.disconnect: the client left
        size += len(event["body"])
        if not event["more"]:
            break
    yield from _plain(send, 200, b"got %d" % size)


def _plain(send, status, body):
    yield send({"type": "http.response.start", "status": status,
                "headers": TEXT + [(b"content-length", b"%d" % len(body))]})
    yield send({"type": "http.response.body", "body": body})


def _stream(scope, send):
    q = _query(scope)
    chunks = int(q.get("chunks", "20"))
    interval = float(q.get("interval", "0.1"))
    yield send({"type": "http.response.start", "status": 200, "headers": TEXT})
    for i in range(chunks):
        yield send({"type": "http.response.body", "body": b"chunk %d\n" % i, "more": 1})
        yield pagi_ref.sleep(interval)
    yield send({"type": "http.response.body", "body": b"", "more": 0})


def _bytes(scope, send):
    q = _query(scope)
    total = int(q.get("total", "1048576"))
    size = int(q.get("chunk", "65536"))
    block = _block(size)
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream"),
                            (b"content-length", b"%d" % total)]})
    left = total
    while left > size:
        yield send({"type": "http.response.body", "body": block, "more": 1})
        left -= size
    yield send({"type": "http.response.body", "body": block[:left], "more": 0})


def _file(scope, send):
    path = _query(scope).get("path", "")
    if not path.startswith(FILE_PREFIX) or ".." in path or not os.path.isfile(path):
        yield from _plain(send, 404, b"no such bench file\n")
        return
    size = os.path.getsize(path)
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream"),
                            (b"content-length", b"%d" % size)]})
    yield send({"type": "http.response.body", "file": path})
