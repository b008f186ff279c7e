"""The PAGI conformance application, for pagi_ref (spec_tests/APP.md).

Run it with:  python pagi_ref.py spec_tests/app.py:app --port 0

Every route is described in APP.md; the suite in this folder talks to it
over the wire only.  Handlers are generator applications (``event = yield
receive()``, ``yield send({...})``); ``app`` itself is a plain function that
returns the handler's generator (CORE-APP-3), and ``/async`` returns a
native coroutine (CORE-APP-2).

The journal (``/journal?token=T``) is kept in this process, so the server
under test must run the application in one process (no workers).
"""
import json
import os
import tempfile

import pagi_ref

# token -> list of JSON-able records.  The token comes from the query string
# of the request that writes; "lifespan" is written by the lifespan scope.
JOURNAL = {}
# token -> list of pagi.connection objects (for /conn?mode=identity).
_KEEP = {}
# Set by the lifespan scope when the server runs it.
LIFESPAN_STATE = {}

FILE_SIZE = 262144      # /file serves a file where byte i is i % 256


def record(token, entry):
    if token:
        JOURNAL.setdefault(token, []).append(entry)


# -- small helpers --------------------------------------------------------------

def query(scope):
    out = {}
    for part in scope.get("query_string", b"").decode("latin-1").split("&"):
        if part:
            k, _, v = part.partition("=")
            out[k] = v
    return out


def qint(q, name, default):
    try:
        return int(q.get(name, default))
    except ValueError:
        return default


def jsonable(value):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("latin-1")
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def kind(value):
    """APP.md's language-neutral name for the kind of a value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "map"
    return "object"


def read_body(receive):
    """All http.request events; returns (body, events, disconnected)."""
    chunks, events = [], []
    while True:
        event = yield receive()
        events.append(event)
        if event["type"] != "http.request":
            return b"".join(chunks), events, True
        chunks.append(event.get("body", b""))
        if not event.get("more", 0):
            return b"".join(chunks), events, False


def respond(send, status, body, content_type=b"text/plain", headers=()):
    yield send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type),
                            (b"content-length", b"%d" % len(body))] + list(headers)})
    yield send({"type": "http.response.body", "body": body, "more": 0})


def respond_json(send, obj, status=200, headers=()):
    body = json.dumps(obj, sort_keys=True).encode("utf-8")
    yield from respond(send, status, body, b"application/json", headers)


def category(exc):
    """APP.md's error category of an exception a send raised."""
    if isinstance(exc, FileNotFoundError):
        return "not-found"
    if isinstance(exc, PermissionError):
        return "permission-denied"
    if isinstance(exc, (ValueError, TypeError)):   # pagi_ref.EventError is a ValueError
        return "invalid-event"
    return "other"


def error_report(exc):
    if exc is None:
        return {"raised": False}
    return {"raised": True, "category": category(exc), "message": str(exc)}


def try_send(send, event):
    """Send; return the exception the send raised, or None."""
    try:
        yield send(event)
    except Exception as exc:   # the point: observe the failure
        return exc
    return None


CONNECTION_METHODS = ("is_connected", "disconnect_reason", "on_disconnect", "on_complete",
                      "response_started", "response_complete", "disconnect_future")
TRANSPORT_METHODS = ("buffered_amount", "high_water_mark", "low_water_mark",
                     "on_high_water", "on_drain")


def describe(scope):
    """The scope as JSON: bytes as latin-1 strings, plus APP.md's kinds."""
    out = {}
    for key in ("type", "pagi", "http_version", "method", "scheme", "path", "raw_path",
                "query_string", "root_path", "headers", "client", "server",
                "subprotocols"):
        if key in scope:
            out[key] = jsonable(scope[key])
    out["keys"] = sorted(scope)
    out["kinds"] = {k: kind(v) for k, v in scope.items()}
    out["pagi_kinds"] = {k: kind(v) for k, v in scope.get("pagi", {}).items()} \
        if isinstance(scope.get("pagi"), dict) else None
    headers = scope.get("headers")
    out["headers_ok"] = isinstance(headers, list) and all(
        len(pair) == 2 and isinstance(pair[0], bytes) and isinstance(pair[1], bytes)
        for pair in headers)
    out["client_kinds"] = [kind(v) for v in scope["client"]] \
        if scope.get("client") else None
    out["server_kinds"] = [kind(v) for v in scope["server"]] \
        if scope.get("server") else None
    ext = scope.get("extensions")
    out["extensions"] = {k: kind(v) for k, v in ext.items()} \
        if isinstance(ext, dict) else None
    tls = ext.get("tls") if isinstance(ext, dict) else None
    out["tls"] = {k: {"kind": kind(v), "value": jsonable(v),
                      "item_kinds": [kind(i) for i in v] if isinstance(v, (list, tuple))
                      else None}
                  for k, v in tls.items()} if isinstance(tls, dict) else None
    state = scope.get("state")
    out["state"] = sorted(state) if isinstance(state, dict) else None
    conn = scope.get("pagi.connection")
    out["connection_methods"] = [m for m in CONNECTION_METHODS
                                 if callable(getattr(conn, m, None))] if conn is not None else None
    transport = scope.get("pagi.transport")
    if transport is not None:
        t = {"methods": [m for m in TRANSPORT_METHODS if callable(getattr(transport, m, None))]}
        for m in ("buffered_amount", "high_water_mark", "low_water_mark"):
            if m in t["methods"]:
                v = getattr(transport, m)()
                t[m] = v
                t[m + "_kind"] = kind(v)
        out["transport"] = t
    else:
        out["transport"] = None
    return out


# -- http routes ---------------------------------------------------------------

def r_hello(scope, receive, send):
    yield from respond(send, 200, b"hello")


def r_echo(scope, receive, send):
    body, events, gone = yield from read_body(receive)
    if gone:
        return
    yield from respond(send, 200, body, b"application/octet-stream",
                       [(b"x-request-events", b"%d" % len(events))])


def r_events(scope, receive, send):
    out = []
    while True:
        event = yield receive()
        out.append({"type": event.get("type"), "type_kind": kind(event.get("type")),
                    "body_len": len(event.get("body", b"")),
                    "body_kind": kind(event.get("body")),
                    "more": event.get("more"), "more_kind": kind(event.get("more")),
                    "keys": sorted(event)})
        if event["type"] != "http.request" or not event.get("more", 0):
            break
    yield from respond_json(send, out)


def r_first_event(scope, receive, send):
    event = yield receive()
    yield from respond_json(send, {"type": event["type"],
                                   "body": jsonable(event.get("body", b"")),
                                   "more": event.get("more")})


def r_scope(scope, receive, send):
    _body, _events, gone = yield from read_body(receive)
    if gone:
        return
    desc = describe(scope)
    scope["spec.mark"] = True    # CORE-SCOPE-5: must not leak into later scopes
    yield from respond_json(send, desc)


def r_stream(scope, receive, send):
    q = query(scope)
    n, size = qint(q, "n", 3), qint(q, "size", 10)
    delay = qint(q, "delay", 0) / 1000.0
    headers = [(b"content-type", b"text/plain")]
    if q.get("cl") == "1":
        headers.append((b"content-length", b"%d" % (n * size)))
    yield send({"type": "http.response.start", "status": 200, "headers": headers})
    for i in range(n):
        if i and delay:
            yield pagi_ref.sleep(delay)
        yield send({"type": "http.response.body",
                    "body": bytes([97 + i % 26]) * size, "more": 1})
        if q.get("empty") == "1":
            yield send({"type": "http.response.body", "body": b"", "more": 1})
    yield send({"type": "http.response.body", "body": b"", "more": 0})


def r_raise_before(scope, receive, send):
    raise RuntimeError("spec-app: raise-before")
    yield   # a generator all the same


def r_raise_after(scope, receive, send):
    q = query(scope)
    headers = [(b"content-type", b"text/plain")]
    if q.get("cl") == "1":
        headers.append((b"content-length", b"100"))
    yield send({"type": "http.response.start", "status": 200, "headers": headers})
    yield send({"type": "http.response.body", "body": b"partial", "more": 1})
    raise RuntimeError("spec-app: raise-after")


def r_return_mid_stream(scope, receive, send):
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    yield send({"type": "http.response.body", "body": b"partial", "more": 1})
    # returns without ending the response


def r_no_response(scope, receive, send):
    return
    yield


async def r_async(scope, receive, send):
    body = b""
    while True:
        event = await receive()
        body += event.get("body", b"")
        if not event.get("more", 0):
            break
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"async:" + body, "more": 0})


def r_return_value(scope, receive, send):
    yield from respond(send, 200, b"ok")
    return {"framework": "value"}


BAD_HEADERS = {
    "cr-value": (b"x-bad", b"a\rb"),
    "lf-value": (b"x-bad", b"a\nb"),
    "crlf-value": (b"x-bad", b"a\r\nx-injected: 1"),
    "nul-value": (b"x-bad", b"a\x00b"),
    "cr-name": (b"x-b\rad", b"v"),
    "lf-name": (b"x-b\nad", b"v"),
    "nul-name": (b"x-b\x00ad", b"v"),
    "ctl-name": (b"x-b\x01ad", b"v"),
    "del-name": (b"x-b\x7fad", b"v"),
    "space-name": (b"x bad", b"v"),
    "colon-name": (b"x:bad", b"v"),
    "empty-name": (b"", b"v"),
}


def r_bad_header(scope, receive, send):
    case = query(scope).get("case", "")
    header = BAD_HEADERS[case]
    exc = yield from try_send(send, {"type": "http.response.start", "status": 200,
                                     "headers": [(b"content-type", b"text/plain"), header]})
    report = error_report(exc)
    report["case"] = case
    body = json.dumps(report, sort_keys=True).encode()
    if exc is None:
        # The bad start went out: finish the response as best we can.
        yield send({"type": "http.response.body", "body": body, "more": 0})
        return
    yield from respond(send, 200, body, b"application/json")


START_OK = {"type": "http.response.start", "status": 200,
            "headers": [(b"content-type", b"application/json")]}

# case -> (phase, bad event).  "pre" cases are tried before any start, "body"
# cases after a valid start (the report then travels in the body).
BAD_EVENTS = {
    "missing-status": ("pre", {"type": "http.response.start", "headers": []}),
    "status-text": ("pre", {"type": "http.response.start", "status": "200", "headers": []}),
    "status-range": ("pre", {"type": "http.response.start", "status": 1000, "headers": []}),
    "status-100": ("pre", {"type": "http.response.start", "status": 100, "headers": []}),
    "status-101": ("pre", {"type": "http.response.start", "status": 101, "headers": []}),
    "status-103": ("pre", {"type": "http.response.start", "status": 103, "headers": []}),
    "content-length-invalid": ("pre", {"type": "http.response.start", "status": 200,
                                       "headers": [(b"content-length", b"abc")]}),
    "headers-not-list": ("pre", {"type": "http.response.start", "status": 200,
                                 "headers": "x-a: b"}),
    "header-text-value": ("pre", {"type": "http.response.start", "status": 200,
                                 "headers": [(b"x-a", "\u263a")]}),
    "header-triple": ("pre", {"type": "http.response.start", "status": 200,
                              "headers": [(b"x-a", b"b", b"c")]}),
    "unknown-type": ("pre", {"type": "http.response.bogus", "status": 200}),
    "no-type": ("pre", {"status": 200, "headers": []}),
    "not-a-map": ("pre", [("type", "http.response.start")]),
    "unadvertised-extension": ("pre", {"type": "ext.spec.unknown"}),
    "body-before-start": ("pre", {"type": "http.response.body", "body": b"x", "more": 0}),
    "extra-field-start": ("pre", {"type": "http.response.start", "status": 200,
                                  "headers": [(b"content-type", b"application/json")],
                                  "x_spec_extra": {"any": "thing"}}),
    "body-text": ("body", {"type": "http.response.body", "body": "caf\u00e9 \u263a",
                          "more": 1}),
    "body-integer": ("body", {"type": "http.response.body", "body": 5, "more": 1}),
    "more-text": ("body", {"type": "http.response.body", "body": b"", "more": "yes"}),
    "double-start": ("body", dict(START_OK)),
    "trailers-unannounced": ("body", {"type": "http.response.trailers",
                                      "headers": [(b"x-t", b"1")]}),
    "extra-field-body": ("body", {"type": "http.response.body", "body": b"",
                                  "more": 1, "x_spec_extra": 1}),
}


def r_bad_event(scope, receive, send):
    case = query(scope).get("case", "")
    phase, event = BAD_EVENTS[case]
    if phase == "pre":
        exc = yield from try_send(send, event)
        report = error_report(exc)
        report["case"] = case
        body = json.dumps(report, sort_keys=True).encode()
        if exc is None and case == "extra-field-start":
            yield send({"type": "http.response.body", "body": body, "more": 0})
            return
        if exc is None and case == "body-before-start":
            return   # nothing sensible left to do; the test will see the mess
        yield from respond(send, 200, body, b"application/json")
        return
    yield send(START_OK)
    exc = yield from try_send(send, event)
    report = error_report(exc)
    report["case"] = case
    yield send({"type": "http.response.body",
                "body": json.dumps(report, sort_keys=True).encode(), "more": 0})


def r_after_complete(scope, receive, send):
    token = query(scope).get("token")
    yield from read_body(receive)
    yield from respond(send, 200, b"done")
    exc = yield from try_send(send, {"type": "http.response.body", "body": b"EXTRA", "more": 0})
    record(token, dict(error_report(exc), step="send-after-complete"))
    event = yield receive()
    record(token, {"step": "receive-after-complete", "type": event.get("type")})


def r_receive_across(scope, receive, send):
    """A receive() left pending while the response is sent (a spawned waiter)."""
    token = query(scope).get("token")
    yield from read_body(receive)

    def waiter():
        event = yield receive()
        record(token, {"at": "waiter", "type": event.get("type")})

    task = pagi_ref.spawn(waiter())
    yield from respond(send, 200, b"sent")
    record(token, {"at": "response_sent"})
    yield pagi_ref.wait_any(task, pagi_ref.sleep(3.0))
    record(token, {"at": "end", "waiter_done": task.done()})


def r_trailers(scope, receive, send):
    q = query(scope)
    token = q.get("token")
    headers = [(b"content-type", b"text/plain"), (b"trailer", b"x-checksum")]
    if q.get("cl") == "1":
        headers.append((b"content-length", b"10"))
    yield send({"type": "http.response.start", "status": 200, "trailers": 1,
                "headers": headers})
    yield send({"type": "http.response.body", "body": b"part1", "more": 1})
    yield send({"type": "http.response.body", "body": b"part2", "more": 0})
    exc = yield from try_send(send, {"type": "http.response.trailers",
                                     "headers": [(b"x-checksum", b"abc123"),
                                                 (b"x-count", b"2")]})
    record(token, error_report(exc))


def r_cl_short(scope, receive, send):
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"10")]})
    yield send({"type": "http.response.body", "body": b"12345", "more": 0})


def r_cl_long(scope, receive, send):
    token = query(scope).get("token")
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"5")]})
    exc = yield from try_send(send, {"type": "http.response.body",
                                     "body": b"0123456789", "more": 0})
    record(token, dict(error_report(exc), step="ten-bytes"))
    if exc is not None:
        exc2 = yield from try_send(send, {"type": "http.response.body",
                                          "body": b"abcde", "more": 0})
        record(token, dict(error_report(exc2), step="five-bytes"))


def r_continue(scope, receive, send):
    q = query(scope)
    if q.get("read") == "0":
        yield from respond(send, 200, b"no-read")
        return
    if qint(q, "sleep_ms", 0):
        yield pagi_ref.sleep(qint(q, "sleep_ms", 0) / 1000.0)
    body, _events, gone = yield from read_body(receive)
    if gone:
        return
    yield from respond(send, 200, b"got:" + body)


def r_pipeline(scope, receive, send):
    q = query(scope)
    token, tag = q.get("token"), q.get("tag", "")
    record(token, "start:" + tag)
    yield from read_body(receive)
    if qint(q, "delay_ms", 0):
        yield pagi_ref.sleep(qint(q, "delay_ms", 0) / 1000.0)
    record(token, "end:" + tag)
    yield from respond(send, 200, tag.encode())


def r_status(scope, receive, send):
    q = query(scope)
    code = qint(q, "code", 200)
    headers = [(b"content-type", b"text/plain")]
    if q.get("cl"):
        headers.append((b"content-length", q["cl"].encode()))
    yield send({"type": "http.response.start", "status": code, "headers": headers})
    yield send({"type": "http.response.body", "body": q.get("body", "").encode(), "more": 0})


def r_headers(scope, receive, send):
    yield from respond(send, 200, b"ok", headers=[
        (b"set-cookie", b"a=1"), (b"x-order", b"first"),
        (b"set-cookie", b"b=2"), (b"x-order", b"second")])


def r_app_te(scope, receive, send):
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"transfer-encoding", b"gzip")]})
    yield send({"type": "http.response.body", "body": b"hello", "more": 0})


def r_date(scope, receive, send):
    yield from respond(send, 200, b"dated",
                       headers=[(b"date", b"Mon, 01 Jan 2001 00:00:00 GMT")])


def r_app_close(scope, receive, send):
    yield from respond(send, 200, b"bye", headers=[(b"connection", b"close")])


def r_limits(scope, receive, send):
    """The limits pagi_ref runs with: the body and WebSocket limits from the
    environment the suite (or whoever started the server) sets, else
    pagi_ref's defaults; the watermarks from this request's pagi.transport."""
    yield from read_body(receive)
    defaults = pagi_ref.Config()
    report = {}
    for key, env, default in (("max_body_size", "PAGI_SPEC_MAX_BODY_SIZE",
                               defaults.max_body_size),
                              ("ws_max_size", "PAGI_SPEC_WS_MAX_SIZE",
                               defaults.ws_max_message_size)):
        value = os.environ.get(env)
        report[key] = int(value) if value else default
    transport = scope.get("pagi.transport")
    report["write_high_watermark"] = transport.high_water_mark() if transport else None
    report["write_low_watermark"] = transport.low_water_mark() if transport else None
    yield from respond_json(send, report)


def r_fullflush(scope, receive, send):
    advertised = "fullflush" in (scope.get("extensions") or {})
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"x-fullflush", b"advertised" if advertised else b"absent")]})
    yield send({"type": "http.response.body", "body": b"a", "more": 1})
    if advertised:
        exc = yield from try_send(send, {"type": "http.fullflush"})
        if exc is not None:
            yield send({"type": "http.response.body", "body": b"!rejected", "more": 0})
            return
    yield send({"type": "http.response.body", "body": b"b", "more": 0})


def spec_file():
    path = os.path.join(tempfile.gettempdir(), "pagi-spec-file-v1.bin")
    if not os.path.exists(path) or os.path.getsize(path) != FILE_SIZE:
        tmp = "%s.%d.tmp" % (path, os.getpid())
        with open(tmp, "wb") as f:
            f.write(bytes(range(256)) * (FILE_SIZE // 256))
        os.replace(tmp, path)
    return path


def r_file(scope, receive, send):
    q = query(scope)
    mode = q.get("mode", "file")
    event = {"type": "http.response.body"}
    if "offset" in q:
        event["offset"] = qint(q, "offset", 0)
    if "length" in q:
        event["length"] = qint(q, "length", 0)
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")]})
    fh = None
    if mode == "file":
        event["file"] = spec_file()
    elif mode == "missing":
        event["file"] = os.path.join(tempfile.gettempdir(), "pagi-spec-no-such-file")
    elif mode == "fh":
        fh = open(spec_file(), "rb")
        event["fh"] = fh
    elif mode == "both":
        event["file"] = spec_file()
        event["body"] = b"x"
    try:
        exc = yield from try_send(send, event)
    finally:
        if fh is not None:
            fh.close()
    if exc is not None:
        yield send({"type": "http.response.body",
                    "body": ("!error:%s" % category(exc)).encode(), "more": 0})


def r_slow(scope, receive, send):
    """Backpressure producer: n chunks of size bytes, as fast as send allows."""
    q = query(scope)
    token = q.get("token")
    n, size = qint(q, "n", 128), qint(q, "size", 65536)
    transport = scope.get("pagi.transport")
    conn = scope.get("pagi.connection")
    if transport is None:
        yield from respond_json(send, {"transport": None}, status=501)
        return
    callbacks = []
    transport.on_high_water(lambda *a: callbacks.append("high:A:%d" % len(a)))
    transport.on_high_water(lambda *a: callbacks.append("high:B:%d" % len(a)))
    transport.on_drain(lambda *a: callbacks.append("drain:A:%d" % len(a)))
    transport.on_drain(lambda *a: callbacks.append("drain:B:%d" % len(a)))
    summary = {"initial_buffered": transport.buffered_amount(),
               "initial_callbacks": list(callbacks),
               "high": transport.high_water_mark(), "low": transport.low_water_mark(),
               "max_buffered": 0, "suspended": 0, "immediate_high": None,
               "sent": 0, "disconnected": None, "types_ok": True}
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream"),
                            (b"content-length", b"%d" % (n * size))]})
    high = summary["high"]
    for i in range(n):
        if conn is not None and not conn.is_connected():
            summary["disconnected"] = conn.disconnect_reason()
            break
        future = send({"type": "http.response.body", "body": bytes([i % 256]) * size,
                       "more": 1 if i < n - 1 else 0})
        amount = transport.buffered_amount()
        if not isinstance(amount, int):
            summary["types_ok"] = False
        summary["max_buffered"] = max(summary["max_buffered"], amount)
        if not future.done():
            if not summary["suspended"]:
                record(token, {"at": "suspended"})
            summary["suspended"] += 1
            if high is not None and amount >= high and summary["immediate_high"] is None:
                fired = []
                transport.on_high_water(lambda: fired.append(1))
                summary["immediate_high"] = bool(fired)
        try:
            yield future
        except Exception as exc:
            summary["send_error"] = repr(exc)
            break
        summary["sent"] += 1
    if conn is not None and not conn.is_connected() and summary["disconnected"] is None:
        summary["disconnected"] = conn.disconnect_reason()
    summary["callbacks"] = callbacks
    summary["at"] = "summary"
    record(token, summary)


def r_conn(scope, receive, send):
    q = query(scope)
    token, mode = q.get("token"), q.get("mode", "complete")
    conn = scope["pagi.connection"]

    def state(label):
        s = {"at": label, "is_connected": conn.is_connected(),
             "disconnect_reason": conn.disconnect_reason(),
             "response_started": conn.response_started()}
        s["response_complete"] = conn.response_complete() \
            if hasattr(conn, "response_complete") else None
        f = conn.disconnect_future() if hasattr(conn, "disconnect_future") else None
        s["disconnect_future_done"] = None if f is None else f.done()
        return s

    def on_disconnect(n):
        def cb(*args):
            entry = state("on_disconnect:%d" % n)
            entry["args"] = jsonable(list(args))
            record(token, entry)
        return cb

    def on_complete(n):
        def cb(*args):
            entry = state("on_complete:%d" % n)
            entry["args"] = jsonable(list(args))
            record(token, entry)
        return cb

    if mode == "identity":
        kept = _KEEP.setdefault(token, [])
        same = any(c is conn for c in kept)
        kept.append(conn)
        record(token, {"same_as_previous": same, "count": len(kept)})
        yield from read_body(receive)
        yield from respond(send, 200, b"ok")
        return

    conn.on_disconnect(on_disconnect(1))
    conn.on_disconnect(on_disconnect(2))
    if hasattr(conn, "on_complete"):
        conn.on_complete(on_complete(1))
        conn.on_complete(on_complete(2))
    record(token, dict(state("begin"), has_on_complete=hasattr(conn, "on_complete")))

    if mode == "complete":
        body, _events, gone = yield from read_body(receive)
        yield send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        record(token, state("after_start"))
        yield send({"type": "http.response.body", "body": b"a", "more": 1})
        record(token, state("streaming"))
        yield send({"type": "http.response.body", "body": b"b", "more": 0})
        record(token, state("after_end"))
        return

    if mode == "body":
        # Read until the body ends or the client goes.
        while True:
            event = yield receive()
            record(token, {"at": "event", "type": event.get("type"),
                           "body_len": len(event.get("body", b"")),
                           "more": event.get("more")})
            if event["type"] != "http.request" or not event.get("more", 0):
                break
        if event["type"] == "http.request":
            yield from respond(send, 200, b"complete")
            return
        record(token, state("after_disconnect_event"))
        late = []
        conn.on_disconnect(lambda *args: late.append(list(args)))
        record(token, {"at": "late_on_disconnect", "ran_at_once": bool(late),
                       "args": jsonable(late[0]) if late else None})
        exc = yield from try_send(send, {"type": "http.response.start", "status": 200,
                                         "headers": []})
        record(token, dict(error_report(exc), at="send_after_disconnect"))
        record(token, {"at": "end"})
        return   # no response: the client is gone (HTTP-ERR-5)

    if mode == "stream":
        yield from read_body(receive)
        yield send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        raised = []
        for _ in range(500):
            if not conn.is_connected():
                break
            exc = yield from try_send(send, {"type": "http.response.body",
                                             "body": b"x" * 1024, "more": 1})
            if exc is not None:
                raised.append(repr(exc))
            yield pagi_ref.sleep(0.01)
        for _ in range(3):   # CORE-ERR-6: these must be silent no-ops
            exc = yield from try_send(send, {"type": "http.response.body",
                                             "body": b"y", "more": 1})
            if exc is not None:
                raised.append(repr(exc))
        record(token, {"at": "stream_end", "raised": raised,
                       "is_connected": conn.is_connected()})
        event = yield receive()
        record(token, {"at": "receive", "type": event.get("type")})
        record(token, {"at": "end"})
        return


def r_state(scope, receive, send):
    q = query(scope)
    yield from read_body(receive)
    state = scope.get("state")
    report = {"has_state": isinstance(state, dict)}
    if isinstance(state, dict):
        report["keys"] = sorted(state)
        shared = state.get("spec.shared")
        report["shared"] = list(shared) if isinstance(shared, list) else None
        if q.get("op") == "mutate":
            if isinstance(shared, list):
                shared.append(q.get("value", "x"))
            state["spec.private"] = "set-by-request"
    yield from respond_json(send, report)


def r_journal(scope, receive, send):
    token = query(scope).get("token", "")
    yield from respond_json(send, JOURNAL.get(token, []))


def r_wrong_scope(scope, receive, send):
    """WebSocket/SSE paths reached with an http scope: the server did not
    classify the request (the suite skips those tests as pending)."""
    yield from respond(send, 404, b"wrong scope type: http",
                       headers=[(b"x-spec-app", b"wrong-scope-type")])


def r_not_found(scope, receive, send):
    yield from respond(send, 404, b"not found")


HTTP_ROUTES = {
    "/hello": r_hello,
    "/echo": r_echo,
    "/events": r_events,
    "/first-event": r_first_event,
    "/stream": r_stream,
    "/raise-before": r_raise_before,
    "/raise-after": r_raise_after,
    "/no-response": r_no_response,
    "/return-mid-stream": r_return_mid_stream,
    "/async": r_async,
    "/return-value": r_return_value,
    "/bad-header": r_bad_header,
    "/bad-event": r_bad_event,
    "/after-complete": r_after_complete,
    "/trailers": r_trailers,
    "/receive-across": r_receive_across,
    "/cl-short": r_cl_short,
    "/cl-long": r_cl_long,
    "/continue": r_continue,
    "/pipeline": r_pipeline,
    "/status": r_status,
    "/headers": r_headers,
    "/app-te": r_app_te,
    "/date": r_date,
    "/app-close": r_app_close,
    "/limits": r_limits,
    "/fullflush": r_fullflush,
    "/file": r_file,
    "/slow": r_slow,
    "/conn": r_conn,
    "/state": r_state,
    "/journal": r_journal,
}


# -- websocket routes ------------------------------------------------------------

def ws_echo(scope, receive, send):
    q = query(scope)
    token = q.get("token")
    event = yield receive()
    record(token, {"first_event": event.get("type")})
    accept = {"type": "websocket.accept"}
    if q.get("subprotocol") == "1" and scope.get("subprotocols"):
        accept["subprotocol"] = scope["subprotocols"][0]
    if q.get("header") == "1":
        accept["headers"] = [(b"x-spec-accept", b"yes")]
    yield send(accept)
    if q.get("keepalive_ms"):
        yield send({"type": "websocket.keepalive",
                    "interval": qint(q, "keepalive_ms", 0) / 1000.0})
    while True:
        event = yield receive()
        if event["type"] == "websocket.receive":
            if event.get("text") is not None:
                reply = {"type": "websocket.send", "text": event["text"]}
            else:
                reply = {"type": "websocket.send", "bytes": event["bytes"]}
            record(token, {"received": "text" if event.get("text") is not None else "bytes",
                           "both": event.get("text") is not None
                           and event.get("bytes") is not None})
            yield send(reply)
        elif event["type"] == "websocket.disconnect":
            record(token, {"disconnect": True, "code": event.get("code"),
                           "reason": event.get("reason")})
            exc = yield from try_send(send, {"type": "websocket.send", "text": "late"})
            record(token, dict(error_report(exc), at="send_after_disconnect"))
            return


def ws_scope(scope, receive, send):
    yield receive()
    yield send({"type": "websocket.accept"})
    yield send({"type": "websocket.send", "text": json.dumps(describe(scope), sort_keys=True)})
    while True:
        event = yield receive()
        if event["type"] == "websocket.disconnect":
            return


def ws_reject(scope, receive, send):
    yield receive()
    yield send({"type": "websocket.close"})


def ws_close(scope, receive, send):
    q = query(scope)
    token = q.get("token")
    yield receive()
    yield send({"type": "websocket.accept"})
    yield send({"type": "websocket.close", "code": qint(q, "code", 1000),
                "reason": q.get("reason", "")})
    event = yield receive()
    record(token, {"type": event.get("type"), "code": event.get("code")})


def ws_deny(scope, receive, send):
    yield receive()
    if "websocket.http.response" in (scope.get("extensions") or {}):
        yield send({"type": "websocket.http.response.start", "status": 401,
                    "headers": [(b"content-type", b"text/plain"),
                                (b"www-authenticate", b"Bearer")]})
        yield send({"type": "websocket.http.response.body", "body": b"denied", "more": 0})
    else:
        yield send({"type": "websocket.close"})


def ws_bad_send(scope, receive, send):
    token = query(scope).get("token")
    yield receive()
    yield send({"type": "websocket.accept"})
    exc = yield from try_send(send, {"type": "websocket.send", "text": "a", "bytes": b"b"})
    record(token, dict(error_report(exc), case="both"))
    exc = yield from try_send(send, {"type": "websocket.send"})
    record(token, dict(error_report(exc), case="neither"))
    if "websocket.http.response" in (scope.get("extensions") or {}):
        exc = yield from try_send(send, {"type": "websocket.http.response.start",
                                         "status": 401, "headers": []})
        record(token, dict(error_report(exc), case="deny-after-accept"))
    yield send({"type": "websocket.send", "text": "still-open"})
    while True:
        event = yield receive()
        if event["type"] == "websocket.disconnect":
            return


WS_ROUTES = {"/ws/echo": ws_echo, "/ws/scope": ws_scope, "/ws/reject": ws_reject,
             "/ws/close": ws_close, "/ws/deny": ws_deny, "/ws/bad-send": ws_bad_send}


# -- sse routes ---------------------------------------------------------------------

def sse_read(receive):
    chunks = []
    while True:
        event = yield receive()
        if event["type"] != "sse.request":
            return None
        chunks.append(event.get("body", b""))
        if not event.get("more", 0):
            return b"".join(chunks)


def sse_events(scope, receive, send):
    yield from sse_read(receive)
    yield send({"type": "sse.start", "status": 200})
    yield send({"type": "sse.send", "data": "one"})
    yield send({"type": "sse.send", "event": "update", "data": "line1\nline2", "id": "7"})
    yield send({"type": "sse.send", "data": "caf\u00e9", "retry": 1500})
    yield send({"type": "sse.comment", "comment": "ping"})
    yield send({"type": "sse.comment", "comment": ":already"})


def sse_post(scope, receive, send):
    body = yield from sse_read(receive)
    yield send({"type": "sse.start", "status": 200})
    yield send({"type": "sse.send", "data": (body or b"").decode("utf-8", "replace")})


def sse_scope(scope, receive, send):
    yield from sse_read(receive)
    yield send({"type": "sse.start", "status": 200})
    yield send({"type": "sse.send", "data": json.dumps(describe(scope), sort_keys=True)})


def sse_bad_field(scope, receive, send):
    token = query(scope).get("token")
    yield from sse_read(receive)
    yield send({"type": "sse.start", "status": 200})
    for case, event in (("event-lf", {"type": "sse.send", "event": "a\nb", "data": "x"}),
                        ("event-cr", {"type": "sse.send", "event": "a\rb", "data": "x"}),
                        ("id-lf", {"type": "sse.send", "id": "1\n2", "data": "x"}),
                        ("retry-negative", {"type": "sse.send", "data": "x", "retry": -1}),
                        ("no-data", {"type": "sse.send", "event": "x"})):
        exc = yield from try_send(send, event)
        record(token, dict(error_report(exc), case=case))
    yield send({"type": "sse.send", "data": "done"})


def sse_close(scope, receive, send):
    token = query(scope).get("token")
    yield from sse_read(receive)
    yield send({"type": "sse.start", "status": 200})
    yield send({"type": "sse.send", "data": "a"})
    yield send({"type": "sse.close", "reason": "job_complete"})
    for case, event in (("send-after-close", {"type": "sse.send", "data": "b"}),
                        ("comment-after-close", {"type": "sse.comment", "comment": "c"}),
                        ("second-close", {"type": "sse.close"})):
        exc = yield from try_send(send, event)
        record(token, dict(error_report(exc), case=case))
    yield pagi_ref.sleep(2.0)   # the stream must already be over on the wire
    record(token, {"case": "returned"})


def sse_decline(scope, receive, send):
    token = query(scope).get("token")
    yield from sse_read(receive)
    yield send({"type": "sse.http.response.start", "status": 401,
                "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"Bearer")]})
    exc = yield from try_send(send, {"type": "sse.send", "data": "x"})
    record(token, dict(error_report(exc), case="send-after-decline"))
    yield send({"type": "sse.http.response.body", "body": b"Unauthorized", "more": 0})


def sse_start_then_decline(scope, receive, send):
    token = query(scope).get("token")
    yield from sse_read(receive)
    exc = yield from try_send(send, {"type": "sse.send", "data": "too early"})
    record(token, dict(error_report(exc), case="send-before-start"))
    exc = yield from try_send(send, {"type": "sse.comment", "comment": "too early"})
    record(token, dict(error_report(exc), case="comment-before-start"))
    yield send({"type": "sse.start", "status": 200})
    exc = yield from try_send(send, {"type": "sse.http.response.start", "status": 401,
                                     "headers": []})
    record(token, dict(error_report(exc), case="decline-after-start"))
    yield send({"type": "sse.send", "data": "ok"})


def sse_keepalive(scope, receive, send):
    yield from sse_read(receive)
    yield send({"type": "sse.start", "status": 200})
    yield send({"type": "sse.keepalive", "interval": 0.1, "comment": "ka"})
    yield pagi_ref.sleep(0.6)
    yield send({"type": "sse.keepalive", "interval": 0})
    yield send({"type": "sse.send", "data": "end"})


def sse_wait(scope, receive, send):
    token = query(scope).get("token")
    yield from sse_read(receive)
    yield send({"type": "sse.start", "status": 200})
    yield send({"type": "sse.send", "data": "hi"})
    event = yield receive()
    record(token, {"type": event.get("type"), "reason": event.get("reason")})
    exc = yield from try_send(send, {"type": "sse.send", "data": "late"})
    record(token, dict(error_report(exc), at="send_after_disconnect"))


def sse_headers(scope, receive, send):
    yield from sse_read(receive)
    yield send({"type": "sse.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"x-spec", b"sse")]})
    yield send({"type": "sse.send", "data": "x"})


def sse_unknown(scope, receive, send):
    yield from sse_read(receive)
    yield send({"type": "sse.http.response.start", "status": 404,
                "headers": [(b"content-type", b"text/plain")]})
    yield send({"type": "sse.http.response.body", "body": b"not found"})


SSE_ROUTES = {"/sse/events": sse_events, "/sse/post": sse_post, "/sse/scope": sse_scope,
              "/sse/bad-field": sse_bad_field, "/sse/close": sse_close,
              "/sse/decline": sse_decline, "/sse/start-then-decline": sse_start_then_decline,
              "/sse/keepalive": sse_keepalive, "/sse/wait": sse_wait,
              "/sse/headers": sse_headers}


# -- lifespan -------------------------------------------------------------------------

def lifespan(scope, receive, send):
    record("lifespan", {"scope": {"type": scope.get("type"), "pagi": jsonable(scope.get("pagi")),
                                  "state": kind(scope.get("state"))}})
    while True:
        event = yield receive()
        record("lifespan", {"event": event.get("type")})
        if event["type"] == "lifespan.startup":
            if os.environ.get("PAGI_SPEC_LIFESPAN") == "fail":
                yield send({"type": "lifespan.startup.failed",
                            "message": "spec-app: startup refused"})
                return
            state = scope.get("state")
            if isinstance(state, dict):
                state["spec.shared"] = []
                state["spec.started"] = True
            yield send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            marker = os.environ.get("PAGI_SPEC_LIFESPAN_FILE")
            if marker:
                with open(marker, "a") as f:
                    f.write("shutdown\n")
            yield send({"type": "lifespan.shutdown.complete"})
            return


# -- the dispatcher ---------------------------------------------------------------------

def app(scope, receive, send):
    """A plain function that returns the handler's generator or coroutine."""
    kind = scope["type"]
    path = scope.get("path", "")
    if kind == "lifespan":
        return lifespan(scope, receive, send)
    if kind == "http":
        if path == "/not-an-app":
            return None            # CORE-APP-4: neither generator nor coroutine
        if path.startswith(("/ws/", "/sse/")):
            return r_wrong_scope(scope, receive, send)
        if path == "*" or path.startswith("/scope"):
            return r_scope(scope, receive, send)
        handler = HTTP_ROUTES.get(path, r_not_found)
        return handler(scope, receive, send)
    if kind == "websocket":
        return WS_ROUTES.get(path, ws_reject)(scope, receive, send)
    if kind == "sse":
        if path.startswith("/scope"):
            return sse_scope(scope, receive, send)
        return SSE_ROUTES.get(path, sse_unknown)(scope, receive, send)
    raise ValueError("spec-app: unsupported scope type %r" % (kind,))   # CORE-APP-5
