"""Core: the application interface, scope basics, events, types, errors."""
import pytest

from spec_wire import BYTES, TEXT, Client, json_body, new_token, request, wait_journal

clause = pytest.mark.clause


def scope_of(addr, path="/scope", **kw):
    resp = request(addr, "GET", path, **kw)
    assert resp.status == 200, resp
    return json_body(resp)


@clause("CORE-APP-2")
def test_async_def_application(addr):
    resp = request(addr, "POST", "/async", body=b"ping")
    assert resp.status == 200
    assert resp.body == b"async:ping"


@clause("CORE-APP-3", "CORE-APP-2")
def test_function_returning_a_generator_is_an_application(addr):
    # app.py's `app` is a plain function that returns the handler's generator.
    resp = request(addr, "GET", "/hello")
    assert resp.status == 200
    assert resp.body == b"hello"


@clause("CORE-APP-4")
def test_call_returning_neither_generator_nor_coroutine_is_a_500(addr, server):
    mark = server.log_mark() if server.owned else 0
    with Client(addr) as c:
        resp = c.request("GET", "/not-an-app")
        assert resp.status == 500
        assert resp.header("connection", b"").lower() == b"close"
        assert c.closed()
    if server.owned:
        text = server.wait_log(mark, lambda t: "TypeError" in t)
        assert "TypeError" in text, text


@clause("CORE-APP-6")
def test_server_survives_application_errors(addr):
    for path in ("/raise-before", "/raise-after", "/no-response", "/not-an-app"):
        try:
            request(addr, "GET", path)
        except EOFError:
            pass
    resp = request(addr, "GET", "/hello")
    assert resp.status == 200 and resp.body == b"hello"


@clause("CORE-SCOPE-1", "HTTP-SCOPE-1")
def test_scope_is_a_dict_with_type(addr):
    s = scope_of(addr)
    assert s["type"] == "http"
    assert s["kinds"]["type"] in TEXT
    assert all(isinstance(k, str) for k in s["keys"])


@clause("CORE-SCOPE-2")
def test_scope_pagi_versions(addr):
    s = scope_of(addr)
    assert s["kinds"]["pagi"] == "map"
    assert s["pagi"]["version"] == "0.3"
    assert s["pagi_kinds"]["version"] in TEXT
    if "spec_version" in s["pagi"]:
        assert s["pagi_kinds"]["spec_version"] in TEXT


@clause("REF-CORE-SCOPE-2")
def test_scope_pagi_spec_version_is_always_set(addr):
    assert scope_of(addr)["pagi"].get("spec_version") == "0.3"


@clause("CORE-SCOPE-4")
def test_scope_extensions_dict_of_dicts(addr):
    s = scope_of(addr)
    if "extensions" not in s["keys"]:
        return   # absent means no extension
    assert s["kinds"]["extensions"] == "map"
    assert all(t == "map" for t in s["extensions"].values()), s["extensions"]


@clause("REF-CORE-SCOPE-4")
def test_scope_extensions_always_present(addr):
    assert scope_of(addr)["kinds"].get("extensions") == "map"


@clause("CORE-SCOPE-5", "HTTP-SCOPE-20")
def test_scope_changes_do_not_leak_between_requests(addr):
    # /scope sets scope["spec.mark"] after describing it; the next request on
    # the same connection must not see it.
    with Client(addr) as c:
        first = json_body(c.request("GET", "/scope"))
        second = json_body(c.request("GET", "/scope"))
    assert "spec.mark" not in first["keys"]
    assert "spec.mark" not in second["keys"]


@clause("CORE-EVT-1", "HTTP-REQ-1", "CORE-TYPE-1", "CORE-TYPE-3")
def test_received_event_shape_and_types(addr):
    resp = request(addr, "POST", "/events", body=b"abc")
    events = json_body(resp)
    assert events, events
    for e in events:
        assert e["type_kind"] in TEXT and "." in e["type"]
        assert e["body_kind"] in BYTES
        assert e["more_kind"] in ("integer", "boolean")
        assert e["more"] in (0, 1, False, True)


@clause("CORE-EVT-2")
@pytest.mark.parametrize("case", ["extra-field-start", "extra-field-body"])
def test_extra_fields_are_not_errors(addr, case):
    resp = request(addr, "GET", "/bad-event?case=" + case)
    assert resp.status == 200
    report = json_body(resp)
    assert report["raised"] is False, report


@clause("CORE-TYPE-2", "HTTP-SCOPE-18")
def test_text_fields_are_str_and_bytes_fields_bytes(addr):
    s = scope_of(addr, "/scope/x?y=1")
    t = s["kinds"]
    for key in ("type", "http_version", "method", "scheme", "path", "root_path"):
        assert t[key] in TEXT, (key, t[key])
    for key in ("raw_path", "query_string"):
        if key in t:
            assert t[key] in BYTES, (key, t[key])
    assert t["headers"] == "list" and s["headers_ok"]


@clause("CORE-DONE-1", "HTTP-FRAME-5")
def test_next_request_after_application_finished(addr):
    with Client(addr) as c:
        for _ in range(3):
            resp = c.request("GET", "/hello")
            assert resp.status == 200 and resp.body == b"hello"


@clause("CORE-DONE-3")
def test_return_value_is_ignored(addr):
    with Client(addr) as c:
        resp = c.request("GET", "/return-value")
        assert resp.status == 200 and resp.body == b"ok"
        resp = c.request("GET", "/hello")
        assert resp.body == b"hello"


def bad_event(addr, case):
    resp = request(addr, "GET", "/bad-event?case=" + case)
    assert resp.status == 200, resp
    report = json_body(resp)
    if report.get("inexpressible"):
        pytest.skip("not observable: the application's language cannot express %s" % case)
    return report


@clause("CORE-ERR-1")
@pytest.mark.parametrize("case", ["missing-status", "no-type"])
def test_missing_field_fails_the_send(addr, case):
    report = bad_event(addr, case)
    assert report["raised"] is True, report


@clause("CORE-ERR-2")
@pytest.mark.parametrize("case", ["status-text", "headers-not-list", "header-text-value",
                                  "header-triple", "body-text", "body-integer", "more-text",
                                  "not-a-map"])
def test_mistyped_field_fails_the_send(addr, case):
    report = bad_event(addr, case)
    assert report["raised"] is True, report


@clause("CORE-ERR-3", "CORE-EXT-1")
@pytest.mark.parametrize("case", ["unknown-type", "unadvertised-extension"])
def test_unknown_event_type_fails_the_send(addr, case):
    report = bad_event(addr, case)
    assert report["raised"] is True, report


@clause("CORE-ERR-5")
@pytest.mark.parametrize("path", ["/bad-event?case=missing-status", "/bad-event?case=no-type",
                                  "/bad-event?case=unknown-type",
                                  "/bad-event?case=double-start",
                                  "/bad-header?case=crlf-value", "/bad-header?case=nul-name"])
def test_a_failed_send_has_no_effect(addr, path):
    # the application goes on after the failure: its report arrives as a
    # well-formed response, the only one on the wire
    case = path.partition("case=")[2]
    with Client(addr) as c:
        resp = c.request("GET", path)
        assert resp.status == 200 and resp.complete, resp
        report = json_body(resp)
        assert report["case"] == case, report
        assert c.request("GET", "/hello").body == b"hello"


@clause("CORE-ERR-4")
@pytest.mark.parametrize("case,event_type,field", [
    ("missing-status", "http.response.start", "status"),
    ("status-text", "http.response.start", "status"),
    ("headers-not-list", "http.response.start", "headers"),
    ("body-text", "http.response.body", "body"),
    ("more-text", "http.response.body", "more"),
])
def test_event_error_names_event_and_field(addr, case, event_type, field):
    report = bad_event(addr, case)
    assert report["raised"] is True
    assert report["category"] == "invalid-event", report
    assert event_type in report["message"] and field in report["message"], report


@clause("CORE-ERR-4")
def test_event_error_for_unknown_type_names_the_type(addr):
    report = bad_event(addr, "unknown-type")
    assert report["category"] == "invalid-event", report
    assert "http.response.bogus" in report["message"], report


@clause("CORE-ERR-6", "CORE-DISC-1", "HTTP-DISC-3")
def test_send_after_disconnect_is_a_silent_no_op(addr):
    token = new_token()
    c = Client(addr)
    c.send(b"POST /conn?mode=body&token=%s HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
           % token.encode() + b"0123456789")
    c.close()
    entries = wait_journal(addr, token, lambda es: any(e.get("at") == "end" for e in es))
    sent = [e for e in entries if e.get("at") == "send_after_disconnect"]
    assert sent, entries
    assert sent[0]["raised"] is False, sent


@clause("CORE-EXT-2")
def test_fullflush_extension(addr):
    resp = request(addr, "GET", "/fullflush")
    assert resp.status == 200
    if resp.header("x-fullflush") == b"absent":
        pytest.skip("not observable: the server does not advertise fullflush (MAY)")
    assert resp.body == b"ab", resp.body


@clause("TLS-1", "HTTP-SCOPE-19")
def test_no_tls_extension_on_cleartext(addr):
    assert "tls" not in scope_of(addr)["extensions"]
