"""The `websockets` library's own echo server: the peer pagi_ref's Autobahn
timings are set beside (bench/README.md, "WebSocket").

    WEBSOCKETS_MAX_FRAGMENTS=1000000 VENV/bin/python bench/websockets_echo.py 9002

Needs `pip install websockets` (a virtual environment outside the
repository).  Same limits as pagi_ref's defaults: 16 MiB messages, any
number of fragments (Autobahn 9.3/9.4 send 4 MiB as 64-byte fragments;
websockets refuses more than 4096 unless WEBSOCKETS_MAX_FRAGMENTS is
raised), permessage-deflate with the library's default settings, its
keepalive pings on (20 s).
"""
import asyncio
import sys

from websockets.asyncio.server import serve


async def echo(ws):
    async for message in ws:
        await ws.send(message)


async def main(port):
    async with serve(echo, "127.0.0.1", port, max_size=16 * 1024 * 1024) as server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 9002))
