"""A tiny HTTP/1.1 client for tests: raw sockets, nothing hidden.

Every test asserts what a client sees on the wire, so the client here does
no more than read bytes and split them into status line, headers and body,
following the framing the response declares (RFC 9112 §6.3).
"""
import socket

CRLF = b"\r\n"


def connect(port, host="127.0.0.1", timeout=10.0):
    sock = socket.create_connection((host, port), timeout=timeout)
    return sock


class Response:
    def __init__(self, version, status, reason, headers, body, trailers, raw_head):
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers  # list of (lower-case name bytes, value bytes)
        self.body = body
        self.trailers = trailers
        self.raw_head = raw_head
        self.chunked = False
        self.complete = True  # False when the framing promised more bytes than arrived

    def header(self, name, default=None):
        name = name.lower().encode() if isinstance(name, str) else name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return default

    def header_all(self, name):
        name = name.lower().encode() if isinstance(name, str) else name.lower()
        return [v for k, v in self.headers if k == name]

    def __repr__(self):
        return "<Response %d %r body=%d bytes>" % (self.status, self.headers, len(self.body))


class Reader:
    """Buffered reader over a socket that keeps unread bytes (pipelining)."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.eof = False

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_until(self, marker):
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                out, self.buf = self.buf[: i + len(marker)], self.buf[i + len(marker):]
                return out
            if not self._fill():
                out, self.buf = self.buf, b""
                return out

    def read_exact(self, n):
        while len(self.buf) < n:
            if not self._fill():
                break
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_all(self):
        while self._fill():
            pass
        out, self.buf = self.buf, b""
        return out

    def read_response(self, head_request=False):
        """Read one response; skips nothing (a 100 Continue is a response too)."""
        raw = self.read_until(b"\r\n\r\n")
        if not raw.endswith(b"\r\n\r\n"):
            raise EOFError("connection closed before a complete response head: %r" % raw)
        lines = raw[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        status, _, reason = rest.partition(b" ")
        headers = []
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers.append((k.strip().lower(), v.strip()))
        resp = Response(version, int(status), reason, headers, b"", [], raw)
        st = resp.status
        if head_request or 100 <= st < 200 or st in (204, 304):
            return resp
        te = resp.header("transfer-encoding")
        cl = resp.header("content-length")
        if te is not None and te.lower().endswith(b"chunked"):
            resp.chunked = True
            body = []
            while True:
                line = self.read_until(b"\r\n")
                if not line.endswith(b"\r\n"):
                    resp.complete = False
                    break
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while True:
                        t = self.read_until(b"\r\n")
                        if not t.endswith(b"\r\n"):
                            resp.complete = False
                            break
                        if t == b"\r\n":
                            break
                        k, _, v = t[:-2].partition(b":")
                        resp.trailers.append((k.strip().lower(), v.strip()))
                    break
                data = self.read_exact(size + 2)
                if len(data) < size + 2:
                    body.append(data[:size])
                    resp.complete = False
                    break
                body.append(data[:size])
            resp.body = b"".join(body)
        elif cl is not None:
            n = int(cl)
            resp.body = self.read_exact(n)
            resp.complete = len(resp.body) == n
        else:
            resp.body = self.read_all()
        return resp


def exchange(port, raw, head_request=False, timeout=10.0):
    """Send raw bytes, read one response, return it."""
    with connect(port, timeout=timeout) as sock:
        sock.sendall(raw)
        return Reader(sock).read_response(head_request=head_request)


def get(port, path="/", headers=(), method="GET", body=b"", version=b"HTTP/1.1"):
    lines = [method.encode() + b" " + path.encode() + b" " + version, b"Host: test"]
    for k, v in headers:
        lines.append(k.encode() + b": " + v.encode())
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    raw = b"\r\n".join(lines) + b"\r\n\r\n" + body
    return exchange(port, raw, head_request=(method == "HEAD"))


def raw_exchange(port, raw, timeout=10.0):
    """Send raw bytes, then read everything until the server closes."""
    with connect(port, timeout=timeout) as sock:
        sock.sendall(raw)
        return Reader(sock).read_all()
