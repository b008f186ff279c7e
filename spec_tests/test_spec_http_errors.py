"""HTTP: application errors and disconnects (docs/spec.md sections 2.7, 2.8)."""
import pytest

from spec_wire import Client, new_token, wait_journal

clause = pytest.mark.clause


def generated(resp):
    """(HTTP-GEN-1 and its REF part are checked in test_spec_http_generated.py.)"""


@clause("HTTP-ERR-1")
def test_raise_before_start_is_500(addr):
    with Client(addr) as c:
        resp = c.request("GET", "/raise-before")
        assert resp.status == 500
        generated(resp)


@clause("HTTP-ERR-4")
def test_raise_before_start_is_logged_with_traceback(addr, server):
    server.require_log()
    mark = server.log_mark()
    with Client(addr) as c:
        c.request("GET", "/raise-before")
    text = server.wait_log(mark, lambda t: "spec-app: raise-before" in t and "Traceback" in t)
    assert "Traceback" in text and "spec-app: raise-before" in text, text


@clause("HTTP-ERR-2")
def test_raise_after_start_truncates_chunked(addr):
    with Client(addr, timeout=5) as c:
        resp = c.request("GET", "/raise-after")
        assert resp.status == 200
        assert resp.chunked
        assert resp.body == b"partial"
        assert resp.complete is False, "the last chunk was sent: truncation is invisible"


@clause("HTTP-ERR-2")
def test_raise_after_start_truncates_content_length(addr):
    with Client(addr, timeout=5) as c:
        resp = c.request("GET", "/raise-after?cl=1")
        assert resp.status == 200
        assert resp.header("content-length") == b"100"
        assert resp.body == b"partial"
        assert resp.complete is False


@clause("HTTP-ERR-4")
def test_raise_after_start_is_logged(addr, server):
    server.require_log()
    mark = server.log_mark()
    with Client(addr, timeout=5) as c:
        c.request("GET", "/raise-after")
    text = server.wait_log(mark, lambda t: "spec-app: raise-after" in t and "Traceback" in t)
    assert "Traceback" in text and "spec-app: raise-after" in text, text


@clause("HTTP-ERR-3")
def test_no_response_backstop_500(addr):
    with Client(addr) as c:
        resp = c.request("GET", "/no-response")
        assert resp.status == 500
        generated(resp)
        assert c.closed()


@clause("HTTP-ERR-4")
def test_no_response_backstop_is_logged(addr, server):
    server.require_log()
    mark = server.log_mark()
    with Client(addr) as c:
        c.request("GET", "/no-response")
    text = server.wait_log(mark, lambda t: "/no-response" in t or "no response" in t.lower())
    assert text.strip(), "the backstop 500 was not logged"


@clause("HTTP-ERR-5", "CONN-12")
def test_client_gone_no_500_and_no_error_log(addr, server):
    server.require_log()
    token = new_token()
    mark = server.log_mark()
    c = Client(addr)
    c.send(b"POST /conn?mode=body&token=%s HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
           % token.encode() + b"0123456789")
    c.close()
    entries = wait_journal(addr, token, lambda es: any(e.get("at") == "end" for e in es))
    assert any(e.get("at") == "end" for e in entries), entries
    text = server.wait_log(mark, lambda t: False, timeout=0.5)
    bad = [line for line in text.splitlines()
           if "ERROR" in line or "Traceback" in line or " 500" in line]
    assert not bad, text


@clause("HTTP-ERR-7")
def test_return_mid_stream_truncates(addr):
    with Client(addr, timeout=5) as c:
        resp = c.request("GET", "/return-mid-stream")
        assert resp.status == 200 and resp.chunked
        assert resp.body == b"partial"
        assert resp.complete is False


@clause("HTTP-ERR-7")
def test_return_mid_stream_is_logged(addr, server):
    server.require_log()
    mark = server.log_mark()
    with Client(addr, timeout=5) as c:
        c.request("GET", "/return-mid-stream")
    text = server.wait_log(mark, lambda t: "/return-mid-stream" in t)
    assert "/return-mid-stream" in text, text
