"""The concurrency helpers: sleep, spawn, wait_any, wait_all, to_thread.

    python pagi_ref.py examples/concurrency.py:app
    curl http://127.0.0.1:8000/all       # two lookups at once, both results
    curl http://127.0.0.1:8000/any       # two mirrors and a deadline, first wins
    curl http://127.0.0.1:8000/thread    # a blocking call, run in a thread

A sub-task is an ordinary generator (or coroutine) that yields Futures and
returns a value.  ``yield from`` runs it inline; ``spawn`` and the
``wait_*`` helpers run it as a Task of its own, next to the request.
"""
import hashlib
import json
import time

import pagi_ref


def lookup(name, delay):
    """Pretend to ask a slow backend: a generator sub-task with a result."""
    yield pagi_ref.sleep(delay)
    return {"source": name, "delay": delay}


def slow_hash(data):
    """Blocking, CPU-heavy work: it must not run on the loop's thread."""
    return hashlib.pbkdf2_hmac("sha256", data, b"salt", 20000).hex()


def app(scope, receive, send):
    if scope["type"] != "http":
        raise ValueError("this application serves http only, not %r" % scope["type"])
    path = scope["path"]
    started = time.monotonic()
    if path == "/all":
        # Both lookups run at once; the results come back in argument order.
        result = yield pagi_ref.wait_all(lookup("users", 0.2), lookup("orders", 0.1))
    elif path == "/any":
        mirror_a = pagi_ref.spawn(lookup("mirror-a", 0.05))
        mirror_b = pagi_ref.spawn(lookup("mirror-b", 5.0))
        deadline = pagi_ref.sleep(1.0, {"source": "deadline"})
        first = yield pagi_ref.wait_any(mirror_a, mirror_b, deadline)
        for loser in (mirror_a, mirror_b, deadline):
            loser.cancel()      # wait_any leaves the others running; a done one ignores this
        result = first.result()
    elif path == "/thread":
        result = {"pbkdf2": (yield pagi_ref.to_thread(slow_hash, b"secret"))}
    elif path == "/inline":
        # yield from: the sub-task runs as part of this request, one after another.
        first = yield from lookup("first", 0.05)
        second = yield from lookup("second", 0.05)
        result = [first, second]
    else:
        result = {"routes": ["/all", "/any", "/thread", "/inline"]}
    result = {"result": result, "seconds": round(time.monotonic() - started, 2)}
    body = json.dumps(result, sort_keys=True).encode("utf-8") + b"\n"
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode("ascii"))]})
    yield send({"type": "http.response.body", "body": body})
