"""HTTP: the response events (docs/spec.md section 2.3)."""
import json
import re

import pytest

from spec_wire import (Client, build_request, json_body, new_token, raw_exchange, request,
                       wait_journal)

clause = pytest.mark.clause

FILE = bytes(range(256)) * 1024


def app_headers(resp, names):
    return [(n, v) for n, v in resp.headers if n in names]


@clause("HTTP-RESP-1")
def test_status_and_headers_in_order_with_duplicates(addr):
    resp = request(addr, "GET", "/headers")
    assert resp.status == 200
    got = app_headers(resp, (b"set-cookie", b"x-order"))
    assert got == [(b"set-cookie", b"a=1"), (b"x-order", b"first"),
                   (b"set-cookie", b"b=2"), (b"x-order", b"second")]


@clause("HTTP-RESP-1")
@pytest.mark.parametrize("code", [201, 404, 418, 503, 299])
def test_status_written(addr, code):
    resp = request(addr, "GET", "/status?code=%d&body=x&cl=1" % code)
    assert resp.status == code
    assert resp.body == b"x"


@clause("CORE-ERR-2")
def test_status_of_the_wrong_type_fails(addr):
    report = json_body(request(addr, "GET", "/bad-event?case=status-text"))
    assert report["raised"] is True, report


@clause("HTTP-RESP-2")
@pytest.mark.parametrize("case", ["status-range", "status-100", "status-101", "status-103"])
def test_bad_status_fails(addr, case):
    report = json_body(request(addr, "GET", "/bad-event?case=" + case))
    assert report["raised"] is True, report


@clause("HTTP-RESP-3", "HTTP-FRAME-1")
def test_body_events_in_order(addr):
    resp = request(addr, "GET", "/stream?n=4&size=3")
    assert resp.status == 200
    assert resp.chunked
    assert resp.body == b"aaabbbcccddd"
    assert resp.complete


@clause("HTTP-RESP-4")
def test_body_before_start_fails(addr):
    resp = request(addr, "GET", "/bad-event?case=body-before-start")
    assert resp.status == 200
    report = json_body(resp)
    assert report["raised"] is True, report


@clause("HTTP-RESP-4")
def test_second_start_fails(addr):
    resp = request(addr, "GET", "/bad-event?case=double-start")
    assert resp.status == 200
    report = json_body(resp)
    assert report["raised"] is True, report


@clause("HTTP-RESP-5")
def test_send_after_response_ended_fails_and_writes_nothing(addr):
    token = new_token()
    with Client(addr) as c:
        resp = c.request("GET", "/after-complete?token=" + token)
        assert resp.body == b"done"
        resp = c.request("GET", "/hello")
        assert resp.status == 200 and resp.body == b"hello"
    entries = wait_journal(addr, token, lambda es: any(
        e.get("step") == "send-after-complete" for e in es))
    step = [e for e in entries if e.get("step") == "send-after-complete"]
    assert step and step[0]["raised"] is True, entries


@clause("HTTP-RESP-6")
def test_application_transfer_encoding_ignored(addr):
    with Client(addr) as c:
        resp = c.request("GET", "/app-te")
        assert resp.status == 200
        te = resp.header_all("transfer-encoding")
        assert all(b"gzip" not in v.lower() for v in te), resp.headers
        assert len(te) <= 1
        assert resp.body == b"hello"
        assert c.request("GET", "/hello").body == b"hello"


SPLITTING = ["cr-value", "lf-value", "crlf-value", "nul-value", "cr-name", "lf-name",
             "nul-name", "ctl-name", "del-name"]


@clause("HTTP-RESP-7")
@pytest.mark.parametrize("case", SPLITTING)
def test_header_bytes_that_could_split_are_rejected(addr, case):
    # Read the raw bytes: the bad header must not be on the wire at all, and
    # the send must have raised (the report is somewhere in what came back;
    # that the rest is a well-formed response is CORE-ERR-5's business).
    raw = raw_exchange(addr[1], build_request("GET", "/bad-header?case=" + case, close=True))
    assert b"x-injected" not in raw.lower(), raw[:300]
    assert not re.search(rb"(^|\n)x-b[^\r\n]*:", raw.lower()), raw[:300]
    m = re.search(rb'\{"case".*?\}', raw)
    assert m, raw[:300]
    assert json.loads(m.group(0))["raised"] is True, m.group(0)


@clause("HTTP-RESP-8")
@pytest.mark.parametrize("case", ["space-name", "colon-name", "empty-name"])
def test_non_token_header_names_are_rejected(addr, case):
    resp = request(addr, "GET", "/bad-header?case=" + case)
    assert resp.status == 200
    report = json.loads(resp.body)
    assert report["raised"] is True, report


@clause("HTTP-RESP-10")
def test_trailers(addr):
    token = new_token()
    resp = request(addr, "GET", "/trailers?token=" + token, headers=[("TE", "trailers")])
    assert resp.status == 200
    assert resp.chunked
    assert resp.body == b"part1part2"
    assert (b"x-checksum", b"abc123") in resp.trailers
    assert (b"x-count", b"2") in resp.trailers
    assert resp.complete
    entries = wait_journal(addr, token, lambda es: es)
    assert entries and entries[0]["raised"] is False, entries


@clause("HTTP-RESP-11")
def test_trailers_not_announced_fail(addr):
    report = json_body(request(addr, "GET", "/bad-event?case=trailers-unannounced"))
    assert report["raised"] is True, report


@clause("HTTP-RESP-12")
def test_content_length_honoured(addr):
    resp = request(addr, "GET", "/stream?n=3&size=4&cl=1")
    assert resp.header("content-length") == b"12"
    assert resp.header("transfer-encoding") is None
    assert resp.body == b"aaaabbbbcccc"


@clause("REF-HTTP-RESP-12")
def test_invalid_application_content_length_fails(addr):
    report = json_body(request(addr, "GET", "/bad-event?case=content-length-invalid"))
    assert report["raised"] is True, report


@clause("REF-HTTP-RESP-10")
def test_trailers_dropped_for_http10(addr):
    token = new_token()
    with Client(addr) as c:
        c.send(b"GET /trailers?token=%s HTTP/1.0\r\n\r\n" % token.encode())
        resp = c.read()
    assert resp.status == 200 and resp.body == b"part1part2"
    assert resp.header("transfer-encoding") is None
    entries = wait_journal(addr, token, lambda es: es)
    assert entries and entries[0]["raised"] is False, entries


@clause("REF-HTTP-RESP-10")
def test_trailers_dropped_with_content_length(addr):
    token = new_token()
    with Client(addr) as c:
        resp = c.request("GET", "/trailers?cl=1&token=" + token)
        assert resp.status == 200 and resp.body == b"part1part2"
        assert resp.header("content-length") == b"10"
        assert c.request("GET", "/hello").body == b"hello"
    entries = wait_journal(addr, token, lambda es: es)
    assert entries and entries[0]["raised"] is False, entries


@clause("HTTP-RESP-13")
def test_body_past_content_length_fails_and_writes_nothing(addr):
    token = new_token()
    with Client(addr) as c:
        resp = c.request("GET", "/cl-long?token=" + token)
        assert resp.header("content-length") == b"5"
        assert resp.body == b"abcde"
    entries = wait_journal(addr, token, lambda es: len(es) >= 2)
    assert entries[0]["step"] == "ten-bytes" and entries[0]["raised"] is True, entries
    assert entries[1]["step"] == "five-bytes" and entries[1]["raised"] is False, entries


@clause("HTTP-RESP-14")
def test_short_content_length_closes_the_connection(addr):
    with Client(addr, timeout=5) as c:
        c.send(b"GET /cl-short HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = c.read()
    assert resp.header("content-length") == b"10"
    assert resp.body == b"12345"
    assert resp.complete is False   # the server closed after 5 bytes


@clause("HTTP-RESP-15")
def test_head_has_no_body(addr):
    with Client(addr) as c:
        resp = c.request("HEAD", "/hello")
        assert resp.status == 200
        assert resp.header("content-length") == b"5"
        resp = c.request("GET", "/hello")
        assert resp.body == b"hello"
        resp = c.request("HEAD", "/stream?n=2&size=3")
        assert resp.status == 200
        resp = c.request("GET", "/hello")
        assert resp.status == 200 and resp.body == b"hello"


@clause("HTTP-RESP-15")
@pytest.mark.parametrize("code", [204, 304])
def test_no_body_statuses(addr, code):
    with Client(addr) as c:
        resp = c.request("GET", "/status?code=%d&body=xyz" % code)
        assert resp.status == code
        if code == 204:   # RFC 9112 §6.1: never Transfer-Encoding on a 204
            assert resp.header("transfer-encoding") is None
        # no body bytes: the next response starts right after the head
        resp = c.request("GET", "/hello")
        assert resp.status == 200 and resp.body == b"hello"


def file_response(addr, query):
    resp = request(addr, "GET", "/file?" + query)
    assert resp.status == 200
    return resp


@clause("HTTP-RESP-16")
@pytest.mark.parametrize("query,expected", [
    ("mode=file", FILE),
    ("mode=file&offset=1000&length=500", FILE[1000:1500]),
    ("mode=file&offset=262000", FILE[262000:]),
    ("mode=fh", FILE),
    ("mode=fh&offset=7&length=3", FILE[7:10]),
])
def test_file_bodies(addr, query, expected):
    resp = file_response(addr, query)
    assert not resp.body.startswith(b"!error"), resp.body[:80]
    assert resp.body == expected
    assert resp.complete


FILE_ERRORS = [("mode=missing", b"not-found"), ("mode=both", b"invalid-event"),
               ("mode=file&offset=-1", b"invalid-event"),
               ("mode=file&length=-5", b"invalid-event")]


@clause("HTTP-RESP-17")
@pytest.mark.parametrize("query,category", FILE_ERRORS)
def test_file_body_errors_fail_the_send(addr, query, category):
    resp = file_response(addr, query)
    assert resp.body.startswith(b"!error:"), resp.body[:80]


@clause("REF-HTTP-RESP-17")
@pytest.mark.parametrize("query,category", FILE_ERRORS)
def test_file_body_error_categories(addr, query, category):
    resp = file_response(addr, query)
    assert resp.body == b"!error:" + category, resp.body[:80]


@clause("HTTP-RESP-18")
def test_file_offset_past_end_sends_nothing(addr):
    resp = file_response(addr, "mode=file&offset=300000")
    assert resp.body == b""
    assert resp.complete

