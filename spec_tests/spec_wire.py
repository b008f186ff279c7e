"""A tiny HTTP/1.1 client for the spec suite (and tests/): raw sockets, nothing hidden.

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


# -- the conformance suite's helpers (tests/ uses the lines above too) ---------

import base64
import hashlib
import json
import os
import struct
import time


def build_request(method="GET", path="/", headers=(), body=b"", version="1.1",
                  host=True, close=False, content_length=None):
    """Raw request bytes.  ``content_length``: None = computed when body,
    False = omitted, an int = that value."""
    lines = [("%s %s HTTP/%s" % (method, path, version)).encode("latin-1")]
    if host:
        lines.append(b"Host: spec.test")
    for k, v in headers:
        k = k.encode("latin-1") if isinstance(k, str) else k
        v = v.encode("latin-1") if isinstance(v, str) else v
        lines.append(k + b": " + v)
    if content_length is None and body:
        lines.append(b"Content-Length: %d" % len(body))
    elif content_length not in (None, False):
        lines.append(b"Content-Length: %d" % content_length)
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class Client:
    """One connection: send requests, read responses, see the close."""

    def __init__(self, addr, timeout=10.0, rcvbuf=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(addr)
        self.reader = Reader(self.sock)

    def send(self, raw):
        self.sock.sendall(raw)

    def request(self, method="GET", path="/", head=False, **kw):
        self.send(build_request(method, path, **kw))
        return self.read(head=head or method == "HEAD")

    def read(self, head=False):
        return self.reader.read_response(head_request=head)

    def read_final(self, head=False):
        """Read past interim (1xx) responses; returns (interims, final)."""
        interims = []
        while True:
            resp = self.read(head)
            if resp.status >= 200 or resp.status == 101:
                return interims, resp
            interims.append(resp)

    def closed(self, timeout=3.0):
        """True when the server closes the connection (EOF or reset) within
        ``timeout`` seconds and sends nothing more."""
        if self.reader.buf:
            return False
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
        finally:
            try:
                self.sock.settimeout(old)
            except OSError:
                pass
        if data:
            self.reader.buf += data
            return False
        return True

    def quiet(self, seconds):
        """True when nothing arrives for ``seconds``."""
        if self.reader.buf:
            return False
        old = self.sock.gettimeout()
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return True
        finally:
            self.sock.settimeout(old)
        self.reader.buf += data
        return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def request(addr, method="GET", path="/", **kw):
    """One request on a fresh connection that asks to be closed."""
    kw.setdefault("close", True)
    with Client(addr) as c:
        return c.request(method, path, **kw)


def send_raw(addr, raw, timeout=10.0):
    """Send raw bytes, return (first response or None, connection closed after it)."""
    with Client(addr, timeout=timeout) as c:
        c.send(raw)
        try:
            resp = c.read()
        except (EOFError, ConnectionResetError):
            return None, True
        return resp, c.closed()


def json_body(resp):
    return json.loads(resp.body.decode("utf-8"))


# -- WebSocket (RFC 6455), the client side -----------------------------------------

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_accept_value(key):
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def ws_frame(opcode, payload=b"", fin=True, mask=True, rsv=0):
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, (0x80 if mask else 0) | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, (0x80 if mask else 0) | 126, n)
    else:
        head = struct.pack("!BBQ", first, (0x80 if mask else 0) | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


class WebSocket:
    """A minimal RFC 6455 client over a Client whose handshake succeeded."""

    def __init__(self, client):
        self.client = client
        self.reader = client.reader
        self._parts = []      # fragments of a data message in progress
        self._kind = None     # its opcode (1 text, 2 binary)

    def send(self, opcode, payload=b"", **kw):
        self.client.send(ws_frame(opcode, payload, **kw))

    def text(self, s):
        self.send(0x1, s.encode("utf-8"))

    def binary(self, b):
        self.send(0x2, b)

    def close(self, code=1000, reason=b""):
        payload = b"" if code is None else struct.pack("!H", code) + reason
        self.send(0x8, payload)

    def recv_frame(self):
        """(fin, opcode, payload); raises EOFError on a closed connection."""
        head = self.reader.read_exact(2)
        if len(head) < 2:
            raise EOFError("connection closed")
        b1, b2 = head[0], head[1]
        n = b2 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self.reader.read_exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self.reader.read_exact(8))[0]
        if b2 & 0x80:
            key = self.reader.read_exact(4)
            data = self.reader.read_exact(n)
            data = bytes(b ^ key[i % 4] for i, b in enumerate(data))
        else:
            data = self.reader.read_exact(n)
        if len(data) < n:
            raise EOFError("connection closed inside a frame")
        return bool(b1 & 0x80), b1 & 0x0F, data

    def recv(self):
        """The next data message or close: ("text", str) / ("bytes", b) /
        ("close", (code, reason)) / ("ping", b) / ("pong", b)."""
        while True:
            fin, op, data = self.recv_frame()
            if op == 0x8:
                code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
                return "close", (code, data[2:])
            if op == 0x9:
                return "ping", data
            if op == 0xA:
                return "pong", data
            if op in (0x1, 0x2):
                self._kind = op
            self._parts.append(data)
            if fin:
                payload, kind = b"".join(self._parts), self._kind
                self._parts, self._kind = [], None
                return ("text", payload.decode("utf-8")) if kind == 0x1 else ("bytes", payload)


def ws_handshake(addr, path, protocols=None, headers=(), version=b"13", key=True, timeout=10.0):
    """Open a connection and send the upgrade; returns (client, response)."""
    c = Client(addr, timeout=timeout)
    k = base64.b64encode(os.urandom(16))
    lines = [b"GET " + path.encode() + b" HTTP/1.1", b"Host: spec.test",
             b"Upgrade: websocket", b"Connection: Upgrade",
             b"Sec-WebSocket-Version: " + version]
    if key:
        lines.append(b"Sec-WebSocket-Key: " + k)
    if protocols:
        lines.append(b"Sec-WebSocket-Protocol: " + protocols.encode())
    for name, value in headers:
        lines.append(name.encode() + b": " + value.encode())
    c.send(b"\r\n".join(lines) + b"\r\n\r\n")
    resp = c.reader.read_response(head_request=True)
    resp.ws_key = k
    return c, resp


# -- Server-Sent Events ---------------------------------------------------------------

def sse_request(addr, path, method="GET", body=b"", headers=(), timeout=10.0):
    """Open an event-stream request; returns (client, response head)."""
    c = Client(addr, timeout=timeout)
    hdrs = [("Accept", "text/event-stream")] + list(headers)
    c.send(build_request(method, path, headers=hdrs, body=body))
    resp = c.reader.read_response(head_request=True)
    return c, resp


def read_chunked_stream(reader, deadline=10.0):
    """Read a chunked body to its end; returns (data, ended_cleanly)."""
    out = []
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        line = reader.read_until(b"\r\n")
        if not line.endswith(b"\r\n"):
            return b"".join(out), False
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            reader.read_until(b"\r\n")
            return b"".join(out), True
        data = reader.read_exact(size + 2)
        out.append(data[:size])
    return b"".join(out), False


def parse_sse(text):
    """Dispatches of an event stream: a list of dicts (event, data, id, retry),
    and comments as {"comment": ...}."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block:
            continue
        item = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                out.append({"comment": line[1:]})
                continue
            field, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if field == "data":
                item["data"] = item["data"] + "\n" + value if "data" in item else value
            elif field:
                item[field] = value
        if item:
            out.append(item)
    return out


# -- the conformance application's journal (APP.md) --------------------------------

import uuid
import urllib.parse


def new_token():
    return uuid.uuid4().hex[:16]


def get_journal(addr, token):
    resp = request(addr, "GET", "/journal?token=" + urllib.parse.quote(token))
    assert resp.status == 200, resp
    return json_body(resp)


def wait_journal(addr, token, predicate, timeout=5.0):
    """Poll the journal until predicate(entries) holds; return the entries
    (the last ones read, also when the time ran out)."""
    end = time.monotonic() + timeout
    while True:
        entries = get_journal(addr, token)
        if predicate(entries) or time.monotonic() > end:
            return entries
        time.sleep(0.05)   # poll interval of a bounded wait, not a proof


# APP.md kinds of values.  A language with one string type for text and bytes
# (Perl) reports "string" for both, so a test accepts it for either.
TEXT = ("text", "string")
BYTES = ("bytes", "string")
