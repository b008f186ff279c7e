"""Section 5, WebSocket (RFC 6455): the handshake, the scope, messages,
protocol enforcement, the close handshake, keepalive, application errors,
flow control on a WebSocket, and plain HTTP served alongside.

docs/spec.md section 5 (WS-SCOPE-*, WS-HS-*, WS-MSG-*, WS-PROTO-*,
WS-CLOSE-*, WS-KEEP-1, WS-DENY-*, WS-TRANSPORT-1); PAGI www spec,
"WebSocket"; RFC 6455 sections 4, 5 and 7.

Client side, raw sockets: the test speaks the protocol byte by byte (its
own masked frames, including broken ones) against a real server in a thread
of this process.  Applications record what they see in objects shared with
the test and set threading.Events; the test waits on those with a timeout,
never on sleep().  Every socket has a timeout, so a server that stays
silent fails the test instead of hanging it.
"""
import base64
import hashlib
import os
import socket
import struct
import threading
import time

import pytest

import pagi_ref
from conftest import serve
from spec_wire import Reader, get
from apputil import nodelay, wait_until

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
WAIT = 5.0          # bound for anything the server should do "at once"


# -- the client side ----------------------------------------------------------------

def accept_value(key):
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def mask_payload(payload, key):
    """XOR with the 4-byte key (RFC 6455 §5.3), fast enough for MiBs."""
    n = len(payload)
    if not n:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def frame(opcode, payload=b"", fin=True, mask=True, rsv=0, key=None):
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", first, m | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, m | 126, n)
    else:
        head = struct.pack("!BBQ", first, m | 127, n)
    if not mask:
        return head + payload
    key = key or os.urandom(4)
    return head + key + mask_payload(payload, key)


def close_payload(code=1000, reason=b""):
    return b"" if code is None else struct.pack("!H", code) + reason


class Frame:
    def __init__(self, fin, rsv, opcode, masked, length_form, payload):
        self.fin, self.rsv, self.opcode = fin, rsv, opcode
        self.masked, self.length_form, self.payload = masked, length_form, payload

    @property
    def close_code(self):
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def close_reason(self):
        return self.payload[2:]

    def __repr__(self):
        return "<Frame op=%x fin=%d masked=%d len=%d %r>" % (
            self.opcode, self.fin, self.masked, len(self.payload), self.payload[:40])


class WS:
    """One client connection: the handshake, then frames."""

    def __init__(self, port, timeout=WAIT, rcvbuf=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        nodelay(self.sock)
        self.reader = Reader(self.sock)
        self.response = None

    # handshake
    def handshake(self, path="/", key=b"dGhlIHNhbXBsZSBub25jZQ==", version=b"13",
                  protocols=None, method=b"GET", extra=(), with_key=True):
        lines = [method + b" " + path.encode() + b" HTTP/1.1", b"Host: ws.test",
                 b"Upgrade: websocket", b"Connection: Upgrade"]
        if with_key:
            lines.append(b"Sec-WebSocket-Key: " + key)
        if version is not None:
            lines.append(b"Sec-WebSocket-Version: " + version)
        if protocols is not None:
            lines.append(b"Sec-WebSocket-Protocol: " + protocols)
        lines += list(extra)
        self.sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        self.response = self.reader.read_response(head_request=True)
        return self.response

    def open(self, path, **kw):
        resp = self.handshake(path, **kw)
        assert resp.status == 101, resp
        return self

    # frames out
    def send_raw(self, data):
        self.sock.sendall(data)

    def send(self, opcode, payload=b"", **kw):
        self.sock.sendall(frame(opcode, payload, **kw))

    def text(self, s):
        self.send(TEXT, s.encode("utf-8"))

    def binary(self, b):
        self.send(BINARY, b)

    def close(self, code=1000, reason=b""):
        self.send(CLOSE, close_payload(code, reason))

    # frames in
    def recv_frame(self):
        head = self.reader.read_exact(2)
        if len(head) < 2:
            raise EOFError("connection closed (%r)" % head)
        b1, b2 = head
        n = b2 & 0x7F
        form = 7
        if n == 126:
            n = struct.unpack("!H", self.reader.read_exact(2))[0]
            form = 16
        elif n == 127:
            n = struct.unpack("!Q", self.reader.read_exact(8))[0]
            form = 64
        masked = bool(b2 & 0x80)
        key = self.reader.read_exact(4) if masked else None
        data = self.reader.read_exact(n)
        if len(data) < n:
            raise EOFError("connection closed inside a frame")
        if masked:
            data = mask_payload(data, key)
        return Frame(bool(b1 & 0x80), (b1 >> 4) & 0x7, b1 & 0x0F, masked, form, data)

    def recv_message(self, skip_pings=True):
        """("text", str) / ("bytes", b) / ("close", Frame) / ("ping"|"pong", b).
        Pings are answered and skipped unless skip_pings is False.  Every
        server frame is checked to be unmasked with clear RSV bits."""
        parts, kind = [], None
        while True:
            f = self.recv_frame()
            assert not f.masked, "server frame is masked: %r" % f
            assert f.rsv == 0, f
            if f.opcode == CLOSE:
                return "close", f
            if f.opcode == PING:
                if skip_pings:
                    self.send(PONG, f.payload)
                    continue
                return "ping", f.payload
            if f.opcode == PONG:
                if skip_pings:
                    continue
                return "pong", f.payload
            if f.opcode in (TEXT, BINARY):
                assert kind is None, "new data frame inside a fragmented message"
                kind = f.opcode
            else:
                assert f.opcode == CONT and kind is not None, f
            parts.append(f.payload)
            if f.fin:
                data = b"".join(parts)
                return ("text", data.decode("utf-8")) if kind == TEXT else ("bytes", data)

    def expect_close(self):
        """Read to the server's close frame (skipping data and pings); the Frame."""
        while True:
            kind, value = self.recv_message()
            if kind == "close":
                return value

    def eof(self, timeout=WAIT):
        """True when the server closes TCP within timeout (anything before
        the FIN is discarded)."""
        self.sock.settimeout(timeout)
        end = time.monotonic() + timeout
        try:
            while time.monotonic() < end:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False
        return False

    def quiet(self, seconds):
        """True when no byte arrives for `seconds`."""
        if self.reader.buf:
            return False
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return True
        finally:
            self.sock.settimeout(WAIT)
        self.reader.buf += data
        return False

    def shutdown(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


# -- the application side -----------------------------------------------------------

class Rec:
    """What one application saw, shared with the test."""

    def __init__(self):
        self.called = 0
        self.scope = None
        self.events = []          # every event receive() gave
        self.notes = {}           # free-form results of sends
        self.done = threading.Event()      # the app finished (any way)
        self.disconnected = threading.Event()
        self.flag = threading.Event()

    def disconnect(self, timeout=WAIT):
        assert self.disconnected.wait(timeout), "no websocket.disconnect: %r" % self.events
        return [e for e in self.events if e["type"] == "websocket.disconnect"][0]


def echo_body(rec, receive, send):
    """Echo until websocket.disconnect; records every event."""
    while True:
        ev = yield receive()
        rec.events.append(ev)
        if ev["type"] == "websocket.disconnect":
            rec.disconnected.set()
            return
        if ev.get("text") is not None:
            yield send({"type": "websocket.send", "text": ev["text"]})
        else:
            yield send({"type": "websocket.send", "bytes": ev["bytes"]})


def ws_app(body=echo_body, accept=None, rec=None):
    """An app that records websocket.connect, accepts, then runs body."""
    rec = rec or Rec()

    def app(scope, receive, send):
        rec.called += 1
        rec.scope = scope
        try:
            if scope["type"] != "websocket":
                raise ValueError("unsupported scope type %r" % scope["type"])
            ev = yield receive()
            rec.events.append(ev)
            yield send(accept or {"type": "websocket.accept"})
            yield from body(rec, receive, send)
        finally:
            rec.done.set()
    return app, rec


ROUTES = {}


def dispatch(scope, receive, send):
    if scope["type"] == "http" and scope["path"] == "/plain":
        return _plain(scope, receive, send)
    route = ROUTES.get(scope["path"])
    if route is None:
        raise ValueError("no route for %r" % scope["path"])
    return route(scope, receive, send)


def _plain(scope, receive, send):
    data = b"plain http"
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", b"%d" % len(data))]})
    yield send({"type": "http.response.body", "body": data})


_n = [0]


def route(app):
    _n[0] += 1
    path = "/r%d" % _n[0]
    ROUTES[path] = app
    return path


@pytest.fixture(scope="module")
def srv():
    with serve(dispatch) as s:
        yield s


def open_echo(srv, **kw):
    app, rec = ws_app(**kw)
    ws = WS(srv.port).open(route(app))
    return ws, rec


# -- the handshake (WS-HS-*, WS-SCOPE-*) ----------------------------------------------

def test_handshake_101_accept_key_subprotocol_headers_and_first_event(srv):
    app, rec = ws_app(accept={"type": "websocket.accept", "subprotocol": "superchat",
                              "headers": [(b"x-app", b"added")]})
    path = route(app)
    with WS(srv.port) as ws:
        resp = ws.handshake(path + "?a=1&b=%20", protocols=b"chat, superchat")
        assert resp.status == 101
        assert resp.header("sec-websocket-accept") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        assert resp.header("upgrade", b"").lower() == b"websocket"
        assert b"upgrade" in resp.header("connection", b"").lower()
        assert resp.header("sec-websocket-protocol") == b"superchat"
        assert resp.header("x-app") == b"added"
        assert resp.header("content-length") is None
        assert resp.header("transfer-encoding") is None
        ws.text("hi")
        assert ws.recv_message() == ("text", "hi")
    assert rec.events[0] == {"type": "websocket.connect"}
    s = rec.scope
    assert s["type"] == "websocket"
    assert s["scheme"] == "ws"
    assert s["http_version"] == "1.1"
    assert s["pagi"]["version"] == "0.3"
    assert s["path"] == path and isinstance(s["path"], str)
    assert s["raw_path"] == path.encode()
    assert s["query_string"] == b"a=1&b=%20"
    assert s["root_path"] == ""
    assert s["subprotocols"] == ["chat", "superchat"]
    names = [k for k, _v in s["headers"]]
    for name in (b"host", b"upgrade", b"connection", b"sec-websocket-key",
                 b"sec-websocket-version", b"sec-websocket-protocol"):
        assert name in names, names
    assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in s["headers"])
    assert dict(s["headers"])[b"sec-websocket-key"] == b"dGhlIHNhbXBsZSBub25jZQ=="
    assert isinstance(s["client"][0], str) and isinstance(s["client"][1], int)
    assert s["server"][1] == srv.port
    assert isinstance(s["state"], dict)
    assert isinstance(s["extensions"], dict)
    assert "websocket.http.response" in s["extensions"]
    assert "pagi.connection" not in s
    t = s["pagi.transport"]
    assert isinstance(t.buffered_amount(), int) and t.buffered_amount() >= 0


def test_subprotocols_split_and_stripped_and_empty_when_absent(srv):
    app, rec = ws_app()
    path = route(app)
    with WS(srv.port) as ws:
        ws.open(path, protocols=b" a ,b,  c  ")
        assert ws.response.header("sec-websocket-protocol") is None   # the app chose none
    assert rec.scope["subprotocols"] == ["a", "b", "c"]
    app2, rec2 = ws_app()
    with WS(srv.port) as ws:
        ws.open(route(app2))
    assert rec2.scope["subprotocols"] == []


def test_handshake_waits_for_the_app(srv):
    """WS-HS-1: no 101 until the app accepted."""
    gate = threading.Event()
    rec = Rec()

    def app(scope, receive, send):
        ev = yield receive()
        rec.events.append(ev)
        rec.flag.set()
        yield pagi_ref.to_thread(gate.wait, WAIT)
        yield send({"type": "websocket.accept"})
        yield from echo_body(rec, receive, send)

    with WS(srv.port) as ws:
        ws.sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Version: 13\r\n\r\n" % route(app).encode())
        assert rec.flag.wait(WAIT)
        assert ws.quiet(0.2), ws.reader.buf
        gate.set()
        assert ws.reader.read_response(head_request=True).status == 101


def test_close_before_accept_is_403(srv):
    rec = Rec()

    def app(scope, receive, send):
        rec.events.append((yield receive()))
        yield send({"type": "websocket.close"})

    with WS(srv.port) as ws:
        resp = ws.handshake(route(app))
        assert resp.status == 403
        assert resp.header("sec-websocket-accept") is None
    assert rec.events == [{"type": "websocket.connect"}]


@pytest.mark.parametrize("how", ["no-key", "post"])
def test_unacceptable_handshake_is_400_and_the_app_is_not_called(srv, how):
    app, rec = ws_app()
    with WS(srv.port) as ws:
        if how == "no-key":
            resp = ws.handshake(route(app), with_key=False)
        else:
            resp = ws.handshake(route(app), method=b"POST")
        assert resp.status == 400
        assert resp.header("sec-websocket-accept") is None
    assert rec.called == 0


def test_version_8_is_426_with_version_13(srv):
    app, rec = ws_app()
    with WS(srv.port) as ws:
        resp = ws.handshake(route(app), version=b"8")
        assert resp.status == 426
        assert resp.header("sec-websocket-version") == b"13"
    assert rec.called == 0


def test_denial_response(srv):
    """WS-DENY-1: the app's own HTTP response, then the connection closes."""
    def app(scope, receive, send):
        assert "websocket.http.response" in scope["extensions"]
        yield receive()
        yield send({"type": "websocket.http.response.start", "status": 401,
                    "headers": [(b"www-authenticate", b"Bearer"),
                                (b"content-type", b"text/plain")]})
        yield send({"type": "websocket.http.response.body", "body": b"den", "more": 1})
        yield send({"type": "websocket.http.response.body", "body": b"ied"})

    with WS(srv.port) as ws:
        resp = ws.handshake(route(app))
        assert resp.status == 401
        assert resp.header("www-authenticate") == b"Bearer"
        assert resp.header("sec-websocket-accept") is None
        rest = ws.reader.read_all()       # until the server closes
        if resp.header("transfer-encoding", b"").lower() == b"chunked":
            assert rest == b"3\r\nden\r\n3\r\nied\r\n0\r\n\r\n", rest
        else:
            assert rest == b"denied", rest
        assert ws.reader.eof


def test_denial_abandoned_after_start_is_logged(srv):
    """An app that sends websocket.http.response.start and finishes without
    the body is an application error, logged as HTTP-ERR-7/HTTP-ERR-4 log
    it for http; the client sees a 500 (nothing was written yet) or a close."""
    def app(scope, receive, send):
        yield receive()
        yield send({"type": "websocket.http.response.start", "status": 401, "headers": []})

    path = route(app)
    with WS(srv.port) as ws:
        ws.sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Version: 13\r\n\r\n" % path.encode())
        data = ws.reader.read_all()
        assert data == b"" or data.startswith(b"HTTP/1.1 500 "), data
    assert wait_until(lambda: any(path in l for l in srv.errors), 2), srv.errors


def test_denial_events_after_accept_are_ignored(srv):
    """WS-DENY-2: they resolve, nothing reaches the wire, the session goes on."""
    def body(rec, receive, send):
        for ev in ({"type": "websocket.http.response.start", "status": 401, "headers": []},
                   {"type": "websocket.http.response.body", "body": b"nope"}):
            try:
                rec.notes[ev["type"]] = ("ok", (yield send(ev)))
            except Exception as exc:
                rec.notes[ev["type"]] = ("raised", exc)
        yield send({"type": "websocket.send", "text": "still-open"})
        yield from echo_body(rec, receive, send)

    ws, rec = open_echo(srv, body=body)
    with ws:
        assert ws.recv_message() == ("text", "still-open")
        ws.text("x")
        assert ws.recv_message() == ("text", "x")
    assert rec.notes == {"websocket.http.response.start": ("ok", None),
                         "websocket.http.response.body": ("ok", None)}, rec.notes


# -- messages (WS-MSG-*) ----------------------------------------------------------------

def test_text_and_binary_echo_server_frames_unmasked(srv):
    ws, rec = open_echo(srv)
    with ws:
        ws.text("h\u00e9llo \u2603")
        f = ws.recv_frame()
        assert (f.fin, f.rsv, f.opcode, f.masked) == (True, 0, TEXT, False)
        assert f.payload == "h\u00e9llo \u2603".encode("utf-8")
        ws.binary(b"\x00\xff\x10")
        f = ws.recv_frame()
        assert (f.fin, f.opcode, f.masked, f.payload) == (True, BINARY, False, b"\x00\xff\x10")
        ws.text("")
        assert ws.recv_message() == ("text", "")
        ws.binary(b"")
        assert ws.recv_message() == ("bytes", b"")
        ws.close()
        rec.disconnect()
    got = [e for e in rec.events if e["type"] == "websocket.receive"]
    assert got[0]["text"] == "h\u00e9llo \u2603" and got[0].get("bytes") is None
    assert got[1]["bytes"] == b"\x00\xff\x10" and got[1].get("text") is None
    assert type(got[1]["bytes"]) is bytes
    assert got[2]["text"] == "" and got[3]["bytes"] == b""


def test_payload_length_forms_and_a_1_mib_message(srv):
    ws, rec = open_echo(srv)
    with ws:
        for n, form in ((125, 7), (126, 16), (65535, 16), (65536, 64), (1 << 20, 64)):
            data = os.urandom(n)
            ws.binary(data)
            f = ws.recv_frame()
            assert (f.opcode, f.fin, f.masked, f.length_form) == (BINARY, True, False, form), n
            assert f.payload == data
        text = "\u00e9" * (1 << 19)          # 1 MiB of UTF-8
        ws.text(text)
        assert ws.recv_message() == ("text", text)


def test_fragmented_message_with_interleaved_ping(srv):
    ws, rec = open_echo(srv)
    with ws:
        ws.send(TEXT, b"frag", fin=False)
        ws.send(PING, b"ping-payload")
        ws.send(CONT, b"men", fin=False)
        ws.send(CONT, b"ted \xe2\x98", fin=False)   # a character split across frames
        ws.send(CONT, b"\x83", fin=True)
        assert ws.recv_message(skip_pings=False) == ("pong", b"ping-payload")
        assert ws.recv_message() == ("text", "fragmented \u2603")
        ws.send(BINARY, b"\x01", fin=False)
        ws.send(CONT, b"\x02", fin=False)
        ws.send(CONT, b"\x03")
        assert ws.recv_message() == ("bytes", b"\x01\x02\x03")
        ws.send(PING, b"")
        assert ws.recv_message(skip_pings=False) == ("pong", b"")
    got = [e for e in rec.events if e["type"] == "websocket.receive"]
    assert [g.get("text") or g.get("bytes") for g in got] == ["fragmented \u2603", b"\x01\x02\x03"]


def test_unsolicited_pong_is_ignored(srv):
    ws, rec = open_echo(srv)
    with ws:
        ws.send(PONG, b"unsolicited")
        ws.text("after")
        assert ws.recv_message(skip_pings=False) == ("text", "after")


def test_send_with_both_or_neither_fails_with_event_error(srv):
    def body(rec, receive, send):
        for name, ev in (("both", {"type": "websocket.send", "text": "a", "bytes": b"b"}),
                         ("neither", {"type": "websocket.send"}),
                         ("nones", {"type": "websocket.send", "text": None, "bytes": None}),
                         ("text-bytes", {"type": "websocket.send", "text": b"x"}),
                         ("bytes-str", {"type": "websocket.send", "bytes": "x"})):
            try:
                yield send(ev)
                rec.notes[name] = None
            except Exception as exc:
                rec.notes[name] = exc
        yield send({"type": "websocket.send", "text": "still-open"})
        yield from echo_body(rec, receive, send)

    ws, rec = open_echo(srv, body=body)
    with ws:
        assert ws.recv_message() == ("text", "still-open")   # nothing before it (CORE-ERR-5)
    for name in ("both", "neither", "nones", "text-bytes", "bytes-str"):
        exc = rec.notes[name]
        assert isinstance(exc, pagi_ref.EventError), (name, exc)
        assert isinstance(exc, ValueError)
        assert "websocket.send" in str(exc), exc


def test_send_accepts_bytearray_and_memoryview(srv):
    def body(rec, receive, send):
        yield send({"type": "websocket.send", "bytes": bytearray(b"ba")})
        yield send({"type": "websocket.send", "bytes": memoryview(b"mv")})
        yield from echo_body(rec, receive, send)

    ws, rec = open_echo(srv, body=body)
    with ws:
        assert ws.recv_message() == ("bytes", b"ba")
        assert ws.recv_message() == ("bytes", b"mv")


# -- protocol errors (WS-PROTO-*, WS-MSG-4, WS-CLOSE-4) ---------------------------------

VIOLATIONS = {
    "rsv1": ([frame(TEXT, b"x", rsv=4)], 1002),
    "rsv3": ([frame(BINARY, b"x", rsv=1)], 1002),
    "opcode-3": ([frame(0x3, b"x")], 1002),
    "opcode-0xB": ([frame(0xB, b"")], 1002),
    "control-126": ([frame(PING, b"p" * 126)], 1002),
    "fragmented-ping": ([frame(PING, b"p", fin=False)], 1002),
    "unmasked": ([frame(TEXT, b"x", mask=False)], 1002),
    "lone-continuation": ([frame(CONT, b"x")], 1002),
    "text-inside-fragmented": ([frame(TEXT, b"a", fin=False), frame(TEXT, b"b")], 1002),
    "close-1-byte": ([frame(CLOSE, b"\x03")], 1002),
    "close-1005": ([frame(CLOSE, close_payload(1005))], 1002),
    "close-999": ([frame(CLOSE, close_payload(999))], 1002),
    "close-2000": ([frame(CLOSE, close_payload(2000))], 1002),
    "close-1004": ([frame(CLOSE, close_payload(1004))], 1002),
    "close-5000": ([frame(CLOSE, close_payload(5000))], 1002),
    "text-bad-utf8": ([frame(TEXT, b"ok \xff\xfe")], 1007),
    "text-surrogate": ([frame(TEXT, b"\xed\xa0\x80")], 1007),
    "fragmented-bad-utf8": ([frame(TEXT, b"\xce", fin=False), frame(CONT, b"\x41")], 1007),
    "close-reason-bad-utf8": ([frame(CLOSE, close_payload(1000, b"\xff"))], 1007),
}


@pytest.mark.parametrize("name", sorted(VIOLATIONS))
def test_protocol_violation_fails_the_connection(srv, name):
    frames, code = VIOLATIONS[name]
    ws, rec = open_echo(srv)
    with ws:
        ws.text("before")
        assert ws.recv_message() == ("text", "before")
        ws.send_raw(b"".join(frames))
        f = ws.expect_close()
        assert f.close_code == code, (name, f)
        f.close_reason.decode("utf-8")          # a valid reason, if any
        ws.close(code)
        assert ws.eof(), "server kept the connection open after failing it"
    ev = rec.disconnect()
    assert (ev["code"], ev["reason"]) == (code, "protocol_error"), (name, ev)
    received = [e for e in rec.events if e["type"] == "websocket.receive"]
    assert len(received) == 1, received         # nothing of the bad message delivered


@pytest.mark.parametrize("how", ["single", "fragmented"])
def test_message_over_the_limit_is_1009(how):
    app, rec = ws_app()
    with serve(app, ws_max_message_size=1000) as s:
        with WS(s.port).open("/") as ws:
            if how == "single":
                ws.binary(b"x" * 1000)               # at the limit: fine
                assert ws.recv_message() == ("bytes", b"x" * 1000)
                ws.binary(b"y" * 1001)
            else:                                    # each frame under it, the sum over
                ws.send(TEXT, b"a" * 600, fin=False)
                ws.send(CONT, b"b" * 401)
            f = ws.expect_close()
            assert f.close_code == 1009, f
            assert ws.eof()
        ev = rec.disconnect()
        assert ev["code"] == 1009
        assert ev["reason"] == "protocol_error", ev


# -- the close handshake (WS-CLOSE-*) ------------------------------------------------------

def test_app_close_4000_bye(srv):
    def body(rec, receive, send):
        yield send({"type": "websocket.send", "text": "last"})
        yield send({"type": "websocket.close", "code": 4000, "reason": "bye"})
        ev = yield receive()
        rec.events.append(ev)
        rec.disconnected.set()

    ws, rec = open_echo(srv, body=body)
    with ws:
        assert ws.recv_message() == ("text", "last")
        f = ws.recv_frame()
        assert (f.opcode, f.masked, f.close_code, f.close_reason) == (CLOSE, False, 4000, b"bye")
        ws.close(4000, b"bye")
        assert ws.eof(), "server did not close TCP after the close handshake"
    assert rec.disconnect()["type"] == "websocket.disconnect"


def test_app_close_defaults_to_1000(srv):
    def body(rec, receive, send):
        yield send({"type": "websocket.close"})

    ws, rec = open_echo(srv, body=body)
    with ws:
        f = ws.recv_frame()
        assert (f.opcode, f.close_code, f.close_reason) == (CLOSE, 1000, b"")
        ws.close()
        assert ws.eof()


def test_app_close_rejects_bad_code(srv):
    """A close code that cannot go on the wire (1005, 1006, out of range)
    fails the send, and the session goes on."""
    def body(rec, receive, send):
        for code in (1005, 1006, 999, 5000):
            try:
                yield send({"type": "websocket.close", "code": code})
                rec.notes[code] = None
            except Exception as exc:
                rec.notes[code] = exc
        yield send({"type": "websocket.send", "text": "still-open"})
        yield from echo_body(rec, receive, send)

    ws, rec = open_echo(srv, body=body)
    with ws:
        assert ws.recv_message() == ("text", "still-open")
    for code, exc in rec.notes.items():
        assert isinstance(exc, pagi_ref.EventError), (code, exc)


def test_client_close_1000_done_is_echoed(srv):
    ws, rec = open_echo(srv)
    with ws:
        ws.close(1000, b"done")
        f = ws.recv_frame()
        assert (f.opcode, f.masked, f.close_code) == (CLOSE, False, 1000)
        assert ws.eof(), "server did not close TCP after answering the close"
    ev = rec.disconnect()
    assert ev == {"type": "websocket.disconnect", "code": 1000, "reason": "done"}


def test_client_close_without_payload_is_1005(srv):
    ws, rec = open_echo(srv)
    with ws:
        ws.close(None)
        f = ws.recv_frame()
        assert f.opcode == CLOSE
        assert f.close_code in (None, 1000), f      # never 1005 on the wire
        assert ws.eof()
    ev = rec.disconnect()
    assert ev["code"] == 1005 and ev["reason"] == ""


def test_tcp_close_without_close_frame_is_1006_client_closed_and_send_after_is_noop(srv):
    def body(rec, receive, send):
        yield from echo_body(rec, receive, send)
        try:
            rec.notes["after"] = ("ok", (yield send({"type": "websocket.send", "text": "late"})))
            rec.notes["close-after"] = ("ok", (yield send({"type": "websocket.close"})))
        except Exception as exc:
            rec.notes["after"] = ("raised", exc)
        rec.flag.set()

    ws, rec = open_echo(srv, body=body)
    ws.text("x")
    assert ws.recv_message() == ("text", "x")
    ws.shutdown()
    ev = rec.disconnect()
    assert ev == {"type": "websocket.disconnect", "code": 1006, "reason": "client_closed"}
    assert rec.flag.wait(WAIT)
    assert rec.notes == {"after": ("ok", None), "close-after": ("ok", None)}, rec.notes


def test_data_after_close_frame_is_not_delivered(srv):
    ws, rec = open_echo(srv)
    with ws:
        ws.send_raw(frame(CLOSE, close_payload(1000)) + frame(TEXT, b"after-close"))
        f = ws.recv_frame()
        assert f.opcode == CLOSE
        assert ws.eof()
    rec.disconnect()
    assert not [e for e in rec.events if e.get("text") == "after-close"]


# -- keepalive (WS-KEEP-1) --------------------------------------------------------------------

def test_keepalive_pings_and_stop(srv):
    def body(rec, receive, send):
        yield send({"type": "websocket.keepalive", "interval": 0.1})
        while True:
            ev = yield receive()
            rec.events.append(ev)
            if ev["type"] == "websocket.disconnect":
                rec.disconnected.set()
                return
            if ev.get("text") == "stop":
                yield send({"type": "websocket.keepalive", "interval": 0})
                yield send({"type": "websocket.send", "text": "stopped"})

    ws, rec = open_echo(srv, body=body)
    with ws:
        start = time.monotonic()
        pings = []
        while len(pings) < 2:
            kind, payload = ws.recv_message(skip_pings=False)
            assert kind == "ping", (kind, payload)
            pings.append(time.monotonic() - start)
            ws.send(PONG, payload)
        ws.text("stop")
        while True:
            kind, payload = ws.recv_message(skip_pings=False)
            if kind == "text":
                assert payload == "stopped"
                break
            assert kind == "ping"
        # Pings go out from the server's sweep (every 0.5 s): two sweeps
        # without one show that they stopped.
        assert ws.quiet(1.2), "pings went on after interval 0: %r" % ws.reader.buf
    rec.disconnect()


def test_keepalive_timeout_without_pongs_is_1006(srv):
    def body(rec, receive, send):
        yield send({"type": "websocket.keepalive", "interval": 0.1, "timeout": 0.2})
        ev = yield receive()
        rec.events.append(ev)
        rec.disconnected.set()

    ws, rec = open_echo(srv, body=body)
    with ws:
        kind, _ = ws.recv_message(skip_pings=False)
        assert kind == "ping"                     # ... and never answered
        ev = rec.disconnect()
        assert ev == {"type": "websocket.disconnect", "code": 1006,
                      "reason": "keepalive_timeout"}, ev
        assert ws.eof(), "server kept the connection after the keepalive timeout"


def test_keepalive_answered_pongs_keep_the_connection(srv):
    def body(rec, receive, send):
        yield send({"type": "websocket.keepalive", "interval": 0.05, "timeout": 0.15})
        yield from echo_body(rec, receive, send)

    ws, rec = open_echo(srv, body=body)
    with ws:
        for _ in range(2):      # the second later than the 0.15 s timeout after the first
            kind, payload = ws.recv_message(skip_pings=False)
            assert kind == "ping"
            ws.send(PONG, payload)
        ws.text("alive")
        assert ws.recv_message() == ("text", "alive")
        assert not rec.disconnected.is_set(), rec.events


# -- the application's end (CORE-DONE, CORE-APP-6) ----------------------------------------------

def test_app_returns_after_accept_close_1000(srv):
    def body(rec, receive, send):
        yield send({"type": "websocket.send", "text": "bye"})

    ws, rec = open_echo(srv, body=body)
    with ws:
        assert ws.recv_message() == ("text", "bye")
        f = ws.recv_frame()
        assert (f.opcode, f.close_code) == (CLOSE, 1000)
        ws.close()
        assert ws.eof()


def test_app_raises_after_accept_close_1011_and_logged(srv):
    def body(rec, receive, send):
        yield send({"type": "websocket.send", "text": "soon"})
        raise RuntimeError("ws-boom-after-accept")

    ws, rec = open_echo(srv, body=body)
    with ws:
        assert ws.recv_message() == ("text", "soon")
        f = ws.recv_frame()
        assert (f.opcode, f.close_code) == (CLOSE, 1011)
        ws.close(1011)
        assert ws.eof()
    assert wait_until(lambda: any("ws-boom-after-accept" in l and "Traceback" in l
                                  for l in srv.errors)), srv.errors


def test_app_raises_before_accept_500_and_logged(srv):
    def app(scope, receive, send):
        yield receive()
        raise RuntimeError("ws-boom-before-accept")

    with WS(srv.port) as ws:
        resp = ws.handshake(route(app))
        assert resp.status == 500
        assert ws.eof()
    assert wait_until(lambda: any("ws-boom-before-accept" in l for l in srv.errors)), srv.errors


def test_app_returns_before_accept_403(srv):
    def app(scope, receive, send):
        yield receive()

    with WS(srv.port) as ws:
        resp = ws.handshake(route(app))
        assert resp.status == 403


def test_bad_accept_event_fails_the_send(srv):
    def app(scope, receive, send):
        yield receive()
        try:
            yield send({"type": "websocket.accept", "subprotocol": b"bytes-not-str"})
        except pagi_ref.EventError:
            yield send({"type": "websocket.accept", "headers": [(b"x-second", b"try")]})
            yield send({"type": "websocket.close", "code": 1000})

    with WS(srv.port) as ws:
        resp = ws.handshake(route(app))
        assert resp.status == 101
        assert resp.header("x-second") == b"try"
        assert ws.recv_frame().close_code == 1000


def test_http_events_fail_on_a_websocket_scope(srv):
    def body(rec, receive, send):
        try:
            yield send({"type": "http.response.start", "status": 200, "headers": []})
            rec.notes["http"] = None
        except Exception as exc:
            rec.notes["http"] = exc
        yield send({"type": "websocket.send", "text": "ok"})
        yield from echo_body(rec, receive, send)

    ws, rec = open_echo(srv, body=body)
    with ws:
        assert ws.recv_message() == ("text", "ok")
    assert isinstance(rec.notes["http"], pagi_ref.EventError), rec.notes


# -- flow control (WS-TRANSPORT-1, TRANSPORT-4, TRANSPORT-9) ----------------------------------

def test_buffered_amount_bounded_for_a_client_that_does_not_read():
    high, low, msg = 65536, 16384, 65536
    n_max = 400                                  # 25 MiB: far more than the kernel holds
    peaks, state = [], {"suspended": 0, "sent": 0}
    first_suspension = threading.Event()
    rec = Rec()

    def body(rec, receive, send):
        t = rec.scope["pagi.transport"]
        assert t.buffered_amount() == 0
        for i in range(n_max):
            f = send({"type": "websocket.send", "bytes": struct.pack("!I", i) * (msg // 4)})
            peaks.append(t.buffered_amount())
            if not f.done():
                state["suspended"] += 1
                first_suspension.set()
            yield f
            state["sent"] = i + 1
            if state["suspended"] >= 3:
                break
        yield send({"type": "websocket.send", "text": "end"})
        yield send({"type": "websocket.close"})

    app, rec = ws_app(body=body)
    with serve(app, write_high_watermark=high, write_low_watermark=low) as s:
        with WS(s.port, rcvbuf=16384, timeout=10).open("/") as ws:
            assert first_suspension.wait(10), "send never suspended (%d sent)" % state["sent"]
            i = 0
            while True:
                kind, data = ws.recv_message()
                if kind == "text":
                    assert data == "end"
                    break
                assert kind == "bytes" and data == struct.pack("!I", i) * (msg // 4), i
                i += 1
            assert i == state["sent"]                 # nothing lost (TRANSPORT-9)
            assert ws.recv_frame().opcode == CLOSE
    assert state["suspended"] >= 1
    assert max(peaks) <= high + msg + 14, max(peaks)  # high mark + one framed message


# -- plain HTTP alongside ---------------------------------------------------------------------

def test_plain_http_served_while_a_websocket_is_open(srv):
    ws, rec = open_echo(srv)
    with ws:
        ws.text("one")
        assert ws.recv_message() == ("text", "one")
        resp = get(srv.port, "/plain")
        assert (resp.status, resp.body) == (200, b"plain http")
        ws.text("two")
        assert ws.recv_message() == ("text", "two")
        ws.close()
        assert ws.recv_frame().opcode == CLOSE
    rec.disconnect()


def test_upgrade_request_with_body_header_and_keepalive_http_before_it(srv):
    """An HTTP request, then an upgrade on the same keep-alive connection."""
    app, rec = ws_app()
    path = route(app)
    with WS(srv.port) as ws:
        ws.sock.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = ws.reader.read_response()
        assert (resp.status, resp.body) == (200, b"plain http")
        ws.open(path)
        ws.text("upgraded")
        assert ws.recv_message() == ("text", "upgraded")


# -- limits and resource bounds ------------------------------------------------------------------

def test_message_limit_is_per_message_not_carried_over():
    """ws_max_message_size bounds one message: two 600-byte messages under a
    1000-byte limit are both fine, also when the second is fragmented."""
    app, rec = ws_app()
    with serve(app, ws_max_message_size=1000) as s:
        with WS(s.port).open("/") as ws:
            ws.binary(b"a" * 600)
            assert ws.recv_message() == ("bytes", b"a" * 600)
            ws.binary(b"b" * 600)
            kind, value = ws.recv_message()
            assert (kind, value) == ("bytes", b"b" * 600), (kind, value)
            ws.send(TEXT, b"c" * 300, fin=False)
            ws.send(CONT, b"d" * 300)
            assert ws.recv_message() == ("text", "c" * 300 + "d" * 300)


def test_frames_read_while_the_queue_was_full_are_delivered():
    """Inbound backpressure: many small messages arrive in one read while the
    app is not receiving; once it receives, every one of them is delivered
    (no further byte from the client is needed to get them parsed)."""
    n = 100
    gate = threading.Event()

    def body(rec, receive, send):
        yield pagi_ref.to_thread(gate.wait, WAIT)
        yield from echo_body(rec, receive, send)

    app, rec = ws_app(body=body)
    with serve(app, max_receive_queue=16) as s:
        with WS(s.port).open("/") as ws:
            ws.send_raw(b"".join(frame(TEXT, b"m%d" % i) for i in range(n)))

            def queue_full():
                conns = [c for c in list(s.server.connections)
                         if isinstance(c, pagi_ref.WebSocketConnection)]
                return conns and len(conns[0].queue) >= 16
            assert wait_until(queue_full), "the inbound queue never filled"
            gate.set()
            for i in range(n):
                assert ws.recv_message() == ("text", "m%d" % i), i


def test_keepalive_sent_before_accept_starts_after_accept(srv):
    def app(scope, receive, send):
        yield receive()
        yield send({"type": "websocket.keepalive", "interval": 0.05})
        yield pagi_ref.sleep(0.15)       # the first ping falls due before the accept
        yield send({"type": "websocket.accept"})
        while (yield receive())["type"] != "websocket.disconnect":
            pass

    with WS(srv.port) as ws:
        ws.open(route(app))
        kind, _ = ws.recv_message(skip_pings=False)
        assert kind == "ping"


def test_keepalive_interval_0_cancels_the_pending_pong_deadline(srv):
    """'interval 0 stops it': no keepalive_timeout after keepalive was
    turned off, even though the last ping went unanswered."""
    def body(rec, receive, send):
        yield send({"type": "websocket.keepalive", "interval": 0.05, "timeout": 0.3})
        while True:
            ev = yield receive()
            rec.events.append(ev)
            if ev["type"] == "websocket.disconnect":
                rec.disconnected.set()
                return
            if ev.get("text") == "stop":
                yield send({"type": "websocket.keepalive", "interval": 0})
                yield send({"type": "websocket.send", "text": "stopped"})
            else:
                yield send({"type": "websocket.send", "text": ev["text"]})

    ws, rec = open_echo(srv, body=body)
    with ws:
        kind, _ = ws.recv_message(skip_pings=False)
        assert kind == "ping"                       # not answered
        ws.text("stop")
        while True:
            kind, payload = ws.recv_message(skip_pings=False)
            if kind == "text":
                break
        assert not rec.disconnected.wait(1.2), rec.disconnect()   # two sweeps
        ws.text("still")
        assert ws.recv_message(skip_pings=False) == ("text", "still")


def test_app_close_reason_on_the_wire_is_valid_utf8_and_fits(srv):
    """A control frame carries at most 125 bytes: a long reason is either
    refused (EventError) or cut at a character boundary, never mid-character."""
    def body(rec, receive, send):
        try:
            yield send({"type": "websocket.close", "code": 1000, "reason": "\u00e9" * 100})
            rec.notes["close"] = None
        except pagi_ref.EventError as exc:
            rec.notes["close"] = exc
            yield send({"type": "websocket.close", "code": 1000, "reason": "short"})

    ws, rec = open_echo(srv, body=body)
    with ws:
        f = ws.recv_frame()
        assert f.opcode == CLOSE and f.close_code == 1000
        assert len(f.payload) <= 125
        f.close_reason.decode("utf-8")              # raises on a cut character


def test_read_ahead_before_accept_is_bounded(srv):
    """While the app has not answered the handshake the server must not
    buffer whatever the client sends without limit (as the HTTP side bounds
    pipelined bytes): a client pushing 32 MiB is stopped by TCP backpressure."""
    gate = threading.Event()

    def app(scope, receive, send):
        yield receive()
        yield pagi_ref.to_thread(gate.wait, 10)
        yield send({"type": "websocket.close"})

    with WS(srv.port) as ws:
        ws.sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Version: 13\r\n\r\n" % route(app).encode())
        chunk = frame(BINARY, b"z" * 65000) * 16     # ~1 MiB of valid frames
        ws.sock.settimeout(1.0)
        sent = 0
        try:
            while sent < 32 << 20:
                ws.sock.sendall(chunk)
                sent += len(chunk)
        except socket.timeout:
            pass
        finally:
            gate.set()
        assert sent < 32 << 20, "the server read 32 MiB ahead of the accept"


def test_ping_flood_from_a_client_that_does_not_read_is_bounded(srv):
    """Pongs are output too: a client that sends pings and never reads must
    not make the server's outgoing buffer grow without bound (it stops
    reading, or drops the connection)."""
    ws = WS(srv.port, rcvbuf=4096)
    app, rec = ws_app()
    ws.open(route(app))
    with ws:
        ping = frame(PING, b"p" * 125)
        burst = ping * 8000                           # ~1 MiB of pings
        ws.sock.settimeout(1.0)
        sent = 0
        try:
            while sent < 32 << 20:
                ws.sock.sendall(burst)
                sent += len(burst)
        except (socket.timeout, ConnectionError):
            pass
        t = rec.scope["pagi.transport"]
        amount = t.buffered_amount()
        assert amount <= 4 << 20, "%d bytes of pongs buffered for a client that " \
                                  "does not read (%d bytes of pings sent)" % (amount, sent)


def test_server_shutdown_closes_with_1001():
    app, rec = ws_app()
    with serve(app) as s:
        with WS(s.port).open("/") as ws:
            ws.text("x")
            assert ws.recv_message() == ("text", "x")
            s.server.stop(timeout=2)
            f = ws.expect_close()
            assert f.close_code == 1001, f
            ws.close(1001)
            assert ws.eof()
        ev = rec.disconnect()
        assert ev["code"] in (1001, 1006), ev


# -- the server's keepalive (--ws-ping-interval, --ws-ping-timeout) --------------------------

def test_server_pings_by_default_and_drops_a_peer_that_does_not_answer():
    """ws_ping_interval / ws_ping_timeout apply without any websocket.keepalive:
    the unanswered ping ends the session with a 1011 close frame on the wire
    and 1006 keepalive_timeout for the application (PAGI)."""
    app, rec = ws_app()
    with serve(app, ws_ping_interval=0.1, ws_ping_timeout=0.1) as s:
        with WS(s.port).open("/") as ws:
            kind, _ = ws.recv_message(skip_pings=False)
            assert kind == "ping"                     # ... and never answered
            f = ws.recv_frame()
            assert (f.opcode, f.close_code) == (CLOSE, 1011), f
            f.close_reason.decode("utf-8")
            assert ws.eof(), "server kept a peer that does not answer pings"
        ev = rec.disconnect()
        assert ev == {"type": "websocket.disconnect", "code": 1006,
                      "reason": "keepalive_timeout"}, ev
        assert wait_until(lambda: not s.server.connections), s.server.connections


def test_server_pings_answered_keep_the_session():
    app, rec = ws_app()
    with serve(app, ws_ping_interval=0.1, ws_ping_timeout=0.1) as s:
        with WS(s.port).open("/") as ws:
            for _ in range(2):          # two sweeps, each past the timeout
                kind, payload = ws.recv_message(skip_pings=False)
                assert kind == "ping"
                ws.send(PONG, payload)
            ws.text("alive")
            assert ws.recv_message() == ("text", "alive")
        assert not [e for e in rec.events if e["type"] == "websocket.disconnect"
                    and e["reason"] == "keepalive_timeout"], rec.events


def test_ping_interval_0_sends_no_pings_and_the_app_can_still_ask():
    def body(rec, receive, send):
        ev = yield receive()
        rec.events.append(ev)
        yield send({"type": "websocket.keepalive", "interval": 0.1})
        yield from echo_body(rec, receive, send)

    app, rec = ws_app(body=body)
    with serve(app, ws_ping_interval=0) as s:
        with WS(s.port).open("/") as ws:
            assert ws.quiet(1.2), "a ping with ws_ping_interval 0: %r" % ws.reader.buf
            ws.text("now")
            assert ws.recv_message(skip_pings=False) == ("ping", b"")


def test_pong_deadline_waits_while_the_server_is_not_reading():
    """The application does not receive: the inbound queue is full and the
    server stops reading, so the client's pongs sit unread in the socket.
    That is the server's backlog, not a dead peer: the session survives."""
    gate = threading.Event()

    def body(rec, receive, send):
        while not gate.is_set():
            yield pagi_ref.sleep(0.02)
        yield from echo_body(rec, receive, send)

    app, rec = ws_app(body=body)
    with serve(app, ws_ping_interval=0.1, ws_ping_timeout=0.1, max_receive_queue=1) as s:
        with WS(s.port).open("/") as ws:
            for i in range(3):
                ws.text("m%d" % i)
            conns = list(s.server.connections)
            assert wait_until(lambda: conns and not conns[0].reading), "reading never paused"
            for _ in range(3):      # three sweeps with unread pongs
                kind, payload = ws.recv_message(skip_pings=False)
                assert kind == "ping"
                ws.send(PONG, payload)
            gate.set()
            got = []
            while len(got) < 3:
                kind, value = ws.recv_message()
                assert kind == "text", (kind, value)
                got.append(value)
            assert got == ["m0", "m1", "m2"]
        assert not [e for e in rec.events if e.get("reason") == "keepalive_timeout"]


# -- permessage-deflate (RFC 7692) -----------------------------------------------------------

import zlib  # noqa: E402


def offer(value):
    return [b"Sec-WebSocket-Extensions: " + value]


class Deflate:
    """The client's side of permessage-deflate: windows as the server answered."""

    def __init__(self, response):
        params = dict((p.strip().partition(b"=")[0], p.strip().partition(b"=")[2])
                      for p in response.split(b";")[1:])
        self.params = params
        server_bits = int(params.get(b"server_max_window_bits") or 15)
        client_bits = int(params.get(b"client_max_window_bits") or 15)
        self.inflater = zlib.decompressobj(-server_bits)
        self.deflater = zlib.compressobj(6, zlib.DEFLATED, -max(client_bits, 9))

    def compress(self, data):
        out = self.deflater.compress(data) + self.deflater.flush(zlib.Z_SYNC_FLUSH)
        assert out.endswith(b"\x00\x00\xff\xff")
        return out[:-4]

    def inflate(self, data):
        return self.inflater.decompress(data + b"\x00\x00\xff\xff")


def recv_compressed(ws, deflate):
    """One message from the server: (kind, payload, rsv of its first frame, wire size)."""
    parts, first, wire = [], None, 0
    while True:
        f = ws.recv_frame()
        assert not f.masked
        if f.opcode in (PING, PONG):
            assert f.rsv == 0, f              # RFC 7692 §6.1: control frames never compressed
            continue
        if first is None:
            first = f
        else:
            assert f.rsv == 0, f              # only the first frame carries RSV1
        wire += len(f.payload)
        parts.append(f.payload)
        if f.fin:
            break
    data = b"".join(parts)
    if first.opcode == CLOSE:
        return "close", first, first.rsv, wire
    if first.rsv == 4:
        data = deflate.inflate(data)
    else:
        assert first.rsv == 0, first
    kind = "text" if first.opcode == TEXT else "bytes"
    return kind, data.decode("utf-8") if kind == "text" else data, first.rsv, wire


def open_deflate(port, path, value=b"permessage-deflate; client_max_window_bits"):
    ws = WS(port)
    resp = ws.handshake(path, extra=offer(value))
    assert resp.status == 101, resp
    answer = resp.header("sec-websocket-extensions")
    assert answer is not None, resp
    return ws, Deflate(answer), answer


@pytest.mark.parametrize("value, answer", [
    # browsers' offer: the server may choose both windows
    (b"permessage-deflate; client_max_window_bits",
     b"permessage-deflate; server_max_window_bits=12; client_max_window_bits=12"),
    (b"permessage-deflate",
     b"permessage-deflate; server_max_window_bits=12"),
    (b"permessage-deflate; server_no_context_takeover; client_no_context_takeover",
     b"permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
     b"server_max_window_bits=12"),
    (b"permessage-deflate; server_max_window_bits=10; client_max_window_bits=9",
     b"permessage-deflate; server_max_window_bits=10; client_max_window_bits=9"),
    (b"permessage-deflate; server_max_window_bits=15; client_max_window_bits=15",
     b"permessage-deflate; server_max_window_bits=12; client_max_window_bits=12"),
    (b"permessage-deflate; server_max_window_bits=8",
     b"permessage-deflate; server_max_window_bits=8"),
    (b'Permessage-Deflate; Client_Max_Window_Bits="10"',
     b"permessage-deflate; server_max_window_bits=12; client_max_window_bits=10"),
    # §7: declined offers (unknown parameter, duplicate, bad value), then the fallback
    (b"permessage-deflate; x-unknown, permessage-deflate",
     b"permessage-deflate; server_max_window_bits=12"),
    (b"permessage-deflate; server_no_context_takeover; server_no_context_takeover, "
     b"permessage-deflate; client_max_window_bits",
     b"permessage-deflate; server_max_window_bits=12; client_max_window_bits=12"),
    (b"permessage-deflate; server_max_window_bits, permessage-deflate; "
     b"server_max_window_bits=16, permessage-deflate; server_max_window_bits=08, "
     b"permessage-deflate; server_max_window_bits=7, permessage-deflate; "
     b"client_max_window_bits=20, permessage-deflate; server_no_context_takeover=1, "
     b"permessage-deflate; server_max_window_bits=9",
     b"permessage-deflate; server_max_window_bits=9"),
    # RFC 7692 §7.1.3's example of a fallback offer
    (b"permessage-deflate; client_max_window_bits; server_max_window_bits=10, "
     b"permessage-deflate; client_max_window_bits",
     b"permessage-deflate; server_max_window_bits=10; client_max_window_bits=12"),
    # other extensions are ignored
    (b"x-webkit-deflate-frame, permessage-deflate",
     b"permessage-deflate; server_max_window_bits=12"),
])
def test_deflate_negotiation(srv, value, answer):
    app, rec = ws_app()
    ws, deflate, got = open_deflate(srv.port, route(app), value)
    with ws:
        assert got == answer
        entry = rec.scope["extensions"]["websocket.permessage-deflate"]
        assert entry == {
            "server_no_context_takeover": b"server_no_context_takeover" in answer,
            "client_no_context_takeover": b"client_no_context_takeover" in answer,
            "server_max_window_bits": int(deflate.params.get(b"server_max_window_bits", 15)),
            "client_max_window_bits": int(deflate.params.get(b"client_max_window_bits", 15)),
        }, entry
        ws.send(TEXT, deflate.compress(b"negotiated"), rsv=4)
        assert recv_compressed(ws, deflate)[:3] == ("text", "negotiated", 4)


@pytest.mark.parametrize("value", [
    None,
    b"permessage-deflate; x-unknown",
    b"permessage-deflate; server_max_window_bits=16",
    b"x-other-extension",
])
def test_deflate_not_agreed_no_header_no_scope_key(srv, value):
    app, rec = ws_app()
    with WS(srv.port) as ws:
        resp = ws.handshake(route(app), extra=offer(value) if value else ())
        assert resp.status == 101
        assert resp.header("sec-websocket-extensions") is None
        ws.text("plain")
        assert ws.recv_message() == ("text", "plain")        # RSV bits clear
    assert "websocket.permessage-deflate" not in rec.scope["extensions"]


def test_deflate_off_by_option():
    app, rec = ws_app()
    with serve(app, ws_per_message_deflate=False) as s:
        with WS(s.port) as ws:
            resp = ws.handshake("/", extra=offer(b"permessage-deflate"))
            assert resp.status == 101
            assert resp.header("sec-websocket-extensions") is None
            ws.send(TEXT, b"x", rsv=4)         # RSV1 without the extension
            assert ws.expect_close().close_code == 1002


@pytest.mark.parametrize("value", [
    b"permessage-deflate; server_max_window_bits=\"10",
    b"permessage-deflate; =10",
    b"permessage deflate",
    b"permessage-deflate; client_max_window_bits=1 0",
    b"permessage-deflate; a=\"b c\"",
])
def test_malformed_extensions_header_is_400(srv, value):
    app, rec = ws_app()
    with WS(srv.port) as ws:
        resp = ws.handshake(route(app), extra=offer(value))
        assert resp.status == 400, resp
    assert rec.called == 0


def test_deflate_echo_with_context_takeover_fragments_and_large_messages(srv):
    app, rec = ws_app()
    ws, deflate, _ = open_deflate(srv.port, route(app))
    with ws:
        for i in range(5):                      # context carried message to message
            msg = '{"user": "ann", "text": "hello number %d"}' % i
            ws.send(TEXT, deflate.compress(msg.encode()), rsv=4)
            kind, value, rsv, wire = recv_compressed(ws, deflate)
            assert (kind, value, rsv) == ("text", msg, 4)
            if i:
                assert wire < len(msg) // 2, (i, wire)    # the window remembers
        # a compressed message in three fragments: RSV1 on the first only
        data = deflate.compress(b"fragmented " * 100)
        ws.send(BINARY, data[:5], rsv=4, fin=False)
        ws.send(PING, b"in-between")
        ws.send(CONT, data[5:9], fin=False)
        ws.send(CONT, data[9:])
        assert ws.recv_frame().opcode == PONG
        assert recv_compressed(ws, deflate)[:3] == ("bytes", b"fragmented " * 100, 4)
        # an uncompressed message on the same session (RSV1 clear) is fine
        ws.text("plain")
        assert recv_compressed(ws, deflate)[:3] == ("text", "plain", 4)
        big = os.urandom(300000) + b"z" * 300000
        ws.send(BINARY, deflate.compress(big), rsv=4)
        assert recv_compressed(ws, deflate)[:2] == ("bytes", big)
        ws.send(TEXT, deflate.compress(b""), rsv=4)          # the empty message
        assert recv_compressed(ws, deflate)[:2] == ("text", "")


def test_deflate_no_context_takeover_both_ways(srv):
    app, rec = ws_app()
    ws, deflate, answer = open_deflate(
        srv.port, route(app),
        b"permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    assert b"server_no_context_takeover" in answer
    with ws:
        msg = b"the same message again and again"
        sizes = []
        for _ in range(3):
            # the client keeps no context either: a fresh deflater per message
            fresh = zlib.compressobj(6, zlib.DEFLATED, -15)
            ws.send(BINARY, (fresh.compress(msg) + fresh.flush(zlib.Z_SYNC_FLUSH))[:-4], rsv=4)
            kind, value, rsv, wire = recv_compressed(ws, deflate)
            assert (kind, value, rsv) == ("bytes", msg, 4)
            sizes.append(wire)
        assert sizes[0] == sizes[1] == sizes[2], sizes    # no message leans on an earlier one


DEFLATE_VIOLATIONS = {
    "rsv1-on-continuation": lambda d: [frame(TEXT, d.compress(b"ab"), fin=False, rsv=4),
                                       frame(CONT, b"", rsv=4)],
    "rsv1-on-ping": lambda d: [frame(PING, b"p", rsv=4)],
    "rsv1-on-close": lambda d: [frame(CLOSE, close_payload(1000), rsv=4)],
    "rsv2-with-deflate": lambda d: [frame(TEXT, b"x", rsv=2)],
    "rsv1-and-rsv2": lambda d: [frame(TEXT, b"x", rsv=6)],
    "not-deflate-data": lambda d: [frame(BINARY, b"\xff\xff\xff\xff", rsv=4)],
    "compressed-bad-utf8": lambda d: [frame(TEXT, d.compress(b"ok \xff\xfe"), rsv=4)],
}


@pytest.mark.parametrize("name", sorted(DEFLATE_VIOLATIONS))
def test_deflate_protocol_violations(srv, name):
    code = 1007 if name in ("not-deflate-data", "compressed-bad-utf8") else 1002
    app, rec = ws_app()
    ws, deflate, _ = open_deflate(srv.port, route(app))
    with ws:
        ws.send_raw(b"".join(DEFLATE_VIOLATIONS[name](deflate)))
        f = ws.expect_close()
        assert f.rsv == 0 and f.close_code == code, (name, f)
        ws.close(code)
        assert ws.eof()
    ev = rec.disconnect()
    assert (ev["code"], ev["reason"]) == (code, "protocol_error"), (name, ev)


def test_deflate_bomb_stops_at_the_limit_with_1009():
    """64 MiB of zeros deflate to ~64 KiB; the default limit of 16 MiB
    stops it, counted on the inflated bytes (RFC 6455 §7.4.1: 1009)."""
    app, rec = ws_app()
    with serve(app) as s:
        ws, deflate, _ = open_deflate(s.port, "/")
        with ws:
            zeros = b"\0" * (1 << 20)
            bomb = b"".join(deflate.deflater.compress(zeros) for _ in range(64))
            bomb = (bomb + deflate.deflater.flush(zlib.Z_SYNC_FLUSH))[:-4]
            assert len(bomb) < 1 << 17
            ws.send(BINARY, bomb, rsv=4)
            f = ws.expect_close()
            assert f.close_code == 1009, f
            ws.close(1009)
            assert ws.eof()
        ev = rec.disconnect()
        assert (ev["code"], ev["reason"]) == (1009, "protocol_error"), ev
        assert not [e for e in rec.events if e["type"] == "websocket.receive"]


def test_deflate_message_at_the_limit_passes_and_one_byte_more_is_1009():
    app, rec = ws_app()
    with serve(app, ws_max_message_size=100000) as s:
        ws, deflate, _ = open_deflate(s.port, "/")
        with ws:
            ws.send(BINARY, deflate.compress(b"a" * 100000), rsv=4)
            assert recv_compressed(ws, deflate)[:2] == ("bytes", b"a" * 100000)
            data = deflate.compress(os.urandom(50001).hex().encode())  # 100002 bytes
            ws.send(BINARY, data[:10], rsv=4, fin=False)    # fragments add up past it
            ws.send(CONT, data[10:60000], fin=False)
            ws.send(CONT, data[60000:])
            assert ws.expect_close().close_code == 1009


def test_deflate_flow_control_counts_compressed_bytes():
    """buffered_amount() counts the bytes on the wire: 8 MiB of text that
    compress to a few KiB never reach the high watermark (64 KiB), and the
    amounts the application saw are never more than the client received."""
    seen = []
    done = threading.Event()

    def body(rec, receive, send):
        t = rec.scope["pagi.transport"]
        for i in range(8):
            yield send({"type": "websocket.send", "text": ("%d" % i) * (1 << 20)})
            seen.append(t.buffered_amount())
        seen.append(t.high_water_events)
        done.set()
        yield from echo_body(rec, receive, send)

    app, rec = ws_app(body=body)
    with serve(app) as s:
        ws, deflate, _ = open_deflate(s.port, "/")
        with ws:
            assert done.wait(WAIT)
            wire = 0
            for i in range(8):
                kind, value, rsv, size = recv_compressed(ws, deflate)
                assert (kind, rsv) == ("text", 4) and value == ("%d" % i) * (1 << 20)
                wire += size + 14
            high_water_events = seen.pop()
            assert high_water_events == 0, seen
            assert wire < 64 << 10, wire
            assert max(seen) <= wire, (seen, wire)


def test_command_line_switches_compression_on_and_off():
    parse = pagi_ref._argument_parser().parse_args
    assert parse(["m:app"]).ws_per_message_deflate is None           # Config's default: on
    assert parse(["m:app", "--no-ws-per-message-deflate"]).ws_per_message_deflate is False
    assert parse(["m:app", "--no-ws-per-message-deflate",
                  "--ws-per-message-deflate"]).ws_per_message_deflate is True
    assert pagi_ref.Config().ws_per_message_deflate is True
    with pytest.raises(pagi_ref.ConfigError, match="ws_per_message_deflate"):
        pagi_ref.Config(ws_per_message_deflate="no")
    with pytest.raises(pagi_ref.ConfigError, match="ws_ping_timeout"):
        pagi_ref.Config(ws_ping_timeout=-1)


def test_idle_session_drops_its_deflate_state_and_goes_on(monkeypatch):
    monkeypatch.setattr(pagi_ref, "_DEFLATE_IDLE", 0.1)
    app, rec = ws_app()
    with serve(app) as s:
        ws, deflate, _ = open_deflate(s.port, "/")
        with ws:
            ws.send(TEXT, deflate.compress(b"before the pause"), rsv=4)
            assert recv_compressed(ws, deflate)[:2] == ("text", "before the pause")
            conn = list(s.server.connections)[0]
            assert conn.deflate._compressor is not None
            assert wait_until(lambda: conn.deflate._compressor is None), "state kept"
            for text in ("after the pause", "and again"):
                ws.send(TEXT, deflate.compress(text.encode()), rsv=4)
                assert recv_compressed(ws, deflate)[:2] == ("text", text)


# -- a bad frame after good ones: the answers to the good ones go out first -------------------

def test_answers_to_messages_before_a_bad_frame_go_out_before_the_close():
    """RFC 6455 §7.1.7 with Autobahn's strict reading (cases 3.2, 4.1.3,
    5.15): a message, then a frame with RSV2, in one write.  The message
    is the application's; its echo goes out, then the close frame 1002."""
    gate = threading.Event()

    def body(rec, receive, send):
        while not gate.is_set():           # busy: three messages queue up meanwhile
            yield pagi_ref.sleep(0.01)
        yield from echo_body(rec, receive, send)

    app, rec = ws_app(body=body)
    with serve(app) as s:
        with WS(s.port).open("/") as ws:
            ws.send_raw(frame(TEXT, b"one") + frame(TEXT, b"two") + frame(BINARY, b"three")
                        + frame(TEXT, b"bad", rsv=2) + frame(TEXT, b"never"))
            conns = list(s.server.connections)
            assert wait_until(lambda: conns and conns[0].failure is not None)
            gate.set()
            assert ws.recv_message() == ("text", "one")
            assert ws.recv_message() == ("text", "two")
            assert ws.recv_message() == ("bytes", b"three")
            f = ws.recv_frame()
            assert (f.opcode, f.close_code) == (CLOSE, 1002), f
            ws.close(1002)
            assert ws.eof()
        ev = rec.disconnect()
        assert (ev["code"], ev["reason"]) == (1002, "protocol_error")
        texts = [e.get("text") or e.get("bytes") for e in rec.events
                 if e["type"] == "websocket.receive"]
        assert texts == ["one", "two", b"three"]


def test_bad_frame_pending_and_the_application_returns_closes_with_its_code():
    got = threading.Event()

    def body(rec, receive, send):
        ev = yield receive()
        rec.events.append(ev)
        got.set()
        while not rec.flag.is_set():
            yield pagi_ref.sleep(0.01)
        # returns without asking for the next event

    app, rec = ws_app(body=body)
    with serve(app) as s:
        with WS(s.port).open("/") as ws:
            ws.send_raw(frame(TEXT, b"only") + frame(0x3, b"x"))
            assert got.wait(WAIT)
            conns = list(s.server.connections)
            assert wait_until(lambda: conns and conns[0].failure is not None)
            rec.flag.set()
            f = ws.recv_frame()
            assert (f.opcode, f.close_code) == (CLOSE, 1002), f
            ws.close(1002)
            assert ws.eof()
