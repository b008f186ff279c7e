"""Solutions to the exercises of docs/architecture.md ("Exercises").

Each exercise is something a reader of pagi_ref.py can write in a few
lines once they know where to look; each solution here is checked the way
every test here is, from the client's side of a real socket, or with bytes
alone for the sans-I/O parser.  Try them before reading on.
"""
import socket

import pagi_ref
from conftest import serve
from spec_wire import Reader, connect, exchange
from apputil import nodelay, req


# -- Exercise 1: a header on every response ----------------------------------------
#
# Write a middleware `with_header(inner, name, value)` that adds one header
# to every response `inner` sends, whatever else it does.

def with_header(inner, name, value):
    def app(scope, receive, send):
        def send_with_header(event):
            if event["type"] == "http.response.start":
                event = dict(event, headers=list(event.get("headers", [])) + [(name, value)])
            return send(event)          # a Future, like send's own
        return inner(scope, receive, send_with_header)
    return app


def test_exercise_1_a_header_on_every_response():
    def hello(scope, receive, send):
        status = 404 if scope["path"] == "/missing" else 200
        yield send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain")]})
        yield send({"type": "http.response.body", "body": b"hello"})

    with serve(with_header(hello, b"x-served-by", b"exercise-1")) as running:
        for path, status in (("/", 200), ("/missing", 404)):
            resp = exchange(running.port, req(path, headers=[("Connection", "close")]))
            assert resp.status == status and resp.body == b"hello"
            assert resp.header("x-served-by") == b"exercise-1"


# -- Exercise 2: a producer that respects the client's pace -------------------------
#
# Stream 4 MiB in 64 KiB pieces to a client that does not read at first.
# Show, from the transport's own figures, that the server never holds more
# than the high watermark plus one piece.

PIECE = 64 * 1024
TOTAL = 4 * 1024 * 1024


def producer(scope, receive, send):
    transport = scope["pagi.transport"]
    highest = 0
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"%d" % TOTAL)]})
    for _ in range(TOTAL // PIECE):
        # The whole trick: wait for every send.  It stays pending above the
        # high watermark and resumes below the low one.
        yield send({"type": "http.response.body", "body": b"x" * PIECE, "more": 1})
        highest = max(highest, transport.buffered_amount())
    producer.highest = highest
    yield send({"type": "http.response.body", "body": b""})


def test_exercise_2_a_producer_that_respects_the_clients_pace():
    with serve(producer, write_high_watermark=128 * 1024, write_low_watermark=32 * 1024) as running:
        with connect(running.port) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            s.sendall(req("/", headers=[("Connection", "close")]))
            resp = Reader(s).read_response()
    assert resp.status == 200 and len(resp.body) == TOTAL
    assert producer.highest <= 128 * 1024 + PIECE, producer.highest


# -- Exercise 3: receive() with a deadline -------------------------------------------
#
# Write `receive_within(receive, seconds)`, a helper used as
# `event = yield from receive_within(receive, 0.2)`, that gives None when
# nothing arrived in time, and use it to answer a client that stalls in the
# middle of its body with 408.

def receive_within(receive, seconds):
    pending = receive()
    first = yield pagi_ref.wait_any(pending, pagi_ref.sleep(seconds))
    return first.result() if first is pending else None


def impatient(scope, receive, send):
    while True:
        event = yield from receive_within(receive, 0.2)
        if event is None or event["type"] == "http.disconnect":
            status, text = 408, b"too slow"
            break
        if not event.get("more"):
            status, text = 200, b"got it all"
            break
    yield send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"connection", b"close")]})
    yield send({"type": "http.response.body", "body": text})


def test_exercise_3_receive_with_a_deadline():
    with serve(impatient) as running:
        with connect(running.port) as s:
            nodelay(s)
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
            resp = Reader(s).read_response()     # the other 5 bytes never come
        assert (resp.status, resp.body) == (408, b"too slow")
        resp = exchange(running.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        assert (resp.status, resp.body) == (200, b"got it all")


# -- Exercise 4: watch the parser --------------------------------------------------
#
# Feed two pipelined requests to a RequestParser one byte at a time and
# list what next_event() hands out, in order.

def parser_events(data):
    parser = pagi_ref.RequestParser(pagi_ref.Config())
    seen = []
    for i in range(len(data)):
        parser.feed(data[i:i + 1])
        while True:
            event = parser.next_event()
            if event is None:
                break
            seen.append(type(event).__name__ if not isinstance(event, bytes) else event)
    return seen


def test_exercise_4_watch_the_parser():
    data = (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
            b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parser_events(data) == ["RequestHead", b"h", b"i", "EndOfMessage",
                                   "RequestHead", "EndOfMessage"]


# -- Exercise 5: the reactor on its own -----------------------------------------------
#
# Without any server, use a Loop's call_later to collect "a", "b", "c" from
# timers scheduled in the order c, a, b at 0.03, 0.01, 0.02 s, and stop the
# loop when the last one fired.

def test_exercise_5_the_reactor_on_its_own():
    loop = pagi_ref.Loop()
    fired = []
    done = pagi_ref.Future(loop)

    def note(name):
        fired.append(name)
        if len(fired) == 3:
            done.set_result(fired)
    loop.call_later(0.03, note, "c")
    loop.call_later(0.01, note, "a")
    loop.call_later(0.02, note, "b")
    try:
        loop.run_until(done)
    finally:
        loop.close()
    assert fired == ["a", "b", "c"]
