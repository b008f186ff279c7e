"""Section 9, the command line, as real processes: `python pagi_ref.py
MODULE:ATTR` and `python -m pagi_ref MODULE:ATTR`, the startup line, exit
status 2 with a one-line error, --version, --help, SIGTERM/SIGINT, and an
application that imports pagi_ref getting the running server's module.
"""
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from spec_wire import exchange
from apputil import ROOT, SCRIPT, ServerProcess as Proc, req


def run_to_end(args, cwd=ROOT, env=None, timeout=20):
    full_env = dict(os.environ)
    full_env.update(env or {})
    done = subprocess.run([sys.executable] + args, cwd=cwd, env=full_env,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


APP_SOURCE = textwrap.dedent('''
    import pagi_ref

    def app(scope, receive, send):
        yield pagi_ref.sleep(0.01)          # a Future of the server's own module
        body = b"slept:" + scope["path"].encode()
        yield send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"),
                                (b"content-length", str(len(body)).encode())]})
        yield send({"type": "http.response.body", "body": body})

    async def async_app(scope, receive, send):
        await pagi_ref.sleep(0.01)
        task = pagi_ref.spawn(child())
        body = await task
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async def child():
        await pagi_ref.sleep(0.001)
        return b"async-slept"

    not_callable = 3
''')


@pytest.fixture
def appdir(tmp_path):
    (tmp_path / "myapp.py").write_text(APP_SOURCE)
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "web.py").write_text(APP_SOURCE)
    (tmp_path / "broken_import.py").write_text("import no_such_module_for_pagi_ref_tests\n")
    (tmp_path / "syntax_error.py").write_text("def app(:\n")
    return tmp_path


def serve_and_get(args, path="/", cwd=ROOT, env=None, sig=signal.SIGTERM):
    proc = Proc(args, cwd=cwd, env=env)
    try:
        host, port = proc.wait_listening()
        assert host == "127.0.0.1" and port > 0
        resp = exchange(port, req(path, headers=[("Connection", "close")]))
        rc = proc.stop(sig)
        return resp, rc, proc.stderr
    finally:
        proc.close()


def test_script_form_with_example_hello():
    resp, rc, stderr = serve_and_get([SCRIPT, "examples/hello.py:app", "--port", "0"])
    assert resp.status == 200 and resp.body
    assert rc == 0
    assert sum(1 for l in stderr if " INFO pagi_ref: listening on http://" in l) == 1


def test_module_form_with_example_hello():
    resp, rc, _ = serve_and_get(["-m", "pagi_ref", "examples/hello.py:app", "--port", "0"])
    assert resp.status == 200 and resp.body
    assert rc == 0


def test_path_form_app_importing_pagi_ref_gets_the_same_module(appdir):
    resp, rc, stderr = serve_and_get([SCRIPT, str(appdir / "myapp.py") + ":app", "--port", "0"],
                                     path="/x")
    assert resp.status == 200 and resp.body == b"slept:/x", (resp, stderr)
    assert rc == 0


def test_async_app_importing_pagi_ref_under_script_form(appdir):
    resp, rc, stderr = serve_and_get(
        [SCRIPT, str(appdir / "myapp.py") + ":async_app", "--port", "0"])
    assert resp.status == 200 and resp.body == b"async-slept", (resp, stderr)
    assert rc == 0


def test_module_form_app_importing_pagi_ref(appdir):
    resp, rc, stderr = serve_and_get(
        ["-m", "pagi_ref", str(appdir / "myapp.py") + ":app", "--port", "0"], path="/m")
    assert resp.status == 200 and resp.body == b"slept:/m", (resp, stderr)
    assert rc == 0


def test_dotted_module_form(appdir):
    env = {"PYTHONPATH": str(appdir)}
    resp, rc, stderr = serve_and_get([SCRIPT, "mypkg.web:app", "--port", "0"], path="/d", env=env)
    assert resp.status == 200 and resp.body == b"slept:/d", (resp, stderr)
    assert rc == 0


def test_dotted_module_form_from_the_working_directory(appdir):
    resp, rc, stderr = serve_and_get(["-m", "pagi_ref", "mypkg.web:app", "--port", "0"],
                                     path="/w", cwd=str(appdir), env={"PYTHONPATH": ROOT})
    assert resp.status == 200 and resp.body == b"slept:/w", (resp, stderr)
    assert rc == 0


def test_explicit_host_option():
    resp, rc, stderr = serve_and_get(
        [SCRIPT, "examples/hello.py:app", "--host", "127.0.0.1", "--port", "0"])
    assert resp.status == 200 and rc == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signals_stop_cleanly_with_status_0(sig):
    resp, rc, stderr = serve_and_get([SCRIPT, "examples/hello.py:app", "--port", "0"], sig=sig)
    assert resp.status == 200
    assert rc == 0, stderr
    assert not any("Traceback" in l for l in stderr), stderr


def test_signal_stops_an_idle_server_with_an_open_connection():
    from spec_wire import connect
    proc = Proc([SCRIPT, "examples/hello.py:app", "--port", "0", "--shutdown-timeout", "2"])
    try:
        _, port = proc.wait_listening()
        with connect(port) as s:
            s.sendall(req("/"))          # keep-alive: the connection stays open
            assert s.recv(100).startswith(b"HTTP/1.1 200")
            assert proc.stop(signal.SIGTERM) == 0
    finally:
        proc.close()


def one_line_error(rc, out, err):
    assert rc == 2, (rc, out, err)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("target", [
    "no_such_module_for_pagi_ref_tests:app",
    "no_such_package_xyz.sub:app",
    "{dir}/does_not_exist.py:app",
])
def test_module_that_is_not_there_exits_2_with_one_line(appdir, target):
    line = one_line_error(*run_to_end([SCRIPT, target.format(dir=appdir), "--port", "0"]))
    assert line


@pytest.mark.parametrize("target,where", [
    ("{dir}/broken_import.py:app", "broken_import.py\", line 1, in <module>"),
    ("{dir}/syntax_error.py:app", "syntax_error.py\", line"),
])
def test_module_that_fails_to_import_shows_where(appdir, target, where):
    """As uvicorn: the error line, then the traceback from the application's
    own frames on -- none of pagi_ref's or importlib's."""
    rc, out, err = run_to_end([SCRIPT, target.format(dir=appdir), "--port", "0"])
    assert rc == 2, (rc, err)
    first = err.strip().splitlines()[0]
    assert first.startswith("pagi_ref: error: cannot import "), err
    assert where in err, err
    assert "pagi_ref.py" not in err.replace(SCRIPT, "") and "importlib" not in err, err


@pytest.mark.parametrize("target", ["{dir}/myapp.py:missing_attribute", "mypkg.web:nope"])
def test_missing_attribute_exits_2_with_one_line(appdir, target):
    line = one_line_error(*run_to_end([SCRIPT, target.format(dir=appdir), "--port", "0"],
                                      env={"PYTHONPATH": str(appdir)}))
    assert "missing_attribute" in line or "nope" in line


def test_module_form_errors_exit_2_too(appdir):
    one_line_error(*run_to_end(["-m", "pagi_ref", str(appdir / "myapp.py") + ":nope",
                                "--port", "0"]))


def test_version():
    rc, out, err = run_to_end([SCRIPT, "--version"])
    assert rc == 0
    text = out + err
    assert re.search(r"\d+\.\d+", text), text
    sys.path.insert(0, ROOT) if ROOT not in sys.path else None
    import pagi_ref
    version = getattr(pagi_ref, "__version__", None)
    if version:
        assert version in text


def test_help_lists_the_options():
    rc, out, err = run_to_end([SCRIPT, "--help"])
    assert rc == 0
    text = out + err
    for option in ("--host", "--port", "--version", "--help", "--workers", "--worker-timeout",
                   "--max-requests", "--max-requests-jitter", "--slow-callback"):
        assert option in text, option
    assert "MODULE" in text.upper()


RUN_SCRIPT = textwrap.dedent('''
    import logging
    import sys
    sys.path.insert(0, sys.argv[1])
    import pagi_ref

    def app(scope, receive, send):
        yield pagi_ref.sleep(0.001)
        yield send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"3")]})
        yield send({"type": "http.response.body", "body": b"run"})

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pagi_ref.run(app, host="127.0.0.1", port=0)
''')


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_from_python_code(tmp_path, sig):
    script = tmp_path / "vendored.py"
    script.write_text(RUN_SCRIPT)
    resp, rc, stderr = serve_and_get([str(script), ROOT], cwd=str(tmp_path), sig=sig)
    assert resp.status == 200 and resp.body == b"run"
    assert rc == 0, stderr
