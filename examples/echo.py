"""Request bodies: read every http.request event, answer with what arrived.

    python pagi_ref.py examples/echo.py:app --max-body-size 1048576
    curl -i --data-binary 'hello' http://127.0.0.1:8000/
    curl -i -H 'Transfer-Encoding: chunked' --data-binary @README.md http://127.0.0.1:8000/

The body comes in pieces, as it arrives: one ``http.request`` event per
piece, the last one with ``more == 0``.  ``read_body`` loops until then;
``x-body-events`` in the answer says how many pieces there were.
"""


def read_body(receive):
    """``body = yield from read_body(receive)``: the whole request body as
    bytes, or None when the client left before it had sent all of it."""
    chunks = []
    while True:
        event = yield receive()
        if event["type"] == "http.disconnect":
            return None
        chunks.append(event["body"])
        if not event["more"]:
            return b"".join(chunks)


def app(scope, receive, send):
    if scope["type"] != "http":
        raise ValueError("this application serves http only, not %r" % scope["type"])
    events = []

    def counting_receive():
        future = receive()
        events.append(future)
        return future

    body = yield from read_body(counting_receive)
    if body is None:
        return          # the client is gone (or the body broke a limit): nobody to answer
    yield send({
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"application/octet-stream"),
                    (b"content-length", str(len(body)).encode("ascii")),
                    (b"x-body-events", str(len(events)).encode("ascii"))],
    })
    yield send({"type": "http.response.body", "body": body})


# The same, written with async def: the helper is a coroutine and is awaited.

async def read_body_async(receive):
    chunks = []
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            return None
        chunks.append(event["body"])
        if not event["more"]:
            return b"".join(chunks)


async def async_app(scope, receive, send):
    if scope["type"] != "http":
        raise ValueError("this application serves http only, not %r" % scope["type"])
    body = await read_body_async(receive)
    if body is None:
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream"),
                            (b"content-length", str(len(body)).encode("ascii"))]})
    await send({"type": "http.response.body", "body": body})
