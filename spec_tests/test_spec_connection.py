"""pagi.connection (docs/spec.md section 3), observed through the journal."""

import pytest

from spec_wire import Client, get_journal, json_body, new_token, request, wait_journal

clause = pytest.mark.clause

STANDARD_REASONS = {"client_closed", "client_timeout", "idle_timeout", "keepalive_timeout",
                    "write_timeout", "write_error", "read_error", "protocol_error",
                    "server_shutdown", "server_error", "body_too_large", "queue_overflow"}


def at(entries, label):
    return [e for e in entries if isinstance(e, dict) and e.get("at") == label]


def labels(entries):
    return [e.get("at") if e.get("at") != "event" else "event:" + e["type"]
            for e in entries if isinstance(e, dict)]


def completed(addr):
    token = new_token()
    with Client(addr) as c:
        resp = c.request("POST", "/conn?mode=complete&token=" + token, body=b"x", close=True)
        assert resp.status == 200 and resp.body == b"ab"
        # Barrier: the server has closed the connection (Connection: close), so
        # whatever it runs when a connection ends -- a wrong on_disconnect, a
        # second on_complete -- has been triggered before this journal read.
        assert c.closed()
    return wait_journal(addr, token, lambda es: len(at(es, "on_complete:2")) > 0
                        or len(at(es, "on_disconnect:2")) > 0)


def disconnected_mid_body(addr):
    token = new_token()
    c = Client(addr)
    c.send(b"POST /conn?mode=body&token=%s HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
           % token.encode() + b"0123456789")
    # Barrier: the application runs, its callbacks are registered, before the close.
    wait_journal(addr, token, lambda es: len(at(es, "begin")) > 0)
    c.close()
    wait_journal(addr, token, lambda es: len(at(es, "end")) > 0)
    # "end" is the application's last step before it returns; this read is a
    # request the server takes after that return, so a callback the server
    # wrongly runs when the application ends (on_complete) is in it.
    return get_journal(addr, token)


@clause("CONN-1")
def test_required_methods_present(addr):
    s = json_body(request(addr, "GET", "/scope"))
    methods = set(s["connection_methods"])
    assert {"is_connected", "disconnect_reason", "on_disconnect", "response_started"} <= methods


@clause("CONN-2")
def test_recommended_methods_present(addr):
    s = json_body(request(addr, "GET", "/scope"))
    assert {"on_complete", "response_complete", "disconnect_future"} <= set(
        s["connection_methods"])


@clause("CONN-3", "CONN-4")
def test_state_before_and_after_start(addr):
    entries = completed(addr)
    begin = at(entries, "begin")[0]
    assert begin["is_connected"] is True
    assert begin["disconnect_reason"] is None
    assert begin["response_started"] is False
    assert at(entries, "after_start")[0]["response_started"] is True
    assert at(entries, "after_end")[0]["response_started"] is True


@clause("CONN-5")
def test_response_complete_progress(addr):
    entries = completed(addr)
    if at(entries, "begin")[0]["response_complete"] is None:
        pytest.skip("not observable: the server has no response_complete (CONN-2)")
    assert at(entries, "begin")[0]["response_complete"] is False
    assert at(entries, "after_start")[0]["response_complete"] is False
    assert at(entries, "streaming")[0]["response_complete"] is False
    assert at(entries, "after_end")[0]["response_complete"] is True


@clause("CONN-6", "CONN-7", "CONN-9")
def test_normal_end_fires_on_complete_only(addr):
    entries = completed(addr)
    names = labels(entries)
    assert not [n for n in names if n.startswith("on_disconnect")], names
    if not at(entries, "begin")[0].get("has_on_complete"):
        return   # on_complete is a SHOULD (CONN-2): nothing more to see
    assert names.count("on_complete:1") == 1 and names.count("on_complete:2") == 1, names
    assert names.index("on_complete:1") < names.index("on_complete:2")
    for e in at(entries, "on_complete:1") + at(entries, "on_complete:2"):
        assert e["disconnect_reason"] is None
        assert e.get("disconnect_future_done") in (False, None)


@clause("REF-CONN-9")
def test_on_complete_callbacks_get_no_argument(addr):
    entries = completed(addr)
    calls = at(entries, "on_complete:1") + at(entries, "on_complete:2")
    assert calls and all(e["args"] == [] for e in calls), entries


@clause("CONN-6", "CONN-8", "CONN-9", "HTTP-DISC-1")
def test_abnormal_end_order_of_state_changes(addr):
    entries = disconnected_mid_body(addr)
    names = labels(entries)
    assert names.count("on_disconnect:1") == 1 and names.count("on_disconnect:2") == 1, names
    assert not [n for n in names if n.startswith("on_complete")], names
    first = at(entries, "on_disconnect:1")[0]
    # inside the first callback, steps 1-3 already happened
    assert first["is_connected"] is False
    assert first["disconnect_reason"] == "client_closed"
    assert first.get("disconnect_future_done") in (True, None)   # None: not provided
    # callbacks in order, before http.disconnect reached the application
    assert names.index("on_disconnect:1") < names.index("on_disconnect:2") \
        < names.index("event:http.disconnect"), names


@clause("CONN-9", "CONN-11", "CONN-12")
def test_on_disconnect_gets_the_reason(addr):
    entries = disconnected_mid_body(addr)
    for label in ("on_disconnect:1", "on_disconnect:2"):
        assert at(entries, label)[0]["args"] == ["client_closed"], entries


@clause("CONN-10")
def test_late_registration_runs_at_once(addr):
    entries = disconnected_mid_body(addr)
    late = at(entries, "late_on_disconnect")
    assert late and late[0]["ran_at_once"] is True, entries
    assert late[0]["args"] == ["client_closed"]


@clause("CONN-3", "CONN-11")
def test_state_after_disconnect_event(addr):
    entries = disconnected_mid_body(addr)
    after = at(entries, "after_disconnect_event")[0]
    assert after["is_connected"] is False
    assert after["disconnect_reason"] in STANDARD_REASONS


@clause("CONN-11", "CONN-12", "HTTP-DISC-3", "CORE-ERR-6")
def test_disconnect_while_streaming(addr):
    token = new_token()
    c = Client(addr)
    c.send(b"GET /conn?mode=stream&token=%s HTTP/1.1\r\nHost: x\r\n\r\n" % token.encode())
    c.reader.read_until(b"\r\n\r\n")
    c.reader.read_exact(2048)
    c.close()
    entries = wait_journal(addr, token, lambda es: len(at(es, "end")) > 0, timeout=10)
    end = at(entries, "stream_end")
    assert end, entries
    assert end[0]["raised"] == [], end
    assert end[0]["is_connected"] is False
    reasons = [e["args"][0] for e in at(entries, "on_disconnect:1")]
    assert reasons and reasons[0] in ("client_closed", "write_error"), entries
    assert at(entries, "receive")[0]["type"] == "http.disconnect"


@clause("CONN-11", "HTTP-GEN-8")
def test_body_too_large_reason(addr, max_body_size):
    token = new_token()
    piece = b"x" * 65536
    full, rest = divmod(max_body_size, len(piece))
    with Client(addr, timeout=15) as c:
        c.send(b"POST /conn?mode=body&token=%s HTTP/1.1\r\nHost: x\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" % token.encode())
        for _ in range(full):
            c.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        if rest:
            c.send(b"%x\r\n%s\r\n" % (rest, b"y" * rest))
        c.send(b"1\r\nz\r\n")     # one byte past the limit
        resp = c.read()
    assert resp.status == 413
    entries = wait_journal(addr, token, lambda es: len(at(es, "on_disconnect:1")) > 0)
    assert at(entries, "on_disconnect:1")[0]["args"] == ["body_too_large"], entries[-5:]


@clause("CONN-11", "HTTP-GEN-12")
def test_protocol_error_reason(addr):
    token = new_token()
    with Client(addr, timeout=5) as c:
        c.send(b"POST /conn?mode=body&token=%s HTTP/1.1\r\nHost: x\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n" % token.encode())
        # Barrier: the application has the first chunk before the bad one comes.
        wait_journal(addr, token, lambda es: len(at(es, "event")) > 0)
        c.send(b"zz\r\n")
        resp = c.read()
    assert resp.status == 400
    entries = wait_journal(addr, token, lambda es: len(at(es, "on_disconnect:1")) > 0)
    assert at(entries, "on_disconnect:1")[0]["args"] == ["protocol_error"], entries
