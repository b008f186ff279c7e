"""E8 for WebSocket: the server's memory per idle WebSocket session, with and
without permessage-deflate, pagi_ref beside uvicorn (websockets).

    python bench/ws_idle.py --server pagi_ref --count 2000 --deflate
    python bench/ws_idle.py --server uvicorn --uvicorn VENV/bin/uvicorn --count 2000

Starts the server on 127.0.0.1 (an echo application: examples/ws_echo.py for
pagi_ref, ``asgi_echo`` below for uvicorn), opens --count WebSocket sessions
in batches, each offering ``permessage-deflate; client_max_window_bits`` (as
browsers do) when --deflate is given, sends one 200-byte JSON-like text
message on each and reads the echo -- so a compressed session holds the zlib
state a used session holds -- then, with every session idle, reads the
server's VmRSS.  Prints one JSON line: RSS before and after, per session,
and how many sessions agreed to compress.  Bounded: it stops by itself.
"""
import argparse
import asyncio
import base64
import json
import os
import resource
import socket
import subprocess
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


async def asgi_echo(scope, receive, send):
    """The same echo as examples/ws_echo.py, for uvicorn."""
    if scope["type"] != "websocket":
        return
    event = await receive()
    if event["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    while True:
        event = await receive()
        if event["type"] == "websocket.disconnect":
            return
        if event.get("text") is not None:
            await send({"type": "websocket.send", "text": event["text"]})
        else:
            await send({"type": "websocket.send", "bytes": event["bytes"]})


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_server(args, port):
    if args.server == "pagi_ref":
        cmd = [sys.executable, os.path.join(ROOT, "pagi_ref.py"),
               os.path.join(ROOT, "examples", "ws_echo.py") + ":app", "--port", str(port),
               "--log-level", "warning", "--lifespan", "off"]
        if not args.deflate:
            cmd.append("--no-ws-per-message-deflate")
    else:
        cmd = [args.uvicorn, "ws_idle:asgi_echo", "--app-dir", HERE, "--port", str(port),
               "--ws", "websockets", "--lifespan", "off", "--no-access-log",
               "--log-level", "warning", "--http", "httptools", "--loop", "uvloop",
               "--ws-per-message-deflate", "true" if args.deflate else "false"]
    proc = subprocess.Popen(cmd, preexec_fn=raise_nofile, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


def masked_frame(first, payload):
    key = os.urandom(4)
    n = len(payload)
    head = bytes([first, 0x80 | n]) if n < 126 else \
        bytes([first, 0x80 | 126]) + n.to_bytes(2, "big")
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + body


MESSAGE = json.dumps({"user": "alice", "room": "general", "seq": 1,
                      "text": "hello everyone, this is an idle session " * 3})[:200].encode()


async def session(port, deflate, stats):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16))
    lines = [b"GET / HTTP/1.1", b"Host: 127.0.0.1", b"Upgrade: websocket",
             b"Connection: Upgrade", b"Sec-WebSocket-Key: " + key,
             b"Sec-WebSocket-Version: 13"]
    if deflate:
        lines.append(b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head[:100])
    agreed = b"permessage-deflate" in head.lower()
    stats["agreed"] += agreed
    if agreed:
        c = zlib.compressobj(6, zlib.DEFLATED, -9)
        payload = (c.compress(MESSAGE) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]
        writer.write(masked_frame(0xC1, payload))
    else:
        writer.write(masked_frame(0x81, MESSAGE))
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    data = await reader.readexactly(n)
    if b0 & 0x40:
        data = zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff")
    if data != MESSAGE:
        raise RuntimeError("echo differs")
    stats["wire"] += n
    return reader, writer


async def main_async(args, port, pid):
    stats = {"agreed": 0, "wire": 0}
    warm = [await session(port, args.deflate, stats) for _ in range(10)]
    await asyncio.sleep(0.5)
    before = rss_kb(pid)
    conns = []
    for start in range(0, args.count, args.batch):
        batch = min(args.batch, args.count - start)
        conns += await asyncio.gather(*[session(port, args.deflate, stats)
                                        for _ in range(batch)])
    await asyncio.sleep(args.settle)
    after = rss_kb(pid)
    result = {"server": args.server, "deflate": args.deflate, "sessions": len(conns),
              "agreed": stats["agreed"] - (10 if stats["agreed"] >= 10 else 0),
              "settle_s": args.settle, "rss_before_kb": before, "rss_after_kb": after,
              "rss_per_session_kb": round((after - before) / len(conns), 1),
              "echo_bytes_on_wire": round(stats["wire"] / (len(conns) + 10), 1)}
    if args.second_wave:
        # Memory the idle sessions let go of (to the allocator, not to the
        # system) is reused by new ones: the growth for a second wave is
        # the steady cost of a session that has been idle.
        more = []
        for start in range(0, args.count, args.batch):
            batch = min(args.batch, args.count - start)
            more += await asyncio.gather(*[session(port, args.deflate, stats)
                                           for _ in range(batch)])
        await asyncio.sleep(args.settle)
        final = rss_kb(pid)
        result["second_wave_rss_after_kb"] = final
        result["second_wave_rss_per_session_kb"] = round((final - after) / len(more), 1)
        conns += more
    for _r, w in conns + warm:
        w.close()
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", choices=["pagi_ref", "uvicorn"], default="pagi_ref")
    p.add_argument("--uvicorn", default="uvicorn", help="the uvicorn executable")
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--settle", type=float, default=2.0, help="seconds idle before measuring")
    p.add_argument("--deflate", action="store_true", help="offer permessage-deflate")
    p.add_argument("--second-wave", action="store_true",
                   help="then open --count more sessions and report their growth")
    args = p.parse_args()
    raise_nofile()
    port = free_port()
    proc = start_server(args, port)
    try:
        result = asyncio.run(asyncio.wait_for(main_async(args, port, proc.pid), 300))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
