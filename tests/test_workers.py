"""Section 11, the pre-fork workers: real processes, real signals.

Which worker answers a connection is the kernel's choice, so the tests
observe the workers through their lifespan (each records its start and its
shutdown in a file) and through what clients see on the wire.
"""
import os
import signal
import textwrap
import time

import pytest

from apputil import ServerProcess, req
from spec_wire import exchange

APP = textwrap.dedent('''
    import os

    def app(scope, receive, send):
        if scope["type"] == "lifespan":
            event = yield receive()
            pagi = scope["pagi"]
            if os.environ.get("REFUSE") == str(pagi.get("worker_num")):
                yield send({"type": "lifespan.startup.failed", "message": "no"})
                return
            with open(os.environ["JOURNAL"], "a") as f:
                f.write("start %s %s %d\\n" % (pagi["is_worker"], pagi["worker_num"], os.getpid()))
            scope["state"]["worker"] = pagi["worker_num"]
            yield send({"type": "lifespan.startup.complete"})
            event = yield receive()
            with open(os.environ["JOURNAL"], "a") as f:
                f.write("stop %s %d\\n" % (pagi["worker_num"], os.getpid()))
            yield send({"type": "lifespan.shutdown.complete"})
            return
        body = b"%d %d" % (os.getpid(), scope["state"]["worker"])
        yield send({"type": "http.response.start", "status": 200, "headers": []})
        yield send({"type": "http.response.body", "body": body})
''')


@pytest.fixture
def app_file(tmp_path):
    path = tmp_path / "workerapp.py"
    path.write_text(APP)
    return str(path)


def journal_lines(path):
    try:
        with open(path) as f:
            return f.read().split("\n")[:-1]
    except FileNotFoundError:
        return []


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)   # poll interval of a bounded wait, not a proof
    return predicate()


def get(port):
    return exchange(port, req("/", headers=[("Connection", "close")]))


def test_each_worker_runs_its_own_lifespan_and_all_serve(app_file, tmp_path):
    journal = str(tmp_path / "journal")
    with ServerProcess(["pagi_ref.py", app_file + ":app", "--port", "0", "--workers", "3"],
                       env={"JOURNAL": journal}) as proc:
        _host, port = proc.wait_listening()
        starts = [l.split() for l in journal_lines(journal) if l.startswith("start")]
        # The listening line comes after every worker has started.
        assert sorted(int(s[2]) for s in starts) == [1, 2, 3]
        assert {s[1] for s in starts} == {"1"}                  # is_worker
        pids = {int(s[3]) for s in starts}
        assert len(pids) == 3 and proc.p.pid not in pids
        for _ in range(20):
            resp = get(port)
            pid, worker = map(int, resp.body.split())
            assert resp.status == 200 and pid in pids and 1 <= worker <= 3
        assert proc.stop(signal.SIGTERM) == 0
    stops = [l.split() for l in journal_lines(journal) if l.startswith("stop")]
    assert sorted(int(s[1]) for s in stops) == [1, 2, 3]


def test_a_worker_that_dies_is_replaced(app_file, tmp_path):
    journal = str(tmp_path / "journal")
    with ServerProcess(["pagi_ref.py", app_file + ":app", "--port", "0", "--workers", "2"],
                       env={"JOURNAL": journal}) as proc:
        _host, port = proc.wait_listening()
        first = [l.split() for l in journal_lines(journal) if l.startswith("start")]
        victim = int(first[0][3])
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: len([l for l in journal_lines(journal)
                                     if l.startswith("start")]) == 3)
        for _ in range(10):
            assert get(port).status == 200
        assert proc.stop(signal.SIGTERM) == 0
    assert any("starting another" in line for line in proc.stderr)


def test_sigint_to_the_process_group_is_one_graceful_shutdown(app_file, tmp_path):
    """Ctrl-C reaches every process of the group; each worker still shuts
    down gracefully (its lifespan shutdown runs) and the exit status is 0."""
    journal = str(tmp_path / "journal")
    with ServerProcess(["pagi_ref.py", app_file + ":app", "--port", "0", "--workers", "2"],
                       env={"JOURNAL": journal}, new_session=True) as proc:
        proc.wait_listening()
        os.killpg(proc.p.pid, signal.SIGINT)
        assert proc.p.wait(15) == 0
    stops = [l for l in journal_lines(journal) if l.startswith("stop")]
    assert len(stops) == 2


def test_a_worker_that_refuses_to_start_stops_the_supervisor(app_file, tmp_path):
    journal = str(tmp_path / "journal")
    with ServerProcess(["pagi_ref.py", app_file + ":app", "--port", "0", "--workers", "2"],
                       env={"JOURNAL": journal, "REFUSE": "2"}) as proc:
        assert proc.p.wait(15) == 3
        proc.reader.join(5)
    assert not any("listening on" in line for line in proc.stderr)


def test_workers_do_not_outlive_a_killed_supervisor(app_file, tmp_path):
    journal = str(tmp_path / "journal")
    with ServerProcess(["pagi_ref.py", app_file + ":app", "--port", "0", "--workers", "2"],
                       env={"JOURNAL": journal}) as proc:
        proc.wait_listening()
        pids = [int(l.split()[3]) for l in journal_lines(journal) if l.startswith("start")]
        proc.p.kill()
        proc.p.wait(5)

        def all_gone():
            for pid in pids:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    continue
                return False
            return True
        assert wait_for(all_gone, timeout=10), "workers still running: %r" % pids
