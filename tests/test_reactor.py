"""Sections 2 and 3: the reactor, Futures and Tasks, driven deterministically.

The loop takes its clock as a parameter, so timer order is checked with a
fake clock, and ordering everywhere with a recorded trace, never sleep().
"""
import gc
import threading

import pytest

import pagi_ref
from pagi_ref import CancelledError, Future, Loop, Task


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def run_until(loop, predicate, turns=1000):
    """Run loop turns until predicate() holds (no real waiting)."""
    for _ in range(turns):
        if predicate():
            return
        loop._run_once()
    raise AssertionError("condition not reached in %d turns" % turns)


def test_timers_fire_in_time_order_and_cancel():
    clock = FakeClock()
    loop = Loop(clock=clock)
    trace = []
    loop.call_later(2.0, trace.append, "b")
    loop.call_later(1.0, trace.append, "a")
    loop.call_later(1.0, trace.append, "a2")     # equal times keep their order
    cancelled = loop.call_later(1.5, trace.append, "never")
    cancelled.cancel()
    clock.now += 1.0
    loop._run_once()
    assert trace == ["a", "a2"]
    clock.now += 1.0
    loop._run_once()
    assert trace == ["a", "a2", "b"]
    loop.close()


def test_ready_callbacks_scheduled_during_a_turn_wait_for_the_next():
    loop = Loop()
    trace = []

    def first():
        trace.append(1)
        loop.call_soon(trace.append, 2)
    loop.call_soon(first)
    loop._run_once()
    assert trace == [1]
    loop._run_once()
    assert trace == [1, 2]
    loop.close()


def test_call_soon_threadsafe_wakes_a_blocked_loop():
    loop = Loop()
    got = []
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    loop.call_soon_threadsafe(got.append, "from another thread")
    loop.stop()
    thread.join(5)
    assert not thread.is_alive()
    assert got == ["from another thread"]
    loop.close()


def test_a_failing_callback_is_logged_and_the_loop_goes_on(caplog):
    loop = Loop()
    trace = []

    def boom():
        raise RuntimeError("boom")
    loop.call_soon(boom)
    loop.call_soon(trace.append, "after")
    with caplog.at_level("ERROR", logger="pagi_ref"):
        loop._run_once()
    assert trace == ["after"]
    assert "boom" in caplog.text
    loop.close()


def test_get_loop_finds_the_loop_of_this_thread_only():
    with pytest.raises(RuntimeError):
        pagi_ref.get_loop()
    loop = Loop()
    seen = []
    loop.call_soon(lambda: seen.append(pagi_ref.get_loop()))
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert seen == [loop]
    with pytest.raises(RuntimeError):
        pagi_ref.get_loop()
    loop.close()


def test_future_result_exception_cancel_and_callbacks():
    loop = Loop()
    f = Future(loop)
    trace = []
    f.add_done_callback(lambda fut: trace.append(fut.result()))
    assert not f.done()
    with pytest.raises(RuntimeError):
        f.result()
    f.set_result(42)
    assert trace == []            # callbacks run through the loop, not inline
    loop._run_once()
    assert trace == [42]
    with pytest.raises(RuntimeError):
        f.set_result(1)
    g = Future(loop)
    g.set_exception(ValueError("bad"))
    with pytest.raises(ValueError):
        g.result()
    h = Future(loop)
    assert h.cancel() and h.cancelled()
    with pytest.raises(CancelledError):
        h.result()
    loop.close()


def drive(loop, coro):
    task = Task(coro, loop)
    run_until(loop, task.done)
    return task


def test_task_drives_generators_and_coroutines_alike():
    loop = Loop()

    def gen():
        f = Future(loop)
        loop.call_soon(f.set_result, "g")
        value = yield f
        return value * 2

    async def coro():
        f = Future(loop)
        loop.call_soon(f.set_result, "c")
        value = await f
        return value * 3

    assert drive(loop, gen()).result() == "gg"
    assert drive(loop, coro()).result() == "ccc"
    loop.close()


def test_exception_of_a_yielded_future_is_raised_at_the_yield():
    loop = Loop()

    def gen():
        f = Future(loop)
        loop.call_soon(f.set_exception, KeyError("k"))
        try:
            yield f
        except KeyError:
            return "caught"

    assert drive(loop, gen()).result() == "caught"
    loop.close()


def test_yielding_something_else_raises_type_error_in_the_task():
    loop = Loop()

    def gen():
        try:
            yield 5
        except TypeError as exc:
            return str(exc)

    assert "only yield a Future" in drive(loop, gen()).result()
    loop.close()


def test_done_futures_resume_inline_but_only_for_a_bounded_run():
    """Fairness: a task that never waits gives the loop back after
    MAX_INLINE_STEPS resumptions, so another task interleaves."""
    loop = Loop()
    trace = []

    def busy(name, steps):
        for _ in range(steps):
            trace.append(name)
            done = Future(loop)
            done.set_result(None)
            yield done

    steps = pagi_ref.MAX_INLINE_STEPS * 3
    a = Task(busy("a", steps), loop)
    # The first run happened inline, at creation, and stopped at the budget.
    assert trace.count("a") == pagi_ref.MAX_INLINE_STEPS + 1
    b = Task(busy("b", steps), loop)
    run_until(loop, lambda: a.done() and b.done())
    # After their first runs, the two tasks alternate in bounded slices.
    first_b = trace.index("b")
    assert first_b == pagi_ref.MAX_INLINE_STEPS + 1
    assert "a" in trace[first_b:first_b + 2 * pagi_ref.MAX_INLINE_STEPS + 2]
    loop.close()


def test_cancel_throws_cancelled_error_at_the_yield():
    loop = Loop()
    trace = []

    def gen():
        try:
            yield Future(loop)
        except CancelledError:
            trace.append("cancelled")
            raise

    task = Task(gen(), loop)
    assert task.cancel()
    run_until(loop, task.done)
    assert trace == ["cancelled"]
    assert task.cancelled()
    with pytest.raises(CancelledError):
        task.result()
    loop.close()


def test_sleep_spawn_wait_any_wait_all_on_a_real_loop():
    loop = Loop()
    out = {}

    def child(value, delay):
        yield pagi_ref.sleep(delay)
        return value

    def main():
        first = yield pagi_ref.wait_any(child("slow", 0.2), child("fast", 0.01))
        out["any"] = first.result()
        out["all"] = yield pagi_ref.wait_all(child(1, 0.01), child(2, 0.0))
        out["thread"] = yield pagi_ref.to_thread(lambda: threading.current_thread().name)
        task = pagi_ref.spawn(child("spawned", 0.0))
        out["spawn"] = yield task
        loop.stop()

    loop.call_soon(lambda: Task(main(), loop))
    loop.run_forever()
    assert out == {"any": "fast", "all": [1, 2], "thread": "pagi_ref.to_thread_0",
                   "spawn": "spawned"}
    loop.close()


def test_wait_all_fails_with_the_first_exception():
    loop = Loop()
    out = []

    def bad():
        yield pagi_ref.sleep(0)
        raise ValueError("nope")

    def main():
        try:
            yield pagi_ref.wait_all(pagi_ref.sleep(0.01), bad())
        except ValueError as exc:
            out.append(str(exc))
        loop.stop()

    loop.call_soon(lambda: Task(main(), loop))
    loop.run_forever()
    assert out == ["nope"]
    loop.close()


def test_config_rejects_low_above_high_with_both_values():
    with pytest.raises(pagi_ref.ConfigError) as info:
        pagi_ref.Config(write_high_watermark=1000, write_low_watermark=2000)
    assert "2000" in str(info.value) and "1000" in str(info.value)
    with pytest.raises(pagi_ref.ConfigError):
        pagi_ref.Config(no_such_field=1)
    with pytest.raises(pagi_ref.ConfigError):
        pagi_ref.Config(max_header_size=-1)


def test_a_failed_task_nobody_awaited_is_reported_once_collected(caplog):
    loop = Loop()

    def fails():
        f = Future(loop)
        loop.call_soon(f.set_result, None)
        yield f
        raise ValueError("lost")

    task = Task(fails(), loop)
    run_until(loop, task.done)
    del task                       # collected: the report is queued on the loop
    gc.collect()
    loop.call_soon(lambda: None)   # so the turn below never blocks
    with caplog.at_level("ERROR", logger="pagi_ref"):
        loop._run_once()
    assert "never retrieved" in caplog.text and "ValueError: lost" in caplog.text
    loop.close()


def test_to_thread_runs_in_a_bounded_pool():
    loop = Loop()
    names = set()

    def main():
        results = yield pagi_ref.wait_all(*[pagi_ref.to_thread(
            lambda: threading.current_thread().name) for _ in range(100)])
        names.update(results)
        loop.stop()

    loop.call_soon(lambda: Task(main(), loop))
    loop.run_forever()
    assert names and all(n.startswith("pagi_ref.to_thread") for n in names)
    assert len(names) <= loop.executor()._max_workers
    loop.close()


def test_cancelled_timers_do_not_pile_up():
    """A server that sets and cancels long timeouts all day keeps a small heap."""
    loop = Loop()
    for _ in range(20000):
        loop.call_later(3600, lambda: None).cancel()
    live = loop.call_later(3600, lambda: None)
    assert len(loop._timers) <= 2 * pagi_ref._TIMER_SWEEP
    assert live in loop._timers
    loop.close()


# -- signals and the slow-callback warning (section 2) -----------------------------

def test_a_signal_handler_only_queues_its_callback_for_the_loop():
    import os
    import signal
    loop = Loop()
    trace = []
    try:
        loop.add_signal_handler(signal.SIGUSR1, lambda signum: trace.append(("cb", signum)))
        os.kill(os.getpid(), signal.SIGUSR1)     # the handler runs at once, in this thread
        trace.append("after kill")
        # The callback waits for the loop: it runs in the next turn, not
        # in the middle of whatever the main thread was doing.
        assert trace == ["after kill"]
        run_until(loop, lambda: len(trace) == 2)
        assert trace == ["after kill", ("cb", signal.SIGUSR1)]
    finally:
        loop.remove_signal_handlers()
        loop.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


class _Blamed:
    def __init__(self, clock, name):
        self.clock = clock
        self.name = name

    def loop_context(self):
        return self.name

    def work(self, seconds):
        self.clock.now += seconds


def test_a_callback_over_slow_callback_is_named_in_a_warning():
    import logging
    clock = FakeClock()
    records = []

    class Handler(logging.Handler):
        def emit(self, record):
            records.append((record.levelname, record.getMessage()))

    log = logging.getLogger("pagi_ref.test.reactor.slow")
    log.propagate = False
    handler = Handler()
    log.addHandler(handler)
    loop = Loop(clock=clock, logger=log, slow_callback=0.5)
    try:
        loop.call_soon(_Blamed(clock, "http GET /fast").work, 0.5)   # at the threshold: fine
        loop.call_soon(_Blamed(clock, "http GET /slow").work, 0.75)
        loop.call_soon(_Blamed(clock, "task spawned").work, 0.0)
        loop._run_once()
    finally:
        log.removeHandler(handler)
        loop.close()
    assert records == [("WARNING", "the loop was blocked for 0.750 s by http GET /slow: every "
                        "connection of this process waited (slow_callback 0.500 s)")]


def test_slow_callback_0_times_nothing():
    clock = FakeClock()
    loop = Loop(clock=clock, slow_callback=0)
    reads = []
    real = loop._clock
    loop._clock = lambda: reads.append(1) or real()
    try:
        for _ in range(10):
            loop.call_soon(lambda: None)
        loop._run_once()
    finally:
        loop.close()
    assert len(reads) == 1      # once per turn, none per callback
