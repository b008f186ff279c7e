"""The bench's own load generator, for what wrk and hey cannot express.

Runs as a separate process (bench/run.py pins it to another CPU than the
server) and prints one JSON object on stdout when done.  Uses uvloop when it
is importable (the bench virtualenv has it), asyncio otherwise.  Talks to
127.0.0.1 only and stops by itself: every mode is bounded in time.

    streams   N concurrent clients, each issuing keep-alive requests one after
              another until --duration ends; per-request outcome (status or
              error kind) and latency of the 200s (connect included when the
              request needed a new connection).
    download  N concurrent downloads of one URL (a new connection each, read
              with recv_into): bytes, seconds, errors, aggregate MB/s.
    idle      open N keep-alive connections, one request on each, report
              "ready" and hold them until a line arrives on stdin (or --hold
              seconds), then ask each once more and report how many answered.
    slowread  one download read at --rate bytes/s (E3; curl 7.88 --limit-rate
              bursts its first megabytes, so it cannot show buffering).
"""
import argparse
import asyncio
import errno
import json
import math
import resource
import socket
import sys
import time


def _raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def percentiles(values, points=(50, 75, 90, 99, 100)):
    """{"p50": seconds, ...} by nearest rank; empty dict when no values."""
    if not values:
        return {}
    values = sorted(values)
    n = len(values)
    out = {}
    for p in points:
        k = max(0, min(n - 1, math.ceil(p / 100.0 * n) - 1))
        out["p%d" % p if p < 100 else "max"] = values[k]
    return out


def _error_kind(exc):
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "incomplete"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, BrokenPipeError):
        return "broken-pipe"
    if isinstance(exc, asyncio.LimitOverrunError):
        return "bad-response"
    if isinstance(exc, ValueError):
        return "bad-response"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


async def read_response(reader):
    """Read one response; return (status, body_bytes, keep_alive, headers dict)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise ValueError("bad status line %r" % lines[0][:80])
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
    keep_alive = headers.get(b"connection", b"").lower() != b"close" and parts[0] == b"HTTP/1.1"
    nbytes = 0
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            await reader.readexactly(size + 2)
            nbytes += size
    elif b"content-length" in headers:
        left = int(headers[b"content-length"])
        while left:
            data = await reader.read(min(left, 1 << 20))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(data)
            nbytes += len(data)
    else:
        while True:
            data = await reader.read(1 << 20)
            if not data:
                break
            nbytes += len(data)
        keep_alive = False
    return status, nbytes, keep_alive, headers


def request_bytes(host, port, path, close=False):
    return ("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: pagi-bench\r\n%s\r\n"
            % (path, host, port, "Connection: close\r\n" if close else "")).encode()


async def mode_streams(args):
    req = request_bytes(args.host, args.port, args.path)
    start = time.monotonic()
    deadline = start + args.duration
    outcomes = {}
    latencies = []
    retry_after = [0, 0]  # 503s with / without Retry-After
    last_end = [start]
    connections = [0]

    def count(key):
        outcomes[key] = outcomes.get(key, 0) + 1

    async def exchange(state):
        if state[0] is None:
            state[0] = await asyncio.open_connection(args.host, args.port)
            connections[0] += 1
        reader, writer = state[0]
        writer.write(req)
        return await read_response(reader)

    async def client(i):
        if args.ramp:
            await asyncio.sleep(args.ramp * i / args.concurrency)
        state = [None]
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            pause = 0.0
            try:
                status, _, keep_alive, headers = await asyncio.wait_for(exchange(state), args.timeout)
                t1 = time.monotonic()
                count(str(status))
                if status == 200:
                    latencies.append(t1 - t0)
                else:
                    pause = args.backoff
                    if status == 503:
                        retry_after[0 if b"retry-after" in headers else 1] += 1
                last_end[0] = max(last_end[0], t1)
                if not keep_alive:
                    state[0][1].close()
                    state[0] = None
            except Exception as exc:  # every failure is a counted outcome
                count("error:" + _error_kind(exc))
                if state[0] is not None:
                    state[0][1].close()
                    state[0] = None
                pause = args.backoff
            if pause:
                await asyncio.sleep(pause)
        if state[0] is not None:
            state[0][1].close()

    await asyncio.gather(*(client(i) for i in range(args.concurrency)))
    end = time.monotonic()
    ok = outcomes.get("200", 0)
    elapsed = max(last_end[0], start) - start
    return {
        "mode": "streams", "concurrency": args.concurrency, "duration": args.duration,
        "outcomes": outcomes, "ok": ok,
        "errors": sum(v for k, v in outcomes.items() if k.startswith("error:")),
        "retry_after": {"with": retry_after[0], "without": retry_after[1]},
        "connections": connections[0],
        "elapsed": elapsed, "wall": end - start,
        "rps": ok / elapsed if elapsed > 0 else 0.0,
        "latency": percentiles(latencies),
    }


async def _download(loop, host, port, path, timeout, bufsize):
    """One download on a new connection: (status, body_bytes, seconds)."""
    t0 = time.monotonic()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        await loop.sock_sendall(sock, request_bytes(host, port, path, close=True))
        buf = bytearray(bufsize)
        view = memoryview(buf)
        head = b""
        while b"\r\n\r\n" not in head:
            n = await asyncio.wait_for(loop.sock_recv_into(sock, view), timeout)
            if not n:
                raise asyncio.IncompleteReadError(head, None)
            head += bytes(view[:n])
        head, _, rest = head.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        got = len(rest)
        while length is None or got < length:
            n = await asyncio.wait_for(loop.sock_recv_into(sock, view), timeout)
            if not n:
                if length is not None:
                    raise asyncio.IncompleteReadError(b"", length - got)
                break
            got += n
        return status, got, time.monotonic() - t0
    finally:
        sock.close()


def _download_tls(host, port, path, timeout, bufsize, cafile):
    """One download over TLS (E4T), blocking, in a thread: the stdlib ssl
    client reading into one buffer, the same for every server."""
    import ssl
    context = ssl.create_default_context(cafile=cafile)
    t0 = time.monotonic()
    raw = socket.create_connection((host, port), timeout=timeout)
    with context.wrap_socket(raw, server_hostname=host) as sock:
        sock.sendall(request_bytes(host, port, path, close=True))
        buf = bytearray(bufsize)
        view = memoryview(buf)
        head = b""
        while b"\r\n\r\n" not in head:
            n = sock.recv_into(view)
            if not n:
                raise asyncio.IncompleteReadError(head, None)
            head += bytes(view[:n])
        head, _, rest = head.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        got = len(rest)
        while length is None or got < length:
            try:
                n = sock.recv_into(view)
            except ssl.SSLEOFError:
                n = 0
            if not n:
                if length is not None:
                    raise asyncio.IncompleteReadError(b"", length - got)
                break
            got += n
    return status, got, time.monotonic() - t0


async def mode_download(args):
    loop = asyncio.get_running_loop()
    results = []
    errors = {}

    async def one():
        try:
            if args.cafile:
                results.append(await loop.run_in_executor(
                    None, _download_tls, args.host, args.port, args.path,
                    args.timeout, args.bufsize, args.cafile))
                return
            results.append(await _download(loop, args.host, args.port, args.path,
                                           args.timeout, args.bufsize))
        except Exception as exc:
            kind = _error_kind(exc)
            errors[kind] = errors.get(kind, 0) + 1

    start = time.monotonic()
    await asyncio.gather(*(one() for _ in range(args.concurrency)))
    wall = time.monotonic() - start
    total = sum(r[1] for r in results)
    statuses = {}
    for r in results:
        statuses[str(r[0])] = statuses.get(str(r[0]), 0) + 1
    return {
        "mode": "download", "concurrency": args.concurrency, "statuses": statuses,
        "errors": sum(errors.values()), "error_kinds": errors,
        "bytes": total, "wall": wall, "mb_per_s": total / wall / 1e6 if wall > 0 else 0.0,
        "latency": percentiles([r[2] for r in results]),
    }


async def mode_idle(args):
    loop = asyncio.get_running_loop()
    req = request_bytes(args.host, args.port, args.path)
    conns = []
    errors = {}
    sem = asyncio.Semaphore(args.batch)

    async def open_one():
        async with sem:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(args.host, args.port), args.timeout)
                writer.write(req)
                status, _, keep_alive, _ = await asyncio.wait_for(read_response(reader), args.timeout)
                if status == 200 and keep_alive:
                    conns.append((reader, writer))
                else:
                    writer.close()
                    errors["status:%d" % status] = errors.get("status:%d" % status, 0) + 1
            except Exception as exc:
                kind = _error_kind(exc)
                errors[kind] = errors.get(kind, 0) + 1

    t0 = time.monotonic()
    await asyncio.gather(*(open_one() for _ in range(args.count)))
    ready = {"mode": "idle", "ready": len(conns), "open_errors": errors,
             "open_seconds": time.monotonic() - t0}
    print(json.dumps(ready), flush=True)
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), args.hold)
    except asyncio.TimeoutError:
        pass
    answered = [0]
    after = {}

    async def again(reader, writer):
        async with sem:
            try:
                writer.write(req)
                status, _, _, _ = await asyncio.wait_for(read_response(reader), args.timeout)
                if status == 200:
                    answered[0] += 1
            except Exception as exc:
                kind = _error_kind(exc)
                after[kind] = after.get(kind, 0) + 1
            finally:
                writer.close()

    await asyncio.gather(*(again(r, w) for r, w in conns))
    ready.update({"answered_after_idle": answered[0], "errors_after_idle": after})
    return ready


def mode_slowread(args):
    """Blocking paced reader: at most --rate bytes/s, like curl --limit-rate."""
    t0 = time.monotonic()
    sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    try:
        sock.sendall(request_bytes(args.host, args.port, args.path, close=True))
        got = 0
        block = 16384
        head = b""
        while True:
            data = sock.recv(block)
            if not data:
                break
            got += len(data)
            if len(head) < 4096 and b"\r\n\r\n" not in head:
                head += data
            ahead = got / args.rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    finally:
        sock.close()
    head_len = head.find(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return {"mode": "slowread", "status": status, "bytes": got,
            "body": got - head_len - 4 if head_len >= 0 else 0, "wall": time.monotonic() - t0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["streams", "download", "idle", "slowread"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    p.add_argument("--backoff", type=float, default=0.0,
                   help="seconds a streams client waits after a non-200 or an error")
    p.add_argument("--ramp", type=float, default=0.0, help="spread client starts over S seconds")
    p.add_argument("--count", type=int, default=1000, help="idle: connections")
    p.add_argument("--batch", type=int, default=200, help="idle: connections opened at once")
    p.add_argument("--hold", type=float, default=120.0, help="idle: max seconds to hold")
    p.add_argument("--bufsize", type=int, default=1 << 20, help="download: recv_into buffer")
    p.add_argument("--cafile", help="download: over TLS, trusting this CA (E4T)")
    p.add_argument("--rate", type=float, default=1048576.0, help="slowread: bytes/s")
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        p.error("the bench load generator talks to the loopback only")
    _raise_nofile()
    if args.mode == "slowread":
        out = mode_slowread(args)
    else:
        loop_name = "asyncio"
        if not args.no_uvloop:
            try:
                import uvloop
                asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
                loop_name = "uvloop"
            except ImportError:
                pass
        coro = {"streams": mode_streams, "download": mode_download, "idle": mode_idle}[args.mode]
        out = asyncio.run(coro(args))
        out["loop"] = loop_name
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
