#!/usr/bin/env python3
"""pagi_ref bench: the field report's experiments, side by side with uvicorn.

    python bench/run.py            # full run (about 15-20 minutes on 2 cores)
    python bench/run.py --quick    # every experiment, small sizes, under 2 minutes

Given nothing else it installs what it needs (wrk and hey from Debian when
run as root, and a virtualenv bench/.venv with uvicorn, httptools, uvloop and
h11 from PyPI), starts each server in turn on 127.0.0.1 (one process, access
log off), pins the server and the load generator to different CPUs when there
are two or more, runs the experiments E1..E9 and writes a dated markdown
report plus an SVG chart to bench/results/.  Experiments that need a pagi_ref
feature that has not landed yet are reported as "not yet available".

Everything runs against 127.0.0.1, every step has a time limit, every child
process is started in its own process group and killed on exit.
"""
import argparse
import atexit
import datetime
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
VENV = os.path.join(BENCH, ".venv")
VENV_PY = os.path.join(VENV, "bin", "python")
RESULTS = os.path.join(BENCH, "results")
PEER_PACKAGES = ["uvicorn", "httptools", "uvloop", "h11", "hypercorn", "h2"]
HOST = "127.0.0.1"
HELLO = b"Hello, world!"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# Sizes and durations.  MB is 10**6 bytes throughout; curl's "1M" rate is 2**20 B/s.
FULL = dict(
    e1_wrk=10, e1_hey=10, e1_warm=1, e1_repeat=3,
    e2_clients=500, e2_dur=10,
    e3_bytes=50_000_000,
    e4_bytes=500_000_000,
    e5_clients=50, e5_bytes=10_000_000,
    e6_clients=1500, e6_dur=10, e6_timeout=10, e6_nofile=1024,
    e7_clients=1000, e7_dur=10,
    e8_conns=10_000,
    e9_requests=1_000_000, e9_warm=10_000,
    e4_repeat=5, quiet_wait=30,
    e1h2_requests=100_000,
)
QUICK = dict(
    e1_wrk=3, e1_hey=2, e1_warm=0, e1_repeat=1,
    e2_clients=500, e2_dur=4,
    e3_bytes=3_000_000,
    e4_bytes=100_000_000,
    e5_clients=50, e5_bytes=2_000_000,
    e6_clients=1500, e6_dur=2, e6_timeout=5, e6_nofile=1024,
    e7_clients=1000, e7_dur=2,
    e8_conns=2_000,
    e9_requests=30_000, e9_warm=2_000,
    e4_repeat=3, quiet_wait=0,
    e1h2_requests=10_000,
)
STREAM_PATH = "/stream?chunks=20&interval=0.1"   # 20 chunks, 100 ms apart: 2 s


def log(msg):
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


class NotAvailable(Exception):
    """A server or a feature the experiment needs is not there (yet)."""


# --------------------------------------------------------------------------
# Child processes: every one in its own process group, all killed on exit.
# --------------------------------------------------------------------------

_children = []


def _die_with_parent():
    """In the child: SIGKILL me if bench/run.py dies, even by SIGKILL (Linux)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _spawn(argv, preexec_fn=None, **kw):
    def preexec():
        _die_with_parent()
        if preexec_fn is not None:
            preexec_fn()
    p = subprocess.Popen(argv, start_new_session=True, preexec_fn=preexec, **kw)
    _children.append(p)
    return p


def _kill(p, grace=5.0):
    """SIGTERM the process group, SIGKILL it after `grace` s; the exit code."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)  # stragglers in the group (workers)
    except ProcessLookupError:
        pass
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        pass
    if p in _children:
        _children.remove(p)
    return p.returncode


def kill_all():
    for p in list(_children):
        _kill(p, grace=2.0)


def _on_signal(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


class Pinning:
    def __init__(self, enabled):
        cpus = sorted(os.sched_getaffinity(0))
        self.enabled = enabled and len(cpus) >= 2 and shutil.which("taskset") is not None
        if self.enabled:
            self.server = str(cpus[-1])
            self.load = ",".join(str(c) for c in cpus[:-1])
        else:
            self.server = self.load = None

    def server_prefix(self):
        return ["taskset", "-c", self.server] if self.enabled else []

    def load_prefix(self):
        return ["taskset", "-c", self.load] if self.enabled else []

    def describe(self):
        if not self.enabled:
            return "no pinning (fewer than 2 CPUs or no taskset)"
        return "server on CPU %s, load generators on CPU %s (taskset)" % (self.server, self.load)


def run_tool(argv, timeout, pin, env=None, stdin=None):
    """Run a load tool pinned to the load CPUs; (returncode, stdout, stderr, seconds)."""
    t0 = time.monotonic()
    p = _spawn(pin.load_prefix() + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
               stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL, env=env)
    try:
        out, err = p.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(p, grace=1.0)
        out, err = p.communicate()
        return None, out.decode(errors="replace"), err.decode(errors="replace") + \
            "\n(timed out after %ds)" % timeout, time.monotonic() - t0
    if p in _children:
        _children.remove(p)
    return p.returncode, out.decode(errors="replace"), err.decode(errors="replace"), time.monotonic() - t0


# --------------------------------------------------------------------------
# /proc: CPU, memory and file descriptors of a server's process tree.
# --------------------------------------------------------------------------

def _stat(pid):
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])  # ppid, utime+stime ticks


def tree_pids(root):
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                parents[int(name)] = _stat(int(name))[0]
            except (OSError, ValueError, IndexError):
                pass
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in parents or pid == root:
            pids.append(pid)
            todo.extend(c for c, pp in parents.items() if pp == pid)
    return pids


def _status_kb(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def proc_stats(root):
    """Sums over the process tree: cpu (s), rss/hwm (bytes), fds, processes."""
    out = {"cpu": 0.0, "rss": 0, "hwm": 0, "fds": 0, "procs": 0}
    for pid in tree_pids(root):
        try:
            out["cpu"] += _stat(pid)[1] / CLK_TCK
            out["rss"] += _status_kb(pid, "VmRSS") * 1024
            out["hwm"] += _status_kb(pid, "VmHWM") * 1024
            out["fds"] += len(os.listdir("/proc/%d/fd" % pid))
            out["procs"] += 1
        except (OSError, ValueError, IndexError):
            pass
    out["t"] = time.monotonic()
    return out


def system_busy():
    """CPU-seconds spent busy by the whole machine so far (all CPUs summed)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:9]]
    return (sum(vals) - vals[3] - vals[4]) / CLK_TCK  # minus idle and iowait


def own_cpu():
    """CPU-seconds of this process and of its reaped children (the load tools)."""
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def cpu_percent(before, after, seconds=None):
    seconds = seconds or (after["t"] - before["t"])
    return 100.0 * (after["cpu"] - before["cpu"]) / seconds if seconds > 0 else 0.0


# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_get(port, path, timeout=5.0, cafile=None):
    if cafile:
        import ssl
        conn = http.client.HTTPSConnection(HOST, port, timeout=timeout,
                                           context=ssl.create_default_context(cafile=cafile))
    else:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read(), dict((k.lower(), v) for k, v in resp.getheaders())
    finally:
        conn.close()


class ServerSpec:
    def __init__(self, key, label, kind, available, why=""):
        self.key, self.label, self.kind = key, label, kind
        self.available, self.why = available, why

    def argv(self, port, workers=1, keepalive=None, tls=None):
        """``tls``: (certfile, keyfile), the same option names in both servers."""
        tls_args = ["--ssl-certfile", tls[0], "--ssl-keyfile", tls[1]] if tls else []
        if self.kind == "pagi_ref":
            argv = [sys.executable, os.path.join(ROOT, "pagi_ref.py"), "bench/apps.py:app",
                    "--host", HOST, "--port", str(port), "--no-access-log"] + tls_args
            if workers != 1:
                argv += ["--workers", str(workers)]
            if keepalive:
                argv += ["--keepalive-timeout", str(keepalive)]
            return argv
        if self.kind == "ceiling":
            return [sys.executable, os.path.join(BENCH, "ceiling.py"), "--host", HOST, "--port", str(port)]
        if self.kind == "hypercorn":      # HTTP/2 (h2c with prior knowledge, or ALPN h2) and 1.1
            argv = [VENV_PY, "-m", "hypercorn", "bench.asgi_apps:app", "--bind",
                    "%s:%d" % (HOST, port), "--workers", str(workers),
                    "--config", os.path.join(BENCH, "hypercorn.toml")]
            if tls:
                argv += ["--certfile", tls[0], "--keyfile", tls[1]]
            if keepalive:
                argv += ["--keep-alive", str(keepalive)]
            return argv
        http, loop = {"uvicorn-httptools": ("httptools", "uvloop"),
                      "uvicorn-h11": ("h11", "asyncio")}[self.key]
        argv = [VENV_PY, "-m", "uvicorn", "asgi_apps:app", "--app-dir", BENCH,
                "--host", HOST, "--port", str(port), "--http", http, "--loop", loop,
                "--no-access-log"] + tls_args
        if workers != 1:
            argv += ["--workers", str(workers)]
        if keepalive:
            argv += ["--timeout-keep-alive", str(keepalive)]
        return argv


class Running:
    def __init__(self, spec, proc, port, logpath):
        self.spec, self.proc, self.port, self.logpath = spec, proc, port, logpath
        self.pid = proc.pid

    def stats(self):
        return proc_stats(self.pid)

    def alive(self):
        return self.proc.poll() is None

    def log_tail(self, n=15):
        try:
            with open(self.logpath, errors="replace") as f:
                return "".join(f.readlines()[-n:]).strip()
        except OSError:
            return ""


class Bench:
    def __init__(self, args):
        self.args = args
        self.p = QUICK if args.quick else FULL
        self.pin = Pinning(not args.no_pin)
        self.tmp = tempfile.mkdtemp(prefix="pagi_bench_", dir="/tmp")
        self.tools = {}
        self.versions = {}
        self.notes = []          # machine-level notes (missing tools, ...)
        self.observations = []   # things a server did that it should not have
        self.results = {}        # experiment -> server key -> dict | str (not available)
        self.extra = {}          # experiment -> free text
        self.started = 0
        self.exit_codes = {}
        self.noisy = []          # "E1 pagi_ref: 35%": other processes' CPU during a measurement
        self.profile = None      # text of the --profile section
        self.extra_specs = []    # peers of one experiment only (hypercorn, E1H2)

    # ---- setup -----------------------------------------------------------

    def ensure_tools(self):
        for tool in ("wrk", "hey", "curl", "h2load"):
            self.tools[tool] = shutil.which(tool)
        missing = [t for t in ("wrk", "hey", "h2load") if not self.tools[t]]
        package = {"h2load": "nghttp2-client"}
        if missing and not self.args.no_install:
            if os.geteuid() == 0 and shutil.which("apt-get"):
                log("installing %s with apt-get" % " ".join(missing))
                env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
                subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=600,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for tool in missing:  # one at a time: a missing package must not block the other
                    subprocess.run(["apt-get", "install", "-y", "-qq", package.get(tool, tool)],
                                   env=env, timeout=600,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    self.tools[tool] = shutil.which(tool)
            else:
                self.notes.append("not root: cannot apt-get install %s" % " ".join(missing))
        for tool in ("wrk", "hey"):
            if not self.tools[tool]:
                self.notes.append("`%s` is not installed: its figures are skipped "
                                  "(apt-get install -y %s)" % (tool, tool))
        if self.tools["wrk"]:
            r = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
            m = re.search(r"wrk \S+", r.stdout + r.stderr)
            self.versions["wrk"] = m.group(0) if m else "wrk"
        if self.tools["hey"]:
            r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "hey"], capture_output=True, text=True)
            self.versions["hey"] = "hey " + (r.stdout.strip() or "?")

    def ensure_venv(self):
        """bench/.venv with the peers; returns the set of importable packages."""
        if not os.path.exists(VENV_PY) and not self.args.no_install:
            log("creating %s" % VENV)
            r = subprocess.run([sys.executable, "-m", "venv", VENV], capture_output=True, text=True, timeout=300)
            if r.returncode:
                self.notes.append("could not create bench/.venv: %s" % r.stderr.strip()[-200:])
                return set()
        if not os.path.exists(VENV_PY):
            return set()
        have = self._venv_packages()
        missing = [p for p in PEER_PACKAGES if p not in have]
        if missing and not self.args.no_install:
            log("pip install %s into bench/.venv" % " ".join(missing))
            r = subprocess.run([VENV_PY, "-m", "pip", "install", "-q"] + missing,
                               capture_output=True, text=True, timeout=900)
            if r.returncode:
                self.notes.append("pip install %s failed: %s" % (" ".join(missing), r.stderr.strip()[-300:]))
            have = self._venv_packages()
        return have

    def _venv_packages(self):
        code = ("import importlib.metadata as m, json\nout = {}\n"
                "for n in %r:\n    try: out[n] = m.version(n)\n    except Exception: pass\n"
                "print(json.dumps(out))" % PEER_PACKAGES)
        r = subprocess.run([VENV_PY, "-c", code], capture_output=True, text=True, timeout=60)
        try:
            found = json.loads(r.stdout)
        except ValueError:
            return set()
        self.versions.update(found)
        return set(found)

    def server_specs(self, have):
        specs = []
        if os.path.exists(os.path.join(ROOT, "pagi_ref.py")):
            specs.append(ServerSpec("pagi_ref", "pagi_ref", "pagi_ref", True))
        else:
            specs.append(ServerSpec("pagi_ref", "pagi_ref", "pagi_ref", False, "pagi_ref.py not found"))
        ok = {"uvicorn", "httptools", "uvloop"} <= have
        specs.append(ServerSpec("uvicorn-httptools", "uvicorn httptools+uvloop", "uvicorn", ok,
                                "" if ok else "uvicorn/httptools/uvloop not installed"))
        ok = {"uvicorn", "h11"} <= have
        specs.append(ServerSpec("uvicorn-h11", "uvicorn h11+asyncio", "uvicorn", ok,
                                "" if ok else "uvicorn/h11 not installed"))
        specs.append(ServerSpec("ceiling", "ceiling (canned)", "ceiling", True))
        wanted = self.args.servers
        return [s for s in specs if not wanted or s.key in wanted]

    # ---- servers ---------------------------------------------------------

    def start(self, spec, workers=1, keepalive=None, nofile=None, tag="", wrapper=None,
              tls=None):
        if not spec.available:
            raise NotAvailable(spec.why)
        if tls and spec.kind == "ceiling":
            raise NotAvailable("the ceiling server speaks no TLS")
        port = free_port()
        self.started += 1
        logpath = os.path.join(self.tmp, "%s-%02d%s.log" % (spec.key, self.started, tag))
        argv = spec.argv(port, workers=workers, keepalive=keepalive, tls=tls)
        if wrapper:  # e.g. the profiler: [python, profile_server.py, OUT] + pagi_ref's arguments
            argv = wrapper + argv[2:]
        argv = self.pin.server_prefix() + argv

        def limits():
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with open(logpath, "wb") as logf:
            proc = _spawn(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=logf,
                          stderr=subprocess.STDOUT, preexec_fn=limits)
        srv = Running(spec, proc, port, logpath)
        deadline = time.monotonic() + 20
        last = None
        while time.monotonic() < deadline:
            if not srv.alive():
                break
            try:
                status, body, _ = http_get(port, "/", timeout=2, cafile=tls and tls[2])
                if status == 200 and body == HELLO:
                    return srv
                last = "GET / answered %d %r" % (status, body[:60])
                break
            except OSError as exc:
                last = str(exc)
                time.sleep(0.05)
        code = self.stop(srv)
        lines = [l.strip() for l in srv.log_tail(20).splitlines() if l.strip()]
        reason = lines[-1][:200] if lines else (last or "")
        raise NotAvailable("did not start (exit %s): %s" % (code, reason))

    def stop(self, srv):
        code = _kill(srv.proc, grace=8.0)
        self.exit_codes.setdefault(srv.spec.key, []).append(code)
        text = srv.log_tail(200)
        if "Traceback" in text and srv.spec.key == "pagi_ref":
            first = text[text.index("Traceback"):][:800]
            self.observations.append("pagi_ref logged a traceback (%s):\n\n```\n%s\n```"
                                     % (os.path.basename(srv.logpath), first))
        return code

    def wait_quiet(self):
        """Wait (boundedly) until other processes use less than 10% of a CPU."""
        budget = self.p["quiet_wait"]
        deadline = time.monotonic() + budget
        while True:
            b0, o0 = system_busy(), own_cpu()
            time.sleep(0.3)
            other = (system_busy() - b0 - (own_cpu() - o0)) / 0.3
            if other < 0.10:
                return other
            if time.monotonic() >= deadline:
                log("machine busy: other processes use %.0f%% of a CPU; going on" % (100 * other))
                return other
            time.sleep(1.0)

    # ---- load tools ------------------------------------------------------

    def loadgen(self, mode, port, limit, stdin=None, **opts):
        py = VENV_PY if os.path.exists(VENV_PY) else sys.executable
        argv = [py, os.path.join(BENCH, "loadgen.py"), mode, "--port", str(port)]
        for k, v in opts.items():
            argv += ["--" + k.replace("_", "-"), str(v)]
        rc, out, err, _ = run_tool(argv, limit, self.pin, stdin=stdin)
        lines = [l for l in out.splitlines() if l.startswith("{")]
        if rc != 0 or not lines:
            raise RuntimeError("loadgen %s failed (rc=%s): %s" % (mode, rc, err.strip()[-400:]))
        return json.loads(lines[-1])

    def wrk(self, port, seconds, connections=50, path="/"):
        argv = ["wrk", "-t1", "-c%d" % connections, "-d%ds" % seconds, "--latency",
                "http://%s:%d%s" % (HOST, port, path)]
        rc, out, err, _ = run_tool(argv, seconds + 30, self.pin)
        if rc != 0:
            raise RuntimeError("wrk failed (rc=%s): %s" % (rc, (err or out).strip()[-300:]))
        return parse_wrk(out)

    def hey(self, port, seconds=None, requests=None, connections=50, path="/"):
        argv = ["hey", "-c", str(connections)]
        if seconds:
            argv += ["-z", "%ds" % seconds]
            timeout = seconds + 60
        else:
            argv += ["-n", str(requests)]
            timeout = max(120, requests // 1000)
        argv.append("http://%s:%d%s" % (HOST, port, path))
        rc, out, err, wall = run_tool(argv, timeout, self.pin)
        if rc != 0:
            raise RuntimeError("hey failed (rc=%s): %s" % (rc, (err or out).strip()[-300:]))
        res = parse_hey(out)
        res["wall"] = wall
        return res

    # ---- experiments -----------------------------------------------------

    def each(self, name, specs, fn, **start_kw):
        """Run fn(srv) on a fresh server per spec; record a dict or a reason."""
        table = self.results.setdefault(name, {})
        for spec in specs:
            if self.args.only and name not in self.args.only:
                continue
            log("%s %s" % (name, spec.key))
            srv = None
            try:
                if spec.available:
                    self.wait_quiet()
                srv = self.start(spec, **start_kw)
                b0, o0, s0 = system_busy(), own_cpu(), srv.stats()
                result = fn(srv)
                b1, o1, s1 = system_busy(), own_cpu(), srv.stats()
                if isinstance(result, dict):
                    other = (b1 - b0) - (o1 - o0) - (s1["cpu"] - s0["cpu"])
                    result["bg_cpu"] = max(0.0, 100.0 * other / max(s1["t"] - s0["t"], 1e-6))
                    if result["bg_cpu"] > 10:
                        self.noisy.append("%s %s: %.0f%%" % (name, spec.key, result["bg_cpu"]))
                table[spec.key] = result
                if not srv.alive():
                    self.observations.append("%s: %s exited during the experiment (code %s)"
                                             % (name, spec.key, srv.proc.returncode))
            except NotAvailable as exc:
                table[spec.key] = "not available: %s" % exc
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # the harness reports, it does not crash
                table[spec.key] = "failed: %s" % str(exc)[:300]
            finally:
                if srv is not None:
                    code = self.stop(srv)
                    if spec.kind != "ceiling" and code not in (0, None) and code != -signal.SIGTERM \
                            and spec.key == "pagi_ref":
                        self.observations.append("%s: pagi_ref exited with status %s on SIGTERM "
                                                 "(contract: exit 0)" % (name, code))
            log("%s %s: %s" % (name, spec.key, _short(table.get(spec.key))))

    def e1(self, specs):
        p = self.p

        def run(srv):
            out = {}
            repeat = self.args.repeat or p["e1_repeat"]
            if self.tools["wrk"]:
                if p["e1_warm"]:
                    self.wrk(srv.port, p["e1_warm"])
                runs = []
                for i in range(repeat):
                    if i:
                        self.wait_quiet()
                    s0 = srv.stats()
                    w = self.wrk(srv.port, p["e1_wrk"])
                    s1 = srv.stats()
                    w["cpu"] = cpu_percent(s0, s1)
                    runs.append(w)
                w = max(runs, key=lambda r: r["rps"])  # best of `repeat`: the least disturbed
                out.update({"wrk_rps": w["rps"], "wrk_p50": w.get("p50"), "wrk_p75": w.get("p75"),
                            "wrk_p90": w.get("p90"), "wrk_p99": w.get("p99"),
                            "wrk_errors": sum(r["errors"] for r in runs), "cpu": w["cpu"]})
                if repeat > 1:
                    out["wrk_all"] = [round(r["rps"]) for r in runs]
            if self.tools["hey"]:
                runs = []
                for i in range(repeat):
                    self.wait_quiet()
                    runs.append(self.hey(srv.port, seconds=p["e1_hey"]))
                h = max(runs, key=lambda r: r["rps"])
                out.update({"hey_rps": h["rps"], "hey_p50": h.get("p50"), "hey_p99": h.get("p99"),
                            "hey_errors": sum(r["errors"] + r["non200"] for r in runs)})
            out["rss"] = srv.stats()["rss"]
            if not out:
                raise NotAvailable("neither wrk nor hey is installed")
            return out

        self.each("E1", specs, run)

    def e1h2(self, specs):
        """E1 over HTTP/2: h2load, 10 connections of 10 concurrent streams
        each, cleartext with prior knowledge, against pagi_ref and
        hypercorn (the Python server one would pick for HTTP/2; uvicorn
        has none)."""
        if not self.tools["h2load"]:
            self.results["E1H2"] = {s.key: "not available: h2load is not installed "
                                    "(apt-get install -y nghttp2-client)" for s in specs}
            return
        have = self.versions
        ok = "hypercorn" in have
        peer = ServerSpec("hypercorn", "hypercorn (h2)", "hypercorn", ok,
                          "" if ok else "hypercorn is not installed in bench/.venv")
        self.extra_specs.append(peer)
        h2specs = [s for s in specs if s.kind == "pagi_ref"] + [peer]
        n = self.p["e1h2_requests"]

        def run(srv):
            runs = []
            for i in range(self.args.repeat or self.p["e1_repeat"]):
                if i:
                    self.wait_quiet()
                s0 = srv.stats()
                r = self.h2load(srv.port, n)
                r["cpu"] = cpu_percent(s0, srv.stats())
                runs.append(r)
            best = max(runs, key=lambda r: r["rps"])
            best["all"] = [round(r["rps"]) for r in runs]
            best["rss"] = srv.stats()["rss"]
            return best

        self.each("E1H2", h2specs, run)

    def h2load(self, port, requests, connections=10, streams=10, path="/"):
        """h2load's requests/s, and p50/p99 from its per-request log."""
        logfile = os.path.join(self.tmp, "h2load-%d.log" % port)
        argv = ["h2load", "-n", str(requests), "-c", str(connections), "-m", str(streams),
                "--log-file", logfile, "http://%s:%d%s" % (HOST, port, path)]
        rc, out, err, _ = run_tool(argv, max(120, requests // 200), self.pin)
        if rc != 0:
            raise RuntimeError("h2load failed (rc=%s): %s" % (rc, (err or out).strip()[-300:]))
        res = parse_h2load(out)
        with open(logfile) as f:
            rows = [line.split("\t") for line in f if line.strip()]
        os.unlink(logfile)
        latencies = sorted(int(r[2]) / 1000.0 for r in rows if len(r) >= 3)
        if latencies:
            res["p50"] = latencies[len(latencies) // 2]
            res["p99"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        res["non200"] = sum(1 for r in rows if len(r) >= 2 and r[1] != "200")
        return res

    def e2(self, specs):
        p = self.p

        def run(srv):
            s0 = srv.stats()
            r = self.loadgen("streams", srv.port, p["e2_dur"] + 60, path=STREAM_PATH,
                             concurrency=p["e2_clients"], duration=p["e2_dur"], timeout=30)
            s1 = srv.stats()
            theory = p["e2_clients"] / 2.0
            return {"rps": r["rps"], "pct": 100.0 * r["rps"] / theory, "p50": r["latency"].get("p50"),
                    "p90": r["latency"].get("p90"), "p99": r["latency"].get("p99"),
                    "max": r["latency"].get("max"), "ok": r["ok"],
                    "bad": sum(v for k, v in r["outcomes"].items() if k != "200"),
                    "cpu": cpu_percent(s0, s1, r["elapsed"]),
                    "rss0": s0["rss"], "rss1": s1["rss"], "lat_all": r["latency"]}

        self.each("E2", specs, run)

    def e3(self, specs):
        total = self.p["e3_bytes"]
        path = "/bytes?total=%d&chunk=65536" % total

        def run(srv):
            s0 = srv.stats()
            # A paced reader, not curl: curl 7.88's --limit-rate lets the first
            # megabytes through at full speed (3 MB took 4 ms), which hides
            # exactly the buffering this experiment looks for.
            py = VENV_PY if os.path.exists(VENV_PY) else sys.executable
            argv = [py, os.path.join(BENCH, "loadgen.py"), "slowread", "--port", str(srv.port),
                    "--path", path, "--rate", "1048576", "--timeout", "30"]
            proc = _spawn(self.pin.load_prefix() + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            peak = s0["rss"]
            limit = time.monotonic() + total / 1048576.0 * 2 + 60
            while proc.poll() is None and time.monotonic() < limit:
                time.sleep(0.25)
                peak = max(peak, srv.stats()["rss"])
            if proc.poll() is None:
                _kill(proc, grace=1.0)
                raise RuntimeError("slow reader did not finish in time")
            out = proc.communicate()[0].decode()
            _children.remove(proc) if proc in _children else None
            s1 = srv.stats()
            d = json.loads(out.splitlines()[-1])
            size, secs = d["body"], d["wall"]
            return {"status": d["status"], "bytes": size, "complete": size == total, "seconds": secs,
                    "rate": size / secs / 1e6 if secs else 0.0, "rss0": s0["rss"], "rss_peak": peak,
                    "growth": peak - s0["rss"], "cpu": cpu_percent(s0, s1)}

        self.each("E3", specs, run)

    def e4(self, specs, tls=None, name="E4"):
        """``tls``: (certfile, keyfile, cafile): E4T, the same downloads over TLS."""
        total = self.p["e4_bytes"]
        big = os.path.join(self.tmp, "file-%d.bin" % total)
        small = os.path.join(self.tmp, "probe.bin")
        with open(small, "wb") as f:
            f.write(b"pagi bench probe\n" * 100)
        with open(big, "wb") as f:
            block = bytes(range(256)) * 4096  # 1 MiB
            left = total
            while left:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n

        repeat = self.p["e4_repeat"]

        def best(srv, path):
            """Best MB/s of `repeat` downloads, or (None, why)."""
            rates = []
            for _ in range(repeat):
                extra = {"cafile": tls[2]} if tls else {}
                r = self.loadgen("download", srv.port, 120, path=path, concurrency=1,
                                 timeout=60, **extra)
                if r["statuses"].get("200") != 1 or r["bytes"] < total:
                    return None, "incomplete: %s" % json.dumps(r)[:200]
                rates.append(r["mb_per_s"])
            return max(rates), ""

        def run(srv):
            out = {}
            out["mem"], out["mem_note"] = best(srv, "/bytes?total=%d&chunk=65536" % total)
            status, body, _ = http_get(srv.port, "/file?path=" + small, timeout=10,
                                       cafile=tls and tls[2])
            with open(small, "rb") as f:
                expected = f.read()
            if status != 200 or body != expected:
                out["file"] = None
                out["file_note"] = ("not yet available: probe answered %d (%d bytes)" % (status, len(body)))
            else:
                out["file"], out["file_note"] = best(srv, "/file?path=" + big)
            out["hwm"] = srv.stats()["hwm"]
            return out

        try:
            self.each(name, specs, run, **({"tls": tls} if tls else {}))
        finally:
            for path in (big, small):
                if os.path.exists(path):
                    os.unlink(path)

    def e4t(self, specs):
        """E4 over TLS: a certificate made with openssl, both servers given
        it with the same options (--ssl-certfile, --ssl-keyfile)."""
        if shutil.which("openssl") is None:
            self.results["E4T"] = {s.key: "not available: no openssl command to make "
                                   "a certificate" for s in specs}
            return
        cert, key = os.path.join(self.tmp, "tls-cert.pem"), os.path.join(self.tmp, "tls-key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=" + HOST,
                        "-addext", "subjectAltName=IP:" + HOST],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=60)
        self.e4(specs, tls=(cert, key, cert), name="E4T")

    def e5(self, specs):
        p = self.p

        def run(srv):
            s0 = srv.stats()
            r = self.loadgen("download", srv.port, 180,
                             path="/bytes?total=%d&chunk=65536" % p["e5_bytes"],
                             concurrency=p["e5_clients"], timeout=60)
            s1 = srv.stats()
            complete = r["statuses"].get("200", 0)
            return {"mbps": r["mb_per_s"], "errors": r["errors"] + (p["e5_clients"] - complete - r["errors"]),
                    "error_kinds": r["error_kinds"], "hwm": s1["hwm"], "rss0": s0["rss"],
                    "cpu": cpu_percent(s0, s1)}

        self.each("E5", specs, run)

    def e6(self, specs):
        p = self.p

        def run(srv):
            r = self.loadgen("streams", srv.port, p["e6_dur"] + p["e6_timeout"] + 60, path=STREAM_PATH,
                             concurrency=p["e6_clients"], duration=p["e6_dur"],
                             timeout=p["e6_timeout"], backoff=0.25)
            oc = r["outcomes"]
            alive = srv.alive()
            try:
                after = http_get(srv.port, "/", timeout=5)[0] if alive else None
            except OSError as exc:
                after = "error: %s" % exc
            out = {"ok": oc.get("200", 0), "s503": oc.get("503", 0),
                   "retry_after": r["retry_after"]["with"],
                   "other": sum(v for k, v in oc.items() if k not in ("200", "503") and not k.startswith("error:")),
                   "errors": r["errors"],
                   "error_kinds": {k[6:]: v for k, v in oc.items() if k.startswith("error:")},
                   "after": after, "alive": alive, "rps": r["rps"]}
            if srv.spec.key == "pagi_ref" and out["s503"] == 0 and out["errors"]:
                out["note"] = "admission control not yet available (no 503 seen)"
            return out

        self.each("E6", specs, run, nofile=p["e6_nofile"])

    def e7(self, specs):
        p = self.p

        def run(srv):
            time.sleep(0.5)  # let the second worker come up
            s0 = srv.stats()
            r = self.loadgen("streams", srv.port, p["e7_dur"] + 60, path=STREAM_PATH,
                             concurrency=p["e7_clients"], duration=p["e7_dur"], timeout=30)
            s1 = srv.stats()
            theory = p["e7_clients"] / 2.0
            out = {"rps": r["rps"], "pct": 100.0 * r["rps"] / theory, "p50": r["latency"].get("p50"),
                   "p99": r["latency"].get("p99"), "errors": r["errors"],
                   "bad": sum(v for k, v in r["outcomes"].items() if k != "200"),
                   "cpu": cpu_percent(s0, s1, r["elapsed"]), "procs": s0["procs"], "rss1": s1["rss"]}
            if s0["procs"] < 2:
                out["note"] = "--workers 2 accepted but only %d process seen" % s0["procs"]
            return out

        self.each("E7", specs, run, workers=2)

    def e8(self, specs):
        n = self.p["e8_conns"]

        def run(srv):
            time.sleep(0.3)
            s0 = srv.stats()
            py = VENV_PY if os.path.exists(VENV_PY) else sys.executable
            argv = self.pin.load_prefix() + [py, os.path.join(BENCH, "loadgen.py"), "idle",
                                             "--port", str(srv.port), "--count", str(n),
                                             "--timeout", "30", "--hold", "120"]
            proc = _spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                ready = json.loads(_readline(proc.stdout, 90) or b"{}")
                if "ready" not in ready:
                    raise RuntimeError("idle clients did not report ready (rc=%s)" % proc.poll())
                time.sleep(1.0)
                s1 = srv.stats()
                proc.stdin.write(b"go\n")
                proc.stdin.flush()
                final = json.loads(_readline(proc.stdout, 90) or b"{}")
            finally:
                _kill(proc, grace=2.0)
            held = ready["ready"]
            return {"held": held, "open_errors": sum(ready["open_errors"].values()),
                    "rss0": s0["rss"], "rss1": s1["rss"],
                    "per_conn": (s1["rss"] - s0["rss"]) / held if held else None,
                    "fds": s1["fds"], "answered": final.get("answered_after_idle")}

        self.each("E8", specs, run, keepalive=120)

    def e9(self, specs):
        p = self.p
        use_hey = bool(self.tools["hey"])

        def run(srv):
            fresh = srv.stats()
            if use_hey:
                self.hey(srv.port, requests=p["e9_warm"])
            else:
                self.wrk(srv.port, 2)
            time.sleep(0.5)
            s0 = srv.stats()
            if use_hey:
                r = self.hey(srv.port, requests=p["e9_requests"])
                done, rps, errors = r["ok"], r["rps"], r["errors"] + r["non200"]
            else:
                w = self.wrk(srv.port, max(5, int(p["e9_requests"] / max(self._e1_rps(srv.spec.key), 1000))))
                done, rps, errors = w["requests"], w["rps"], w["errors"]
            time.sleep(1.0)  # let the server close the load's connections
            s1 = srv.stats()
            return {"requests": done, "rps": rps, "errors": errors, "rss_fresh": fresh["rss"],
                    "rss0": s0["rss"], "rss1": s1["rss"], "growth": s1["rss"] - s0["rss"],
                    "fds0": s0["fds"], "fds1": s1["fds"], "cpu": cpu_percent(s0, s1)}

        if not (self.tools["hey"] or self.tools["wrk"]):
            for spec in specs:
                self.results.setdefault("E9", {})[spec.key] = "not available: neither hey nor wrk"
            return
        self.each("E9", specs, run)

    def profile_e1(self, specs):
        """pagi_ref under cProfile with E1's wrk load: the top functions by own time."""
        spec = next((s for s in specs if s.key == "pagi_ref"), None)
        if spec is None or not spec.available or not self.tools["wrk"]:
            return
        import io
        import pstats
        prof = os.path.join(self.tmp, "e1.prof")
        log("profile: pagi_ref under cProfile with wrk")
        self.wait_quiet()
        try:
            srv = self.start(spec, tag="-profile", wrapper=[
                sys.executable, os.path.join(BENCH, "profile_server.py"), prof])
        except NotAvailable as exc:
            self.profile = "profile not available: %s" % exc
            return
        try:
            w = self.wrk(srv.port, self.p["e1_wrk"])
        finally:
            self.stop(srv)
        if not os.path.exists(prof):
            self.profile = "the profiler wrote no stats (did pagi_ref exit cleanly on SIGTERM?)"
            return
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("tottime").print_stats(30)
        text = buf.getvalue().replace(ROOT + "/", "").replace(os.path.dirname(os.__file__) + "/", "")
        text = text[text.find("   ncalls"):] if "   ncalls" in text else text
        self.profile = ("wrk -t1 -c50 -d%ds under cProfile: %s requests/s (%s requests; the profiler "
                        "slows everything, compare shares, not speeds). Top 30 by own time:\n\n```\n%s\n```"
                        % (self.p["e1_wrk"], f_int(w["rps"]), f_int(w["requests"]), text.rstrip()))

    def _e1_rps(self, key):
        r = self.results.get("E1", {}).get(key)
        return r.get("wrk_rps", 0) if isinstance(r, dict) else 0


def _readline(stream, timeout):
    """A line from a subprocess pipe, or b"" after `timeout` seconds."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    fd = stream.fileno()
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(left):
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    sel.close()
    return buf.split(b"\n", 1)[0]


def _short(value):
    if isinstance(value, dict):
        return ", ".join("%s=%s" % (k, _fmt_short(v)) for k, v in value.items()
                         if not isinstance(v, dict))[:200]
    return str(value)


def _fmt_short(v):
    return "%.4g" % v if isinstance(v, float) else v


# --------------------------------------------------------------------------
# Parsing wrk and hey
# --------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def parse_wrk(text):
    """Requests/s, latency percentiles (ms), errors (socket errors + non-2xx/3xx)."""
    out = {"rps": 0.0, "errors": 0, "requests": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        out["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in", text)
    if m:
        out["requests"] = int(m.group(1))
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M):
        out["p" + pct] = float(value) * _UNITS[unit]
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["errors"] += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        out["errors"] += int(m.group(1))
    return out


def parse_h2load(text):
    """h2load's summary: requests/s, succeeded, failed, errored."""
    out = {"rps": 0.0, "ok": 0, "errors": 0}
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    if m:
        out["rps"] = float(m.group(1))
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", text)
    if m:
        out["ok"] = int(m.group(1))
        out["errors"] = int(m.group(2)) + int(m.group(3)) + int(m.group(4))
    return out


def parse_hey(text):
    """Requests/s, latency percentiles (ms), 200 count, non-200, errors."""
    out = {"rps": 0.0, "errors": 0, "ok": 0, "non200": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        out["rps"] = float(m.group(1))
    for pct, value in re.findall(r"^\s+(10|25|50|75|90|95|99)% in ([\d.]+) secs", text, re.M):
        out["p" + pct] = float(value) * 1000.0
    for code, count in re.findall(r"^\s+\[(\d+)\]\s+(\d+) responses", text, re.M):
        if code == "200":
            out["ok"] += int(count)
        else:
            out["non200"] += int(count)
    if "Error distribution:" in text:
        tail = text.split("Error distribution:", 1)[1]
        out["errors"] = sum(int(c) for c in re.findall(r"^\s+\[(\d+)\]\s", tail, re.M))
    return out


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------

def f_int(v):
    return "{:,.0f}".format(v)


def f_1(v):
    return "{:,.1f}".format(v)


def f_2(v):
    return "{:,.2f}".format(v)


def f_ms(v):
    return "%.2f ms" % v if v < 100 else "%.0f ms" % v


def f_s(v):
    return "%.3f s" % v


def f_mb(v):
    return "%.1f MB" % (v / 1e6)


def f_kb(v):
    return "%.1f KB" % (v / 1e3)


def f_pct(v):
    return "%.1f%%" % v


def f_plain(v):
    return str(v)


# experiment -> (title, what, [(key, label, formatter, better)])  better: "high", "low" or None
FIGURES = {
    "E1": ("Trivial response", "`wrk -t1 -c50 -d{e1_wrk}s --latency` and `hey -z {e1_hey}s -c 50` on `/` "
           "(13-byte body); best of {e1_repeat} runs of each by requests/s (errors: all runs).", [
        ("wrk_rps", "wrk requests/s", f_int, "high"),
        ("wrk_p50", "wrk p50", f_ms, "low"),
        ("wrk_p90", "wrk p90", f_ms, "low"),
        ("wrk_p99", "wrk p99", f_ms, "low"),
        ("wrk_errors", "wrk errors (socket + non-2xx)", f_int, "low"),
        ("cpu", "server CPU % (during wrk)", f_pct, None),
        ("hey_rps", "hey requests/s", f_int, "high"),
        ("hey_p50", "hey p50", f_ms, "low"),
        ("hey_p99", "hey p99", f_ms, "low"),
        ("hey_errors", "hey errors", f_int, "low"),
        ("rss", "server RSS after", f_mb, "low"),
    ]),
    "E2": ("500 concurrent 2-second streams", "{e2_clients} clients, each repeating "
           "`GET " + STREAM_PATH + "` (20 chunks 100 ms apart) on a keep-alive connection for "
           "{e2_dur} s; theoretical {e2_theory:.0f} responses/s.", [
        ("rps", "responses/s", f_1, "high"),
        ("pct", "% of theoretical", f_pct, "high"),
        ("p50", "p50", f_s, "low"),
        ("p90", "p90", f_s, "low"),
        ("p99", "p99", f_s, "low"),
        ("max", "max", f_s, "low"),
        ("bad", "non-200 + errors", f_int, "low"),
        ("cpu", "server CPU %", f_pct, "low"),
        ("rss0", "server RSS start", f_mb, "low"),
        ("rss1", "server RSS end", f_mb, "low"),
    ]),
    "E3": ("Slow reader", "A paced reader at 1 MiB/s (bench/loadgen.py slowread, like `curl --limit-rate 1M`) reads a {e3_mb:.0f} MB `/bytes` response; "
           "server RSS sampled every 0.25 s.", [
        ("seconds", "duration", f_s, None),
        ("rate", "achieved MB/s", f_2, None),
        ("complete", "complete body", f_plain, "none"),
        ("rss0", "server RSS start", f_mb, "low"),
        ("rss_peak", "server RSS peak", f_mb, "low"),
        ("growth", "server RSS growth", f_mb, "low"),
        ("cpu", "server CPU %", f_pct, "low"),
    ]),
    "E4": ("One connection, large body", "One client downloads {e4_mb:.0f} MB from `/bytes` "
           "(64 KiB chunks from memory) and from `/file` (pagi_ref: `file` body; uvicorn: 64 KiB read loop); "
           "best of {e4_repeat} downloads each.", [
        ("mem", "from memory MB/s", f_int, "high"),
        ("file", "from a file MB/s", f_int, "high"),
        ("hwm", "server peak RSS", f_mb, "low"),
    ]),
    "E4T": ("One connection, large body, over TLS", "E4 over TLS: one client (the stdlib "
            "`ssl` module, in a thread) downloads {e4_mb:.0f} MB from `/bytes` and from `/file` "
            "over TLS 1.3 (a P-256 certificate made with openssl; both servers given "
            "`--ssl-certfile`/`--ssl-keyfile`); best of {e4_repeat} downloads each. pagi_ref "
            "sends a file body over TLS by 64 KiB reads (no sendfile).", [
        ("mem", "from memory MB/s", f_int, "high"),
        ("file", "from a file MB/s", f_int, "high"),
        ("hwm", "server peak RSS", f_mb, "low"),
    ]),
    "E1H2": ("Trivial response over HTTP/2", "`h2load -n {e1h2_requests} -c 10 -m 10` on `/`, "
             "cleartext with prior knowledge (h2c): 10 connections, 10 concurrent streams each; "
             "p50/p99 from h2load's per-request log; hypercorn (with `h2`) is the peer.", [
        ("rps", "requests/s", f_int, "high"),
        ("p50", "p50", f_ms, "low"),
        ("p99", "p99", f_ms, "low"),
        ("errors", "errors", f_int, "low"),
        ("non200", "non-200", f_int, "low"),
        ("cpu", "server CPU %", f_pct, "low"),
    ]),
    "E5": ("50 concurrent downloads", "{e5_clients} concurrent downloads of {e5_mb:.0f} MB each "
           "from `/bytes`.", [
        ("mbps", "aggregate MB/s", f_int, "high"),
        ("errors", "errors / incomplete", f_int, "low"),
        ("hwm", "server peak RSS", f_mb, "low"),
        ("cpu", "server CPU %", f_pct, None),
    ]),
    "E6": ("Overload", "Server under `ulimit -n {e6_nofile}`; {e6_clients} concurrent clients repeat "
           "the 2-second stream for {e6_dur} s (per-request timeout {e6_timeout} s; a client waits "
           "0.25 s after a non-200 or an error).", [
        ("ok", "200 responses", f_int, "high"),
        ("s503", "503 responses", f_int, None),
        ("retry_after", "503 with Retry-After", f_int, None),
        ("other", "other statuses", f_int, "low"),
        ("errors", "client errors", f_int, "low"),
        ("after", "GET / after the load", f_plain, "none"),
    ]),
    "E7": ("Two workers", "`--workers 2` (all on the server CPU), {e7_clients} concurrent 2-second "
           "streams for {e7_dur} s; theoretical {e7_theory:.0f} responses/s.", [
        ("rps", "responses/s", f_1, "high"),
        ("pct", "% of theoretical", f_pct, "high"),
        ("p50", "p50", f_s, "low"),
        ("p99", "p99", f_s, "low"),
        ("bad", "non-200 + errors", f_int, "low"),
        ("cpu", "server CPU % (all processes)", f_pct, "low"),
        ("procs", "server processes", f_int, "none"),
    ]),
    "E8": ("Idle keep-alive connections", "{e8_conns} connections, one request each, then held "
           "idle (keep-alive timeout raised to 120 s on every server).", [
        ("held", "connections held", f_int, "high"),
        ("rss0", "server RSS before", f_mb, "low"),
        ("rss1", "server RSS with them", f_mb, "low"),
        ("per_conn", "RSS per connection", f_kb, "low"),
        ("fds", "server open fds", f_int, "none"),
        ("answered", "answered again after idle", f_int, "high"),
    ]),
    "E9": ("Soak", "{e9_requests} keep-alive requests on `/` (hey -c 50 -n ...) after a "
           "{e9_warm}-request warm-up; RSS and fds measured after warm-up and after the soak.", [
        ("requests", "requests answered 200", f_int, "high"),
        ("rps", "requests/s", f_int, "high"),
        ("errors", "errors", f_int, "low"),
        ("rss_fresh", "RSS fresh", f_mb, "low"),
        ("rss0", "RSS after warm-up", f_mb, "low"),
        ("rss1", "RSS after soak", f_mb, "low"),
        ("growth", "RSS growth", f_mb, "low"),
        ("fds0", "open fds before", f_int, None),
        ("fds1", "open fds after", f_int, None),
    ]),
}

COLORS = {"pagi_ref": "#d62728", "uvicorn-httptools": "#1f77b4", "uvicorn-h11": "#2ca02c",
          "ceiling": "#7f7f7f", "hypercorn": "#9467bd"}


def _ratio(a, b, better):
    if better == "none":
        return ""
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or isinstance(a, bool):
        return ""
    if b == 0:
        return "" if a == 0 else "—"
    return "%.2f×" % (a / b)


def render_report(bench, specs, started, finished, svg_name):
    p = dict(bench.p)
    p["e1_repeat"] = bench.args.repeat or p["e1_repeat"]
    p.update(e2_theory=p["e2_clients"] / 2.0, e7_theory=p["e7_clients"] / 2.0,
             e3_mb=p["e3_bytes"] / 1e6, e4_mb=p["e4_bytes"] / 1e6, e5_mb=p["e5_bytes"] / 1e6)
    keys = [s.key for s in specs]
    labels = {s.key: s.label for s in specs}
    peers = [k for k in keys if k != "pagi_ref"]
    L = []
    L.append("# pagi_ref bench — %s" % started.strftime("%Y-%m-%d %H:%M"))
    L.append("")
    L.append("Mode: **%s**. Command: `python bench/run.py%s`. Duration: %.0f s." % (
        "quick" if bench.args.quick else "full", " --quick" if bench.args.quick else "",
        (finished - started).total_seconds()))
    L.append("")
    L.append("## Machine")
    L.append("")
    for line in machine_lines(bench):
        L.append("- " + line)
    L.append("")
    L.append("Servers (one process each, access log off, 127.0.0.1, a free port):")
    L.append("")
    for s in specs:
        L.append("- **%s**: `%s`%s" % (s.label, " ".join(_display_argv(s)),
                                       "" if s.available else " — not available: " + s.why))
    L.append("")
    if bench.notes:
        L.append("Notes: " + "; ".join(bench.notes) + ".")
        L.append("")
    if bench.noisy:
        L.append("**Noise warning**: other processes on this machine used more than 10%% of a CPU "
                 "during: %s. Those figures are less trustworthy; rerun when the machine is quiet."
                 % ", ".join(bench.noisy))
        L.append("")
    L.append("Ratios are pagi_ref / peer for every figure (higher is better for rates, lower for "
             "latency, CPU and memory). MB = 10^6 bytes.")
    L.append("")
    L.append("Chart of E1 and E2 latency percentiles: [%s](%s)" % (svg_name, svg_name))
    L.append("")
    L.append("![latency percentiles](%s)" % svg_name)
    L.append("")
    goals = evaluate_goals(bench)
    if goals:
        L.append("## Goals (issue 6 and DESIGN.md \"The bar\")")
        L.append("")
        L.append("| goal | figure | verdict |")
        L.append("|---|---|---|")
        for g in goals:
            L.append("| %s | %s | %s |" % g)
        L.append("")
    for name in EXPERIMENTS:
        table = bench.results.get(name)
        if not table:
            continue
        title, what, figs = FIGURES[name]
        L.append("## %s — %s" % (name, title))
        L.append("")
        L.append(what.format(**p))
        L.append("")
        cols = [k for k in keys if k in table]
        rkeys = [k for k in peers if k in cols and "pagi_ref" in cols]
        head = "| figure | " + " | ".join(labels[k] for k in cols)
        head += "".join(" | pagi_ref / %s" % labels[k].split(" (")[0] for k in rkeys) + " |"
        L.append(head)
        L.append("|---" * (1 + len(cols) + len(rkeys)) + "|")
        unavailable = {k: table[k] for k in cols if not isinstance(table[k], dict)}
        for key, label, fmt, better in figs + [("bg_cpu", "other processes' CPU % (noise)", f_pct, "none")]:
            row = [label]
            present = False
            for k in cols:
                v = table[k].get(key) if isinstance(table[k], dict) else None
                if v is None:
                    row.append("—" if isinstance(table[k], dict) else "n/a")
                else:
                    present = True
                    row.append(fmt(v))
            if not present:
                continue
            a = table["pagi_ref"].get(key) if isinstance(table.get("pagi_ref"), dict) else None
            for k in rkeys:
                b = table[k].get(key) if isinstance(table[k], dict) else None
                row.append(_ratio(a, b, better))
            L.append("| " + " | ".join(row) + " |")
        L.append("")
        for k, reason in unavailable.items():
            L.append("- %s: %s" % (labels[k], reason))
        for k in cols:
            if isinstance(table[k], dict):
                for note_key in ("note", "mem_note", "file_note"):
                    if table[k].get(note_key):
                        L.append("- %s: %s" % (labels[k], table[k][note_key]))
                if table[k].get("wrk_all"):
                    L.append("- %s wrk requests/s of each run: %s" % (
                        labels[k], ", ".join(f_int(x) for x in table[k]["wrk_all"])))
                if table[k].get("error_kinds"):
                    L.append("- %s error kinds: %s" % (labels[k], ", ".join(
                        "%s %d" % kv for kv in sorted(table[k]["error_kinds"].items()))))
        L.append("")
    if bench.profile:
        L.append("## Profile of pagi_ref under E1")
        L.append("")
        L.append(bench.profile)
        L.append("")
    if bench.observations:
        L.append("## Observations")
        L.append("")
        for o in bench.observations:
            L.append("- " + o)
        L.append("")
    return "\n".join(L) + "\n"


def _display_argv(spec):
    if spec.kind == "pagi_ref":
        return ["python", "pagi_ref.py", "bench/apps.py:app", "--port", "P", "--no-access-log"]
    if spec.kind == "ceiling":
        return ["python", "bench/ceiling.py", "--port", "P"]
    if spec.kind == "hypercorn":
        return ["hypercorn", "bench.asgi_apps:app", "--bind", "127.0.0.1:P",
                "--config", "bench/hypercorn.toml"]
    a = spec.argv(0)
    return ["uvicorn", "asgi_apps:app", "--app-dir", "bench"] + a[a.index("--http"):]


def machine_lines(bench):
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = "%.1f GiB" % (int(f.readline().split()[1]) / 1048576)
    except (OSError, ValueError, IndexError):
        pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    v = bench.versions
    return [
        "CPU: %s, nproc %d; memory %s; kernel %s" % (model, os.cpu_count(), mem, platform.release()),
        "Python %s (pagi_ref and the ceiling run on `%s`)" % (platform.python_version(), sys.executable),
        "Peers: uvicorn %s, httptools %s, uvloop %s, h11 %s; hypercorn %s with h2 %s "
        "(bench/.venv)" % tuple(v.get(k, "missing") for k in
                                ("uvicorn", "httptools", "uvloop", "h11", "hypercorn", "h2")),
        "Load: %s, %s, bench/loadgen.py" % (v.get("wrk", "wrk missing"), v.get("hey", "hey missing")),
        "Pinning: %s; RLIMIT_NOFILE %d/%d" % (bench.pin.describe(), soft, hard),
    ]


def evaluate_goals(bench):
    R = bench.results
    out = []

    def get(exp, key, field):
        r = R.get(exp, {}).get(key)
        return r.get(field) if isinstance(r, dict) else None

    def ratio_goal(text, exp, field, peer, factor, higher=True):
        a, b = get(exp, "pagi_ref", field), get(exp, peer, field)
        if a is None or b is None or b == 0:
            return
        r = a / b
        if higher:
            met = r >= factor
            verdict = "met" if met else "**not met**: %.2f× (%.0f%% short)" % (r, 100 * (1 - r / factor))
        else:
            met = r < factor
            verdict = "met" if met else "**not met**: %.2f×" % r
        out.append((text, "%.2f×" % r, verdict))

    def abs_goal(text, value, ok, shown):
        if value is None:
            return
        out.append((text, shown, "met" if ok else "**not met**"))

    ratio_goal("E1 requests/s ≥ 1.25× uvicorn httptools", "E1", "wrk_rps", "uvicorn-httptools", 1.25)
    ratio_goal("E1 requests/s ≥ 3× uvicorn h11", "E1", "wrk_rps", "uvicorn-h11", 3.0)
    ratio_goal("E1 p99 lower than uvicorn httptools", "E1", "wrk_p99", "uvicorn-httptools", 1.0, higher=False)
    ratio_goal("E1 p99 lower than uvicorn h11", "E1", "wrk_p99", "uvicorn-h11", 1.0, higher=False)
    pct = get("E2", "pagi_ref", "pct")
    if pct is not None:
        abs_goal("E2 ≥ 99% of theoretical (bar: 97%)", pct, pct >= 99, "%.1f%%" % pct)
        p99 = get("E2", "pagi_ref", "p99")
        abs_goal("E2 p99 under 2.4 s (bar)", p99, p99 is not None and p99 < 2.4, "%.3f s" % (p99 or 0))
    ratio_goal("E2 less CPU than uvicorn httptools", "E2", "cpu", "uvicorn-httptools", 1.0, higher=False)
    ratio_goal("E2 less CPU than uvicorn h11", "E2", "cpu", "uvicorn-h11", 1.0, higher=False)
    g = get("E3", "pagi_ref", "growth")
    if g is not None:
        abs_goal("E3 RSS growth < 0.5 MB", g, g < 0.5e6, "%.2f MB" % (g / 1e6))
    ratio_goal("E4 from memory ≥ uvicorn httptools", "E4", "mem", "uvicorn-httptools", 1.0)
    a, b = get("E4", "pagi_ref", "file"), get("E4", "uvicorn-httptools", "mem")
    if a is not None and b:
        r = a / b
        out.append(("E4 from a file ≥ 1.5× uvicorn httptools from memory", "%.2f×" % r,
                    "met" if r >= 1.5 else "**not met**: %.2f× (%.0f%% short)" % (r, 100 * (1 - r / 1.5))))
    e6 = R.get("E6", {}).get("pagi_ref")
    if isinstance(e6, dict):
        ok = e6["errors"] == 0 and e6["other"] == 0 and e6["retry_after"] == e6["s503"]
        out.append(("E6 no client errors; every rejection 503 + Retry-After",
                    "%d errors, %d 503 (%d with Retry-After)" % (e6["errors"], e6["s503"], e6["retry_after"]),
                    "met" if ok else "**not met**"))
    for peer in ("uvicorn-httptools", "uvicorn-h11"):
        a, b = get("E8", "pagi_ref", "per_conn"), get("E8", peer, "per_conn")
        if a is not None and b:
            r = a / b
            out.append(("E8 RSS per idle connection ≤ 0.5× %s" % peer, "%.2f×" % r,
                        "met" if r <= 0.5 else "**not met**: %.2f×" % r))
    g = get("E9", "pagi_ref", "growth")
    if g is not None:
        f0, f1 = get("E9", "pagi_ref", "fds0"), get("E9", "pagi_ref", "fds1")
        abs_goal("E9 RSS growth < 1 MB", g, g < 1e6, "%.2f MB" % (g / 1e6))
        abs_goal("E9 open fds back to the start", f1, f1 == f0, "%s → %s" % (f0, f1))
    return out


def render_svg(bench, specs):
    """Grouped bars: E1 (wrk) and E2 latency percentiles per server."""
    panels = []
    e1 = bench.results.get("E1", {})
    e2 = bench.results.get("E2", {})
    series1 = [(s, [e1[s.key].get(k) for k in ("wrk_p50", "wrk_p75", "wrk_p90", "wrk_p99")])
               for s in specs if isinstance(e1.get(s.key), dict) and e1[s.key].get("wrk_p50") is not None]
    if series1:
        panels.append(("E1 trivial response: wrk latency (ms)", ["p50", "p75", "p90", "p99"], series1, "ms"))
    series2 = [(s, [(e2[s.key]["lat_all"].get(k) or 0) * 1000 for k in ("p50", "p75", "p90", "p99", "max")])
               for s in specs if isinstance(e2.get(s.key), dict) and e2[s.key].get("lat_all")]
    if series2:
        panels.append(("E2 500 concurrent 2-s streams: latency (ms)", ["p50", "p75", "p90", "p99", "max"],
                       series2, "ms"))
    width, ph, top = 880, 300, 40
    height = top + len(panels) * (ph + 40) if panels else 120
    o = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" '
         'font-size="11">' % (width, height),
         '<rect width="100%" height="100%" fill="white"/>',
         '<text x="10" y="20" font-size="14" font-weight="bold">pagi_ref bench: latency percentiles '
         '(lower is better)</text>']
    if not panels:
        o.append('<text x="10" y="60">no latency figures in this run</text>')
    y0 = top
    for title, groups, series, unit in panels:
        left, right = 60, width - 200
        plot_h = ph - 60
        base = y0 + 30 + plot_h
        vmax = max(v or 0 for _, vals in series for v in vals) or 1.0
        if title.startswith("E2"):
            vmin = min(v for _, vals in series for v in vals if v) * 0.98
            vmin = int(vmin / 100) * 100
        else:
            vmin = 0.0
        span = (vmax - vmin) * 1.1 or 1.0
        o.append('<text x="%d" y="%d" font-size="13" font-weight="bold">%s</text>' % (10, y0 + 15, _esc(title)))
        for i in range(5):
            v = vmin + span * i / 4
            y = base - plot_h * i / 4
            o.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#ddd"/>' % (left, y, right, y))
            o.append('<text x="%d" y="%.1f" text-anchor="end">%s</text>' % (left - 4, y + 4, _num(v)))
        gw = (right - left) / len(groups)
        bw = (gw - 12) / max(1, len(series))
        for gi, g in enumerate(groups):
            gx = left + gi * gw + 6
            o.append('<text x="%.1f" y="%d" text-anchor="middle">%s</text>' % (gx + (gw - 12) / 2, base + 14, g))
            for si, (spec, vals) in enumerate(series):
                v = vals[gi] or 0
                h = max(0.0, plot_h * (v - vmin) / span)
                x = gx + si * bw
                o.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s %s: %s %s'
                         '</title></rect>' % (x, base - h, bw - 1, h, COLORS.get(spec.key, "#000"),
                                              _esc(spec.label), g, _num(v), unit))
                if bw >= 24:
                    o.append('<text x="%.1f" y="%.1f" text-anchor="middle" font-size="9">%s</text>'
                             % (x + bw / 2, base - h - 2, _num(v)))
        if vmin:
            o.append('<text x="%d" y="%d" font-size="9" fill="#666">axis starts at %s %s</text>'
                     % (left, base + 28, _num(vmin), unit))
        for si, (spec, _) in enumerate(series):
            ly = y0 + 40 + si * 18
            o.append('<rect x="%d" y="%d" width="12" height="12" fill="%s"/>' % (right + 15, ly, COLORS.get(spec.key, "#000")))
            o.append('<text x="%d" y="%d">%s</text>' % (right + 32, ly + 10, _esc(spec.label)))
        y0 += ph + 40
    o.append("</svg>")
    return "\n".join(o) + "\n"


def _num(v):
    if v >= 100:
        return "%.0f" % v
    if v >= 10:
        return "%.1f" % v
    return "%.2f" % v


def _esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

EXPERIMENTS = ["E1", "E1H2", "E2", "E3", "E4", "E4T", "E5", "E6", "E7", "E8", "E9"]


def main(argv=None):
    ap = argparse.ArgumentParser(description="Run the pagi_ref bench (see bench/README.md).")
    ap.add_argument("--quick", action="store_true", help="small sizes: under two minutes")
    ap.add_argument("--only", help="comma-separated experiments, e.g. E1,E2")
    ap.add_argument("--servers", help="comma-separated: pagi_ref,uvicorn-httptools,uvicorn-h11,ceiling")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get or pip install anything")
    ap.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    ap.add_argument("--out", default=RESULTS, help="report directory (default bench/results)")
    ap.add_argument("--repeat", type=int, default=0,
                    help="E1: runs of wrk and of hey per server, the best one reported "
                         "(default 3, --quick 1)")
    ap.add_argument("--profile", action="store_true",
                    help="also run E1's wrk load against pagi_ref under cProfile and report the top functions")
    args = ap.parse_args(argv)
    args.only = set(x.strip().upper() for x in args.only.split(",")) if args.only else None
    args.servers = set(x.strip() for x in args.servers.split(",")) if args.servers else None

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    atexit.register(kill_all)
    bench = Bench(args)
    started = datetime.datetime.now()
    specs = []
    try:
        bench.ensure_tools()
        have = bench.ensure_venv()
        specs = bench.server_specs(have)
        servers = [s for s in specs if s.kind != "ceiling"]
        log("servers: %s; %s" % (", ".join("%s%s" % (s.key, "" if s.available else " (n/a)")
                                         for s in specs), bench.pin.describe()))
        for name in EXPERIMENTS:
            if args.only and name not in args.only:
                continue
            fn = getattr(bench, name.lower())
            fn(specs if name == "E1" else servers)
            if name == "E1" and args.profile:
                bench.profile_e1(specs)
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
        bench.notes.append("run interrupted")
    finally:
        kill_all()
        shutil.rmtree(bench.tmp, ignore_errors=True)
    finished = datetime.datetime.now()
    os.makedirs(args.out, exist_ok=True)
    stem = started.strftime("%Y-%m-%d-%H%M") + ("-quick" if args.quick else "")
    svg_name = stem + ".svg"
    shown = [s for s in specs + bench.extra_specs
             if any(s.key in t for t in bench.results.values())]
    with open(os.path.join(args.out, svg_name), "w") as f:
        f.write(render_svg(bench, shown))
    report = os.path.join(args.out, stem + ".md")
    with open(report, "w") as f:
        f.write(render_report(bench, shown, started, finished, svg_name))
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"mode": "quick" if args.quick else "full", "params": bench.p,
                   "results": bench.results, "notes": bench.notes,
                   "observations": bench.observations}, f, indent=1, default=str)
    log("report: %s (%.0f s)" % (os.path.relpath(report), (finished - started).total_seconds()))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
