"""TLS (section 5's TLSStream, section 10's accept): HTTPS, WSS and SSE over
TLS, client certificates, the ``tls`` scope extension (PAGI tls; docs/spec.md
TLS-1..3), a handshake that stalls, plain HTTP sent to the TLS port.

The certificates are made here with ``openssl`` (Debian's package, OpenSSL
3): the standard library cannot make one.  Without openssl these tests skip.
The client is the standard library's ``ssl`` module, and ``curl --cacert``
where curl is installed.
"""
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import warnings

import pytest

import pagi_ref
from apputil import ServerProcess, wait_until
from conftest import serve
from spec_wire import Client, WebSocket, build_request, read_chunked_stream

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="openssl (the command) makes the test certificates")

TLS_FIELDS = {"server_cert", "client_cert_chain", "client_cert_name", "client_cert_error",
              "tls_version", "cipher_suite"}


def _openssl(*args, cwd):
    subprocess.run(("openssl",) + args, cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA; a server certificate for 127.0.0.1 and localhost; a client
    certificate (CN=alice, O=Example) from the same CA; an encrypted copy
    of the server key (password 'secret')."""
    d = str(tmp_path_factory.mktemp("certs"))
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=pagi_ref test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
                "extendedKeyUsage=serverAuth\n")
    with open(os.path.join(d, "client.ext"), "w") as f:
        f.write("authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
                "extendedKeyUsage=clientAuth\n")
    for name, subject in (("server", "/CN=localhost"), ("client", "/O=Example/CN=alice")):
        _openssl("req", *ec, "-keyout", name + ".key", "-out", name + ".csr",
                 "-subj", subject, cwd=d)
        _openssl("x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", name + ".pem", "-days", "2",
                 "-extfile", name + ".ext", cwd=d)
    _openssl("pkey", "-in", "server.key", "-out", "server-enc.key", "-aes256",
             "-passout", "pass:secret", cwd=d)
    return {name: os.path.join(d, name) for name in
            ("ca.pem", "server.pem", "server.key", "server-enc.key", "client.pem", "client.key")}


def tls_config(certs, **more):
    return dict(ssl_certfile=certs["server.pem"], ssl_keyfile=certs["server.key"], **more)


def client_context(certs, cert=False, maximum=None):
    context = ssl.create_default_context(cafile=certs["ca.pem"])
    context.set_alpn_protocols(["http/1.1"])
    if cert:
        context.load_cert_chain(certs["client.pem"], certs["client.key"])
    if maximum is not None:
        context.maximum_version = maximum
    return context


class TLSClient(Client):
    """spec_wire's Client over the ssl module's client."""

    def __init__(self, port, certs, cert=False, maximum=None, timeout=10.0, rcvbuf=None):
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(timeout)
        raw.connect(("127.0.0.1", port))
        self.sock = client_context(certs, cert, maximum).wrap_socket(
            raw, server_hostname="localhost")
        from spec_wire import Reader
        self.reader = Reader(self.sock)


def scope_app(scope, receive, send):
    """Answers with what the scope says about the connection, as JSON."""
    if scope["type"] == "http":
        while True:
            event = yield receive()
            if not event.get("more"):
                break
    info = {"type": scope["type"], "scheme": scope["scheme"], "server": scope["server"],
            "client": scope["client"], "tls": scope["extensions"].get("tls")}
    if scope["type"] == "websocket":
        yield receive()
        yield send({"type": "websocket.accept"})
        event = yield receive()
        info["echo"] = event.get("text")
        yield send({"type": "websocket.send", "text": json.dumps(info)})
        yield send({"type": "websocket.close", "code": 1000})
        return
    if scope["type"] == "sse":
        yield send({"type": "sse.start", "status": 200})
        yield send({"type": "sse.send", "data": json.dumps(info)})
        return
    body = json.dumps(info).encode()
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    yield send({"type": "http.response.body", "body": body})


def beyond_kernel_buffers():
    """Bytes enough to fill the server's send buffer (at most tcp_wmem's
    maximum) and a client's small receive buffer, so that a response must
    queue in the Transport and cross its high-water mark."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            kernel = int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        kernel = 4 << 20
    return kernel + (2 << 20)


def get_json(client, path="/"):
    client.send(build_request("GET", path))
    resp = client.reader.read_response()
    assert resp.status == 200, resp
    return json.loads(resp.body)


# -- HTTPS ---------------------------------------------------------------------------------

def test_get_over_tls_keep_alive_and_the_tls_extension(certs):
    # TLS-2: the extension's six fields with their types; scheme https.
    with serve(scope_app, **tls_config(certs)) as srv:
        client = TLSClient(srv.port, certs)
        try:
            assert client.sock.selected_alpn_protocol() == "http/1.1"   # RFC 7301
            first = get_json(client)
            second = get_json(client)       # the same connection: keep-alive over TLS
        finally:
            client.close()
    assert first["scheme"] == "https" and first["type"] == "http"
    assert first["server"] == ["127.0.0.1", srv.port]
    assert first["client"][0] == "127.0.0.1"
    tls = first["tls"]
    assert set(tls) == TLS_FIELDS
    with open(certs["server.pem"]) as f:
        assert tls["server_cert"] == f.read()
    assert tls["client_cert_chain"] == [] and tls["client_cert_name"] is None
    assert tls["client_cert_error"] is None
    assert tls["tls_version"] == 0x0304
    assert tls["cipher_suite"] in (0x1301, 0x1302, 0x1303)
    assert second["tls"] == tls
    assert srv.errors == []


def test_tls_1_2_reports_its_version_and_suite(certs):
    with serve(scope_app, **tls_config(certs)) as srv:
        client = TLSClient(srv.port, certs, maximum=ssl.TLSVersion.TLSv1_2)
        try:
            tls = get_json(client)["tls"]
            name = client.sock.cipher()[0]
        finally:
            client.close()
    assert tls["tls_version"] == 0x0303
    assert tls["cipher_suite"] == pagi_ref._CIPHER_SUITES[name]


def test_tls_1_1_is_refused(certs):
    # TLS 1.2 at least: a client that offers no more than 1.1 gets no handshake.
    with serve(scope_app, **tls_config(certs)) as srv:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                context.minimum_version = ssl.TLSVersion.TLSv1
                context.maximum_version = ssl.TLSVersion.TLSv1_1
            context.set_ciphers("ALL:@SECLEVEL=0")
        except (ValueError, ssl.SSLError):
            pytest.skip("this OpenSSL cannot even offer TLS 1.1")
        raw = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            context.wrap_socket(raw).close()
        raw.close()
        client = TLSClient(srv.port, certs)       # and the server still serves
        try:
            assert get_json(client)["scheme"] == "https"
        finally:
            client.close()


def test_cleartext_has_no_tls_extension():
    # TLS-1, the other side: a cleartext connection never carries it.
    with serve(scope_app) as srv:
        c = Client(("127.0.0.1", srv.port))
        try:
            info = get_json(c)
        finally:
            c.close()
    assert info["tls"] is None and info["scheme"] == "http"


def test_large_streamed_body_with_flow_control(certs):
    # 64 KiB pieces to a client that reads nothing at first: send()
    # suspends at the high-water mark, counting plaintext bytes as over TCP.
    piece = bytes(range(256)) * 256
    pieces = beyond_kernel_buffers() // len(piece) + 1
    seen = {}
    high = threading.Event()

    def app(scope, receive, send):
        transport = scope["pagi.transport"]
        seen["transport"] = transport
        transport.on_high_water(high.set)
        yield send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % (len(piece) * pieces))]})
        for _ in range(pieces):
            yield send({"type": "http.response.body", "body": piece, "more": True})
            seen["max"] = max(seen.get("max", 0), transport.buffered_amount())
        yield send({"type": "http.response.body", "body": b""})

    with serve(app, **tls_config(certs)) as srv:
        client = TLSClient(srv.port, certs, rcvbuf=8192)
        try:
            client.send(build_request("GET", "/"))
            assert high.wait(10)
            resp = client.reader.read_response()
        finally:
            client.close()
        transport = seen["transport"]
        wait_until(lambda: transport.bytes_written == transport.bytes_queued)
    assert resp.status == 200
    assert resp.body == piece * pieces
    # The watermarks hold over TLS as over TCP: never more than the high
    # mark and one piece queued when a send() returns.
    assert seen["max"] <= pagi_ref.Config().write_high_watermark + len(piece)
    assert transport.bytes_queued == transport.bytes_written
    assert transport.bytes_written > len(piece) * pieces    # the head as well


def test_many_small_pieces_gathered_over_tls(certs):
    # Small pieces queued behind a full socket go out joined (send_many: an
    # SSLSocket has no sendmsg); every byte arrives, in order.
    pieces = [b"%07d:" % i + b"x" * 992 for i in range(beyond_kernel_buffers() // 1000)]
    high = threading.Event()

    def app(scope, receive, send):
        scope["pagi.transport"].on_high_water(high.set)
        yield send({"type": "http.response.start", "status": 200, "headers": []})
        for piece in pieces:
            yield send({"type": "http.response.body", "body": piece, "more": True})
        yield send({"type": "http.response.body", "body": b""})

    with serve(app, **tls_config(certs)) as srv:
        client = TLSClient(srv.port, certs, rcvbuf=8192)
        try:
            client.send(build_request("GET", "/"))
            assert high.wait(10)
            resp = client.reader.read_response()
        finally:
            client.close()
    assert resp.status == 200 and resp.body == b"".join(pieces)
    assert srv.errors == []


def test_file_body_over_tls(certs, tmp_path):
    # No sendfile on TLS: bounded reads through the same Transport.
    path = tmp_path / "body.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    path.write_bytes(data)

    def app(scope, receive, send):
        yield send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % (len(data) - 1000))]})
        yield send({"type": "http.response.body", "file": str(path), "offset": 1000})

    with serve(app, **tls_config(certs)) as srv:
        client = TLSClient(srv.port, certs)
        try:
            client.send(build_request("GET", "/"))
            resp = client.reader.read_response()
        finally:
            client.close()
    assert resp.status == 200 and resp.body == data[1000:]
    assert srv.errors == []


def test_websocket_over_tls(certs):
    with serve(scope_app, **tls_config(certs)) as srv:
        client = TLSClient(srv.port, certs)
        try:
            client.send(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            resp = client.reader.read_response(head_request=True)
            assert resp.status == 101
            ws = WebSocket(client)
            ws.text("hello")
            kind, text = ws.recv()
            assert kind == "text"
            info = json.loads(text)
        finally:
            client.close()
    assert info["type"] == "websocket" and info["scheme"] == "wss"
    assert info["echo"] == "hello"
    assert set(info["tls"]) == TLS_FIELDS


def test_sse_over_tls(certs):
    with serve(scope_app, **tls_config(certs)) as srv:
        client = TLSClient(srv.port, certs)
        try:
            client.send(build_request("GET", "/events",
                                      headers=[("Accept", "text/event-stream")]))
            resp = client.reader.read_response(head_request=True)
            data, ended = read_chunked_stream(client.reader)
        finally:
            client.close()
    assert resp.status == 200 and ended
    text = data.decode()
    info = json.loads(text[text.index("data: ") + 6:].split("\n")[0])
    assert info["type"] == "sse" and info["scheme"] == "https"
    assert set(info["tls"]) == TLS_FIELDS


# -- client certificates ------------------------------------------------------------------

def test_client_certificate_required(certs):
    config = tls_config(certs, ssl_cert_reqs=2, ssl_ca_certs=certs["ca.pem"])
    with serve(scope_app, **config) as srv:
        client = TLSClient(srv.port, certs, cert=True)
        try:
            tls = get_json(client)["tls"]
        finally:
            client.close()
        with open(certs["client.pem"]) as f:
            assert tls["client_cert_chain"] == [f.read()]
        assert tls["client_cert_name"] == "CN=alice,O=Example"     # RFC 4514: last RDN first
        assert tls["client_cert_error"] is None
        # Without a certificate: no request is served (TLS 1.3 reports the
        # refusal at the client's first read).
        client = TLSClient(srv.port, certs)
        try:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                client.send(build_request("GET", "/"))
                if not client.sock.recv(1):
                    raise ConnectionResetError("closed")
        finally:
            client.close()
        wait_until(lambda: not srv.server.connections)
    assert srv.errors == []


def test_client_certificate_optional(certs):
    config = tls_config(certs, ssl_cert_reqs=1, ssl_ca_certs=certs["ca.pem"])
    with serve(scope_app, **config) as srv:
        for cert in (False, True):
            client = TLSClient(srv.port, certs, cert=cert)
            try:
                tls = get_json(client)["tls"]
            finally:
                client.close()
            if cert:
                assert len(tls["client_cert_chain"]) == 1
                assert tls["client_cert_chain"][0].startswith("-----BEGIN CERTIFICATE-----")
                assert tls["client_cert_name"] == "CN=alice,O=Example"
            else:
                assert tls["client_cert_chain"] == [] and tls["client_cert_name"] is None
            assert tls["client_cert_error"] is None


# -- what the server does with clients that do not speak TLS well ---------------------------

def test_stalled_handshake_is_timed_out_and_its_slot_freed(certs):
    # A client that connects and sends half a ClientHello: header_timeout
    # bounds the handshake as it bounds a head.
    with serve(scope_app, header_timeout=0.5, **tls_config(certs)) as srv:
        raw = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        try:
            raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            wait_until(lambda: len(srv.server.connections) == 1)
            assert raw.recv(4096) == b""          # closed by the server, nothing sent
        finally:
            raw.close()
        wait_until(lambda: not srv.server.connections and not srv.server.lingering)
        client = TLSClient(srv.port, certs)
        try:
            assert get_json(client)["scheme"] == "https"
        finally:
            client.close()
    assert srv.errors == []


def test_plain_http_to_the_tls_port_is_closed_cleanly(certs):
    with serve(scope_app, **tls_config(certs)) as srv:
        raw = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        try:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            received = b""
            while True:
                try:
                    data = raw.recv(4096)
                except ConnectionResetError:
                    break
                if not data:
                    break
                received += data
        finally:
            raw.close()
        assert b"HTTP/1.1" not in received
        wait_until(lambda: not srv.server.connections)
        # Not an error of the server's: DEBUG only, with OpenSSL's reason.
        # (OpenSSL 3 says "[SSL: HTTP_REQUEST] http request"; others may word it
        # otherwise.)
        assert any("read failed" in line and "SSL" in line
                   for line in srv.log if line.startswith("DEBUG"))
        client = TLSClient(srv.port, certs)
        try:
            assert get_json(client)["scheme"] == "https"
        finally:
            client.close()
    assert srv.errors == []


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_cacert(certs):
    with serve(scope_app, **tls_config(certs)) as srv:
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--cacert", certs["ca.pem"],
             "https://localhost:%d/curl" % srv.port],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["scheme"] == "https" and set(info["tls"]) == TLS_FIELDS


# -- configuration ------------------------------------------------------------------------

def test_encrypted_key_with_its_password(certs):
    config = dict(ssl_certfile=certs["server.pem"], ssl_keyfile=certs["server-enc.key"],
                  ssl_keyfile_password="secret")
    with serve(scope_app, **config) as srv:
        client = TLSClient(srv.port, certs)
        try:
            assert get_json(client)["scheme"] == "https"
        finally:
            client.close()


@pytest.mark.parametrize("fields, named", [
    ({"ssl_certfile": "/nonexistent.pem"}, "ssl_certfile"),
    ({"ssl_keyfile_password": "wrong"}, "ssl_keyfile"),
    ({"ssl_cert_reqs": 3}, "ssl_cert_reqs"),
    ({"ssl_cert_reqs": 2}, "ssl_ca_certs"),
    ({"ssl_ciphers": "NO-SUCH-CIPHER"}, "ssl_ciphers"),
    ({"ssl_certfile": None}, "ssl_keyfile needs ssl_certfile"),
    ({"ssl_certfile": None, "ssl_keyfile": None, "ssl_keyfile_password": None,
      "ssl_cert_reqs": 2, "ssl_ca_certs": "ca.pem"}, "ssl_ca_certs needs ssl_certfile"),
])
def test_unusable_tls_settings_name_the_field(certs, fields, named):
    config = dict(ssl_certfile=certs["server.pem"], ssl_keyfile=certs["server-enc.key"],
                  ssl_keyfile_password="secret", lifespan="off", port=0)
    config.update(fields)
    with pytest.raises(pagi_ref.ConfigError) as info:
        pagi_ref.Server(scope_app, pagi_ref.Config(**config))
    assert named in str(info.value)


def test_command_line_refuses_an_unusable_certificate(tmp_path):
    missing = str(tmp_path / "missing.pem")
    out = subprocess.run(
        [os.sys.executable, pagi_ref.__file__, "pagi_ref:_demo_app", "--port", "0",
         "--ssl-certfile", missing],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert out.returncode == 2
    assert b"ssl_certfile" in out.stderr and b"Traceback" not in out.stderr


def test_client_cert_name_is_rfc4514():
    # RFC 4514 §2: the last RDN first; ',' '+' and a leading space escaped.
    subject = ((("countryName", "NZ"),),
               (("organizationName", " Acme, Inc"),),
               (("commonName", "bob"), ("userId", "b+1")))
    assert pagi_ref._rfc4514(subject) == "CN=bob+UID=b\\+1,O=\\ Acme\\, Inc,C=NZ"


@pytest.mark.parametrize("workers", [1, 2])
def test_command_line_serves_tls(certs, tmp_path, workers):
    # Each worker builds the context from the same options and wraps the
    # sockets it accepts; the listening line says https.
    app = tmp_path / "tlsapp.py"
    app.write_text(
        "import json, os\n"
        "def app(scope, receive, send):\n"
        "    if scope['type'] != 'http':\n"
        "        return\n"
        "    yield receive()\n"
        "    body = json.dumps({'pid': os.getpid(), 'scheme': scope['scheme'],\n"
        "                       'tls': sorted(scope['extensions']['tls'])}).encode()\n"
        "    yield send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    yield send({'type': 'http.response.body', 'body': body})\n")
    proc = ServerProcess([pagi_ref.__file__, str(app) + ":app", "--port", "0",
                          "--workers", str(workers), "--no-access-log", "--lifespan", "off",
                          "--ssl-certfile", certs["server.pem"],
                          "--ssl-keyfile", certs["server.key"]])
    try:
        _host, port = proc.wait_listening(20)
        assert any("listening on https://" in line for line in proc.stderr)
        for _ in range(4):
            client = TLSClient(port, certs)
            try:
                info = get_json(client)
            finally:
                client.close()
            assert info["scheme"] == "https" and info["tls"] == sorted(TLS_FIELDS)
    finally:
        assert proc.stop() == 0


class _SmallSendBuffer(pagi_ref.Server):
    """A server whose accepted sockets have a 4 KiB send buffer, so that a
    large certificate chain cannot leave in one go."""

    def _stream(self, sock, client):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return pagi_ref.Server._stream(self, sock, client)


def test_handshake_that_must_wait_for_the_kernel_to_take_its_flight(certs, tmp_path):
    # The server's first flight (a chain padded with 60 copies of the CA
    # certificate, ~40 KB) meets a full socket: the handshake waits for
    # writability in the reactor (SSLWantWriteError), then completes.
    chain = tmp_path / "chain.pem"
    with open(certs["server.pem"]) as f:
        leaf = f.read()
    with open(certs["ca.pem"]) as f:
        ca = f.read()
    chain.write_text(leaf + ca * 60)

    def app(scope, receive, send):
        yield receive()
        yield send({"type": "http.response.start", "status": 200, "headers": []})
        yield send({"type": "http.response.body", "body": b"waited"})

    config = pagi_ref.Config(port=0, lifespan="off", access_log=None,
                             ssl_certfile=str(chain), ssl_keyfile=certs["server.key"])
    server = _SmallSendBuffer(app, config)
    server.bind()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(10)
    try:
        raw.connect(server.address)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_context(certs).wrap_bio(incoming, outgoing, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        raw.sendall(outgoing.read())             # the ClientHello; then read nothing

        def handshake_waits_for_writability():
            return any(handler[1] is not None
                       and getattr(handler[1], "__name__", "") == "_writable_in_handshake"
                       for handler in list(server.loop._handlers.values()))
        wait_until(handshake_waits_for_writability)
        done = False
        while not done:
            incoming.write(raw.recv(65536))
            try:
                tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                pass
            raw.sendall(outgoing.read())
        tls.write(build_request("GET", "/", close=True))
        raw.sendall(outgoing.read())
        received = b""
        while True:
            try:
                data = tls.read(65536)
                if not data:
                    break           # the server's close_notify
                received += data
                continue
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                break
            data = raw.recv(65536)
            if not data:
                break
            incoming.write(data)
        assert received.startswith(b"HTTP/1.1 200 ") and received.endswith(b"waited")
    finally:
        raw.close()
        server.stop(timeout=2)
        thread.join(10)
