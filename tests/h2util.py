"""HTTP/2 from the client's side, for the tests: frame builders, a frame
reader, and a small blocking client over a real socket.

Header blocks are made and read with pagi_ref's own HPACKEncoder and
HPACKDecoder (section 4a).  The interop tests (curl, nghttp, h2load) check
the same server against independent implementations.
"""
import socket
import ssl
import struct

import pagi_ref

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, \
    WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# -- frames ------------------------------------------------------------------------

def frame(ftype, flags, stream_id, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + \
        struct.pack(">I", stream_id) + payload


def settings(*pairs, ack=False):
    return frame(SETTINGS, ACK if ack else 0, 0,
                 b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def ping(payload=b"12345678", ack=False):
    return frame(PING, ACK if ack else 0, 0, payload)


def window_update(stream_id, increment):
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def rst_stream(stream_id, code=8):
    return frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))


def goaway(last=0, code=0):
    return frame(GOAWAY, 0, 0, struct.pack(">II", last, code))


def data(stream_id, payload, end_stream=False, pad=None):
    flags = END_STREAM if end_stream else 0
    if pad is not None:
        return frame(DATA, flags | PADDED, stream_id, bytes([pad]) + payload + b"\0" * pad)
    return frame(DATA, flags, stream_id, payload)


def request_fields(method="GET", path="/", authority="example.com", scheme="http",
                   extra=()):
    fields = [(b":method", method.encode()), (b":scheme", scheme.encode()),
              (b":path", path.encode())]
    if authority is not None:
        fields.append((b":authority", authority.encode()))
    return fields + [(bytes(n), bytes(v)) for n, v in extra]


def headers(stream_id, fields, end_stream=True, encoder=None, end_headers=True, flags=0):
    block = (encoder or pagi_ref.HPACKEncoder()).encode(fields)
    flags |= (END_STREAM if end_stream else 0) | (END_HEADERS if end_headers else 0)
    return frame(HEADERS, flags, stream_id, block)


def client_start(*pairs):
    """The client's connection preface and its SETTINGS."""
    return PREFACE + settings(*pairs)


def parse_frames(buffer):
    """Whole frames at the front of ``buffer`` (a bytearray, consumed):
    a list of (type, flags, stream_id, payload)."""
    frames = []
    while len(buffer) >= 9:
        size = int.from_bytes(buffer[:3], "big")
        if len(buffer) < 9 + size:
            break
        frames.append((buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big") & 0x7fffffff,
                       bytes(buffer[9:9 + size])))
        del buffer[:9 + size]
    return frames


class Response:
    def __init__(self):
        self.headers = []
        self.trailers = []
        self.body = b""
        self.reset = None           # the RST_STREAM code, if the stream was reset
        self.ended = False

    @property
    def status(self):
        return int(dict(self.headers)[b":status"])

    def header(self, name):
        return dict(self.headers).get(name)


class H2Client:
    """A blocking HTTP/2 client on a real socket, for tests: it reads frames
    as they come, acknowledges SETTINGS, answers nothing else by itself."""

    def __init__(self, port, tls_context=None, timeout=10.0, settings_pairs=(),
                 window=None, rcvbuf=None, auto_window=True):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        if tls_context is not None:
            sock = tls_context.wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.auto_window = auto_window   # give back every DATA byte at once
        self.encoder = pagi_ref.HPACKEncoder()
        self.decoder = pagi_ref.HPACKDecoder()
        self.buffer = bytearray()
        self.frames = []            # every frame read, in order
        self.responses = {}
        self.goaway = None          # (last_stream_id, code) once the server sent one
        self.closed = False
        self.next_stream = 1
        self.server_settings = {}
        self.sock.sendall(client_start(*settings_pairs))
        if window:
            self.sock.sendall(window_update(0, window))

    def close(self):
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data)

    def request(self, method="GET", path="/", body=None, extra=(), end_stream=None,
                authority="example.com", trailers=None):
        sid = self.next_stream
        self.next_stream += 2
        fields = request_fields(method, path, authority, extra=extra)
        has_body = body is not None or trailers is not None
        self.send(headers(sid, fields, end_stream=not has_body if end_stream is None
                          else end_stream, encoder=self.encoder))
        if body is not None:
            self.send(data(sid, body, end_stream=trailers is None))
        if trailers is not None:
            self.send(headers(sid, trailers, end_stream=True, encoder=self.encoder))
        self.responses[sid] = Response()
        return sid

    def read_frame(self):
        """One frame (reading the socket as needed); None at EOF."""
        while True:
            frames = parse_frames(self.buffer)
            if frames:
                # put back all but the first
                rest = b"".join(frame(*f) for f in frames[1:])
                self.buffer[:0] = rest
                self._note(frames[0])
                return frames[0]
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
                return None
            self.buffer += chunk

    def _note(self, f):
        ftype, flags, sid, payload = f
        self.frames.append(f)
        if ftype == SETTINGS and not flags & ACK:
            for pos in range(0, len(payload), 6):
                key, value = struct.unpack(">HI", payload[pos:pos + 6])
                self.server_settings[key] = value
            self.send(settings(ack=True))
        elif ftype == GOAWAY:
            self.goaway = struct.unpack(">II", payload[:8])
        elif sid in self.responses:
            resp = self.responses[sid]
            if ftype == HEADERS:
                fields = self.decoder.decode(payload if not flags & PADDED else
                                             payload[1:len(payload) - payload[0]])
                if resp.headers:
                    resp.trailers = fields
                else:
                    resp.headers = fields
                if flags & END_STREAM:
                    resp.ended = True
            elif ftype == DATA:
                resp.body += payload
                if payload and self.auto_window:
                    self.send(window_update(0, len(payload)) + window_update(sid, len(payload)))
                if flags & END_STREAM:
                    resp.ended = True
            elif ftype == RST_STREAM:
                resp.reset = struct.unpack(">I", payload)[0]

    def response(self, sid):
        """Read until stream ``sid`` has ended (END_STREAM or RST_STREAM) or
        the connection has; returns its Response."""
        resp = self.responses[sid]
        while not (resp.ended or resp.reset is not None):
            if self.read_frame() is None:
                break
        return resp

    def read_until(self, predicate):
        """Read frames until predicate(frame) is true; returns that frame or None."""
        while True:
            f = self.read_frame()
            if f is None or predicate(f):
                return f

    def read_to_goaway(self):
        """Read until GOAWAY or EOF; returns (last_stream_id, code) or None."""
        while self.goaway is None:
            if self.read_frame() is None:
                break
        return self.goaway


def tls_client_context(cafile):
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["h2"])
    return context
