"""What a client sees when an application fails, and how a bad event fails.

    python pagi_ref.py examples/errors.py:app
    curl -i http://127.0.0.1:8000/before        # raises before the response: 500
    curl -i http://127.0.0.1:8000/after         # raises mid-body: truncated
    curl -i http://127.0.0.1:8000/nothing       # returns without a response: 500
    curl -i http://127.0.0.1:8000/bad-event     # catches EventError, answers 500 itself
"""
import pagi_ref


def app(scope, receive, send):
    if scope["type"] != "http":
        raise ValueError("this application serves http only, not %r" % scope["type"])
    path = scope["path"]
    if path == "/before":
        raise RuntimeError("failed before http.response.start")
    if path == "/nothing":
        return                  # no response at all: the server's 500 backstop answers
    if path == "/after":
        yield send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        yield send({"type": "http.response.body", "body": b"partial ", "more": 1})
        raise RuntimeError("failed in the middle of the body")
    if path == "/bad-event":
        try:
            # A header value must be bytes: this send fails, and writes nothing.
            yield send({"type": "http.response.start", "status": 200,
                        "headers": [(b"x-user", "alice")]})
        except pagi_ref.EventError as exc:
            message = str(exc).encode("utf-8") + b"\n"
        yield send({"type": "http.response.start", "status": 500,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(message)).encode("ascii"))]})
        yield send({"type": "http.response.body", "body": message})
        return
    yield send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"text/plain")]})
    yield send({"type": "http.response.body", "body": b"try /before, /after, /nothing, /bad-event\n"})
