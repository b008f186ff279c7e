"""Section 13, the test client: pagi_ref.TestClient, from the outside.

Every test drives an application through TestClient and checks what the
test sees: responses, streamed pieces, WebSocket messages and closes,
parsed events, lifespan state, the application's exceptions.  Where the
client's own protocol code needs bytes the server never sends (fragmented
WebSocket messages, pings, a broken handshake), a small scripted server on
a socket of this process plays the other side.  And one test serves the
same application under TestClient and under conftest's ``serve()``, read
with a raw socket, and compares what both clients got.
"""
import json
import gc
import os
import re
import socket
import threading

import pytest

import pagi_ref
from pagi_ref import (LifespanFailed, TestClient, TestClientError, TestClientTimeout,
                      WebSocketDisconnect, WebSocketRejected)
from conftest import ROOT, serve
from spec_wire import exchange, get as raw_get
from apputil import read_body, respond


# -- applications ----------------------------------------------------------------

def echo_scope(scope, receive, send):
    """Answers with what arrived: method, path, query, headers, body (JSON)."""
    if scope["type"] != "http":
        raise ValueError("http only, not %r" % scope["type"])
    body = yield from read_body(receive)
    if body is None:
        return          # the client left before the end of its body
    answer = {
        "method": scope["method"], "path": scope["path"],
        "raw_path": scope["raw_path"].decode("latin-1"),
        "query_string": scope["query_string"].decode("latin-1"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
        "body": body.decode("latin-1"),
    }
    yield from respond(send, 200, json.dumps(answer).encode(),
                       [(b"content-type", b"application/json")])


def sent_headers(answer):
    return {k: v for k, v in answer["headers"]}


# -- HTTP requests and responses ----------------------------------------------------

def test_get_reads_status_headers_and_body():
    with TestClient(echo_scope) as client:
        response = client.get("/items/7?full=1")
    assert response.status_code == 200
    assert response.reason_phrase == "OK"
    assert response.http_version == "HTTP/1.1"
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers.get("CONTENT-TYPE") == "application/json"
    assert "content-length" in response.headers
    assert response.headers.get("x-missing") is None
    assert int(response.headers["content-length"]) == len(response.content)
    answer = response.json()
    assert answer == json.loads(response.text)
    assert (answer["method"], answer["path"], answer["query_string"]) == \
        ("GET", "/items/7", "full=1")
    headers = sent_headers(answer)
    assert headers["host"] == "testserver"
    assert headers["user-agent"] == "testclient"
    assert "content-length" not in headers       # a GET without a body declares none


@pytest.mark.parametrize("kwargs, body, content_type", [
    ({"content": b"raw \x00 bytes"}, "raw \x00 bytes", None),
    ({"content": "caf\u00e9"}, "caf\u00e9".encode().decode("latin-1"), None),
    ({"json": {"a": [1, 2]}}, '{"a": [1, 2]}', "application/json"),
    ({"data": {"q": "a b", "n": ["1", "2"]}}, "q=a+b&n=1&n=2",
     "application/x-www-form-urlencoded"),
    ({}, "", None),
])
def test_post_bodies_arrive_as_sent(kwargs, body, content_type):
    with TestClient(echo_scope) as client:
        answer = client.post("/", **kwargs).json()
    headers = sent_headers(answer)
    assert answer["method"] == "POST"
    assert answer["body"] == body
    assert headers["content-length"] == str(len(body.encode("latin-1")))
    assert headers.get("content-type") == content_type


def test_an_iterable_body_goes_chunked():
    with TestClient(echo_scope) as client:
        answer = client.put("/", content=iter([b"one ", "two ", b"", b"three"])).json()
    headers = sent_headers(answer)
    assert answer["method"] == "PUT"
    assert headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    assert answer["body"] == "one two three"


def test_headers_params_and_methods():
    with TestClient(echo_scope) as client:
        a = client.request("delete", "/x?keep=1", params={"b": "2 3", "c": ["4", "5"]},
                           headers={"X-Token": "t", "Host": "example.org"}).json()
        b = client.patch("/y", headers=[("x-twice", "1"), ("x-twice", "2")], content=b"p").json()
        c = client.options("/z").json()
        head = client.head("/")
    assert a["method"] == "DELETE" and a["query_string"] == "keep=1&b=2+3&c=4&c=5"
    assert sent_headers(a)["x-token"] == "t"
    assert sent_headers(a)["host"] == "example.org"      # the test's Host wins
    assert [v for k, v in b["headers"] if k == "x-twice"] == ["1", "2"]
    assert b["method"] == "PATCH" and b["body"] == "p"
    assert c["method"] == "OPTIONS"
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) > 0


def test_framing_the_test_writes_is_sent_as_it_is():
    with TestClient(echo_scope) as client:
        declared = client.post("/", content=b"abc", headers={"Content-Length": "3"}).json()
        chunked = client.post("/", content=[b"3\r\nabc\r\n0\r\n\r\n"],
                              headers={"transfer-encoding": "chunked"}).json()
    assert [v for k, v in declared["headers"] if k == "content-length"] == ["3"]
    assert declared["body"] == chunked["body"] == "abc"


def test_a_path_is_percent_encoded_as_utf8():
    with TestClient(echo_scope) as client:
        answer = client.get("/caf\u00e9 menu", params={"q": "\u00e9"}).json()
        whole = client.get("http://example.org/abs?x=1").json()
    assert answer["raw_path"] == "/caf%C3%A9%20menu"
    assert answer["path"] == "/caf\u00e9 menu"
    assert answer["query_string"] == "q=%C3%A9"
    assert (whole["path"], whole["query_string"]) == ("/abs", "x=1")


def test_bad_arguments_are_refused():
    with TestClient(echo_scope) as client:
        with pytest.raises(ValueError, match="starts with '/'"):
            client.get("items")
        with pytest.raises(ValueError, match="CR, LF or NUL"):
            client.get("/", headers={"x-evil": "a\r\nx-injected: 1"})
        with pytest.raises(TypeError, match="one of content=, data= and json="):
            client.post("/", content=b"a", json={})
        with pytest.raises(ValueError, match="a method is a token"):
            client.request("GET / HTTP/1.1\r\nx:", "/")
        with pytest.raises(TypeError, match="a piece of content= is bytes or str, not int"):
            client.post("/", content=[b"ok", 5])
        assert client.get("/").status_code == 200     # and the client still works
    with pytest.raises(pagi_ref.ConfigError):
        TestClient(echo_scope, max_body_size=-1)


def test_response_headers_text_charset_and_trailers():
    def app(scope, receive, send):
        yield send({"type": "http.response.start", "status": 201, "trailers": 1,
                    "headers": [(b"content-type", b"text/plain; charset=latin-1"),
                                (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]})
        yield send({"type": "http.response.body", "body": b"caf\xe9"})
        yield send({"type": "http.response.trailers", "headers": [(b"x-sum", b"42")]})

    with TestClient(app, lifespan="off") as client:
        response = client.get("/")
    assert response.status_code == 201 and response.reason_phrase == "Created"
    assert response.text == "caf\u00e9"
    assert response.headers.get_list("Set-Cookie") == ["a=1", "b=2"]
    assert response.headers["set-cookie"] == "a=1, b=2"
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.trailers["X-Sum"] == "42"
    assert ("set-cookie", "b=2") in response.headers.items()


def test_config_fields_reach_the_server():
    with TestClient(echo_scope, max_body_size=10) as client:
        response = client.post("/", content=b"x" * 100)
        assert client.post("/", content=b"x" * 10).status_code == 200
    # The server refused the body itself: the application never ran.
    assert response.status_code == 413


# -- streaming responses -------------------------------------------------------------

def test_stream_gives_each_piece_as_it_arrives():
    # The application sends one piece, then waits for the test to say it
    # has received it: the test can only say so if the piece came before
    # the end of the response.
    seen_first = threading.Event()

    def app(scope, receive, send):
        yield send({"type": "http.response.start", "status": 200, "headers": []})
        yield send({"type": "http.response.body", "body": b"first", "more": 1})
        arrived = yield pagi_ref.to_thread(seen_first.wait, 10)
        yield send({"type": "http.response.body", "body": b"second" if arrived else b"late"})

    with TestClient(app, lifespan="off") as client:
        with client.stream("GET", "/") as response:
            assert response.status_code == 200
            pieces = []
            for piece in response.iter_bytes():
                pieces.append(piece)
                seen_first.set()
    assert b"".join(pieces) == b"firstsecond"
    assert pieces[0] == b"first"


def test_stream_read_lines_and_text():
    def app(scope, receive, send):
        yield send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        for piece in (b"one\r\ntw", b"o\nthr\xc3", b"\xa9e"):
            yield send({"type": "http.response.body", "body": piece, "more": 1})
        yield send({"type": "http.response.body", "body": b""})

    with TestClient(app, lifespan="off") as client:
        with client.stream("GET", "/") as response:
            assert list(response.iter_lines()) == ["one", "two", "thr\u00e9e"]
        with client.stream("GET", "/") as response:
            assert response.read() == b"one\r\ntwo\nthr\xc3\xa9e"
            assert response.text == "one\r\ntwo\nthr\u00e9e"
        with client.stream("GET", "/") as response:
            with pytest.raises(TestClientError, match="not been read"):
                response.content


def test_leaving_a_stream_early_is_a_client_that_left():
    # The application streams until it learns the client has gone; the
    # client leaves after two pieces.  When the with block has ended, the
    # application's call has returned (the client waits for it).
    seen = []

    def app(scope, receive, send):
        conn = scope["pagi.connection"]
        yield send({"type": "http.response.start", "status": 200, "headers": []})
        n = 0
        while conn.is_connected():
            n += 1
            yield send({"type": "http.response.body", "body": b"x" * 1000, "more": 1})
            yield pagi_ref.sleep(0.001)
        seen.append(conn.disconnect_reason())

    with TestClient(app, lifespan="off") as client:
        with client.stream("GET", "/") as response:
            for i, _piece in enumerate(response.iter_bytes()):
                if i == 1:
                    break
        assert seen and seen[0] in pagi_ref.DISCONNECT_REASONS


# -- the application's exceptions --------------------------------------------------------

class AppBug(Exception):
    pass


def failing(where):
    """An application that raises AppBug: when called (not a generator),
    before its response, in the middle of the body, or after the whole
    response."""
    def raises_when_called(scope, receive, send):
        raise AppBug("when called")

    def app(scope, receive, send):
        yield from respond_if(where != "before", send)
        raise AppBug(where)

    if where == "call":
        return raises_when_called

    def respond_if(cond, send):
        if cond:
            yield send({"type": "http.response.start", "status": 200, "headers": []})
            yield send({"type": "http.response.body", "body": b"partial",
                        "more": 1 if where == "middle" else 0})
    return app


@pytest.mark.parametrize("where", ["call", "before", "middle", "after"])
def test_the_applications_exception_is_raised_in_the_test(where):
    with TestClient(failing(where), lifespan="off") as client:
        with pytest.raises(AppBug) as info:
            client.get("/")
    assert str(info.value) == ("when called" if where == "call" else where)


def test_an_async_applications_exception_too():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise AppBug("async")

    with TestClient(app, lifespan="off") as client:
        with pytest.raises(AppBug, match="async"):
            client.get("/")


def test_an_application_that_is_not_a_generator_fails_loudly():
    def app(scope, receive, send):
        return None

    with TestClient(app, lifespan="off") as client:
        with pytest.raises(TypeError, match="missing a 'yield' or 'async def'"):
            client.get("/")


@pytest.mark.parametrize("where, status", [("before", 500), ("after", 200)])
def test_without_raise_server_exceptions_the_test_sees_what_a_client_sees(where, status):
    with TestClient(failing(where), raise_server_exceptions=False, lifespan="off") as client:
        response = client.get("/")
    assert response.status_code == status


def test_a_body_cut_short_raises_with_what_arrived():
    with TestClient(failing("middle"), raise_server_exceptions=False, lifespan="off") as client:
        with pytest.raises(TestClientError, match="cut short") as info:
            client.get("/")
    assert info.value.response.status_code == 200
    assert info.value.response.content == b"partial"


def test_an_exception_on_a_connection_of_another_client_is_raised_at_the_next_call():
    with TestClient(failing("before"), lifespan="off") as client:
        raw = raw_get(client.address[1], "/")
        assert raw.status == 500
        with pytest.raises(AppBug):
            client.get("/")


# -- lifespan and state -----------------------------------------------------------------

def lifespan_app(log):
    def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                event = yield receive()
                if event["type"] == "lifespan.startup":
                    scope["state"]["db"] = {"rows": []}
                    log.append("startup")
                    yield send({"type": "lifespan.startup.complete"})
                else:
                    log.append("shutdown after %d rows" % len(scope["state"]["db"]["rows"]))
                    yield send({"type": "lifespan.shutdown.complete"})
                    return
        db = scope["state"].get("db")
        if db is None:
            yield from respond(send, 503, b"no db")
            return
        db["rows"].append(scope["path"])
        yield from respond(send, 200, b"%d rows" % len(db["rows"]))
    return app


def test_lifespan_runs_on_enter_and_exit_and_its_state_reaches_requests():
    log = []
    with TestClient(lifespan_app(log)) as client:
        assert log == ["startup"]
        assert client.get("/a").text == "1 rows"
        assert client.get("/b").text == "2 rows"
        # The very object the startup stored, which requests mutate.
        assert client.state["db"]["rows"] == ["/a", "/b"]
        client.state["db"]["rows"].append("from the test")
        assert client.get("/c").text == "4 rows"
        assert log == ["startup"]
    assert log == ["startup", "shutdown after 4 rows"]


def test_without_with_there_is_no_lifespan_and_close_stops_the_server():
    log = []
    client = TestClient(lifespan_app(log))
    assert client.get("/").status_code == 503          # started here, without lifespan
    address = client.address
    client.close()
    assert log == []
    with pytest.raises(TestClientError, match="not running"):
        client.address
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=5).close()


def test_a_startup_failure_is_raised_on_enter():
    def app(scope, receive, send):
        yield receive()
        yield send({"type": "lifespan.startup.failed", "message": "no database"})

    with pytest.raises(LifespanFailed, match="no database"):
        with TestClient(app):
            pass


def test_a_declined_lifespan_is_no_error_unless_lifespan_on():
    with TestClient(echo_scope) as client:      # raises on the lifespan scope: declines
        assert client.get("/").status_code == 200
    with pytest.raises(LifespanFailed, match="declined") as info:
        with TestClient(echo_scope, lifespan="on"):
            pass
    assert isinstance(info.value.__cause__, ValueError)


def test_a_lifespan_shutdown_failure_is_raised_on_exit():
    def app(scope, receive, send):
        yield receive()
        yield send({"type": "lifespan.startup.complete"})
        yield receive()
        yield send({"type": "lifespan.shutdown.failed", "message": "flush failed"})

    client = TestClient(app)
    with pytest.raises(LifespanFailed, match="flush failed"):
        with client:
            pass


def test_a_lifespan_exception_after_startup_is_raised_at_the_next_request():
    def app(scope, receive, send):
        if scope["type"] == "lifespan":
            yield receive()
            yield send({"type": "lifespan.startup.complete"})
            raise AppBug("after startup")
        yield from respond(send, 200, b"ok")

    with TestClient(app) as client:
        with pytest.raises(AppBug, match="after startup"):
            client.get("/")
        assert client.get("/").text == "ok"      # and the server goes on serving


# -- timeouts -------------------------------------------------------------------------------

def test_a_response_that_never_comes_times_out_naming_what_was_awaited():
    def app(scope, receive, send):
        yield pagi_ref.sleep(60)

    with TestClient(app, timeout=0.3, lifespan="off", shutdown_timeout=0.1) as client:
        with pytest.raises(TestClientTimeout, match=r"no response head to GET /slow within 0.3 s"):
            client.get("/slow")


def test_a_startup_that_never_completes_times_out():
    def app(scope, receive, send):
        yield receive()
        yield pagi_ref.sleep(60)

    with pytest.raises(TestClientTimeout, match="lifespan startup did not complete within 0.3 s"):
        with TestClient(app, timeout=0.3):
            pass


def test_an_application_that_outlives_its_client_times_out():
    def app(scope, receive, send):
        yield from respond(send, 200, b"done")
        yield pagi_ref.sleep(60)        # ignores that the client has gone

    with TestClient(app, timeout=0.3, lifespan="off", shutdown_timeout=0.1) as client:
        with pytest.raises(TestClientTimeout, match="still running .* GET /"):
            client.get("/")


# -- WebSocket --------------------------------------------------------------------------------

def ws_app(log):
    def app(scope, receive, send):
        if scope["type"] != "websocket":
            raise ValueError("websocket only")
        event = yield receive()
        assert event["type"] == "websocket.connect"
        path = scope["path"]
        if path == "/refuse":
            yield send({"type": "websocket.close"})
            return
        if path == "/deny":
            yield send({"type": "websocket.http.response.start", "status": 401,
                        "headers": [(b"content-type", b"text/plain")]})
            yield send({"type": "websocket.http.response.body", "body": b"log in first"})
            return
        accept = {"type": "websocket.accept"}
        if scope["subprotocols"]:
            accept["subprotocol"] = scope["subprotocols"][-1]
        yield send(accept)
        while True:
            event = yield receive()
            if event["type"] == "websocket.disconnect":
                log.append(("disconnect", event["code"], event.get("reason", "")))
                return
            text = event.get("text")
            if text == "bye":
                yield send({"type": "websocket.close", "code": 4001, "reason": "bye to you"})
                continue
            if text == "crash":
                raise AppBug("crashed on a message")
            if text is not None:
                yield send({"type": "websocket.send", "text": text.upper()})
            else:
                yield send({"type": "websocket.send", "bytes": event["bytes"][::-1]})
    return app


def test_websocket_text_bytes_and_json():
    log = []
    with TestClient(ws_app(log)) as client:
        with client.websocket_connect("/chat") as ws:
            assert ws.subprotocol is None
            ws.send_text("h\u00e9llo")
            assert ws.receive_text() == "H\u00c9LLO"
            ws.send_bytes(b"\x00\x01\x02")
            assert ws.receive_bytes() == b"\x02\x01\x00"
            ws.send_json({"n": 1})
            assert ws.receive_json() == {"N": 1}
            ws.send_text("x" * 70000)       # a 64-bit length on the way in and out
            assert ws.receive() == "X" * 70000
            ws.send_bytes(b"b")
            with pytest.raises(TestClientError, match="expected a text message"):
                ws.receive_text()
        assert log == [("disconnect", 1000, "")]


def test_websocket_client_close_code_reaches_the_application():
    log = []
    with TestClient(ws_app(log)) as client:
        ws = client.websocket_connect("/chat", subprotocols=["v1", "v2"])
        assert ws.subprotocol == "v2"
        ws.close(4321, "going")
        ws.close()                           # a second close does nothing
    assert log == [("disconnect", 4321, "going")]


def test_websocket_server_close_raises_disconnect_with_code_and_reason():
    log = []
    with TestClient(ws_app(log)) as client:
        with client.websocket_connect("/chat") as ws:
            ws.send_text("bye")
            with pytest.raises(WebSocketDisconnect) as info:
                ws.receive_text()
            assert (info.value.code, info.value.reason) == (4001, "bye to you")
            with pytest.raises(WebSocketDisconnect):
                ws.receive_text()            # and again: the session is over
    # The client answered the close frame with its code (and no reason).
    assert log == [("disconnect", 4001, "")]


def test_websocket_refusals_raise_with_the_servers_answer():
    with TestClient(ws_app([])) as client:
        with pytest.raises(WebSocketRejected) as refused:
            client.websocket_connect("/refuse")
        with pytest.raises(WebSocketRejected) as denied:
            client.websocket_connect("/deny")
    assert refused.value.response.status_code == 403
    assert denied.value.response.status_code == 401
    assert denied.value.response.content == b"log in first"


def test_websocket_application_exception_is_raised_in_the_test():
    with TestClient(ws_app([])) as client:
        with client.websocket_connect("/chat") as ws:
            ws.send_text("crash")
            with pytest.raises(AppBug, match="crashed on a message"):
                ws.receive_text()
    with TestClient(ws_app([]), raise_server_exceptions=False) as client:
        with client.websocket_connect("/chat") as ws:
            ws.send_text("crash")
            with pytest.raises(WebSocketDisconnect) as info:
                ws.receive_text()
    assert info.value.code == 1011


def test_websocket_to_an_http_only_application_raises_its_exception():
    with TestClient(echo_scope) as client:
        with pytest.raises(ValueError, match="http only"):
            client.websocket_connect("/")


# -- the WebSocket client against scripted servers (bytes the server never sends) -------

class ScriptedServer:
    """One connection on a listening socket of this process: answers the
    handshake (or not), then runs ``script(sock)`` in a thread."""

    def __init__(self, script, accept=None):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.address = self.listener.getsockname()
        self.script, self.accept = script, accept
        self.received = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        sock, _ = self.listener.accept()
        sock.settimeout(10)
        with sock:
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(4096)
            key = re.search(rb"sec-websocket-key: (\S+)", head, re.I).group(1)
            accept = self.accept or pagi_ref.base64.b64encode(
                pagi_ref.hashlib.sha1(key + pagi_ref._WS_GUID).digest())
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            self.script(sock, self)

    def read_frame(self, sock):
        """(opcode, unmasked payload, was masked) of one client frame."""
        head = self._exact(sock, 2)
        size = head[1] & 0x7F
        if size == 126:
            size = int.from_bytes(self._exact(sock, 2), "big")
        masked = bool(head[1] & 0x80)
        mask = self._exact(sock, 4) if masked else b"\0\0\0\0"
        return head[0] & 0x0F, pagi_ref._unmask(self._exact(sock, size), mask), masked

    @staticmethod
    def _exact(sock, n):
        data = b""
        while len(data) < n:
            more = sock.recv(n - len(data))
            if not more:
                raise EOFError
            data += more
        return data


class ScriptedClient(TestClient):
    """A TestClient whose server is a ScriptedServer."""

    def __init__(self, scripted):
        TestClient.__init__(self, None)
        self.scripted = scripted

    @property
    def address(self):
        return self.scripted.address

    def _ensure_running(self):
        pass

    def _after_call(self, client, what, wait=True):
        pass


def frame(opcode, payload, fin=True):
    return bytes((0x80 * fin | opcode, len(payload))) + payload


def test_websocket_client_reassembles_fragments_answers_pings_masks_its_frames():
    def script(sock, server):
        sock.sendall(frame(0x1, b"frag", fin=False) + frame(0x9, b"are you there")
                     + frame(0x0, b"men", fin=False) + frame(0x0, b"ted"))
        server.received.append(server.read_frame(sock))      # the pong
        server.received.append(server.read_frame(sock))      # the client's message
        sock.sendall(frame(0x8, b""))                        # close without a code
        server.received.append(server.read_frame(sock))      # the answer

    server = ScriptedServer(script)
    ws = ScriptedClient(server).websocket_connect("/")
    assert ws.receive_text() == "fragmented"
    ws.send_bytes(b"reply")
    with pytest.raises(WebSocketDisconnect) as info:
        ws.receive()
    server.thread.join(10)
    assert info.value.code == 1005
    assert server.received == [(0xA, b"are you there", True), (0x2, b"reply", True),
                               (0x8, b"", True)]


@pytest.mark.parametrize("bad, message", [
    (bytes((0x81, 0x82)) + b"\0\0\0\0hi", "masked frame from the server"),
    (bytes((0xC1, 0x02)) + b"hi", "RSV bits"),
    (frame(0x1, b"\xff\xfe"), "not UTF-8"),
    (frame(0x0, b"lost"), "continuation frame with no message"),
    (frame(0x3, b""), "unknown opcode"),
])
def test_websocket_client_fails_a_server_that_breaks_rfc6455(bad, message):
    def script(sock, server):
        sock.sendall(bad)
        server.received.append(server.read_frame(sock))

    server = ScriptedServer(script)
    ws = ScriptedClient(server).websocket_connect("/")
    with pytest.raises(TestClientError, match=message):
        ws.receive()
    server.thread.join(10)
    assert server.received[0][0] == 0x8          # the client sent a close frame


def test_websocket_client_checks_the_accept_key():
    server = ScriptedServer(lambda sock, server: None, accept=b"wrong")
    with pytest.raises(TestClientError, match="wrong Sec-WebSocket-Accept"):
        ScriptedClient(server).websocket_connect("/")


# -- Server-Sent Events ---------------------------------------------------------------------------

def sse_app(log):
    def app(scope, receive, send):
        if scope["type"] == "http":
            yield from respond(send, 200, b"not a stream")
            return
        if scope["type"] != "sse":
            raise ValueError("sse and http only")
        yield receive()
        if scope["path"] == "/missing":
            yield send({"type": "sse.http.response.start", "status": 404})
            yield send({"type": "sse.http.response.body", "body": b"no such stream"})
            return
        headers = dict(scope["headers"])
        gone = receive()
        yield send({"type": "sse.start"})
        yield send({"type": "sse.comment", "comment": "hello"})
        yield send({"type": "sse.send", "data": "first", "id": "1", "retry": 1500})
        yield send({"type": "sse.send", "data": "two\nlines", "event": "multi"})
        yield send({"type": "sse.send", "data": json.dumps(
            {"last": headers.get(b"last-event-id", b"").decode()}), "id": "3"})
        if scope["path"] == "/crash":
            raise AppBug("crashed mid-stream")
        if scope["path"] == "/forever":
            while (yield pagi_ref.wait_any(gone, pagi_ref.sleep(0.001))) is not gone:
                yield send({"type": "sse.send", "data": "tick"})
            log.append(gone.result()["reason"])
    return app


def test_sse_events_are_parsed():
    with TestClient(sse_app([])) as client:
        with client.sse("/events", last_event_id=41) as events:
            assert events.response.status_code == 200
            assert events.response.headers["content-type"].startswith("text/event-stream")
            got = list(events)
            assert events.last_event_id == "3"
            assert events.reconnection_time == 1500
    assert [(e.event, e.data, e.id, e.retry) for e in got] == [
        ("message", "first", "1", 1500),
        ("multi", "two\nlines", "1", None),         # the id carries over (WHATWG)
        ("message", '{"last": "41"}', "3", None),
    ]
    assert got[2].json() == {"last": "41"}
    assert got[0] == pagi_ref.ServerSentEvent("first", "message", "1", 1500)


def test_sse_decline_and_not_a_stream():
    with TestClient(sse_app([])) as client:
        with client.sse("/missing") as events:
            assert events.response.status_code == 404
            assert events.response.content == b"no such stream"
            with pytest.raises(TestClientError, match="not an event stream: 404"):
                list(events)
        with client.sse("/", headers={"accept": "text/plain"}) as events:
            assert events.response.text == "not a stream"       # an http scope
            with pytest.raises(TestClientError, match="not an event stream: 200"):
                next(iter(events))


def test_sse_leaving_early_is_a_client_that_left():
    log = []
    with TestClient(sse_app(log)) as client:
        with client.sse("/forever") as events:
            for event in events:
                if event.data == "tick":
                    break
        assert log == ["client_closed"]


def test_sse_application_exception_is_raised():
    with TestClient(sse_app([])) as client:
        with pytest.raises(AppBug, match="mid-stream"):
            with client.sse("/crash") as events:
                for _ in events:
                    pass


@pytest.mark.parametrize("pieces, expected", [
    # line ends: LF, CRLF, CR, and a CRLF split between two reads
    (["data: a\n\n"], [("message", "a", "")]),
    (["data: a\r\n\r\n"], [("message", "a", "")]),
    (["data: a\r\r"], [("message", "a", "")]),
    (["data: a\r", "\n\r", "\n"], [("message", "a", "")]),
    (["data: a\r", "\n", "\n"], [("message", "a", "")]),
    # a BOM at the start is dropped; comments and unknown fields ignored
    (["\ufeffdata: a\n:comment\nfoo: bar\n\n"], [("message", "a", "")]),
    # "field" with no colon, a value with no space, two spaces keep one
    (["data\ndata:x\ndata:  y\n\n"], [("message", "\nx\n y", "")]),
    # no data: nothing dispatched, and the event type does not leak
    (["event: e\n\ndata: d\n\n"], [("message", "d", "")]),
    # an id with NUL is ignored; an empty id resets
    (["id: 1\ndata: a\n\nid: 2\0\ndata: b\n\nid\ndata: c\n\n"],
     [("message", "a", "1"), ("message", "b", "1"), ("message", "c", "")]),
    # an event still open at the end of the stream is discarded
    (["data: a\n\ndata: b\n"], [("message", "a", "")]),
])
def test_event_stream_parser_follows_whatwg(pieces, expected):
    parser = pagi_ref._EventStreamParser()
    events = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    assert [(e.event, e.data, e.id) for e in events] == expected


def test_event_stream_parser_is_bounded(monkeypatch):
    monkeypatch.setattr(pagi_ref, "_CLIENT_MAX_MESSAGE", 1000)
    parser = pagi_ref._EventStreamParser()
    parser.feed("data: " + "x" * 400 + "\n" + "data: " + "x" * 400 + "\n\n")   # fits
    with pytest.raises(TestClientError, match="passed 1000 characters"):
        for _ in range(3):
            parser.feed("data: " + "x" * 400 + "\n")
    with pytest.raises(TestClientError, match="passed 1000 characters"):
        pagi_ref._EventStreamParser().feed("data: " + "x" * 1001)     # a line without its end


def test_event_stream_parser_retry_only_digits():
    parser = pagi_ref._EventStreamParser()
    events = parser.feed("retry: 10\ndata: a\n\nretry: x1\ndata: b\n\n")
    assert [e.retry for e in events] == [10, None]
    assert parser.reconnection_time == 10


# -- the same application, under TestClient and on the wire ------------------------------

def test_testclient_and_a_raw_socket_see_the_same_response():
    """What TestClient reports is what a client of the server gets: same
    status, same header fields (but the date), same body bytes."""
    def app(scope, receive, send):
        if scope["type"] != "http":
            raise ValueError("http only")
        body = yield from read_body(receive)
        yield send({"type": "http.response.start", "status": 207,
                    "headers": [(b"content-type", b"text/plain"), (b"x-n", b"%d" % len(body))]})
        yield send({"type": "http.response.body", "body": b"got: ", "more": 1})
        yield send({"type": "http.response.body", "body": body})

    def without_date(pairs):
        return [(k, v) for k, v in pairs if k != b"date"]

    # The bytes TestClient sends for client.post("/x", content=b"payload").
    request = (b"POST /x HTTP/1.1\r\nhost: testserver\r\nuser-agent: testclient\r\n"
               b"content-length: 7\r\n\r\npayload")
    with serve(app) as srv:
        raw = exchange(srv.port, request)
    with TestClient(app) as client:
        tc = client.post("/x", content=b"payload")
    assert (tc.http_version.encode(), tc.status_code, tc.reason_phrase.encode()) == \
        (raw.version, raw.status, raw.reason)
    assert without_date(tc.headers.raw) == without_date(raw.headers)
    assert (b"transfer-encoding", b"chunked") in raw.headers
    assert tc.content == raw.body == b"got: payload"


# -- the docs ------------------------------------------------------------------------------------

def test_the_module_docstring_and_all_name_section_13():
    assert "13. Test client" in pagi_ref.__doc__
    for name in ("TestClient", "TestClientError", "TestClientTimeout", "WebSocketDisconnect",
                 "WebSocketRejected"):
        assert name in pagi_ref.__all__


# -- nothing left behind ---------------------------------------------------------------------------

def test_a_client_leaves_no_thread_and_no_descriptor_behind():
    def used():
        threads = [t for t in threading.enumerate() if t.name == "pagi_ref.TestClient"]
        return threads, len(os.listdir("/proc/self/fd"))

    def session():
        with TestClient(ws_app([])) as client:
            with client.websocket_connect("/chat") as ws:
                ws.send_text("x")
                assert ws.receive_text() == "X"
        with TestClient(sse_app([])) as client:
            with client.sse("/events") as events:
                assert len(list(events)) == 3
        with TestClient(echo_scope) as client:
            with client.stream("POST", "/", content=b"abc") as response:
                assert response.read()

    session()                       # whatever is created once (caches, pools) exists now
    gc.collect()                    # sockets of earlier tests that only wait for the collector
    before = used()
    for _ in range(3):
        session()
    gc.collect()
    after = used()
    # No growth: something else in this process (an earlier test's socket
    # collected meanwhile) may close a descriptor, never open three.
    assert after[0] == before[0] == []
    assert after[1] <= before[1], (before, after)


def test_section_13_shadows_no_name_of_the_sections_above():
    """One module: a module-level name section 13 defines again would
    replace the one a section above relies on."""
    import ast
    with open(os.path.join(ROOT, "pagi_ref.py"), encoding="utf-8") as f:
        source = f.read()
    start = source[:source.index("# 13. Test client")].count("\n") + 1
    above, here = set(), set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = {node.name}
        elif isinstance(node, ast.Assign):
            names = {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        else:
            continue
        (here if node.lineno > start else above).update(names)
    assert not here & above, here & above
