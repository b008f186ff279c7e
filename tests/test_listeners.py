"""Section 10's listeners, from the outside: real processes listening on
TCP and Unix sockets at once, on a descriptor they inherit (fd://N), on
systemd's socket activation, with workers; the scope's client and server
as each kind of socket gives them.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest

import pagi_ref
from apputil import ROOT, SCRIPT, ServerProcess, req, wait_until
from spec_wire import Reader, exchange

APP = textwrap.dedent('''
    import json, os

    def app(scope, receive, send):
        if scope["type"] == "lifespan":
            return
        facts = {"type": scope["type"], "client": scope["client"], "server": scope["server"],
                 "scheme": scope["scheme"], "pid": os.getpid(),
                 "listen_env": [k for k in ("LISTEN_PID", "LISTEN_FDS") if k in os.environ]}
        body = json.dumps(facts).encode()
        yield send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        yield send({"type": "http.response.body", "body": body})
''')


@pytest.fixture
def app_spec(tmp_path):
    path = tmp_path / "listenapp.py"
    path.write_text(APP)
    return str(path) + ":app"


@pytest.fixture
def sockdir():
    # A short directory: a Unix socket's path is limited to about 100 bytes.
    path = tempfile.mkdtemp(prefix="pagi-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def unix_get(path, target="/"):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(req(target, headers=[("Connection", "close")]))
        return Reader(s).read_response()


def tcp_get(port, host="127.0.0.1"):
    if ":" in host:
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(req("/", headers=[("Connection", "close")]))
            return Reader(s).read_response()
    return exchange(port, req("/", headers=[("Connection", "close")]))


def facts(resp):
    assert resp.status == 200, resp
    return json.loads(resp.body)


def listening_lines(proc, count):
    """The first ``count`` "listening on" lines, in order."""
    found = []
    while len(found) < count:
        line = proc.lines.get(timeout=10)
        assert line is not None, proc.stderr
        if " pagi_ref: listening on " in line:
            found.append(line.split(" pagi_ref: listening on ", 1)[1])
    return found


def socket_inodes(pid):
    """The socket inodes a process holds open (Linux /proc)."""
    out = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def unix_listener_inode(path):
    # The accepted sockets carry the listener's path too; only the listener
    # has the __SO_ACCEPTCON flag (0x10000).
    with open("/proc/net/unix") as f:
        for line in f.read().splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & 0x10000:
                return int(parts[6])
    return None


def tcp_listener_inode(port):
    with open("/proc/net/tcp") as f:
        for line in f.read().splitlines()[1:]:
            parts = line.split()
            if parts[1].endswith(":%04X" % port) and parts[3] == "0A":   # LISTEN
                return int(parts[9])
    return None


# -- TCP and Unix at once ------------------------------------------------------------

def test_a_tcp_and_a_unix_listener_at_once(app_spec, sockdir):
    path = os.path.join(sockdir, "app.sock")
    with ServerProcess([SCRIPT, app_spec, "--bind", "127.0.0.1:0", "--bind", "unix:" + path,
                        "--no-access-log"]) as proc:
        tcp, unix = listening_lines(proc, 2)
        assert tcp.startswith("http://127.0.0.1:")
        assert unix == "unix:" + path
        port = int(tcp.rsplit(":", 1)[1])
        over_tcp = facts(tcp_get(port))
        assert over_tcp["server"] == ["127.0.0.1", port]
        assert over_tcp["client"][0] == "127.0.0.1" and over_tcp["client"][1] > 0
        # PAGI www: "server" is [path, undef] for a Unix socket; the peer
        # has no address, so "client" is None.
        over_unix = facts(unix_get(path))
        assert over_unix["server"] == [path, None]
        assert over_unix["client"] is None
        assert over_unix["scheme"] == "http"
        assert proc.stop() == 0
    assert not os.path.exists(path), "the socket file outlived the server"


def test_the_first_tcp_listener_line_is_the_one_tools_parse(app_spec, sockdir):
    path = os.path.join(sockdir, "app.sock")
    with ServerProcess([SCRIPT, app_spec, "--uds", path, "--bind", "127.0.0.1:0",
                        "--no-access-log"]) as proc:
        _host, port = proc.wait_listening()      # skips the unix: line before it
        assert facts(tcp_get(port))["server"] == ["127.0.0.1", port]
        assert facts(unix_get(path))["server"] == [path, None]
        assert proc.stop() == 0


def test_an_ipv6_listener_is_ipv6_only():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        (listener,) = pagi_ref.open_listeners(pagi_ref.Config(bind=["[::1]:0"]))
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        assert listener.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert listener.url() == "http://[::1]:%d" % listener.address[1]
    finally:
        listener.close()


def test_ipv6_listener(app_spec):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with ServerProcess([SCRIPT, app_spec, "--bind", "[::1]:0", "--no-access-log"]) as proc:
        (line,) = listening_lines(proc, 1)
        assert line.startswith("http://[::1]:")
        port = int(line.rsplit(":", 1)[1])
        got = facts(tcp_get(port, "::1"))
        assert got["server"] == ["::1", port] and got["client"][0] == "::1"
        assert proc.stop() == 0


# -- the Unix socket file -----------------------------------------------------------------

def test_a_stale_socket_file_is_replaced(app_spec, sockdir):
    path = os.path.join(sockdir, "app.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)                 # a server that was killed left its file
    stale.close()
    assert os.path.exists(path)
    with ServerProcess([SCRIPT, app_spec, "--uds", path, "--no-access-log"]) as proc:
        assert listening_lines(proc, 1) == ["unix:" + path]
        assert facts(unix_get(path))["server"] == [path, None]
        assert proc.stop() == 0
    assert not os.path.exists(path)


def test_a_live_socket_and_a_plain_file_are_not_replaced(app_spec, sockdir):
    path = os.path.join(sockdir, "app.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        done = subprocess.run([sys.executable, SCRIPT, app_spec, "--uds", path],
                              cwd=ROOT, capture_output=True, timeout=30)
        assert done.returncode == 1
        assert b"cannot listen on unix:%s: a server is already listening on it" \
            % path.encode() in done.stderr
        assert os.path.exists(path)
    finally:
        live.close()
        os.unlink(path)
    with open(path, "w") as f:
        f.write("keep me")
    done = subprocess.run([sys.executable, SCRIPT, app_spec, "--uds", path],
                          cwd=ROOT, capture_output=True, timeout=30)
    assert done.returncode == 1
    assert b"the file exists and is not a socket" in done.stderr
    with open(path) as f:
        assert f.read() == "keep me"


# -- inherited descriptors ----------------------------------------------------------------

def test_fd_serves_an_inherited_listening_socket(app_spec):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    port = sock.getsockname()[1]
    try:
        with ServerProcess([SCRIPT, app_spec, "--fd", str(sock.fileno()), "--no-access-log"],
                           pass_fds=[sock.fileno()]) as proc:
            assert proc.wait_listening() == ("127.0.0.1", port)
            assert facts(tcp_get(port))["server"] == ["127.0.0.1", port]
            assert proc.stop() == 0
    finally:
        sock.close()


def test_fd_that_is_not_a_listening_socket_is_refused(app_spec, tmp_path):
    sock = socket.socket()           # not listening
    try:
        done = subprocess.run([sys.executable, SCRIPT, app_spec, "--bind",
                               "fd://%d" % sock.fileno()], pass_fds=[sock.fileno()],
                              cwd=ROOT, capture_output=True, timeout=30)
        assert done.returncode == 1
        assert b"cannot listen on fd://%d: not a listening stream socket" % sock.fileno() \
            in done.stderr
    finally:
        sock.close()
    done = subprocess.run([sys.executable, SCRIPT, app_spec, "--fd", "987"],
                          cwd=ROOT, capture_output=True, timeout=30)
    assert done.returncode == 1 and b"cannot listen on fd://987: " in done.stderr


# Starts pagi_ref as systemd does: the sockets on descriptors 3 and up,
# LISTEN_FDS their number, LISTEN_PID the pid of the process itself (the
# same across exec).
ACTIVATE = textwrap.dedent('''
    import os, sys
    fds = [int(n) for n in sys.argv[1].split(",")]
    for i, fd in enumerate(fds):
        os.dup2(fd, 3 + i)
    os.environ["LISTEN_FDS"] = str(len(fds))
    os.environ["LISTEN_PID"] = sys.argv[2] if sys.argv[2] != "self" else str(os.getpid())
    os.execv(sys.executable, [sys.executable] + sys.argv[3:])
''')


def test_systemd_socket_activation_needs_no_option(app_spec, sockdir):
    path = os.path.join(sockdir, "activated.sock")
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(path)
    unix.listen(8)
    port = tcp.getsockname()[1]
    fds = [tcp.fileno(), unix.fileno()]
    try:
        with ServerProcess(["-c", ACTIVATE, ",".join(map(str, fds)), "self", SCRIPT, app_spec,
                            "--no-access-log"], pass_fds=fds) as proc:
            assert listening_lines(proc, 2) == ["http://127.0.0.1:%d" % port, "unix:" + path]
            over_tcp = facts(tcp_get(port))
            assert over_tcp["server"] == ["127.0.0.1", port]
            # sd_listen_fds(3): the variables are not passed on.
            assert over_tcp["listen_env"] == []
            assert facts(unix_get(path))["server"] == [path, None]
            assert proc.stop() == 0
        # The file is systemd's (here: the test's), not the server's.
        assert os.path.exists(path)
    finally:
        tcp.close()
        unix.close()


def test_activation_for_another_process_is_ignored(app_spec):
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    try:
        with ServerProcess(["-c", ACTIVATE, str(tcp.fileno()), "1", SCRIPT, app_spec,
                            "--port", "0", "--no-access-log"], pass_fds=[tcp.fileno()]) as proc:
            _host, port = proc.wait_listening()
            assert port != tcp.getsockname()[1]       # its own --port, not fd 3
            assert facts(tcp_get(port))["listen_env"] == ["LISTEN_PID", "LISTEN_FDS"]
            assert proc.stop() == 0
    finally:
        tcp.close()


# -- workers --------------------------------------------------------------------------------

def test_workers_share_every_listener(app_spec, sockdir):
    path = os.path.join(sockdir, "workers.sock")
    with ServerProcess([SCRIPT, app_spec, "--workers", "2", "--bind", "127.0.0.1:0",
                        "--uds", path, "--no-access-log"]) as proc:
        tcp, unix = listening_lines(proc, 2)
        port = int(tcp.rsplit(":", 1)[1])
        assert unix == "unix:" + path
        a, b = facts(tcp_get(port)), facts(unix_get(path))
        assert a["pid"] != proc.p.pid and b["pid"] != proc.p.pid
        assert b["server"] == [path, None] and b["client"] is None
        # Which worker accepts is the kernel's choice; that each one can is
        # seen in what it holds: both listening sockets.
        children = [int(p) for p in open("/proc/%d/task/%d/children"
                                         % (proc.p.pid, proc.p.pid)).read().split()]
        assert len(children) == 2
        wanted = {tcp_listener_inode(port), unix_listener_inode(path)}
        assert None not in wanted
        for pid in children:
            assert wanted <= socket_inodes(pid), pid
        # A worker that stops (here: SIGTERM, as max_requests would) does
        # not take the file with it: the supervisor made it.
        os.kill(a["pid"], signal.SIGTERM)
        assert wait_until(lambda: not os.path.exists("/proc/%d" % a["pid"]), 10)
        for _ in range(3):
            assert facts(unix_get(path))["server"] == [path, None]
        assert os.path.exists(path)
        assert proc.stop() == 0
    assert not os.path.exists(path)


# -- the command line ---------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--bind", "localhost"], b"expected HOST:PORT, [IPv6]:PORT, unix:PATH or fd://N"),
    (["--bind", "::1:8000"], b"an IPv6 address goes in brackets"),
    (["--bind", "127.0.0.1:70000"], b"expected HOST:PORT"),
    (["--bind", "unix:"], b"unix: needs a path"),
    (["--bind", "fd://x"], b"fd:// needs a descriptor number"),
    (["--bind", "127.0.0.1:0", "--port", "8001"], b"replace --host and --port"),
    (["--uds", "/tmp/x.sock", "--host", "0.0.0.0"], b"replace --host and --port"),
])
def test_bad_bind_values_are_refused(args, message):
    done = subprocess.run([sys.executable, SCRIPT, "pagi_ref:_demo_app"] + args,
                          cwd=ROOT, capture_output=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr, done.stderr
