"""Sections 5 and 6, flow control (issue 3): the counted outgoing buffer,
watermark-suspended send(), pagi.transport and its callbacks, file bodies,
fullflush, inbound backpressure (max_receive_queue), and a client that
leaves while a send is suspended.

PAGI www spec, "Transport Flow Control"; docs/spec.md section 4
(TRANSPORT-1..11), HTTP-RESP-16..18, HTTP-REQ-7, CONN-12, CORE-EXT-2;
docs/flow-control.md.

Every test talks to a real server over loopback sockets.  The server runs in
a thread of this process, so the applications record what they observe in
lists shared with the test; the test waits on threading.Events the
application sets (bounded), never on sleep().  The only sleeps are pacing:
a client that reads slowly, an application that receives slowly.
"""
import hashlib
import importlib.util
import os
import select
import socket
import threading
import time
import tracemalloc

import pytest

import pagi_ref
from conftest import ROOT, serve
from spec_wire import Reader, connect, exchange
from apputil import body, req, respond, start, wait_until


def _load_example(name):
    """examples/NAME.py, loaded from its path as the command line would."""
    path = os.path.join(ROOT, "examples", name + ".py")
    spec = importlib.util.spec_from_file_location("pagi_example_" + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ticker = _load_example("ticker")

CHUNK = 65536
MiB = 1 << 20


def pattern(i):
    """64 KiB that differ from chunk to chunk, so a lost, repeated or
    reordered chunk changes the digest."""
    return (b"%015d\n" % i) * (CHUNK // 16)


def small_rcvbuf_connect(port, rcvbuf=16384, timeout=10.0):
    """A client socket whose receive buffer is set before connect (so the
    window it advertises is small from the SYN on)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def read_head(sock):
    """(head bytes, body bytes already read past it)."""
    r = Reader(sock)
    head = r.read_until(b"\r\n\r\n")
    assert head.endswith(b"\r\n\r\n"), head
    return head, r.buf


def header(head, name):
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name:
            return v.strip()
    return None


# -- the counted buffer and watermark-suspended send ----------------------------

def test_slow_reader_of_50_mib_bounded_buffer_suspended_send_alternating_edges():
    n_chunks = 800                      # 50 MiB
    total = n_chunks * CHUNK
    high, low = 65536, 16384            # the defaults
    peaks = []          # buffered_amount() right after send() returned
    resumed = []        # buffered_amount() after the send Future resolved
    edges = []          # 'H' / 'D' from on_high_water / on_drain
    edge_levels = []    # (edge, buffered_amount() inside the callback)
    suspended = [0]     # send Futures that were pending when returned
    failure = []
    done = threading.Event()

    def app(scope, receive, send):
        try:
            t = scope["pagi.transport"]

            def on_high():
                edges.append("H")
                edge_levels.append(("H", t.buffered_amount()))

            def on_drain():
                edges.append("D")
                edge_levels.append(("D", t.buffered_amount()))

            t.on_high_water(on_high)
            t.on_drain(on_drain)
            yield start(send, 200, [(b"content-type", b"application/octet-stream"),
                                    (b"content-length", b"%d" % total)])
            for i in range(n_chunks):
                f = send({"type": "http.response.body", "body": pattern(i),
                          "more": 1 if i < n_chunks - 1 else 0})
                peaks.append(t.buffered_amount())
                if not f.done():
                    suspended[0] += 1
                yield f
                resumed.append(t.buffered_amount())
        except BaseException as exc:
            failure.append(exc)
            raise
        finally:
            done.set()

    digest = hashlib.sha256()
    expected = hashlib.sha256()
    for i in range(n_chunks):
        expected.update(pattern(i))

    t0 = time.monotonic()
    with serve(app) as srv:
        s = small_rcvbuf_connect(srv.port)
        try:
            s.sendall(req("/", headers=[("Connection", "close")]))
            head, rest = read_head(s)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert header(head, b"content-length") == b"%d" % total
            digest.update(rest)
            got = len(rest)
            buf = bytearray(65536)
            view = memoryview(buf)
            # Paced reader: about 256 KiB, then a 2 ms pause, until the end.
            while got < total:
                burst = 0
                while burst < 262144 and got < total:
                    n = s.recv_into(view)
                    if not n:
                        break
                    digest.update(view[:n])
                    got += n
                    burst += n
                if not n:
                    break
                time.sleep(0.002)   # pacing: the reader must be slow so send() suspends
        finally:
            s.close()
        assert done.wait(10)
        assert not srv.errors, srv.errors
    elapsed = time.monotonic() - t0

    assert not failure, failure
    assert got == total, (got, total)
    assert digest.hexdigest() == expected.hexdigest(), "the body arrived altered"
    assert len(peaks) == n_chunks
    # TRANSPORT-4: never more than the high mark plus one event.
    assert max(peaks) <= high + CHUNK, max(peaks)
    assert max(resumed) <= high + CHUNK, max(resumed)
    # The reader was slow: send() had to wait, and more than once.
    assert suspended[0] >= 1, "send() was never suspended for a slow reader"
    # TRANSPORT-7: H, D, H, D, ... starting with H, each once per crossing.
    assert edges and edges[0] == "H", edges[:10]
    assert all(a != b for a, b in zip(edges, edges[1:])), edges
    # Each crossing up suspends exactly the send that crossed.
    assert edges.count("H") == suspended[0], (edges.count("H"), suspended[0])
    # The levels seen inside the callbacks are on the right side of the marks.
    for edge, level in edge_levels:
        if edge == "H":
            assert level >= high, edge_levels[:10]
        else:
            assert level < low, edge_levels[:10]
    assert elapsed < 20, "the paced 50 MiB read took %.1f s" % elapsed


def test_callbacks_at_once_not_on_registration_in_order_and_configured_marks():
    high, low = 100000, 30000
    trace = []
    seen = {}
    app_suspended = threading.Event()
    done = threading.Event()
    failure = []

    def app(scope, receive, send):
        try:
            t = scope["pagi.transport"]
            seen["marks"] = (t.high_water_mark(), t.low_water_mark())
            seen["initial"] = t.buffered_amount()
            # Registered while the buffer is empty: must not run now.
            t.on_drain(lambda: trace.append("D-a"))
            t.on_high_water(lambda: trace.append("H-a"))
            t.on_high_water(lambda: trace.append("H-b"))
            t.on_drain(lambda: trace.append("D-b"))
            seen["after_registration"] = list(trace)
            yield start(send, 200, [(b"content-type", b"application/octet-stream")])
            yield body(send, b"small", more=True)
            seen["after_small_send"] = list(trace)
            # Fill until a send is suspended (the client does not read yet).
            f = None
            for i in range(4000):
                f = send({"type": "http.response.body", "body": pattern(i), "more": 1})
                if not f.done():
                    break
                yield f
            seen["sent_chunks"] = i + 1
            seen["suspended"] = not f.done()
            seen["level_when_suspended"] = t.buffered_amount()
            trace.append("--")
            # Already above the mark: runs during the registration call.
            t.on_high_water(lambda: trace.append("H-late"))
            seen["late_ran_at_once"] = trace[-1] == "H-late"
            t.on_drain(lambda: trace.append("D-late"))
            app_suspended.set()
            yield f
            seen["after_resume"] = list(trace)
            seen["level_after_resume"] = t.buffered_amount()
            yield body(send, b"end")
        except BaseException as exc:
            failure.append(exc)
            raise
        finally:
            done.set()

    with serve(app, write_high_watermark=high, write_low_watermark=low) as srv:
        s = small_rcvbuf_connect(srv.port, rcvbuf=8192)
        try:
            s.sendall(req("/", headers=[("Connection", "close")]))
            assert app_suspended.wait(10), (failure, seen)
            data = Reader(s).read_all()
        finally:
            s.close()
        assert done.wait(5)
        assert not srv.errors, srv.errors
    assert not failure, failure
    assert data.startswith(b"HTTP/1.1 200")
    assert data.endswith(b"3\r\nend\r\n0\r\n\r\n")
    assert seen["marks"] == (high, low)
    assert seen["initial"] == 0
    assert seen["after_registration"] == []
    assert seen["after_small_send"] == []
    assert seen["suspended"], seen
    assert seen["level_when_suspended"] >= high
    assert seen["late_ran_at_once"], trace
    # H callbacks in registration order at the crossing, then the late one at
    # once; at the drain the D callbacks in registration order, once each.
    assert seen["after_resume"] == ["H-a", "H-b", "--", "H-late", "D-a", "D-b", "D-late"], \
        seen["after_resume"]
    assert seen["level_after_resume"] < low


def test_callbacks_of_a_finished_request_do_not_run_for_the_next_one():
    # pagi.transport is about "bytes queued for the current (streaming)
    # response": what a request registered must not fire for a later request
    # on the same keep-alive connection (nor pile up there).
    trace = []
    suspended = threading.Event()
    done = threading.Event()

    def app(scope, receive, send):
        t = scope["pagi.transport"]
        name = scope["path"]
        t.on_high_water(lambda: trace.append("H" + name))
        t.on_drain(lambda: trace.append("D" + name))
        if name != "/big":
            yield from respond(send, 200, b"small")
            return
        yield start(send, 200, [(b"content-type", b"application/octet-stream")])
        for i in range(4000):
            f = send({"type": "http.response.body", "body": pattern(i), "more": 1})
            if not f.done():
                suspended.set()
                yield f
                break
            yield f
        yield body(send, b"")
        done.set()

    with serve(app) as srv:
        s = small_rcvbuf_connect(srv.port, rcvbuf=8192)
        try:
            r = Reader(s)
            for path in ("/a", "/b"):
                s.sendall(req(path))
                assert r.read_response().body == b"small"
            s.sendall(req("/big", headers=[("Connection", "close")]))
            assert suspended.wait(10)
            resp = r.read_response()
        finally:
            s.close()
        assert done.wait(5)
    assert resp.status == 200 and resp.complete
    assert trace == ["H/big", "D/big"], trace


def test_default_marks_and_transport_on_every_http_scope():
    seen = []

    def app(scope, receive, send):
        t = scope["pagi.transport"]
        seen.append((t.high_water_mark(), t.low_water_mark(), t.buffered_amount()))
        yield from respond(send, 200, b"ok")

    with serve(app) as srv:
        with connect(srv.port) as s:
            r = Reader(s)
            for _ in range(2):
                s.sendall(req("/"))
                assert r.read_response().body == b"ok"
    assert seen == [(65536, 16384, 0)] * 2


def test_low_above_high_is_a_config_error_naming_both():
    with pytest.raises(pagi_ref.ConfigError) as info:
        pagi_ref.Config(write_high_watermark=1000, write_low_watermark=2000)
    assert "write_low_watermark" in str(info.value)
    assert "write_high_watermark" in str(info.value)


def test_drain_never_fires_for_a_response_that_never_reached_the_mark():
    trace = []
    done = threading.Event()

    def app(scope, receive, send):
        t = scope["pagi.transport"]
        t.on_drain(lambda: trace.append("D"))
        t.on_high_water(lambda: trace.append("H"))
        yield start(send, 200)
        for _ in range(10):
            f = send({"type": "http.response.body", "body": b"x" * 1000, "more": 1})
            trace.append("done" if f.done() else "pending")
            yield f
        yield body(send, b"")
        done.set()

    with serve(app) as srv:
        with connect(srv.port) as s:
            s.sendall(req("/", headers=[("Connection", "close")]))
            resp = Reader(s).read_response()
        assert done.wait(5)
    assert resp.body == b"x" * 10000
    assert trace == ["done"] * 10


# -- file bodies -------------------------------------------------------------------

@pytest.fixture
def data_file(tmp_path):
    data = b"".join(b"%07d|" % i for i in range(60000))      # 480 000 bytes
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return str(path), data


def file_app(path, results):
    """Routes exercising file and fh bodies; `results` gets what the app saw."""

    def app(scope, receive, send):
        route = scope["path"]
        qs = dict(p.split("=") for p in scope["query_string"].decode().split("&") if p)
        if route == "/file":
            event = {"type": "http.response.body", "file": path}
            for k in ("offset", "length"):
                if k in qs:
                    event[k] = int(qs[k])
            yield start(send, 200, [(b"content-type", b"application/octet-stream")])
            f = send(event)
            yield f
            results.append((route, "sent"))
        elif route == "/fh":
            fh = open(path, "rb")
            event = {"type": "http.response.body", "fh": fh}
            for k in ("offset", "length"):
                if k in qs:
                    event[k] = int(qs[k])
            yield start(send, 200)
            yield send(event)
            # The application owns fh: the server must not have closed it.
            results.append((route, "closed-by-server" if fh.closed else "open"))
            fh.close()
        elif route == "/fh-bytesio":
            # Not a real file (no descriptor): the read-and-send fallback.
            import io
            fh = io.BytesIO(open(path, "rb").read())
            event = {"type": "http.response.body", "fh": fh}
            for k in ("offset", "length"):
                if k in qs:
                    event[k] = int(qs[k])
            yield start(send, 200)
            yield send(event)
            results.append((route, "closed-by-server" if fh.closed else "open"))
        elif route == "/chunked":
            # The head goes out with the first body event, before the file:
            # no Content-Length, so the file is one chunk of a chunked body.
            yield start(send, 200)
            yield body(send, b"prefix-", more=True)
            yield send({"type": "http.response.body", "file": path,
                        "offset": int(qs["offset"]), "length": int(qs["length"])})
        elif route == "/trailers":
            yield start(send, 200, trailers=True)
            yield send({"type": "http.response.body", "file": path, "length": 100})
            yield send({"type": "http.response.trailers",
                        "headers": [(b"x-digest", b"abc")]})
        elif route == "/missing":
            yield start(send, 200, [(b"content-type", b"text/plain")])
            f = send({"type": "http.response.body", "file": path + ".does-not-exist"})
            results.append((route, "done" if f.done() else "pending",
                            type(f.exception()).__name__ if f.done() else None))
            try:
                yield f
                name = "no exception"
            except Exception as exc:
                name = type(exc).__name__
            # The head was not written yet: the response is still ours to send.
            yield body(send, name.encode())
        elif route == "/invalid":
            fh = open(path, "rb")
            closed = open(path, "rb")
            closed.close()
            cases = [
                ("negative offset", {"file": path, "offset": -1}),
                ("negative length", {"file": path, "length": -1}),
                ("negative both", {"file": path, "offset": -5, "length": -5}),
                ("fh negative offset", {"fh": fh, "offset": -1}),
                ("body and file", {"body": b"x", "file": path}),
                ("body and fh", {"body": b"x", "fh": fh}),
                ("file and fh", {"file": path, "fh": fh}),
                ("closed fh", {"fh": closed}),
            ]
            yield start(send, 200, [(b"content-type", b"text/plain")])
            lines = []
            for name, fields in cases:
                event = dict(fields, type="http.response.body")
                try:
                    f = send(event)
                except Exception as exc:   # send() must return a failed Future
                    lines.append("%s: raised %s" % (name, type(exc).__name__))
                    continue
                if not f.done():
                    lines.append("%s: pending" % name)
                    continue
                exc = f.exception()
                lines.append("%s: %s %s %s" % (
                    name, type(exc).__name__, isinstance(exc, ValueError),
                    isinstance(exc, pagi_ref.EventError)))
            fh.close()
            yield body(send, "\n".join(lines).encode())
        else:
            yield from respond(send, 404, b"no route")

    return app


def open_descriptors_of(path):
    """Descriptors of this process open on `path` (Linux /proc; else [])."""
    fds = []
    if not os.path.isdir("/proc/self/fd"):
        return fds
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/" + fd) == path:
                fds.append(int(fd))
        except OSError:
            pass
    return fds


def get_on(sock, reader, target, method="GET"):
    sock.sendall(req(target, method=method))
    return reader.read_response(head_request=(method == "HEAD"))


def test_file_responses_whole_range_past_end_fh_and_keepalive(data_file):
    path, data = data_file
    n = len(data)
    results = []
    with serve(file_app(path, results)) as srv:
        with connect(srv.port) as s:
            r = Reader(s)
            # Whole file: the server knows its size.
            resp = get_on(s, r, "/file")
            assert resp.status == 200 and resp.complete
            assert resp.body == data
            assert resp.header("content-length") == b"%d" % n
            # offset and length: a range.
            resp = get_on(s, r, "/file?offset=1000&length=5000")
            assert resp.body == data[1000:6000]
            assert resp.header("content-length") == b"5000"
            # offset alone: to the end.
            resp = get_on(s, r, "/file?offset=%d" % (n - 100))
            assert resp.body == data[-100:]
            # length past the end: what there is.
            resp = get_on(s, r, "/file?offset=%d&length=1000" % (n - 10))
            assert resp.body == data[-10:]
            # offset past the end: zero bytes, a valid response.
            resp = get_on(s, r, "/file?offset=%d" % (n + 10))
            assert resp.status == 200 and resp.body == b"" and resp.complete
            assert resp.header("content-length") == b"0"
            # length 0
            resp = get_on(s, r, "/file?offset=5&length=0")
            assert resp.status == 200 and resp.body == b""
            # fh, whole and a range; the server leaves it open.
            resp = get_on(s, r, "/fh")
            assert resp.body == data
            resp = get_on(s, r, "/fh?offset=7&length=33")
            assert resp.body == data[7:40]
            # An fh without a descriptor goes out by reads.
            resp = get_on(s, r, "/fh-bytesio")
            assert resp.body == data
            resp = get_on(s, r, "/fh-bytesio?offset=%d&length=70000" % (n - 200000))
            assert resp.body == data[n - 200000:n - 130000]
            # The connection is still in step after all of these.
            resp = get_on(s, r, "/nothing")
            assert resp.status == 404 and resp.body == b"no route"
            # The server closed every file it opened for "file".
            assert open_descriptors_of(path) == []
        assert not srv.errors, srv.errors
    assert results.count(("/file", "sent")) == 6
    assert results.count(("/fh", "open")) == 2, results
    assert results.count(("/fh-bytesio", "open")) == 2, results


def test_file_after_a_streamed_chunk_is_chunked_and_trailers_follow_it(data_file):
    path, data = data_file
    with serve(file_app(path, [])) as srv:
        with connect(srv.port) as s:
            r = Reader(s)
            resp = get_on(s, r, "/chunked?offset=100&length=70000")
            assert resp.status == 200 and resp.chunked and resp.complete
            assert resp.header("content-length") is None
            assert resp.body == b"prefix-" + data[100:70100]
            resp = get_on(s, r, "/trailers")
            assert resp.chunked and resp.complete
            assert resp.body == data[:100]
            assert resp.trailers == [(b"x-digest", b"abc")]
            resp = get_on(s, r, "/nothing")
            assert resp.status == 404
        assert not srv.errors, srv.errors


def test_file_response_to_head_has_no_body_and_keeps_the_connection(data_file):
    path, data = data_file
    with serve(file_app(path, [])) as srv:
        with connect(srv.port) as s:
            r = Reader(s)
            resp = get_on(s, r, "/file", method="HEAD")
            assert resp.status == 200
            assert resp.header("content-length") in (None, b"%d" % len(data))
            # If any file byte had been written, this would not parse.
            resp = get_on(s, r, "/file?length=10")
            assert resp.status == 200 and resp.body == data[:10]
        assert not srv.errors, srv.errors


def test_missing_file_fails_the_send_future_with_file_not_found(data_file):
    path, _ = data_file
    results = []
    with serve(file_app(path, results)) as srv:
        with connect(srv.port) as s:
            r = Reader(s)
            resp = get_on(s, r, "/missing")
            assert resp.status == 200
            assert resp.body == b"FileNotFoundError"
            resp = get_on(s, r, "/nothing")
            assert resp.status == 404
    assert results == [("/missing", "done", "FileNotFoundError")]


def test_invalid_file_events_fail_with_value_error(data_file):
    path, _ = data_file
    with serve(file_app(path, [])) as srv:
        with connect(srv.port) as s:
            r = Reader(s)
            resp = get_on(s, r, "/invalid")
            assert resp.status == 200
            lines = resp.body.decode().split("\n")
            # After all of the failures, the response is still intact.
            resp = get_on(s, r, "/file?length=3")
            assert resp.status == 200 and len(resp.body) == 3
    for line in lines:
        assert line.endswith(": EventError True True"), lines
    assert len(lines) == 8


def test_200_mib_sparse_file_is_streamed_not_read_into_memory(tmp_path):
    size = 200 * MiB
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, mark in ((0, b"start"), (size // 2, b"middle"), (size - 3, b"end")):
            f.seek(offset)
            f.write(mark)
    expected = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            expected.update(block)

    def app(scope, receive, send):
        yield start(send, 200, [(b"content-type", b"application/octet-stream"),
                                (b"content-length", b"%d" % size)])
        yield send({"type": "http.response.body", "file": str(path)})

    digest = hashlib.sha256()
    buf = bytearray(MiB)
    view = memoryview(buf)
    got = 0
    with serve(app) as srv:
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            with connect(srv.port, timeout=20) as s:
                s.sendall(req("/", headers=[("Connection", "close")]))
                head, rest = read_head(s)
                digest.update(rest)
                got = len(rest)
                while True:
                    n = s.recv_into(view)
                    if not n:
                        break
                    digest.update(view[:n])
                    got += n
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert not srv.errors, srv.errors
    assert head.startswith(b"HTTP/1.1 200")
    assert got == size
    assert digest.hexdigest() == expected.hexdigest()
    assert peak < 8 * MiB, "traced peak %.1f MiB while serving a 200 MiB file" % (peak / MiB)


# -- fullflush -------------------------------------------------------------------

def test_fullflush_is_advertised_and_writes_the_head_before_any_body():
    go = threading.Event()          # set by the test once it has read the head
    seen = {}
    done = threading.Event()

    def app(scope, receive, send):
        seen["extensions"] = scope["extensions"]
        try:
            yield send({"type": "http.fullflush"})
            seen["before_start"] = "accepted"
        except ValueError as exc:
            seen["before_start"] = type(exc).__name__
        yield start(send, 200, [(b"content-type", b"text/plain")])
        f = send({"type": "http.fullflush"})
        yield f
        seen["flushed_buffer"] = scope["pagi.transport"].buffered_amount()
        # Wait, off the loop, until the client says it has the head.
        seen["go"] = yield pagi_ref.to_thread(go.wait, 10)
        yield body(send, b"after", more=True)
        yield send({"type": "http.fullflush"})
        yield body(send, b"")
        done.set()

    with serve(app) as srv:
        with connect(srv.port, timeout=5) as s:
            s.sendall(req("/", headers=[("Connection", "close")]))
            r = Reader(s)
            try:
                # The app is blocked until go is set: only fullflush can have
                # put the head on the wire.
                head = r.read_until(b"\r\n\r\n")
            except socket.timeout:
                head = None
            early_body = r.buf
            go.set()
            rest = r.read_all()
        assert done.wait(5)
        assert not srv.errors, srv.errors
    assert seen["extensions"].get("fullflush") == {}
    assert seen["before_start"] == "EventError"
    assert head is not None, "the head did not reach the client after http.fullflush"
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
    assert early_body == b""
    assert b"transfer-encoding: chunked" in head.lower()
    assert seen["flushed_buffer"] == 0 and seen["go"] is True
    assert rest == b"5\r\nafter\r\n0\r\n\r\n"


# -- inbound backpressure ------------------------------------------------------------

def test_slow_app_upload_keeps_queue_within_max_receive_queue_and_throttles_client():
    # The 50 MiB: at one event (up to 64 KiB) per 10 ms, about 8 s.
    # PAGI_REF_QUICK_UPLOAD=1 uploads 16 MiB instead (about 3 s).
    total = (16 if os.environ.get("PAGI_REF_QUICK_UPLOAD") else 50) * MiB
    limit = 4
    holder = {}
    samples = []            # len(exchange.queue) before each receive and after it
    progress = []           # (monotonic time, body bytes the app has received)
    result = {}
    done = threading.Event()

    def app(scope, receive, send):
        server = holder["server"]
        ex = next(c.exchange for c in list(server.connections)
                  if c.exchange is not None and c.exchange.state is scope["pagi.connection"])
        got = 0
        digest = hashlib.sha256()
        events = 0
        while True:
            samples.append(len(ex.queue))
            event = yield receive()
            samples.append(len(ex.queue))
            if event["type"] != "http.request":
                result["unexpected"] = event
                break
            events += 1
            digest.update(event["body"])
            got += len(event["body"])
            progress.append((time.monotonic(), got))
            if not event["more"]:
                break
            yield pagi_ref.sleep(0.01)      # the app's pace: one event per 10 ms
        result.update(got=got, events=events, digest=digest.hexdigest())
        yield from respond(send, 200, b"%d" % got)
        done.set()

    block = bytes(range(256)) * 4096        # 1 MiB
    expected = hashlib.sha256()
    for _ in range(total // MiB):
        expected.update(block)

    with serve(app, max_receive_queue=limit, max_body_size=0) as srv:
        holder["server"] = srv.server
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A fixed, small send buffer on the client: what the client has sent
        # and the app has not taken is then mostly the server's doing.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        s.settimeout(30)
        try:
            s.connect(("127.0.0.1", srv.port))
            s.sendall(req("/upload", method="POST",
                          headers=[("Content-Length", str(total)), ("Connection", "close")]))
            t0 = time.monotonic()
            for _ in range(total // MiB):
                s.sendall(block)
            sent_at = time.monotonic()
            taken = max([g for t, g in progress if t <= sent_at] or [0])
            # What is left (socket buffers, parser, queue: well under 2 MiB)
            # takes the app well under a second at its pace.
            s.settimeout(5)
            try:
                resp = Reader(s).read_response()
            except socket.timeout:
                resp = None
        finally:
            s.close()
        finished = done.wait(1)
        assert not srv.errors, srv.errors
    assert resp is not None and finished, (
        "no response 5 s after the upload ended: the app had %d of %d bytes in %d "
        "events, all more=1, and waited for the final event; then %r"
        % (progress[-1][1] if progress else 0, total, len(progress), result.get("unexpected")))
    assert resp.status == 200 and resp.body == b"%d" % total
    assert "unexpected" not in result, result
    assert result["got"] == total and result["digest"] == expected.hexdigest()
    # HTTP-REQ-7: never more than max_receive_queue events waiting.
    assert max(samples) <= limit, max(samples)
    # The client was held back: when its last sendall returned, the app had
    # already taken nearly all of the body (the rest sits in socket buffers,
    # the parser and the queue -- not in an unbounded server buffer).
    assert total - taken < 2 * MiB, (
        "client finished sending %.1f s in, when the app had %d of %d bytes"
        % (sent_at - t0, taken, total))


# -- a client that leaves while send() is suspended ----------------------------------

@pytest.mark.parametrize("how", ["rst", "close", "half-close-then-close"])
def test_client_leaving_during_a_suspended_send(how):
    seen = {}
    suspended = threading.Event()
    done = threading.Event()
    failure = []

    def app(scope, receive, send):
        try:
            t = scope["pagi.transport"]
            conn = scope["pagi.connection"]
            conn.on_disconnect(lambda reason: seen.setdefault("on_disconnect", reason))
            conn.on_complete(lambda: seen.setdefault("on_complete", True))
            request = yield receive()             # the (empty) GET body
            seen["request"] = (request["type"], request["more"])
            yield start(send, 200, [(b"content-type", b"application/octet-stream")])
            f = None
            for i in range(4000):
                f = send({"type": "http.response.body", "body": pattern(i), "more": 1})
                if not f.done():
                    break
                yield f
            seen["was_pending"] = not f.done()
            seen["buffered_when_suspended"] = t.buffered_amount()
            suspended.set()
            try:
                value = yield f                  # must resolve, not raise
                seen["send_result"] = ("resolved", value)
            except BaseException as exc:
                seen["send_result"] = ("raised", repr(exc))
            seen["buffered_after"] = t.buffered_amount()
            seen["is_connected"] = conn.is_connected()
            seen["reason"] = conn.disconnect_reason()
            event = yield receive()
            seen["receive"] = event
            # A send after the disconnect is a no-op, not an error.
            g = send({"type": "http.response.body", "body": b"x" * CHUNK, "more": 1})
            seen["late_send"] = (g.done(), g.exception() if g.done() else None)
            seen["buffered_end"] = t.buffered_amount()
        except BaseException as exc:
            failure.append(exc)
            raise
        finally:
            done.set()

    with serve(app) as srv:
        s = small_rcvbuf_connect(srv.port, rcvbuf=8192)
        s.sendall(req("/"))
        s.recv(100)                              # the response has begun...
        assert suspended.wait(10), (failure, seen)   # ...and stopped: not reading
        if how == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        elif how == "half-close-then-close":
            s.shutdown(socket.SHUT_WR)
        s.close()
        assert done.wait(10), ("the app's suspended send never resolved", seen)
        errors = srv.errors
    assert not failure, failure
    assert seen["request"] == ("http.request", 0)
    assert seen["was_pending"] and seen["buffered_when_suspended"] >= 65536
    assert seen["send_result"] == ("resolved", None), seen
    assert seen["is_connected"] is False
    assert seen["reason"] in ("client_closed", "write_error"), seen
    assert seen["on_disconnect"] == seen["reason"] and "on_complete" not in seen
    assert seen["receive"] == {"type": "http.disconnect"}, seen
    assert seen["late_send"] == (True, None)
    assert seen["buffered_after"] == 0 and seen["buffered_end"] == 0, seen
    assert not [e for e in errors if "Traceback" in e], errors


def test_client_leaving_during_a_pending_file_send(tmp_path):
    size = 64 * MiB
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.truncate(size)
    seen = {}
    pending = threading.Event()
    done = threading.Event()
    failure = []

    def app(scope, receive, send):
        try:
            t = scope["pagi.transport"]
            conn = scope["pagi.connection"]
            t.on_high_water(lambda: seen.setdefault("high_water", t.buffered_amount()))
            yield start(send, 200, [(b"content-length", b"%d" % size)])
            f = send({"type": "http.response.body", "file": str(path)})
            seen["pending"] = not f.done()
            seen["buffered"] = t.buffered_amount()
            pending.set()
            try:
                value = yield f
                seen["send_result"] = ("resolved", value)
            except BaseException as exc:
                seen["send_result"] = ("raised", repr(exc))
            seen["reason"] = conn.disconnect_reason()
            seen["buffered_after"] = t.buffered_amount()
        except BaseException as exc:
            failure.append(exc)
            raise
        finally:
            done.set()

    with serve(app) as srv:
        s = small_rcvbuf_connect(srv.port, rcvbuf=8192)
        s.sendall(req("/"))
        s.recv(100)
        assert pending.wait(10), (failure, seen)
        s.shutdown(socket.SHUT_WR)
        s.close()
        assert done.wait(10), ("the pending file send never resolved", seen)
        # The server opened the file for "file" and must have closed it.
        assert open_descriptors_of(str(path)) == []
    assert not failure, failure
    assert seen["pending"], seen
    # The unsent part of the file counts against the watermarks.
    assert 65536 <= seen["buffered"] <= size, seen
    assert seen["high_water"] >= 65536, seen
    assert seen["send_result"] == ("resolved", None), seen
    assert seen["reason"] in ("client_closed", "write_error"), seen
    assert seen["buffered_after"] == 0


# -- the backpressure-aware example (examples/ticker.py) ------------------------------

def spy(app, samples, suspended):
    """Middleware: record buffered_amount() after every send the app makes,
    and count sends that were suspended."""

    def wrapped(scope, receive, send):
        t = scope["pagi.transport"]

        def send_spy(event):
            f = send(event)
            samples.append(t.buffered_amount())
            if not f.done():
                suspended.append(event.get("type"))
            return f

        return app(scope, receive, send_spy)

    return wrapped


def test_ticker_example_streams_a_counter():
    samples, suspended = [], []
    with serve(spy(ticker.make_app(ticks=20), samples, suspended)) as srv:
        with connect(srv.port) as s:
            s.sendall(req("/", headers=[("Connection", "close")]))
            resp = Reader(s).read_response()
    assert resp.status == 200 and resp.chunked and resp.complete
    lines = resp.body.decode().splitlines()
    assert lines[-1] == "done 20 skipped 0"
    assert lines[:-1] == ["tick %d skipped 0" % i for i in range(20)]
    assert not suspended


class TransportSpy:
    """pagi.transport, recording what buffered_amount() told the application."""

    def __init__(self, transport, answers):
        self._transport = transport
        self._answers = answers

    def buffered_amount(self):
        value = self._transport.buffered_amount()
        self._answers.append(value)
        return value

    def __getattr__(self, name):
        return getattr(self._transport, name)


def spy_transport(app, answers):
    def wrapped(scope, receive, send):
        scope["pagi.transport"] = TransportSpy(scope["pagi.transport"], answers)
        return app(scope, receive, send)
    return wrapped


def test_ticker_example_skips_ticks_for_a_client_that_does_not_read():
    high = 65536
    samples, suspended, answers = [], [], []
    ticks = 2000
    # 8 KB a tick: 16 MB in all, more than the kernel's socket buffers
    # (a few MiB on loopback) hold for a client that does not read.
    app = ticker.make_app(interval=0.001, ticks=ticks, payload=8000)
    with serve(spy(spy_transport(app, answers), samples, suspended)) as srv:
        s = small_rcvbuf_connect(srv.port, rcvbuf=8192)
        try:
            s.sendall(req("/", headers=[("Connection", "close")]))
            # Not reading until the application has been told, at least
            # once, that the buffer is above half the mark: that tick is
            # skipped, whatever the machine's speed.  Then read it all.
            assert wait_until(lambda: any(x > high // 2 for x in answers[-50:]), 60), \
                "the buffer never passed half the mark: %r" % answers[-5:]
            lagging = max(samples) if samples else 0
            resp = Reader(s).read_response()
        finally:
            s.close()
        assert not srv.errors, srv.errors
    assert lagging > high // 2, "the buffer never filled (%d)" % lagging
    assert resp.status == 200 and resp.chunked and resp.complete
    assert max(samples) < high, max(samples)
    assert not suspended, "the ticker's send was suspended %d times" % len(suspended)
    lines = resp.body.decode().splitlines()
    numbers = [int(l.split()[1]) for l in lines[:-1]]
    assert numbers == sorted(set(numbers))
    done, n, _, skipped = lines[-1].split()
    assert done == "done" and int(n) == ticks
    assert int(skipped) > 0 and len(numbers) + int(skipped) == ticks


def test_a_pipe_as_fh_fails_the_send_with_event_error():
    """A pipe has no size and no offsets: pagi_ref refuses it as a file body
    (docs/deviations.md) instead of sending a wrong, empty body."""
    import os as _os

    def app(scope, receive, send):
        r, w = _os.pipe()
        _os.write(w, b"data")
        _os.close(w)
        fh = _os.fdopen(r, "rb")
        try:
            yield send({"type": "http.response.start", "status": 200, "headers": []})
            try:
                yield send({"type": "http.response.body", "fh": fh})
            except ValueError as exc:
                yield send({"type": "http.response.body",
                            "body": ("%s|%s" % (type(exc).__name__, exc)).encode()})
        finally:
            fh.close()

    with serve(app) as srv:
        resp = exchange(srv.port, req("/", headers=[("Connection", "close")]))
    assert resp.status == 200
    assert resp.body.startswith(b"EventError|http.response.body: 'fh' is not a regular file")


def test_pipelined_bytes_read_ahead_are_bounded_while_a_response_is_slow():
    """A client that pipelines megabytes behind a request the application is
    slow to answer: the server stops reading instead of holding them all."""
    gate = threading.Event()
    held = []

    def app(scope, receive, send):
        if scope["path"] == "/slow":
            yield pagi_ref.to_thread(gate.wait, 10)
        yield from respond(send, 200, b"ok")

    with serve(app) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        try:
            s.sendall(req("/slow"))
            one = req("/next")
            s.setblocking(False)
            sent = 0
            deadline = time.monotonic() + 5
            while sent < 20 * 1024 * 1024 and time.monotonic() < deadline:
                try:
                    sent += s.send(one * 1000)
                except BlockingIOError:
                    select.select([], [s], [], 0.05)    # the server stopped reading?
                    conns = list(srv.server.connections)
                    held.append(max([c.parser.buffered for c in conns] or [0]))
                    if len(held) > 20:
                        break
            assert held, "the client was never throttled"
            assert max(held) <= pagi_ref._PIPELINE_BUFFER + 65536, max(held)
            gate.set()
        finally:
            s.close()


def test_sends_not_awaited_hit_the_hard_limit_with_queue_overflow():
    """Bounded everything: an application that does not wait for its sends
    cannot make the server hold more than write_buffer_limit for a client
    that does not read; the connection goes, with reason queue_overflow."""
    reasons = []
    peak = []
    done = threading.Event()

    def app(scope, receive, send):
        conn = scope["pagi.connection"]
        conn.on_disconnect(reasons.append)
        transport = scope["pagi.transport"]
        yield send({"type": "http.response.start", "status": 200, "headers": []})
        chunk = b"x" * 65536
        for _ in range(200):                     # 12.5 MiB, never awaited
            send({"type": "http.response.body", "body": chunk, "more": 1})
            peak.append(transport.buffered_amount())
        done.set()
        yield pagi_ref.sleep(0)

    with serve(app, write_buffer_limit=512 * 1024) as srv:
        s = small_rcvbuf_connect(srv.port, rcvbuf=8192)
        try:
            s.sendall(req("/"))
            assert done.wait(10)
            assert wait_until(lambda: reasons, 5)
        finally:
            s.close()
    assert reasons == ["queue_overflow"]
    assert max(peak) <= 512 * 1024 + 65536 + 16, max(peak)
