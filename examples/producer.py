"""A backpressure-aware producer: a large CSV export that is built only as
fast as the client reads it, and never more than fits under the high-water
mark.

    python pagi_ref.py examples/producer.py:app
    curl -s 'http://127.0.0.1:8000/?rows=1000000' | tail -n 1
    curl -s --limit-rate 200k 'http://127.0.0.1:8000/?rows=100000' | tail -n 1

``yield send(...)`` already suspends while the outgoing buffer is at or above
the high-water mark and resumes once it falls below the low one.  But a
send() is accepted whole: one 10 MB event puts 10 MB in the buffer.  So
this producer asks ``pagi.transport`` how much room is left under the mark
and builds no more than that for each event.
"""
from urllib.parse import parse_qs

FALLBACK_BATCH = 65536   # bytes per event when the server offers no pagi.transport


def room_under_high_water(transport):
    """Bytes that can be buffered before send() would suspend."""
    if transport is None or transport.high_water_mark() is None:
        return FALLBACK_BATCH
    return transport.high_water_mark() - transport.buffered_amount()


def app(scope, receive, send):
    if scope["type"] != "http":
        raise ValueError("this application serves http only, not %r" % scope["type"])
    query = parse_qs(scope["query_string"].decode("latin-1"))
    try:
        total = max(0, min(int(query["rows"][0]), 10000000))
    except (KeyError, ValueError):
        total = 100000
    conn = scope["pagi.connection"]
    transport = scope.get("pagi.transport")    # optional in PAGI; pagi_ref always has it
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/csv")]})
    yield send({"type": "http.response.body", "body": b"n,square\n", "more": 1})
    n = 0
    while n < total:
        if not conn.is_connected():
            return                      # the client left: stop producing
        room = room_under_high_water(transport)
        batch = []
        size = 0
        while n < total:
            line = b"%d,%d\n" % (n, n * n)
            if batch and size + len(line) > room:
                break                   # at most one line past the mark
            batch.append(line)
            size += len(line)
            n += 1
        # Suspends here while the client is not reading fast enough.
        yield send({"type": "http.response.body", "body": b"".join(batch), "more": 1})
    yield send({"type": "http.response.body", "body": b"", "more": 0})
