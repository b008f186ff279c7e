"""Round trips of one compressed WebSocket message, one at a time: the
server's per-message latency, permessage-deflate included.

    python bench/ws_rtt.py PORT COUNT SIZE ["OFFER"]
    python bench/ws_rtt.py 9001 3000 16
    python bench/ws_rtt.py 9001 3000 16 "permessage-deflate; server_no_context_takeover"

Connects to an echo server on 127.0.0.1:PORT (examples/ws_echo.py under
pagi_ref, or bench/websockets_echo.py), offers OFFER (default: the browsers'
"permessage-deflate; client_max_window_bits"), sends COUNT messages of SIZE
bytes, each compressed with RSV1, waits for each echo and checks it, and
prints the mean time per round trip.  Bounded by COUNT.
"""
import socket, base64, os, time, zlib, sys
port = int(sys.argv[1]); n = int(sys.argv[2]); size = int(sys.argv[3]); offer = sys.argv[4] if len(sys.argv) > 4 else "permessage-deflate; client_max_window_bits"
s = socket.create_connection(("127.0.0.1", port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
key = base64.b64encode(os.urandom(16))
s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: " + offer.encode() + b"\r\n\r\n")
buf = b""
while b"\r\n\r\n" not in buf: buf += s.recv(4096)
head, buf = buf.split(b"\r\n\r\n", 1)
c = zlib.compressobj(6, zlib.DEFLATED, -9); d = zlib.decompressobj(-15)
msg = (b"Hello, world! " * 1000)[:size]
def recvn(k):
    global buf
    while len(buf) < k:
        buf += s.recv(65536)
    out, buf = buf[:k], buf[k:]; return out
t = time.perf_counter()
for i in range(n):
    p = (c.compress(msg) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]
    mk = os.urandom(4); m = bytes(b ^ mk[j % 4] for j, b in enumerate(p))
    hdr = bytes([0xC1, 0x80 | len(p)]) if len(p) < 126 else bytes([0xC1, 0x80 | 126]) + len(p).to_bytes(2, "big")
    s.sendall(hdr + mk + m)
    b0, b1 = recvn(2); k = b1 & 0x7F
    if k == 126: k = int.from_bytes(recvn(2), "big")
    data = recvn(k)
    if b0 & 0x40: data = d.decompress(data + b"\x00\x00\xff\xff")
    assert data == msg, (data[:50], msg[:50])
el = time.perf_counter() - t
print(sys.argv[1:], round(el / n * 1e6, 1), "us per round trip")
