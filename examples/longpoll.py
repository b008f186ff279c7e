"""Long polling: wait for the next message, a deadline, or the client leaving
-- whichever comes first.

    python pagi_ref.py examples/longpoll.py:app
    curl -i 'http://127.0.0.1:8000/wait?timeout=30'          # waits ...
    curl -i --data-binary 'hello' http://127.0.0.1:8000/publish   # ... until this
    curl -s http://127.0.0.1:8000/stats

A waiting request races three Futures with ``pagi_ref.wait_any``: the next
published message, ``pagi_ref.sleep(timeout)``, and the connection's
``disconnect_future()``.  See docs/tutorial.md, "Knowing when the client
has gone", for when pagi_ref can tell that a waiting client has left.
"""
import json
from urllib.parse import parse_qs

import pagi_ref


class LongPoll:
    """The application; each instance has its own waiters and counters."""

    def __init__(self):
        self.waiters = set()    # Futures of the requests waiting in /wait
        self.stats = {"delivered": 0, "timed_out": 0, "left": 0, "last_reason": None}

    def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError("this application serves http only, not %r" % scope["type"])
        path, method = scope["path"], scope["method"]
        if path == "/wait" and method == "GET":
            return self.wait(scope, send)
        if path == "/publish" and method == "POST":
            return self.publish(receive, send)
        if path == "/stats" and method == "GET":
            stats = dict(self.stats, waiting=len(self.waiters))
            return respond(send, 200, json.dumps(stats, sort_keys=True).encode() + b"\n",
                           b"application/json")
        return respond(send, 404, b"not found\n")

    def wait(self, scope, send):
        query = parse_qs(scope["query_string"].decode("latin-1"))
        try:
            timeout = min(max(float(query["timeout"][0]), 0.0), 60.0)
        except (KeyError, ValueError):
            timeout = 25.0
        conn = scope["pagi.connection"]
        message = pagi_ref.Future()
        deadline = pagi_ref.sleep(timeout)
        gone = conn.disconnect_future()
        self.waiters.add(message)
        try:
            first = yield pagi_ref.wait_any(message, deadline, gone)
        finally:
            # wait_any cancels nothing: tidy up the Futures that lost.
            self.waiters.discard(message)
            message.cancel()
            deadline.cancel()
        if first is gone:
            self.stats["left"] += 1
            self.stats["last_reason"] = gone.result()
            return      # nobody to answer; pagi_ref sends no 500 for a client that left
        if first is deadline:
            self.stats["timed_out"] += 1
            yield from respond(send, 204, b"")
            return
        self.stats["delivered"] += 1
        yield from respond(send, 200, message.result())

    def publish(self, receive, send):
        chunks = []
        while True:
            event = yield receive()
            if event["type"] == "http.disconnect":
                return
            chunks.append(event["body"])
            if not event["more"]:
                break
        text = b"".join(chunks)
        waiters, self.waiters = self.waiters, set()
        for future in waiters:
            if not future.done():
                future.set_result(text)
        yield from respond(send, 200, b"delivered to %d\n" % len(waiters))


def respond(send, status, body, content_type=b"text/plain; charset=utf-8"):
    headers = [(b"content-type", content_type)] if status != 204 else []
    if status != 204:
        headers.append((b"content-length", str(len(body)).encode("ascii")))
    yield send({"type": "http.response.start", "status": status, "headers": headers})
    yield send({"type": "http.response.body", "body": body})


app = LongPoll()
