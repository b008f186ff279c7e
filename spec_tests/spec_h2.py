"""An HTTP/2 client for the conformance suite, built on the `h2` library.

The suite checks a server's HTTP/2 from the outside with an implementation
that is not the server's own: python-hyper's `h2` (RFC 9113 and RFC 7541,
sans-I/O), driven here over a blocking socket.  `h2` is a test dependency
(`.ci/run` and tox install it); pagi_ref itself stays standard-library only.
When `h2` is missing, or the server does not answer the HTTP/2 connection
preface, the tests that need it report "not observable".

    with H2Client(addr) as c:                       # h2c, prior knowledge (RFC 9113 §3.3)
        sid = c.request("GET", "/scope")
        resp = c.response(sid)                      # status, headers, body, trailers

    with H2Client(addr, cafile=cert) as c: ...      # TLS, ALPN "h2" (RFC 9113 §3.2)

Outbound header validation is off, so a test can send what a hostile client
sends (an uppercase name, a missing pseudo-header); received frames are
checked by `h2` as a strict client would.
"""
import socket
import ssl

import pytest

try:
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions
    import h2.settings
except ImportError:          # the tests that need it skip as "not observable"
    h2 = None


class NotHTTP2(Exception):
    """The server did not speak HTTP/2 on this connection."""


class H2Response:
    """What one stream brought back."""

    def __init__(self, stream_id):
        self.stream_id = stream_id
        self.status = None            # int, from :status
        self.headers = []             # [(name bytes, value bytes)], pseudo-headers removed
        self.informational = []       # [(status, headers)] of 1xx responses
        self.body = b""
        self.chunks = []              # each DATA frame's payload, in order
        self.trailers = None          # [(name, value)] or None
        self.ended = False            # END_STREAM seen
        self.reset = None             # the RST_STREAM error code, if the server reset it

    def header(self, name):
        values = [v for n, v in self.headers if n == name]
        return values[0] if values else None

    def header_all(self, name):
        return [v for n, v in self.headers if n == name]

    def __repr__(self):
        return "<H2Response stream=%d status=%s body=%r reset=%s>" % (
            self.stream_id, self.status, self.body[:60], self.reset)


def require_h2():
    if h2 is None:
        pytest.skip("not observable: the `h2` package (the suite's HTTP/2 client) is not installed")


class H2Client:
    """One HTTP/2 connection.  Every read has a timeout, so a server that
    stays silent fails the test instead of hanging it."""

    def __init__(self, addr, cafile=None, timeout=10.0, settings=None, auto_window=True):
        require_h2()
        self.timeout = timeout
        self.auto_window = auto_window   # grant back every DATA byte at once
        raw = socket.create_connection(addr, timeout=timeout)
        if cafile is not None:
            context = ssl.create_default_context(cafile=cafile)
            context.set_alpn_protocols(["h2", "http/1.1"])
            self.sock = context.wrap_socket(raw, server_hostname="localhost")
            if self.sock.selected_alpn_protocol() != "h2":
                self.sock.close()
                raise NotHTTP2("ALPN selected %r, not h2" % self.sock.selected_alpn_protocol())
            self.scheme = "https"
        else:
            self.sock = raw
            self.scheme = "http"
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None,
            validate_outbound_headers=False, normalize_outbound_headers=False,
            validate_inbound_headers=True)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)
        self.streams = {}                # stream id -> H2Response
        self.events = []                 # every h2 event, in order
        self.terminated = None           # the GOAWAY event, if one came
        self.closed = False              # the server closed TCP
        self.remote_settings = None
        self.flush()
        try:
            self.pump_until(lambda: self.remote_settings is not None)
        except (h2.exceptions.ProtocolError, ConnectionError, socket.timeout) as exc:
            self.sock.close()
            raise NotHTTP2("no SETTINGS in answer to the connection preface: %r" % exc)
        if self.remote_settings is None:
            self.sock.close()
            raise NotHTTP2("the server closed the connection after the preface")

    # -- the socket ------------------------------------------------------------------

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data):
        """Bytes the h2 state machine does not see (a hostile frame)."""
        self.sock.sendall(data)

    def pump(self):
        """Read once and handle what came; False when the server closed TCP."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return False
        for event in self.conn.receive_data(data):
            self._handle(event)
        self.flush()
        return True

    def pump_until(self, predicate):
        while not predicate():
            if self.closed or not self.pump():
                return predicate()
        return True

    def _stream(self, stream_id):
        if stream_id not in self.streams:
            self.streams[stream_id] = H2Response(stream_id)
        return self.streams[stream_id]

    def _handle(self, event):
        self.events.append(event)
        E = h2.events
        if isinstance(event, E.RemoteSettingsChanged):
            self.remote_settings = dict((k, v.new_value) for k, v in event.changed_settings.items())
        elif isinstance(event, E.InformationalResponseReceived):
            status = int(dict(event.headers)[b":status"])
            self._stream(event.stream_id).informational.append((status, event.headers))
        elif isinstance(event, E.ResponseReceived):
            r = self._stream(event.stream_id)
            r.status = int(dict(event.headers)[b":status"])
            r.headers = [(n, v) for n, v in event.headers if not n.startswith(b":")]
        elif isinstance(event, E.DataReceived):
            r = self._stream(event.stream_id)
            r.body += event.data
            r.chunks.append(event.data)
            if self.auto_window and event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, E.TrailersReceived):
            self._stream(event.stream_id).trailers = list(event.headers)
        elif isinstance(event, E.StreamEnded):
            self._stream(event.stream_id).ended = True
        elif isinstance(event, E.StreamReset):
            self._stream(event.stream_id).reset = event.error_code
        elif isinstance(event, E.ConnectionTerminated):
            self.terminated = event

    # -- requests --------------------------------------------------------------------

    def request(self, method, path, headers=(), body=None, end_stream=True,
                authority="localhost", pseudo=None):
        """Open a stream; returns its id.  ``pseudo`` replaces the four
        request pseudo-headers (a list of pairs) for malformed requests."""
        sid = self.conn.get_next_available_stream_id()
        if pseudo is None:
            pseudo = [(b":method", method.encode()), (b":scheme", self.scheme.encode()),
                      (b":path", path.encode())]
            if authority is not None:
                pseudo.append((b":authority", authority.encode()))
        fields = list(pseudo) + [(_b(n), _b(v)) for n, v in headers]
        self.conn.send_headers(sid, fields, end_stream=end_stream and not body)
        self._stream(sid)
        if body:
            self.send_data(sid, body, end_stream=end_stream)
        self.flush()
        return sid

    def send_data(self, sid, data, end_stream=False):
        self.conn.send_data(sid, data, end_stream=end_stream)
        self.flush()

    def end_stream(self, sid):
        self.conn.end_stream(sid)
        self.flush()

    def reset(self, sid, code=8):          # 8: CANCEL
        self.conn.reset_stream(sid, error_code=code)
        self.flush()

    def response(self, sid):
        """Read until the stream ended or was reset (or TCP closed)."""
        r = self._stream(sid)
        self.pump_until(lambda: r.ended or r.reset is not None or self.terminated is not None)
        return r

    def get(self, path, headers=()):
        return self.response(self.request("GET", path, headers=headers))

    def close(self):
        try:
            if not self.closed:
                self.conn.close_connection()
                self.flush()
        except Exception:
            pass
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _b(x):
    return x if isinstance(x, bytes) else x.encode("latin-1")


def h2c_client(addr, **kw):
    """An h2c client, or skip: the server does not speak cleartext HTTP/2
    (PAGI www §HTTP/2 Stream Mapping: h2c is optional)."""
    try:
        return H2Client(addr, **kw)
    except NotHTTP2 as exc:
        pytest.skip("not observable: no cleartext HTTP/2 (prior knowledge) on this server: %s" % exc)
