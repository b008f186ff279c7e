"""Server-Sent Events (docs/spec.md section 6)."""
import json
import socket
import time

import pytest

from spec_wire import (Client, json_body, new_token, parse_sse, read_chunked_stream, request,
                       sse_request, wait_journal)

clause = pytest.mark.clause

REASONS = {"client_closed", "write_error", "write_timeout", "server_shutdown", "read_error"}


@pytest.fixture(scope="module")
def sse_supported(addr):
    c, resp = sse_request(addr, "/sse/events")
    c.close()
    if resp.header("x-spec-app") == b"wrong-scope-type" or resp.status in (404, 500, 501):
        pytest.skip("pending: server does not implement SSE yet (an event-stream request "
                    "reached the application as an http scope; answered %d)" % resp.status)


def stream(addr, path, **kw):
    c, resp = sse_request(addr, path, **kw)
    with c:
        assert resp.status == 200, resp
        data, ended = read_chunked_stream(c.reader)
    return resp, data, ended


@pytest.fixture(scope="module")
def events_stream(addr, sse_supported):
    return stream(addr, "/sse/events")


@clause("SSE-DETECT-1", "SSE-START-2")
def test_event_stream_head(events_stream):
    resp, _data, _ended = events_stream
    assert resp.header("content-type", b"").startswith(b"text/event-stream")
    assert resp.header("cache-control") == b"no-cache"
    assert resp.header("date") is not None
    assert resp.header("transfer-encoding", b"").lower() == b"chunked"


@clause("SSE-SEND-1")
def test_event_dispatches(events_stream):
    _resp, data, _ended = events_stream
    assert b"caf\xc3\xa9" in data, "data is not UTF-8 encoded: %r" % data
    items = [i for i in parse_sse(data.decode("utf-8")) if "comment" not in i]
    assert items == [
        {"data": "one"},
        {"event": "update", "data": "line1\nline2", "id": "7"},
        {"data": "caf\u00e9", "retry": "1500"},
    ]


@clause("SSE-COMMENT-1")
def test_comments(events_stream):
    _resp, data, _ended = events_stream
    assert b":ping\n\n" in data and b":already\n\n" in data and b"::already" not in data


@clause("SSE-CLOSE-2")
def test_stream_ends_when_the_application_returns(events_stream):
    _resp, _data, ended = events_stream
    assert ended, "the stream did not end with the last chunk"


@clause("SSE-DETECT-1", "SSE-REQ-1")
def test_post_event_stream_with_body(addr, sse_supported):
    _resp, data, ended = stream(addr, "/sse/post", method="POST", body=b"payload")
    assert ended
    assert parse_sse(data.decode()) == [{"data": "payload"}]


def sse_scope(addr):
    _resp, data, _ended = stream(addr, "/scope/sse?q=1")
    return json.loads(parse_sse(data.decode())[0]["data"])


@clause("SSE-SCOPE-1", "SSE-DETECT-1")
def test_sse_scope(addr, sse_supported):
    s = sse_scope(addr)
    assert s["type"] == "sse"
    for key in ("http_version", "method", "scheme", "path", "query_string", "root_path",
                "headers", "pagi"):
        assert key in s["keys"], key
    assert s["method"] == "GET" and s["path"] == "/scope/sse" and s["query_string"] == "q=1"
    assert s["pagi"]["version"] == "0.3"


@clause("SSE-TRANSPORT-1")
def test_transport_on_sse_scope(addr, sse_supported):
    assert sse_scope(addr)["transport"] is not None


@clause("SSE-DETECT-2")
@pytest.mark.parametrize("accept", ["text/html", "*/*", "application/json"])
def test_other_accept_is_http(addr, accept):
    s = json_body(request(addr, "GET", "/scope", headers=[("Accept", accept)]))
    assert s["type"] == "http"


@clause("SSE-DETECT-1")
def test_event_stream_among_other_types(addr, sse_supported):
    c, resp = sse_request(addr, "/sse/events",
                          headers=[("Accept", "text/html;q=0.5, text/event-stream")])
    c.close()
    assert resp.header("content-type", b"").startswith(b"text/event-stream")


@clause("SSE-SEND-2", "CORE-ERR-1")
def test_bad_fields_rejected(addr, sse_supported):
    token = new_token()
    _resp, data, ended = stream(addr, "/sse/bad-field?token=" + token)
    assert parse_sse(data.decode()) == [{"data": "done"}]
    entries = wait_journal(addr, token, lambda es: len(es) >= 5)
    for e in entries:
        assert e["raised"] is True, e


@clause("SSE-START-1", "SSE-DECLINE-2")
def test_decline_after_start_fails(addr, sse_supported):
    token = new_token()
    _resp, data, _ended = stream(addr, "/sse/start-then-decline?token=" + token)
    assert parse_sse(data.decode()) == [{"data": "ok"}]
    entries = wait_journal(addr, token, lambda es: len(es) >= 3)
    cases = {e["case"]: e["raised"] for e in entries}
    assert cases["decline-after-start"] is True, cases


@clause("SSE-DECLINE-1", "SSE-DECLINE-2")
def test_decline(addr, sse_supported):
    token = new_token()
    c, resp = sse_request(addr, "/sse/decline?token=" + token)
    with c:
        assert resp.status == 401
        assert resp.header("www-authenticate") == b"Bearer"
        rest = c.reader.read_all()
    assert b"Unauthorized" in rest
    entries = wait_journal(addr, token, lambda es: es)
    assert entries[0]["raised"] is True


@clause("SSE-DECLINE-1")
def test_unknown_path_declined_with_404(addr, sse_supported):
    c, resp = sse_request(addr, "/sse/no-such-route")
    with c:
        assert resp.status == 404


@clause("SSE-CLOSE-1")
def test_sse_close(addr, sse_supported):
    token = new_token()
    c, resp = sse_request(addr, "/sse/close?token=" + token)
    with c:
        start = time.monotonic()
        data, ended = read_chunked_stream(c.reader)
        elapsed = time.monotonic() - start
    assert ended and elapsed < 1.5, "the stream did not end at sse.close"
    assert parse_sse(data.decode()) == [{"data": "a"}]
    entries = wait_journal(addr, token, lambda es: len(es) >= 3)
    cases = {e["case"]: e.get("raised") for e in entries}
    assert cases["send-after-close"] is True
    assert cases["comment-after-close"] is True
    assert cases["second-close"] is False


@clause("SSE-KEEP-1")
def test_keepalive_comments(addr, sse_supported):
    _resp, data, ended = stream(addr, "/sse/keepalive")
    items = parse_sse(data.decode())
    kas = [i for i in items if i.get("comment") == "ka"]
    assert 3 <= len(kas) <= 9, items
    assert items[-1] == {"data": "end"}


@clause("SSE-START-2")
def test_application_content_type_kept(addr, sse_supported):
    c, resp = sse_request(addr, "/sse/headers")
    c.close()
    assert resp.header_all("content-type") == [b"text/event-stream; charset=utf-8"]
    assert resp.header("x-spec") == b"sse"


@clause("SSE-DISC-1", "CORE-DISC-1", "CORE-ERR-6")
def test_disconnect(addr, sse_supported):
    token = new_token()
    c, resp = sse_request(addr, "/sse/wait?token=" + token)
    c.reader.read_until(b"hi")
    c.close()
    entries = wait_journal(addr, token, lambda es: len(es) >= 2)
    assert entries[0]["type"] == "sse.disconnect"
    assert entries[0]["reason"] in REASONS
    assert entries[1]["raised"] is False


@clause("REF-SSE-START-1")
def test_stream_events_before_start_fail(addr, sse_supported):
    token = new_token()
    _resp, data, _ended = stream(addr, "/sse/start-then-decline?token=" + token)
    entries = wait_journal(addr, token, lambda es: len(es) >= 3)
    cases = {e["case"]: e["raised"] for e in entries}
    assert cases["send-before-start"] is True and cases["comment-before-start"] is True


@clause("REF-SSE-START-2")
def test_http10_stream_is_close_delimited(addr, sse_supported):
    with Client(addr) as c:
        c.send(b"GET /sse/events HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n")
        resp = c.read()
    assert resp.status == 200 and not resp.chunked
    assert resp.header("connection", b"").lower() == b"close"
    assert parse_sse(resp.body.decode())[0] == {"data": "one"}


@clause("REF-SSE-DISC-1")
def test_a_fin_ends_the_stream(addr, sse_supported):
    token = new_token()
    c, resp = sse_request(addr, "/sse/wait?token=" + token)
    with c:
        c.reader.read_until(b"hi")
        c.sock.shutdown(socket.SHUT_WR)
        entries = wait_journal(addr, token, lambda es: len(es) >= 1)
    assert entries[0] == {"type": "sse.disconnect", "reason": "client_closed"}, entries
