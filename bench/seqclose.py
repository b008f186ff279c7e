#!/usr/bin/env python3
"""bench/seqclose.py -- issue 9, finding 6: descriptors under sequential closes.

    python bench/seqclose.py [--requests 1100] [--nofile 1024] [--server DIR]

Starts `pagi_ref.py pagi_ref:_demo_app` (from DIR, default this checkout) on
127.0.0.1 under RLIMIT_NOFILE `--nofile`, then sends `--requests`
sequential `GET /` with `Connection: close`, each client keeping its socket
open after reading the response, so that every connection the server closes
lingers for its full 2 s (RFC 9112 §9.6).  Prints the statuses, the
server's peak descriptor count (/proc/PID/fd, sampled after each response)
and the number of EMFILE episodes it logged.  Bounded: one request at a
time, a 10 s timeout each; the server is killed at the end.
"""
import argparse
import os
import re
import resource
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1100)
    ap.add_argument("--nofile", type=int, default=1024, help="server RLIMIT_NOFILE")
    ap.add_argument("--server", default=ROOT, help="directory holding the pagi_ref.py to run")
    args = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < args.requests + 64:
        sys.exit("seqclose: this process needs %d descriptors (hard limit %d)"
                 % (args.requests + 64, hard))
    resource.setrlimit(resource.RLIMIT_NOFILE, (args.requests + 64, hard))

    def preexec():
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, hard))

    p = subprocess.Popen([sys.executable, "pagi_ref.py", "pagi_ref:_demo_app", "--port", "0",
                          "--lifespan", "off"], cwd=args.server, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=preexec)
    kept = []
    try:
        line = p.stderr.readline().decode("utf-8", "replace")
        port = int(re.search(r":(\d+)\s*$", line).group(1))
        statuses, peak = {}, 0
        t0 = time.monotonic()
        for _ in range(args.requests):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            kept.append(s)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError as exc:
                data = type(exc).__name__.encode()
            status = data[:12].decode("latin-1") or "no response"
            statuses[status] = statuses.get(status, 0) + 1
            peak = max(peak, len(os.listdir("/proc/%d/fd" % p.pid)))
        elapsed = time.monotonic() - t0
    finally:
        for s in kept:
            s.close()
        p.terminate()
        try:
            err = p.communicate(timeout=10)[1].decode("utf-8", "replace")
        except subprocess.TimeoutExpired:
            p.kill()
            err = p.communicate()[1].decode("utf-8", "replace")
    print("%d requests in %.1f s: %s; server peak descriptors %d of %d; EMFILE episodes "
          "logged: %d" % (args.requests, elapsed, statuses, peak, args.nofile,
                         err.count("accept() failed")))


if __name__ == "__main__":
    main()
