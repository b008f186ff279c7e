"""Instructions per request, counted by callgrind: E1's cost without the noise.

    python bench/instructions.py                     # this checkout
    python bench/instructions.py --rev a694042       # another commit, side by side
    python bench/instructions.py --parser-only       # RequestParser alone

Requests per second move with whatever else the machine is doing; the
number of instructions a request costs does not (valgrind counts them, the
same total for the same binary and input).  This runs the E1 server
(``bench/apps.py``, route ``/``) under ``valgrind --tool=callgrind``, sends
N and then N + 2000 keep-alive ``GET /`` requests from one client, and
divides the difference by 2000: start-up, import and compile costs cancel.
``--parser-only`` does the same for ``RequestParser`` fed a wrk-like and a
browser-like head.  Needs valgrind (Debian: ``apt-get install valgrind``);
127.0.0.1 only; every run stops by itself.
"""
import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXTRA = 2000

WRK_LIKE = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: hey/0.0.1\r\n"
            b"Accept-Encoding: gzip\r\n\r\n")
BROWSER_LIKE = (b"GET /some/path?x=1&y=2 HTTP/1.1\r\nHost: example.com\r\n"
                b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                b"Chrome/120.0 Safari/537.36\r\n"
                b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
                b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n"
                b"Connection: keep-alive\r\nCookie: a=1; b=2\r\nUpgrade-Insecure-Requests: 1\r\n"
                b"Sec-Fetch-Dest: document\r\nSec-Fetch-Mode: navigate\r\n\r\n")

PARSER_LOOP = """
import sys
sys.path.insert(0, sys.argv[1])
import pagi_ref
head, n = sys.argv[2].encode("latin-1").decode("unicode_escape").encode("latin-1"), int(sys.argv[3])
parser = pagi_ref.RequestParser(pagi_ref.Config())
for _ in range(n):
    parser.feed(head)
    parser.next_event()
    parser.next_event()
"""


def python_binary():
    """The real interpreter (pyenv's shims are shell scripts valgrind would count)."""
    return os.path.realpath(sys.executable) if not sys.executable.endswith("shims/python3") \
        else sys.executable


def collected(cmd, timeout=600, client=None):
    out = tempfile.mktemp(prefix="pagi_bench_cg_")
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out] + cmd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        if client is not None:
            client()
            os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if os.path.exists(out):
            os.unlink(out)
    for line in err.splitlines():
        if "Collected" in line:
            return int(line.split()[-1])
    raise RuntimeError("callgrind printed no total:\n" + err[-2000:])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cost(tree, n):
    port = free_port()

    def client():
        deadline = time.monotonic() + 300
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with sock:
            for _ in range(n):
                sock.sendall(WRK_LIKE)
                buf = b""
                while b"Hello, world!" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        raise RuntimeError("the server closed the connection")
                    buf += data

    cmd = [python_binary(), os.path.join(tree, "pagi_ref.py"), os.path.join(HERE, "apps.py") + ":app",
           "--port", str(port), "--no-access-log", "--lifespan", "off"]
    return collected(cmd, client=client)


def parser_cost(tree, head, n):
    script = tempfile.mktemp(prefix="pagi_bench_parser_", suffix=".py")
    with open(script, "w") as f:
        f.write(PARSER_LOOP)
    try:
        escaped = head.decode("latin-1").encode("unicode_escape").decode("latin-1")
        return collected([python_binary(), script, tree, escaped, str(n)])
    finally:
        os.unlink(script)


def per_request(cost):
    return (cost(200 + EXTRA) - cost(200)) // EXTRA


def checkout(rev):
    tree = tempfile.mkdtemp(prefix="pagi_bench_rev_")
    with open(os.path.join(tree, "pagi_ref.py"), "wb") as f:
        f.write(subprocess.check_output(["git", "-C", ROOT, "show", "%s:pagi_ref.py" % rev]))
    return tree


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rev", action="append", default=[],
                        help="also measure pagi_ref.py of this git revision")
    parser.add_argument("--parser-only", action="store_true")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    trees = [(rev, checkout(rev)) for rev in args.rev] + [("this checkout", ROOT)]
    try:
        for name, tree in trees:
            if args.parser_only:
                for label, head in (("wrk-like head", WRK_LIKE), ("browser-like head", BROWSER_LIKE)):
                    print("%-14s %-18s %8d instructions/request"
                          % (name, label, per_request(lambda n: parser_cost(tree, head, n))))
            else:
                print("%-14s %-18s %8d instructions/request"
                      % (name, "E1 GET /", per_request(lambda n: server_cost(tree, n))))
    finally:
        for name, tree in trees:
            if tree != ROOT:
                shutil.rmtree(tree)


if __name__ == "__main__":
    main()
