"""A WebSocket echo: accept, then send every message back as it came.

    python pagi_ref.py examples/ws_echo.py:app --port 9001 --ws-max-message-size 16777216

Text comes back as text, bytes as bytes, until the client closes (or the
connection drops): then ``websocket.disconnect`` arrives and the
application ends.  The server answers pings, reassembles fragmented
messages and runs the close handshake itself; the application sees whole
messages only.  When the client offers permessage-deflate (browsers do),
the server inflates what comes in and compresses what goes out, and the
application does not notice; it also pings the client every 20 s and drops
one that stops answering.  This is the application the Autobahn testsuite
is run against, cases 1-10, 12 and 13 (/work/shared/conformance/autobahn/
README.md; the figures are in bench/README.md).
"""


def app(scope, receive, send):
    if scope["type"] != "websocket":
        # lifespan included: raising declines it (lifespan "auto" goes on).
        raise ValueError("this application serves websocket only, not %r" % scope["type"])
    event = yield receive()
    if event["type"] != "websocket.connect":
        return
    yield send({"type": "websocket.accept"})
    while True:
        event = yield receive()
        if event["type"] == "websocket.disconnect":
            return
        if event.get("text") is not None:
            yield send({"type": "websocket.send", "text": event["text"]})
        else:
            yield send({"type": "websocket.send", "bytes": event["bytes"]})
