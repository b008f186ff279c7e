"""Section 6, the `http` scope: every key of the spec's HTTP Connection Scope.

PAGI www spec, "HTTP Connection Scope" and "PAGI Encoding Differences"
(path: percent-decode, then UTF-8, falling back to the percent-decoded
bytes; pagi_ref renders those bytes as latin-1), "Cookie Header
Normalization"; RFC 9112 §3.2 (origin, absolute and asterisk forms).
"""
import pytest

from conftest import serve
from spec_wire import Reader, connect, exchange
from apputil import req, respond


@pytest.fixture(scope="module")
def srv():
    scopes = []

    def app(scope, receive, send):
        scopes.append(scope)
        yield from respond(send, 200, b"ok")

    with serve(app) as running:
        running.scopes = scopes
        yield running


def fetch_scope(srv, raw):
    n = len(srv.scopes)
    resp = exchange(srv.port, raw)
    assert resp.status == 200 and resp.body == b"ok"
    assert len(srv.scopes) == n + 1
    return srv.scopes[-1]


def header_values(scope, name):
    return [bytes(v) for k, v in scope["headers"] if k == name]


def test_every_scope_key_for_a_plain_get(srv):
    with connect(srv.port) as s:
        n = len(srv.scopes)
        s.sendall(req("/a/b?x=1&y=two", headers=[("X-Custom-Header", "Value")]))
        resp = Reader(s).read_response()
        assert resp.status == 200
        client_port = s.getsockname()[1]
    scope = srv.scopes[n]
    assert scope["type"] == "http"
    assert scope["pagi"] == {"version": "0.3", "spec_version": "0.3"}
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "GET"
    assert scope["scheme"] == "http"
    assert scope["path"] == "/a/b"
    assert scope["raw_path"] == b"/a/b"
    assert scope["query_string"] == b"x=1&y=two"
    assert scope["root_path"] == ""
    assert list(scope["client"]) == ["127.0.0.1", client_port]
    assert list(scope["server"]) == ["127.0.0.1", srv.port]
    assert isinstance(scope["state"], dict)
    assert isinstance(scope["extensions"], dict)
    conn = scope["pagi.connection"]
    assert conn is not None
    assert callable(conn.is_connected)
    headers = scope["headers"]
    assert isinstance(headers, list)
    for pair in headers:
        assert len(pair) == 2
        name, value = pair
        assert isinstance(name, bytes) and isinstance(value, bytes)
        assert name == name.lower()
    assert header_values(scope, b"host") == [b"test"]
    assert header_values(scope, b"x-custom-header") == [b"Value"]


def test_types_of_string_and_bytes_keys(srv):
    scope = fetch_scope(srv, req("/p?q=1"))
    for key in ("type", "http_version", "method", "scheme", "path", "root_path"):
        assert isinstance(scope[key], str), key
    for key in ("raw_path", "query_string"):
        assert isinstance(scope[key], bytes), key
    assert isinstance(scope["client"][0], str) and isinstance(scope["client"][1], int)


def test_http10_version_and_no_query(srv):
    scope = fetch_scope(srv, req("/ten", version="HTTP/1.0", host=False))
    assert scope["http_version"] == "1.0"
    assert scope["query_string"] == b""
    assert scope["path"] == "/ten"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "X-CUSTOM"])
def test_method_is_passed_through(srv, method):
    extra = [("Content-Length", "0")] if method in ("POST", "PUT", "PATCH") else []
    scope = fetch_scope(srv, req("/", method, extra))
    assert scope["method"] == method


def test_header_names_lower_cased_values_verbatim_and_order_kept(srv):
    scope = fetch_scope(srv, req("/", headers=[
        ("X-MiXeD", "CaSe Value"), ("ACCEPT", "*/*"), ("X-Dup", "1"), ("x-dup", "2"),
        ("X-Spaces", "   inner  spaces \t ")]))
    names = [k for k, _ in scope["headers"]]
    assert b"x-mixed" in names and b"accept" in names
    assert header_values(scope, b"x-mixed") == [b"CaSe Value"]
    assert header_values(scope, b"x-dup") == [b"1", b"2"]
    assert header_values(scope, b"x-spaces") == [b"inner  spaces"]  # OWS trimmed only
    assert names.index(b"x-mixed") < names.index(b"accept") < names.index(b"x-dup")


def test_several_cookie_headers_joined_into_one(srv):
    scope = fetch_scope(srv, req("/", headers=[
        ("Cookie", "a=1"), ("X-Between", "y"), ("Cookie", "b=2; c=3")]))
    assert header_values(scope, b"cookie") == [b"a=1; b=2; c=3"]
    assert header_values(scope, b"x-between") == [b"y"]


def test_single_cookie_header_untouched(srv):
    scope = fetch_scope(srv, req("/", headers=[("Cookie", "only=1; two=2")]))
    assert header_values(scope, b"cookie") == [b"only=1; two=2"]


def test_path_percent_decoded_as_utf8(srv):
    scope = fetch_scope(srv, req("/caf%C3%A9/a%20b/%E2%82%AC?k=%C3%A9"))
    assert scope["path"] == "/caf\u00e9/a b/\u20ac"
    assert scope["raw_path"] == b"/caf%C3%A9/a%20b/%E2%82%AC"
    assert scope["query_string"] == b"k=%C3%A9"  # never decoded


def test_encoded_slash_is_decoded_in_path_and_kept_in_raw_path(srv):
    scope = fetch_scope(srv, req("/a%2Fb"))
    assert scope["path"] == "/a/b"
    assert scope["raw_path"] == b"/a%2Fb"


def test_invalid_utf8_path_falls_back_to_percent_decoded_bytes_as_latin1(srv):
    scope = fetch_scope(srv, req("/x%FF%FEy/%C3"))
    assert scope["raw_path"] == b"/x%FF%FEy/%C3"
    assert scope["path"] == b"/x\xff\xfey/\xc3".decode("latin-1")


def test_query_string_is_raw_and_path_without_query(srv):
    scope = fetch_scope(srv, req("/search?q=a+b%20c&empty=&flag"))
    assert scope["path"] == "/search"
    assert scope["raw_path"] == b"/search"
    assert scope["query_string"] == b"q=a+b%20c&empty=&flag"


def test_absolute_form_target(srv):
    scope = fetch_scope(srv, b"GET http://example.com/p/q?z=1 HTTP/1.1\r\n"
                             b"Host: example.com\r\n\r\n")
    assert scope["method"] == "GET"
    assert scope["path"] == "/p/q"
    assert scope["raw_path"] == b"/p/q"
    assert scope["query_string"] == b"z=1"


def test_absolute_form_without_path_is_root(srv):
    scope = fetch_scope(srv, b"GET http://example.com HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert scope["path"] == "/"
    assert scope["query_string"] == b""


def test_asterisk_form_options(srv):
    scope = fetch_scope(srv, b"OPTIONS * HTTP/1.1\r\nHost: test\r\n\r\n")
    assert scope["method"] == "OPTIONS"
    assert scope["path"] == "*"
    assert scope["raw_path"] == b"*"
    assert scope["query_string"] == b""


def test_each_request_on_a_connection_gets_its_own_scope_and_connection_object(srv):
    with connect(srv.port) as s:
        r = Reader(s)
        n = len(srv.scopes)
        s.sendall(req("/one") + req("/two"))
        assert r.read_response().status == 200
        assert r.read_response().status == 200
    one, two = srv.scopes[n:n + 2]
    assert one is not two
    assert one["pagi.connection"] is not two["pagi.connection"]
    assert one["client"] == two["client"]
    assert (one["path"], two["path"]) == ("/one", "/two")


def test_root_path_from_config():
    scopes = []

    def app(scope, receive, send):
        scopes.append(scope)
        yield from respond(send, 200, b"ok")

    with serve(app, root_path="/mount") as running:
        resp = exchange(running.port, req("/mount/x"))
    assert resp.status == 200
    assert scopes[0]["root_path"] == "/mount"
