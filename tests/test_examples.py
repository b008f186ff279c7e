"""The applications of examples/ (the ones docs/tutorial.md teaches), served
in-process, checked by what a client sees on the wire.

Each example is loaded from its path with importlib, as
``python pagi_ref.py examples/NAME.py:app`` would load it; an example that
keeps state (longpoll) gets a fresh instance per test.  If one of these
tests fails, the tutorial is wrong too: fix both.
"""
import hashlib
import importlib.util
import json
import os
import re
import socket
import threading

import pytest

from conftest import ROOT, serve
from spec_wire import Reader, connect, exchange, get
from apputil import req, wait_until

EXAMPLES = os.path.join(ROOT, "examples")


def load(name):
    path = os.path.join(EXAMPLES, name + ".py")
    spec = importlib.util.spec_from_file_location("pagi_example_" + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def post(port, path, data, headers=()):
    return get(port, path, headers=headers, method="POST", body=data)


def chunked(*pieces):
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


# -- first application ----------------------------------------------------------

@pytest.mark.parametrize("name", ["hello", "hello_async"])
def test_hello_in_both_forms(name):
    with serve(load(name).app) as srv:
        resp = get(srv.port, "/caf%C3%A9")
    assert resp.status == 200
    assert resp.header("content-type") == b"text/plain; charset=utf-8"
    if name == "hello":
        assert resp.body == b"Hello, world!\n"
    else:
        assert resp.body == "Hello from GET /café\n".encode("utf-8")
        assert resp.header("content-length") == b"%d" % len(resp.body)


# -- request bodies -----------------------------------------------------------------

@pytest.mark.parametrize("attr", ["app", "async_app"])
def test_echo_returns_the_body(attr):
    with serve(getattr(load("echo"), attr)) as srv:
        resp = post(srv.port, "/", b"hello")
        empty = get(srv.port, "/")
    assert resp.status == 200 and resp.body == b"hello"
    assert resp.header("content-length") == b"5"
    assert empty.status == 200 and empty.body == b""


def test_echo_body_arrives_in_events_the_last_with_more_0():
    with serve(load("echo").app) as srv:
        one = post(srv.port, "/", b"hello")
        none = get(srv.port, "/")
    # Five bytes that arrive together, the whole Content-Length body: one
    # event, with more=0 (the server looks ahead to the end of the body).
    assert one.header("x-body-events") == b"1"
    assert none.header("x-body-events") == b"1"


def test_echo_dechunks_a_chunked_request():
    raw = req("/", "POST", [("Transfer-Encoding", "chunked"), ("Connection", "close")],
              chunked(b"first,", b"second,", b"third"))
    with serve(load("echo").app) as srv:
        resp = exchange(srv.port, raw)
    assert resp.status == 200 and resp.body == b"first,second,third"


def test_echo_body_over_max_body_size_is_413():
    with serve(load("echo").app, max_body_size=1000) as srv:
        ok = post(srv.port, "/", b"x" * 1000)
        declared = post(srv.port, "/", b"x" * 1001)
        raw = req("/", "POST", [("Transfer-Encoding", "chunked")],
                  chunked(b"x" * 600, b"x" * 600))
        grown = exchange(srv.port, raw)
        errors = srv.errors
    assert ok.status == 200 and len(ok.body) == 1000
    # Declared too large: answered before the application is called.
    assert declared.status == 413 and declared.header("connection") == b"close"
    # Chunked, grew too large while read: 413, and the application's
    # receive() gave http.disconnect, so echo returned without answering.
    assert grown.status == 413 and grown.header("connection") == b"close"
    assert errors == []


# -- streaming ----------------------------------------------------------------------

def test_stream_is_chunked_one_line_per_event():
    with serve(load("stream").app) as srv:
        resp = get(srv.port, "/?count=3&interval=0.01")
    assert resp.status == 200 and resp.chunked and resp.complete
    assert resp.header("content-length") is None
    assert resp.body == b"line 1 of 3\nline 2 of 3\nline 3 of 3\n"


def test_stream_first_line_is_on_the_wire_while_the_app_sleeps():
    # interval=10: if the server held the response until the application
    # finished, nothing would arrive before the shutdown below.
    with serve(load("stream").app) as srv:
        with connect(srv.port, timeout=5) as s:
            s.sendall(req("/?count=2&interval=10"))
            r = Reader(s)
            head = r.read_until(b"\r\n\r\n")
            first = r.read_until(b"line 1 of 2\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"transfer-encoding: chunked\r\n" in head
            assert first == b"c\r\nline 1 of 2\n\r\n"
            srv.server.stop(timeout=0.1)     # the app is still asleep: abort it
            rest = r.read_all()
    assert rest == b""     # cut short: no last chunk, the client can tell


# -- a backpressure-aware producer ---------------------------------------------------

def recording(app, seen):
    """Middleware: after each send, note what the transport holds."""
    def wrapped(scope, receive, send):
        transport = scope["pagi.transport"]

        def recorded_send(event):
            future = send(event)
            seen["bytes"] += len(event.get("body", b""))
            seen["max_buffered"] = max(seen["max_buffered"], transport.buffered_amount())
            if not future.done():
                seen["bytes_when_suspended"] = seen["bytes"]   # waits for the drain now
            return future
        return app(scope, receive, recorded_send)
    return wrapped


def test_producer_sends_every_row():
    with serve(load("producer").app) as srv:
        resp = get(srv.port, "/?rows=1000")
    lines = resp.body.split(b"\n")
    assert resp.status == 200 and resp.chunked and resp.complete
    assert lines[0] == b"n,square" and lines[1] == b"0,0" and lines[1000] == b"999,998001"
    assert lines[1001:] == [b""]


def test_producer_builds_no_more_than_fits_and_waits_for_a_slow_client():
    seen = {"bytes": 0, "max_buffered": 0, "bytes_when_suspended": None}
    rows = 1000000
    total = sum(len(b"%d,%d\n" % (n, n * n)) for n in range(rows)) + len(b"n,square\n")
    with serve(recording(load("producer").app, seen),
               write_high_watermark=16384, write_low_watermark=4096) as srv:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
            s.settimeout(10)
            s.connect(("127.0.0.1", srv.port))
            s.sendall(req("/?rows=%d" % rows, headers=[("Connection", "close")]))
            # Not reading: the producer fills the kernel's socket buffers and
            # the 16 KiB above them, then its send() stays pending.
            # The producer's send is suspended: it can build nothing more
            # until this client reads.
            assert wait_until(lambda: seen["bytes_when_suspended"] is not None, 10)
            produced_while_stalled = seen["bytes_when_suspended"]
            resp = Reader(s).read_response()
    assert produced_while_stalled < total // 2, (produced_while_stalled, total)
    # Each event was sized to the room under the mark: the buffer never held
    # more than the high-water mark plus one line.
    assert seen["max_buffered"] <= 16384 + 32, seen
    assert resp.complete and len(resp.body) == total
    assert resp.body.endswith(b"999999,999998000001\n")


# -- pagi.connection and disconnect racing: longpoll ----------------------------------

def stats(port):
    return json.loads(get(port, "/stats").body)


def test_longpoll_delivers_a_published_message_to_every_waiter():
    app = load("longpoll").LongPoll()
    results = []
    with serve(app) as srv:
        def wait():
            results.append(get(srv.port, "/wait?timeout=10"))
        waiters = [threading.Thread(target=wait) for _ in range(2)]
        for t in waiters:
            t.start()
        assert wait_until(lambda: stats(srv.port)["waiting"] == 2)
        published = post(srv.port, "/publish", b"hello")
        for t in waiters:
            t.join(10)
        after = stats(srv.port)
    assert published.status == 200 and published.body == b"delivered to 2\n"
    assert [(r.status, r.body) for r in results] == [(200, b"hello"), (200, b"hello")]
    assert after == {"delivered": 2, "timed_out": 0, "left": 0, "last_reason": None,
                     "waiting": 0}


def test_longpoll_deadline_gives_204():
    app = load("longpoll").LongPoll()
    with serve(app) as srv:
        resp = get(srv.port, "/wait?timeout=0.05")
        after = stats(srv.port)
    assert resp.status == 204 and resp.body == b""
    assert after["timed_out"] == 1 and after["waiting"] == 0


def test_longpoll_learns_client_closed_while_the_request_is_still_arriving():
    app = load("longpoll").LongPoll()
    with serve(app) as srv:
        with connect(srv.port) as s:
            s.sendall(req("/wait?timeout=30", headers=[("Content-Length", "5")], body=b"ab"))
            assert wait_until(lambda: stats(srv.port)["waiting"] == 1)
        assert wait_until(lambda: stats(srv.port)["left"] == 1)
        after = stats(srv.port)
    assert after["last_reason"] == "client_closed" and after["waiting"] == 0


def test_longpoll_does_not_learn_that_a_complete_get_was_abandoned():
    # A documented limitation (docs/tutorial.md, "Knowing when the client has
    # gone"): once a request has fully arrived, pagi_ref cannot tell a client
    # that closed from one that only half-closed, so it reports nothing until
    # a write fails.  If this test starts failing, the server learned to do
    # better: update the tutorial, then this test.
    app = load("longpoll").LongPoll()
    with serve(app) as srv:
        with connect(srv.port) as s:
            s.sendall(req("/wait?timeout=30"))
            assert wait_until(lambda: stats(srv.port)["waiting"] == 1)
        # A barrier, not a pause: this request is sent after the close, so
        # once its answer is back the server has had a whole turn with the
        # close in hand (the FIN came before it on the loopback).
        stats(srv.port)
        after = stats(srv.port)
        srv.server.stop(timeout=0.05)
    assert after["waiting"] == 1 and after["left"] == 0


def with_disconnect_log(app, reasons):
    """Middleware: record on_disconnect reasons (they run synchronously)."""
    def wrapped(scope, receive, send):
        scope["pagi.connection"].on_disconnect(reasons.append)
        return app(scope, receive, send)
    return wrapped


def test_longpoll_waiter_at_the_end_of_shutdown_timeout():
    # When shutdown_timeout ends, on_disconnect callbacks run with
    # server_shutdown and the loop runs a little longer, so the waiting
    # application is resumed and sees that the client is gone.
    app = load("longpoll").LongPoll()
    reasons = []
    with serve(with_disconnect_log(app, reasons)) as srv:
        with connect(srv.port) as s:
            s.sendall(req("/wait?timeout=30"))
            assert wait_until(lambda: stats(srv.port)["waiting"] == 1)
            srv.server.stop(timeout=0.1)
            seen = Reader(s).read_all()
    assert seen == b""      # closed without a response
    assert reasons == ["server_shutdown"]
    assert app.stats["left"] == 1     # the "if first is gone" branch ran


# -- concurrency helpers ----------------------------------------------------------------

def test_concurrency_helpers():
    with serve(load("concurrency").app) as srv:
        answers = {p: json.loads(get(srv.port, p).body)["result"]
                   for p in ("/all", "/any", "/thread", "/inline")}
    assert answers["/all"] == [{"source": "users", "delay": 0.2},
                               {"source": "orders", "delay": 0.1}]
    assert answers["/any"] == {"source": "mirror-a", "delay": 0.05}
    expected = hashlib.pbkdf2_hmac("sha256", b"secret", b"salt", 20000).hex()
    assert answers["/thread"] == {"pbkdf2": expected}
    assert answers["/inline"] == [{"source": "first", "delay": 0.05},
                                  {"source": "second", "delay": 0.05}]


# -- errors ---------------------------------------------------------------------------

def test_errors_what_the_client_sees():
    with serve(load("errors").app) as srv:
        before = get(srv.port, "/before")
        after = get(srv.port, "/after")
        nothing = get(srv.port, "/nothing")
        bad = get(srv.port, "/bad-event")
        assert wait_until(lambda: len(srv.errors) >= 3)
        errors = srv.errors
    assert before.status == 500 and before.body == b"Internal Server Error\n"
    assert before.header("connection") == b"close"
    assert after.status == 200 and after.chunked and not after.complete
    assert after.body == b"partial "
    assert nothing.status == 500
    assert bad.status == 500
    assert bad.body == (b"http.response.start: 'headers'[0] name and value must be bytes, "
                        b"got bytes and str\n")
    assert any("application raised: GET /before" in e and "Traceback" in e for e in errors)
    assert any("application raised: GET /after" in e for e in errors)
    assert any("returned without starting a response: GET /nothing" in e for e in errors)
    assert len(errors) == 3, errors


# -- lifespan -------------------------------------------------------------------------

def test_lifespan_pool_is_shared_by_every_request_and_closed_at_shutdown(capsys):
    # The serve fixture runs without lifespan unless asked: ask.
    with serve(load("lifespan").app, lifespan="auto") as srv:
        first = get(srv.port, "/")
        second = get(srv.port, "/")
        pool = srv.server.state["pool"]
        assert not pool.closed
    assert (first.status, first.body) == (200, b"query 1 through the pool\n")
    assert (second.status, second.body) == (200, b"query 2 through the pool\n")
    # Shutdown came after the last connection: the pool saw both requests.
    assert pool.closed and pool.queries == 2
    assert "pool closed after 2 queries" in capsys.readouterr().err


def test_lifespan_a_pool_that_cannot_open_keeps_the_server_from_starting():
    module = load("lifespan")
    module.POOL_SIZE = 0
    with serve(module.app, lifespan="auto") as srv:
        assert wait_until(lambda: not srv.server.listeners)   # serve() returned
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()
        errors = srv.errors
    assert len(errors) == 1
    assert "lifespan.startup.failed: a pool needs at least one connection, not 0" in errors[0]


def test_lifespan_off_the_startup_never_runs():
    with serve(load("lifespan").app, lifespan="off") as srv:
        resp = get(srv.port, "/")
    assert resp.status == 503
    assert resp.body == b"no pool: run me with --lifespan auto or on\n"


# -- WebSocket: ws_chat ------------------------------------------------------------------
#
# A minimal raw-socket WebSocket client: the handshake, masked text frames
# out, frames in.  (tests/test_websocket.py has the full one, which also
# sends broken frames.)

WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


class ChatClient:
    def __init__(self, port, path, rcvbuf=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.reader = Reader(self.sock)
        self.sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: chat.test\r\n"
                          b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: " + WS_KEY + b"\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n")
        self.response = self.reader.read_response(head_request=True)

    def send(self, opcode, payload):
        key = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
        masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + key + masked)

    def say(self, text):
        self.send(0x1, text.encode("utf-8"))

    def frame(self):
        """(opcode, payload) of the next frame; server frames are not masked."""
        b0, b1 = self.reader.read_exact(2)
        assert not b1 & 0x80, "a server frame is masked"
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self.reader.read_exact(2), "big")
        elif n == 127:
            n = int.from_bytes(self.reader.read_exact(8), "big")
        return b0 & 0x0F, self.reader.read_exact(n)

    def hear(self):
        """The next text message (pings are answered and skipped)."""
        while True:
            opcode, payload = self.frame()
            if opcode == 0x9:
                self.send(0xA, payload)
                continue
            assert opcode == 0x1, (opcode, payload)
            return payload.decode("utf-8")

    def close(self):
        self.sock.close()


def test_ws_echo_sends_every_message_back():
    with serve(load("ws_echo").app) as srv:
        ws = ChatClient(srv.port, "/")
        assert ws.response.status == 101
        ws.say("h\u00e9llo")
        assert ws.frame() == (0x1, "h\u00e9llo".encode("utf-8"))
        ws.send(0x2, b"\x00\xff" * 40000)
        assert ws.frame() == (0x2, b"\x00\xff" * 40000)
        ws.send(0x8, b"\x03\xe8")                  # close, 1000
        assert ws.frame() == (0x8, b"\x03\xe8")    # answered with the same code
        assert ws.reader.read_all() == b""
        ws.close()


def test_ws_chat_broadcast_join_leave_and_quit():
    room = load("ws_chat").ChatRoom()
    with serve(room) as srv:
        bob = ChatClient(srv.port, "/?name=bob")
        assert bob.response.status == 101
        assert bob.hear() == "* bob joined"
        alice = ChatClient(srv.port, "/?name=alice")
        assert alice.hear() == "* alice joined"
        assert bob.hear() == "* alice joined"
        alice.say("hello")
        assert alice.hear() == "alice: hello"       # the speaker hears it too
        assert bob.hear() == "alice: hello"
        bob.send(0x2, b"\x00\x01")                   # binary: dropped, text only
        bob.say("hi, alice")
        assert alice.hear() == "bob: hi, alice"
        assert bob.hear() == "bob: hi, alice"
        # The name is taken: websocket.close before accept is a 403.
        taken = ChatClient(srv.port, "/?name=bob")
        assert taken.response.status == 403
        taken.close()
        # /quit: the server's close frame, 1000 "bye"; the client answers it.
        alice.say("/quit")
        opcode, payload = alice.frame()
        assert (opcode, payload) == (0x8, b"\x03\xe8bye")
        alice.send(0x8, payload[:2])
        assert alice.reader.read_all() == b""        # then the server closes TCP
        assert bob.hear() == "* alice left"
        # A client that just drops the connection leaves too (code 1006).
        bob.close()
        assert wait_until(lambda: not room.members)
        # A guest name when none is given.
        guest = ChatClient(srv.port, "/")
        assert guest.hear() == "* guest-1 joined"
        guest.close()


def test_ws_chat_an_http_request_is_a_500():
    with serve(load("ws_chat").ChatRoom()) as srv:
        resp = get(srv.port, "/")
        assert wait_until(lambda: srv.errors)
    assert resp.status == 500
    assert "this application serves websocket only, not 'http'" in srv.errors[0]


def test_ws_chat_a_member_that_does_not_read_misses_messages_and_is_told():
    """Backpressure: while bob does not read, his buffer stays bounded and the
    room skips him; once he reads, every message alice sent either reached
    him or was counted in a "you missed" notice."""
    module = load("ws_chat")
    room = module.ChatRoom()
    with serve(room, write_high_watermark=65536, write_low_watermark=16384) as srv:
        bob = ChatClient(srv.port, "/?name=bob", rcvbuf=16384)
        alice = ChatClient(srv.port, "/?name=alice")
        assert alice.hear() == "* alice joined"
        line = "x" * 32768
        sent = peak = 0
        # Alice talks, reading her own messages back, until bob has missed
        # some (the kernel's socket buffers take a few MB first).
        while not room.members["bob"].missed and sent < 2000:
            alice.say("%d %s" % (sent, line))
            assert alice.hear() == "alice: %d %s" % (sent, line)
            sent += 1
            peak = max(peak, room.members["bob"].transport.buffered_amount())
        assert room.members["bob"].missed, "bob never fell behind"
        for _ in range(5):                  # some more while bob is behind
            alice.say("%d %s" % (sent, line))
            alice.hear()
            sent += 1
        assert len(room.members["bob"].outbox) <= module.OUTBOX_LIMIT
        heard, missed = [], 0
        assert bob.hear() == "* bob joined"
        assert bob.hear() == "* alice joined"
        while len(heard) + missed < sent:
            text = bob.hear()
            if text.startswith("* you missed "):
                missed += int(text.split()[3])
            else:
                heard.append(int(text.split()[1]))
        assert missed > 0, (sent, missed)
        assert heard == sorted(heard)       # in order, with gaps
        assert peak <= 65536 + 32800        # the high mark plus one message
        alice.close()
        bob.close()


# -- Server-Sent Events: sse_clock ----------------------------------------------------------

SSE_ACCEPT = ("Accept", "text/event-stream")
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def dispatches(body):
    """The blocks of an event stream as dicts of field -> value; a comment
    block is {"comment": text}.  (Enough of WHATWG HTML §9.2.6 for these
    tests: the server writes LF line ends and a space after each colon.)"""
    out = []
    for block in body.decode("utf-8").split("\n\n")[:-1]:
        fields = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                fields["comment"] = line[1:]
            else:
                name, _, value = line.partition(": ")
                fields[name] = fields[name] + "\n" + value if name in fields else value
        out.append(fields)
    return out


def clock_stream(port, path, headers=()):
    raw = req(path, headers=[SSE_ACCEPT] + list(headers))
    with connect(port, timeout=3) as s:
        s.sendall(raw)
        return Reader(s).read_response()


def test_sse_clock_ticks_with_ids_then_says_bye_and_ends_the_stream():
    with serve(load("sse_clock").make_app(interval=0.05)) as srv:
        resp = clock_stream(srv.port, "/clock?count=3")
    assert resp.status == 200 and resp.chunked and resp.complete
    assert resp.header("content-type") == b"text/event-stream"
    assert resp.header("cache-control") == b"no-cache"
    assert resp.header("connection") == b"keep-alive"
    ticks = [d for d in dispatches(resp.body) if "comment" not in d]
    assert [t.get("id") for t in ticks] == ["1", "2", "3", None]
    assert all(ISO_UTC.match(t["data"]) for t in ticks[:3]), ticks
    assert ticks[0]["retry"] == "5000" and "retry" not in ticks[1]
    assert ticks[3] == {"event": "bye", "data": "3 ticks"}


def test_sse_clock_counts_on_from_last_event_id():
    with serve(load("sse_clock").make_app(interval=0.05)) as srv:
        resp = clock_stream(srv.port, "/clock?count=2", [("Last-Event-ID", "41")])
        bad = clock_stream(srv.port, "/clock?count=1", [("Last-Event-ID", "x")])
    assert [d.get("id") for d in dispatches(resp.body)] == ["42", "43", None]
    assert dispatches(bad.body)[0]["id"] == "1"


def test_sse_clock_keepalive_comments_between_ticks():
    with serve(load("sse_clock").make_app(interval=0.5, keepalive=0.1)) as srv:
        resp = clock_stream(srv.port, "/clock?count=2")
    items = dispatches(resp.body)
    assert items[0]["id"] == "1" and items[-1]["event"] == "bye"
    comments = [d for d in items if "comment" in d]
    assert 2 <= len(comments) <= 6, items
    assert all(d == {"comment": "keepalive"} for d in comments)
    assert b":keepalive\n\n" in resp.body


@pytest.mark.parametrize("method,path", [("POST", "/clock"), ("GET", "/nowhere")])
def test_sse_clock_declines_with_a_404(method, path):
    raw = req(path, method, [SSE_ACCEPT, ("Content-Length", "0")])
    with serve(load("sse_clock").app) as srv:
        with connect(srv.port, timeout=3) as s:
            s.sendall(raw)
            reader = Reader(s)
            resp = reader.read_response()
            rest = reader.read_all()            # the server closes after a decline
        errors = srv.errors
    assert resp.status == 404 and resp.header("connection") == b"close"
    assert resp.header("content-type") == b"text/plain; charset=utf-8"
    assert resp.body == b"no event stream here: GET /clock\n"
    assert rest == b"" and errors == []


def test_sse_clock_serves_its_page_to_a_plain_request():
    with serve(load("sse_clock").app) as srv:
        page = get(srv.port, "/")
        other = get(srv.port, "/clock")         # no Accept: an http scope
    assert page.status == 200 and page.header("content-type") == b"text/html; charset=utf-8"
    assert b'new EventSource("/clock")' in page.body
    assert other.status == 404


def test_sse_clock_stops_when_the_client_leaves():
    ended = []
    received = []

    def watched(scope, receive, send):
        def recording_receive():
            future = receive()
            future.add_done_callback(lambda f: received.append(f.result()))
            return future
        yield from clock(scope, recording_receive, send)
        ended.append(scope["type"])

    clock = load("sse_clock").make_app(interval=0.05)
    with serve(watched) as srv:
        with connect(srv.port, timeout=3) as s:
            s.sendall(req("/clock", headers=[SSE_ACCEPT]))
            reader = Reader(s)
            reader.read_until(b"id: 2\n")
            # A FIN, the socket still open: for an event stream that is the
            # client leaving, and the clock, waiting in wait_any(sleep,
            # receive()), returns at once.
            s.shutdown(socket.SHUT_WR)
            assert wait_until(lambda: ended, 2)
            assert wait_until(lambda: not srv.server.connections, 2)
        errors = srv.errors
    assert ended == ["sse"] and errors == []
    assert received == [{"type": "sse.request", "body": b"", "more": 0},
                        {"type": "sse.disconnect", "reason": "client_closed"}]


class LaggingTransport:
    """Stands in for pagi.transport: reports a client that lags while it is
    asked about the 2nd and 3rd ticks."""

    def __init__(self):
        self.asked = 0

    def high_water_mark(self):
        return 1000

    def buffered_amount(self):
        self.asked += 1
        return 800 if self.asked in (2, 3) else 0


def test_sse_clock_skips_ticks_while_the_client_lags():
    clock = load("sse_clock").make_app(interval=0.02)

    def lagging(scope, receive, send):
        return clock(dict(scope, **{"pagi.transport": LaggingTransport()}), receive, send)

    with serve(lagging) as srv:
        resp = clock_stream(srv.port, "/clock?count=5")
    assert [d.get("id") for d in dispatches(resp.body)] == ["1", "4", "5", None]
    assert dispatches(resp.body)[-1] == {"event": "bye", "data": "5 ticks"}
