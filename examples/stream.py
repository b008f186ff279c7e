"""Streaming: a response sent piece by piece, as it is produced.

    python pagi_ref.py examples/stream.py:app
    curl -N 'http://127.0.0.1:8000/?count=5&interval=0.5'

No Content-Length is declared, so over HTTP/1.1 pagi_ref frames the body
with Transfer-Encoding: chunked: every body event with ``more`` set becomes
one chunk on the wire as soon as it is sent, and the event with ``more``
unset ends the response (the last chunk).
"""
from urllib.parse import parse_qs

import pagi_ref


def _param(query, name, default, kind, low, high):
    try:
        value = kind(query[name][0])
    except (KeyError, ValueError):
        return default
    return min(max(value, low), high)


def app(scope, receive, send):
    if scope["type"] != "http":
        raise ValueError("this application serves http only, not %r" % scope["type"])
    query = parse_qs(scope["query_string"].decode("latin-1"))
    count = _param(query, "count", 5, int, 1, 1000)
    interval = _param(query, "interval", 0.5, float, 0.0, 10.0)
    conn = scope["pagi.connection"]
    yield send({
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/plain; charset=utf-8")],
    })
    for i in range(1, count + 1):
        if not conn.is_connected():
            return          # the client left: send() would be a no-op, stop working
        line = b"line %d of %d\n" % (i, count)
        yield send({"type": "http.response.body", "body": line, "more": 1})
        if i < count:
            yield pagi_ref.sleep(interval)
    yield send({"type": "http.response.body", "body": b"", "more": 0})
