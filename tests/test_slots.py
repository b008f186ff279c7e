"""Slots (issue 9, items 4 and 5 and finding 6): clients that cannot hold
every slot.

- Minimum data rates (sections 1 and 6): a request head or body that
  arrives slower than --header-min-rate / --body-min-rate after its grace
  period is answered 408 and closed, and its slot serves someone else; a
  slow client above the rate is not cut; the body's clock stops while the
  server is not reading (backpressure, or no 100 Continue yet).
- Eviction before refusal (section 10): at --max-connections the oldest
  idle keep-alive connection is closed to admit a new one; 503 only when
  every slot is busy.
- Descriptors (section 10): lingering sockets count against the limit and
  refused ones against a small reserve, so a server under a lowered
  RLIMIT_NOFILE never runs out of descriptors below its admission limit.

Every client is a raw socket on 127.0.0.1.  The tricklers necessarily take
time: each sends one piece per interval in a bounded loop and stops at the
event it waits for (the server's answer, or its close), never at a clock.
"""
import os
import resource
import select
import socket
import threading

import pytest

import pagi_ref
from apputil import ServerProcess, req, respond, wait_until
from conftest import serve
from spec_wire import Reader, connect


class Recorder:
    def __init__(self):
        self.reasons = []        # (path, reason) from on_disconnect
        self.holds = []          # Futures /hold waits on; the test resolves them
        self.bodies = []         # (path, bytes read, or None when the client left)

    def reasons_for(self, path):
        return [r for p, r in self.reasons if p == path]


def make_app(rec):
    def app(scope, receive, send):
        if scope["type"] != "http":
            return
        path = scope["path"]
        scope["pagi.connection"].on_disconnect(lambda reason: rec.reasons.append((path, reason)))
        if path == "/body":
            # ?wait=S: the application sleeps S seconds before it reads.
            query = scope["query_string"]
            if query.startswith(b"wait="):
                yield pagi_ref.sleep(float(query[5:]))
            size = 0
            while True:
                event = yield receive()
                if event["type"] == "http.disconnect":
                    rec.bodies.append((path, None))
                    return
                size += len(event["body"])
                if not event["more"]:
                    break
            rec.bodies.append((path, size))
            yield from respond(send, 200, b"got %d" % size)
        elif path == "/hold":
            hold = pagi_ref.Future()
            rec.holds.append(hold)
            yield hold
            yield from respond(send, 200, b"released")
        else:
            yield from respond(send, 200, b"hello")
    return app


def trickle(sock, pieces, interval, limit=400):
    """Send the pieces one per ``interval`` seconds until the server says
    something or closes; return all it sends until it closes.  Bounded:
    ``limit`` pieces at most."""
    for i, piece in enumerate(pieces):
        if i >= limit:
            raise AssertionError("the server neither answered nor closed after %d pieces" % i)
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            break
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            break
    return read_to_eof(sock)


def read_to_eof(sock, timeout=10):
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data


def bytes_forever(piece):
    while True:
        yield piece


def chunks_of(data, size):
    return [data[i:i + size] for i in range(0, len(data), size)]


def get_ok(port):
    with connect(port) as s:
        s.sendall(req("/", headers=[("Connection", "close")]))
        return Reader(s).read_response().status


# ============================================================================
# Minimum data rates
# ============================================================================

def test_a_trickling_body_gets_408_and_its_slot_serves_a_normal_client():
    rec = Recorder()
    with serve(make_app(rec), max_connections=1, body_grace=0.5, body_min_rate=100,
               client_timeout=60) as srv, connect(srv.port) as slow:
        slow.sendall(req("/body", method="POST", headers=[("Content-Length", "100000")]))
        # One byte every 50 ms: 20 bytes/s, a fifth of the minimum.
        got = trickle(slow, bytes_forever(b"x"), 0.05)
        assert got.startswith(b"HTTP/1.1 408 "), got[:100]
        assert b"\r\nconnection: close\r\n" in got.lower()
        assert wait_until(lambda: rec.bodies)
        assert rec.bodies == [("/body", None)]           # receive() got http.disconnect
        assert rec.reasons_for("/body") == ["client_timeout"]
        # The only slot is free again: a normal client is served.
        assert get_ok(srv.port) == 200
        assert not srv.errors, srv.errors


def test_a_trickling_head_gets_408_and_its_slot_serves_a_normal_client():
    with serve(make_app(Recorder()), max_connections=1, header_grace=0.5,
               header_min_rate=100, header_timeout=60) as srv, connect(srv.port) as slow:
        slow.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        got = trickle(slow, bytes_forever(b"a"), 0.05)
        assert got.startswith(b"HTTP/1.1 408 "), got[:100]
        assert get_ok(srv.port) == 200


def test_a_slow_client_above_the_minimum_rates_is_not_cut():
    # 10 bytes every 50 ms (200 bytes/s) for the head and for the body,
    # ten times the minimum of 20 bytes/s, long past both grace periods.
    rec = Recorder()
    body = b"y" * 300
    head = req("/body", method="POST", headers=[("Content-Length", str(len(body))),
                                                 ("X-Pad", "p" * 100),
                                                 ("Connection", "close")])
    with serve(make_app(rec), header_grace=0.5, header_min_rate=20, body_grace=0.5,
               body_min_rate=20, header_timeout=60) as srv, connect(srv.port) as s:
        got = trickle(s, chunks_of(head + body, 10) + [b""] * 100, 0.05)
        assert got.startswith(b"HTTP/1.1 200 "), got[:100]
        assert got.endswith(b"got 300")
        assert rec.reasons == []


def test_the_body_clock_stops_while_reading_is_paused_by_backpressure():
    # The application sleeps 1.5 s before reading; one queued event fills
    # --max-receive-queue, so the server stops reading.  The client, blocked
    # by TCP meanwhile, is not the slow one: its body is read in full.
    rec = Recorder()
    size = 1024 * 1024
    with serve(make_app(rec), max_receive_queue=1, body_grace=0.2,
               body_min_rate=200000) as srv, connect(srv.port) as s:
        s.sendall(req("/body?wait=1.5", method="POST",
                      headers=[("Content-Length", str(size)), ("Connection", "close")]))
        sender = threading.Thread(target=lambda: s.sendall(b"z" * size), daemon=True)
        sender.start()
        got = read_to_eof(s)
        sender.join(10)
        assert got.startswith(b"HTTP/1.1 200 "), got[:100]
        assert got.endswith(b"got %d" % size)
        assert rec.reasons == []


def test_the_body_clock_starts_when_100_continue_is_sent():
    # RFC 9110 §10.1.1: the client waits for the 100 before sending; the
    # application asks for the body only after 1.5 s, far past the grace.
    rec = Recorder()
    with serve(make_app(rec), body_grace=0.5, body_min_rate=100) as srv, \
            connect(srv.port) as s:
        s.sendall(req("/body?wait=1.5", method="POST",
                      headers=[("Content-Length", "5"), ("Expect", "100-continue")]))
        r = Reader(s)
        interim = r.read_until(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        s.sendall(b"hello")
        resp = r.read_response()
        assert resp.status == 200 and resp.body == b"got 5"


def test_min_rate_options_are_validated_and_on_the_command_line():
    assert pagi_ref.Config().header_min_rate == 500
    assert pagi_ref.Config().body_min_rate == 500
    with pytest.raises(pagi_ref.ConfigError, match="body_min_rate"):
        pagi_ref.Config(body_min_rate=-1)
    with pytest.raises(pagi_ref.ConfigError, match="header_grace"):
        pagi_ref.Config(header_grace=-0.5)
    args = pagi_ref._argument_parser().parse_args(
        ["m:app", "--header-grace", "2", "--header-min-rate", "100",
         "--body-grace", "3", "--body-min-rate", "0"])
    assert (args.header_grace, args.header_min_rate, args.body_grace,
            args.body_min_rate) == (2.0, 100, 3.0, 0)


# ============================================================================
# Eviction before refusal
# ============================================================================

def test_at_the_limit_the_oldest_idle_keepalive_connection_makes_room():
    with serve(make_app(Recorder()), max_connections=3, keepalive_timeout=60) as srv:
        clients = [connect(srv.port) for _ in range(3)]
        try:
            readers = [Reader(c) for c in clients]
            for c, r in zip(clients, readers):      # served in order: clients[0] idles first
                c.sendall(req("/"))
                assert r.read_response().status == 200
            with connect(srv.port) as newcomer:
                newcomer.sendall(req("/"))
                resp = Reader(newcomer).read_response()
                assert resp.status == 200, resp
            # The oldest idle connection was closed, silently (RFC 9112 §9.6).
            assert read_to_eof(clients[0]) == b""
            for c, r in zip(clients[1:], readers[1:]):
                c.sendall(req("/again"))
                assert r.read_response().status == 200
        finally:
            for c in clients:
                c.close()
        assert not srv.errors, srv.errors


def test_at_the_limit_with_every_slot_busy_a_new_client_gets_503_then_idle_ones_make_room():
    rec = Recorder()
    with serve(make_app(rec), max_connections=2, keepalive_timeout=60) as srv:
        busy = [connect(srv.port) for _ in range(2)]
        try:
            for c in busy:
                c.sendall(req("/hold"))
            assert wait_until(lambda: len(rec.holds) == 2)
            with connect(srv.port) as refused:
                refused.sendall(req("/"))
                r = Reader(refused)
                resp = r.read_response()
                assert resp.status == 503
                assert resp.header("retry-after") == b"5"
                assert resp.header("connection").lower() == b"close"
                assert r.read_all() == b""
            for hold in rec.holds:
                srv.server.loop.call_soon_threadsafe(hold.set_result, None)
            readers = [Reader(c) for c in busy]
            for r in readers:
                assert r.read_response().status == 200
            # Both are idle now: the next newcomer is admitted.
            assert get_ok(srv.port) == 200
        finally:
            for c in busy:
                c.close()


# ============================================================================
# Descriptors: lingering and refused sockets are counted
# ============================================================================

def _limit_nofile(n):
    def preexec():
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    return preexec


def _fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def test_sequential_connection_close_requests_never_exhaust_descriptors():
    # Under RLIMIT_NOFILE 64 (max-connections then defaults to 32), 200
    # sequential requests with Connection: close from clients that keep
    # their socket open after the response: every closed connection lingers
    # (RFC 9112 §9.6), and the lingering sockets must stay within the slots.
    server = ServerProcess(["pagi_ref.py", "pagi_ref:_demo_app", "--port", "0",
                            "--lifespan", "off"], preexec_fn=_limit_nofile(64))
    kept = []
    try:
        _host, port = server.wait_listening()
        most = 0
        for i in range(200):
            s = connect(port)
            kept.append(s)
            s.sendall(req("/", headers=[("Connection", "close")]))
            resp = Reader(s).read_response()
            assert resp.status == 200, (i, resp)
            most = max(most, _fd_count(server.p.pid))
        assert most < 64, most
        assert not [l for l in server.stderr if "accept() failed" in l], server.stderr
    finally:
        for s in kept:
            s.close()
        server.close()


def test_a_burst_of_refusals_never_exhausts_descriptors():
    # Every slot busy under RLIMIT_NOFILE 64: 100 more clients connect at
    # once, and each gets its 503 while the server's descriptors stay
    # under the limit.
    server = ServerProcess(["pagi_ref.py", "pagi_ref:_demo_app", "--port", "0",
                            "--lifespan", "off", "--max-connections", "32",
                            "--header-timeout", "60"], preexec_fn=_limit_nofile(64))
    held, burst = [], []
    try:
        _host, port = server.wait_listening()
        for _ in range(32):
            s = connect(port)
            s.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n")    # a head in progress: busy
            held.append(s)
        for _ in range(100):
            s = connect(port)
            s.sendall(req("/"))
            burst.append(s)
        most = 0
        for s in burst:
            resp = Reader(s).read_response()
            assert resp.status == 503 and resp.header("retry-after") == b"5", resp
            most = max(most, _fd_count(server.p.pid))
            s.close()
        assert most < 64, most
        assert not [l for l in server.stderr if "accept() failed" in l], server.stderr
    finally:
        for s in held + burst:
            s.close()
        server.close()


def test_a_connection_whose_next_head_has_begun_is_not_idle():
    # A and B are idle, A the older; A starts its next request (one byte):
    # the newcomer's room is made by closing B, and A's request is served.
    with serve(make_app(Recorder()), max_connections=2, keepalive_timeout=60) as srv, \
            connect(srv.port) as a, connect(srv.port) as b:
        ra, rb = Reader(a), Reader(b)
        for c, r in ((a, ra), (b, rb)):
            c.sendall(req("/"))
            assert r.read_response().status == 200
        assert wait_until(lambda: len(srv.server.idle) == 2)
        a.sendall(b"G")
        assert wait_until(lambda: len(srv.server.idle) == 1)
        assert get_ok(srv.port) == 200
        assert read_to_eof(b) == b""
        a.sendall(req("/")[1:])
        assert ra.read_response().status == 200


def _tcp_pair(listener):
    client = socket.create_connection(listener.getsockname()[:2])
    server_side, address = listener.accept()
    server_side.setblocking(False)
    return client, server_side, address


def test_eviction_leaves_a_connection_whose_request_waits_unread_in_the_kernel():
    # The loop has not read it yet, but the bytes are there: evict() peeks
    # (MSG_PEEK) and finds the connection busy.  Driven by hand: a Server
    # that is not serving, real sockets.
    server = pagi_ref.Server(make_app(Recorder()),
                             pagi_ref.Config(port=0, max_connections=2, lifespan="off"))
    server.bind()
    listener = server.listeners[0].sock
    listener.setblocking(True)
    pairs = []
    try:
        conns = []
        for _ in range(2):
            client, side, address = _tcp_pair(listener)
            pairs.append((client, side))
            conn = pagi_ref.HTTPConnection(server, side, address)
            server.connections.add(conn)
            server.idle[conn] = None
            conns.append(conn)
        older, younger = conns
        pairs[0][0].sendall(b"GET / HTTP/1.1\r\n")
        assert select.select([pairs[0][1]], [], [], 5)[0]
        assert server._make_room() is True
        assert not older.closed and younger.closed
        assert server._make_room() is False          # nothing idle is left
        assert read_to_eof(pairs[1][0]) == b""       # the younger one's client sees the close
    finally:
        for client, _side in pairs:
            client.close()
        server.close()
