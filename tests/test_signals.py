"""Signals and supervision (sections 10 and 11), with real processes and
real signals: reload (SIGHUP) under load, resizing (SIGTTIN/SIGTTOU),
crash loops, the watchdog, max_requests, and the order of a shutdown.

The tests wait on events -- a line in the server's stderr, a line in the
application's journal, a connection refused -- never on wall time.  The
application under test journals its lifespan (start/stop, worker number,
pid, code version) to a file, answers ``GET /`` with its pid and version,
and holds ``/hold`` open until the client sends the request body.
"""
import os
import signal
import socket
import sys
import textwrap
import threading
import time

import pytest

from apputil import ROOT, SCRIPT, ServerProcess, req
from spec_wire import Reader, connect, exchange

APP = textwrap.dedent('''
    import os
    import time

    HERE = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(HERE, "version")) as f:
        VERSION = f.read().strip()      # read at import: a reload shows a new one

    def journal(line):
        with open(os.path.join(HERE, "journal"), "a") as f:
            f.write(line + "\\n")

    def app(scope, receive, send):
        if scope["type"] == "lifespan":
            event = yield receive()
            num = scope["pagi"].get("worker_num")
            if os.path.exists(os.path.join(HERE, "refuse")):
                yield send({"type": "lifespan.startup.failed", "message": "refuse file"})
                return
            journal("start %s %d %s" % (num, os.getpid(), VERSION))
            yield send({"type": "lifespan.startup.complete"})
            event = yield receive()
            journal("stop %s %d %s" % (num, os.getpid(), VERSION))
            yield send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if path == "/hold":
            # The head and a first chunk, then wait for the client's body.
            yield send({"type": "http.response.start", "status": 200, "headers": []})
            yield send({"type": "http.response.body", "body": b"held ", "more": 1})
            data = b""
            while True:
                event = yield receive()
                if event["type"] == "http.disconnect":
                    return
                data += event.get("body", b"")
                if not event.get("more"):
                    break
            yield send({"type": "http.response.body", "body": b"released " + data})
            return
        if path == "/block":
            time.sleep(60)                  # holds the loop: the watchdog's case
        if path == "/crash":
            os._exit(7)
        body = b"%d %s" % (os.getpid(), VERSION.encode())
        yield send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(body))]})
        yield send({"type": "http.response.body", "body": body})
''')


@pytest.fixture
def appdir(tmp_path):
    (tmp_path / "sigapp.py").write_text(APP)
    (tmp_path / "version").write_text("v1")
    return tmp_path


def spec(appdir):
    return str(appdir / "sigapp.py") + ":app"


def journal(appdir, kind=None):
    try:
        with open(str(appdir / "journal")) as f:
            lines = [l.split() for l in f.read().splitlines()]
    except FileNotFoundError:
        return []
    return [l for l in lines if kind is None or l[0] == kind]


def wait_for(predicate, timeout=60.0, what="condition"):
    """Poll a condition another process sets (bounded); fail naming it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.02)   # poll interval of a bounded wait, not a proof


def log_has(proc, text, count=1):
    return sum(1 for line in proc.stderr if text in line) >= count


def get(port, path="/"):
    return exchange(port, req(path, headers=[("Connection", "close")]))


def pid_version(port):
    resp = get(port)
    assert resp.status == 200, resp
    pid, version = resp.body.split()
    return int(pid), version.decode()


def start(appdir, *options, env=None):
    proc = ServerProcess([SCRIPT, spec(appdir), "--port", "0"] + list(options), env=env)
    _host, port = proc.wait_listening()
    return proc, port


class Load:
    """A bounded load: threads that each make requests on new connections
    until stopped (or a cap is reached), recording every outcome."""

    def __init__(self, port, threads=4, cap=20000):
        self.port = port
        self.stop_event = threading.Event()
        self.ok = []               # (pid, version) per answered request
        self.failures = []
        self.cap = cap
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        while not self.stop_event.is_set() and len(self.ok) < self.cap:
            try:
                self.ok.append(pid_version(self.port))
            except Exception as exc:          # any failure a client would see
                self.failures.append(repr(exc))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        for t in self.threads:
            t.join(15)

    def seen(self, predicate):
        return any(predicate(pid, version) for pid, version in list(self.ok))


# -- reload: SIGHUP ----------------------------------------------------------------

def test_hup_reloads_with_a_fresh_import_under_load_and_no_request_fails(appdir):
    proc, port = start(appdir, "--workers", "2")
    with proc:
        old = {int(l[2]) for l in journal(appdir, "start")}
        assert len(old) == 2
        with Load(port) as load:
            wait_for(lambda: len(load.ok) > 20, what="load to flow")
            (appdir / "version").write_text("v2")
            proc.p.send_signal(signal.SIGHUP)
            # The new generation starts (fresh import: v2), then the old one
            # stops gracefully, all while the load runs.
            wait_for(lambda: len([l for l in journal(appdir, "start") if l[3] == "v2"]) == 2,
                     what="generation 2 to start")
            wait_for(lambda: len(journal(appdir, "stop")) == 2, what="generation 1 to stop")
            count = len(load.ok)
            wait_for(lambda: len(load.ok) > count + 20, what="load after the reload")
        assert load.failures == [], load.failures[:5]
        assert load.seen(lambda pid, v: v == "v1") and load.seen(lambda pid, v: v == "v2")
        assert {int(l[2]) for l in journal(appdir, "stop")} == old
        for _ in range(10):
            pid, version = pid_version(port)
            assert version == "v2" and pid not in old
        assert proc.stop(signal.SIGTERM) == 0
    assert log_has(proc, "generation 2 serves; stopping generation 1")


def test_hup_whose_new_generation_fails_to_start_leaves_the_old_one_serving(appdir):
    proc, port = start(appdir, "--workers", "2")
    with proc:
        pids = {int(l[2]) for l in journal(appdir, "start")}
        # 1. The new application refuses to start (lifespan.startup.failed).
        (appdir / "refuse").write_text("")
        proc.p.send_signal(signal.SIGHUP)
        wait_for(lambda: log_has(proc, "reload failed"), what="the reload to fail")
        assert any("refused to start" in l for l in proc.stderr if "reload failed" in l)
        # The refusal stays until the old generation has answered: another
        # worker of the failed generation may still be starting, and without
        # it would start (and, stopping, answer a request it accepted).
        for _ in range(6):
            assert pid_version(port) in {(p, "v1") for p in pids}
        os.remove(str(appdir / "refuse"))
        # 2. The new code does not even import.
        (appdir / "sigapp.py").write_text("raise RuntimeError('broken deploy')\n")
        proc.p.send_signal(signal.SIGHUP)
        wait_for(lambda: log_has(proc, "reload failed", 2), what="the second reload to fail")
        assert any("broken deploy" in l for l in proc.stderr if "reload failed" in l)
        for _ in range(6):
            assert pid_version(port) in {(p, "v1") for p in pids}
        # 3. Fixed: the next reload goes through.
        (appdir / "sigapp.py").write_text(APP)
        (appdir / "version").write_text("v3")
        proc.p.send_signal(signal.SIGHUP)
        wait_for(lambda: len(journal(appdir, "stop")) == 2, what="the old generation to stop")
        assert pid_version(port)[1] == "v3"
        assert proc.stop(signal.SIGTERM) == 0


# -- resizing: SIGTTIN / SIGTTOU ------------------------------------------------------

def test_ttin_adds_a_worker_and_ttou_removes_one_never_below_one(appdir):
    proc, port = start(appdir, "--workers", "2")
    with proc:
        proc.p.send_signal(signal.SIGTTIN)
        wait_for(lambda: len(journal(appdir, "start")) == 3, what="a third worker")
        assert sorted(int(l[1]) for l in journal(appdir, "start")) == [1, 2, 3]
        assert log_has(proc, "SIGTTIN received: 3 workers")
        for n in (2, 1):
            proc.p.send_signal(signal.SIGTTOU)
            wait_for(lambda: len(journal(appdir, "stop")) == 3 - n, what="%d workers" % n)
        # The highest numbers went first.
        assert sorted(int(l[1]) for l in journal(appdir, "stop")) == [2, 3]
        proc.p.send_signal(signal.SIGTTOU)
        wait_for(lambda: log_has(proc, "staying at 1 worker"), what="the refusal to go below 1")
        (last,) = {int(l[2]) for l in journal(appdir, "start")} - \
            {int(l[2]) for l in journal(appdir, "stop")}
        for _ in range(5):
            assert pid_version(port)[0] == last
        assert proc.stop(signal.SIGTERM) == 0
    assert len(journal(appdir, "stop")) == 3


# -- deaths: replaced, with a back-off, forever ---------------------------------------

def test_workers_killed_again_and_again_are_replaced_and_the_service_answers(appdir):
    proc, port = start(appdir, "--workers", "3")
    with proc:
        for round_ in range(10):
            starts = journal(appdir, "start")
            stops = {int(l[2]) for l in journal(appdir, "stop")}
            live = [int(l[2]) for l in starts if int(l[2]) not in stops]
            victim = live[round_ % len(live)]
            os.kill(victim, signal.SIGKILL)
            stops.add(victim)
            for _ in range(3):
                pid, _ = pid_version(port)
                assert pid != victim
            # Dead workers do not journal a stop: record the kill ourselves.
            with open(str(appdir / "journal"), "a") as f:
                f.write("stop ? %d killed\n" % victim)
            wait_for(lambda: len(journal(appdir, "start")) == len(starts) + 1,
                     what="the replacement of kill %d" % (round_ + 1))
        assert proc.p.poll() is None
        deaths = [l for l in proc.stderr if "was killed by signal SIGKILL" in l]
        assert len(deaths) == 10 and all("ERROR" in l for l in deaths)
        assert proc.stop(signal.SIGTERM) == 0


def test_a_crash_loop_backs_off_and_never_stops_the_supervisor(appdir):
    proc, port = start(appdir, "--workers", "2")
    with proc:
        for n in range(1, 9):
            _swallow(get, port, "/crash")     # the worker dies mid-request
            wait_for(lambda: log_has(proc, "exited with status 7", n), what="death %d" % n)
        # More than the 5 deaths that used to stop everything: still serving.
        assert pid_version(port)[1] == "v1"
        assert proc.p.poll() is None
        delays = {}
        for line in proc.stderr:
            if "exited with status 7" in line and "starting another in" in line:
                slot = line.split("worker ")[1].split()[0]
                delays.setdefault(slot, []).append(float(line.rsplit(" in ", 1)[1].split()[0]))
        # Quick deaths: each slot's back-off starts at 0.1 s and doubles (a
        # worker that lived 10 s would start it again at 0.1 s).
        for slot, seq in delays.items():
            assert seq[0] == 0.1, (slot, seq)
            for before, after in zip(seq, seq[1:]):
                assert after in (0.1, round(2 * before, 1)), (slot, seq)
        assert max(len(seq) for seq in delays.values()) >= 3, delays
        assert proc.stop(signal.SIGTERM) == 0


def test_first_generation_that_cannot_import_exits_2_with_one_line(tmp_path):
    (tmp_path / "bad.py").write_text("import no_such_module_for_pagi_ref_tests\n")
    proc = ServerProcess([SCRIPT, str(tmp_path / "bad.py") + ":app", "--port", "0",
                          "--workers", "2"])
    with proc:
        assert proc.p.wait(20) == 2
        proc.reader.join(5)
    errors = [l for l in proc.stderr if l.startswith("pagi_ref: error:")]
    assert len(errors) == 1 and "no_such_module_for_pagi_ref_tests" in errors[0], proc.stderr
    assert not any("listening on" in l for l in proc.stderr)


# -- the watchdog and the slow-callback warning ----------------------------------------

def test_a_worker_whose_loop_is_stuck_is_killed_with_its_stack_and_replaced(appdir):
    proc, port = start(appdir, "--workers", "2", "--worker-timeout", "1")
    with proc:
        starts = len(journal(appdir, "start"))
        blocked = threading.Thread(target=lambda: _swallow(get, port, "/block"), daemon=True)
        blocked.start()
        wait_for(lambda: log_has(proc, "its loop has not turned"), what="the watchdog")
        wait_for(lambda: len(journal(appdir, "start")) == starts + 1, what="the replacement")
        text = "\n".join(proc.stderr)
        stack = text[text.index("its loop has not turned"):]
        assert "sigapp.py" in stack and "in app" in stack, stack[:2000]
        wait_for(lambda: log_has(proc, "was killed by signal SIGKILL"), what="the death's line")
        assert pid_version(port)[1] == "v1"
        assert proc.stop(signal.SIGTERM) == 0


def test_a_new_worker_that_hangs_while_loading_is_killed_and_the_reload_fails(appdir):
    """A worker that is not ready --worker-boot-timeout after its fork (an
    import that hangs) is killed with its stack, and the reload it belonged
    to fails while the old generation serves, instead of waiting forever."""
    proc, port = start(appdir, "--workers", "2", "--worker-boot-timeout", "1")
    with proc:
        pids = {int(l[2]) for l in journal(appdir, "start")}
        (appdir / "sigapp.py").write_text("import time\ntime.sleep(3600)\n" + APP)
        proc.p.send_signal(signal.SIGHUP)
        wait_for(lambda: log_has(proc, "reload failed"), what="the reload to fail")
        text = "\n".join(proc.stderr)
        assert "worker_boot_timeout 1.0 s" in text, text[-2000:]
        stack = text[text.index("killing it"):]
        assert "sigapp.py" in stack, stack[:2000]
        for _ in range(4):
            assert pid_version(port) in {(p, "v1") for p in pids}
        (appdir / "sigapp.py").write_text(APP)
        (appdir / "version").write_text("v2")
        proc.p.send_signal(signal.SIGHUP)
        wait_for(lambda: len(journal(appdir, "stop")) == 2, what="the old generation to stop")
        assert pid_version(port)[1] == "v2"
        assert proc.stop(signal.SIGTERM) == 0


def test_a_first_worker_that_hangs_while_loading_stops_the_start(appdir):
    """At the first start there is no generation to fall back on: a worker
    that hangs while loading ends the start with an error, as a worker that
    cannot load does, instead of a supervisor waiting forever.  (With one
    process, --workers 1, there is no supervisor: the import is the
    server's own, as in uvicorn.)"""
    (appdir / "sigapp.py").write_text("import time\ntime.sleep(3600)\n" + APP)
    proc = ServerProcess([SCRIPT, spec(appdir), "--port", "0", "--workers", "2",
                          "--worker-boot-timeout", "1"])
    with proc:
        assert proc.p.wait(60) != 0
    assert any("killing it" in l for l in proc.stderr), proc.stderr
    assert not any("listening on" in l for l in proc.stderr)


def _swallow(fn, *args):
    try:
        fn(*args)
    except Exception:
        pass


# -- max_requests -----------------------------------------------------------------------

def test_max_requests_replaces_workers_without_failing_a_request(appdir):
    proc, port = start(appdir, "--workers", "2", "--max-requests", "5",
                       "--max-requests-jitter", "2")
    with proc:
        pids = set()
        for _ in range(40):
            pids.add(pid_version(port)[0])
        # 40 requests, at most 7 per worker: at least 6 workers served.
        assert len(pids) >= 6
        assert log_has(proc, "reached max_requests")
        assert proc.stop(signal.SIGTERM) == 0


def test_max_requests_in_one_process_ends_it_with_status_0(appdir):
    proc, port = start(appdir, "--max-requests", "3")
    with proc:
        for _ in range(3):
            pid_version(port)
        assert proc.p.wait(15) == 0
    assert log_has(proc, "3 requests served (max_requests)")


# -- shutdown: the listener closes first --------------------------------------------

def refused(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_refuses_new_connections_while_the_request_in_flight_completes(appdir, workers):
    proc, port = start(appdir, "--workers", workers)
    with proc:
        held = connect(port)
        held.sendall(req("/hold", headers=[("Content-Length", "4")]))
        r = Reader(held)
        assert r.read_until(b"held ").endswith(b"held ")     # the app is waiting
        proc.p.send_signal(signal.SIGTERM)
        wait_for(lambda: refused(port), what="new connections to be refused")
        held.sendall(b"body")
        rest = r.read_all()
        assert b"released body" in rest
        assert rest.endswith(b"0\r\n\r\n")
        assert proc.p.wait(15) == 0
        held.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigquit_exits_at_once(appdir, workers):
    proc, port = start(appdir, "--workers", workers, "--shutdown-timeout", "60")
    with proc:
        held = connect(port)
        held.sendall(req("/hold", headers=[("Content-Length", "4")]))
        r = Reader(held)
        r.read_until(b"held ")
        proc.p.send_signal(signal.SIGQUIT)
        assert proc.p.wait(15) == 1
        try:
            rest = r.read_all()
        except ConnectionResetError:
            rest = b""
        assert b"released" not in rest      # cut, not finished
        held.close()
    assert not any("Traceback" in l for l in proc.stderr)


def test_second_sigterm_stops_the_workers_at_once(appdir):
    proc, port = start(appdir, "--workers", "2", "--shutdown-timeout", "60")
    with proc:
        held = connect(port)
        held.sendall(req("/hold", headers=[("Content-Length", "4")]))
        Reader(held).read_until(b"held ")
        proc.p.send_signal(signal.SIGTERM)
        wait_for(lambda: refused(port), what="the stop to begin")
        proc.p.send_signal(signal.SIGTERM)
        assert proc.p.wait(15) == 1
        held.close()


# -- one process: the signals that need a supervisor -----------------------------------

def test_one_process_logs_hup_ttin_ttou_and_goes_on_serving(appdir):
    proc, port = start(appdir)
    with proc:
        pid = pid_version(port)[0]
        for sig, name in ((signal.SIGHUP, "SIGHUP"), (signal.SIGTTIN, "SIGTTIN"),
                          (signal.SIGTTOU, "SIGTTOU")):
            proc.p.send_signal(sig)
            wait_for(lambda: log_has(proc, "%s ignored" % name), what=name)
            assert pid_version(port)[0] == pid
        assert proc.stop(signal.SIGTERM) == 0


# -- the access log cannot hold the exit ------------------------------------------------

def test_access_log_lines_a_stuck_sink_did_not_take_are_dropped_and_counted(appdir):
    import subprocess
    proc = subprocess.Popen([sys.executable, SCRIPT, spec(appdir), "--port", "0",
                             "--access-log", "-"], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = b""
        while b"listening on" not in line:
            line = proc.stderr.readline()
            assert line, "no listening line"
        port = int(line.rsplit(b":", 1)[1])
        with connect(port) as s:
            r = Reader(s)
            one = req("/")
            for _ in range(30):              # 3000 lines: more than a pipe holds
                s.sendall(one * 100)
                for _ in range(100):
                    assert r.read_response().status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        err = proc.stderr.read().decode()
        assert "access log: the sink did not take the last" in err, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
        proc.stderr.close()


# -- the interpreter guard ----------------------------------------------------------------

def test_import_refuses_a_non_posix_system():
    import subprocess
    code = "import os; os.name = 'nt'; import pagi_ref"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
    assert done.returncode == 1
    assert b"ImportError: pagi_ref needs a POSIX system" in done.stderr


def _old_python():
    root = os.path.expanduser("~/.pyenv/versions")
    for version in ("3.8", "3.7", "3.6"):
        for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
            if name.startswith(version + "."):
                path = os.path.join(root, name, "bin", "python")
                if os.path.exists(path):
                    return path
    return None


@pytest.mark.skipif(_old_python() is None, reason="no Python older than 3.9 on this machine")
def test_an_older_python_is_refused_in_words():
    import subprocess
    python = _old_python()
    done = subprocess.run([python, "-c", "import pagi_ref"], cwd=ROOT, capture_output=True)
    assert b"ImportError: pagi_ref needs CPython 3.9 or newer" in done.stderr
    done = subprocess.run([python, SCRIPT, "examples/hello.py:app"], cwd=ROOT,
                          capture_output=True)
    assert done.returncode == 1
    assert done.stderr.startswith(b"pagi_ref: error: pagi_ref needs CPython 3.9 or newer")


# -- the slow-callback warning, on an injected clock ------------------------------------

class FakeClock:
    """The loop's clock; an application "holds the loop" by moving it."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_callback_holding_the_loop_is_named_in_a_warning_with_its_scope():
    import logging
    import pagi_ref
    clock = FakeClock()
    records = []

    class Handler(logging.Handler):
        def emit(self, record):
            records.append((record.levelname, record.getMessage()))

    def app(scope, receive, send):
        if scope["type"] == "lifespan":
            yield receive()
            clock.now += 0.75                      # a slow startup
            yield send({"type": "lifespan.startup.complete"})
            yield receive()
            yield send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/report":
            clock.now += 2.0                       # as time.sleep(2) would
        yield send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        yield send({"type": "http.response.body", "body": b"ok"})

    log = logging.getLogger("pagi_ref.test.slow_callback")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    handler = Handler()
    log.addHandler(handler)
    try:
        server = pagi_ref.Server(app, pagi_ref.Config(port=0, slow_callback=0.5), logger=log,
                                 clock=clock)
        _host, port = server.bind()
        thread = threading.Thread(target=server.serve, daemon=True)
        thread.start()
        assert get(port, "/fast").status == 200
        assert get(port, "/report?x=1").status == 200
        server.stop(timeout=2)
        thread.join(10)
    finally:
        log.removeHandler(handler)
    warnings = [m for level, m in records if level == "WARNING"]
    assert len(warnings) == 2, records
    assert warnings[0].startswith("the loop was blocked for 0.750 s by lifespan")
    assert warnings[1].startswith("the loop was blocked for 2.000 s by http GET /report")
    assert "slow_callback 0.500 s" in warnings[1]


# -- run(app, workers=N): the same supervisor, with an application object -----------

RUN_WORKERS = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    import pagi_ref
    from sigapp import app

    pagi_ref.run(app, host="127.0.0.1", port=0, workers=2)
''')


def test_run_with_workers_reloads_on_hup_with_the_same_application_object(appdir):
    script = appdir / "vendored.py"
    script.write_text(RUN_WORKERS)
    proc = ServerProcess([str(script), ROOT, str(appdir)], cwd=str(appdir))
    with proc:
        _host, port = proc.wait_listening()
        old = {int(l[2]) for l in journal(appdir, "start")}
        (appdir / "version").write_text("v2")      # not seen: nothing is imported again
        proc.p.send_signal(signal.SIGHUP)
        wait_for(lambda: len(journal(appdir, "stop")) == 2, what="the old generation to stop")
        pid, version = pid_version(port)
        assert version == "v1" and pid not in old
        assert proc.stop(signal.SIGTERM) == 0
