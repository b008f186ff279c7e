"""pagi.transport: outgoing flow control (docs/spec.md section 4)."""
import hashlib
import socket
import struct
import time

import pytest

from spec_wire import Client, json_body, new_token, request, wait_journal

clause = pytest.mark.clause

CHUNK = 65536
CHUNKS = 128          # 8 MiB: more than the kernel buffers of both ends on loopback


def expected_digest(n, size):
    h = hashlib.sha256()
    for i in range(n):
        h.update(bytes([i % 256]) * size)
    return h.hexdigest()


@pytest.fixture(scope="module")
def slow_run(addr):
    """One slow reader of /slow: pause, then drain; returns (summary, digest, length)."""
    token = new_token()
    c = Client(addr, timeout=30, rcvbuf=16384)
    try:
        c.send(b"GET /slow?token=%s&n=%d&size=%d HTTP/1.1\r\nHost: x\r\nConnection: close"
               b"\r\n\r\n" % (token.encode(), CHUNKS, CHUNK))
        head = c.reader.read_until(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 501"):
            pytest.skip("not observable: the server provides no pagi.transport (TRANSPORT-1)")
        assert head.startswith(b"HTTP/1.1 200"), head
        # Barrier: the server's buffer is full (the application is suspended
        # in send) before the reader starts draining.
        wait_journal(addr, token, lambda es: len(at(es, "suspended")) > 0, timeout=10)
        h = hashlib.sha256()
        total = len(c.reader.buf)
        h.update(c.reader.buf)
        c.reader.buf = b""
        paced = 0
        while True:
            data = c.sock.recv(CHUNK)
            if not data:
                break
            h.update(data)
            total += len(data)
            if paced < 40:        # read slowly for a while: several high/drain cycles
                paced += 1
                time.sleep(0.01)  # pacing: a slow reader, not a wait for anything
    finally:
        c.close()
    entries = wait_journal(addr, token, lambda es: len(at(es, "summary")) > 0, timeout=10)
    assert at(entries, "summary"), "the /slow application recorded no summary: %r" % entries
    return at(entries, "summary")[0], h.hexdigest(), total


def at(entries, label):
    return [e for e in entries if isinstance(e, dict) and e.get("at") == label]


def transport_of(addr):
    t = json_body(request(addr, "GET", "/scope"))["transport"]
    if t is None:
        pytest.skip("not observable: the server provides no pagi.transport (TRANSPORT-1)")
    return t


@clause("TRANSPORT-1")
def test_transport_present(addr):
    assert json_body(request(addr, "GET", "/scope"))["transport"] is not None


@clause("TRANSPORT-2")
def test_buffered_amount_is_zero_before_sending(addr):
    t = transport_of(addr)
    assert "buffered_amount" in t["methods"]
    assert t["buffered_amount"] == 0 and t["buffered_amount_kind"] == "integer"


@clause("TRANSPORT-3")
def test_watermark_methods(addr):
    t = transport_of(addr)
    assert {"high_water_mark", "low_water_mark", "on_high_water", "on_drain"} <= set(t["methods"])
    assert t["high_water_mark_kind"] == "integer" and t["low_water_mark_kind"] == "integer"
    assert t["high_water_mark"] >= t["low_water_mark"] >= 0


@clause("REF-TRANSPORT-3")
def test_pagi_ref_default_watermarks(addr, server):
    if not server.owned:
        pytest.skip("not observable: an external server's configured watermarks are unknown")
    t = json_body(request(addr, "GET", "/scope"))["transport"]
    assert (t["high_water_mark"], t["low_water_mark"]) == (65536, 16384)


@clause("TRANSPORT-9")
def test_every_byte_arrives(slow_run):
    _summary, digest, total = slow_run
    assert total == CHUNKS * CHUNK
    assert digest == expected_digest(CHUNKS, CHUNK)


@clause("TRANSPORT-2", "TRANSPORT-4")
def test_send_suspends_at_the_high_watermark(slow_run):
    summary, _d, _t = slow_run
    assert summary["initial_buffered"] == 0
    assert summary["types_ok"] is True
    assert summary["sent"] == CHUNKS, summary
    assert summary["suspended"] >= 1, summary
    if summary["high"] is None:
        return   # no high-water mark (TRANSPORT-3 is a SHOULD): no bound to check
    assert summary["max_buffered"] <= summary["high"] + CHUNK, summary


@clause("TRANSPORT-5")
def test_on_high_water_at_once_when_already_high(slow_run):
    summary, _d, _t = slow_run
    if summary["immediate_high"] is None:
        pytest.fail("the buffer was never seen at or above the high mark right after a send: "
                    "%r" % summary)
    assert summary["immediate_high"] is True, summary


@clause("TRANSPORT-5", "TRANSPORT-6", "TRANSPORT-7")
def test_high_and_drain_alternate(slow_run):
    summary, _d, _t = slow_run
    assert summary["initial_callbacks"] == [], "on_drain fired at registration"
    calls = summary["callbacks"]
    assert calls, summary
    assert calls[0].startswith("high:"), calls
    kinds = [c.split(":")[0] for c in calls]
    crossings = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert crossings == ["high", "drain"] * (len(crossings) // 2) + ["high"] * (
        len(crossings) % 2), calls
    assert "drain" in kinds, calls


@clause("TRANSPORT-8")
def test_callbacks_in_registration_order_without_arguments(slow_run):
    summary, _d, _t = slow_run
    calls = summary["callbacks"]
    if not calls:
        pytest.skip("not observable: no backpressure callback ran")
    # each crossing runs A then B (the last pair may be cut short), no arguments
    pairs = [calls[i:i + 2] for i in range(0, len(calls), 2)]
    for pair in pairs:
        kind = pair[0].split(":")[0]
        assert pair == ["%s:A:0" % kind, "%s:B:0" % kind][:len(pair)], calls


@clause("TRANSPORT-11", "HTTP-DISC-3")
def test_disconnect_while_suspended(addr):
    token = new_token()
    c = Client(addr, timeout=10, rcvbuf=4096)
    c.send(b"GET /slow?token=%s&n=%d&size=%d HTTP/1.1\r\nHost: x\r\n\r\n"
           % (token.encode(), CHUNKS, CHUNK))
    # Barrier: the application is now suspended in send.
    entries = wait_journal(addr, token, lambda es: len(at(es, "suspended")) > 0, timeout=10)
    assert at(entries, "suspended"), "the application never waited in send: %r" % entries
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()                # a reset: the server's writes fail
    entries = wait_journal(addr, token, lambda es: len(at(es, "summary")) > 0, timeout=10)
    assert at(entries, "summary"), "the application never finished after the client left"
    summary = at(entries, "summary")[0]
    assert "send_error" not in summary, summary
    assert summary["sent"] < CHUNKS, summary
    assert summary["disconnected"] in ("client_closed", "write_error", "read_error"), summary
