"""Proxies in front (--proxy-headers, --forwarded-allow-ips) and the
server's own response fields (--server-header, --date-header), seen from
the client: the scope the application gets, the bytes on the wire.  The
peer is always 127.0.0.1 here, so the allow list decides whether it is a
trusted proxy.
"""
import json
import subprocess
import sys
import threading

import pytest

import pagi_ref
from apputil import ROOT, SCRIPT, req
from conftest import serve
from spec_wire import (WebSocket, connect, exchange, parse_sse, read_chunked_stream,
                       sse_request, ws_accept_value, ws_handshake)


def scope_app(scope, receive, send):
    """Answers with the scope's client, scheme and forwarding headers; on a
    WebSocket, accepts (or, at /deny, denies) and says the same."""
    facts = {"client": scope["client"], "scheme": scope["scheme"],
             "headers": [[n.decode("latin-1"), v.decode("latin-1")]
                         for n, v in scope["headers"] if b"forward" in n]}
    if scope["type"] == "websocket":
        yield receive()
        if scope["path"] == "/deny":
            yield send({"type": "websocket.http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain")]})
            yield send({"type": "websocket.http.response.body", "body": b"no"})
            return
        yield send({"type": "websocket.accept"})
        yield send({"type": "websocket.send", "text": json.dumps(facts)})
        yield send({"type": "websocket.close"})
        return
    if scope["type"] == "sse":
        yield send({"type": "sse.start"})
        yield send({"type": "sse.send", "data": json.dumps(facts)})
        yield send({"type": "sse.close"})
        return
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    yield send({"type": "http.response.body", "body": json.dumps(facts).encode()})


def ask(srv, headers):
    resp = exchange(srv.port, req("/", headers=list(headers) + [("Connection", "close")]))
    assert resp.status == 200, resp
    return json.loads(resp.body)


TRUSTED = dict(proxy_headers=True)                            # the default: 127.0.0.1
UNTRUSTED = dict(proxy_headers=True, forwarded_allow_ips="10.0.0.1, 192.0.2.0/24")


# -- X-Forwarded-For / X-Forwarded-Proto ---------------------------------------------------

def test_a_trusted_proxy_sets_client_and_scheme():
    with serve(scope_app, **TRUSTED) as srv:
        got = ask(srv, [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Proto", "https")])
    assert got["client"] == ["203.0.113.7", 0]      # the proxy does not say the port
    assert got["scheme"] == "https"
    # The headers stay in the scope, as received.
    assert got["headers"] == [["x-forwarded-for", "203.0.113.7"],
                              ["x-forwarded-proto", "https"]]


def test_an_untrusted_peer_changes_nothing():
    with serve(scope_app, **UNTRUSTED) as srv:
        got = ask(srv, [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Proto", "https"),
                        ("Forwarded", "for=198.51.100.9;proto=https")])
    assert got["client"][0] == "127.0.0.1" and got["client"][1] > 0
    assert got["scheme"] == "http"
    assert len(got["headers"]) == 3


def test_proxy_headers_are_off_by_default():
    with serve(scope_app) as srv:
        got = ask(srv, [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Proto", "https")])
    assert got["client"][0] == "127.0.0.1" and got["scheme"] == "http"


@pytest.mark.parametrize("allow, xff, client", [
    # Read from the right: the nearest hop first; trusted proxies are
    # skipped and the first untrusted hop is the client -- whatever the
    # client wrote to the left of it.
    ("127.0.0.1, 10.0.0.0/8", "198.51.100.1, 192.0.2.9, 10.1.2.3", "192.0.2.9"),
    ("127.0.0.1", "198.51.100.1, 192.0.2.9", "192.0.2.9"),
    # Every hop trusted: the leftmost.
    ("127.0.0.1, 10.0.0.0/8", "10.0.0.1, 10.0.0.2", "10.0.0.1"),
    # "*" trusts every hop, so the leftmost, as uvicorn.
    ("*", "198.51.100.1, 192.0.2.9, 10.1.2.3", "198.51.100.1"),
    # A proxy named by an obfuscated identifier can be trusted by name.
    ("127.0.0.1, _edge", "198.51.100.1, _edge", "198.51.100.1"),
])
def test_the_rightmost_untrusted_hop_is_the_client(allow, xff, client):
    with serve(scope_app, proxy_headers=True, forwarded_allow_ips=allow) as srv:
        got = ask(srv, [("X-Forwarded-For", xff)])
    assert got["client"] == [client, 0]
    assert got["scheme"] == "http"


def test_repeated_x_forwarded_for_fields_are_one_list():
    with serve(scope_app, proxy_headers=True, forwarded_allow_ips="127.0.0.1, 10.0.0.0/8") as srv:
        got = ask(srv, [("X-Forwarded-For", "198.51.100.1, 192.0.2.9"),
                        ("X-Forwarded-For", "10.0.0.3")])
    assert got["client"] == ["192.0.2.9", 0]


@pytest.mark.parametrize("xff, client", [
    ("192.0.2.1:8080", ["192.0.2.1", 8080]),
    ("2001:db8::1", ["2001:db8::1", 0]),
    ("[2001:db8::1]:443", ["2001:db8::1", 443]),
    ("2001:0db8:0000::0001", ["2001:db8::1", 0]),      # written the usual way
    ("unknown", None),                                  # RFC 7239 §6.4
    ("not an address", None),
])
def test_what_a_hop_may_look_like(xff, client):
    with serve(scope_app, **TRUSTED) as srv:
        got = ask(srv, [("X-Forwarded-For", xff)])
    assert got["client"] == client


@pytest.mark.parametrize("proto, scheme", [
    ("https", "https"), ("HTTPS", "https"), ("http", "http"), ("wss", "https"),
    ("ftp", "http"),          # not a scheme of ours: ignored
    ("", "http"),
])
def test_x_forwarded_proto_values(proto, scheme):
    with serve(scope_app, **TRUSTED) as srv:
        got = ask(srv, [("X-Forwarded-Proto", proto)])
    assert got["scheme"] == scheme
    assert got["client"][0] == "127.0.0.1"         # no X-Forwarded-For: the peer


def test_x_forwarded_proto_follows_the_client_hop_when_the_lists_line_up():
    with serve(scope_app, proxy_headers=True, forwarded_allow_ips="127.0.0.1, 10.0.0.0/8") as srv:
        lined_up = ask(srv, [("X-Forwarded-For", "192.0.2.9, 10.0.0.3"),
                             ("X-Forwarded-Proto", "https, http")])
        nearest = ask(srv, [("X-Forwarded-For", "192.0.2.9, 10.0.0.3"),
                            ("X-Forwarded-Proto", "https")])
    assert lined_up == dict(lined_up, client=["192.0.2.9", 0], scheme="https")
    assert nearest["scheme"] == "https"


# -- RFC 7239 Forwarded -----------------------------------------------------------------------

@pytest.mark.parametrize("forwarded, client, scheme", [
    ('for=192.0.2.60;proto=https;by=203.0.113.43', ["192.0.2.60", 0], "https"),
    ('for="[2001:db8:cafe::17]:4711"', ["2001:db8:cafe::17", 4711], "http"),
    ('For="192.0.2.43:47011";PROTO=HTTPS', ["192.0.2.43", 47011], "https"),
    ('for="\\192.0.2.\\60"', ["192.0.2.60", 0], "http"),      # quoted-pairs undone
    # Several hops, read from the right past trusted proxies; the scheme is
    # that of the client's own hop.
    ('for=198.51.100.1;proto=http, for=192.0.2.60;proto=https, for=10.0.0.5;proto=http',
     ["192.0.2.60", 0], "https"),
    ('for=unknown;proto=https', None, "https"),
    ('for=_hidden, for=10.0.0.5', None, "http"),
    ('proto=https', "peer", "https"),                           # no for=: the peer stays
])
def test_forwarded(forwarded, client, scheme):
    with serve(scope_app, proxy_headers=True, forwarded_allow_ips="127.0.0.1, 10.0.0.0/8") as srv:
        got = ask(srv, [("Forwarded", forwarded)])
    if client == "peer":
        assert got["client"][0] == "127.0.0.1"
    else:
        assert got["client"] == client
    assert got["scheme"] == scheme


def test_repeated_forwarded_fields_are_one_list():
    with serve(scope_app, proxy_headers=True, forwarded_allow_ips="127.0.0.1, 10.0.0.0/8") as srv:
        got = ask(srv, [("Forwarded", "for=192.0.2.60;proto=https"),
                        ("Forwarded", "for=10.0.0.5")])
    assert got["client"] == ["192.0.2.60", 0] and got["scheme"] == "https"


@pytest.mark.parametrize("forwarded", [
    "for=[2001:db8::1]",                 # an IPv6 node must be quoted (RFC 7239 §6)
    'for="192.0.2.60',                   # unterminated quoted-string
    "for=192.0.2.60;for=192.0.2.61",     # a parameter twice in one element (§4)
    "for 192.0.2.60",
    "for=192.0.2.60;;proto=https",
])
def test_a_forwarded_field_that_does_not_parse_is_not_believed(forwarded):
    with serve(scope_app, **TRUSTED) as srv:
        got = ask(srv, [("Forwarded", forwarded + ";proto=https"
                         if "proto" not in forwarded else forwarded)])
    assert got["client"][0] == "127.0.0.1" and got["scheme"] == "http"


def test_x_forwarded_wins_over_forwarded():
    with serve(scope_app, **TRUSTED) as srv:
        got = ask(srv, [("Forwarded", "for=198.51.100.9;proto=https"),
                        ("X-Forwarded-For", "203.0.113.7")])
    # Forwarded is ignored entirely, its proto too.
    assert got["client"] == ["203.0.113.7", 0] and got["scheme"] == "http"


def test_hostile_forwarded_values_cost_linear_time():
    # Bounded by max_header_size like any field; the parser must not
    # backtrack on quotes and backslashes.
    value = b'for="' + b"\\a" * 3000
    assert pagi_ref.forwarded_elements(value) is None
    assert pagi_ref.forwarded_elements(b"for=" + b"a;for=a," * 1000) is None
    hops = [(b"x-forwarded-for", b", ".join([b"10.0.0.1"] * 1500))]
    assert pagi_ref.forwarded(hops, pagi_ref.TrustedPeers("10.0.0.0/8")) == ("10.0.0.1", None)


# -- WebSocket ------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, proto, scheme", [
    (TRUSTED, "https", "wss"),
    (TRUSTED, "http", "ws"),
    (TRUSTED, "wss", "wss"),
    (UNTRUSTED, "https", "ws"),
])
def test_websocket_scheme_from_a_proxy(config, proto, scheme):
    with serve(scope_app, **config) as srv:
        client, resp = ws_handshake(("127.0.0.1", srv.port), "/",
                                    headers=[("X-Forwarded-Proto", proto),
                                             ("X-Forwarded-For", "203.0.113.7")])
        with client:
            assert resp.status == 101
            _fin, _opcode, payload = WebSocket(client).recv_frame()
    got = json.loads(payload)
    assert got["scheme"] == scheme
    if config is TRUSTED:
        assert got["client"] == ["203.0.113.7", 0]
    else:
        assert got["client"][0] == "127.0.0.1"


def test_an_event_stream_scope_too():
    with serve(scope_app, **TRUSTED) as srv:
        client, resp = sse_request(("127.0.0.1", srv.port), "/",
                                   headers=[("X-Forwarded-For", "203.0.113.7"),
                                            ("X-Forwarded-Proto", "https")])
        with client:
            assert resp.status == 200
            data, ended = read_chunked_stream(client.reader)
            assert ended
            events = parse_sse(data.decode())
    got = json.loads(events[0]["data"])
    assert got["client"] == ["203.0.113.7", 0] and got["scheme"] == "https"


def test_the_access_log_names_the_client_the_proxy_names(tmp_path):
    log = tmp_path / "access.log"
    with serve(scope_app, access_log=str(log), **TRUSTED) as srv:
        ask(srv, [("X-Forwarded-For", "203.0.113.7")])
        client, resp = ws_handshake(("127.0.0.1", srv.port), "/",
                                    headers=[("X-Forwarded-For", "198.51.100.4")])
        with client:
            assert resp.status == 101
            WebSocket(client).recv_frame()
        ask(srv, [("X-Forwarded-For", "unknown")])
    lines = log.read_text().splitlines()
    # (The WebSocket's line is written when its session ends: any order.)
    assert sorted(l.split()[0] for l in lines) == ["-", "198.51.100.4", "203.0.113.7"], lines


# -- configuration --------------------------------------------------------------------------------

def test_a_bad_allow_list_is_refused_naming_the_field():
    with pytest.raises(pagi_ref.ConfigError, match="forwarded_allow_ips"):
        pagi_ref.Config(forwarded_allow_ips="10.0.0.0/33")
    done = subprocess.run([sys.executable, SCRIPT, "pagi_ref:_demo_app",
                           "--forwarded-allow-ips", "10.0.0.0/xx"],
                          cwd=ROOT, capture_output=True, timeout=30)
    assert done.returncode == 2 and b"forwarded_allow_ips" in done.stderr


def test_trusted_peers_match_networks_names_and_mapped_addresses():
    trusted = pagi_ref.TrustedPeers("127.0.0.1, 10.0.0.0/8, ::1, _edge")
    assert trusted("127.0.0.1") and trusted("10.200.0.1") and trusted("::1")
    assert trusted("::ffff:127.0.0.1")          # a dual-stack listener's IPv4 peer
    assert trusted("_edge") and not trusted("_other")
    assert not trusted("127.0.0.2") and not trusted("11.0.0.1") and not trusted("")
    assert pagi_ref.TrustedPeers("*")("anything")


# -- the Server and Date fields ---------------------------------------------------------------------

def header_names(resp):
    return [n for n, _v in resp.headers]


def plain_app(scope, receive, send):
    if scope["path"] == "/own":
        headers = [(b"server", b"mine/1.0"), (b"date", b"Thu, 01 Jan 1970 00:00:00 GMT")]
    else:
        headers = [(b"content-type", b"text/plain")]
    yield send({"type": "http.response.start", "status": 200, "headers": headers})
    yield send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("config, server, date", [
    ({}, True, True),
    ({"server_header": False}, False, True),
    ({"date_header": False}, True, False),
    ({"server_header": False, "date_header": False}, False, False),
])
def test_server_and_date_on_a_response(config, server, date):
    with serve(plain_app, **config) as srv:
        resp = exchange(srv.port, req("/", headers=[("Connection", "close")]))
        own = exchange(srv.port, req("/own", headers=[("Connection", "close")]))
    assert resp.header_all("server") == ([b"pagi_ref"] if server else [])
    assert len(resp.header_all("date")) == (1 if date else 0)
    # The application's own fields win, once each, whatever the options.
    assert own.header_all("server") == [b"mine/1.0"]
    assert own.header_all("date") == [b"Thu, 01 Jan 1970 00:00:00 GMT"]


@pytest.mark.parametrize("config, server, date", [
    ({}, True, True),
    ({"server_header": False, "date_header": False}, False, False),
])
def test_server_and_date_on_generated_errors(config, server, date):
    entered = threading.Event()

    def holding_app(scope, receive, send):
        entered.set()
        yield receive()          # waits for a body that does not come
        yield from plain_app(scope, receive, send)

    with serve(holding_app, max_connections=1, **config) as srv:
        bad = exchange(srv.port, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        assert bad.status == 400
        with connect(srv.port) as held:
            held.sendall(req("/", headers=[("Content-Length", "5")]))
            assert entered.wait(10)
            refused = exchange(srv.port, req("/"))
        assert refused.status == 503
    for resp in (bad, refused):
        assert resp.header_all("server") == ([b"pagi_ref"] if server else []), resp
        assert len(resp.header_all("date")) == (1 if date else 0), resp


@pytest.mark.parametrize("config, server, date", [
    ({}, True, True),
    ({"server_header": False}, False, True),
    ({"date_header": False}, True, False),
])
def test_server_and_date_on_websocket_heads(config, server, date):
    with serve(scope_app, **config) as srv:
        client, accepted = ws_handshake(("127.0.0.1", srv.port), "/")
        client.close()
        client, denied = ws_handshake(("127.0.0.1", srv.port), "/deny")
        client.close()
        client, refused = ws_handshake(("127.0.0.1", srv.port), "/", version=b"7")
        client.close()
    assert accepted.status == 101
    assert accepted.header("sec-websocket-accept") == ws_accept_value(accepted.ws_key)
    assert denied.status == 403
    assert refused.status == 426
    for resp in (accepted, denied, refused):
        assert resp.header_all("server") == ([b"pagi_ref"] if server else []), resp
        assert len(resp.header_all("date")) == (1 if date else 0), resp


def test_server_header_options_on_the_command_line():
    from apputil import ServerProcess
    with ServerProcess([SCRIPT, "pagi_ref:_demo_app", "--port", "0", "--no-server-header",
                        "--no-access-log"]) as proc:
        _host, port = proc.wait_listening()
        resp = exchange(port, req("/", headers=[("Connection", "close")]))
        assert resp.status == 200 and resp.header_all("server") == []
        assert len(resp.header_all("date")) == 1
        assert proc.stop() == 0
