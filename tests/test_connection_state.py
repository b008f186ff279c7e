"""Section 6, `pagi.connection`: is_connected, disconnect_reason, on_disconnect,
on_complete, response_started, response_complete, disconnect_future.

PAGI www spec, "Connection State": exactly one of on_disconnect /
on_complete per request; on abnormal disconnect the order is
is_connected false -> reason set -> disconnect_future resolved ->
on_disconnect callbacks in registration order -> http.disconnect on
receive; a callback registered after the disconnect runs at once; the
standard reason strings ("client_closed", "server_error", ...).

The server runs in a thread of this process, so the application records
what it observes in lists shared with the test.
"""
import threading

import pagi_ref
from conftest import serve
from spec_wire import Reader, connect, exchange
from apputil import body, nodelay, req, respond, start, wait_until

STANDARD_REASONS = {
    "client_closed", "client_timeout", "idle_timeout", "keepalive_timeout", "write_timeout",
    "write_error", "read_error", "protocol_error", "server_shutdown", "server_error",
    "body_too_large", "queue_overflow",
}


def flags(conn):
    return (conn.response_started(), conn.response_complete())


def test_success_fires_on_complete_only_and_flags_progress():
    trace = []
    completed = threading.Event()
    conns = []

    def app(scope, receive, send):
        conn = scope["pagi.connection"]
        conns.append(conn)
        fut = conn.disconnect_future()
        conn.on_disconnect(lambda reason: trace.append(("disconnect", reason)))

        def complete(*args):
            trace.append(("complete", conn.disconnect_reason(), fut.done()))
            completed.set()
        conn.on_complete(complete)
        trace.append(("begin", conn.is_connected(), conn.disconnect_reason()) + flags(conn))
        yield receive()
        yield start(send, 200, [(b"content-type", b"text/plain")])
        trace.append(("after-start",) + flags(conn))
        yield body(send, b"part", more=True)
        trace.append(("after-more",) + flags(conn))
        yield body(send, b"-end")
        trace.append(("after-final",) + flags(conn))

    with serve(app) as srv, connect(srv.port) as s:
        s.sendall(req("/"))
        resp = Reader(s).read_response()
        assert resp.status == 200 and resp.body == b"part-end"
        assert completed.wait(5), trace
        assert wait_until(lambda: ("after-final", True, True) in trace), trace
        conn = conns[0]
        assert conn.disconnect_reason() is None
        assert not conn.disconnect_future().done()
    assert trace[0] == ("begin", True, None, False, False)
    assert ("after-start", True, False) in trace
    assert ("after-more", True, False) in trace
    assert [t for t in trace if t[0] in ("complete", "disconnect")] == [("complete", None, False)]


def test_on_complete_callbacks_in_registration_order():
    order = []
    done = threading.Event()

    def app(scope, receive, send):
        conn = scope["pagi.connection"]
        for i in range(3):
            conn.on_complete(lambda *a, i=i: order.append(i))
        conn.on_complete(lambda *a: done.set())
        yield from respond(send, 200, b"ok")

    with serve(app) as srv:
        assert exchange(srv.port, req("/")).status == 200
        assert done.wait(5)
    assert order == [0, 1, 2]


def test_each_request_has_a_fresh_connection_object():
    seen = []

    def app(scope, receive, send):
        conn = scope["pagi.connection"]
        seen.append((conn, conn.response_started(), conn.response_complete()))
        yield from respond(send, 200, b"ok")

    with serve(app) as srv, connect(srv.port) as s:
        r = Reader(s)
        s.sendall(req("/a") + req("/b"))
        assert r.read_response().status == 200
        assert r.read_response().status == 200
    (c1, s1, d1), (c2, s2, d2) = seen
    assert c1 is not c2
    assert (s1, d1) == (s2, d2) == (False, False)
    assert c1.response_started() and c1.response_complete()


def partial_post():
    return req("/", "POST", [("Content-Length", "100")], b"0123456789")


def test_client_leaving_mid_request_follows_the_spec_order():
    trace = []
    ready = threading.Event()
    finished = threading.Event()

    def app(scope, receive, send):
        if scope["path"] == "/barrier":
            yield from respond(send, 200, b"ok")
            return
        conn = scope["pagi.connection"]
        fut = conn.disconnect_future()
        trace.append(("begin", conn.is_connected(), conn.disconnect_reason()))

        def callback(tag):
            def cb(reason):
                trace.append((tag, reason, conn.is_connected(), conn.disconnect_reason(),
                              fut.done() and fut.result()))
            return cb
        conn.on_disconnect(callback("cb1"))
        conn.on_disconnect(callback("cb2"))
        conn.on_complete(lambda *a: trace.append(("complete",)))
        ready.set()
        while True:
            event = yield receive()
            trace.append(("event", event["type"]))
            if event["type"] == "http.disconnect":
                break
        late = []
        conn.on_disconnect(late.append)
        trace.append(("late", list(late)))
        trace.append(("after", conn.is_connected(), conn.disconnect_reason(),
                      conn.response_started(), fut.result()))
        # Sending after the disconnect is a no-op that does not raise.
        yield start(send, 200, [(b"content-length", b"2")])
        yield body(send, b"ok")
        trace.append(("sent",))
        finished.set()

    with serve(app) as srv:
        s = connect(srv.port)
        s.sendall(partial_post())
        assert ready.wait(5)
        s.close()
        assert finished.wait(5), trace
        # a barrier: the server has handled the end of that task before this answers
        assert exchange(srv.port, req("/barrier")).status == 200
        errors = srv.errors
    cb = [t for t in trace if t[0] in ("cb1", "cb2")]
    assert cb == [("cb1", "client_closed", False, "client_closed", "client_closed"),
                  ("cb2", "client_closed", False, "client_closed", "client_closed")], trace
    assert trace[0] == ("begin", True, None)
    names = [t[0] if t[0] != "event" else t[1] for t in trace]
    assert names.index("cb2") < names.index("http.disconnect"), trace
    assert ("late", ["client_closed"]) in trace, trace
    assert ("after", False, "client_closed", False, "client_closed") in trace, trace
    assert ("sent",) in trace
    assert ("complete",) not in trace
    assert not [e for e in errors if "Traceback" in e], errors


def test_app_waiting_on_disconnect_future_learns_client_closed():
    got = []
    ready = threading.Event()
    done = threading.Event()

    def app(scope, receive, send):
        conn = scope["pagi.connection"]
        ready.set()
        reason = yield conn.disconnect_future()
        got.append((reason, conn.is_connected(), conn.disconnect_reason()))
        done.set()

    with serve(app) as srv:
        s = connect(srv.port)
        s.sendall(partial_post())
        assert ready.wait(5)
        s.close()
        assert done.wait(5), "disconnect_future did not resolve after the client left"
    assert got == [("client_closed", False, "client_closed")]


def test_app_racing_work_against_disconnect_with_wait_any():
    got = []
    ready = threading.Event()
    done = threading.Event()

    def app(scope, receive, send):
        conn = scope["pagi.connection"]
        work = pagi_ref.sleep(30)
        ready.set()
        first = yield pagi_ref.wait_any(work, conn.disconnect_future())
        got.append((first is work, first.result() if first is not work else None,
                    conn.is_connected()))
        done.set()

    with serve(app) as srv:
        s = connect(srv.port)
        s.sendall(partial_post())
        assert ready.wait(5)
        s.close()
        assert done.wait(5)
    assert got == [(False, "client_closed", False)]


def test_client_leaving_during_streamed_response():
    got = []
    done = threading.Event()

    def app(scope, receive, send):
        conn = scope["pagi.connection"]
        conn.on_disconnect(lambda reason: got.append(("cb", reason)))
        conn.on_complete(lambda *a: got.append(("complete",)))
        yield start(send, 200, [(b"content-type", b"text/plain")])
        for _ in range(2000):
            if not conn.is_connected():
                break
            yield body(send, b"x" * 1024, more=True)   # no-op once disconnected, never raises
            yield pagi_ref.sleep(0.002)
        got.append(("loop-ended", conn.is_connected(), conn.disconnect_reason(),
                    conn.response_started(), conn.response_complete()))
        yield body(send, b"")
        done.set()

    with serve(app) as srv:
        s = connect(srv.port)
        s.sendall(req("/"))
        r = Reader(s)
        assert r.read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 200")
        s.close()
        assert done.wait(10), got
    cbs = [g for g in got if g[0] in ("cb", "complete")]
    assert len(cbs) == 1 and cbs[0][0] == "cb", got
    assert cbs[0][1] in ("client_closed", "write_error"), got
    ended = [g for g in got if g[0] == "loop-ended"][0]
    assert ended[1] is False and ended[2] == cbs[0][1] and ended[3] is True, got
    assert not ended[4]


def test_backstop_500_reports_server_error_to_on_disconnect():
    got = []
    fired = threading.Event()

    def app(scope, receive, send):
        conn = scope["pagi.connection"]
        conn.on_disconnect(lambda reason: (got.append(("cb", reason, conn.response_started())),
                                           fired.set()))
        conn.on_complete(lambda *a: (got.append(("complete",)), fired.set()))
        yield receive()
        # ends without a response

    with serve(app) as srv:
        resp = exchange(srv.port, req("/"))
        assert resp.status == 500
        assert fired.wait(5)
    assert got == [("cb", "server_error", True)]


def test_app_exception_reports_server_error_to_on_disconnect():
    got = []
    fired = threading.Event()

    def app(scope, receive, send):
        conn = scope["pagi.connection"]
        conn.on_disconnect(lambda reason: (got.append(reason), fired.set()))
        conn.on_complete(lambda *a: (got.append("complete"), fired.set()))
        yield receive()
        raise RuntimeError("deliberate failure for the connection-state test")

    with serve(app) as srv:
        resp = exchange(srv.port, req("/"))
        assert resp.status == 500
        assert fired.wait(5)
    assert got == ["server_error"]


def test_reasons_are_standard_strings():
    # disconnect_reason on a request the client abandoned before its body ended
    got = []
    done = threading.Event()

    def app(scope, receive, send):
        conn = scope["pagi.connection"]
        while True:
            event = yield receive()
            if event["type"] == "http.disconnect":
                break
        got.append(conn.disconnect_reason())
        done.set()

    with serve(app) as srv:
        s = connect(srv.port)
        nodelay(s)
        s.sendall(req("/", "POST", [("Transfer-Encoding", "chunked")], b"5\r\nhello\r\n"))
        s.close()
        assert done.wait(5)
    assert got[0] in STANDARD_REASONS and got[0] == "client_closed"


def test_is_connected_false_for_every_request_once_the_connection_closed():
    # Spec: is_connected() "returns true while the connection is open, false
    # once it has closed (for any reason)" -- also for an earlier request of
    # a keep-alive connection whose object the application still holds.
    conns = []

    def app(scope, receive, send):
        conns.append(scope["pagi.connection"])
        yield from respond(send, 200, b"ok")

    with serve(app) as srv:
        with connect(srv.port) as s:
            r = Reader(s)
            s.sendall(req("/1") + req("/2") + req("/3"))
            for _ in range(3):
                assert r.read_response().status == 200
        assert wait_until(lambda: not conns[-1].is_connected()), "the server never saw the close"
    assert [c.is_connected() for c in conns] == [False, False, False]
    assert [c.disconnect_reason() for c in conns] == [None, None, None]
