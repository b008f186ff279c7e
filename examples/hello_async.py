"""The smallest PAGI application again, as ``async def``, and run from Python.

    PYTHONPATH=. python examples/hello_async.py   # pagi_ref.run(), port 8000
    python pagi_ref.py examples/hello_async.py:app --port 8000
    curl -i http://127.0.0.1:8000/
"""

import pagi_ref


async def app(scope, receive, send):
    if scope["type"] != "http":
        raise ValueError("this application serves http only, not %r" % scope["type"])
    body = ("Hello from %s %s\n" % (scope["method"], scope["path"])).encode("utf-8")
    await send({
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode("ascii"))],
    })
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    pagi_ref.run(app, host="127.0.0.1", port=8000)
