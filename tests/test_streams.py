"""Section 5's byte streams: the one interface over a connected socket.

SocketStream over real TCP and Unix sockets: the addresses the scope's
``client``/``server`` are built from (a Unix path is not cut to two
characters), and the calls the Transport and the connections make.  The
TLS stream is tested from a client's side in test_tls.py.
"""
import select
import socket

import pytest

import pagi_ref


def tcp_pair(family=socket.AF_INET, host="127.0.0.1"):
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname()[:2], timeout=10)
    side, peer = listener.accept()
    listener.close()
    return client, side, peer


def test_tcp_addresses():
    client, side, peer = tcp_pair()
    try:
        stream = pagi_ref.SocketStream(side, peer)
        assert stream.local_address == ("127.0.0.1", side.getsockname()[1])
        assert stream.peer_address == ("127.0.0.1", client.getsockname()[1])
        assert stream.fd == side.fileno() and stream.tls is None
        assert not stream.scheme_secure
    finally:
        client.close()
        side.close()


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_ipv6_addresses_drop_flow_and_scope_ids():
    try:
        client, side, peer = tcp_pair(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        stream = pagi_ref.SocketStream(side, peer)
        assert stream.local_address == ("::1", side.getsockname()[1])
        assert stream.peer_address == ("::1", client.getsockname()[1])
    finally:
        client.close()
        side.close()


def test_unix_socket_addresses_keep_the_whole_path(tmp_path):
    # PAGI: for a Unix socket ``server`` is [path, None]; the client has no
    # address (an unnamed socket), so ``client`` is None.
    path = str(tmp_path / "a-rather-long-socket-name.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    side, peer = listener.accept()
    try:
        stream = pagi_ref.SocketStream(side, peer)
        assert stream.local_address == (path, None)
        assert stream.peer_address is None
        assert pagi_ref.SocketStream(side).peer_address is None   # from getpeername
    finally:
        for s in (client, side, listener):
            s.close()


def test_the_interface_over_a_plain_socket(tmp_path):
    client, side, peer = tcp_pair()
    side.setblocking(False)
    stream = pagi_ref.SocketStream(side, peer)
    try:
        with pytest.raises(BlockingIOError):
            stream.recv(100)                      # nothing yet
        assert not stream.has_bytes()
        client.sendall(b"ping")
        client.settimeout(10)
        assert select.select([side], [], [], 10)[0]
        assert stream.has_bytes()                 # seen, not taken
        assert stream.recv(100) == b"ping"
        assert stream.send(b"a") == 1
        assert stream.send_many([b"b", memoryview(b"cd")]) == 3
        path = tmp_path / "f"
        path.write_bytes(b"0123456789")
        with open(path, "rb") as f:
            assert stream.sendfile(f.fileno(), 2, 5) == 5
        stream.shutdown_write()
        got = b""
        while True:
            data = client.recv(100)
            if not data:
                break
            got += data
        assert got == b"abcd23456"
        client.close()
        assert select.select([side], [], [], 10)[0]
        assert stream.recv(100) == b""            # the peer's end
    finally:
        stream.close()
        client.close()
    assert side.fileno() == -1
