"""The `tls` extension (docs/spec.md section 8) seen through a TLS connection.

These tests start their own pagi_ref with `--ssl-certfile`/`--ssl-keyfile`
(a certificate made here with the `openssl` command), so against an
external server they report "not observable".  The client is the standard
library's `ssl` module; the /scope routes of the spec app (APP.md) report
the extension's fields with their kinds.
"""
import json
import socket
import ssl

import pytest

from spec_wire import Reader, WebSocket, build_request, json_body, read_chunked_stream

clause = pytest.mark.clause

TLS_KINDS = {"server_cert": ("text", "null"), "client_cert_chain": ("list",),
             "client_cert_name": ("text", "null"), "client_cert_error": ("text", "null"),
             "tls_version": ("integer", "null"), "cipher_suite": ("integer", "null")}


@pytest.fixture
def tls_server(own_server, certificate):
    certfile, keyfile = certificate
    with own_server(["--ssl-certfile", certfile, "--ssl-keyfile", keyfile]) as srv:
        yield srv, certfile


def tls_connect(addr, cafile):
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(addr, timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


def tls_scope(addr, cafile, path="/scope", headers=()):
    with tls_connect(addr, cafile) as sock:
        sock.sendall(build_request("GET", path, headers=headers, close=True))
        return json_body(Reader(sock).read_response())


def check_tls_fields(tls):
    assert set(tls) == set(TLS_KINDS), tls
    for key, kinds in TLS_KINDS.items():
        assert tls[key]["kind"] in kinds, (key, tls[key])
    assert all(k == "text" for k in tls["client_cert_chain"]["item_kinds"])


@clause("TLS-2")
def test_tls_extension_on_http_and_sse(tls_server):
    srv, certfile = tls_server
    s = tls_scope(srv.addr, certfile)
    assert s["scheme"] == "https"
    check_tls_fields(s["tls"])
    # No client certificate was sent: the chain is empty, the name null.
    assert s["tls"]["client_cert_chain"]["value"] == []
    assert s["tls"]["client_cert_name"]["value"] is None
    with open(certfile) as f:
        assert s["tls"]["server_cert"]["value"] == f.read()
    with tls_connect(srv.addr, certfile) as sock:
        sock.sendall(build_request("GET", "/scope", headers=[("Accept", "text/event-stream")]))
        reader = Reader(sock)
        resp = reader.read_response(head_request=True)
        assert resp.status == 200
        data, _ended = read_chunked_stream(reader)
    text = data.decode()
    s = json.loads(text[text.index("data: ") + 6:].split("\n")[0])
    assert s["type"] == "sse" and s["scheme"] == "https"
    check_tls_fields(s["tls"])


@clause("TLS-2")
def test_tls_extension_on_websocket(tls_server):
    srv, certfile = tls_server
    with tls_connect(srv.addr, certfile) as sock:
        sock.sendall(b"GET /ws/scope HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")

        class Over:
            reader = Reader(sock)

            def send(self, raw):
                sock.sendall(raw)

        client = Over()
        resp = client.reader.read_response(head_request=True)
        assert resp.status == 101
        kind, text = WebSocket(client).recv()
    assert kind == "text"
    s = json.loads(text)
    assert s["type"] == "websocket" and s["scheme"] == "wss"
    check_tls_fields(s["tls"])


@clause("TLS-3")
def test_tls_terminated_with_alpn_and_tls_1_2_at_least(tls_server):
    srv, certfile = tls_server
    with tls_connect(srv.addr, certfile) as sock:
        assert sock.selected_alpn_protocol() == "http/1.1"
        version = sock.version()
        assert version in ("TLSv1.2", "TLSv1.3")
        sock.sendall(build_request("GET", "/scope", close=True))
        s = json_body(Reader(sock).read_response())
    assert s["tls"]["tls_version"]["value"] == {"TLSv1.2": 0x0303,
                                                "TLSv1.3": 0x0304}[version]
