"""The smallest PAGI application, as a generator.

    python pagi_ref.py examples/hello.py:app
    curl -i http://127.0.0.1:8000/
"""


def app(scope, receive, send):
    if scope["type"] != "http":
        raise ValueError("this application serves http only, not %r" % scope["type"])
    yield send({
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/plain; charset=utf-8")],
    })
    yield send({"type": "http.response.body", "body": b"Hello, world!\n"})
