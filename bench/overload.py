#!/usr/bin/env python3
"""bench/overload.py -- the figures of issue 4 ("Under pressure"), standalone.

    python bench/overload.py                       # about 40 s
    python bench/overload.py --seconds 3 --slowloris 200 --normal-seconds 3
    python bench/overload.py --json out.json       # also write the figures

Two experiments, each against a fresh `python pagi_ref.py bench/apps.py:app`
on 127.0.0.1 (access log off), started with RLIMIT_NOFILE lowered to 1024
as by `ulimit -n 1024` (so max_connections takes its derived default,
1024 - 64 = 960):

1. Overload -- the field report's run: `hey -z 10s -c 1500` on
   /stream?chunks=20&interval=0.1 (a 2-second chunked stream).  Recorded:
   hey's status-code distribution (200, 503, others) and its error
   distribution (requests that got no response: connection reset, EOF,
   timeout ...), the server's peak descriptor count and CPU, and the error-
   log lines it wrote (EMFILE episodes).  The goal is zero errors: every
   connection gets a 200 or a 503.

2. Slowloris -- normal traffic (`hey -z 5s -c 10` on /) first alone, then
   while 500 connections each send one header byte per second (the
   header_timeout default, 10 s, is longer than the phase, and the server
   runs with --header-min-rate 0, so they all stay open: the harder case).  Recorded: p50/p99/max latency, requests/s and non-200s of both
   runs, and how many slowloris connections were still open at the end.

With two or more CPUs the server is pinned to CPU 0 and the load (hey, the
slowloris thread) to the others.  Every child runs in its own process group
with a time limit and is killed on exit.
"""
import argparse
import json
import os
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
HOST = "127.0.0.1"
STREAM_PATH = "/stream?chunks=20&interval=0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
LISTENING = re.compile(rb"listening on http://[0-9.]+:(\d+)")

_children = []


def log(msg):
    print("[overload %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def _cpus():
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return []


def _preexec(nofile=None, cpus=None):
    def fn():
        os.setpgrp()
        if nofile is not None:
            _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, min(hard, max(nofile, hard))))
        if cpus:
            os.sched_setaffinity(0, cpus)
    return fn


def _kill(p, grace=3.0):
    if p.poll() is not None:
        return p.returncode
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except OSError:
        pass
    try:
        return p.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        return p.wait(5)


def _kill_all(*_args):
    for p in _children:
        _kill(p, grace=1.0)


class Server:
    """pagi_ref in a subprocess; stderr collected by a thread."""

    def __init__(self, nofile, cpus, extra=()):
        argv = [sys.executable, os.path.join(ROOT, "pagi_ref.py"), "bench/apps.py:app",
                "--host", HOST, "--port", "0", "--no-access-log"] + list(extra)
        self.p = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  preexec_fn=_preexec(nofile, cpus))
        _children.append(self.p)
        self.stderr = []
        self.port = None
        ready = threading.Event()

        def read():
            for line in iter(self.p.stderr.readline, b""):
                self.stderr.append(line.decode("utf-8", "replace").rstrip())
                m = LISTENING.search(line)
                if m and self.port is None:
                    self.port = int(m.group(1))
                    ready.set()
            ready.set()
        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(10) or self.port is None:
            _kill(self.p)
            raise RuntimeError("server did not start: %r" % self.stderr[-5:])

    def cpu(self):
        with open("/proc/%d/stat" % self.p.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def fds(self):
        try:
            return len(os.listdir("/proc/%d/fd" % self.p.pid))
        except OSError:
            return 0

    def alive(self):
        return self.p.poll() is None

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(15)
        except subprocess.TimeoutExpired:
            return _kill(self.p)


class Sampler:
    """Peak descriptors of the server, sampled every 0.2 s."""

    def __init__(self, server):
        self.server = server
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.server.fds())

    def stop(self):
        self._stop.set()
        self._t.join(2)
        return self.peak


def parse_hey(text):
    out = {"rps": None, "statuses": {}, "errors": {}, "latency_ms": {}}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        out["rps"] = float(m.group(1))
    for name in ("Slowest", "Fastest", "Average"):
        m = re.search(r"%s:\s+([\d.]+) secs" % name, text)
        if m:
            out["latency_ms"][name.lower()] = float(m.group(1)) * 1000
    for pct, value in re.findall(r"^\s+(10|25|50|75|90|95|99)%+ in ([\d.]+) secs", text, re.M):
        out["latency_ms"]["p" + pct] = float(value) * 1000
    section = text.split("Status code distribution:", 1)
    if len(section) > 1:
        body = section[1].split("Error distribution:", 1)[0]
        for code, count in re.findall(r"^\s+\[(\d+)\]\s+(\d+) responses", body, re.M):
            out["statuses"][code] = int(count)
    if "Error distribution:" in text:
        tail = text.split("Error distribution:", 1)[1]
        for count, what in re.findall(r"^\s+\[(\d+)\]\s+(.*)$", tail, re.M):
            # Group by the cause at the end of Go's message ("...: connection
            # reset by peer", "... EOF", "... (Client.Timeout exceeded ...)").
            key = re.sub(r"^.*?(read|write|dial)\s+tcp\s+\S+->\S+:\s*", r"\1: ", what)
            key = re.sub(r'^Get "[^"]*":\s*', "", key)
            out["errors"][key] = out["errors"].get(key, 0) + int(count)
    return out


def hey(port, path, seconds, concurrency, cpus, timeout_s=20):
    argv = ["hey", "-z", "%ds" % seconds, "-c", str(concurrency), "-t", str(timeout_s),
            "http://%s:%d%s" % (HOST, port, path)]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, preexec_fn=_preexec(None, cpus))
    _children.append(p)
    try:
        out, _ = p.communicate(timeout=seconds + timeout_s + 30)
    except subprocess.TimeoutExpired:
        _kill(p)
        raise RuntimeError("hey did not finish in time")
    text = out.decode("utf-8", "replace")
    if p.returncode != 0:
        raise RuntimeError("hey failed (rc=%s): %s" % (p.returncode, text[-400:]))
    return parse_hey(text), text


def overload(args, server_cpus, load_cpus):
    log("overload: RLIMIT_NOFILE %d, hey -z %ds -c %d %s"
        % (args.nofile, args.seconds, args.clients, STREAM_PATH))
    srv = Server(args.nofile, server_cpus)
    try:
        sampler = Sampler(srv)
        cpu0, t0 = srv.cpu(), time.monotonic()
        res, text = hey(srv.port, STREAM_PATH, args.seconds, args.clients, load_cpus)
        cpu1, t1 = srv.cpu(), time.monotonic()
        peak = sampler.stop()
        alive = srv.alive()
        after = None
        if alive:
            try:
                with socket.create_connection((HOST, srv.port), timeout=5) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    after = s.recv(100).split(b"\r\n", 1)[0].decode("latin-1")
            except OSError as exc:
                after = "error: %s" % exc
        rc = srv.stop()
    finally:
        _kill(srv.p)
    st = res["statuses"]
    out = {
        "clients": args.clients, "seconds": args.seconds, "nofile": args.nofile,
        "s200": st.get("200", 0), "s503": st.get("503", 0),
        "other_status": {k: v for k, v in st.items() if k not in ("200", "503")},
        "client_errors": sum(res["errors"].values()), "error_kinds": res["errors"],
        "rps": res["rps"], "p50_ms": res["latency_ms"].get("p50"),
        "p99_ms": res["latency_ms"].get("p99"), "max_ms": res["latency_ms"].get("slowest"),
        "server_cpu_pct": 100.0 * (cpu1 - cpu0) / (t1 - t0),
        "server_peak_fds": peak, "alive_after": alive, "answer_after": after,
        "exit_status": rc,
        "emfile_log_lines": sum(1 for l in srv.stderr if "accept() failed" in l),
        "accept_recovered_lines": sum(1 for l in srv.stderr if "accept() works again" in l),
        "error_log_tail": [l for l in srv.stderr if "listening" not in l][-5:],
    }
    if args.verbose:
        print(text, file=sys.stderr)
    return out


class Slowloris:
    """`count` connections, one header byte per second each, in one thread."""

    HEAD = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200

    def __init__(self, port, count):
        self.socks = []
        self.errors = 0
        for _ in range(count):
            try:
                s = socket.create_connection((HOST, port), timeout=5)
            except OSError:
                self.errors += 1
                continue
            s.setblocking(False)
            self.socks.append(s)
        self.sent = {s: 0 for s in self.socks}
        self.closed = set()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        sel = selectors.DefaultSelector()
        for s in self.socks:
            sel.register(s, selectors.EVENT_READ)
        next_byte = time.monotonic()
        try:
            while not self._stop.is_set():
                if time.monotonic() >= next_byte:
                    for s in self.socks:
                        if s in self.closed or self.sent[s] >= len(self.HEAD):
                            continue
                        try:
                            s.send(self.HEAD[self.sent[s]:self.sent[s] + 1])
                            self.sent[s] += 1
                        except (BlockingIOError, OSError):
                            pass
                    next_byte += 1.0
                for key, _ in sel.select(max(0.0, min(0.2, next_byte - time.monotonic()))):
                    try:
                        data = key.fileobj.recv(4096)
                    except (BlockingIOError, OSError):
                        data = b""
                    if not data:
                        self.closed.add(key.fileobj)
                        sel.unregister(key.fileobj)
        finally:
            sel.close()

    def stop(self):
        self._stop.set()
        self._t.join(5)
        open_now = len(self.socks) - len(self.closed)
        for s in self.socks:
            s.close()
        return open_now


def slowloris(args, server_cpus, load_cpus):
    # Without the minimum head rate (issue 9) the slow heads would be cut
    # after --header-grace (5 s), within the phase: keep them all open.
    srv = Server(args.nofile, server_cpus, ["--header-min-rate", "0"])
    try:
        log("slowloris: baseline, hey -z %ds -c %d /" % (args.normal_seconds, args.normal_clients))
        base, _ = hey(srv.port, "/", args.normal_seconds, args.normal_clients, load_cpus)
        log("slowloris: %d slow connections, then hey again" % args.slowloris)
        slow = Slowloris(srv.port, args.slowloris)
        time.sleep(1.0)
        fds = srv.fds()
        under, _ = hey(srv.port, "/", args.normal_seconds, args.normal_clients, load_cpus)
        still_open = slow.stop()
        rc = srv.stop()
    finally:
        _kill(srv.p)

    def figures(r):
        lat = r["latency_ms"]
        return {"rps": r["rps"], "p50_ms": lat.get("p50"), "p99_ms": lat.get("p99"),
                "max_ms": lat.get("slowest"), "s200": r["statuses"].get("200", 0),
                "non200": sum(v for k, v in r["statuses"].items() if k != "200"),
                "errors": sum(r["errors"].values())}
    return {"slow_connections": args.slowloris, "slow_open_errors": slow.errors,
            "slow_still_open_at_end": still_open, "server_fds_during": fds,
            "baseline": figures(base), "under_slowloris": figures(under), "exit_status": rc}


def markdown(o, s):
    lines = ["## Overload (RLIMIT_NOFILE %d, hey -z %ds -c %d %s)" % (
        o["nofile"], o["seconds"], o["clients"], STREAM_PATH), "",
        "| 200 | 503 | other status | client errors (no response) | req/s | p50 | p99 | max "
        "| server CPU | peak fds | EMFILE episodes logged |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| %d | %d | %d | %d | %.1f | %.2f s | %.2f s | %.2f s | %.0f%% | %d | %d |" % (
            o["s200"], o["s503"], sum(o["other_status"].values()), o["client_errors"],
            o["rps"] or 0, (o["p50_ms"] or 0) / 1000, (o["p99_ms"] or 0) / 1000,
            (o["max_ms"] or 0) / 1000, o["server_cpu_pct"], o["server_peak_fds"],
            o["emfile_log_lines"]),
        ""]
    if o["error_kinds"]:
        lines.append("Client errors: " + ", ".join("%s: %d" % kv for kv in sorted(
            o["error_kinds"].items(), key=lambda kv: -kv[1])))
        lines.append("")
    lines.append("After the run: server alive=%s, GET / -> %s, exit status on SIGTERM %s"
                 % (o["alive_after"], o["answer_after"], o["exit_status"]))
    lines += ["", "## Normal traffic with %d slowloris connections open" % s["slow_connections"],
              "", "| run | req/s | p50 | p99 | max | 200 | non-200 | errors |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("baseline", "under_slowloris"):
        f = s[name]
        lines.append("| %s | %.0f | %.2f ms | %.2f ms | %.2f ms | %d | %d | %d |" % (
            name.replace("_", " "), f["rps"] or 0, f["p50_ms"] or 0, f["p99_ms"] or 0,
            f["max_ms"] or 0, f["s200"], f["non200"], f["errors"]))
    lines.append("")
    lines.append("Slowloris connections still open at the end: %d of %d (open errors %d); "
                 "server descriptors during the run: %d"
                 % (s["slow_still_open_at_end"], s["slow_connections"], s["slow_open_errors"],
                    s["server_fds_during"]))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=10, help="overload duration (hey -z)")
    ap.add_argument("--clients", type=int, default=1500, help="overload concurrency (hey -c)")
    ap.add_argument("--nofile", type=int, default=1024, help="server RLIMIT_NOFILE")
    ap.add_argument("--slowloris", type=int, default=500, help="slow connections")
    ap.add_argument("--normal-seconds", type=int, default=5)
    ap.add_argument("--normal-clients", type=int, default=10)
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--verbose", action="store_true", help="print hey's output")
    args = ap.parse_args()
    for tool in ("hey",):
        if subprocess.run(["sh", "-c", "command -v " + tool], capture_output=True).returncode:
            sys.exit("overload: %s is not installed" % tool)
    if args.normal_seconds + 1 >= 10:
        log("note: slowloris connections time out after header_timeout (10 s)")
    signal.signal(signal.SIGTERM, lambda *a: (_kill_all(), sys.exit(1)))
    cpus = _cpus()
    server_cpus = cpus[:1] if len(cpus) >= 2 else None
    load_cpus = cpus[1:] if len(cpus) >= 2 else None
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)     # the slowloris thread too
    try:
        o = overload(args, server_cpus, load_cpus)
        s = slowloris(args, server_cpus, load_cpus)
    finally:
        _kill_all()
    print(markdown(o, s))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"overload": o, "slowloris": s}, f, indent=2)


if __name__ == "__main__":
    main()
