"""Section 3, futures and tasks, exercised through real requests: sleep, spawn,
wait_any, wait_all, to_thread, `async def` applications, `yield from`
composition, and a failed Future raising its exception at the yield.
"""
import threading
import time

import pagi_ref
from conftest import serve
from spec_wire import exchange
from apputil import read_body, req, respond


def run(app, raw=None):
    with serve(app) as srv:
        resp = exchange(srv.port, raw or req("/", headers=[("Connection", "close")]))
        return resp, srv.errors


def test_sleep_suspends_for_about_the_given_time():
    def app(scope, receive, send):
        t0 = time.monotonic()
        result = yield pagi_ref.sleep(0.05)
        elapsed = time.monotonic() - t0
        yield from respond(send, 200, b"%r %d" % (result, elapsed >= 0.045))

    resp, _ = run(app)
    assert resp.status == 200 and resp.body == b"None 1"


def test_spawn_generator_and_coroutine_and_await_the_task():
    def child(n):
        yield pagi_ref.sleep(0.001)
        return n * 2

    async def coro_child(n):
        await pagi_ref.sleep(0.001)
        return n + 100

    def app(scope, receive, send):
        t1 = pagi_ref.spawn(child(21))
        t2 = pagi_ref.spawn(coro_child(1))
        assert isinstance(t1, pagi_ref.Future)
        a = yield t1
        b = yield t2
        yield from respond(send, 200, b"%d %d %d" % (a, b, t1.result()))

    resp, _ = run(app)
    assert resp.status == 200 and resp.body == b"42 101 42"


def test_spawned_tasks_run_concurrently_with_the_app():
    trace = []

    def ticker(name, gate):
        trace.append(name + "-start")
        yield gate                      # a Future resolved by the other side
        trace.append(name + "-end")
        return name

    def app(scope, receive, send):
        gate = pagi_ref.to_thread(lambda: "open")
        t = pagi_ref.spawn(ticker("child", gate))
        trace.append("parent-continues")
        yield gate
        name = yield t
        trace.append("parent-joined")
        yield from respond(send, 200, name.encode())

    resp, _ = run(app)
    assert resp.body == b"child"
    assert trace.index("child-start") < trace.index("child-end") < trace.index("parent-joined")
    assert "parent-continues" in trace


def test_spawned_task_exception_raises_at_the_yield():
    def failing():
        yield pagi_ref.sleep(0.001)
        raise LookupError("child failed")

    def app(scope, receive, send):
        try:
            yield pagi_ref.spawn(failing())
        except LookupError as exc:
            msg = "caught:%s" % exc
        yield from respond(send, 200, msg.encode())

    resp, _ = run(app)
    assert resp.status == 200 and resp.body == b"caught:child failed"


def test_wait_any_resolves_to_the_first_done_future():
    def app(scope, receive, send):
        fast = pagi_ref.sleep(0.01)
        slow = pagi_ref.sleep(30)
        t0 = time.monotonic()
        first = yield pagi_ref.wait_any(slow, fast)
        elapsed = time.monotonic() - t0
        yield from respond(send, 200, b"%d %d %d" % (first is fast, first is slow, elapsed < 5))

    resp, _ = run(app)
    assert resp.body == b"1 0 1"


def test_wait_all_resolves_to_the_list_of_results_in_order():
    def child(value, delay):
        yield pagi_ref.sleep(delay)
        return value

    def app(scope, receive, send):
        results = yield pagi_ref.wait_all(pagi_ref.spawn(child("a", 0.03)),
                                          pagi_ref.spawn(child("b", 0.001)),
                                          pagi_ref.to_thread(lambda: "c"))
        yield from respond(send, 200, repr(list(results)).encode())

    resp, _ = run(app)
    assert resp.body == b"['a', 'b', 'c']"


def test_to_thread_runs_elsewhere_and_hands_the_result_back():
    def app(scope, receive, send):
        loop_thread = threading.get_ident()
        worker_thread, value = yield pagi_ref.to_thread(
            lambda x, y: (threading.get_ident(), x + y), 40, 2)
        after = threading.get_ident()
        yield from respond(send, 200, b"%d %d %d" % (
            worker_thread != loop_thread, value, after == loop_thread))

    resp, _ = run(app)
    assert resp.body == b"1 42 1"


def test_to_thread_exception_raises_at_the_yield():
    def boom():
        raise ZeroDivisionError("in the worker")

    def app(scope, receive, send):
        try:
            yield pagi_ref.to_thread(boom)
            msg = b"no exception"
        except ZeroDivisionError as exc:
            msg = b"caught:" + str(exc).encode()
        yield from respond(send, 200, msg)

    resp, _ = run(app)
    assert resp.body == b"caught:in the worker"


def test_async_def_application():
    async def app(scope, receive, send):
        event = await receive()
        await pagi_ref.sleep(0.001)
        value = await pagi_ref.to_thread(lambda: b"thread")
        child = pagi_ref.spawn(helper())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": event["body"] + b"|", "more": 1})
        await send({"type": "http.response.body", "body": value + b"|" + (await child)})

    async def helper():
        await pagi_ref.sleep(0.001)
        return b"child"

    resp, _ = run(app, req("/", "POST", [("Content-Length", "4"), ("Connection", "close")], b"body"))
    assert resp.status == 200 and resp.body == b"body|thread|child"


def test_async_app_event_error_raises_at_the_await():
    async def app(scope, receive, send):
        try:
            await send({"type": "http.response.start", "status": "200"})
        except pagi_ref.EventError as exc:
            msg = str(exc)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": msg.encode()})

    resp, _ = run(app)
    assert resp.status == 200 and b"status" in resp.body


def test_yield_from_composition():
    def read_json_like(receive):
        data = yield from read_body(receive)
        return data.upper()

    def app(scope, receive, send):
        data = yield from read_json_like(receive)
        yield from respond(send, 200, data)

    resp, _ = run(app, req("/", "POST", [("Content-Length", "3"), ("Connection", "close")], b"abc"))
    assert resp.body == b"ABC"


def test_many_immediately_done_futures_do_not_recurse_or_hang():
    def app(scope, receive, send):
        total = 0
        for i in range(5000):
            done = pagi_ref.Future()
            done.set_result(1)
            total += yield done                      # already done: resumes at once
            if i % 1000 == 0:
                total += (yield pagi_ref.to_thread(int, 0))
        yield from respond(send, 200, b"%d" % total)

    resp, _ = run(app)
    assert resp.status == 200 and resp.body == b"5000"


def test_yielding_a_non_future_is_an_application_error():
    def app(scope, receive, send):
        yield 42
        yield from respond(send, 200, b"should not get here")

    resp, errors = run(app)
    assert resp.status == 500


def test_two_servers_in_threads_share_nothing():
    def one(scope, receive, send):
        yield pagi_ref.sleep(0.01)
        yield from respond(send, 200, b"one")

    async def two(scope, receive, send):
        await pagi_ref.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"two"})

    results = {}
    with serve(one) as a, serve(two) as b:
        def hit(name, port):
            results[name] = exchange(port, req("/", headers=[("Connection", "close")])).body

        threads = [threading.Thread(target=hit, args=(n, p)) for n, p in
                   [("a1", a.port), ("b1", b.port), ("a2", a.port), ("b2", b.port)]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert results == {"a1": b"one", "a2": b"one", "b1": b"two", "b2": b"two"}


def test_helpers_outside_a_loop_thread_fail_clearly():
    # sleep() finds the loop running in its thread, as asyncio does; a plain
    # thread has none, and the helper says so instead of using another loop.
    def in_worker():
        try:
            pagi_ref.sleep(0.01)
        except RuntimeError as exc:
            return "RuntimeError:" + str(exc)
        return "no error"

    def app(scope, receive, send):
        text = yield pagi_ref.to_thread(in_worker)
        yield from respond(send, 200, text.encode())

    resp, _ = run(app)
    assert resp.body.startswith(b"RuntimeError:"), resp.body
