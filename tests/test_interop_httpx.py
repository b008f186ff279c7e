"""Interop: httpx with HTTP/2 (python-hyper's h2 underneath) against pagi_ref.

A client people use, not one written for these tests.  httpx is not a
dependency of the suite: tox's ``interop`` environment installs
``httpx[http2]`` and runs this file (``tox -e interop``; `.ci/run` does);
elsewhere the file skips.  Both of httpx's ways into HTTP/2 are tried:
prior knowledge in cleartext (``http1=False``) and ALPN over TLS.
"""
import json
import ssl
import threading

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("h2")

from conftest import serve                           # noqa: E402
from test_tls import certs                           # noqa: E402,F401 -- a fixture
from test_h2 import needs_openssl                    # noqa: E402


def app(scope, receive, send):
    body = b""
    while True:
        event = yield receive()
        if event["type"] != "http.request":
            return
        body += event.get("body", b"")
        if not event.get("more"):
            break
    if scope["path"] == "/stream":
        yield send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        for i in range(5):
            yield send({"type": "http.response.body", "body": b"%d," % i, "more": 1})
        yield send({"type": "http.response.body", "body": b"end"})
        return
    info = {"http_version": scope["http_version"], "method": scope["method"],
            "scheme": scope["scheme"], "path": scope["path"],
            "host": [v.decode() for n, v in scope["headers"] if n == b"host"],
            "body": len(body)}
    out = json.dumps(info).encode()
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]})
    yield send({"type": "http.response.body", "body": out})


def test_httpx_prior_knowledge_get_post_and_a_stream():
    with serve(app, http2=True) as srv, \
            httpx.Client(http1=False, http2=True, timeout=10) as client:
        base = "http://127.0.0.1:%d" % srv.port
        r = client.get(base + "/x")
        assert r.http_version == "HTTP/2" and r.status_code == 200
        info = r.json()
        assert info["http_version"] == "2" and info["host"] == ["127.0.0.1:%d" % srv.port]
        assert r.headers.get_list("set-cookie") == ["a=1", "b=2"]
        body = bytes(range(256)) * 400                  # past the initial window
        r = client.post(base + "/p", content=body)
        assert r.json()["body"] == len(body) and r.json()["method"] == "POST"
        with client.stream("GET", base + "/stream") as r:
            assert r.http_version == "HTTP/2"
            assert b"".join(r.iter_bytes()) == b"0,1,2,3,4,end"


def test_httpx_concurrent_requests_share_one_connection():
    with serve(app, http2=True) as srv, \
            httpx.Client(http1=False, http2=True, timeout=10) as client:
        base = "http://127.0.0.1:%d" % srv.port
        client.get(base + "/warm")                      # the connection exists
        results = []

        def one(i):
            results.append(client.get(base + "/c%d" % i).json()["path"])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results) == sorted("/c%d" % i for i in range(8))
        assert len(srv.server.connections) == 1, srv.server.connections   # multiplexed


@needs_openssl
def test_httpx_over_tls_negotiates_h2_by_alpn(certs):
    config = dict(ssl_certfile=certs["server.pem"], ssl_keyfile=certs["server.key"], http2=True)
    with serve(app, **config) as srv, \
            httpx.Client(http2=True, timeout=10,
                         verify=ssl.create_default_context(cafile=certs["ca.pem"])) as client:
        r = client.get("https://localhost:%d/tls" % srv.port)
        assert r.http_version == "HTTP/2"
        assert r.json()["scheme"] == "https" and r.json()["http_version"] == "2"
