"""The PAGI conformance suite: the server under test, clause bookkeeping.

Where the server is:
  --server HOST:PORT   or   PAGI_SPEC_SERVER=HOST:PORT
    a server already running the conformance application (APP.md), in ONE
    process (the application keeps its journal in memory);
  neither: the suite starts
    python pagi_ref.py spec_tests/app.py:app --port 0 --no-access-log
    from the repository root and reads the port from its stderr line
    "pagi_ref: listening on http://HOST:PORT".  Tests that need the server's
    error log or a second server with special options run only then.

  --max-body-size N   or   PAGI_SPEC_MAX_BODY_SIZE=N
    the server's request-body limit (default 10485760, pagi_ref's default).

Every test carries @pytest.mark.clause("ID", ...) with the clause ids of
docs/spec.md it checks.  After the run a table lists every clause as
passed / FAILED / pending / n/o (not observable on the wire) / untested,
followed by a summary line; pytest's own closing line stays the last one.
--clause-table=all|problems|none chooses how much of the table to print.
"""
import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

LISTENING = re.compile(r"pagi_ref: listening on http://([^\s:]+|\[[^\]]+\]):(\d+)")
CLAUSE_LINE = re.compile(
    r"^- \*\*([A-Z]+(?:-[A-Z]+)*-\d+)\*\* · (MUST NOT|MUST|SHOULD NOT|SHOULD|MAY) · "
    r"(wire|log|process|app)(?: \(([^)]*)\))?")
SPEC_PATH = os.path.join(ROOT, "docs", "spec.md")


# -- options and markers ----------------------------------------------------------

def pytest_addoption(parser):
    group = parser.getgroup("pagi-spec", "PAGI conformance suite")
    group.addoption("--server", default=None,
                    help="HOST:PORT of a server running the conformance app "
                         "(default: $PAGI_SPEC_SERVER, else start pagi_ref)")
    group.addoption("--max-body-size", type=int, default=None,
                    help="the server's max_body_size (default: $PAGI_SPEC_MAX_BODY_SIZE "
                         "or 10485760)")
    group.addoption("--clause-table", default="all", choices=("all", "problems", "none"),
                    help="per-clause table at the end: all rows, only failed/untested, none")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "clause(*ids): the docs/spec.md clause ids a test checks")


# -- the server under test ----------------------------------------------------------

class ServerUnderTest:
    """Where the server is, and (when the suite started it) its stderr."""

    def __init__(self, addr, proc=None):
        self.addr = addr
        self.proc = proc
        self.owned = proc is not None
        self._lines = []
        self._lock = threading.Lock()
        self.listening = threading.Event()

    # stderr, when we own the process
    def _pump(self, stream):
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._lock:
                self._lines.append(line)
            m = LISTENING.search(line)
            if m and not self.listening.is_set():
                self.addr = (m.group(1).strip("[]"), int(m.group(2)))
                self.listening.set()
        stream.close()

    def log_mark(self):
        with self._lock:
            return len(self._lines)

    def log_since(self, mark):
        with self._lock:
            return list(self._lines[mark:])

    def wait_log(self, mark, predicate, timeout=3.0):
        """Wait until predicate(text logged since mark) holds; return the text."""
        end = time.monotonic() + timeout
        while True:
            text = "\n".join(self.log_since(mark))
            if predicate(text) or time.monotonic() > end:
                return text
            time.sleep(0.05)

    def stop(self):
        """SIGTERM the server we started; returns its exit status."""
        return stop_server(self)

    def require_log(self):
        if not self.owned:
            pytest.skip("not observable: the error log of an external server is not visible")


def _parse_addr(text):
    host, _, port = text.rpartition(":")
    return (host.strip("[]") or "127.0.0.1", int(port))


def start_pagi_ref(extra_args=(), env=None, wait=True, timeout=20.0):
    """Start `python pagi_ref.py spec_tests/app.py:app --port 0 ...` from the
    repository root; returns a ServerUnderTest (call stop_server on it)."""
    cmd = [sys.executable, os.path.join(ROOT, "pagi_ref.py"), "spec_tests/app.py:app",
           "--port", "0", "--no-access-log"] + list(extra_args)
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=full_env)
    server = ServerUnderTest(None, proc)
    threading.Thread(target=server._pump, args=(proc.stderr,), daemon=True).start()
    if wait:
        end = time.monotonic() + timeout
        while not server.listening.wait(0.05):
            if proc.poll() is not None or time.monotonic() > end:
                stop_server(server)
                raise RuntimeError("pagi_ref did not start (%s):\n%s" % (
                    "exit status %s" % proc.returncode if proc.returncode is not None
                    else "no listening line", "\n".join(server.log_since(0))))
    return server


def stop_server(server, timeout=10.0):
    proc = server.proc
    if proc is None or proc.poll() is not None:
        return proc.returncode if proc else None
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


@pytest.fixture
def own_server(request):
    """``with own_server(args, env) as srv:`` a second pagi_ref with special
    options; skips (not observable) against an external server."""
    @contextlib.contextmanager
    def start(extra_args=(), env=None, wait=True):
        if _external_addr(request.config):
            pytest.skip("not observable: needs to start its own pagi_ref with special options")
        srv = start_pagi_ref(extra_args, env, wait=wait)
        try:
            yield srv
        finally:
            stop_server(srv)
    return start


def _external_addr(config):
    text = config.getoption("--server") or os.environ.get("PAGI_SPEC_SERVER")
    return _parse_addr(text) if text else None


@pytest.fixture(scope="session")
def server(request):
    addr = _external_addr(request.config)
    if addr:
        yield ServerUnderTest(addr)
        return
    srv = start_pagi_ref()
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(scope="session")
def addr(server):
    return server.addr


@pytest.fixture(scope="session")
def max_body_size(request):
    value = request.config.getoption("--max-body-size")
    if value is None:
        value = int(os.environ.get("PAGI_SPEC_MAX_BODY_SIZE", 10 * 1024 * 1024))
    return value


# -- per-clause bookkeeping ------------------------------------------------------------

_RESULTS = []          # (nodeid, [clause ids], outcome, reason)


def _skip_reason(rep):
    longrepr = rep.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr or "")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        clauses = [c for m in item.iter_markers("clause") for c in m.args]
        reason = _skip_reason(rep) if rep.skipped else ""
        _RESULTS.append((item.nodeid, clauses, rep.outcome, reason))


def load_clauses(path=SPEC_PATH):
    """[(id, level, observability, note)] in document order."""
    out = []
    if not os.path.exists(path):
        return out
    fenced = False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("```"):
                fenced = not fenced
                continue
            m = None if fenced else CLAUSE_LINE.match(line)
            if m:
                out.append((m.group(1), m.group(2), m.group(3), m.group(4) or ""))
    return out


def classify(clause_obs, results):
    """The verdict for one clause from its test results."""
    if not results:
        return "n/o" if clause_obs in ("process", "app", "log") else "untested"
    outcomes = [o for o, _r in results]
    if "failed" in outcomes:
        return "FAILED"
    if "passed" in outcomes:
        return "passed"
    reasons = [r for _o, r in results]
    if any("pending" in r for r in reasons):
        return "pending"
    if all("not observable" in r for r in reasons):
        return "n/o"
    return "skipped"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    mode = config.getoption("--clause-table")
    if mode == "none" or not _RESULTS:
        return
    catalogue = load_clauses()
    known = {c[0] for c in catalogue}
    by_clause = collections.defaultdict(list)
    for _nodeid, clauses, outcome, reason in _RESULTS:
        for c in clauses:
            by_clause[c].append((outcome, reason))
    rows = [(cid, level, obs, classify(obs, by_clause.get(cid, [])),
             len(by_clause.get(cid, [])), note) for cid, level, obs, note in catalogue]
    unknown = sorted(set(by_clause) - known)
    for cid in unknown:
        rows.append((cid, "?", "?", classify("wire", by_clause[cid]), len(by_clause[cid]),
                     "not in docs/spec.md"))
    tw = terminalreporter
    tw.section("PAGI clauses (docs/spec.md)", sep="=")
    if not catalogue:
        tw.line("docs/spec.md not found: listing only the clauses the tests name")
    tw.line("%-18s %-9s %-8s %-9s %5s  %s" % ("clause", "level", "checked", "result", "tests",
                                            "note"))
    for cid, level, obs, verdict, n, note in rows:
        if mode == "problems" and verdict not in ("FAILED", "untested", "skipped"):
            continue
        tw.line("%-18s %-9s %-8s %-9s %5s  %s" % (cid, level, obs, verdict, n or "", note),
                red=verdict == "FAILED", yellow=verdict in ("untested", "pending"))
    counts = collections.Counter(r[3] for r in rows)
    tw.line("")
    tw.line("PAGI spec: %d clauses: %d passed, %d failed, %d pending, %d not observable "
            "on the wire, %d untested%s" % (
                len(rows), counts["passed"], counts["FAILED"], counts["pending"],
                counts["n/o"], counts["untested"],
                ", %d skipped" % counts["skipped"] if counts["skipped"] else ""),
            bold=True, red=bool(counts["FAILED"]))
    if unknown:
        tw.line("clause ids used by tests but not in docs/spec.md: " + ", ".join(unknown),
                red=True)
