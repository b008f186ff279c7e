"""A clock over Server-Sent Events: the time, once a second, until the client leaves.

    python pagi_ref.py examples/sse_clock.py:app
    curl -N -H 'Accept: text/event-stream' http://127.0.0.1:8000/clock
    curl -N -H 'Accept: text/event-stream' 'http://127.0.0.1:8000/clock?count=3'
    curl -i -H 'Accept: text/event-stream' http://127.0.0.1:8000/nowhere   # 404

or open http://127.0.0.1:8000/ in a browser: that page listens with
``EventSource``, which sends ``Accept: text/event-stream`` itself.

A request that accepts text/event-stream reaches the application as an
``sse`` scope.  GET /clock gets a stream: one event a second, its data the
time in UTC, its id a sequence number (a browser that reconnects sends the
last one back in Last-Event-ID, and the count goes on from there), and a
``:keepalive`` comment every 15 s (which matters once the ticks are rarer
than that, ``make_app(interval=60)``: proxies drop connections that stay
silent).  With ``?count=N`` the clock stops after N ticks, says "bye" in an
event of its own, and returns, which ends the stream.  Any other method or
path is declined with an ordinary 404 (``sse.http.response.*``).  While the
client has not read what was already sent, ticks are skipped rather than
queued: a newer time will do.  See docs/tutorial.md, "Server-Sent Events".
"""
import time
from urllib.parse import parse_qs

import pagi_ref

RETRY_MS = 5000         # how long a browser waits before it reconnects

PAGE = b"""<!doctype html>
<meta charset="utf-8">
<title>sse_clock</title>
<pre id="log"></pre>
<script>
const log = document.getElementById("log");
const clock = new EventSource("/clock");
clock.onmessage = (e) => { log.textContent += e.lastEventId + "  " + e.data + "\\n"; };
clock.addEventListener("bye", (e) => { log.textContent += e.data + "\\n"; clock.close(); });
</script>
"""


def respond(send, status, body, content_type=b"text/plain; charset=utf-8"):
    """A whole response to an http request."""
    yield send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type),
                            (b"content-length", str(len(body)).encode("ascii"))]})
    yield send({"type": "http.response.body", "body": body})


def decline(send, status, body):
    """An ordinary response to an event-stream request, instead of a stream."""
    yield send({"type": "sse.http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode("ascii"))]})
    yield send({"type": "sse.http.response.body", "body": body})


def first_id(scope):
    """1, or one past the Last-Event-ID of a client that reconnects."""
    for name, value in scope["headers"]:
        if name == b"last-event-id" and value.isdigit() and len(value) < 16:
            return int(value) + 1
    return 1


def behind(transport):
    """True while more than half the high-water mark waits for the client:
    then this tick is skipped (and send() never has to wait)."""
    if transport is None or transport.high_water_mark() is None:
        return False
    return transport.buffered_amount() > transport.high_water_mark() // 2


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def make_app(interval=1.0, keepalive=15.0):
    """The clock.  interval -- seconds between ticks; keepalive -- seconds
    between keepalive comments (tests use short ones)."""

    def app(scope, receive, send):
        if scope["type"] == "http":
            # A plain request (no Accept: text/event-stream): the page.
            if scope["method"] == "GET" and scope["path"] == "/":
                yield from respond(send, 200, PAGE, b"text/html; charset=utf-8")
            else:
                yield from respond(send, 404, b"not found\n")
            return
        if scope["type"] != "sse":
            raise ValueError("this application serves sse and http, not %r" % scope["type"])
        if scope["method"] != "GET" or scope["path"] != "/clock":
            # The connection closes after a declining response.
            yield from decline(send, 404, b"no event stream here: GET /clock\n")
            return
        try:
            count = max(1, int(parse_qs(scope["query_string"].decode("latin-1"))["count"][0]))
        except (KeyError, ValueError):
            count = None                # until the client leaves
        transport = scope.get("pagi.transport")

        event = yield receive()         # sse.request: a GET has an empty body ...
        while event["type"] == "sse.request" and event["more"]:
            event = yield receive()     # ... but read any to its end
        gone = receive()                # resolves with sse.disconnect when the client leaves
        yield send({"type": "sse.start"})
        yield send({"type": "sse.keepalive", "interval": keepalive, "comment": "keepalive"})
        n = first = first_id(scope)
        while True:
            if not behind(transport):
                tick = {"type": "sse.send", "data": now(), "id": str(n)}
                if n == first:
                    tick["retry"] = RETRY_MS
                yield send(tick)
            n += 1
            if count is not None and n - first >= count:
                break
            wake = pagi_ref.sleep(interval)
            if (yield pagi_ref.wait_any(wake, gone)) is gone:
                wake.cancel()
                return                  # gone.result()["reason"]: "client_closed", ...
        yield send({"type": "sse.send", "event": "bye", "data": "%d ticks" % count})
        # Returning ends the stream: the server writes the last chunk.

    return app


app = make_app()
