"""A live counter that stays current for a slow client, using pagi.transport.

    python pagi_ref.py examples/ticker.py:app
    curl -N http://127.0.0.1:8000/

Every 10 ms the counter moves on and the application streams one line,
``tick <n> skipped <k>``, as a chunk of a chunked response.  A client that
reads slower than that (a phone on a bad network, a paused ``curl``) would,
with a plain ``yield send(...)``, make the application wait on the drain and
then get a backlog of stale ticks.  Instead this application looks at the
outgoing buffer before each tick: while more than half of the server's high
watermark is still waiting for the client, it skips the tick (the client
gets the next, fresher one).  So it never blocks in ``send()``, the buffer
stays under the high watermark, and the client sees gaps in the counter
instead of a growing delay: sparse but fresh rather than dense but stale.

The pattern is the "conflating a live feed" example of the PAGI spec,
section "Transport Flow Control"; docs/flow-control.md explains the model.

``make_app()`` builds variants (tests use a faster tick with a payload, so
the kernel's socket buffers fill in a fraction of a second); ``app`` is the
default: a tick every 10 ms, forever, until the client leaves.
"""
import pagi_ref

DEFAULT_HIGH_WATER = 65536   # what to assume when the server gives no mark


def make_app(interval=0.01, ticks=None, payload=0):
    """A ticker application.

    interval -- seconds between ticks
    ticks    -- stop after this many ticks (None: until the client leaves)
    payload  -- bytes of filler appended to each line, to stand for a
                bigger update (a price table, a game state)
    """
    filler = b" " + b"." * (payload - 1) if payload > 0 else b""

    def app(scope, receive, send):
        if scope["type"] != "http":
            raise ValueError("this application serves http only, not %r" % scope["type"])
        transport = scope.get("pagi.transport")     # absent: no introspection
        connection = scope.get("pagi.connection")
        ceiling = DEFAULT_HIGH_WATER
        if transport is not None and transport.high_water_mark() is not None:
            ceiling = transport.high_water_mark()

        yield send({
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                        (b"cache-control", b"no-store")],
        })
        tick = 0
        skipped = 0
        while ticks is None or tick < ticks:
            if connection is not None and not connection.is_connected():
                return      # the client left: nobody to tick for
            buffered = transport.buffered_amount() if transport is not None else 0
            if buffered > ceiling // 2:
                skipped += 1        # the client lags: drop this update
            else:
                line = b"tick %d skipped %d%s\n" % (tick, skipped, filler)
                # Below half the high mark plus one short line, this send
                # never reaches the mark, so it is never suspended.
                yield send({"type": "http.response.body", "body": line, "more": 1})
            tick += 1
            yield pagi_ref.sleep(interval)
        yield send({"type": "http.response.body",
                    "body": b"done %d skipped %d\n" % (tick, skipped), "more": 0})

    return app


app = make_app()
