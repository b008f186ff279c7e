"""HTTP: the request body events (docs/spec.md section 2.2)."""
import os

import pytest

from spec_wire import Client, get_journal, json_body, new_token, request, wait_journal

clause = pytest.mark.clause


def chunked_head(path):
    return ("POST %s HTTP/1.1\r\nHost: spec.test\r\nTransfer-Encoding: chunked\r\n"
            "Connection: close\r\n\r\n" % path).encode()


@clause("HTTP-REQ-4", "HTTP-REQ-3")
def test_no_body_gives_one_empty_event(addr):
    events = json_body(request(addr, "GET", "/events"))
    assert len(events) == 1
    e = events[0]
    assert e["type"] == "http.request" and e["body_len"] == 0 and not e["more"]
    assert {"type", "body", "more"} <= set(e["keys"])


@clause("HTTP-REQ-2")
def test_content_length_body_arrives_whole(addr):
    body = os.urandom(200000)
    resp = request(addr, "POST", "/echo", body=body)
    assert resp.status == 200
    assert resp.body == body


@clause("HTTP-REQ-2")
def test_chunked_body_is_dechunked_and_extensions_dropped(addr):
    with Client(addr) as c:
        c.send(chunked_head("/echo") + b"5;ext=1\r\nhello\r\n6;a=\"b\"\r\n world\r\n"
               b"0\r\n\r\n")
        resp = c.read()
    assert resp.status == 200
    assert resp.body == b"hello world"


@clause("HTTP-REQ-2")
def test_transfer_coding_names_are_case_insensitive(addr):
    with Client(addr) as c:
        c.send(chunked_head("/echo").replace(b"chunked", b"Chunked") + b"2\r\nok\r\n0\r\n\r\n")
        resp = c.read()
    assert resp.status == 200 and resp.body == b"ok"


@clause("HTTP-REQ-4")
def test_zero_content_length_gives_one_empty_event(addr):
    events = json_body(request(addr, "POST", "/events", content_length=0))
    assert len(events) == 1 and events[0]["body_len"] == 0 and not events[0]["more"]


def body_in_pieces(addr):
    """Send a chunked body in three pieces, each only after the application
    has recorded an event for the one before (APP.md /conn mode=body journals
    every event), so the server gets them apart; return the recorded events."""
    token = new_token()

    def events(entries):
        return [e for e in entries if isinstance(e, dict) and e.get("at") == "event"]

    with Client(addr) as c:
        c.send(chunked_head("/conn?mode=body&token=" + token) + b"3\r\nabc\r\n")
        wait_journal(addr, token, lambda es: len(events(es)) >= 1)
        c.send(b"3\r\ndef\r\n")
        wait_journal(addr, token, lambda es: len(events(es)) >= 2)
        c.send(b"3\r\nghi\r\n0\r\n\r\n")
        resp = c.read()
    assert resp.status == 200 and resp.body == b"complete", resp
    return events(get_journal(addr, token))


@clause("HTTP-REQ-1", "HTTP-REQ-3")
def test_body_pieces_and_exactly_one_last_event(addr):
    events = body_in_pieces(addr)
    assert sum(e["body_len"] for e in events) == 9
    assert all(e["type"] == "http.request" for e in events)
    mores = [bool(e["more"]) for e in events]
    assert mores[-1] is False and all(mores[:-1]), events


@clause("HTTP-REQ-5")
def test_body_delivered_piece_by_piece(addr):
    events = body_in_pieces(addr)
    assert len(events) >= 2, "the body was gathered whole before delivery: %r" % events


@clause("HTTP-REQ-5")
def test_first_piece_delivered_before_the_rest_is_sent(addr):
    with Client(addr, timeout=5) as c:
        c.send(b"POST /first-event HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
               b"Connection: close\r\n\r\nhello")
        resp = c.read()   # the rest of the body is never sent
    assert resp.status == 200
    e = json_body(resp)
    assert e["type"] == "http.request" and e["body"] == "hello" and e["more"]


@clause("HTTP-REQ-6")
def test_request_trailers_are_consumed(addr):
    with Client(addr) as c:
        c.send(chunked_head("/echo").replace(b"Connection: close\r\n", b"")
               + b"4\r\nbody\r\n0\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n")
        resp = c.read()
        assert resp.status == 200 and resp.body == b"body"
        resp = c.request("GET", "/hello")
        assert resp.status == 200 and resp.body == b"hello"


@clause("HTTP-REQ-8", "HTTP-DISC-2")
def test_receive_after_response_gives_disconnect(addr):
    token = new_token()
    resp = request(addr, "GET", "/after-complete?token=" + token)
    assert resp.body == b"done"
    entries = wait_journal(addr, token, lambda es: any(
        e.get("step") == "receive-after-complete" for e in es))
    got = [e for e in entries if e.get("step") == "receive-after-complete"]
    assert got and got[0]["type"] == "http.disconnect", entries


def body_then_gone(addr):
    token = new_token()
    c = Client(addr)
    c.send(b"POST /conn?mode=body&token=%s HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
           % token.encode() + b"0123456789")
    c.close()
    entries = wait_journal(addr, token, lambda es: any(e.get("at") == "end" for e in es))
    return entries, [(e["type"], e["body_len"]) for e in entries if e.get("at") == "event"]


@clause("HTTP-DISC-1", "CORE-DISC-1")
def test_disconnect_event_when_the_client_leaves(addr):
    entries, events = body_then_gone(addr)
    assert events[-1] == ("http.disconnect", 0), entries


@clause("HTTP-REQ-9")
def test_queued_body_then_disconnect(addr):
    entries, events = body_then_gone(addr)
    assert events[-1] == ("http.disconnect", 0), entries
    body = sum(n for t, n in events if t == "http.request")
    assert body == 10, entries


@clause("REF-HTTP-REQ-8")
def test_receive_pending_across_the_response_gets_disconnect(addr):
    token = new_token()
    with Client(addr) as c:
        resp = c.request("GET", "/receive-across?token=" + token)
        assert resp.body == b"sent"
        # the client stays connected: the response alone must release the waiter
        entries = wait_journal(addr, token, lambda es: any(e.get("at") == "end" for e in es),
                               timeout=6)
        assert c.request("GET", "/hello").body == b"hello"
    waiter = [e for e in entries if e.get("at") == "waiter"]
    assert waiter and waiter[0]["type"] == "http.disconnect", entries
