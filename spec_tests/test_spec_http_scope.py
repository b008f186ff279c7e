"""HTTP: the keys of the http scope (docs/spec.md section 2.1)."""
import pytest

from spec_wire import TEXT, Client, json_body, new_token, request, send_raw, wait_journal

clause = pytest.mark.clause


def scope_of(addr, path="/scope", **kw):
    resp = request(addr, kw.pop("method", "GET"), path, **kw)
    assert resp.status == 200, resp
    return json_body(resp)


@clause("HTTP-SCOPE-2")
@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_http_version(addr, version):
    assert scope_of(addr, version=version)["http_version"] == version


@clause("HTTP-SCOPE-3")
@pytest.mark.parametrize("method", ["GET", "POST", "PATCH", "DELETE", "X-CUSTOM_1"])
def test_upper_case_method(addr, method):
    assert scope_of(addr, method=method)["method"] == method


@clause("REF-HTTP-SCOPE-3")
def test_lower_case_method_passed_as_sent(addr):
    assert scope_of(addr, method="Get")["method"] == "Get"


@clause("HTTP-SCOPE-4")
def test_scheme_http(addr):
    assert scope_of(addr)["scheme"] == "http"


@clause("HTTP-SCOPE-5", "HTTP-SCOPE-6")
def test_path_percent_decoded_and_utf8(addr):
    s = scope_of(addr, "/scope/caf%C3%A9%20x")
    assert s.get("raw_path", "/scope/caf%C3%A9%20x") == "/scope/caf%C3%A9%20x"
    assert s["path"] == "/scope/caf\u00e9 x"


@clause("REF-HTTP-SCOPE-5")
def test_raw_path_always_present(addr):
    assert scope_of(addr, "/scope/a%20b")["raw_path"] == "/scope/a%20b"


@clause("HTTP-SCOPE-6")
def test_encoded_slash_is_decoded_in_path_only(addr):
    s = scope_of(addr, "/scope/a%2Fb")
    assert s["path"] == "/scope/a/b"
    assert s.get("raw_path", "/scope/a%2Fb") == "/scope/a%2Fb"


@clause("REF-HTTP-SCOPE-6")
def test_invalid_percent_escape_kept(addr):
    s = scope_of(addr, "/scope/100%25/%zz/%4")
    assert s["path"] == "/scope/100%/%zz/%4"
    assert s["raw_path"] == "/scope/100%25/%zz/%4"


@clause("HTTP-SCOPE-7")
def test_path_invalid_utf8_falls_back_to_the_bytes(addr):
    # The app reports a path of raw bytes one character per byte (APP.md),
    # so the fallback reads as latin-1 here whatever the language.
    resp = request(addr, "GET", "/scope/%FF%FEok")
    assert resp.status == 200, "a path that is not UTF-8 was rejected: %r" % resp
    assert json_body(resp)["path"] == "/scope/\u00ff\u00feok"


@clause("REF-HTTP-SCOPE-7")
def test_path_invalid_utf8_is_latin1(addr):
    s = scope_of(addr, "/scope/%FF%FEok")
    assert s["path"] == "/scope/\u00ff\u00feok"
    assert s["raw_path"] == "/scope/%FF%FEok"


@clause("HTTP-SCOPE-8")
@pytest.mark.parametrize("target,qs", [
    ("/scope?x=%20&y=caf%C3%A9&&z", "x=%20&y=caf%C3%A9&&z"),
    ("/scope", ""),
    ("/scope?", ""),
    ("/scope?a=1?b=2", "a=1?b=2"),
])
def test_query_string_exact(addr, target, qs):
    s = scope_of(addr, target)
    assert s["query_string"] == qs
    assert s.get("raw_path", "/scope") == "/scope"


@clause("HTTP-SCOPE-9")
def test_asterisk_form(addr):
    s = scope_of(addr, "*", method="OPTIONS")
    assert s["path"] == "*"
    assert s["raw_path"] == "*"


@clause("HTTP-SCOPE-9")
def test_asterisk_form_with_get_is_400(addr):
    resp, closed = send_raw(addr, b"GET * HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp is not None and resp.status == 400
    assert closed


def raw_headers(addr):
    raw = (b"GET /scope HTTP/1.1\r\nHost: spec.test\r\nX-Mixed-Case: Value  \r\n"
           b"X-Dup: 1\r\nX-Other:\tt\r\nX-Dup: 2\r\nX-Bin: caf\xe9 \x80\r\n"
           b"Connection: close\r\n\r\n")
    resp, _ = send_raw(addr, raw)
    return json_body(resp)


@clause("HTTP-SCOPE-11")
def test_headers_lower_case_values_without_white_space(addr):
    s = raw_headers(addr)
    assert s["headers_ok"]
    names = [n for n, _v in s["headers"]]
    assert names == [n.lower() for n in names]
    pairs = [tuple(p) for p in s["headers"]]
    assert ("x-mixed-case", "Value") in pairs
    assert ("x-other", "t") in pairs
    assert ("x-bin", "caf\u00e9 \u0080") in pairs
    assert {"host", "x-dup"} <= set(names)


@clause("REF-HTTP-SCOPE-11")
def test_headers_in_order_repeated_fields_kept_apart(addr):
    s = raw_headers(addr)
    pairs = [tuple(p) for p in s["headers"]]
    assert [v for n, v in pairs if n == "x-dup"] == ["1", "2"]
    names = [n for n, _v in pairs]
    order = [n for n in names if n in ("host", "x-mixed-case", "x-dup", "x-other", "x-bin")]
    assert order == ["host", "x-mixed-case", "x-dup", "x-other", "x-dup", "x-bin"]


@clause("HTTP-SCOPE-12")
def test_cookie_headers_joined(addr):
    s = scope_of(addr, headers=[("Cookie", "a=1"), ("X-Between", "x"),
                                ("Cookie", "b=2; c=3")])
    cookies = [v for n, v in s["headers"] if n == "cookie"]
    assert cookies == ["a=1; b=2; c=3"]
    assert ["x-between", "x"] in s["headers"]


@clause("REF-HTTP-SCOPE-12")
def test_joined_cookie_comes_after_the_other_headers(addr):
    s = scope_of(addr, headers=[("Cookie", "a=1"), ("X-Between", "x"), ("Cookie", "b=2")])
    assert s["headers"][-1] == ["cookie", "a=1; b=2"], s["headers"]


@clause("HTTP-SCOPE-12")
def test_single_cookie_header_untouched(addr):
    s = scope_of(addr, headers=[("Cookie", "a=1;b=2")])
    assert [v for n, v in s["headers"] if n == "cookie"] == ["a=1;b=2"]


def assert_host_port(value, kinds, expected):
    """[host, port]: a text host and an integer port (a one-string-type
    language, whose port may be a string of digits, reports "string")."""
    assert value[0] == expected[0] and kinds[0] in TEXT
    assert str(value[1]) == str(expected[1]), value
    assert kinds[1] == "integer" or (kinds[1] == "string" and str(value[1]).isdigit()), kinds


def addresses(addr):
    with Client(addr) as c:
        local = c.sock.getsockname()
        resp = c.request("GET", "/scope", close=True)
    return json_body(resp), local


@clause("HTTP-SCOPE-13")
def test_client_and_server_addresses(addr):
    s, local = addresses(addr)
    if s.get("client") is not None:
        assert_host_port(s["client"], s["client_kinds"], local)
    if s.get("server") is not None:
        assert_host_port(s["server"], s["server_kinds"], addr)


@clause("REF-HTTP-SCOPE-13")
def test_client_and_server_always_present(addr):
    s, local = addresses(addr)
    assert s["client"] == [local[0], local[1]]
    assert s["server"] == [addr[0], addr[1]]


@clause("HTTP-SCOPE-14", "CONN-1")
def test_pagi_connection_present(addr):
    s = scope_of(addr)
    assert "pagi.connection" in s["keys"]
    assert {"is_connected", "disconnect_reason", "on_disconnect",
            "response_started"} <= set(s["connection_methods"])


@clause("HTTP-SCOPE-15", "TRANSPORT-1")
def test_pagi_transport_present(addr):
    s = scope_of(addr)
    assert "pagi.transport" in s["keys"]
    assert s["transport"] is not None


@clause("HTTP-SCOPE-16")
def test_state_is_a_dict(addr):
    s = scope_of(addr)
    if "state" in s["keys"]:
        assert s["kinds"]["state"] == "map"


@clause("REF-HTTP-SCOPE-16")
def test_state_always_present(addr):
    assert scope_of(addr)["kinds"].get("state") == "map"


def absolute_form(addr):
    raw = (b"GET http://example.com:8080/scope/abs?q=1 HTTP/1.1\r\nHost: spec.test\r\n"
           b"Connection: close\r\n\r\n")
    resp, _ = send_raw(addr, raw)
    assert resp.status == 200
    return json_body(resp)


@clause("HTTP-SCOPE-17")
def test_absolute_form_target(addr):
    s = absolute_form(addr)
    assert s["path"] == "/scope/abs"
    assert s.get("raw_path", "/scope/abs") == "/scope/abs"
    assert s["query_string"] == "q=1"
    assert s["scheme"] == "http"


@clause("REF-HTTP-SCOPE-17")
def test_absolute_form_authority_replaces_the_host_header(addr):
    s = absolute_form(addr)
    assert [v for n, v in s["headers"] if n == "host"] == ["example.com:8080"]


@clause("HTTP-SCOPE-18")
def test_header_pairs_are_bytes(addr):
    s = scope_of(addr, headers=[("X-A", "b")])
    assert s["headers_ok"] is True


@clause("HTTP-SCOPE-20", "CONN-1")
def test_each_request_gets_its_own_connection_object(addr):
    token = new_token()
    with Client(addr) as c:
        c.request("GET", "/conn?mode=identity&token=" + token)
        c.request("GET", "/conn?mode=identity&token=" + token)
    entries = wait_journal(addr, token, lambda es: len(es) >= 2)
    assert [e["same_as_previous"] for e in entries] == [False, False], entries
