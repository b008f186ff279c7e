"""The ceiling: the cheapest HTTP/1.1 "server" pure Python can be.

    python bench/ceiling.py --port 8000

One process, a selectors loop, no parsing: every read from a client is
answered with the same canned keep-alive 200 response.  It is not a server
(it breaks on pipelining, bodies, split reads); it measures how many
requests per second a Python event loop can turn around at all, so the
ratio pagi_ref/ceiling shows what being a real server costs.
"""
import argparse
import selectors
import socket
import sys

RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 13\r\n\r\nHello, world!")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    sel = selectors.DefaultSelector()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(1024)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    print("ceiling: listening on http://%s:%d" % listener.getsockname(), file=sys.stderr, flush=True)
    try:
        while True:
            for key, _ in sel.select():
                sock = key.fileobj
                if sock is listener:
                    try:
                        conn, _ = listener.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sel.register(conn, selectors.EVENT_READ, None)
                    continue
                try:
                    data = sock.recv(65536)
                    if data:
                        sock.send(RESPONSE)
                        continue
                except OSError:
                    pass
                sel.unregister(sock)
                sock.close()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
