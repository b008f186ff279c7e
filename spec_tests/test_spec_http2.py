"""HTTP/2 (docs/spec.md section 9): streams as scopes, seen by an h2 client.

The client is python-hyper's `h2` (spec_tests/spec_h2.py), not the server's
own codec.  Cleartext tests use prior knowledge (RFC 9113 §3.3) against the
server under test and report "not observable" when it does not answer the
connection preface; the TLS test starts its own pagi_ref with a certificate
and offers ALPN "h2".  Every wait is for a frame: a stream that never ends
fails on the socket's timeout, never on a sleep.
"""
import json

import pytest

from spec_h2 import H2Client, NotHTTP2, h2c_client, require_h2
from spec_wire import new_token, wait_journal

clause = pytest.mark.clause

PROTOCOL_ERROR = 0x1
CONNECTION_SPECIFIC = (b"connection", b"keep-alive", b"proxy-connection",
                       b"transfer-encoding", b"upgrade")


@pytest.fixture
def h2c(addr):
    client = h2c_client(addr)
    yield client
    client.close()


def scope_over(client, path="/scope", headers=(), authority="localhost"):
    sid = client.request("GET", path, headers=headers, authority=authority)
    resp = client.response(sid)
    assert resp.status == 200, resp
    return json.loads(resp.body)


def events_of(resp):
    assert resp.status == 200, resp
    return json.loads(resp.body)


# -- negotiation ----------------------------------------------------------------------

@clause("H2-1")
def test_h2_offered_over_tls_when_offered_at_all(addr, own_server, certificate):
    require_h2()
    try:
        H2Client(addr).close()
        cleartext = True
    except NotHTTP2:
        cleartext = False
    certfile, keyfile = certificate
    with own_server(["--ssl-certfile", certfile, "--ssl-keyfile", keyfile]) as srv:
        try:
            client = H2Client(srv.addr, cafile=certfile)
        except NotHTTP2 as exc:
            if not cleartext:
                pytest.skip("not observable: the server speaks no HTTP/2 (%s)" % exc)
            raise AssertionError("h2c is served but ALPN over TLS does not offer h2: %s" % exc)
        with client:
            s = scope_over(client)
            assert s["http_version"] == "2" and s["scheme"] == "https"


# -- streams and scopes -----------------------------------------------------------------

@clause("H2-2")
def test_each_stream_has_its_own_scope(h2c):
    first = scope_over(h2c)
    second = scope_over(h2c)
    assert "spec.mark" not in first["keys"] and "spec.mark" not in second["keys"]


@clause("H2-2")
def test_a_stream_waiting_for_its_body_does_not_hold_back_another(h2c):
    slow = h2c.request("POST", "/echo", body=b"part one, ", end_stream=False)
    quick = h2c.get("/hello")           # answered while the first waits for its body
    assert quick.status == 200 and quick.body == b"hello"
    assert not h2c.streams[slow].ended
    h2c.send_data(slow, b"part two", end_stream=True)
    resp = h2c.response(slow)
    assert resp.status == 200 and resp.body == b"part one, part two"


@clause("H2-3")
def test_http_version_is_2(h2c):
    assert scope_over(h2c)["http_version"] == "2"


@clause("H2-4")
def test_headers_with_end_stream_give_one_empty_event(h2c):
    events = events_of(h2c.get("/events"))
    assert len(events) == 1, events
    assert events[0]["type"] == "http.request"
    assert events[0]["body_len"] == 0 and not events[0]["more"]


@clause("H2-4")
def test_data_frames_give_body_events_until_end_stream(h2c):
    sid = h2c.request("POST", "/events", end_stream=False)
    for piece in (b"abc", b"def"):
        h2c.send_data(sid, piece)
    h2c.send_data(sid, b"ghi", end_stream=True)
    events = events_of(h2c.response(sid))
    assert all(e["type"] == "http.request" for e in events)
    assert sum(e["body_len"] for e in events) == 9
    mores = [bool(e["more"]) for e in events]
    assert mores[-1] is False and all(mores[:-1]), events


@clause("H2-4")
def test_request_body_round_trip(h2c):
    body = bytes(range(256)) * 300                  # 76,800 bytes: past the initial window
    resp = h2c.response(h2c.request("POST", "/echo", body=body))
    assert resp.status == 200 and resp.body == body


@clause("H2-5")
def test_pseudo_headers_map_onto_the_scope(h2c):
    s = scope_over(h2c, "/scope/a%20b?x=1&y=%2F", authority="example.com:8443")
    assert s["method"] == "GET" and s["scheme"] == "http"
    assert s["path"] == "/scope/a b" and s.get("raw_path", "/scope/a%20b") == "/scope/a%20b"
    assert s["query_string"] == "x=1&y=%2F"
    names = [n for n, _v in s["headers"]]
    assert not [n for n in names if n.startswith(":")], names
    assert [v for n, v in s["headers"] if n == "host"] == ["example.com:8443"]


@clause("H2-5")
def test_authority_overrides_a_host_field(h2c):
    s = scope_over(h2c, headers=[("host", "other.example")], authority="right.example")
    assert [v for n, v in s["headers"] if n == "host"] == ["right.example"]


@clause("H2-6")
def test_split_cookie_fields_are_joined(h2c):
    s = scope_over(h2c, headers=[("cookie", "a=1"), ("x-between", "1"), ("cookie", "b=2")])
    assert [v for n, v in s["headers"] if n == "cookie"] == ["a=1; b=2"]


@clause("H2-7")
def test_set_cookie_fields_stay_separate(h2c):
    resp = h2c.get("/headers")
    assert resp.status == 200
    assert resp.header_all(b"set-cookie") == [b"a=1", b"b=2"]
    assert resp.header_all(b"x-order") == [b"first", b"second"]


@clause("H2-8")
def test_client_reset_gives_http_disconnect(addr, h2c):
    token = new_token()
    sid = h2c.request("POST", "/conn?mode=body&token=" + token, body=b"0123456789",
                      end_stream=False)
    entries = wait_journal(addr, token, lambda es: any(e.get("at") == "event" for e in es))
    assert any(e.get("at") == "event" for e in entries), entries
    h2c.reset(sid)
    entries = wait_journal(addr, token, lambda es: any(e.get("at") == "end" for e in es))
    types = [e.get("type") for e in entries if e.get("at") == "event"]
    assert types[-1] == "http.disconnect", entries
    resp = h2c.get("/hello")                        # the connection carries on
    assert resp.status == 200 and resp.body == b"hello"


@clause("H2-9")
def test_no_push(h2c):
    assert h2c.get("/hello").status == 200
    import h2.events
    assert not [e for e in h2c.events if isinstance(e, h2.events.PushedStreamReceived)]


@clause("H2-10")
@pytest.mark.parametrize("path", ["/hello", "/app-te", "/app-close", "/stream?n=3&size=10"])
def test_no_connection_specific_fields(h2c, path):
    resp = h2c.get(path)
    assert resp.status is not None and resp.ended, resp
    names = {n for n, _v in resp.headers}
    assert not names & set(CONNECTION_SPECIFIC), sorted(names)


@clause("H2-10")
def test_streamed_body_arrives_in_data_frames(h2c):
    resp = h2c.get("/stream?n=3&size=10")
    assert resp.status == 200 and resp.body == b"a" * 10 + b"b" * 10 + b"c" * 10


@clause("H2-11")
def test_trailers_after_the_body(h2c):
    resp = h2c.get("/trailers?token=" + new_token())
    assert resp.status == 200 and resp.body == b"part1part2"
    assert resp.trailers is not None, resp
    trailers = [(n, v) for n, v in resp.trailers]
    assert (b"x-checksum", b"abc123") in trailers and (b"x-count", b"2") in trailers


MALFORMED = {
    "uppercase-name": dict(headers=[("X-Upper", "1")]),
    "no-path": dict(pseudo=[(b":method", b"GET"), (b":scheme", b"http"),
                            (b":authority", b"localhost")]),
    "connection-field": dict(headers=[("connection", "keep-alive")]),
    "pseudo-after-regular": dict(pseudo=[(b":method", b"GET"), (b":scheme", b"http"),
                                         (b"x-early", b"1"), (b":path", b"/hello")]),
}


@clause("H2-12")
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_is_refused_and_others_carry_on(h2c, case):
    sid = h2c.request("GET", "/hello", **MALFORMED[case])
    resp = h2c.response(sid)
    assert h2c.terminated is None, "a malformed request is a stream error, not a connection error"
    assert resp.reset == PROTOCOL_ERROR or (resp.status is not None and 400 <= resp.status < 500), resp
    ok = h2c.get("/hello")
    assert ok.status == 200 and ok.body == b"hello"


@clause("H2-12")
def test_content_length_disagreeing_with_data(h2c):
    sid = h2c.request("POST", "/echo", headers=[("content-length", "10")], body=b"abc")
    resp = h2c.response(sid)
    assert h2c.terminated is None
    assert resp.reset == PROTOCOL_ERROR or (resp.status is not None and 400 <= resp.status < 500), resp
    ok = h2c.get("/hello")
    assert ok.status == 200


@clause("H2-13")
def test_event_stream_over_http2(h2c):
    resp = h2c.get("/sse/events", headers=[("accept", "text/event-stream")])
    assert resp.status == 200 and resp.ended
    assert resp.header(b"content-type").startswith(b"text/event-stream")
    assert resp.header(b"transfer-encoding") is None
    assert b"data: one\n" in resp.body and b"id: 7\n" in resp.body


@clause("H2-14")
def test_server_keeps_within_the_stream_window(addr):
    import h2.settings
    window = 1000
    client = h2c_client(addr, auto_window=False,
                        settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    with client:
        # Wait for the server's acknowledgement of our SETTINGS: from then on
        # its view of the stream window is ``window`` (RFC 9113 §6.5.3).
        import h2.events
        client.pump_until(lambda: any(isinstance(e, h2.events.SettingsAcknowledged)
                                      for e in client.events))
        sid = client.request("GET", "/stream?n=5&size=1000")
        resp = client.streams[sid]
        # h2 raises FlowControlError if a DATA frame exceeds the window.
        client.pump_until(lambda: len(resp.body) >= window)
        assert len(resp.body) == window and not resp.ended
        while not resp.ended:
            client.conn.increment_flow_control_window(window, stream_id=sid)
            client.conn.increment_flow_control_window(window)
            client.flush()
            have = len(resp.body)
            client.pump_until(lambda: len(resp.body) > have or resp.ended)
        expect = b"".join(bytes([97 + i]) * 1000 for i in range(5))
        assert resp.status == 200 and resp.body == expect
