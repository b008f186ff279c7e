"""The bench's ASGI application, served by uvicorn: the routes of bench/apps.py.

    uvicorn asgi_apps:app --app-dir bench --no-access-log ...

/file reads the file in 64 KiB blocks (Starlette's FileResponse chunk size)
because ASGI has no file body; everything else matches bench/apps.py byte for
byte on the wire, headers included.
"""
import asyncio
import os

HELLO = b"Hello, world!"
HELLO_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"13")]
TEXT = [(b"content-type", b"text/plain")]
FILE_PREFIX = "/tmp/pagi_bench"
FILE_BLOCK = 65536

_blocks = {}


def _block(size):
    block = _blocks.get(size)
    if block is None:
        block = _blocks[size] = b"x" * size
    return block


def _query(scope):
    out = {}
    for part in scope.get("query_string", b"").decode("latin-1").split("&"):
        if part:
            name, _, value = part.partition("=")
            out[name] = value
    return out


async def app(scope, receive, send):
    kind = scope["type"]
    if kind == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if kind != "http":
        return
    path = scope["path"]
    if path == "/":
        await send({"type": "http.response.start", "status": 200, "headers": HELLO_HEADERS})
        await send({"type": "http.response.body", "body": HELLO})
    elif path == "/stream":
        await _stream(scope, send)
    elif path == "/bytes":
        await _bytes(scope, send)
    elif path == "/upload":
        await _upload(receive, send)
    elif path == "/file":
        await _file(scope, send)
    else:
        await _plain(send, 404, b"not found\n")


async def _upload(receive, send):
    size = 0
    while True:
        event = await receive()
        if event["type"] != "http.request":
            return                      # http.disconnect: the client left
        size += len(event.get("body", b""))
        if not event.get("more_body"):
            break
    await _plain(send, 200, b"got %d" % size)


async def _plain(send, status, body):
    await send({"type": "http.response.start", "status": status,
                "headers": TEXT + [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


async def _stream(scope, send):
    q = _query(scope)
    chunks = int(q.get("chunks", "20"))
    interval = float(q.get("interval", "0.1"))
    await send({"type": "http.response.start", "status": 200, "headers": TEXT})
    for i in range(chunks):
        await send({"type": "http.response.body", "body": b"chunk %d\n" % i, "more_body": True})
        await asyncio.sleep(interval)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _bytes(scope, send):
    q = _query(scope)
    total = int(q.get("total", "1048576"))
    size = int(q.get("chunk", "65536"))
    block = _block(size)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream"),
                            (b"content-length", b"%d" % total)]})
    left = total
    while left > size:
        await send({"type": "http.response.body", "body": block, "more_body": True})
        left -= size
    await send({"type": "http.response.body", "body": block[:left], "more_body": False})


async def _file(scope, send):
    path = _query(scope).get("path", "")
    if not path.startswith(FILE_PREFIX) or ".." in path or not os.path.isfile(path):
        await _plain(send, 404, b"no such bench file\n")
        return
    size = os.path.getsize(path)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream"),
                            (b"content-length", b"%d" % size)]})
    with open(path, "rb") as f:
        while True:
            block = f.read(FILE_BLOCK)
            if not block:
                break
            await send({"type": "http.response.body", "body": block, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
