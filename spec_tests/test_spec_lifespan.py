"""Lifespan (docs/spec.md section 7)."""
import os
import tempfile

import pytest

from spec_wire import get_journal, json_body, new_token, request

clause = pytest.mark.clause


@pytest.fixture(scope="module")
def lifespan_entries(addr):
    entries = get_journal(addr, "lifespan")
    if not any(e.get("event") == "lifespan.startup" for e in entries):
        pytest.skip("pending: server does not implement lifespan yet (the application never "
                    "received lifespan.startup)")
    return entries


@clause("LIFE-2", "LIFE-1")
def test_startup_before_serving(addr, lifespan_entries):
    scope = lifespan_entries[0]["scope"]
    assert scope["type"] == "lifespan"
    assert scope["pagi"]["version"] == "0.3"
    assert scope["state"] in ("map", "null")   # state is optional upstream
    # this very request was served, so startup.complete was awaited first
    assert [e.get("event") for e in lifespan_entries if "event" in e][0] == "lifespan.startup"


@clause("LIFE-7")
def test_state_shallow_copy(addr, lifespan_entries):
    value = new_token()
    first = json_body(request(addr, "GET", "/state?op=mutate&value=" + value))
    assert first["has_state"]
    assert {"spec.shared", "spec.started"} <= set(first["keys"])
    second = json_body(request(addr, "GET", "/state"))
    assert value in second["shared"], "a shared object was not shared"
    assert "spec.private" not in second["keys"], "a top-level key leaked into another request"


@clause("LIFE-3")
def test_startup_failed_prevents_serving(own_server, lifespan_entries):
    with own_server(env={"PAGI_SPEC_LIFESPAN": "fail"}, wait=False) as srv:
        try:
            srv.proc.wait(10)
        except Exception:
            pass
        assert not srv.listening.is_set(), "the server listened after lifespan.startup.failed"
        assert srv.proc.returncode not in (None, 0), srv.proc.returncode
        assert "spec-app: startup refused" in "\n".join(srv.log_since(0))


@clause("LIFE-5")
def test_shutdown_delivered_on_sigterm(own_server, lifespan_entries):
    marker = os.path.join(tempfile.gettempdir(), "pagi-spec-shutdown-%s" % new_token())
    try:
        with own_server(env={"PAGI_SPEC_LIFESPAN_FILE": marker}) as srv:
            assert request(srv.addr, "GET", "/hello").body == b"hello"
            assert srv.stop() == 0
        with open(marker) as f:
            assert f.read() == "shutdown\n"
    finally:
        if os.path.exists(marker):
            os.unlink(marker)
