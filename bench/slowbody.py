#!/usr/bin/env python3
"""bench/slowbody.py -- the slow-body experiment of issue 9, standalone.

    python bench/slowbody.py                  # slowhttptest if installed; about 2 minutes
    python bench/slowbody.py --tool python --seconds 30 --slow 300
    python bench/slowbody.py --json out.json  # also write the figures

A fresh `python pagi_ref.py bench/apps.py:app` on 127.0.0.1, under
RLIMIT_NOFILE 1024 as by `ulimit -n 1024` (so --max-connections takes its
default, 960), is attacked by `--slow` (1100) clients that each start a
POST /upload with `Content-Length: 8192` and then send a few body bytes
every `--interval` (10) seconds: `slowhttptest -B -c 1100` (R-U-Dead-Yet)
when it is installed (`apt-get install -y slowhttptest`), else a Python
trickler doing the same.  Meanwhile a normal client sends `GET /` on a new
connection every 50 ms and records what it gets, second by second.

Two runs: first with the minimum body rate off (`--body-min-rate 0`, the
server as it was before issue 9), then with the defaults (`--body-grace 20
--body-min-rate 500`).  Recorded per run: the normal client's 200s, 503s
and errors in 5-second windows, the last second a 503 was seen, the
server's peak descriptors, and its EMFILE log lines.  The goal: with the
defaults, no 503 for the normal client after the grace period.

Everything targets 127.0.0.1, every run is bounded by `--seconds`, every
child runs in its own process group and is killed on exit.  With two or
more CPUs the server is pinned to the first and the load to the others.
"""
import argparse
import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

from overload import HOST, Sampler, Server, _children, _cpus, _kill, _kill_all, _preexec  # noqa: E402

WINDOW = 5          # seconds per line of the timeline
BODY_SIZE = 8192    # the Content-Length the slow clients declare


def log(msg):
    print("[slowbody %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


# -- the slow clients ------------------------------------------------------------

class SlowHTTPTest:
    """slowhttptest -B: slow body (R-U-Dead-Yet)."""

    def __init__(self, port, count, interval, seconds, cpus):
        self.prefix = "/tmp/pagi_bench_slowbody_%d" % os.getpid()
        argv = ["slowhttptest", "-B", "-c", str(count), "-i", str(interval),
                "-r", "200", "-s", str(BODY_SIZE), "-x", "10", "-p", "3",
                "-l", str(seconds), "-u", "http://%s:%d/upload" % (HOST, port)]
        self.argv = argv
        # slowhttptest needs a descriptor per connection too.
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT,
                                  preexec_fn=_preexec(count + 256, cpus))
        _children.append(self.p)
        self.out = b""
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        for chunk in iter(lambda: self.p.stdout.read(4096), b""):
            self.out += chunk

    def stop(self, timeout):
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill(self.p)
        self.t.join(5)
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", self.out.decode("utf-8", "replace"))
        # The last status block slowhttptest printed.
        blocks = text.split("slow HTTP test status on")
        last = blocks[-1] if len(blocks) > 1 else text[-600:]
        status = {}
        for key in ("initializing", "pending", "connected", "error", "closed",
                    "service available"):
            m = re.search(r"%s:\s+(\S+)" % key, last)
            if m:
                status[key] = m.group(1)
        return {"tool": " ".join(self.argv), "last_status": status}


class Trickler:
    """The same attack in Python: `count` connections opened at 200 per
    second, each a POST /upload declaring BODY_SIZE bytes, then 10 bytes
    every `interval` seconds.  Records what the server answers."""

    def __init__(self, port, count, interval, seconds, cpus):
        self.port, self.count, self.interval, self.seconds = port, count, interval, seconds
        self.answers = {}          # first status line bytes -> count
        self.open_errors = 0
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        sel = selectors.DefaultSelector()
        conns = {}
        t0 = time.monotonic()
        next_tick = t0 + self.interval
        head = ("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n\r\n" % BODY_SIZE).encode()
        opened = 0
        try:
            while not self._stop.is_set() and time.monotonic() - t0 < self.seconds:
                want = min(self.count, int((time.monotonic() - t0) * 200) + 1)
                while opened < want:
                    opened += 1
                    try:
                        s = socket.create_connection((HOST, self.port), timeout=2)
                        s.sendall(head)
                        s.setblocking(False)
                    except OSError:
                        self.open_errors += 1
                        continue
                    conns[s] = b""
                    sel.register(s, selectors.EVENT_READ)
                if time.monotonic() >= next_tick:
                    for s in list(conns):
                        try:
                            s.send(b"&aaaa=bbbb")
                        except OSError:
                            pass
                    next_tick += self.interval
                for key, _ in sel.select(0.05):
                    s = key.fileobj
                    try:
                        data = s.recv(4096)
                    except OSError:
                        data = b""
                    if data and not conns[s]:
                        conns[s] = data
                    if not data:
                        line = conns.pop(s).split(b"\r\n", 1)[0][:12].decode("latin-1") or "closed"
                        self.answers[line] = self.answers.get(line, 0) + 1
                        sel.unregister(s)
                        s.close()
        finally:
            for s in conns:
                s.close()
            sel.close()

    def stop(self, timeout):
        self._stop.set()
        self.t.join(timeout)
        return {"tool": "python trickler: %d connections, 10 bytes every %d s"
                        % (self.count, self.interval),
                "server_answers": self.answers, "open_errors": self.open_errors}


# -- the normal client ------------------------------------------------------------

class NormalClient:
    """GET / on a new connection every 50 ms; (seconds since start, outcome)."""

    def __init__(self, port, seconds):
        self.port, self.seconds = port, seconds
        self.results = []
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()
        self.t.start()

    def _run(self):
        while time.monotonic() - self.t0 < self.seconds:
            start = time.monotonic() - self.t0
            try:
                with socket.create_connection((HOST, self.port), timeout=5) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    data = b""
                    while True:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                m = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
                outcome = m.group(1).decode() if m else "no response"
            except socket.timeout:
                outcome = "timeout"
            except OSError as exc:
                outcome = type(exc).__name__
            self.results.append((start, outcome))
            time.sleep(0.05)

    def stop(self):
        self.t.join(self.seconds + 10)
        windows = []
        for w in range(0, int(self.seconds), WINDOW):
            bucket = [o for t, o in self.results if w <= t < w + WINDOW]
            windows.append({"from": w, "to": w + WINDOW, "200": bucket.count("200"),
                            "503": bucket.count("503"),
                            "other": len(bucket) - bucket.count("200") - bucket.count("503")})
        last_503 = max((t for t, o in self.results if o == "503"), default=None)
        others = {}
        for _t, o in self.results:
            if o not in ("200", "503"):
                others[o] = others.get(o, 0) + 1
        return {"requests": len(self.results), "windows": windows,
                "last_503_at": last_503, "other_outcomes": others}


# -- one run ---------------------------------------------------------------------------

def one_run(args, label, extra, server_cpus, load_cpus):
    log("%s: server under RLIMIT_NOFILE %d, %s" % (label, args.nofile, " ".join(extra) or
                                                    "default options"))
    srv = Server(args.nofile, server_cpus, extra)
    try:
        sampler = Sampler(srv)
        kind = SlowHTTPTest if args.tool == "slowhttptest" else Trickler
        attack = kind(srv.port, args.slow, args.interval, args.seconds, load_cpus)
        normal = NormalClient(srv.port, args.seconds)
        figures = normal.stop()
        attack_figures = attack.stop(timeout=20)
        peak = sampler.stop()
        alive = srv.alive()
        rc = srv.stop()
    finally:
        _kill(srv.p)
    figures.update({
        "label": label, "server_options": extra, "attack": attack_figures,
        "server_peak_fds": peak, "alive_at_end": alive, "exit_status": rc,
        "emfile_log_lines": sum(1 for l in srv.stderr if "accept() failed" in l),
    })
    return figures


def markdown(args, runs):
    lines = ["## Slow body: %d slow clients (%s) for %d s, RLIMIT_NOFILE %d"
             % (args.slow, args.tool, args.seconds, args.nofile), ""]
    header = "| seconds | " + " | ".join("%s: 200 / 503 / other" % r["label"] for r in runs) + " |"
    lines += [header, "|---|" + "---:|" * len(runs)]
    for i, w in enumerate(runs[0]["windows"]):
        cells = []
        for r in runs:
            x = r["windows"][i]
            cells.append("%d / %d / %d" % (x["200"], x["503"], x["other"]))
        lines.append("| %d-%d | %s |" % (w["from"], w["to"], " | ".join(cells)))
    lines.append("")
    for r in runs:
        last = r["last_503_at"]
        lines.append("- %s (`%s`): %d requests; last 503 at %s; other outcomes %s; "
                     "server peak fds %d; EMFILE lines %d; alive at end %s; attack: %s"
                     % (r["label"], " ".join(r["server_options"]) or "defaults",
                        r["requests"], "%.1f s" % last if last is not None else "never",
                        r["other_outcomes"] or "none", r["server_peak_fds"],
                        r["emfile_log_lines"], r["alive_at_end"],
                        {k: v for k, v in r["attack"].items() if k != "tool"}))
    lines.append("")
    lines.append("Attack: `%s`" % runs[0]["attack"]["tool"])
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tool", choices=("slowhttptest", "python"),
                    default="slowhttptest" if shutil.which("slowhttptest") else "python")
    ap.add_argument("--slow", type=int, default=1100, help="slow clients")
    ap.add_argument("--interval", type=int, default=10,
                    help="seconds between a slow client's body bytes")
    ap.add_argument("--seconds", type=int, default=50, help="length of each run")
    ap.add_argument("--nofile", type=int, default=1024, help="server RLIMIT_NOFILE")
    ap.add_argument("--only-defaults", action="store_true",
                    help="skip the run with the minimum rate off")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *a: (_kill_all(), sys.exit(1)))
    cpus = _cpus()
    server_cpus = cpus[:1] if len(cpus) >= 2 else None
    load_cpus = cpus[1:] if len(cpus) >= 2 else None
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)
    runs = []
    try:
        if not args.only_defaults:
            runs.append(one_run(args, "rate off", ["--body-min-rate", "0"],
                                server_cpus, load_cpus))
        runs.append(one_run(args, "defaults", [], server_cpus, load_cpus))
    finally:
        _kill_all()
    print(markdown(args, runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=2)


if __name__ == "__main__":
    main()
