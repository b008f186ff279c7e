"""Lifespan: open what every request shares once, at startup, and close it
at shutdown.

    python pagi_ref.py examples/lifespan.py:app
    curl http://127.0.0.1:8000/      # query 1 through the pool
    curl http://127.0.0.1:8000/      # query 2 through the pool: the same one
    # Ctrl-C: "pool closed after 2 queries" on stderr, then the server exits

Before it accepts any connection, pagi_ref calls the application once with
a ``lifespan`` scope and delivers lifespan.startup.  This application opens
a Pool (a stand-in for a database connection pool) and puts it in
scope["state"]; every request's scope["state"] is a shallow copy of that
dict, so every request reaches the same Pool.  After the last connection
has gone, lifespan.shutdown closes it.
"""
import sys

import pagi_ref

POOL_SIZE = 4


class Pool:
    """A pretend connection pool: it counts the queries it serves."""

    def __init__(self, size):
        self.size = size
        self.queries = 0
        self.closed = False

    def query(self):
        if self.closed:
            raise RuntimeError("the pool is closed")
        self.queries += 1
        return self.queries

    def close(self):
        self.closed = True
        return "pool closed after %d queries" % self.queries


def open_pool(size):
    """Opening a real pool waits on the network; here, a short sleep."""
    yield pagi_ref.sleep(0.01)
    if size < 1:
        raise ValueError("a pool needs at least one connection, not %d" % size)
    return Pool(size)


def lifespan(scope, receive, send):
    """The lifespan scope: one call that lasts as long as the server."""
    while True:
        event = yield receive()
        if event["type"] == "lifespan.startup":
            try:
                pool = yield from open_pool(POOL_SIZE)
            except Exception as exc:
                # The server logs the message, never accepts a connection,
                # and (on the command line) exits with status 3.
                yield send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            scope["state"]["pool"] = pool       # fill the dict; never replace it
            yield send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            # No request is left: every connection is finished or closed.
            print(scope["state"]["pool"].close(), file=sys.stderr)
            yield send({"type": "lifespan.shutdown.complete"})
            return


def app(scope, receive, send):
    if scope["type"] == "lifespan":
        yield from lifespan(scope, receive, send)
        return
    if scope["type"] != "http":
        raise ValueError("this application serves http and lifespan, not %r" % scope["type"])
    pool = scope["state"].get("pool")   # the very object the startup created
    if pool is None:
        # Served with --lifespan off: the startup never ran.
        yield from respond(send, 503, b"no pool: run me with --lifespan auto or on\n")
        return
    n = pool.query()                    # a shared object: mutate it, all requests see it
    yield from respond(send, 200, b"query %d through the pool\n" % n)


def respond(send, status, body):
    yield send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode("ascii"))]})
    yield send({"type": "http.response.body", "body": body})
