"""Section 4 against an attacker: an adversarial corpus of request heads.

Each family here once froze or desynchronised pagi_ref (issue 9): header
lines padded with white space before an invalid byte made the old header
pattern backtrack for minutes to hours, on one thread, for every client; a
Content-Length of 4,300 digits escaped int() and let the declared body be
served as a second request.  The parser now reads every head in time
linear in its length (section 4's banner), so each hostile head is refused
(or served, where it is valid) at once.

Every test sends the hostile bytes, then asks for a page on a second
connection, and asserts both answers.  The bound on the second one is a
socket timeout of several seconds: the fixed parser needs milliseconds, the
old one needed minutes, so the bound separates them on any machine without
timing anything.
"""
import socket

import pytest

import pagi_ref
from conftest import serve
from spec_wire import Reader, connect
from apputil import read_body, req, respond

H = b"Host: test\r\n"
BOUND = 8.0          # seconds a concurrent client may wait: generous on purpose


@pytest.fixture(scope="module")
def srv():
    def app(scope, receive, send):
        data = yield from read_body(receive)
        if data is None:
            return
        yield from respond(send, 200, b"%s %s %d:" % (scope["method"].encode(),
                                                      scope["path"].encode(), len(data)) + data[:64])

    with serve(app) as running:
        yield running


def answer(srv, raw):
    """Send raw bytes, then check that another client is served meanwhile;
    return the first response and what followed it before the close."""
    with connect(srv.port, timeout=BOUND) as hostile:
        hostile.sendall(raw)
        with connect(srv.port, timeout=BOUND) as other:
            other.sendall(req("/other", headers=[("Connection", "close")]))
            resp = Reader(other).read_response()
            assert resp.status == 200 and resp.body == b"GET /other 0:", resp
        reader = Reader(hostile)
        resp = reader.read_response()
        rest = reader.read_all() if resp.header("connection") == b"close" else b""
        return resp, rest


def refused(srv, raw, status):
    resp, rest = answer(srv, raw)
    assert resp.status == status, (resp, resp.body)
    assert resp.header("connection") == b"close"
    assert rest == b"", "bytes after a refusal: %r" % rest[:200]


# -- white-space runs before an invalid byte --------------------------------------

@pytest.mark.parametrize("lines", [7, 10, 40])
def test_padded_lines_then_a_control_byte(srv, lines):
    pad = b" " * 10
    fields = b"".join(b"X-P%d:%sv%s\r\n" % (i, pad, pad) for i in range(lines))
    refused(srv, b"GET / HTTP/1.1\r\n" + H + fields + b"X-Bad: a\x01\r\n\r\n", 400)


@pytest.mark.parametrize("pad", [b" ", b"\t", b" \t"])
def test_one_value_of_8000_blanks_then_a_control_byte(srv, pad):
    value = (pad * 8000)[:8000]
    refused(srv, b"GET / HTTP/1.1\r\n" + H + b"X-A:" + value + b"\x01\r\n\r\n", 400)


def test_padded_trailers_then_a_control_byte(srv):
    pad = b" " * 10
    trailers = b"".join(b"X-T%d:%sv%s\r\n" % (i, pad, pad) for i in range(20))
    refused(srv, b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
            + b"5\r\nhello\r\n0\r\n" + trailers + b"X-Bad: \x7f\r\n\r\n", 400)


# -- long digit strings -------------------------------------------------------------

def test_content_length_of_4300_digits_declares_a_body_not_a_request(srv):
    smuggled = req("/smuggled")
    raw = (b"POST /post HTTP/1.1\r\n" + H + b"Content-Length: " + b"0" * 4300
           + b"%d\r\nConnection: close\r\n\r\n" % len(smuggled) + smuggled)
    resp, rest = answer(srv, raw)
    assert resp.status == 200
    assert resp.body == b"POST /post %d:" % len(smuggled) + smuggled[:64]
    assert rest == b"", "a second response: %r" % rest[:200]


@pytest.mark.parametrize("digits", [b"9" * 5000, b"1" + b"0" * 18, b"0" * 3000 + b"1" + b"0" * 20])
def test_huge_content_length_is_413(srv, digits):
    refused(srv, b"POST / HTTP/1.1\r\n" + H + b"Content-Length: " + digits + b"\r\n\r\n", 413)


def test_chunk_size_with_4000_leading_zeros_is_read(srv):
    resp, _ = answer(srv, b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n" + b"0" * 4000 + b"5\r\nhello\r\n0\r\n\r\n")
    assert resp.status == 200 and resp.body == b"POST / 5:hello"


@pytest.mark.parametrize("size,status", [(b"F" * 17, 413), (b"0" * 5000 + b"5", 400)],
                         ids=["17-hex-digits", "line-past-4096"])
def test_long_chunk_sizes(srv, size, status):
    refused(srv, b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
            + size + b"\r\nhello\r\n0\r\n\r\n", status)


# -- a long run of one byte in every position ----------------------------------------

POSITIONS = {
    "method": (b"", b"GET / HTTP/1.1\r\n" + H + b"\r\n"),
    "target": (b"GET /", b" HTTP/1.1\r\n" + H + b"\r\n"),
    "version": (b"GET / HTTP/1.1", b"\r\n" + H + b"\r\n"),
    "name": (b"GET / HTTP/1.1\r\n" + H + b"X", b": v\r\n\r\n"),
    "value": (b"GET / HTTP/1.1\r\n" + H + b"X: a", b"b\r\n\r\n"),
    "line": (b"GET / HTTP/1.1\r\n" + H, b"\r\n\r\n"),
}
RUNS = [b" ", b"\t", b"a", b"0", b":", b"/", b"\r", b"\x80", b"\x00", b"\n"]


@pytest.mark.parametrize("position", sorted(POSITIONS))
def test_a_long_run_of_one_byte(srv, position):
    before, after = POSITIONS[position]
    for byte in RUNS:
        raw = before + byte * 7000 + after
        resp, rest = answer(srv, raw)
        # Valid (200), malformed (400), too long (414, 431): never a hang.
        assert resp.status in (200, 400, 414, 431, 505), (position, byte, resp.status)
        if resp.status != 200:
            assert rest == b"", (position, byte)


# -- deep chunk extensions and many tiny fields --------------------------------------

def test_deep_chunk_extensions(srv):
    def raw(n):
        return (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                b"5" + b";a=b" * n + b"\r\nhello\r\n0\r\n\r\n")
    resp, _ = answer(srv, raw(1000))
    assert resp.status == 200 and resp.body == b"POST / 5:hello"
    refused(srv, raw(1100), 400)


def test_many_tiny_fields(srv):
    resp, _ = answer(srv, b"GET / HTTP/1.1\r\n" + H + b"a:\r\n" * 98 + b"Connection: close\r\n\r\n")
    assert resp.status == 200
    refused(srv, b"GET / HTTP/1.1\r\n" + H + b"a:\r\n" * 100 + b"\r\n", 431)
    refused(srv, b"GET / HTTP/1.1\r\n" + H + b"a:\r\n" * 3000 + b"\r\n", 431)


# -- empty lines before the request line ---------------------------------------------

def test_empty_lines_before_the_request_line(srv):
    resp, _ = answer(srv, b"\r\n\r\n" + req("/", headers=[("Connection", "close")]))
    assert resp.status == 200
    refused(srv, b"\r\n\n" + req("/"), 400)
    refused(srv, b"\r\n" * 17 + req("/"), 400)


# -- a bug in the parser still answers 400 and reads no further ----------------------

def test_an_exception_in_the_parser_is_a_400_and_a_traceback(monkeypatch):
    def app(scope, receive, send):
        yield from respond(send, 200, b"served " + scope["path"].encode())

    def broken_frame(self, request):
        raise ValueError("the parser has a bug")

    with serve(app) as running:
        monkeypatch.setattr(pagi_ref.RequestParser, "_frame", broken_frame)
        with connect(running.port) as s:
            s.sendall(req("/first") + req("/second"))
            reader = Reader(s)
            resp = reader.read_response()
            rest = reader.read_all()
        monkeypatch.undo()
        assert resp.status == 400 and resp.header("connection") == b"close"
        assert rest == b"", "the bytes after the failed head were read: %r" % rest
        assert any("ValueError: the parser has a bug" in line for line in running.errors), \
            running.errors
