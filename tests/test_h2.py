"""Section 6a from the client's side: HTTP/2 streams as PAGI scopes over
real sockets -- h2c with prior knowledge and h2 over TLS (ALPN) -- with
the small client of tests/h2util.py, and with curl, nghttp and h2load
where they are installed (each skips cleanly when its tool is missing or
lacks HTTP/2).  Defences are tested from the wire: what the client sees
is a GOAWAY with ENHANCE_YOUR_CALM, a RST_STREAM, or a 431."""
import json
import queue
import shutil
import socket
import struct
import subprocess
import threading

import pytest

import pagi_ref
import h2util
from h2util import (ACK, CONTINUATION, DATA, END_HEADERS, GOAWAY, HEADERS, PING, RST_STREAM,
                    SETTINGS, WINDOW_UPDATE, H2Client, frame, headers, ping, request_fields,
                    rst_stream, window_update)
from conftest import serve
from apputil import wait_until
from spec_wire import Client, build_request

H2 = dict(http2=True)


def _has_http2_curl():
    curl = shutil.which("curl")
    if curl is None:
        return False
    out = subprocess.run([curl, "-V"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return b"HTTP2" in out.stdout


needs_curl = pytest.mark.skipif(not _has_http2_curl(), reason="curl with HTTP/2 support")
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="openssl (the command) makes the test certificates")


def body_of(receive):
    body = b""
    while True:
        event = yield receive()
        body += event.get("body", b"")
        if not event.get("more"):
            return body


def scope_app(scope, receive, send):
    """Answers with the scope, as JSON (the stream's own view)."""
    body = yield from body_of(receive)
    info = {k: scope[k] for k in ("type", "http_version", "method", "scheme", "path",
                                  "query_string", "root_path")}
    info["raw_path"] = scope["raw_path"].decode("latin-1")
    info["query_string"] = scope["query_string"].decode("latin-1")
    info["headers"] = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]]
    info["body"] = body.decode("latin-1")
    info["connection"] = id(scope.get("pagi.connection"))
    info["transport"] = id(scope["pagi.transport"])
    out = json.dumps(info).encode()
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    yield send({"type": "http.response.body", "body": out})


# -- streams as scopes ---------------------------------------------------------------

def test_get_is_an_http_scope_with_http_version_2():
    with serve(scope_app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            sid = client.request("GET", "/a%20b/c?x=1&y=2", authority="example.com:8000")
            resp = client.response(sid)
        finally:
            client.close()
    assert resp.status == 200 and resp.header(b"content-type") == b"application/json"
    assert resp.header(b"server") == b"pagi_ref" and resp.header(b"date")
    assert resp.header(b"content-length") == b"%d" % len(resp.body)
    info = json.loads(resp.body)
    assert info["type"] == "http" and info["http_version"] == "2"
    assert info["method"] == "GET" and info["scheme"] == "http"
    assert info["path"] == "/a b/c" and info["raw_path"] == "/a%20b/c"
    assert info["query_string"] == "x=1&y=2"
    # PAGI HTTP/2 Stream Mapping: no pseudo-headers; :authority is host.
    assert info["headers"] == [["host", "example.com:8000"]]


def test_each_stream_has_its_own_connection_and_transport_objects():
    with serve(scope_app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            first, second = client.request(), client.request()
            a = json.loads(client.response(first).body)
            b = json.loads(client.response(second).body)
        finally:
            client.close()
    assert a["connection"] != b["connection"] and a["transport"] != b["transport"]


def test_request_body_arrives_as_http_request_events():
    seen = []

    def app(scope, receive, send):
        while True:
            event = yield receive()
            seen.append((event["type"], event["body"], event["more"]))
            if not event["more"]:
                break
        yield send({"type": "http.response.start", "status": 200})
        yield send({"type": "http.response.body", "body": b"ok"})

    with serve(app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            sid = client.next_stream
            client.next_stream += 2
            client.responses[sid] = h2util.Response()
            client.send(headers(sid, request_fields("POST", "/"), end_stream=False))
            client.send(h2util.data(sid, b"one"))
            client.send(h2util.data(sid, b"two", end_stream=True))
            resp = client.response(sid)
        finally:
            client.close()
    assert resp.status == 200
    assert b"".join(b for _, b, _ in seen) == b"onetwo"
    assert seen[-1][2] == 0 and all(m == 1 for _, _, m in seen[:-1])
    assert {t for t, _, _ in seen} == {"http.request"}


def test_headers_only_request_gets_one_empty_final_event():
    seen = []

    def app(scope, receive, send):
        seen.append((yield receive()))
        yield send({"type": "http.response.start", "status": 204})
        yield send({"type": "http.response.body"})

    with serve(app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            resp = client.response(client.request())
        finally:
            client.close()
    assert resp.status == 204 and resp.body == b""
    assert seen == [{"type": "http.request", "body": b"", "more": 0}]


def test_response_trailers_are_a_final_headers_frame():
    def app(scope, receive, send):
        yield from body_of(receive)
        yield send({"type": "http.response.start", "status": 200, "trailers": 1})
        yield send({"type": "http.response.body", "body": b"data"})
        yield send({"type": "http.response.trailers", "headers": [(b"x-checksum", b"42")]})

    with serve(app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            resp = client.response(client.request())
        finally:
            client.close()
    assert resp.body == b"data" and resp.trailers == [(b"x-checksum", b"42")]


def test_a_response_before_the_request_ends_keeps_the_stream_checked():
    """RFC 9113 §8.1: an early response leaves the request's stream
    half-closed, its frames still read and judged (here a body shorter than
    its content-length, §8.1.1), not silently ignored."""
    def app(scope, receive, send):
        yield send({"type": "http.response.start", "status": 200})
        yield send({"type": "http.response.body", "body": b"early"})

    with serve(app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            sid = client.request("POST", extra=[(b"content-length", b"10")], end_stream=False)
            resp = client.response(sid)
            assert resp.body == b"early" and resp.reset is None
            client.send(h2util.data(sid, b"short", end_stream=True))
            f = client.read_until(lambda f: f[0] == RST_STREAM and f[2] == sid)
            assert struct.unpack(">I", f[3])[0] == pagi_ref.H2_PROTOCOL_ERROR
        finally:
            client.close()


def test_request_trailers_end_the_body():
    def app(scope, receive, send):
        body = yield from body_of(receive)
        yield send({"type": "http.response.start", "status": 200})
        yield send({"type": "http.response.body", "body": body})

    with serve(app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            sid = client.request("POST", body=b"payload", trailers=[(b"x-sum", b"1")])
            resp = client.response(sid)
        finally:
            client.close()
    assert resp.status == 200 and resp.body == b"payload"


def test_streams_are_served_concurrently():
    """Stream 1's application waits for stream 3's to finish: only
    independent scopes on one connection can do that."""
    done = {}

    def app(scope, receive, send):
        yield from body_of(receive)
        if scope["path"] == "/first":
            gate = done.setdefault("gate", pagi_ref.Future())
            yield gate
        else:
            done.setdefault("gate", pagi_ref.Future()).set_result(None)
        yield send({"type": "http.response.start", "status": 200})
        yield send({"type": "http.response.body", "body": scope["path"].encode()})

    with serve(app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            first = client.request(path="/first")
            second = client.request(path="/second")
            assert client.response(first).body == b"/first"
            assert client.response(second).body == b"/second"
        finally:
            client.close()


def test_event_stream_over_http2_is_an_sse_scope():
    def app(scope, receive, send):
        assert scope["type"] == "sse" and scope["http_version"] == "2"
        yield send({"type": "sse.start"})
        yield send({"type": "sse.send", "data": "one", "event": "e"})
        yield send({"type": "sse.send", "data": "two"})

    with serve(app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            resp = client.response(client.request(extra=[(b"accept", b"text/event-stream")]))
        finally:
            client.close()
    assert resp.status == 200
    assert resp.header(b"content-type") == b"text/event-stream"
    assert resp.header(b"cache-control") == b"no-cache"
    assert resp.header(b"transfer-encoding") is None and resp.header(b"connection") is None
    assert resp.body == b"event: e\ndata: one\n\ndata: two\n\n"


def test_client_reset_is_http_disconnect():
    reasons = queue.Queue()

    def app(scope, receive, send):
        conn = scope["pagi.connection"]
        yield send({"type": "http.response.start", "status": 200})
        if scope["path"] == "/other":
            yield send({"type": "http.response.body", "body": b"whole"})
            return
        yield send({"type": "http.response.body", "body": b"partial", "more": 1})
        event = yield receive()          # the body (none), then the disconnect
        if event["type"] == "http.request":
            event = yield receive()
        reasons.put((event["type"], conn.disconnect_reason(), conn.is_connected()))
        # PAGI: a send after the disconnect is a no-op, not an error.
        yield send({"type": "http.response.body", "body": b"more", "more": 1})

    with serve(app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            sid = client.request()
            client.read_until(lambda f: f[0] == DATA and f[2] == sid)
            client.send(rst_stream(sid, 8))
            assert reasons.get(timeout=10) == ("http.disconnect", "client_closed", False)
            # The connection carries on.
            client.responses.clear()
            other = client.request(path="/other")
            assert client.response(other).body == b"whole"
        finally:
            client.close()
        assert srv.errors == []


def test_application_error_before_the_response_is_a_500_on_its_stream():
    def app(scope, receive, send):
        if scope["path"] == "/boom":
            raise RuntimeError("boom")
        yield send({"type": "http.response.start", "status": 200})
        yield send({"type": "http.response.body", "body": b"fine"})

    with serve(app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            bad = client.response(client.request(path="/boom"))
            good = client.response(client.request(path="/ok"))
        finally:
            client.close()
        assert bad.status == 500 and good.body == b"fine"
        assert any("boom" in line for line in srv.errors)


def test_an_application_that_cannot_start_is_a_500_on_its_stream():
    def app(scope, receive, send):
        if scope["path"] == "/plain":
            return None            # not a generator: it cannot start
        raise RuntimeError("refused at the call")

    with serve(app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            plain = client.response(client.request(path="/plain"))
            raising = client.response(client.request(path="/raise"))
        finally:
            client.close()
        assert plain.status == 500 and raising.status == 500
        assert client.goaway is None
        assert any("TypeError" in line for line in srv.errors)
        assert any("refused at the call" in line for line in srv.errors)


def test_application_error_after_the_head_resets_the_stream():
    def app(scope, receive, send):
        yield send({"type": "http.response.start", "status": 200})
        yield send({"type": "http.response.body", "body": b"part", "more": 1})
        raise RuntimeError("late")

    with serve(app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            resp = client.response(client.request())
        finally:
            client.close()
    assert resp.status == 200 and resp.reset == pagi_ref.H2_INTERNAL_ERROR


def test_body_over_max_body_size_is_413():
    def app(scope, receive, send):
        yield from body_of(receive)
        yield send({"type": "http.response.start", "status": 200})
        yield send({"type": "http.response.body", "body": b"no"})

    with serve(app, max_body_size=10, **H2) as srv:
        client = H2Client(srv.port)
        try:
            declared = client.response(client.request(
                "POST", body=b"x" * 20, extra=[(b"content-length", b"20")]))
            streamed = client.response(client.request("POST", body=b"x" * 20))
        finally:
            client.close()
    assert declared.status == 413 and streamed.status == 413


def test_header_list_over_the_limit_is_431_and_the_connection_goes_on():
    with serve(scope_app, max_header_size=1024, **H2) as srv:
        client = H2Client(srv.port)
        try:
            big = client.response(client.request(extra=[(b"x-big", b"v" * 6000)]))
            small = client.response(client.request())
        finally:
            client.close()
    assert big.status == 431 and small.status == 200


def test_head_has_the_length_and_no_body():
    def app(scope, receive, send):
        yield from body_of(receive)
        yield send({"type": "http.response.start", "status": 200})
        yield send({"type": "http.response.body", "body": b"twelve bytes"})

    with serve(app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            resp = client.response(client.request("HEAD"))
        finally:
            client.close()
    assert resp.status == 200 and resp.body == b""
    assert resp.header(b"content-length") == b"12"


def test_file_bodies_with_offset_and_length(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 1024)          # 256 KiB: past the window

    def app(scope, receive, send):
        yield from body_of(receive)
        yield send({"type": "http.response.start", "status": 200})
        if scope["path"] == "/file":
            yield send({"type": "http.response.body", "file": str(path)})
        else:
            with open(str(path), "rb") as fh:
                yield send({"type": "http.response.body", "fh": fh, "offset": 10,
                            "length": 1000})

    with serve(app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            whole = client.response(client.request(path="/file"))
            part = client.response(client.request(path="/fh"))
        finally:
            client.close()
    assert whole.body == path.read_bytes()
    assert whole.header(b"content-length") == b"%d" % (256 * 1024)
    assert part.body == path.read_bytes()[10:1010]


def test_fullflush_sends_the_head_at_once():
    marks, go = queue.Queue(), queue.Queue()

    def app(scope, receive, send):
        yield from body_of(receive)
        yield send({"type": "http.response.start", "status": 200})
        yield send({"type": "http.fullflush"})
        marks.put("flushed")
        yield pagi_ref.to_thread(go.get, True, 10)     # until the client saw the head
        yield send({"type": "http.response.body", "body": b"late"})

    with serve(app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            sid = client.request()
            assert client.read_until(lambda f: f[0] == HEADERS and f[2] == sid)
            assert marks.get(timeout=10) == "flushed"
            go.put("go")
            assert client.response(sid).body == b"late"
        finally:
            client.close()


def test_fewer_bytes_than_content_length_resets_the_stream():
    def app(scope, receive, send):
        yield from body_of(receive)
        yield send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"10")]})
        yield send({"type": "http.response.body", "body": b"short"})

    with serve(app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            resp = client.response(client.request())
        finally:
            client.close()
    assert resp.reset == pagi_ref.H2_INTERNAL_ERROR and resp.body == b"short"


# -- flow control ---------------------------------------------------------------------

def test_send_suspends_on_the_stream_window_and_resumes_on_window_update():
    marks = queue.Queue()
    size = 200000

    def app(scope, receive, send):
        transport = scope["pagi.transport"]
        yield from body_of(receive)
        yield send({"type": "http.response.start", "status": 200})
        future = send({"type": "http.response.body", "body": b"x" * size})
        marks.put(("sent", transport.buffered_amount(), future.done()))
        yield future
        marks.put(("resumed", transport.buffered_amount(), True))

    with serve(app, **H2) as srv:
        # The client's stream windows are 1000 bytes and it grants no more
        # until it says so.
        client = H2Client(srv.port, settings_pairs=[(4, 1000)])
        client._note_orig = client._note
        try:
            sid = client.request()
            mark, amount, done = marks.get(timeout=10)
            assert mark == "sent" and not done and amount >= size - 1000
            got = 0
            while got < 1000:
                f = client.sock.recv(65536)
                client.buffer += f
                for fr in h2util.parse_frames(client.buffer):
                    if fr[0] == DATA:
                        got += len(fr[3])
            assert got == 1000
            assert marks.empty()          # still suspended: the window is shut
            client.send(window_update(sid, size) + window_update(0, size))
            assert marks.get(timeout=10)[0] == "resumed"
        finally:
            client.close()


def test_stream_transport_fires_its_own_high_water_and_drain():
    """Each stream's pagi.transport has its own edges: the stream whose
    window is shut crosses high, and drains once the window opens."""
    marks = queue.Queue()

    def app(scope, receive, send):
        transport = scope["pagi.transport"]
        transport.on_high_water(lambda: marks.put(("high", scope["path"])))
        transport.on_drain(lambda: marks.put(("drain", scope["path"])))
        yield from body_of(receive)
        yield send({"type": "http.response.start", "status": 200})
        yield send({"type": "http.response.body", "body": b"h" * 100000})
        marks.put(("done", scope["path"]))

    with serve(app, **H2) as srv:
        client = H2Client(srv.port, settings_pairs=[(4, 1000)], auto_window=False)
        try:
            sid = client.request(path="/shut")
            assert marks.get(timeout=10) == ("high", "/shut")
            client.send(window_update(sid, 200000) + window_update(0, 200000))
            assert marks.get(timeout=10) == ("drain", "/shut")
            assert marks.get(timeout=10) == ("done", "/shut")
            assert len(client.response(sid).body) == 100000
        finally:
            client.close()


def test_large_windows_never_push_past_the_outgoing_buffer():
    """A client with windows of 2^31-1: two streams of several MB, each sent in
    one event, go into the connection's buffer a piece at a time up to the
    high-water mark (a whole body in one write would pass
    --write-buffer-limit and drop the connection)."""
    from test_tls import beyond_kernel_buffers
    size = beyond_kernel_buffers()      # past what the kernel's buffers hold

    def app(scope, receive, send):
        yield from body_of(receive)
        yield send({"type": "http.response.start", "status": 200})
        yield send({"type": "http.response.body", "body": b"z" * size})

    with serve(app, **H2) as srv:
        client = H2Client(srv.port, settings_pairs=[(4, (1 << 31) - 1)], window=1 << 30,
                          rcvbuf=16384)
        try:
            a, b = client.request(), client.request()
            for sid in (a, b):
                resp = client.response(sid)
                assert resp.reset is None and len(resp.body) == size
            assert client.goaway is None
        finally:
            client.close()
        assert srv.errors == []


def test_sends_not_awaited_past_the_limit_reset_the_stream():
    reasons = queue.Queue()

    def app(scope, receive, send):
        conn = scope["pagi.connection"]
        yield from body_of(receive)
        yield send({"type": "http.response.start", "status": 200})
        for _ in range(40):          # 2.5 MB, never waiting for the drain
            send({"type": "http.response.body", "body": b"q" * 65536, "more": 1})
        reasons.put(conn.disconnect_reason())

    with serve(app, **H2) as srv:
        client = H2Client(srv.port, settings_pairs=[(4, 1000)])   # windows of 1000 bytes
        try:
            sid = client.request()
            assert reasons.get(timeout=10) == "queue_overflow"
            assert client.response(sid).reset == pagi_ref.H2_INTERNAL_ERROR
            assert client.goaway is None    # the connection goes on
        finally:
            client.close()


def test_a_window_never_opened_resets_the_stream_after_write_timeout():
    reasons = queue.Queue()

    def app(scope, receive, send):
        conn = scope["pagi.connection"]
        yield from body_of(receive)
        yield send({"type": "http.response.start", "status": 200})
        yield send({"type": "http.response.body", "body": b"w" * 200000})
        reasons.put(conn.disconnect_reason())

    with serve(app, write_timeout=0.5, **H2) as srv:
        client = H2Client(srv.port, settings_pairs=[(4, 1000)], auto_window=False)
        try:
            sid = client.request()
            assert client.response(sid).reset == pagi_ref.H2_INTERNAL_ERROR
            assert reasons.get(timeout=10) == "write_timeout"
            assert client.goaway is None
        finally:
            client.close()


def test_a_body_below_body_min_rate_is_408_on_its_stream():
    reasons = queue.Queue()

    def app(scope, receive, send):
        conn = scope["pagi.connection"]
        while True:
            event = yield receive()
            if event["type"] != "http.request" or not event["more"]:
                break
        reasons.put((event["type"], conn.disconnect_reason()))

    with serve(app, body_grace=0.1, body_min_rate=100000, **H2) as srv:
        client = H2Client(srv.port)
        try:
            sid = client.next_stream
            client.next_stream += 2
            client.responses[sid] = h2util.Response()
            client.send(headers(sid, request_fields("POST"), end_stream=False,
                                encoder=client.encoder) + h2util.data(sid, b"ten bytes!"))
            resp = client.response(sid)         # then nothing more: too slow
            assert resp.status == 408
            assert reasons.get(timeout=10) == ("http.disconnect", "client_timeout")
            assert client.goaway is None
        finally:
            client.close()


def test_a_stream_the_application_does_not_read_is_not_slow():
    """Its window shut, the client cannot send: the body's clock stops."""
    release = threading.Event()

    def app(scope, receive, send):
        yield pagi_ref.to_thread(release.wait, 10)
        body = yield from body_of(receive)
        yield send({"type": "http.response.start", "status": 200})
        yield send({"type": "http.response.body", "body": b"%d" % len(body)})

    with serve(app, body_grace=0.1, body_min_rate=100000, **H2) as srv:
        client = H2Client(srv.port)
        try:
            sid = client.next_stream
            client.next_stream += 2
            client.responses[sid] = h2util.Response()
            client.send(headers(sid, request_fields("POST"), end_stream=False,
                                encoder=client.encoder)
                        + b"".join(h2util.data(sid, b"y" * 16384) for _ in range(3))
                        + h2util.data(sid, b"y" * 16383))        # the whole window
            # At 100,000 bytes/s the 64 KiB were due within 0.76 s; let the
            # server's sweeps (every 0.5 s) pass that with the window shut.
            start = srv.server.loop.now
            wait_until(lambda: srv.server.loop.now - start > 1.5, timeout=10)
            release.set()
            assert client.read_until(lambda f: f[0] == WINDOW_UPDATE and f[2] == sid)
            client.send(h2util.data(sid, b"z", end_stream=True))
            resp = client.response(sid)
            assert (resp.status, resp.body) == (200, b"65536")
        finally:
            release.set()
            client.close()


def test_inbound_window_is_granted_as_the_application_reads():
    release = threading.Event()

    def app(scope, receive, send):
        yield pagi_ref.to_thread(release.wait, 10)
        body = yield from body_of(receive)
        yield send({"type": "http.response.start", "status": 200})
        yield send({"type": "http.response.body", "body": b"%d" % len(body)})

    with serve(app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            sid = client.next_stream
            client.next_stream += 2
            client.responses[sid] = h2util.Response()
            client.send(headers(sid, request_fields("POST"), end_stream=False))
            client.send(b"".join(h2util.data(sid, b"y" * 16384) for _ in range(3))
                        + h2util.data(sid, b"y" * 16383))        # the whole 65535
            client.send(ping(b"barrier!"))
            seen = []
            client.read_until(lambda f: seen.append(f) or (f[0] == PING and f[1] & ACK))
            # Nothing read by the application yet: no window for the stream.
            assert not [f for f in seen if f[0] == WINDOW_UPDATE and f[2] == sid]
            release.set()
            f = client.read_until(lambda f: f[0] == WINDOW_UPDATE and f[2] == sid)
            assert f is not None
            client.send(h2util.data(sid, b"z", end_stream=True))
            assert client.response(sid).body == b"65536"
        finally:
            release.set()
            client.close()


# -- defences, from the wire -------------------------------------------------------------

def blocked_app(release):
    def app(scope, receive, send):
        yield pagi_ref.to_thread(release.wait, 10)
        yield send({"type": "http.response.start", "status": 200})
        yield send({"type": "http.response.body", "body": b"ok"})
    return app


def test_concurrent_stream_limit_refuses_streams():
    release = threading.Event()
    with serve(blocked_app(release), h2_max_concurrent_streams=2, **H2) as srv:
        client = H2Client(srv.port)
        try:
            a, b, c = client.request(), client.request(), client.request()
            assert client.response(c).reset == pagi_ref.H2_REFUSED_STREAM
            assert client.server_settings[3] == 2
            release.set()
            assert client.response(a).status == 200 and client.response(b).status == 200
        finally:
            release.set()
            client.close()


def test_rapid_reset_gets_goaway_enhance_your_calm():
    with serve(scope_app, h2_max_concurrent_streams=5, **H2) as srv:
        client = H2Client(srv.port)
        try:
            wire = b""
            for i in range(12):
                sid = 2 * i + 1
                wire += headers(sid, request_fields(), end_stream=False,
                                encoder=client.encoder) + rst_stream(sid)
            client.send(wire)
            assert client.read_to_goaway()[1] == pagi_ref.H2_ENHANCE_YOUR_CALM
        finally:
            client.close()


def test_ping_flood_gets_goaway():
    with serve(scope_app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            client.send(ping() * (pagi_ref._H2_FLOOD_BUDGET + 5))
            assert client.read_to_goaway()[1] == pagi_ref.H2_ENHANCE_YOUR_CALM
        finally:
            client.close()


def test_settings_flood_gets_goaway():
    with serve(scope_app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            client.send(h2util.settings((4, 65535)) * (pagi_ref._H2_FLOOD_BUDGET + 5))
            assert client.read_to_goaway()[1] == pagi_ref.H2_ENHANCE_YOUR_CALM
        finally:
            client.close()


def test_continuation_flood_gets_goaway():
    with serve(scope_app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            block = client.encoder.encode(request_fields())
            client.send(frame(HEADERS, 0, 1, block)
                        + frame(CONTINUATION, 0, 1, b"") * (pagi_ref._H2_BLOCK_FRAMES + 1))
            assert client.read_to_goaway()[1] == pagi_ref.H2_ENHANCE_YOUR_CALM
        finally:
            client.close()


def test_empty_data_flood_gets_goaway():
    release = threading.Event()
    with serve(blocked_app(release), **H2) as srv:
        client = H2Client(srv.port)
        try:
            client.send(headers(1, request_fields("POST"), end_stream=False,
                                encoder=client.encoder)
                        + h2util.data(1, b"") * (pagi_ref._H2_FLOOD_BUDGET + 5))
            assert client.read_to_goaway()[1] == pagi_ref.H2_ENHANCE_YOUR_CALM
        finally:
            release.set()
            client.close()


def test_protocol_error_closes_the_connection_with_goaway():
    with serve(scope_app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            client.send(h2util.data(1, b"x"))          # DATA on an idle stream
            assert client.read_to_goaway()[1] == pagi_ref.H2_PROTOCOL_ERROR
            assert client.read_frame() is None        # then the server closes
        finally:
            client.close()


def test_shutdown_sends_goaway_and_lets_streams_finish():
    release = threading.Event()
    with serve(blocked_app(release), **H2) as srv:
        client = H2Client(srv.port)
        try:
            sid = client.request()
            client.send(ping(b"barrier!"))
            client.read_until(lambda f: f[0] == PING and f[1] & ACK)
            srv.server.stop(timeout=10)
            last, code = client.read_to_goaway()
            assert (last, code) == (sid, 0)
            release.set()
            assert client.response(sid).status == 200
        finally:
            release.set()
            client.close()


def test_client_goaway_lets_open_streams_finish_then_closes():
    release = threading.Event()
    with serve(blocked_app(release), **H2) as srv:
        client = H2Client(srv.port)
        try:
            sid = client.request()
            client.send(h2util.goaway(0, 0))
            client.send(ping(b"barrier!"))
            client.read_until(lambda f: f[0] == PING and f[1] & ACK)
            release.set()
            assert client.response(sid).status == 200
            assert client.read_frame() is None        # then the server closes
        finally:
            release.set()
            client.close()


def test_idle_http2_connection_is_evicted_for_a_new_one():
    with serve(scope_app, max_connections=1, **H2) as srv:
        first = H2Client(srv.port)
        try:
            assert first.response(first.request()).status == 200
            wait_until(lambda: srv.server.idle)        # between streams: idle
            second = H2Client(srv.port)
            try:
                assert first.read_to_goaway() == (1, 0)
                assert second.response(second.request()).status == 200
            finally:
                second.close()
        finally:
            first.close()


def test_shutdown_ends_an_event_stream_with_sse_disconnect():
    seen = queue.Queue()

    def app(scope, receive, send):
        yield send({"type": "sse.start"})
        yield send({"type": "sse.send", "data": "first"})
        event = yield receive()
        while event["type"] == "sse.request":
            event = yield receive()
        seen.put((event["type"], event.get("reason")))

    with serve(app, **H2) as srv:
        client = H2Client(srv.port)
        try:
            sid = client.request(extra=[(b"accept", b"text/event-stream")])
            client.read_until(lambda f: f[0] == DATA and f[2] == sid and f[3])
            srv.server.stop(timeout=10)
            resp = client.response(sid)
            assert resp.ended and resp.body == b"data: first\n\n"
            assert seen.get(timeout=10) == ("sse.disconnect", "server_shutdown")
            assert client.goaway == (sid, 0)
        finally:
            client.close()


# -- choosing the protocol -----------------------------------------------------------------

def test_http11_on_the_same_port():
    with serve(scope_app, **H2) as srv:
        client = Client(("127.0.0.1", srv.port))
        try:
            client.send(build_request("GET", "/h1"))
            resp = client.reader.read_response()
        finally:
            client.close()
    assert resp.status == 200 and json.loads(resp.body)["http_version"] == "1.1"


def test_upgrade_h2c_is_not_offered():
    """RFC 9113 §3.1 deprecates Upgrade: h2c; the request is served as HTTP/1.1."""
    with serve(scope_app, **H2) as srv:
        client = Client(("127.0.0.1", srv.port))
        try:
            client.send(build_request("GET", "/up", headers=[
                ("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"),
                ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")]))
            resp = client.reader.read_response()
        finally:
            client.close()
    assert resp.status == 200 and json.loads(resp.body)["http_version"] == "1.1"


def test_without_http2_the_preface_is_http11_505():
    with serve(scope_app, http2=False) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        try:
            sock.sendall(h2util.PREFACE)
            data = sock.recv(4096)
        finally:
            sock.close()
    assert data.startswith(b"HTTP/1.1 505 ")


def test_preface_byte_by_byte_is_http2():
    with serve(scope_app, **H2) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        try:
            for b in h2util.client_start():
                sock.sendall(bytes([b]))
            first = sock.recv(9)
        finally:
            sock.close()
    assert first[3] == SETTINGS


# -- TLS (ALPN h2) and interop -----------------------------------------------------------

from test_tls import certs     # noqa: E402,F401 -- the module's certificates, a fixture


@needs_openssl
def test_h2_over_tls_by_alpn(certs):
    config = dict(ssl_certfile=certs["server.pem"], ssl_keyfile=certs["server.key"], **H2)
    with serve(scope_app, **config) as srv:
        context = h2util.tls_client_context(certs["ca.pem"])
        client = H2Client(srv.port, tls_context=context)
        try:
            assert client.sock.selected_alpn_protocol() == "h2"
            info = json.loads(client.response(client.request()).body)
        finally:
            client.close()
    assert info["http_version"] == "2" and info["scheme"] == "https"


@needs_openssl
def test_tls_without_http2_offers_only_http11(certs):
    config = dict(ssl_certfile=certs["server.pem"], ssl_keyfile=certs["server.key"])
    with serve(scope_app, http2=False, **config) as srv:
        context = h2util.tls_client_context(certs["ca.pem"])
        context.set_alpn_protocols(["h2", "http/1.1"])
        sock = context.wrap_socket(socket.create_connection(("127.0.0.1", srv.port)),
                                   server_hostname="localhost")
        try:
            assert sock.selected_alpn_protocol() == "http/1.1"
        finally:
            sock.close()


def curl(*args):
    return subprocess.run(["curl", "-sS", "--max-time", "20"] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)


def _choice_took(srv, prefix):
    """The connection is still being chosen and has taken ``prefix``."""
    return any(getattr(c, "taken", None) == prefix for c in list(srv.server.connections))


def test_a_first_P_alone_is_taken_and_given_to_http11():
    """"P" could be POST, PUT or the preface: the choice takes it (a peeked
    byte would keep the socket readable, a loop spinning on it) and waits
    for the next bytes; HTTP/1.1 then reads the whole request."""
    with serve(scope_app, **H2) as srv, socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(10)
        s.sendall(b"P")
        assert wait_until(lambda: _choice_took(srv, b"P"))
        s.sendall(b"OST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n"
                  b"Connection: close\r\n\r\nok")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    info = json.loads(body)
    assert info["method"] == "POST" and info["body"] == "ok" and info["http_version"] == "1.1"


def test_a_first_PR_alone_is_taken_and_given_to_http2():
    with serve(scope_app, **H2) as srv, socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(10)
        s.sendall(h2util.PREFACE[:2])
        assert wait_until(lambda: _choice_took(srv, b"PR"))
        encoder = pagi_ref.HPACKEncoder()
        s.sendall(h2util.PREFACE[2:] + h2util.settings()
                  + h2util.headers(1, h2util.request_fields(path="/pr"), encoder=encoder))
        buffer = bytearray()
        frames = []
        while not any(f[0] == DATA and f[2] == 1 and f[1] & 0x1 for f in frames):
            chunk = s.recv(65536)
            assert chunk, frames
            buffer += chunk
            frames += h2util.parse_frames(buffer)
    body = b"".join(f[3] for f in frames if f[0] == DATA and f[2] == 1)
    info = json.loads(body)
    assert info["http_version"] == "2" and info["path"] == "/pr"


@needs_curl
def test_curl_prior_knowledge():
    with serve(scope_app, **H2) as srv:
        url = "http://127.0.0.1:%d/c?q=1" % srv.port
        out = curl("--http2-prior-knowledge", "-d", "posted", url)
        head = curl("--http2-prior-knowledge", "-I", url)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["http_version"] == "2" and info["method"] == "POST"
    assert info["body"] == "posted" and info["query_string"] == "q=1"
    assert head.stdout.startswith(b"HTTP/2 200")


@needs_openssl
@needs_curl
def test_curl_http2_over_tls(certs):
    config = dict(ssl_certfile=certs["server.pem"], ssl_keyfile=certs["server.key"], **H2)
    with serve(scope_app, **config) as srv:
        out = curl("--http2", "--cacert", certs["ca.pem"], "-w", "\n%{http_version}",
                   "https://localhost:%d/tls" % srv.port)
    assert out.returncode == 0, out.stderr
    body, version = out.stdout.rsplit(b"\n", 1)
    assert version == b"2" and json.loads(body)["scheme"] == "https"


@pytest.mark.skipif(shutil.which("nghttp") is None, reason="nghttp (nghttp2-client)")
def test_nghttp_with_trailers():
    def app(scope, receive, send):
        yield from body_of(receive)
        yield send({"type": "http.response.start", "status": 200, "trailers": 1})
        yield send({"type": "http.response.body", "body": b"nghttp body\n"})
        yield send({"type": "http.response.trailers", "headers": [(b"x-trailer", b"yes")]})

    with serve(app, **H2) as srv:
        out = subprocess.run(["nghttp", "-v", "-t", "20", "http://127.0.0.1:%d/n" % srv.port],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert out.returncode == 0, out.stderr
    assert b"nghttp body" in out.stdout and b"x-trailer: yes" in out.stdout


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client)")
def test_h2load_multiplexed():
    def app(scope, receive, send):
        yield from body_of(receive)
        yield send({"type": "http.response.start", "status": 200})
        yield send({"type": "http.response.body", "body": b"hello"})

    with serve(app, **H2) as srv:
        out = subprocess.run(["h2load", "-n", "200", "-c", "2", "-m", "10",
                              "http://127.0.0.1:%d/" % srv.port],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert out.returncode == 0, out.stderr
    assert b"200 succeeded, 0 failed" in out.stdout
