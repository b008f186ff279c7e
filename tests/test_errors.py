"""Section 6/10, application errors: the 500 before a response started, the
truncated body after it, the backstop for an application that produced no
response, a client that left (no 500, no error log), and an application
that is neither a generator nor a coroutine.

PAGI www spec, "Application Produced No Response", "Server-generated
responses"; the issue, item 9.  After each, the server keeps serving.
"""
import threading

import pytest

import pagi_ref
from conftest import serve
from spec_wire import Reader, connect, exchange
from apputil import body, read_body, req, respond, start, wait_until

finished = {}
reading = threading.Event()


def gen_app(scope, receive, send):
    path = scope["path"]
    if path == "/raise-before":
        yield receive()
        raise RuntimeError("boom-before-start")
    elif path == "/raise-at-once":
        raise KeyError("boom-at-first-step")
    elif path == "/raise-after":
        yield start(send, 200, [(b"content-type", b"text/plain")])
        yield body(send, b"part1", more=True)
        yield pagi_ref.sleep(0.02)
        raise RuntimeError("boom-mid-stream")
    elif path == "/raise-after-length":
        yield start(send, 200, [(b"content-length", b"100")])
        yield body(send, b"0123456789", more=True)
        yield pagi_ref.sleep(0.02)
        raise RuntimeError("boom-mid-length")
    elif path == "/no-response":
        yield receive()
    elif path == "/no-response-after-body":
        yield from read_body(receive)
    elif path == "/client-gone":
        reading.set()
        data = yield from read_body(receive)
        finished["client-gone"] = data
        # returns without a response: the client is gone, that is no error
    else:
        yield from respond(send, 200, b"fine")


async def async_raise(scope, receive, send):
    await receive()
    raise ValueError("boom-in-coroutine")


def app(scope, receive, send):
    """A plain function: it returns the application's generator, or a bad value."""
    path = scope["path"]
    if path == "/returns-none":
        return None
    if path == "/returns-int":
        return 42
    if path == "/async-raise":
        return async_raise(scope, receive, send)
    return gen_app(scope, receive, send)


@pytest.fixture(scope="module")
def srv():
    with serve(app) as running:
        yield running


def new_errors(srv, before, predicate, timeout=5.0):
    wait_until(lambda: predicate("\n".join(srv.errors[before:])), timeout)
    return "\n".join(srv.errors[before:])


def assert_500(resp, rest):
    assert resp.status == 500
    assert resp.header("content-type") == b"text/plain; charset=utf-8"
    assert resp.header("content-length") == str(len(resp.body)).encode()
    assert 0 < len(resp.body) < 1024
    assert (resp.header("connection") or b"").lower() == b"close"
    assert rest == b""


def still_serving(srv):
    resp = exchange(srv.port, req("/ok", headers=[("Connection", "close")]))
    assert resp.status == 200 and resp.body == b"fine"


def get_500(srv, path):
    with connect(srv.port) as s:
        s.sendall(req(path))
        r = Reader(s)
        resp = r.read_response()
        if (resp.header("connection") or b"").lower() != b"close":
            return resp, None     # fail in assert_500 without waiting for a close
        return resp, r.read_all()


@pytest.mark.parametrize("path,marker", [
    ("/raise-before", "boom-before-start"),
    ("/raise-at-once", "boom-at-first-step"),
    ("/async-raise", "boom-in-coroutine"),
])
def test_raise_before_start_gives_500_and_traceback(srv, path, marker):
    before = len(srv.errors)
    resp, rest = get_500(srv, path)
    assert_500(resp, rest)
    log = new_errors(srv, before, lambda t: marker in t and "Traceback" in t)
    assert marker in log and "Traceback" in log, log
    still_serving(srv)


def test_raise_mid_stream_truncates_chunked_body(srv):
    before = len(srv.errors)
    with connect(srv.port) as s:
        s.sendall(req("/raise-after"))
        r = Reader(s)
        resp = r.read_response()
        assert resp.status == 200 and resp.chunked
        assert resp.body == b"part1"
        assert not resp.complete, "the body ended with a terminating chunk after a crash"
        assert r.eof
    log = new_errors(srv, before, lambda t: "boom-mid-stream" in t)
    assert "boom-mid-stream" in log and "Traceback" in log, log
    still_serving(srv)


def test_raise_mid_stream_with_length_closes_short(srv):
    with connect(srv.port) as s:
        s.sendall(req("/raise-after-length"))
        r = Reader(s)
        resp = r.read_response()
        assert resp.status == 200
        assert resp.body == b"0123456789" and not resp.complete
        assert r.eof
    still_serving(srv)


@pytest.mark.parametrize("path", ["/no-response", "/no-response-after-body"])
def test_no_response_gets_the_500_backstop_and_is_logged(srv, path):
    before = len(srv.errors)
    resp, rest = get_500(srv, path)
    assert_500(resp, rest)
    log = new_errors(srv, before, lambda t: t.strip() != "")
    assert log.strip(), "the backstop 500 was not logged"
    still_serving(srv)


@pytest.mark.parametrize("path,marker", [("/returns-none", "TypeError"),
                                         ("/returns-int", "TypeError")])
def test_app_returning_neither_generator_nor_coroutine(srv, path, marker):
    before = len(srv.errors)
    resp, rest = get_500(srv, path)
    assert_500(resp, rest)
    log = new_errors(srv, before, lambda t: marker in t)
    assert marker in log, log
    still_serving(srv)


def test_client_gone_gives_no_500_and_no_error_log(srv):
    finished.pop("client-gone", "missing")
    reading.clear()
    before = len(srv.errors)
    s = connect(srv.port)
    s.sendall(req("/client-gone", "POST", [("Content-Length", "50")], b"partial"))
    assert reading.wait(5)   # the application is reading the body; the client leaves
    s.close()
    assert wait_until(lambda: "client-gone" in finished, 5), "the app never learnt the client left"
    assert finished["client-gone"] is None
    still_serving(srv)   # a barrier: the loop handled the end of that task before this
    still_serving(srv)
    assert srv.errors[before:] == []
