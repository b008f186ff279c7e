"""WebSocket (docs/spec.md section 5)."""
import json
import time

import pytest

from spec_wire import (TEXT, WebSocket, new_token, wait_journal, ws_accept_value,
                       ws_handshake)

clause = pytest.mark.clause


@pytest.fixture(scope="module")
def ws_supported(addr):
    c, resp = ws_handshake(addr, "/ws/echo")
    c.close()
    if resp.status != 101:
        pytest.skip("pending: server does not implement WebSocket yet (the upgrade to /ws/echo "
                    "was answered %d%s)" % (resp.status,
                                            ", by the http app" if resp.header("x-spec-app")
                                            else ""))


def open_ws(addr, path, **kw):
    c, resp = ws_handshake(addr, path, **kw)
    assert resp.status == 101, resp
    return c, resp, WebSocket(c)


def disconnect_record(addr, token, timeout=5.0):
    entries = wait_journal(addr, token, lambda es: any(e.get("disconnect") for e in es), timeout)
    found = [e for e in entries if e.get("disconnect")]
    assert found, entries
    return found[0], entries


@clause("WS-HS-1", "WS-HS-2")
def test_handshake(addr, ws_supported):
    token = new_token()
    c, resp, ws = open_ws(addr, "/ws/echo?token=" + token)
    with c:
        assert resp.header("upgrade", b"").lower() == b"websocket"
        assert b"upgrade" in resp.header("connection", b"").lower()
        assert resp.header("sec-websocket-accept") == ws_accept_value(resp.ws_key)
        entries = wait_journal(addr, token, lambda es: es)
        assert entries[0] == {"first_event": "websocket.connect"}


@clause("WS-HS-2", "WS-SCOPE-2")
def test_subprotocol_and_accept_headers(addr, ws_supported):
    c, resp, ws = open_ws(addr, "/ws/echo?subprotocol=1&header=1", protocols="chat, superchat")
    with c:
        assert resp.header("sec-websocket-protocol") == b"chat"
        assert resp.header("x-spec-accept") == b"yes"


def ws_scope(addr, **kw):
    c, resp, ws = open_ws(addr, "/ws/scope?x=1", **kw)
    with c:
        kind, text = ws.recv()
        assert kind == "text"
        return json.loads(text)


@clause("WS-SCOPE-1", "WS-SCOPE-2")
def test_scope(addr, ws_supported):
    s = ws_scope(addr, protocols=" a ,b")
    assert s["type"] == "websocket"
    assert s["scheme"] == "ws"
    assert s["http_version"] == "1.1"
    assert s["path"] == "/ws/scope" and s.get("raw_path", "/ws/scope") == "/ws/scope"
    assert s["query_string"] == "x=1"
    assert s["root_path"] == ""
    assert s["pagi"]["version"] == "0.3"
    assert s["subprotocols"] == ["a", "b"]
    assert s["kinds"]["subprotocols"] == "list"
    names = [n for n, _v in s["headers"]]
    assert "upgrade" in names and "sec-websocket-key" in names and "host" in names
    assert s["headers_ok"]
    if s.get("client_kinds"):
        assert s["client_kinds"][0] in TEXT
        assert s["client_kinds"][1] == "integer" or s["client_kinds"][1] == "string" and str(
            s["client"][1]).isdigit()
    assert s["kinds"].get("extensions", "map") == "map"


@clause("WS-TRANSPORT-1")
def test_transport_on_websocket_scope(addr, ws_supported):
    assert ws_scope(addr)["transport"] is not None


@clause("WS-SCOPE-2")
def test_subprotocols_empty_without_header(addr, ws_supported):
    c, resp, ws = open_ws(addr, "/ws/scope")
    with c:
        _kind, text = ws.recv()
    assert json.loads(text)["subprotocols"] == []


@clause("WS-MSG-1", "WS-MSG-2")
def test_echo_text_and_binary(addr, ws_supported, ws_max_message_size):
    token = new_token()
    # a message past 65535 bytes (a 64-bit length on the wire), within the
    # server's reported limit
    size = min(70000, ws_max_message_size or 70000)
    c, resp, ws = open_ws(addr, "/ws/echo?token=" + token)
    with c:
        ws.text("h\u00e9llo")
        assert ws.recv() == ("text", "h\u00e9llo")
        ws.binary(b"\x00\xff\x10")
        assert ws.recv() == ("bytes", b"\x00\xff\x10")
        big = "x" * size
        ws.text(big)
        assert ws.recv() == ("text", big)
    entries = wait_journal(addr, token, lambda es: len(es) >= 4)
    received = [e for e in entries if "received" in e]
    assert [e["received"] for e in received] == ["text", "bytes", "text"]
    assert not any(e["both"] for e in received)


@clause("WS-MSG-3")
def test_fragments_reassembled_and_ping_answered(addr, ws_supported):
    c, resp, ws = open_ws(addr, "/ws/echo")
    with c:
        ws.send(0x1, b"frag", fin=False)
        ws.send(0x9, b"p1")                 # a control frame between fragments
        ws.send(0x0, b"men", fin=False)
        ws.send(0x0, b"ted", fin=True)
        assert ws.recv() == ("pong", b"p1")
        assert ws.recv() == ("text", "fragmented")


def invalid_utf8(addr, frame):
    token = new_token()
    c, resp, ws = open_ws(addr, "/ws/echo?token=" + token)
    with c:
        if frame == "text":
            ws.send(0x1, b"\xff\xfe")
        else:
            ws.send(0x8, b"\x03\xe8" + b"bad \xff\xfe reason")
        kind, (code, _reason) = ws.recv()
        assert kind == "close" and code == 1007
    rec, _ = disconnect_record(addr, token)
    return rec


@clause("WS-MSG-4", "WS-CLOSE-4")
@pytest.mark.parametrize("frame", ["text", "close-reason"])
def test_invalid_utf8_closes_1007(addr, ws_supported, frame):
    assert invalid_utf8(addr, frame)["code"] == 1007


@clause("REF-WS-CLOSE-4")
def test_invalid_utf8_reason_is_protocol_error(addr, ws_supported):
    assert invalid_utf8(addr, "text")["reason"] == "protocol_error"


def violate(addr, frame):
    token = new_token()
    c, resp, ws = open_ws(addr, "/ws/echo?token=" + token)
    with c:
        if frame == "rsv":
            ws.send(0x1, b"x", rsv=0x4)
        elif frame == "opcode":
            ws.send(0x3, b"x")
        elif frame == "unmasked":
            ws.send(0x1, b"x", mask=False)
        elif frame == "long-control":
            ws.send(0x9, b"p" * 126)
        else:
            ws.send(0x9, b"p", fin=False)
        kind, (code, _reason) = ws.recv()
        assert kind == "close" and code == 1002
    rec, _ = disconnect_record(addr, token)
    return rec


@clause("WS-PROTO-1", "WS-CLOSE-4")
@pytest.mark.parametrize("frame", ["rsv", "opcode", "long-control"])
def test_protocol_violations_close_1002(addr, ws_supported, frame):
    assert violate(addr, frame)["code"] == 1002


@clause("WS-PROTO-1")
def test_unmasked_client_frame_closes_the_connection(addr, ws_supported):
    # RFC 6455 §5.1: the server MUST close; a Close frame (1002) is a MAY.
    c, resp, ws = open_ws(addr, "/ws/echo")
    with c:
        ws.send(0x1, b"x", mask=False)
        try:
            kind, payload = ws.recv()
        except (EOFError, ConnectionResetError):
            kind, payload = "eof", None
        assert kind in ("close", "eof"), (kind, payload)
        assert kind == "eof" or payload[0] == 1002, payload
        assert c.closed()


@clause("REF-WS-PROTO-1")
@pytest.mark.parametrize("frame", ["unmasked", "fragmented-control"])
def test_more_violations_close_1002(addr, ws_supported, frame):
    assert violate(addr, frame)["code"] == 1002


@clause("REF-WS-CLOSE-4")
def test_protocol_violation_reason_is_protocol_error(addr, ws_supported):
    assert violate(addr, "opcode")["reason"] == "protocol_error"


@clause("WS-CLOSE-2")
def test_client_close_answered(addr, ws_supported):
    token = new_token()
    c, resp, ws = open_ws(addr, "/ws/echo?token=" + token)
    with c:
        ws.close(1000, b"bye")
        kind, (code, _reason) = ws.recv()
        assert kind == "close" and code == 1000
        assert c.closed()
    rec, _ = disconnect_record(addr, token)
    assert rec["code"] == 1000 and rec["reason"] == "bye"


@clause("WS-CLOSE-2")
def test_client_close_without_code_is_1005(addr, ws_supported):
    token = new_token()
    c, resp, ws = open_ws(addr, "/ws/echo?token=" + token)
    with c:
        ws.close(None)
        kind, _ = ws.recv()
        assert kind == "close"
    rec, _ = disconnect_record(addr, token)
    assert rec["code"] == 1005


@clause("WS-CLOSE-3", "CORE-DISC-1", "WS-CLOSE-5")
def test_abrupt_close_is_1006(addr, ws_supported):
    token = new_token()
    c, resp, ws = open_ws(addr, "/ws/echo?token=" + token)
    c.close()
    rec, entries = disconnect_record(addr, token)
    assert rec["code"] == 1006 and rec["reason"] in ("client_closed", "read_error")
    late = wait_journal(addr, token, lambda es: any(
        e.get("at") == "send_after_disconnect" for e in es))
    late = [e for e in late if e.get("at") == "send_after_disconnect"]
    assert late and late[0]["raised"] is False


@clause("WS-CLOSE-1")
def test_server_close(addr, ws_supported):
    c, resp, ws = open_ws(addr, "/ws/close?code=4000&reason=done")
    with c:
        kind, (code, reason) = ws.recv()
        assert (kind, code, reason) == ("close", 4000, b"done")
        ws.close(4000)
        assert c.closed()


@clause("WS-HS-3")
def test_close_before_accept_is_403(addr, ws_supported):
    c, resp = ws_handshake(addr, "/ws/reject")
    with c:
        assert resp.status == 403


@clause("WS-HS-4")
def test_bad_version_refused(addr, ws_supported):
    c, resp = ws_handshake(addr, "/ws/echo", version=b"12")
    with c:
        assert 400 <= resp.status < 500
        assert resp.header("sec-websocket-version") == b"13"


@clause("WS-HS-4")
def test_missing_key_refused(addr, ws_supported):
    c, resp = ws_handshake(addr, "/ws/echo", key=False)
    with c:
        assert 400 <= resp.status < 500


@clause("REF-WS-HS-4")
def test_bad_version_426_missing_key_400(addr, ws_supported):
    c, resp = ws_handshake(addr, "/ws/echo", version=b"12")
    with c:
        assert resp.status == 426
    c, resp = ws_handshake(addr, "/ws/echo", key=False)
    with c:
        assert resp.status == 400


@clause("WS-DENY-1")
def test_denial_response(addr, ws_supported):
    c, resp = ws_handshake(addr, "/ws/deny")
    with c:
        if resp.status == 403:
            pytest.skip("not observable: websocket.http.response is not advertised (MAY)")
        assert resp.status == 401
        assert resp.header("www-authenticate") == b"Bearer"
        body = c.reader.read_all()
        assert body.endswith(b"denied")


@clause("WS-MSG-2", "WS-DENY-2", "CORE-ERR-1")
def test_invalid_sends_and_denial_after_accept(addr, ws_supported):
    token = new_token()
    c, resp, ws = open_ws(addr, "/ws/bad-send?token=" + token)
    with c:
        assert ws.recv() == ("text", "still-open")
    entries = wait_journal(addr, token, lambda es: len(es) >= 2)
    cases = {e["case"]: e for e in entries}
    assert cases["both"]["raised"] is True
    assert cases["neither"]["raised"] is True
    if "deny-after-accept" in cases:
        assert cases["deny-after-accept"]["raised"] is False


@clause("WS-KEEP-1")
def test_keepalive_pings(addr, ws_supported):
    c, resp, ws = open_ws(addr, "/ws/echo?keepalive_ms=200")
    with c:
        start = time.monotonic()
        kind, _payload = ws.recv()
        assert kind == "ping"
        assert time.monotonic() - start < 2.0


@clause("WS-KEEP-2")
def test_server_keepalive_drops_a_silent_peer(own_server):
    with own_server(["--ws-ping-interval", "0.2", "--ws-ping-timeout", "0.2"]) as srv:
        c, resp, ws = open_ws(srv.addr, "/ws/echo")
        with c:
            kind, _ = ws.recv()
            assert kind == "ping"                       # never answered
            kind, (code, _reason) = ws.recv()
            assert (kind, code) == ("close", 1011)
            assert c.closed(), "the server kept a peer that answers no ping"


# -- permessage-deflate (RFC 7692), section 5.1 --------------------------------------------

import struct  # noqa: E402
import zlib  # noqa: E402

from spec_wire import ws_frame  # noqa: E402

TAIL = b"\x00\x00\xff\xff"


def ws_extensions(addr, path, value):
    """Handshake offering ``value``; (client, response, agreed params or None)."""
    c, resp = ws_handshake(addr, path, headers=[("Sec-WebSocket-Extensions", value)])
    assert resp.status == 101, resp
    answer = resp.header("sec-websocket-extensions")
    if answer is None or not answer.lower().startswith(b"permessage-deflate"):
        return c, resp, None
    params = {}
    for part in answer.split(b";")[1:]:
        name, _eq, val = part.strip().partition(b"=")
        params[name.decode().lower()] = val.strip(b'"').decode() or None
    return c, resp, params


def deflate_or_skip(addr, path, value="permessage-deflate; client_max_window_bits"):
    c, resp, params = ws_extensions(addr, path, value)
    if params is None:
        c.close()
        pytest.skip("not implemented: the server does not agree to permessage-deflate "
                    "(RFC 7692 is optional)")
    return c, WebSocket(c), params


def compressor(params):
    bits = int(params.get("client_max_window_bits") or 15)
    return zlib.compressobj(6, zlib.DEFLATED, -max(bits, 9))


def compress(c, data):
    return (c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]


def recv_message_frames(ws):
    """[(fin, rsv, opcode, payload)] of the next data message (control frames
    before it included, in order), read from the raw stream."""
    frames = []
    while True:
        head = ws.reader.read_exact(2)
        if len(head) < 2:
            raise EOFError("connection closed")
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", ws.reader.read_exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", ws.reader.read_exact(8))[0]
        assert not head[1] & 0x80, "a server frame is masked"
        data = ws.reader.read_exact(n)
        frames.append((bool(head[0] & 0x80), (head[0] >> 4) & 7, head[0] & 0x0F, data))
        if head[0] & 0x0F in (0x1, 0x2, 0x0, 0x8) and head[0] & 0x80:
            return frames


@clause("WS-DEFLATE-1")
def test_deflate_agreed_with_one_answer(addr, ws_supported):
    c, ws, params = deflate_or_skip(addr, "/ws/echo")
    with c:
        ws.text("after the agreement")
        fin, rsv, op, data = recv_message_frames(ws)[-1]
        if rsv & 4:
            data = zlib.decompressobj(-15).decompress(data + TAIL)
        assert (op, data) == (0x1, b"after the agreement")


@clause("REF-WS-DEFLATE-1")
def test_deflate_agreement_in_the_scope(addr, ws_supported):
    c, ws, params = deflate_or_skip(addr, "/ws/scope")
    with c:
        fin, rsv, op, data = recv_message_frames(ws)[-1]
        assert op == 0x1 and fin and rsv == 4
        s = json.loads(zlib.decompressobj(-15).decompress(data + TAIL).decode("utf-8"))
        assert s["extensions"].get("websocket.permessage-deflate") == "map", s["extensions"]
    c, resp = ws_handshake(addr, "/ws/scope")
    with c:
        assert resp.status == 101 and resp.header("sec-websocket-extensions") is None
        kind, text = WebSocket(c).recv()
        assert "websocket.permessage-deflate" not in json.loads(text)["extensions"]


@clause("WS-DEFLATE-4", "WS-DEFLATE-5")
def test_deflate_echo_compressed_fragmented_and_plain(addr, ws_supported):
    c, ws, params = deflate_or_skip(addr, "/ws/echo")
    with c:
        comp = compressor(params)
        inflater = zlib.decompressobj(-15)
        payload = compress(comp, b"compress me " * 50)
        ws.send(0x1, payload[:4], rsv=4, fin=False)
        ws.send(0x9, b"between")
        ws.send(0x0, payload[4:])
        ws.send(0x2, b"not compressed")
        got = []
        while len(got) < 2:
            for fin, rsv, op, data in recv_message_frames(ws):
                if op in (0x9, 0xA):
                    assert rsv == 0, "a control frame with RSV bits"
                    continue
                assert fin and op in (0x1, 0x2)
                if rsv & 4:
                    data = inflater.decompress(data + TAIL)
                else:
                    assert rsv == 0
                got.append((op, data))
        assert got == [(0x1, b"compress me " * 50), (0x2, b"not compressed")]


@clause("WS-DEFLATE-4")
@pytest.mark.parametrize("where", ["continuation", "ping"])
def test_deflate_rsv1_on_a_continuation_or_control_frame_is_1002(addr, ws_supported, where):
    c, ws, params = deflate_or_skip(addr, "/ws/echo")
    with c:
        if where == "continuation":
            data = compress(compressor(params), b"abcdef")
            ws.send(0x1, data[:2], rsv=4, fin=False)
            ws.send(0x0, data[2:], rsv=4)
        else:
            ws.send(0x9, b"p", rsv=4)
        kind, (code, _reason) = ws.recv()
        assert (kind, code) == ("close", 1002)


@clause("WS-DEFLATE-2")
@pytest.mark.parametrize("value", [
    "permessage-deflate; x-unknown-parameter",
    "permessage-deflate; client_max_window_bits; client_max_window_bits",
    "permessage-deflate; server_max_window_bits",
    "permessage-deflate; server_max_window_bits=16",
    "permessage-deflate; server_no_context_takeover=yes",
])
def test_deflate_bad_offer_declined(addr, ws_supported, value):
    c, resp, params = ws_extensions(addr, "/ws/echo", value)
    with c:
        assert params is None, resp.header("sec-websocket-extensions")
        ws = WebSocket(c)
        ws.text("plain")
        assert ws.recv() == ("text", "plain")


@clause("WS-DEFLATE-2")
def test_deflate_fallback_offer_accepted(addr, ws_supported):
    deflate_or_skip(addr, "/ws/echo")[0].close()     # skips if never agreed
    c, resp, params = ws_extensions(
        addr, "/ws/echo", "permessage-deflate; x-unknown, permessage-deflate; "
                          "server_no_context_takeover")
    with c:
        assert params is not None and "x-unknown" not in params
        assert "server_no_context_takeover" in params


@clause("WS-DEFLATE-3")
@pytest.mark.parametrize("value", [
    "permessage-deflate; server_no_context_takeover",
    "permessage-deflate; server_max_window_bits=10",
    "permessage-deflate; server_max_window_bits=9; client_max_window_bits=10",
    "permessage-deflate",
    "permessage-deflate; client_max_window_bits",
])
def test_deflate_answer_follows_the_offer(addr, ws_supported, value):
    deflate_or_skip(addr, "/ws/echo")[0].close()
    c, resp, params = ws_extensions(addr, "/ws/echo", value)
    with c:
        if params is None:
            return                      # declining is allowed
        offered = dict((p.strip().partition("=")[0], p.strip().partition("=")[2] or None)
                       for p in value.split(";")[1:])
        if "server_no_context_takeover" in offered:
            assert "server_no_context_takeover" in params
        if offered.get("server_max_window_bits"):
            assert int(params["server_max_window_bits"]) <= int(offered["server_max_window_bits"])
        if "client_max_window_bits" not in offered:
            assert "client_max_window_bits" not in params
        elif offered["client_max_window_bits"] and params.get("client_max_window_bits"):
            assert int(params["client_max_window_bits"]) <= \
                int(offered["client_max_window_bits"])
        for name in ("server_max_window_bits", "client_max_window_bits"):
            if params.get(name):
                assert 8 <= int(params[name]) <= 15


@clause("WS-DEFLATE-6")
def test_deflate_bomb_is_1009_and_bad_data_1007(addr, ws_supported):
    token = new_token()
    c, ws, params = deflate_or_skip(addr, "/ws/echo?token=" + token)
    with c:
        comp = compressor(params)
        zeros = b"\0" * (1 << 20)
        bomb = b"".join(comp.compress(zeros) for _ in range(64))
        bomb = (bomb + comp.flush(zlib.Z_SYNC_FLUSH))[:-4]     # 64 MiB inflated
        ws.send(0x2, bomb, rsv=4)
        kind, (code, _reason) = ws.recv()
        assert (kind, code) == ("close", 1009)
    rec, _ = disconnect_record(addr, token)
    assert (rec["code"], rec["reason"]) == (1009, "protocol_error")
    c, ws, params = deflate_or_skip(addr, "/ws/echo")
    with c:
        ws.send(0x2, b"\xff\xff\xff\xff", rsv=4)
        kind, (code, _reason) = ws.recv()
        assert (kind, code) == ("close", 1007)

