"""The PAGI conformance suite: the server under test, profiles, clause bookkeeping.

Where the server is:
  --server HOST:PORT   or   PAGI_SPEC_SERVER=HOST:PORT
    a server already running the conformance application (APP.md), in ONE
    process (the application keeps its journal in memory);
  neither: the suite starts
    python pagi_ref.py spec_tests/app.py:app --port 0 --no-access-log
    from the repository root and reads the port from its stderr line
    "pagi_ref: listening on http://HOST:PORT".  Tests that need the server's
    error log or a second server with special options run only then.

The server's limits (request body size, WebSocket message size) are what the
application reports on GET /limits (APP.md); tests that depend on a limit
derive their sizes from that report.

Which clauses: --profile portable runs only the tests of clauses whose source
is the upstream PAGI text or an RFC; --profile all adds pagi_ref's own (REF)
clauses.  The default is all when the suite starts pagi_ref itself, portable
with --server.

Every test carries @pytest.mark.clause("ID", ...) with the clause ids of
docs/spec.md it checks.  After the run a table lists every clause of the
profile with its level and source, as passed / FAILED / pending / n/o (not
observable on the wire) / untested, followed by a summary line; pytest's own
closing line stays the last one.  The whole table is printed with --clauses
or -v; otherwise only its problem rows (failed, untested, skipped) and the
summary line.
"""
import collections
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

LISTENING = re.compile(r"pagi_ref: listening on https?://([^\s:]+|\[[^\]]+\]):(\d+)")
CLAUSE_LINE = re.compile(
    r"^- \*\*([A-Z][A-Z0-9]*(?:-[A-Z][A-Z0-9]*)*-\d+)\*\* · (MUST NOT|MUST|SHOULD NOT|SHOULD|MAY) · "
    r"(wire|log|process|app)(?: \(([^)]*)\))?(?: · (PAGI|RFC|REF)((?: [^—]*?)?))? —")
SPEC_PATH = os.path.join(ROOT, "docs", "spec.md")


# -- options and markers ----------------------------------------------------------

def pytest_addoption(parser):
    group = parser.getgroup("pagi-spec", "PAGI conformance suite")
    group.addoption("--server", default=None,
                    help="HOST:PORT of a server running the conformance app "
                         "(default: $PAGI_SPEC_SERVER, else start pagi_ref)")
    group.addoption("--profile", default=None, choices=PROFILES,
                    help="portable: only clauses from the PAGI text or an RFC; all: also "
                         "pagi_ref's own (REF) clauses (default: all when the suite starts "
                         "pagi_ref, portable with --server)")
    group.addoption("--clauses", action="store_true",
                    help="print the whole per-clause table (also with -v)")
    group.addoption("--clause-table", default=None, choices=("all", "problems", "none"),
                    help="per-clause table at the end: all rows, only failed/untested, none "
                         "(default: all with --clauses or -v, else problems)")


PROFILES = ("portable", "all")
PORTABLE_SOURCES = ("PAGI", "RFC")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "clause(*ids): the docs/spec.md clause ids a test checks")


def profile_of(config):
    chosen = config.getoption("--profile")
    if chosen:
        return chosen
    return "portable" if _external_addr(config) else "all"


def pytest_collection_modifyitems(session, config, items):
    """--profile portable: deselect every test that names a REF clause (or a
    clause docs/spec.md does not know)."""
    if profile_of(config) != "portable":
        return
    sources = {c.id: c.source for c in load_clauses()}
    keep, drop = [], []
    for item in items:
        ids = [c for m in item.iter_markers("clause") for c in m.args]
        if ids and all(sources.get(c) in PORTABLE_SOURCES for c in ids):
            keep.append(item)
        else:
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


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
            time.sleep(0.05)   # poll interval of a bounded wait, not a proof

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
def certificate(tmp_path_factory):
    """(certfile, keyfile) of a self-signed certificate for localhost."""
    if shutil.which("openssl") is None:
        pytest.skip("not observable: the openssl command makes the test certificate")
    d = str(tmp_path_factory.mktemp("spec-tls"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "key.pem",
                    "-out", "cert.pem", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   cwd=d, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")


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


@pytest.fixture(autouse=True)
def _server_listening(request):
    """An external server that went down under a previous test and was
    restarted by its runner (spec_tests/peers/run-perl.sh) is waited for
    here, so the failure stays with the test that caused it."""
    addr = _external_addr(request.config)
    if not addr:
        return
    end = time.monotonic() + 10.0
    while True:
        try:
            socket.create_connection(addr, timeout=2.0).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)   # poll: retry connecting until the server listens


@pytest.fixture(scope="session")
def limits(addr):
    """The server's limits as the application reports them (GET /limits)."""
    from spec_wire import json_body, request
    resp = request(addr, "GET", "/limits")
    assert resp.status == 200, "GET /limits (APP.md) answered %r" % resp
    return json_body(resp)


@pytest.fixture(scope="session")
def max_body_size(limits):
    value = limits.get("max_body_size")
    if not value:
        pytest.skip("not observable: the server reports no request-body limit on /limits")
    return value


@pytest.fixture(scope="session")
def ws_max_message_size(limits):
    return limits.get("ws_max_size")


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


Clause = collections.namedtuple("Clause", "id level obs note source where")


def load_clauses(path=SPEC_PATH):
    """[Clause(id, level, observability, note, source, where)] in document
    order; source is PAGI, RFC or REF (None when the line names none)."""
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
                out.append(Clause(m.group(1), m.group(2), m.group(3), m.group(4) or "",
                                  m.group(5), (m.group(6) or "").strip()))
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


def _table_mode(config):
    mode = config.getoption("--clause-table")
    if mode:
        return mode
    if config.getoption("--clauses") or config.getoption("verbose") > 0:
        return "all"
    return "problems"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    mode = _table_mode(config)
    if mode == "none" or not _RESULTS:
        return
    profile = profile_of(config)
    catalogue = load_clauses()
    known = {c.id for c in catalogue}
    in_profile = [c for c in catalogue
                  if profile == "all" or c.source in PORTABLE_SOURCES]
    by_clause = collections.defaultdict(list)
    for _nodeid, clauses, outcome, reason in _RESULTS:
        for c in clauses:
            by_clause[c].append((outcome, reason))
    rows = [(c.id, c.level, c.source or "?", c.obs, classify(c.obs, by_clause.get(c.id, [])),
             len(by_clause.get(c.id, [])), c.where) for c in in_profile]
    unknown = sorted(set(by_clause) - known)
    for cid in unknown:
        rows.append((cid, "?", "?", "?", classify("wire", by_clause[cid]), len(by_clause[cid]),
                     "not in docs/spec.md"))
    tw = terminalreporter
    tw.section("PAGI clauses (docs/spec.md), profile %s" % profile, sep="=")
    if not catalogue:
        tw.line("docs/spec.md not found: listing only the clauses the tests name")
    fmt = "%-20s %-9s %-5s %-8s %-9s %5s  %s"
    shown = [r for r in rows
             if mode == "all" or r[4] in ("FAILED", "skipped")]
    if shown:
        tw.line(fmt % ("clause", "level", "src", "checked", "result", "tests", "where"))
    for cid, level, source, obs, verdict, n, where in shown:
        tw.line(fmt % (cid, level, source, obs, verdict, n or "", where),
                red=verdict == "FAILED", yellow=verdict in ("untested", "pending"))
    if mode != "all":
        tw.line("(%d rows; --clauses or -v prints them all)" % len(rows))
    counts = collections.Counter(r[4] for r in rows)
    left_out = len(catalogue) - len(in_profile)
    tw.line("")
    tw.line("PAGI spec, profile %s: %d clauses: %d passed, %d failed, %d pending, "
            "%d not observable on the wire, %d untested%s%s" % (
                profile, len(rows), counts["passed"], counts["FAILED"], counts["pending"],
                counts["n/o"], counts["untested"],
                ", %d skipped" % counts["skipped"] if counts["skipped"] else "",
                "; %d REF clauses not in this profile" % left_out if left_out else ""),
            bold=True, red=bool(counts["FAILED"]))
    if unknown:
        tw.line("clause ids used by tests but not in docs/spec.md: " + ", ".join(unknown),
                red=True)
