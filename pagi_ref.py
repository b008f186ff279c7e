"""pagi_ref -- the reference server of the PAGI protocol.

PAGI is an asynchronous gateway interface in the spirit of ASGI: the server
turns every connection into a ``scope`` and the application talks to it only
through ``receive()`` and ``send(event)``.  This module serves the PAGI scope
types ``http``, ``websocket``, ``sse`` and ``lifespan`` over HTTP/1.1 (and
``http`` and ``sse`` over HTTP/2, with ``--http2``), in one
process or pre-forked workers, and is written to be read from top to bottom
as an executable specification (the protocol itself: ``docs/spec.md``).

Standard library only, CPython 3.9+.  One file: copy it anywhere.

Contents (each section uses only the sections above it):

     1. Configuration          -- every limit, watermark and timeout
     2. Reactor                -- a selectors loop: ready queue, timers, self-pipe
     3. Futures and tasks      -- Future, Task, sleep, spawn, wait_any, wait_all
     4. HTTP/1.1 wire format   -- sans-I/O request parser, response serializer
    4a. HPACK                  -- RFC 7541: header compression for HTTP/2
    4b. HTTP/2 frames          -- RFC 9113 without I/O: frames, streams, windows
     5. Outgoing buffer        -- counted bytes, watermarks, pagi.transport
     6. Connections            -- the http scope, receive/send, pagi.connection
    6a. HTTP/2 connections     -- streams as scopes; ALPN h2 and h2c by preface
     7. WebSocket              -- RFC 6455: handshake, frame codec, the session;
                                  RFC 7692: permessage-deflate
     8. Server-Sent Events     -- the sse scope: event streams over HTTP
     9. Lifespan               -- startup and shutdown, the state namespace
    10. Server                 -- listeners, accept, admission, sweep, shutdown
    11. Workers                -- the pre-fork supervisor and its signals
    12. Command line           -- python pagi_ref.py module:app
    13. Test client            -- TestClient: test applications through the server

Principles:

  1. Honest async.  No thread per connection and no hidden buffer: a response
     goes out as the application produces it, and the only buffer is the
     counted outgoing buffer, whose size ``send()`` respects.
  2. Bounded everything.  Every buffer, queue and length has a limit in
     ``Config`` and a defined answer when it is crossed.
  3. Fail loudly, lose nothing.  Bad input gets its status; an application
     bug gets a 500 (or a visibly truncated response) and a traceback in the
     error log; a client that leaves is an event, not an error.
  4. Fast on the common path.  A keep-alive GET is parsed with bytes.find and
     split, answered with one write, and never bounces through the ready
     queue when nothing has to wait.
  5. Fair.  A task that never has to wait is resumed inline only for a
     bounded number of steps, then goes back through the ready queue.
"""

# Before anything else, refuse what cannot work, in words: this module
# needs CPython 3.9+ (os.waitstatus_to_exitcode, the fork-safe standard
# library it was tested with) and a POSIX system (fork, signals, the
# resource module).  Kept to syntax that even Python 3.6 can parse, so that
# an old interpreter reaches this message rather than a SyntaxError.
import os as _os
import sys as _sys

_REFUSAL = None
if _sys.version_info < (3, 9):
    _REFUSAL = ("pagi_ref needs CPython 3.9 or newer; this is Python %s"
                % ".".join(str(n) for n in tuple(_sys.version_info)[:3]))
elif _os.name != "posix":
    _REFUSAL = ("pagi_ref needs a POSIX system (Linux, macOS, a BSD): it uses fork, "
                "POSIX signals and the resource module; this is os.name %r" % _os.name)
if _REFUSAL is not None:
    if __name__ == "__main__":
        _sys.exit("pagi_ref: error: " + _REFUSAL)
    raise ImportError(_REFUSAL)
del _os, _sys, _REFUSAL

import base64
import binascii
import codecs
import collections
import concurrent.futures
import errno
import faulthandler
import functools
import hashlib
import heapq
import importlib
import importlib.util
import ipaddress
import json
import logging
import os
import random
import re
import resource
import selectors
import signal
import socket
import stat
import sys
import threading
import time
import traceback
import weakref
import zlib
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import quote, unquote_to_bytes, urlencode
try:
    import ssl
except ImportError:     # a Python built without OpenSSL: no TLS, all else works
    ssl = None

__version__ = "0.1.0"

__all__ = [
    "Config", "ConfigError",
    "Loop", "get_loop",
    "Future", "Task", "CancelledError", "sleep", "spawn", "wait_any", "wait_all", "to_thread",
    "HTTPError", "EventError", "RequestParser", "RequestHead", "EndOfMessage",
    "HPACKDecoder", "HPACKEncoder", "HPACKError", "HeaderListTooLarge",
    "H2Protocol", "H2ConnectionError", "H2StreamError",
    "SocketStream", "TLSStream", "Transport", "ConnectionState", "Exchange", "HTTPConnection",
    "H2Connection", "ProtocolChoice",
    "FrameParser", "FrameError", "PerMessageDeflate", "WebSocketConnection",
    "SSEExchange", "Lifespan", "LifespanFailed",
    "Server", "Listener", "ListenError", "open_listeners", "Supervisor", "run", "main",
    "TestClient", "TestClientError", "TestClientTimeout", "WebSocketDisconnect",
    "WebSocketRejected",
]

PAGI_VERSION = "0.3"        # scope["pagi"]["version"]: the core spec
PAGI_SPEC_VERSION = "0.3"   # scope["pagi"]["spec_version"]: the HTTP sub-spec


# ============================================================================
# 1. Configuration
#
# One table holds every knob: its name, default, type, unit and help.  The
# Config class, the command line (section 12) and docs/server.md draw on it,
# so a limit is added in exactly one place.
# ============================================================================

def _default_max_connections():
    """Leave headroom under RLIMIT_NOFILE for the process's own files
    (listeners, self-pipe, log files, files being served) and for the
    sockets of refused connections (section 10, _REFUSAL_RESERVE)."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ValueError, OSError):
        return 1000
    if soft == resource.RLIM_INFINITY:
        return 10000
    return max(8, soft - max(32, soft // 16))


# name, default, type, help (with unit).  A default of None with a factory
# below means "computed at start-up".
_CONFIG_FIELDS = [
    ("host", "127.0.0.1", str, "interface to bind"),
    ("port", 8000, int, "TCP port to bind (0: the OS picks one)"),
    ("backlog", 1024, int, "listen() backlog (connections)"),
    ("workers", 1, int, "processes serving the one listener (more than 1: pre-forked)"),
    ("root_path", "", str, "scope['root_path']: the application's mount point"),
    ("max_header_size", 8192, int,
     "bytes; the request line and the header block each (414 / 431 past it)"),
    ("max_header_count", 100, int, "header fields per request (431 past it)"),
    ("max_body_size", 10 * 1024 * 1024, int,
     "bytes of request body, declared or chunked (413 past it; 0: no limit)"),
    ("max_receive_queue", 16, int,
     "request-body or WebSocket events queued for the application before reading pauses"),
    ("ws_max_message_size", 16 * 1024 * 1024, int,
     "bytes in one WebSocket message, fragments included, counted after inflating "
     "a compressed one (close 1009 past it; 0: no limit)"),
    ("ws_per_message_deflate", True, bool,
     "negotiate permessage-deflate compression (RFC 7692) with WebSocket clients that "
     "offer it (--no-ws-per-message-deflate: never)"),
    ("ws_ping_interval", 20.0, float,
     "seconds between the server's pings on an open WebSocket (0: none); an "
     "application's websocket.keepalive replaces it for its connection"),
    ("ws_ping_timeout", 20.0, float,
     "seconds a WebSocket ping may go unanswered before the connection is dropped "
     "(keepalive_timeout; 0: never)"),
    ("write_high_watermark", 65536, int,
     "bytes buffered for a client at which send() suspends"),
    ("write_low_watermark", 16384, int,
     "bytes buffered for a client below which a suspended send() resumes"),
    ("write_buffer_limit", 1024 * 1024, int,
     "bytes buffered for a client past which a write made without waiting for the "
     "drain drops the connection (queue_overflow; 0: no limit)"),
    ("max_connections", None, int,
     "open client connections; past it new ones get 503"),
    ("header_timeout", 10.0, float,
     "seconds for the request line and headers to arrive (408)"),
    ("keepalive_timeout", 5.0, float, "seconds an idle keep-alive connection is kept"),
    ("client_timeout", 60.0, float,
     "seconds a request may go with no byte moving either way"),
    ("write_timeout", 60.0, float,
     "seconds the client may leave a full outgoing buffer unread"),
    # Minimum data rates, Apache mod_reqtimeout's rule: a head or a body gets
    # its grace period, then one more second for every min-rate bytes that
    # arrive; a client slower than that is answered 408 (issue 9).
    ("header_grace", 5.0, float,
     "seconds a request head may take before header_min_rate applies"),
    ("header_min_rate", 500, int,
     "bytes/s a request head must average once header_grace is over "
     "(408; 0: no minimum; header_timeout still caps the head)"),
    ("body_grace", 20.0, float,
     "seconds the server may wait for a request body before body_min_rate applies"),
    ("body_min_rate", 500, int,
     "bytes/s a request body must average, counting only the time the server "
     "waits for it, once body_grace is over (408, reason client_timeout; 0: no minimum)"),
    ("shutdown_timeout", 30.0, float,
     "seconds in-flight requests get to finish on SIGTERM/SIGINT"),
    ("access_log", "-", str,
     "access log: '-' (stdout) or a file path; --no-access-log (or None from Python): none"),
    ("access_log_format", "pagi", str,
     "access log format: pagi, common, combined, or tokens such as '%h %r %s %b %D'"),
    ("log_level", "info", str, "error log level: error, warning, info, debug"),
    ("lifespan", "auto", str,
     "lifespan scope: auto (run it; an application that declines is fine), "
     "on (a decline stops the server), off (never)"),
    # Supervision (sections 2, 10, 11).
    ("slow_callback", 0.5, float,
     "seconds one callback may hold the event loop before a WARNING names it (0: never)"),
    ("worker_timeout", 30.0, float,
     "seconds a worker's loop may go without turning before the supervisor kills "
     "and replaces it (0: never)"),
    ("worker_boot_timeout", 300.0, float,
     "seconds a new worker may take to load the application and run its lifespan "
     "startup before the supervisor kills it (0: never)"),
    ("max_requests", 0, int,
     "requests a worker serves before it is replaced gracefully (0: no limit)"),
    ("max_requests_jitter", 0, int,
     "up to this many more requests, drawn per worker, so workers do not all "
     "restart at once"),
    # Listeners, proxies in front, the server's own headers (issue 12).
    ("bind", (), tuple,
     "listeners, instead of host and port: HOST:PORT, [IPv6]:PORT, unix:PATH or fd://N "
     "(repeatable; --uds PATH and --fd N are the same as unix:PATH and fd://N)"),
    ("proxy_headers", False, bool,
     "believe X-Forwarded-For/-Proto or Forwarded from a trusted peer for "
     "scope client and scheme"),
    ("forwarded_allow_ips", "127.0.0.1", str,
     "peers trusted with proxy headers: addresses, networks (10.0.0.0/8), "
     "names, or * for all; comma-separated"),
    ("server_header", True, bool, "send 'server: pagi_ref' unless the application sent one"),
    ("date_header", True, bool, "send 'date' unless the application sent one"),
    # TLS (section 5), with uvicorn's names and meanings.
    ("ssl_certfile", None, str,
     "PEM certificate (chain) file: serve HTTPS/WSS with it (none: cleartext)"),
    ("ssl_keyfile", None, str, "PEM private key file (none: the key is in ssl_certfile)"),
    ("ssl_keyfile_password", None, str, "password of an encrypted ssl_keyfile"),
    ("ssl_ca_certs", None, str, "PEM file of the CAs that client certificates must chain to"),
    ("ssl_cert_reqs", 0, int,
     "client certificates: 0 not asked for, 1 optional (verified if sent), 2 required"),
    # HTTP/2 (sections 4b, 6a; docs/http2.md).
    ("http2", True, bool,
     "serve HTTP/2: h2 by ALPN over TLS, h2c with prior knowledge in cleartext "
     "(--no-http2: HTTP/1.1 only)"),
    ("h2_max_concurrent_streams", 100, int,
     "streams one HTTP/2 client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS; "
     "more are refused with REFUSED_STREAM)"),
    ("ssl_ciphers", None, str,
     "OpenSSL cipher list for TLS 1.2, e.g. 'ECDHE+AESGCM' (none: Python's defaults; "
     "TLS 1.3 suites are OpenSSL's)"),
]

_CONFIG_FACTORIES = {"max_connections": _default_max_connections}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field."""


class Config:
    """Every limit, watermark and timeout of one server, with its default.

    >>> Config(port=0).max_header_size
    8192
    """

    __slots__ = tuple(f[0] for f in _CONFIG_FIELDS)

    def __init__(self, **fields):
        for name, default, kind, _help in _CONFIG_FIELDS:
            value = fields.pop(name, default)
            if value is None and name in _CONFIG_FACTORIES:
                value = _CONFIG_FACTORIES[name]()
            if value is not None and kind is float and isinstance(value, int):
                value = float(value)
            if kind is tuple and isinstance(value, (list, str)):
                value = (value,) if isinstance(value, str) else tuple(value)
            if value is not None and not isinstance(value, kind):
                raise ConfigError("%s must be %s, got %r" % (name, kind.__name__, value))
            setattr(self, name, value)
        if fields:
            raise ConfigError("unknown configuration field(s): %s" % ", ".join(sorted(fields)))
        self._check()

    def _check(self):
        for name, _d, kind, _h in _CONFIG_FIELDS:
            value = getattr(self, name)
            if kind in (int, float) and name != "port" and value < 0:
                raise ConfigError("%s must not be negative, got %r" % (name, value))
        if not 0 <= self.port <= 65535:
            raise ConfigError("port must be in 0..65535, got %r" % self.port)
        # As asyncio's _FlowControlMixin: high >= low >= 0, and say both.
        if self.write_low_watermark > self.write_high_watermark:
            raise ConfigError(
                "write_low_watermark (%d) must not be above write_high_watermark (%d)"
                % (self.write_low_watermark, self.write_high_watermark))
        if self.write_buffer_limit and self.write_buffer_limit < self.write_high_watermark:
            raise ConfigError("write_buffer_limit (%d) must be 0 or at least "
                              "write_high_watermark (%d)"
                              % (self.write_buffer_limit, self.write_high_watermark))
        if self.max_receive_queue < 1:
            raise ConfigError("max_receive_queue must be at least 1")
        if self.workers < 1:
            raise ConfigError("workers must be at least 1")
        if self.h2_max_concurrent_streams < 1:
            raise ConfigError("h2_max_concurrent_streams must be at least 1")
        if self.max_connections < 1:
            raise ConfigError("max_connections must be at least 1")
        if self.lifespan not in ("auto", "on", "off"):
            raise ConfigError("lifespan must be auto, on or off, got %r" % self.lifespan)
        if self.ssl_cert_reqs not in (0, 1, 2):
            raise ConfigError("ssl_cert_reqs must be 0, 1 or 2, got %r" % self.ssl_cert_reqs)
        if not self.ssl_certfile:
            for name in ("ssl_keyfile", "ssl_keyfile_password", "ssl_ca_certs",
                         "ssl_cert_reqs", "ssl_ciphers"):
                if getattr(self, name):
                    raise ConfigError("%s needs ssl_certfile (no TLS without a certificate)"
                                      % name)
        if self.ssl_cert_reqs and not self.ssl_ca_certs:
            raise ConfigError("ssl_cert_reqs %d needs ssl_ca_certs (the CAs to verify "
                              "client certificates with)" % self.ssl_cert_reqs)
        if self.log_level not in _LOG_LEVELS:
            raise ConfigError("log_level must be one of %s, got %r"
                              % (", ".join(_LOG_LEVELS), self.log_level))
        for text in self.bind:
            parse_bind(text)
        TrustedPeers(self.forwarded_allow_ips)

    def __repr__(self):
        return "Config(%s)" % ", ".join("%s=%r" % (n, getattr(self, n)) for n in self.__slots__)


_LOG_LEVELS = {"error": logging.ERROR, "warning": logging.WARNING,
               "info": logging.INFO, "debug": logging.DEBUG}


def parse_bind(text):
    """One --bind value, as gunicorn and hypercorn write them:
    ``("tcp", host, port)`` for HOST:PORT or [IPv6]:PORT, ``("unix", path)``
    for unix:PATH, ``("fd", n)`` for fd://N (a listening socket inherited
    from whoever started the process).  ConfigError names what is wrong."""
    if not isinstance(text, str):
        raise ConfigError("bind entries must be str, got %r" % (text,))
    if text.startswith("unix:"):
        if not text[5:]:
            raise ConfigError("bind %r: unix: needs a path" % text)
        return ("unix", text[5:])
    if text.startswith("fd://"):
        digits = text[5:]
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 9):
            raise ConfigError("bind %r: fd:// needs a descriptor number" % text)
        return ("fd", int(digits))
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ConfigError("bind %r: an IPv6 address goes in brackets, [::1]:8000" % text)
    if not sep or not host or not (port.isascii() and port.isdigit() and len(port) <= 5) \
            or int(port) > 65535:
        raise ConfigError("bind %r: expected HOST:PORT, [IPv6]:PORT, unix:PATH or fd://N"
                          % text)
    return ("tcp", host, int(port))


class TrustedPeers:
    """The parsed value of forwarded_allow_ips (uvicorn's option): which
    peers may speak for their clients in proxy headers.  Items are IP
    addresses, networks (``10.0.0.0/8``), other names compared as written
    (an RFC 7239 obfuscated node such as ``_proxy1``), or ``*`` for every
    peer.  Calling it with a host string says whether it is trusted."""

    def __init__(self, text):
        self.everyone = False
        self.networks = []            # ipaddress networks (an address is a /32 or /128)
        self.names = set()            # anything else, compared as written
        for item in text.split(","):
            item = item.strip()
            if item == "*":
                self.everyone = True
            elif "/" in item:
                try:
                    self.networks.append(ipaddress.ip_network(item, strict=False))
                except ValueError:
                    raise ConfigError("forwarded_allow_ips: %r is not a network" % item)
            elif item:
                try:
                    self.networks.append(ipaddress.ip_network(item))
                except ValueError:
                    self.names.add(item)

    def __call__(self, host):
        if self.everyone:
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return host in self.names
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped       # a dual-stack listener's view of an IPv4 peer
        return any(ip in network for network in self.networks)


# ============================================================================
# 2. Reactor
#
# A selectors loop in the curio tradition: one block of state, a run loop in
# three labelled phases (poll I/O, fire timers, run ready callbacks), and a
# self-pipe so that signal handlers and other threads can wake it.  The loop
# running in a thread is found with get_loop(), as asyncio does; two loops in
# two threads share nothing.
# ============================================================================

_running = threading.local()   # .loop: the Loop running in this thread
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_TIMER_SWEEP = 1024    # every this many timers, drop the cancelled ones if most are
_CLOCK_RESOLUTION = 1e-3  # seconds: select/epoll timeouts are whole milliseconds


def get_loop():
    """The Loop running in this thread; RuntimeError if there is none."""
    loop = getattr(_running, "loop", None)
    if loop is None:
        raise RuntimeError("no pagi_ref loop is running in this thread")
    return loop


class Timer:
    """A callback due at a time on the loop's clock; cancel() unschedules."""

    __slots__ = ("when", "seq", "callback", "args", "cancelled")

    def __init__(self, when, seq, callback, args):
        self.when = when
        self.seq = seq
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self):
        self.cancelled = True
        self.callback = self.args = None   # let go of what it referenced

    def __lt__(self, other):
        return (self.when, self.seq) < (other.when, other.seq)


def _loop_context(callback, args=()):
    """What a callback serves, in the application's words, for the slow
    callback warning.  An object may define ``loop_context()`` (a Task, a
    connection, an exchange: "http GET /report"); a bound method stands for
    its object."""
    for obj in (callback,) + tuple(args[:1]):
        for _ in range(3):
            describe = getattr(obj, "loop_context", None)
            if describe is not None:
                try:
                    return describe()
                except Exception:
                    break
            owner = getattr(obj, "__self__", None)
            if owner is None:
                break
            obj = owner
    return getattr(callback, "__qualname__", None) or repr(callback)


class Loop:
    """The reactor: I/O readiness, timers and a ready queue, on one thread.

    Collaborators are parameters so tests can drive it: ``selector`` (any
    selectors.BaseSelector) and ``clock`` (a monotonic float function).
    ``slow_callback``: seconds one callback may hold the loop before a
    WARNING names it (0: never), as asyncio's debug mode does.
    """

    def __init__(self, selector=None, clock=time.monotonic, logger=None, slow_callback=0.5):
        self._selector = selector or selectors.DefaultSelector()
        self._clock = clock                 # monotonic seconds
        self.log = logger or logging.getLogger("pagi_ref")
        self.slow_callback = slow_callback  # seconds; 0: callbacks are not timed
        self._signals = {}                  # signum -> callback(signum), run on the loop
        self._ready = collections.deque()   # (callback, args) to run this turn
        self._timers = []                   # heap of Timer
        self._timer_seq = 0                 # tie-breaker: equal times run in order
        self._handlers = {}                 # fd -> [reader, writer] (the key's data)
        self._threadsafe = collections.deque()  # (callback, args) from other threads
        self._stopping = False              # run_forever returns at the turn's end
        self._executor = None               # to_thread's pool, made on first use
        self.now = clock()                  # the clock, read once per turn
        # The self-pipe: a byte written to _wake_w makes select() return.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.add_reader(self._wake_r.fileno(), self._drain_wakeups)

    def __repr__(self):
        return "<Loop fds=%d ready=%d timers=%d>" % (
            len(self._handlers), len(self._ready), len(self._timers))

    def time(self):
        return self._clock()

    def executor(self):
        """The thread pool of to_thread (concurrent.futures' default size)."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                thread_name_prefix="pagi_ref.to_thread")
        return self._executor

    # -- scheduling -----------------------------------------------------------

    def call_soon(self, callback, *args):
        self._ready.append((callback, args))

    def call_later(self, delay, callback, *args):
        self._timer_seq += 1
        timer = Timer(self._clock() + delay, self._timer_seq, callback, args)
        timers = self._timers
        heapq.heappush(timers, timer)
        if self._timer_seq % _TIMER_SWEEP == 0 and len(timers) > _TIMER_SWEEP:
            # Cancelled timers stay in the heap until due (lazy deletion);
            # a server that cancels long timeouts all day would keep them
            # all.  Every so often, drop them if they are most of the heap.
            live = [t for t in timers if not t.cancelled]
            if len(live) < len(timers) // 2:
                timers[:] = live        # in place: _run_once may hold the list
                heapq.heapify(timers)
        return timer

    def call_soon_threadsafe(self, callback, *args):
        """Schedule from any thread (or a signal handler) and wake the loop."""
        self._threadsafe.append((callback, args))
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass   # the pipe is full: the loop is awake anyway
        except OSError:
            pass   # the loop has closed

    def _drain_wakeups(self):
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while self._threadsafe:
            self._ready.append(self._threadsafe.popleft())

    # -- I/O callbacks --------------------------------------------------------

    def _update(self, fd, handler):
        events = (selectors.EVENT_READ if handler[0] else 0) | \
                 (selectors.EVENT_WRITE if handler[1] else 0)
        registered = fd in self._handlers
        if events and registered:
            self._selector.modify(fd, events, handler)
        elif events:
            self._selector.register(fd, events, handler)
            self._handlers[fd] = handler
        elif registered:
            self._selector.unregister(fd)
            del self._handlers[fd]

    def add_reader(self, fd, callback):
        handler = self._handlers.get(fd) or [None, None]
        handler[0] = callback
        self._update(fd, handler)

    def remove_reader(self, fd):
        handler = self._handlers.get(fd)
        if handler is not None and handler[0] is not None:
            handler[0] = None
            self._update(fd, handler)

    def add_writer(self, fd, callback):
        handler = self._handlers.get(fd) or [None, None]
        handler[1] = callback
        self._update(fd, handler)

    def remove_writer(self, fd):
        handler = self._handlers.get(fd)
        if handler is not None and handler[1] is not None:
            handler[1] = None
            self._update(fd, handler)

    def forget(self, fd):
        """Drop both callbacks of fd (before it is closed)."""
        handler = self._handlers.pop(fd, None)
        if handler is not None:
            handler[0] = handler[1] = None   # a batch already polled skips it
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError):
                pass

    # -- signals --------------------------------------------------------------
    #
    # Python runs a signal handler in the main thread between two bytecodes
    # of whatever it was doing -- possibly in the middle of a write to
    # stderr, where logging from the handler fails with "reentrant call".
    # So the handler only queues the callback and writes to the self-pipe;
    # the callback runs on the loop like any other, and may log.

    def add_signal_handler(self, signum, callback):
        """Run ``callback(signum)`` on this loop when ``signum`` arrives.
        Main thread only (Python's rule for signal handlers)."""
        self._signals[signum] = callback
        signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        callback = self._signals.get(signum)
        if callback is not None:
            self.call_soon_threadsafe(callback, signum)

    def remove_signal_handlers(self):
        """Give back the signals this loop handles to their default action."""
        for signum in self._signals:
            signal.signal(signum, signal.SIG_DFL)
        self._signals.clear()

    # -- running --------------------------------------------------------------

    def stop(self):
        """Return from run_forever at the end of this turn (any thread)."""
        self._stopping = True
        self.call_soon_threadsafe(lambda: None)

    def run_forever(self):
        self.run_until(None)

    def run_until(self, future):
        """Run turns until ``future`` is done (never, for None) or stop()."""
        if getattr(_running, "loop", None) is not None:
            raise RuntimeError("a pagi_ref loop is already running in this thread")
        _running.loop = self
        self._stopping = False
        try:
            while not self._stopping and not (future is not None and future.done()):
                self._run_once()
        finally:
            _running.loop = None

    def _run_once(self):
        ready = self._ready
        timers = self._timers
        # Phase 1: poll I/O.  Wait only if nothing is ready to run.
        if ready:
            timeout = 0
        elif timers:
            timeout = max(0.0, timers[0].when - self._clock())
        else:
            timeout = None
        events = self._selector.select(timeout)
        self.now = now = self._clock()
        # A callback that holds the loop longer than slow_callback is named
        # in a WARNING: one clock read per callback, each measured from the
        # end of the one before.
        slow = self.slow_callback
        clock = self._clock
        mark = now
        # The I/O callbacks are called in place, not through _run_callback:
        # this is the hot path, one call less per readiness event.
        for key, mask in events:
            handler = key.data
            callback = handler[0] or handler[1]   # for the warning: the call may clear them
            try:
                if mask & _READ and handler[0] is not None:
                    handler[0]()
                if mask & _WRITE and handler[1] is not None:
                    handler[1]()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException:
                self.log.error("unexpected error in an I/O callback for %r\n%s",
                               key.fileobj, traceback.format_exc().rstrip())
            if slow:
                end = clock()
                if end - mark > slow:
                    self._report_slow(callback, (), end - mark)
                mark = end
        # Phase 2: move due timers to the ready queue.
        # A timer due within the clock's resolution fires now: epoll rounds
        # its timeout up to whole milliseconds, and waiting again for the
        # remainder would make every sleep() a little late (as asyncio does).
        due = now + _CLOCK_RESOLUTION
        while timers and timers[0].when <= due:
            timer = heapq.heappop(timers)
            if not timer.cancelled:
                ready.append((timer.callback, timer.args))
        # Phase 3: run what was ready at the start of this phase; what those
        # callbacks schedule waits for the next turn, after another poll.
        if not slow:
            for _ in range(len(ready)):
                callback, args = ready.popleft()
                self._run_callback(callback, args)
            return
        for _ in range(len(ready)):
            callback, args = ready.popleft()
            self._run_callback(callback, args)
            end = clock()
            if end - mark > slow:
                self._report_slow(callback, args, end - mark)
            mark = end

    def _report_slow(self, callback, args, seconds):
        self.log.warning("the loop was blocked for %.3f s by %s: every connection of "
                         "this process waited (slow_callback %.3f s)", seconds,
                         _loop_context(callback, args), self.slow_callback)

    def _run_callback(self, callback, args):
        try:
            callback(*args)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            self.log.error("unexpected error in loop callback %r\n%s",
                           callback, traceback.format_exc().rstrip())

    def abandon_after_fork(self):
        """In a child just forked from the process running this loop: let go
        of the loop without touching what the parent still uses.  (Closing
        it would unregister its descriptors from an epoll instance that the
        fork shared with the parent.)"""
        _running.loop = None
        self._selector.close()    # only this process's handle on it
        self._wake_r.close()
        self._wake_w.close()
        self._handlers.clear()
        self._signals.clear()
        self._ready.clear()
        self._timers = []

    def close(self):
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        for fd in list(self._handlers):
            self.forget(fd)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


# ============================================================================
# 3. Futures and tasks
#
# One door into the scheduler: an application yields only Futures.  A Task
# drives a generator (``event = yield receive()``) or a native coroutine
# (``event = await receive()``) with the same step function.  A Future that
# is already done when yielded resumes the task at once, without a trip
# through the loop -- but only MAX_INLINE_STEPS times in a row, after which
# the task goes back through the ready queue so that one connection that
# never has to wait cannot starve the others.
# ============================================================================

MAX_INLINE_STEPS = 64   # inline resumptions before a task yields the loop

_PENDING, _DONE, _CANCELLED = "pending", "done", "cancelled"


class CancelledError(Exception):
    """Raised at the ``yield`` of a Task that was cancelled."""


class Future:
    """The result of an operation that completes later.

    A generator application yields it; an ``async def`` application awaits
    it.  A Future that failed raises its exception at that ``yield``/``await``.
    Done-callbacks run through the loop the Future belongs to (the loop
    running when it was created), never inside set_result().
    """

    __slots__ = ("_state", "_result", "_exception", "_callbacks", "_loop")

    def __init__(self, loop=None):
        self._state = _PENDING
        self._result = None
        self._exception = None
        self._callbacks = None
        self._loop = loop if loop is not None else getattr(_running, "loop", None)

    def __repr__(self):
        if self._state == _DONE:
            what = ("exception=%r" % self._exception) if self._exception else \
                   ("result=%r" % (self._result,))
            return "<Future done %s>" % what[:80]
        return "<Future %s>" % self._state

    def done(self):
        return self._state != _PENDING

    def cancelled(self):
        return self._state == _CANCELLED

    def result(self):
        if self._state == _CANCELLED:
            raise CancelledError()
        if self._state == _PENDING:
            raise RuntimeError("Future is not done yet")
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self):
        if self._state == _CANCELLED:
            raise CancelledError()
        if self._state == _PENDING:
            raise RuntimeError("Future is not done yet")
        return self._exception

    def set_result(self, result):
        if self._state != _PENDING:
            raise RuntimeError("Future is already done: %r" % self)
        self._result = result
        self._state = _DONE
        self._schedule_callbacks()

    def set_exception(self, exception):
        if self._state != _PENDING:
            raise RuntimeError("Future is already done: %r" % self)
        if isinstance(exception, type):
            exception = exception()
        self._exception = exception
        self._state = _DONE
        self._schedule_callbacks()

    def cancel(self):
        if self._state != _PENDING:
            return False
        self._state = _CANCELLED
        self._schedule_callbacks()
        return True

    def add_done_callback(self, callback):
        """callback(future) runs once the Future is done (soon, if it is)."""
        if self._state != _PENDING:
            self._call(callback)
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def remove_done_callback(self, callback):
        if self._callbacks and callback in self._callbacks:
            self._callbacks.remove(callback)

    def _schedule_callbacks(self):
        callbacks, self._callbacks = self._callbacks, None
        if callbacks:
            for callback in callbacks:
                self._call(callback)

    def _call(self, callback):
        loop = self._loop
        if loop is not None:
            loop.call_soon(callback, self)
        else:
            callback(self)

    def __await__(self):
        # Yield even when done: the Task then resumes at once, but counts
        # the step against its inline budget (fairness for async def too).
        yield self
        return self.result()

    __iter__ = __await__   # so that ``yield from future`` works in generators


def _resolved(result=None):
    future = Future.__new__(Future)
    future._state = _DONE
    future._result = result
    future._exception = None
    future._callbacks = None
    future._loop = getattr(_running, "loop", None)
    return future


# What a send() that did not have to wait returns: done, result None.  It
# has no loop and no callbacks and cannot change state, so one can serve all.
_NO_WAIT = _resolved()


def _failed(exception):
    future = _resolved()
    future._exception = exception
    return future


class Task(Future):
    """Drives a generator or coroutine; done with its return value.

    The first step runs at once, in the caller's turn (an application starts
    as soon as its request is parsed).  ``on_exit`` (optional) is called with
    the task right after the coroutine finishes, before done-callbacks: the
    connection uses it to finish a request without a trip through the loop.
    """

    __slots__ = ("_coro", "_waiting", "on_exit", "name", "_unretrieved")

    def __init__(self, coro, loop=None, name=None, on_exit=None):
        Future.__init__(self, loop if loop is not None else get_loop())
        if not (hasattr(coro, "send") and hasattr(coro, "throw")):
            raise TypeError("Task needs a generator or a coroutine, got %s"
                            % type(coro).__name__)
        self._coro = coro
        self._waiting = None    # the Future this task is suspended on
        self.on_exit = on_exit
        self.name = name
        self._unretrieved = False   # failed, and nobody has looked yet
        self._step(None, None)

    def __repr__(self):
        return "<Task %s %s>" % (self.name or getattr(self._coro, "__qualname__", "?"),
                                 self._state)

    def loop_context(self):
        """What this task serves, for the slow-callback warning: its owner's
        words (the exchange, the session) when it has one."""
        owner = getattr(self.on_exit, "__self__", None)
        describe = getattr(owner, "loop_context", None)
        if describe is not None:
            return describe()
        return "task %s" % (self.name or getattr(self._coro, "__qualname__", "?"))

    def cancel(self):
        """Throw CancelledError into the coroutine at its current yield."""
        if self._state != _PENDING:
            return False
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.remove_done_callback(self._wakeup)
        self._loop.call_soon(self._step, None, CancelledError())
        return True

    def _wakeup(self, future):
        if self._waiting is not future:
            return    # cancelled meanwhile
        self._waiting = None
        if future._state == _CANCELLED:
            self._step(None, CancelledError())
        else:
            if future.__class__ is Task:
                future._unretrieved = False
            self._step(future._result, future._exception)

    def _step(self, value, exception):
        if self._state != _PENDING:
            return
        coro = self._coro
        budget = MAX_INLINE_STEPS
        while True:
            try:
                if exception is None:
                    yielded = coro.send(value)
                else:
                    yielded, exception = coro.throw(exception), None
            except StopIteration as stop:
                self._finish(stop.value, None)
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._finish(None, exc)
                return
            if not isinstance(yielded, Future):
                value, exception = None, TypeError(
                    "a pagi_ref task may only yield a Future (receive(), send(...), "
                    "sleep(...)); it yielded %r" % (yielded,))
                continue
            if yielded._state == _PENDING:
                self._waiting = yielded
                yielded.add_done_callback(self._wakeup)
                return
            if budget == 0:
                # Fairness: the task has run long enough without waiting.
                self._waiting = yielded
                self._loop.call_soon(self._wakeup, yielded)
                return
            budget -= 1
            if yielded._state == _CANCELLED:
                value, exception = None, CancelledError()
            else:
                value, exception = yielded._result, yielded._exception
                if yielded.__class__ is Task:
                    yielded._unretrieved = False

    def _finish(self, result, exception):
        self._coro = None
        if exception is None:
            self._result = result
            self._state = _DONE
        elif isinstance(exception, CancelledError):
            self._state = _CANCELLED   # cancelled, as asked: nothing to report
        else:
            self._exception = exception
            self._unretrieved = self.on_exit is None
            self._state = _DONE
        # Drop on_exit before calling it: it is usually a bound method of the
        # task's owner, which holds the task -- a reference cycle per request
        # that only the garbage collector would break.
        on_exit, self.on_exit = self.on_exit, None
        if on_exit is not None:
            on_exit(self)
        self._schedule_callbacks()

    def result(self):
        self._unretrieved = False
        return Future.result(self)

    def exception(self):
        self._unretrieved = False
        return Future.exception(self)

    def add_done_callback(self, callback):
        self._unretrieved = False
        Future.add_done_callback(self, callback)

    def __del__(self):
        # A spawned task that failed and that nobody awaited: say so, as
        # asyncio does, rather than let the exception vanish.  Not here,
        # though: __del__ can run inside the garbage collector at any point
        # (even inside another traceback's formatting), so the report is
        # only queued on the loop.
        if self._state == _DONE and self._unretrieved:
            self._loop.call_soon(_report_unretrieved, self._loop.log, repr(self), self._exception)


def _report_unretrieved(log, task, exc):
    log.error("exception in task %s was never retrieved\n%s", task, "".join(
        traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())


def _as_future(obj):
    if isinstance(obj, Future):
        return obj
    return Task(obj)


def sleep(seconds, result=None):
    """A Future that resolves to ``result`` after ``seconds``."""
    loop = get_loop()
    future = Future(loop)
    timer = loop.call_later(seconds, _resolve_if_pending, future, result)
    future.add_done_callback(lambda _f: timer.cancel())
    return future


def _resolve_if_pending(future, result):
    if not future.done():
        future.set_result(result)


def spawn(coro, name=None):
    """Run a generator or coroutine concurrently; returns its Task."""
    return Task(coro, name=name)


class CannotStart(Exception):
    """The application could not start on a scope: its call raised (the
    exception is the ``__cause__``), or it returned neither a generator nor
    a coroutine (``__cause__`` None)."""


def start_application(app, scope, receive, send, loop, on_exit=None, name=None):
    """Call ``app(scope, receive, send)`` and drive what it returns as a
    Task (whose first step runs now).  Raises CannotStart when it cannot:
    each scope's owner decides what the client sees then (docs/spec.md,
    CORE-APP-4).  What the Task's first step raises is not caught here."""
    try:
        coro = app(scope, receive, send)
    except Exception as exc:
        raise CannotStart("the application raised when called: %r" % exc) from exc
    if not (hasattr(coro, "send") and hasattr(coro, "throw")):
        raise CannotStart("the application must return a generator or a coroutine, it "
                        "returned %s (is it missing a 'yield' or 'async def'?)"
                        % type(coro).__name__)
    return Task(coro, loop, name=name, on_exit=on_exit)


def wait_any(*futures):
    """A Future resolving to the first of ``futures`` (Futures or coroutines)
    to finish; the others keep running."""
    futures = [_as_future(f) for f in futures]
    if not futures:
        raise ValueError("wait_any needs at least one future")
    outer = Future()

    def settle(inner):
        if not outer.done():
            outer.set_result(inner)
    for f in futures:
        f.add_done_callback(settle)
    return outer


def wait_all(*futures):
    """A Future resolving to the list of results, in order; it fails with the
    first exception among them."""
    futures = [_as_future(f) for f in futures]
    outer = Future()
    remaining = [len(futures)]

    def settle(inner):
        if outer.done():
            return
        if inner.cancelled():
            outer.set_exception(CancelledError())
        elif inner.exception() is not None:
            outer.set_exception(inner.exception())
        else:
            remaining[0] -= 1
            if remaining[0] == 0:
                outer.set_result([f.result() for f in futures])
    if not futures:
        outer.set_result([])
    for f in futures:
        f.add_done_callback(settle)
    return outer


def to_thread(function, *args):
    """Run ``function(*args)`` in the loop's thread pool (bounded, as
    concurrent.futures bounds it); the Future resolves on the loop with its
    result (or fails with its exception).  The way to hand a blocking call's
    result back to the loop."""
    loop = get_loop()
    future = Future(loop)

    def settle(result, exception):
        if future.done():
            return
        if exception is None:
            future.set_result(result)
        else:
            future.set_exception(exception)

    def worker():
        try:
            result = function(*args)
        except BaseException as exc:   # handed back, not swallowed
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)
    loop.executor().submit(worker)
    return future


# ============================================================================
# 4. HTTP/1.1 wire format (RFC 9112, RFC 9110)
#
# Sans-I/O: RequestParser.feed(bytes) takes what arrived; next_event()
# returns a RequestHead, a piece of body (bytes), an EndOfMessage, or None
# for "need more bytes", and raises HTTPError -- which carries the status to
# answer with -- for input that breaks the grammar or a limit.  No socket is
# touched here, so every rule is tested with bytes alone.
#
# What must not go in here: PAGI scope types, disconnect reasons, anything
# about what the server does after an error.  The parser says *what* is
# wrong; the connection decides what to do about it.
#
# Before you edit -- three properties the tests hold this section to:
#
#   * Linear time on every input.  Nothing a client sends meets a pattern
#     that can match the same bytes two ways (the regular expressions left
#     here are single character classes, or sequences whose classes cannot
#     overlap), and no digit string reaches int() before its length is
#     checked (CPython refuses more than 4,300 decimal digits).
#   * The same answer however the bytes are split.  A head is read line by
#     line, left to right, each line decided when its LF arrives; the limits
#     are checked on the bytes seen so far, before the grammar, so a prefix
#     that breaks a limit breaks it in the whole message too.
#     RequestParser._read_head is that definition; _read_whole_head is a
#     shortcut for a complete, ordinary head that gives the same result or
#     hands over to the definition.
#   * Only HTTPError escapes.  After an error the parser is dead: every
#     later next_event() raises the same error, so the bytes after a broken
#     head are never read as a request.  An exception that is not an
#     HTTPError (a bug) is turned into a 400 whose __cause__ is that
#     exception, for the connection to log.
# ============================================================================

class HTTPError(Exception):
    """Input the server answers with an error status (and then closes).

    ``status`` is the status to answer with; what that means for the
    application (a PAGI disconnect reason) is the connection's to say
    (section 6).
    """

    head = None     # the RequestHead, when the error came after its request line

    def __init__(self, status, message):
        Exception.__init__(self, message)
        self.status = status
        self.message = message


# RFC 9110 §5.6.2: token = 1*tchar; tchar = "!" / "#" / "$" / "%" / "&" / "'"
#   / "*" / "+" / "-" / "." / "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TCHARS = bytes(c for c in range(256) if re.fullmatch(rb"[%s]" % _TCHAR, bytes([c])))
_TOKEN = re.compile(rb"[%s]+" % _TCHAR)
# A field name as it is sent in HTTP/2 (RFC 9113 §8.2.1) and as PAGI hands
# headers over: a token in lower case.
_LOWER_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
# RFC 9110 §5.5: field-value = *field-content, made of VCHAR, obs-text, SP
# and HTAB.  CR, LF, NUL and the other controls are invalid (RFC 9110 §5.5
# lets a recipient reject them, and we do).
_FIELD_VALUE_BYTES = bytes([0x09]) + bytes(range(0x20, 0x7f)) + bytes(range(0x80, 0x100))
# RFC 9112 §5: field-line = field-name ":" OWS field-value OWS.  The pattern
# for a whole block of field lines: a name (tchar, never ":"), the colon, then
# everything up to CR as the value (OWS stripped afterwards).  The classes do
# not overlap at their borders, so a block matches in at most one way.
_FIELD_VALUE = rb"[^\x00-\x08\x0a-\x1f\x7f]*"
_FIELD_BLOCK = re.compile(rb"(?:[%s]+:%s\r\n)*" % (_TCHAR, _FIELD_VALUE))
_FIELD_PAIRS = re.compile(rb"([%s]+):(%s)\r\n" % (_TCHAR, _FIELD_VALUE))
# RFC 9112 §3: request-line = method SP request-target SP HTTP-version;
# HTTP-version = "HTTP/" DIGIT "." DIGIT.
_HTTP_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
# RFC 9112 §3.2: the request-target is ASCII without controls or SP (RFC
# 3986 characters); raw UTF-8 or any byte above 0x7E is a 400.
_TARGET_BAD = re.compile(rb"[\x00-\x20\x7f-\xff]")
# RFC 9112 §3.2 / RFC 3986 §3.2.2: Host = uri-host [ ":" port ], where
# uri-host = IP-literal / IPv4address / reg-name (unreserved, pct-encoded,
# sub-delims).  An invalid value is a 400, like a missing one.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+(?:%25[A-Za-z0-9\-._~%]+)?\]"
                   rb"|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")
# RFC 9112 §7.1: chunk-size = 1*HEXDIG, then chunk-ext (ignored, but its
# bytes must be visible characters, SP or HTAB).
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]+)[ \t]*(;[^\x00-\x08\x0a-\x1f\x7f]*)?")
_MAX_CHUNK_LINE = 4096      # bytes in a chunk-size line, extensions included
# RFC 9110 §8.6: "a recipient MUST anticipate potentially large decimal
# numerals and prevent parsing errors due to integer conversion overflows".
# Leading zeros are grammar (1*DIGIT) and are skipped; more significant
# digits than these mean more bytes than any server will take: 413.
_MAX_LENGTH_DIGITS = 18     # Content-Length: below 10**18
_MAX_CHUNK_DIGITS = 16      # chunk-size: below 2**64
# RFC 9112 §2.2: a server SHOULD ignore at least one empty line (CRLF)
# before the request-line.  We ignore up to this many, then answer 400.
_MAX_EMPTY_LINES = 16

# The transfer codings of RFC 9112 §7 and RFC 9110 §8.4.1; we decode only
# chunked.  A known coding we do not implement is 501; an unknown one too.
_KNOWN_CODINGS = {b"chunked", b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"}


class RequestHead:
    """A parsed request line and header block."""

    __slots__ = ("method", "target", "http_version", "path", "query_string",
                 "authority", "headers", "keep_alive", "expect_continue",
                 "content_length", "chunked", "upgrade", "accept")

    def __init__(self, method, target, http_version, headers):
        self.method = method                # str, e.g. "GET"
        self.target = target                # bytes, the request-target as sent
        self.http_version = http_version    # "1.1" or "1.0"
        self.path = b"/"                    # bytes: raw path of the target
        self.query_string = b""             # bytes: after "?", still encoded
        self.authority = None               # bytes: host[:port] of an absolute-form target
        self.headers = headers              # [(lower-case name, value)], bytes
        self.keep_alive = http_version == "1.1"
        self.expect_continue = False        # "Expect: 100-continue" was sent
        self.content_length = 0             # bytes of body (when not chunked)
        self.chunked = False                # body framed by chunked coding
        self.upgrade = None                 # b"websocket" for an Upgrade request
        self.accept = None                  # bytes: the Accept field(s), joined by ", "

    def __repr__(self):
        return "<RequestHead %s %r HTTP/%s>" % (self.method, self.target, self.http_version)

    def request_line(self):
        """The request line as text, for logs (the target is ASCII)."""
        return "%s %s HTTP/%s" % (self.method, self.target.decode("latin-1"), self.http_version)


class EndOfMessage:
    """The request body is complete; ``trailers`` from a chunked body."""

    __slots__ = ("trailers",)

    def __init__(self, trailers=()):
        self.trailers = trailers

    def __repr__(self):
        return "<EndOfMessage trailers=%r>" % (self.trailers,)


# The common methods and the versions we speak, looked up before any regex.
_METHODS = {m: m.decode("ascii") for m in (
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT")}
_VERSIONS = {b"HTTP/1.1": "1.1", b"HTTP/1.0": "1.0"}

# Parser states.
_HEAD, _BODY, _CHUNK_SIZE_LINE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _ERROR = range(7)


class RequestParser:
    """Turns the bytes of one connection into request events.

    After an EndOfMessage the parser goes back to reading a head, so the
    bytes of pipelined requests are simply kept until asked for.
    """

    def __init__(self, config):
        self.max_header_size = config.max_header_size
        self.max_header_count = config.max_header_count
        self.max_body_size = config.max_body_size
        self._buf = b""           # bytes received, not yet handed out
        self._pos = 0             # where the first line not yet read starts in _buf
        self._scan = 0            # where to look for its LF (no LF before it)
        self._state = _HEAD
        self._error = None        # the HTTPError raised, once the parser is dead
        # The head (or trailer section) being read, line by line:
        self._request = None      # the RequestHead, once its request line is read
        self._fields = []         # (name, value) pairs read so far
        self._block_size = 0      # bytes of the field block so far
        self._empty_lines = 0     # empty lines skipped before this request line
        self._remaining = 0       # body or chunk bytes still expected
        self._body_seen = 0       # body bytes of this message so far
        self.messages = 0         # requests whose head has been parsed

    def __repr__(self):
        return "<RequestParser state=%d buffered=%d messages=%d>" % (
            self._state, self.buffered, self.messages)

    def feed(self, data):
        if self._buf:
            self._buf += data
        else:
            self._buf = data

    @property
    def buffered(self):
        """Bytes received and not yet handed out (the lines of a head not yet
        complete count: the head has begun)."""
        return len(self._buf)

    def take_buffered(self):
        """Hand out the bytes not yet parsed (an upgraded connection's first
        bytes of the new protocol); the parser keeps none."""
        data = self._buf[self._pos:]
        self._buf = b""
        self._pos = self._scan = 0
        return data

    @property
    def body_exhausted(self):
        """A Content-Length body has been handed out whole."""
        return self._state == _BODY and self._remaining == 0

    @property
    def in_head(self):
        """Waiting for (part of) a request head."""
        return self._state == _HEAD

    def next_event(self):
        state = self._state
        try:
            if state == _HEAD:
                return self._read_head()
            if state == _BODY:
                return self._read_body()
            if state == _ERROR:
                raise self._error
            return self._read_chunked()
        except HTTPError as err:
            if err.head is None:
                err.head = self._request      # a field line broke, after the request line
            self._fail(err)
            raise
        except Exception as exc:
            # A bug, not the client's fault -- but the bytes are still not a
            # request we understood: 400, and never read past them.
            err = HTTPError(400, "unparseable request (%s)" % type(exc).__name__)
            err.__cause__ = exc
            self._fail(err)
            raise err

    def _fail(self, err):
        self._state = _ERROR
        self._error = err
        self._buf = b""
        self._pos = self._scan = 0

    # -- lines ----------------------------------------------------------------

    def _read_line(self, budget, status, message):
        """The next complete line without its CRLF, or None if its LF has
        not arrived.  ``budget`` bounds the bytes of the line with its CRLF;
        the bytes seen so far are held to it before the line is complete."""
        buf = self._buf
        pos = self._pos
        lf = buf.find(b"\n", self._scan)
        if lf < 0:
            if len(buf) - pos > budget:
                raise HTTPError(status, message)
            self._scan = len(buf)         # a trickled line is searched once
            return None
        if lf + 1 - pos > budget:
            raise HTTPError(status, message)
        # RFC 9112 §2.2: a line ends with CRLF; a bare LF may be rejected.
        if lf == pos or buf[lf - 1] != 13:
            raise HTTPError(400, "bare LF in request head")
        self._pos = self._scan = lf + 1
        return buf[pos:lf - 1]

    def _consume(self):
        """Drop the lines read so far from the buffer."""
        self._buf = self._buf[self._pos:]
        self._pos = self._scan = 0

    # -- the head -------------------------------------------------------------

    def _read_head(self):
        if not self._buf:
            return None
        if self._scan == 0 and self._request is None:
            head = self._read_whole_head()
            if head is not None:
                return head
        while True:
            if self._request is None:
                line = self._read_line(self.max_header_size + 2, 414, "request line too long")
                if line is None:
                    return None
                if not line:
                    # RFC 9112 §2.2: a server SHOULD ignore at least one
                    # empty line (CRLF) received prior to the request-line.
                    self._empty_lines += 1
                    if self._empty_lines > _MAX_EMPTY_LINES:
                        raise HTTPError(400, "too many empty lines before the request line")
                    continue
                self._request = self._parse_request_line(line)
                continue
            line = self._read_line(self.max_header_size - self._block_size,
                                   431, "header block too large")
            if line is None:
                return None
            self._block_size += len(line) + 2
            if line:
                self._fields.append(self._parse_field_line(line))
                if len(self._fields) > self.max_header_count:
                    raise HTTPError(431, "too many header fields")
                continue
            request, request.headers = self._request, self._fields
            self._request, self._fields, self._block_size, self._empty_lines = None, [], 0, 0
            self._consume()
            return self._head_done(request)

    def _read_whole_head(self):
        """The common case, in a few calls over the whole block: a head that
        is all here, with no empty line before it, no bare LF, within the
        limits and well formed.  Anything else returns None, and _read_head
        reads it line by line -- the definition, which finds the error."""
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0 or buf[:1] in (b"\r", b"\n"):
            return None
        line_end = buf.find(b"\r\n")
        # A bare LF in the request line is found here; in the field block
        # the block's pattern refuses it (none of its classes holds LF).
        if (buf.find(b"\n", 0, line_end) >= 0 or line_end > self.max_header_size
                or end + 2 - line_end > self.max_header_size):
            return None
        block = buf[line_end + 2:end + 2]
        if _FIELD_BLOCK.fullmatch(block) is None:
            return None
        pairs = _FIELD_PAIRS.findall(block)
        if len(pairs) > self.max_header_count:
            return None
        request = self._parse_request_line(buf[:line_end])
        self._buf = buf[end + 4:]
        strip = bytes.strip
        request.headers = [(name.lower(), strip(value, b" \t")) for name, value in pairs]
        return self._head_done(request)

    def _head_done(self, request):
        try:
            self._frame(request)
        except HTTPError as err:
            err.head = request
            raise
        self.messages += 1
        return request

    def _parse_request_line(self, line):
        parts = line.split(b" ")
        if len(parts) != 3:
            raise HTTPError(400, "malformed request line")
        method, target, version = parts
        name = _METHODS.get(method)
        if name is None:
            if not _TOKEN.fullmatch(method):
                raise HTTPError(400, "malformed method")
            name = method.decode("ascii")
        http_version = _VERSIONS.get(version)
        if http_version is None:
            match = _HTTP_VERSION.fullmatch(version)
            if match is None:
                raise HTTPError(400, "malformed HTTP version")
            # RFC 9110 §2.5: a higher minor version of a major version we
            # implement SHOULD be processed as the highest minor version we
            # conform to -- HTTP/1.2 is read (and answered) as HTTP/1.1.
            if match.group(1) != b"1":
                raise HTTPError(505, "HTTP version not supported")
            http_version = "1.1"
        if not target or _TARGET_BAD.search(target):
            raise HTTPError(400, "malformed request target")
        request = RequestHead(name, target, http_version, [])
        # RFC 9112 §3.2: origin-form, absolute-form, authority-form (CONNECT
        # only) and asterisk-form (OPTIONS only).
        if target[0] == 47:   # "/"
            path, _, query = target.partition(b"?")
        elif target == b"*":
            if request.method != "OPTIONS":
                raise HTTPError(400, "asterisk-form is for OPTIONS only")
            path, query = b"*", b""
        elif request.method == "CONNECT":
            raise HTTPError(501, "CONNECT is not implemented")
        else:
            path, query = self._absolute_form(request, target)
        request.path = path
        request.query_string = query
        return request

    def _absolute_form(self, request, target):
        """RFC 9112 §3.2.2: absolute-form = absolute-URI.  Its authority
        replaces Host (see _frame); its path and query are the request's."""
        scheme, sep, rest = target.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            raise HTTPError(400, "malformed request target")
        cut = len(rest)
        for delimiter in (b"/", b"?", b"#"):
            found = rest.find(delimiter)
            if 0 <= found < cut:
                cut = found
        authority = rest[:cut]
        # RFC 9110 §4.2.4: a recipient SHOULD treat userinfo in an http(s)
        # URI as an error.  §4.2.1: an empty host MUST be rejected.
        if b"@" in authority:
            raise HTTPError(400, "userinfo in the request target")
        if authority[:1] in (b"", b":") or not _HOST.fullmatch(authority):
            raise HTTPError(400, "invalid authority in the request target")
        request.authority = authority
        path_query = rest[cut:]
        if path_query[:1] != b"/":
            path_query = b"/" + path_query
        path, _, query = path_query.partition(b"?")
        return path, query

    def _parse_field_line(self, line):
        """One field line -> (lower-case name, value without OWS)."""
        name, colon, value = line.partition(b":")
        # RFC 9112 §5.1: no white space between the name and the colon
        # (400); the name is a token.
        if not colon or not name or name.translate(None, _TCHARS):
            if line[:1] in (b" ", b"\t"):
                # RFC 9112 §5.2: obs-fold; a server MUST reject it or
                # unfold it.  We reject it.
                raise HTTPError(400, "obsolete line folding in header field")
            raise HTTPError(400, "malformed header field")
        if value.translate(None, _FIELD_VALUE_BYTES):
            raise HTTPError(400, "malformed header field")
        return name.lower(), value.strip(b" \t")

    def _frame(self, request):
        """Decide connection and body framing from the header fields."""
        host_count = 0
        content_length = None
        transfer_encoding = None
        cookies = 0
        upgrade = None
        connection_upgrade = False
        for name, value in request.headers:
            if name == b"host":
                host_count += 1
                if not _HOST.fullmatch(value):
                    raise HTTPError(400, "invalid Host header")
            elif name == b"content-length":
                # RFC 9110 §8.6: Content-Length = 1*DIGIT.  We take exactly
                # one field with one value (a list "5, 5" or a second field
                # is 400), the strict reading of RFC 9112 §6.3 rule 5.
                if content_length is not None or not value.isdigit():
                    raise HTTPError(400, "invalid or repeated Content-Length")
                digits = value.lstrip(b"0")
                if len(digits) > _MAX_LENGTH_DIGITS:
                    raise HTTPError(413, "request body too large")
                content_length = int(digits or b"0")
            elif name == b"transfer-encoding":
                transfer_encoding = value if transfer_encoding is None \
                    else transfer_encoding + b"," + value
            elif name == b"connection":
                for option in value.lower().split(b","):
                    option = option.strip()
                    if option == b"close":
                        request.keep_alive = False
                    elif option == b"upgrade":
                        connection_upgrade = True
                    elif option == b"keep-alive" and request.http_version == "1.0":
                        # RFC 9112 §9.3: HTTP/1.0 persistence is opt-in.
                        request.keep_alive = True
            elif name == b"expect":
                # RFC 9110 §10.1.1; other expectations are ignored.
                if value.lower() == b"100-continue" and request.http_version == "1.1":
                    request.expect_continue = True
            elif name == b"cookie":
                cookies += 1
            elif name == b"upgrade":
                upgrade = value
            elif name == b"accept":
                # Kept for the server, which chooses the scope type by it
                # (section 8).  RFC 9110 §5.3: several lines are one list.
                request.accept = value if request.accept is None else (
                    request.accept + b", " + value)
        # RFC 9112 §3.2: a server MUST respond 400 to an HTTP/1.1 request
        # that lacks a Host field or has more than one.
        if request.http_version == "1.1" and host_count != 1:
            raise HTTPError(400, "HTTP/1.1 requires exactly one Host header")
        if host_count > 1:
            raise HTTPError(400, "more than one Host header")
        if request.authority is not None:
            # RFC 9112 §3.2.2: with an absolute-form target the server MUST
            # ignore the received Host field and use the target's authority.
            request.headers = [(n, v) for n, v in request.headers if n != b"host"]
            request.headers.append((b"host", request.authority))
        if transfer_encoding is not None:
            self._transfer_codings(request, content_length, transfer_encoding)
        elif content_length:
            if self.max_body_size and content_length > self.max_body_size:
                raise HTTPError(413, "request body too large")
            request.content_length = content_length
            self._state = _BODY
            self._remaining = content_length
        else:
            self._state = _BODY
            self._remaining = 0
        self._body_seen = 0
        # RFC 9110 §7.8: Upgrade counts only with "Connection: upgrade".
        if upgrade is not None and connection_upgrade:
            request.upgrade = upgrade.strip().lower()
        if cookies > 1:
            # PAGI HTTP "Cookie Header Normalization": one cookie header,
            # the values joined with "; " (RFC 6265 §5.4 sends one).
            joined = b"; ".join(v for n, v in request.headers if n == b"cookie")
            rest = [(n, v) for n, v in request.headers if n != b"cookie"]
            rest.append((b"cookie", joined))
            request.headers = rest

    def _transfer_codings(self, request, content_length, transfer_encoding):
        # RFC 9112 §6.1: a server MAY reject a request with both
        # Content-Length and Transfer-Encoding (we do); Transfer-Encoding
        # in HTTP/1.0 cannot be trusted (§6.1, last paragraph).
        if content_length is not None:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding")
        if request.http_version == "1.0":
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip().lower() for c in transfer_encoding.split(b",")]
        # RFC 9110 §5.6.1 asks recipients to ignore empty list elements; in
        # this one field we refuse them instead (as h11 does): a proxy that
        # reads ", chunked" differently from us is a request-smuggling
        # desync, and a 400 never is (docs/deviations.md).
        if b"" in codings:
            raise HTTPError(400, "empty element in Transfer-Encoding")
        # RFC 9112 §6.3 rule 4: final coding not chunked -> 400.
        if codings[-1] != b"chunked":
            raise HTTPError(400, "final transfer coding is not chunked")
        # RFC 9112 §7: chunked MUST NOT be applied more than once.
        if codings.count(b"chunked") > 1:
            raise HTTPError(400, "chunked applied more than once")
        # RFC 9112 §6.1: a coding we do not understand -> 501.
        if len(codings) > 1:
            raise HTTPError(501, "transfer coding not implemented: %s"
                            % codings[0].decode("latin-1"))
        request.chunked = True
        self._state = _CHUNK_SIZE_LINE

    # -- the body -------------------------------------------------------------

    def _read_body(self):
        remaining = self._remaining
        if remaining == 0:
            self._state = _HEAD
            return EndOfMessage()
        buf = self._buf
        if not buf:
            return None
        if len(buf) <= remaining:
            self._buf = b""
            self._remaining = remaining - len(buf)
            return buf
        self._buf = buf[remaining:]
        self._remaining = 0
        return buf[:remaining]

    def _read_chunked(self):
        # RFC 9112 §7.1: chunked-body = *chunk last-chunk trailer-section CRLF
        while True:
            state = self._state
            if state == _CHUNK_SIZE_LINE:
                line = self._read_line(_MAX_CHUNK_LINE + 2, 400, "chunk size line too long")
                if line is None:
                    return None
                self._consume()
                match = _CHUNK_SIZE.fullmatch(line)
                if match is None:
                    raise HTTPError(400, "malformed chunk size line")
                digits = match.group(1).lstrip(b"0")
                if len(digits) > _MAX_CHUNK_DIGITS:
                    raise HTTPError(413, "request body too large")
                size = int(digits or b"0", 16)
                if size == 0:
                    self._state = _TRAILERS
                    continue
                self._body_seen += size
                if self.max_body_size and self._body_seen > self.max_body_size:
                    raise HTTPError(413, "request body too large")
                self._remaining = size
                self._state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                buf = self._buf
                if not buf:
                    return None
                remaining = self._remaining
                if len(buf) <= remaining:
                    data, self._buf = buf, b""
                else:
                    data, self._buf = buf[:remaining], buf[remaining:]
                self._remaining = remaining - len(data)
                if self._remaining == 0:
                    self._state = _CHUNK_CRLF
                return data
            elif state == _CHUNK_CRLF:
                buf = self._buf
                if len(buf) < 2:
                    if buf[:1] not in (b"", b"\r"):
                        raise HTTPError(400, "chunk data not followed by CRLF")
                    return None
                if buf[:2] != b"\r\n":
                    raise HTTPError(400, "chunk data not followed by CRLF")
                self._buf = buf[2:]
                self._state = _CHUNK_SIZE_LINE
            else:
                # _TRAILERS: trailer-section = *( field-line CRLF ), then the
                # CRLF that ends the message; the header limits apply.
                line = self._read_line(self.max_header_size - self._block_size,
                                       431, "trailer section too large")
                if line is None:
                    return None
                self._block_size += len(line) + 2
                if line:
                    self._fields.append(self._parse_field_line(line))
                    if len(self._fields) > self.max_header_count:
                        raise HTTPError(431, "too many trailer fields")
                    continue
                trailers, self._fields, self._block_size = self._fields, [], 0
                self._consume()
                self._state = _HEAD
                return EndOfMessage(trailers)


# -- the response side --------------------------------------------------------

_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
# RFC 9110 §15 names, whatever this Python's http module calls them.
_REASONS.update({413: b"Content Too Large", 414: b"URI Too Long",
                 416: b"Range Not Satisfiable", 422: b"Unprocessable Content"})
_STATUS_LINES = {}   # status -> b"HTTP/1.1 200 OK\r\n"


def status_line(status):
    """RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ].
    RFC 9110 §2.5: the server says the highest version it conforms to,
    HTTP/1.1, whatever the request's."""
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))
        if len(_STATUS_LINES) < 1024:
            _STATUS_LINES[status] = line
    return line


class _DateCache:
    """RFC 9110 §6.6.1: the Date header, formatted once per second."""

    __slots__ = ("second", "value")

    def __init__(self):
        self.second = -1
        self.value = b""

    def get(self):
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.value = formatdate(now, usegmt=True).encode("ascii")
        return self.value


_date = _DateCache()


def chunk(data):
    """One chunk of a chunked body (RFC 9112 §7.1); never for empty data."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def trailer_section(headers):
    return b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"


class ResponseStamp:
    """The fields the server adds to every response head it frames
    (frame_response): ``server: pagi_ref`` and the Date (RFC 9110 §10.2.4,
    §6.6.1), each unless turned off (--no-server-header, --no-date-header)
    or sent by the application.  ``clock`` gives the Date's value (its
    ``get()``); tests pass one that never changes."""

    __slots__ = ("server", "date", "clock")

    def __init__(self, server=True, date=True, clock=None):
        self.server = server          # send the Server field
        self.date = date              # send the Date field
        self.clock = _date if clock is None else clock   # .get() -> the Date value

    def add_to(self, headers, has_server=False, has_date=False):
        """Append the (name, value) pairs to a head's ``headers``."""
        if self.date and not has_date:
            headers.append((b"date", self.clock.get()))
        if self.server and not has_server:
            headers.append(_SERVER_FIELD)


SERVER_NAME = b"pagi_ref"     # the Server field's value
_SERVER_FIELD = (b"server", SERVER_NAME)
_STAMP = ResponseStamp()      # the defaults, for callers without a Config


# -- response framing (RFC 9112 §6.1-§6.3, §9.3; RFC 9110 §6.4.1) -------------
#
# One pure function decides how every response head the server writes is
# framed -- an application's response, an SSE stream, a WebSocket denial, a
# generated error, the 101 -- so the rules below are written once and tested
# with bytes alone (tests/test_response_framing.py).  The caller says what it
# knows; the function answers with the head and the framing decision.  It
# decides nothing about whether the connection *may* stay open (request
# keep-alive, shutdown, a peer gone, an unread body): that is the caller's
# ``keep_alive``; it only closes what framing forces closed.

BODY_NONE = "none"                # no body follows the head (HEAD, 204, 304)
BODY_LENGTH = "content-length"    # exactly ``length`` bytes follow
BODY_CHUNKED = "chunked"          # chunked coding, ended by the last chunk
BODY_CLOSE = "close-delimited"    # the body ends when the connection closes
_BODILESS = frozenset((204, 304))   # statuses whose response never has a body
_FIELD_LINE = b"%s: %s\r\n".__mod__   # (name, value) -> a field line (RFC 9112 §5)


def frame_response(status, headers, method="GET", http_version="1.1", length=None,
                   app_close=False, keep_alive=True, trailers=False, final_size=None,
                   announce_keep_alive=False, stamp=_STAMP, has_server=None, has_date=False):
    """Frame one response head: returns the framing decision, the tuple
    ``(head, fields, body, length, keep_alive)``:

    * ``head``: the bytes of the head, status line to the blank line;
    * ``fields``: every (name, value) in it, the application's first;
    * ``body``: BODY_NONE, BODY_LENGTH, BODY_CHUNKED or BODY_CLOSE -- or
      None for an interim 1xx, which frames no body (the final response
      follows, or, after a 101, another protocol);
    * ``length``: the Content-Length the head carries, or None;
    * ``keep_alive``: the connection carries another response after this
      one (after a 1xx: it stays open).

    Discussion: a plain tuple, not a named one or an object, because one is
    made for every response: under callgrind a named tuple costs ~1,700
    instructions more per request (about 1% of a keep-alive GET).

    ``headers`` are the application's (name, value) pairs, lower-case names,
    without Transfer-Encoding or Connection (the server manages both, PAGI
    HTTP); a Content-Length among them is ``length``, already checked.
    ``app_close``: the application asked for Connection: close.
    ``keep_alive``: the caller allows another request on this connection.
    ``trailers``: the application will send trailer fields.
    ``final_size``: the body's size when it is known before the head goes
    (the first body event is also the last), else None.
    ``announce_keep_alive``: say Connection: keep-alive in HTTP/1.1 too.
    ``stamp``: the ResponseStamp (server and date fields); ``has_server``
    and ``has_date`` say whether ``headers`` holds them (``has_server``
    None: look for both).
    ``headers`` is not changed."""
    fields = headers[:]
    if has_server is None:
        names = {name.lower() for name, _value in fields}
        has_server, has_date = b"server" in names, b"date" in names
    stamp.add_to(fields, has_server, has_date)
    if status < 200:
        # RFC 9110 §15.2: a 1xx response is interim and ends at its head.
        # RFC 9110 §8.6: no Content-Length in a 1xx.  RFC 9110 §7.8: a 101
        # names the protocol in Upgrade (the caller's field) and sends
        # Connection: upgrade.
        if length is not None:
            fields = [(n, v) for n, v in fields if n != b"content-length"]
        if status == 101:
            fields.append((b"connection", b"Upgrade"))
        body = None
        length = None
    else:
        keep_alive = keep_alive and not app_close
        if status in _BODILESS or method == "HEAD":
            # RFC 9110 §6.4.1, RFC 9112 §6.3 rule 1: a response to HEAD and a
            # 204 or 304 end at the head, whatever their fields say.
            body = BODY_NONE
            if status == 204:
                # RFC 9110 §8.6: a server MUST NOT send Content-Length in a 204.
                if length is not None:
                    fields = [(n, v) for n, v in fields if n != b"content-length"]
                length = None
            elif length is None and method == "HEAD" and final_size:
                # RFC 9110 §9.3.2: a HEAD response may say the length the
                # GET's body would have, when the application gave that body.
                length = final_size
                fields.append((b"content-length", b"%d" % final_size))
        elif length is not None:
            body = BODY_LENGTH       # RFC 9112 §6.3 rule 6: the application's Content-Length
        elif final_size is not None and not (trailers and http_version == "1.1"):
            # The whole body is at hand: say its length (RFC 9112 §6.2).
            # Trailers need chunked coding (RFC 9112 §7.1.2) -- in HTTP/1.1.
            body = BODY_LENGTH
            length = final_size
            fields.append((b"content-length", b"%d" % final_size))
        elif http_version == "1.1":
            body = BODY_CHUNKED      # RFC 9112 §6.1, §7.1
            fields.append((b"transfer-encoding", b"chunked"))
        else:
            # RFC 9112 §6.1: no chunked coding for an HTTP/1.0 recipient;
            # §6.3 rule 8: the close delimits the body.
            body = BODY_CLOSE
            keep_alive = False
        # RFC 9112 §9.3: HTTP/1.1 persists unless Connection: close is sent;
        # §9.3 and RFC 9112 Appendix C.2.2: HTTP/1.0 persists only when
        # Connection: keep-alive is sent.
        if http_version == "1.1":
            if not keep_alive:
                fields.append((b"connection", b"close"))
            elif announce_keep_alive:
                fields.append((b"connection", b"keep-alive"))
        else:
            fields.append((b"connection", b"keep-alive" if keep_alive else b"close"))
    head = b"".join([_STATUS_LINES.get(status) or status_line(status),
                     *map(_FIELD_LINE, fields), b"\r\n"])
    return head, fields, body, length, keep_alive


def error_response(status, message, extra_headers=(), stamp=_STAMP):
    """A server-generated response: short text/plain body, Connection: close."""
    body = message.encode("utf-8") + b"\n"
    headers = [(b"content-type", b"text/plain; charset=utf-8")]
    headers += extra_headers
    return frame_response(status, headers, final_size=len(body), keep_alive=False,
                          stamp=stamp)[0] + body


# -- what proxies in front say (RFC 7239 Forwarded; X-Forwarded-For/-Proto) ----
#
# Pure parsing: whether to believe a proxy is section 6's question, asked
# only of a trusted peer.  Each proxy on the way appends the address it
# received the request from, so a list reads client first, nearest proxy
# last; anyone may have written the left part, so it is read from the
# right, skipping proxies that are trusted, and the first hop that is not
# trusted is the client (all trusted: the leftmost).  When a request has
# both X-Forwarded-* and Forwarded, X-Forwarded-* is used and Forwarded
# ignored: it is what nginx, HAProxy and cloud balancers set by default and
# what uvicorn reads (docs/deployment.md says which header a proxy must
# overwrite).

# RFC 7239 §4: forwarded-pair = token "=" value; value = token / quoted-string.
# Each part can match the bytes one way only: linear on any input.
_FORWARDED_PAIR = re.compile(rb'[ \t]*([%s]+)=("(?:[^"\\]|\\.)*"|[%s]*)[ \t]*'
                             % (_TCHAR, _TCHAR))
_QUOTED_PAIR = re.compile(rb"\\(.)", re.S)
_FORWARDED_SCHEMES = {"http": False, "https": True, "ws": False, "wss": True}


def forwarded_elements(value):
    """RFC 7239 §4: the elements of a Forwarded field value, each a dict of
    lower-case parameter names to ``str`` values, quotes undone; None if the
    value does not follow the grammar (or repeats a parameter in an element,
    which §4 forbids): then none of it is believed."""
    elements = []
    element = {}
    pos, end = 0, len(value)
    while True:
        m = _FORWARDED_PAIR.match(value, pos)
        if m is None:
            return None
        name, text = m.group(1).lower().decode("ascii"), m.group(2)
        if text[:1] == b'"':
            text = _QUOTED_PAIR.sub(rb"\1", text[1:-1])
        if name in element:
            return None
        element[name] = text.decode("latin-1")
        pos = m.end()
        if pos == end:
            elements.append(element)
            return elements
        if value[pos:pos + 1] == b",":
            elements.append(element)
            element = {}
        elif value[pos:pos + 1] != b";":
            return None
        pos += 1


def forwarded_node(text):
    """RFC 7239 §6: ``[host, port]`` of a node -- an IPv4 address, an IPv6
    one (bracketed as §6 writes it, or bare as X-Forwarded-For often has
    it), either with an optional ``:port`` (0 when absent or obfuscated);
    None for ``unknown``, an obfuscated name, or anything else."""
    port = ""
    if text[:1] == "[":
        host, _sep, port = text[1:].partition("]")
        if port and port[:1] != ":":
            return None
        port = port[1:]
    elif text.count(":") == 1:
        host, _sep, port = text.partition(":")
    else:
        host = text
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    number = int(port) if port.isascii() and port.isdigit() and len(port) <= 5 else 0
    return [str(address), number if number <= 65535 else 0]


def forwarded(headers, trusted):
    """What the proxies in front say: ``(hop, secure)``.  ``hop`` is the
    client's node text as the proxies wrote it (pass it to forwarded_node),
    or None when they name no client; ``secure`` is True for https/wss,
    False for http/ws, None when they say nothing valid.  ``trusted(text)``
    says whether a hop is a trusted proxy (the rule: see above).  Repeated
    fields are one list (RFC 9110 §5.3)."""
    xff, xfp, fwd = [], [], []
    for name, value in headers:
        if name == b"x-forwarded-for":
            xff.append(value)
        elif name == b"x-forwarded-proto":
            xfp.append(value)
        elif name == b"forwarded":
            fwd.append(value)
    if xff or xfp:
        hops = [h.strip().decode("latin-1") for h in b",".join(xff).split(b",")] if xff else []
        protos = [p.strip().decode("latin-1") for p in b",".join(xfp).split(b",")] \
            if xfp else []
    elif fwd:
        elements = forwarded_elements(b",".join(fwd))
        if elements is None:
            return None, None
        hops = [e.get("for") for e in elements] \
            if any("for" in e for e in elements) else []
        protos = [e.get("proto") for e in elements]
    else:
        return None, None
    hop = index = None
    if hops:
        index = 0                     # every hop trusted: the leftmost
        for i in range(len(hops) - 1, -1, -1):
            node = forwarded_node(hops[i]) if hops[i] is not None else None
            if hops[i] is None or not trusted(node[0] if node else hops[i]):
                index = i
                break
        hop = hops[index]
    # The scheme comes from the same hop as the client when the lists line
    # up (always, for Forwarded), else from the nearest proxy (the rightmost).
    proto = None
    if protos:
        proto = protos[index] if index is not None and len(protos) == len(hops) \
            else protos[-1]
    return hop, _FORWARDED_SCHEMES.get((proto or "").lower())


def decode_path(raw_path):
    """PAGI "path": percent-decode raw_path, then UTF-8; bytes that are not
    UTF-8 fall back to the percent-decoded bytes read as latin-1 (one
    character per byte), never replaced or rejected."""
    data = unquote_to_bytes(raw_path) if b"%" in raw_path else raw_path
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


# ============================================================================
# 4a. HPACK: header compression for HTTP/2 (RFC 7541)
#
# HTTP/2 sends every header list compressed.  Each direction of a
# connection has an encoding context at the sender and a decoding context
# at the receiver, each with a dynamic table (RFC 7541 §2.3.2) that the
# representations in a header block change in step, so a context must see
# every block of its direction, in order.  Names and values are bytes,
# either literal or Huffman-coded with the static code of Appendix B.
#
#   HPACKDecoder.decode(block) -> [(name, value), ...]   the peer's blocks
#   HPACKEncoder.encode([(name, value), ...]) -> block   our blocks
#
# A block is a whole field block: HEADERS plus its CONTINUATION frames,
# joined by the caller.  What must not go in here: frames, streams,
# SETTINGS, sockets, PAGI.  HPACK knows header lists, not requests: whether
# a name is lower-case, a pseudo-header allowed, a value free of CR and LF
# is the HTTP/2 layer's question (RFC 9113 §8.2); this section says only
# what the block held, and never reports "never indexed" flags (a server
# does not forward fields, so it has no use for them).
#
# Before you edit -- what tests/test_hpack.py holds this section to:
#
#   * Only HPACKError leaves decode(), whatever the bytes.  Every HPACKError
#     is a COMPRESSION_ERROR (RFC 9113 §4.3), a connection error: the table
#     can no longer be trusted, so the decoder refuses every later block --
#     except HeaderListTooLarge.  That one is raised after the whole block
#     was read and its table changes applied, so the table is still in step
#     with the peer's and the connection can refuse just the stream (RFC
#     9113 §10.5.1: 431, or RST_STREAM).
#   * Linear time and bounded memory on any block.  An integer ends within
#     four continuation octets; a Huffman string is decoded by a table, one
#     step per 4 bits; a header list past max_header_list_size is counted,
#     not kept, so a small block that names a big table entry a thousand
#     times (an "HPACK bomb") costs a thousand lookups, not a thousand copies.
# ============================================================================

class HPACKError(Exception):
    """A header block that cannot be decoded: RFC 9113 §4.3 makes it a
    connection error of type COMPRESSION_ERROR.  The message says what was
    wrong; the decoder that raised it refuses every later block."""


class HeaderListTooLarge(HPACKError):
    """The decoded header list is larger than ``max_header_list_size``
    (RFC 9113 §6.5.2: the sum of len(name) + len(value) + 32 per field).

    Unlike its parent this is not a connection error: the block was decoded
    to its end, its dynamic table changes applied and its fields dropped,
    so the connection can answer the stream with 431 or RST_STREAM (RFC
    9113 §10.5.1) and go on decoding.  ``size`` is the list's size, ``limit``
    the limit it broke.
    """

    def __init__(self, size, limit):
        HPACKError.__init__(self, "header list of %d octets is larger than the limit of %d "
                            "(SETTINGS_MAX_HEADER_LIST_SIZE, RFC 9113 §10.5.1)" % (size, limit))
        self.size = size
        self.limit = limit


# RFC 7541 Appendix A: the static table.  Index 1 is STATIC_TABLE[0].
STATIC_TABLE = (
    (b":authority", b""),                       # 1
    (b":method", b"GET"),                       # 2
    (b":method", b"POST"),                      # 3
    (b":path", b"/"),                           # 4
    (b":path", b"/index.html"),                 # 5
    (b":scheme", b"http"),                      # 6
    (b":scheme", b"https"),                     # 7
    (b":status", b"200"),                       # 8
    (b":status", b"204"),                       # 9
    (b":status", b"206"),                       # 10
    (b":status", b"304"),                       # 11
    (b":status", b"400"),                       # 12
    (b":status", b"404"),                       # 13
    (b":status", b"500"),                       # 14
    (b"accept-charset", b""),                   # 15
    (b"accept-encoding", b"gzip, deflate"),     # 16
    (b"accept-language", b""),                  # 17
    (b"accept-ranges", b""),                    # 18
    (b"accept", b""),                           # 19
    (b"access-control-allow-origin", b""),      # 20
    (b"age", b""),                              # 21
    (b"allow", b""),                            # 22
    (b"authorization", b""),                    # 23
    (b"cache-control", b""),                    # 24
    (b"content-disposition", b""),              # 25
    (b"content-encoding", b""),                 # 26
    (b"content-language", b""),                 # 27
    (b"content-length", b""),                   # 28
    (b"content-location", b""),                 # 29
    (b"content-range", b""),                    # 30
    (b"content-type", b""),                     # 31
    (b"cookie", b""),                           # 32
    (b"date", b""),                             # 33
    (b"etag", b""),                             # 34
    (b"expect", b""),                           # 35
    (b"expires", b""),                          # 36
    (b"from", b""),                             # 37
    (b"host", b""),                             # 38
    (b"if-match", b""),                         # 39
    (b"if-modified-since", b""),                # 40
    (b"if-none-match", b""),                    # 41
    (b"if-range", b""),                         # 42
    (b"if-unmodified-since", b""),              # 43
    (b"last-modified", b""),                    # 44
    (b"link", b""),                             # 45
    (b"location", b""),                         # 46
    (b"max-forwards", b""),                     # 47
    (b"proxy-authenticate", b""),               # 48
    (b"proxy-authorization", b""),              # 49
    (b"range", b""),                            # 50
    (b"referer", b""),                          # 51
    (b"refresh", b""),                          # 52
    (b"retry-after", b""),                      # 53
    (b"server", b""),                           # 54
    (b"set-cookie", b""),                       # 55
    (b"strict-transport-security", b""),        # 56
    (b"transfer-encoding", b""),                # 57
    (b"user-agent", b""),                       # 58
    (b"vary", b""),                             # 59
    (b"via", b""),                              # 60
    (b"www-authenticate", b""),                 # 61
)
# The encoder's lookups: a whole field, and a name (its first index).
_STATIC_FIELD_INDEX = {field: i + 1 for i, field in enumerate(STATIC_TABLE)}
_STATIC_NAME_INDEX = {}
for _i, (_name, _value) in enumerate(STATIC_TABLE):
    _STATIC_NAME_INDEX.setdefault(_name, _i + 1)
del _i, _name, _value

# RFC 7541 Appendix B: the Huffman code, as (code, length in bits) for the
# symbols 0 to 255 and EOS (256) -- the appendix's "code as hex aligned to
# LSB" and "len in bits" columns, four symbols a row.
_HUFFMAN_CODE = (
    (0x1ff8, 13), (0x7fffd8, 23), (0xfffffe2, 28), (0xfffffe3, 28),        # 0-3
    (0xfffffe4, 28), (0xfffffe5, 28), (0xfffffe6, 28), (0xfffffe7, 28),    # 4-7
    (0xfffffe8, 28), (0xffffea, 24), (0x3ffffffc, 30), (0xfffffe9, 28),    # 8-11
    (0xfffffea, 28), (0x3ffffffd, 30), (0xfffffeb, 28), (0xfffffec, 28),   # 12-15
    (0xfffffed, 28), (0xfffffee, 28), (0xfffffef, 28), (0xffffff0, 28),    # 16-19
    (0xffffff1, 28), (0xffffff2, 28), (0x3ffffffe, 30), (0xffffff3, 28),   # 20-23
    (0xffffff4, 28), (0xffffff5, 28), (0xffffff6, 28), (0xffffff7, 28),    # 24-27
    (0xffffff8, 28), (0xffffff9, 28), (0xffffffa, 28), (0xffffffb, 28),    # 28-31
    (0x14, 6), (0x3f8, 10), (0x3f9, 10), (0xffa, 12),                      # ' ' '!' '"' '#'
    (0x1ff9, 13), (0x15, 6), (0xf8, 8), (0x7fa, 11),                       # '$' '%' '&' "'"
    (0x3fa, 10), (0x3fb, 10), (0xf9, 8), (0x7fb, 11),                      # '(' ')' '*' '+'
    (0xfa, 8), (0x16, 6), (0x17, 6), (0x18, 6),                            # ',' '-' '.' '/'
    (0x0, 5), (0x1, 5), (0x2, 5), (0x19, 6),                               # '0' '1' '2' '3'
    (0x1a, 6), (0x1b, 6), (0x1c, 6), (0x1d, 6),                            # '4' '5' '6' '7'
    (0x1e, 6), (0x1f, 6), (0x5c, 7), (0xfb, 8),                            # '8' '9' ':' ';'
    (0x7ffc, 15), (0x20, 6), (0xffb, 12), (0x3fc, 10),                     # '<' '=' '>' '?'
    (0x1ffa, 13), (0x21, 6), (0x5d, 7), (0x5e, 7),                         # '@' 'A' 'B' 'C'
    (0x5f, 7), (0x60, 7), (0x61, 7), (0x62, 7),                            # 'D' 'E' 'F' 'G'
    (0x63, 7), (0x64, 7), (0x65, 7), (0x66, 7),                            # 'H' 'I' 'J' 'K'
    (0x67, 7), (0x68, 7), (0x69, 7), (0x6a, 7),                            # 'L' 'M' 'N' 'O'
    (0x6b, 7), (0x6c, 7), (0x6d, 7), (0x6e, 7),                            # 'P' 'Q' 'R' 'S'
    (0x6f, 7), (0x70, 7), (0x71, 7), (0x72, 7),                            # 'T' 'U' 'V' 'W'
    (0xfc, 8), (0x73, 7), (0xfd, 8), (0x1ffb, 13),                         # 'X' 'Y' 'Z' '['
    (0x7fff0, 19), (0x1ffc, 13), (0x3ffc, 14), (0x22, 6),                  # '\' ']' '^' '_'
    (0x7ffd, 15), (0x3, 5), (0x23, 6), (0x4, 5),                           # '`' 'a' 'b' 'c'
    (0x24, 6), (0x5, 5), (0x25, 6), (0x26, 6),                             # 'd' 'e' 'f' 'g'
    (0x27, 6), (0x6, 5), (0x74, 7), (0x75, 7),                             # 'h' 'i' 'j' 'k'
    (0x28, 6), (0x29, 6), (0x2a, 6), (0x7, 5),                             # 'l' 'm' 'n' 'o'
    (0x2b, 6), (0x76, 7), (0x2c, 6), (0x8, 5),                             # 'p' 'q' 'r' 's'
    (0x9, 5), (0x2d, 6), (0x77, 7), (0x78, 7),                             # 't' 'u' 'v' 'w'
    (0x79, 7), (0x7a, 7), (0x7b, 7), (0x7ffe, 15),                         # 'x' 'y' 'z' '{'
    (0x7fc, 11), (0x3ffd, 14), (0x1ffd, 13), (0xffffffc, 28),              # '|' '}' '~' 127
    (0xfffe6, 20), (0x3fffd2, 22), (0xfffe7, 20), (0xfffe8, 20),           # 128-131
    (0x3fffd3, 22), (0x3fffd4, 22), (0x3fffd5, 22), (0x7fffd9, 23),        # 132-135
    (0x3fffd6, 22), (0x7fffda, 23), (0x7fffdb, 23), (0x7fffdc, 23),        # 136-139
    (0x7fffdd, 23), (0x7fffde, 23), (0xffffeb, 24), (0x7fffdf, 23),        # 140-143
    (0xffffec, 24), (0xffffed, 24), (0x3fffd7, 22), (0x7fffe0, 23),        # 144-147
    (0xffffee, 24), (0x7fffe1, 23), (0x7fffe2, 23), (0x7fffe3, 23),        # 148-151
    (0x7fffe4, 23), (0x1fffdc, 21), (0x3fffd8, 22), (0x7fffe5, 23),        # 152-155
    (0x3fffd9, 22), (0x7fffe6, 23), (0x7fffe7, 23), (0xffffef, 24),        # 156-159
    (0x3fffda, 22), (0x1fffdd, 21), (0xfffe9, 20), (0x3fffdb, 22),         # 160-163
    (0x3fffdc, 22), (0x7fffe8, 23), (0x7fffe9, 23), (0x1fffde, 21),        # 164-167
    (0x7fffea, 23), (0x3fffdd, 22), (0x3fffde, 22), (0xfffff0, 24),        # 168-171
    (0x1fffdf, 21), (0x3fffdf, 22), (0x7fffeb, 23), (0x7fffec, 23),        # 172-175
    (0x1fffe0, 21), (0x1fffe1, 21), (0x3fffe0, 22), (0x1fffe2, 21),        # 176-179
    (0x7fffed, 23), (0x3fffe1, 22), (0x7fffee, 23), (0x7fffef, 23),        # 180-183
    (0xfffea, 20), (0x3fffe2, 22), (0x3fffe3, 22), (0x3fffe4, 22),         # 184-187
    (0x7ffff0, 23), (0x3fffe5, 22), (0x3fffe6, 22), (0x7ffff1, 23),        # 188-191
    (0x3ffffe0, 26), (0x3ffffe1, 26), (0xfffeb, 20), (0x7fff1, 19),        # 192-195
    (0x3fffe7, 22), (0x7ffff2, 23), (0x3fffe8, 22), (0x1ffffec, 25),       # 196-199
    (0x3ffffe2, 26), (0x3ffffe3, 26), (0x3ffffe4, 26), (0x7ffffde, 27),    # 200-203
    (0x7ffffdf, 27), (0x3ffffe5, 26), (0xfffff1, 24), (0x1ffffed, 25),     # 204-207
    (0x7fff2, 19), (0x1fffe3, 21), (0x3ffffe6, 26), (0x7ffffe0, 27),       # 208-211
    (0x7ffffe1, 27), (0x3ffffe7, 26), (0x7ffffe2, 27), (0xfffff2, 24),     # 212-215
    (0x1fffe4, 21), (0x1fffe5, 21), (0x3ffffe8, 26), (0x3ffffe9, 26),      # 216-219
    (0xffffffd, 28), (0x7ffffe3, 27), (0x7ffffe4, 27), (0x7ffffe5, 27),    # 220-223
    (0xfffec, 20), (0xfffff3, 24), (0xfffed, 20), (0x1fffe6, 21),          # 224-227
    (0x3fffe9, 22), (0x1fffe7, 21), (0x1fffe8, 21), (0x7ffff3, 23),        # 228-231
    (0x3fffea, 22), (0x3fffeb, 22), (0x1ffffee, 25), (0x1ffffef, 25),      # 232-235
    (0xfffff4, 24), (0xfffff5, 24), (0x3ffffea, 26), (0x7ffff4, 23),       # 236-239
    (0x3ffffeb, 26), (0x7ffffe6, 27), (0x3ffffec, 26), (0x3ffffed, 26),    # 240-243
    (0x7ffffe7, 27), (0x7ffffe8, 27), (0x7ffffe9, 27), (0x7ffffea, 27),    # 244-247
    (0x7ffffeb, 27), (0xffffffe, 28), (0x7ffffec, 27), (0x7ffffed, 27),    # 248-251
    (0x7ffffee, 27), (0x7ffffef, 27), (0x7fffff0, 27), (0x3ffffee, 26),    # 252-255
    (0x3fffffff, 30),                                                      # EOS
)
_HUFFMAN_EOS = 256
# For the encoder: each octet's code as a string of "0" and "1", and its
# length in bits as a bytes.translate table.
_HUFFMAN_BIT_STRINGS = tuple(format(code, "0%db" % bits) for code, bits in _HUFFMAN_CODE[:256])
_HUFFMAN_LENGTHS = bytes(bits for _code, bits in _HUFFMAN_CODE[:256])


def huffman_encode(data):
    """RFC 7541 §5.2: ``data`` Huffman-coded, the last octet padded with the
    most significant bits of EOS (ones)."""
    bits = "".join(map(_HUFFMAN_BIT_STRINGS.__getitem__, data))
    padding = -len(bits) % 8
    # int() of a base-2 string has no digit limit and takes linear time.
    return int(bits + "1" * padding, 2).to_bytes((len(bits) + padding) // 8, "big") \
        if bits else b""


def huffman_length(data):
    """The length in octets of huffman_encode(data), without encoding it."""
    return (sum(data.translate(_HUFFMAN_LENGTHS)) + 7) // 8


@functools.lru_cache(maxsize=None)
def _huffman_decoder():
    """The Huffman decoder as a state machine that reads 4 bits a step,
    built from _HUFFMAN_CODE on first use (a few milliseconds, once per
    process; a server that never speaks HTTP/2 never pays it).

    A state is an inner node of the code's binary tree: the bits read since
    the last whole symbol.  ``steps[state + nibble]`` is ``(next state,
    symbol or -1)``; states are numbered in steps of 16 so that the lookup
    is one addition.  No code is shorter than 5 bits, so a step ends at most
    one symbol.  EOS leads to a dead state that every step keeps.
    ``verdicts[state >> 4]`` is None where a string may end -- the root, or
    up to 7 bits that are all ones (RFC 7541 §5.2) -- else the error."""
    # The tree: children[node] = [child for bit 0, child for bit 1]; a
    # child is a node number, or ~symbol for a leaf.  Node 0 is the root.
    children = [[None, None]]
    for symbol, (code, bits) in enumerate(_HUFFMAN_CODE):
        node = 0
        for shift in range(bits - 1, 0, -1):
            bit = code >> shift & 1
            if children[node][bit] is None:
                children[node][bit] = len(children)
                children.append([None, None])
            node = children[node][bit]
        children[node][code & 1] = ~symbol
    dead = len(children)
    steps = []
    for node in range(dead):
        for nibble in range(16):
            at, symbol = node, -1
            for shift in (3, 2, 1, 0):
                at = children[at][nibble >> shift & 1]
                if at == ~_HUFFMAN_EOS:
                    at = dead
                    break
                if at < 0:
                    symbol, at = ~at, 0
            steps.append((at * 16, symbol))
    steps.extend([(dead * 16, -1)] * 16)
    # RFC 7541 §5.2: "A padding strictly longer than 7 bits MUST be treated
    # as a decoding error.  A padding not corresponding to the most
    # significant bits of the code for the EOS symbol MUST be treated as a
    # decoding error.  A Huffman-encoded string literal containing the EOS
    # symbol MUST be treated as a decoding error."
    verdicts = ["Huffman string ends inside a symbol, or with padding that is not all "
                "ones (RFC 7541 §5.2)"] * dead
    verdicts.append("Huffman string contains the EOS symbol (RFC 7541 §5.2)")
    node = 0
    for ones in range(32):
        verdicts[node] = None if ones <= 7 else (
            "Huffman string ends with more than 7 bits of padding (RFC 7541 §5.2)")
        node = children[node][1]
        if node < 0:
            break
    return tuple(steps), tuple(verdicts)


def huffman_decode(data):
    """RFC 7541 §5.2: the octets Huffman-coded in ``data``; HPACKError for
    bad padding or an EOS symbol."""
    steps, verdicts = _huffman_decoder()
    out = bytearray()
    append = out.append
    state = 0
    for octet in data:
        state, symbol = steps[state + (octet >> 4)]
        if symbol >= 0:
            append(symbol)
        state, symbol = steps[state + (octet & 15)]
        if symbol >= 0:
            append(symbol)
    verdict = verdicts[state >> 4]
    if verdict is not None:
        raise HPACKError(verdict)
    return bytes(out)


# RFC 7541 §7.4: "An implementation has to set a limit for the values it
# accepts for integers, as well as for the encoded length."  Four
# continuation octets carry 28 bits: more than any index, length or table
# size a block we accept can hold.
_INTEGER_MAX_CONTINUATION = 4


def _encode_integer(value, prefix_bits, flags=0):
    """RFC 7541 §5.1: ``value`` in the low ``prefix_bits`` of an octet whose
    high bits are ``flags``; past the prefix, 7 bits per octet, least
    significant first, the high bit set on all octets but the last."""
    full = (1 << prefix_bits) - 1
    if value < full:
        return bytes((flags | value,))
    out = bytearray((flags | full,))
    value -= full
    while value >= 128:
        out.append(value & 0x7f | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _decode_integer(data, pos, prefix_bits):
    """RFC 7541 §5.1: the integer whose prefix is in ``data[pos]``, as
    (value, position after it)."""
    full = (1 << prefix_bits) - 1
    value = data[pos] & full
    pos += 1
    if value < full:
        return value, pos
    shift = 0
    last = pos + _INTEGER_MAX_CONTINUATION
    while pos < len(data):
        if pos == last:
            raise HPACKError("integer runs past %d continuation octets (RFC 7541 §7.4)"
                             % _INTEGER_MAX_CONTINUATION)
        octet = data[pos]
        pos += 1
        value += (octet & 0x7f) << shift
        if octet < 0x80:
            return value, pos
        shift += 7
    raise HPACKError("header block ends inside an integer (RFC 7541 §5.1)")


def _decode_string(data, pos):
    """RFC 7541 §5.2: the string literal at ``data[pos]`` -- a Huffman flag,
    a 7-bit-prefix length, the octets -- as (bytes, position after it)."""
    if pos >= len(data):
        raise HPACKError("header block ends before a string literal (RFC 7541 §5.2)")
    huffman = data[pos] & 0x80
    length, pos = _decode_integer(data, pos, 7)
    end = pos + length
    if end > len(data):
        raise HPACKError("string literal of %d octets runs past the end of the header block "
                         "(RFC 7541 §5.2)" % length)
    if huffman:
        return huffman_decode(data[pos:end]), end
    return data[pos:end], end


def _encode_string(data):
    """RFC 7541 §5.2: ``data`` as a string literal, Huffman-coded when that
    is shorter."""
    length = huffman_length(data)
    if length < len(data):
        return _encode_integer(length, 7, 0x80) + huffman_encode(data)
    return _encode_integer(len(data), 7) + data


# RFC 7541 §4.1: "The size of an entry is the sum of its name's length in
# octets ..., its value's length in octets, and 32."  RFC 9113 §6.5.2
# counts a header list's size the same way.
_ENTRY_OVERHEAD = 32


class _DynamicTable:
    """What both ends of a connection show of their dynamic table (RFC
    7541 §2.3.2): its entries (``_entries``) and their size (``_size``)."""

    __slots__ = ()

    @property
    def table_size(self):
        """The dynamic table's size in octets (RFC 7541 §4.1)."""
        return self._size

    @property
    def dynamic_table(self):
        """The dynamic table's entries, newest (index 62) first."""
        return list(self._entries)


class HPACKDecoder(_DynamicTable):
    """The decoding context of the header blocks one peer sends on one
    HTTP/2 connection.

    ``max_table_size`` is the SETTINGS_HEADER_TABLE_SIZE we advertised:
    the most a dynamic table size update may ask for (RFC 7541 §6.3).  Set
    it when the peer acknowledges a new value; a value below the table's
    current size requires the peer's next block to begin with a size update
    (RFC 7541 §4.2).  ``max_header_list_size`` is the largest header list
    decode() returns (RFC 9113 §6.5.2); a larger one raises
    HeaderListTooLarge.
    """

    def __init__(self, max_table_size=4096, max_header_list_size=65536):
        self.max_header_list_size = max_header_list_size
        self._entries = collections.deque()     # (name, value), newest first: index 62 is [0]
        self._size = 0                          # RFC 7541 §4.1 size of the entries
        self._limit = max_table_size            # the table's maximum size, as last signalled
        self._max_table_size = max_table_size   # the most a size update may signal
        self._reduced_to = None                 # smallest max_table_size below _limit since
                                                # the last block: the next must signal it
        self._error = None                      # the HPACKError that ended this context

    @property
    def max_table_size(self):
        return self._max_table_size

    @max_table_size.setter
    def max_table_size(self, size):
        # RFC 7541 §4.2: "the smallest maximum table size that occurs in
        # that interval MUST be signaled in a dynamic table size update";
        # the peer need not signal a limit it already keeps under.
        self._max_table_size = size
        if size < self._limit:
            self._reduced_to = size if self._reduced_to is None else min(self._reduced_to, size)

    def decode(self, block):
        """The header list in ``block``, one whole field block, as a list of
        (name, value) pairs of bytes in the order they were sent."""
        if self._error is not None:
            raise HPACKError("decoding context unusable after an earlier error: %s" % self._error)
        try:
            return self._decode(bytes(block))
        except HeaderListTooLarge:
            raise
        except HPACKError as exc:
            self._error = exc
            raise

    def _decode(self, data):
        end = len(data)
        pos = 0
        # RFC 7541 §4.2: "This dynamic table size update MUST occur at the
        # beginning of the first header block following the change to the
        # dynamic table size."  One or more (§4.2: the smallest, then the
        # final size), before the first field.
        signalled = None
        while pos < end and data[pos] & 0xe0 == 0x20:
            size, pos = _decode_integer(data, pos, 5)
            # RFC 7541 §6.3: "The new maximum size MUST be lower than or
            # equal to the limit determined by the protocol using HPACK.  A
            # value that exceeds this limit MUST be treated as a decoding
            # error."
            if size > self._max_table_size:
                raise HPACKError("dynamic table size update to %d, above the %d advertised in "
                                 "SETTINGS_HEADER_TABLE_SIZE (RFC 7541 §6.3)"
                                 % (size, self._max_table_size))
            self._limit = size
            self._evict(size)
            signalled = size if signalled is None else min(signalled, size)
        if self._reduced_to is not None:
            if signalled is None or signalled > self._reduced_to:
                raise HPACKError("header block does not begin with a dynamic table size update "
                                 "to %d or less after SETTINGS_HEADER_TABLE_SIZE was lowered "
                                 "(RFC 7541 §4.2)" % self._reduced_to)
            self._reduced_to = None
        headers = []
        listed = 0                              # RFC 9113 §6.5.2 size of the list so far
        limit = self.max_header_list_size
        entries = self._entries
        while pos < end:
            octet = data[pos]
            if octet & 0x80:
                # RFC 7541 §6.1: an indexed header field, 1 + 7-bit index.
                if octet != 0xff:
                    index = octet & 0x7f
                    pos += 1
                else:
                    index, pos = _decode_integer(data, pos, 7)
                if 0 < index <= 61:
                    field = STATIC_TABLE[index - 1]
                elif 61 < index <= 61 + len(entries):
                    field = entries[index - 62]
                else:
                    field = self._bad_index(index)
            elif octet & 0x40:
                # RFC 7541 §6.2.1: a literal with incremental indexing, 01 +
                # 6-bit name index (0: a literal name follows), then the value.
                field, pos = self._literal(data, pos, 6)
                self._add(field)
            elif octet & 0x20:
                raise HPACKError("dynamic table size update after a header field "
                                 "(RFC 7541 §4.2)")
            else:
                # RFC 7541 §6.2.2 and §6.2.3: a literal without indexing
                # (0000) or never indexed (0001), with a 4-bit name index.
                field, pos = self._literal(data, pos, 4)
            listed += len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
            if listed <= limit:
                headers.append(field)
            elif headers is not None:
                headers = None                  # past the limit: count, keep nothing
        if headers is None:
            raise HeaderListTooLarge(listed, limit)
        return headers

    def _literal(self, data, pos, prefix_bits):
        """A literal field's name (indexed or literal) and value: ((name,
        value), position after them)."""
        index, pos = _decode_integer(data, pos, prefix_bits)
        if index:
            if index <= 61:
                name = STATIC_TABLE[index - 1][0]
            elif index <= 61 + len(self._entries):
                name = self._entries[index - 62][0]
            else:
                name = self._bad_index(index)[0]
        else:
            name, pos = _decode_string(data, pos)
        value, pos = _decode_string(data, pos)
        return (name, value), pos

    def _bad_index(self, index):
        # RFC 7541 §6.1: "The index value of 0 is not used.  It MUST be
        # treated as a decoding error if found in an indexed header field
        # representation."  §2.3.3: "Indices strictly greater than the sum of
        # the lengths of both tables MUST be treated as a decoding error."
        if index == 0:
            raise HPACKError("indexed header field with index 0 (RFC 7541 §6.1)")
        raise HPACKError("index %d is past the end of the tables (61 static and %d dynamic "
                         "entries; RFC 7541 §2.3.3)" % (index, len(self._entries)))

    def _add(self, field):
        # RFC 7541 §4.4: evict from the end until the new entry fits; an
        # entry larger than the maximum size empties the table and is not
        # added.  The name was copied out before, so evicting the entry it
        # came from is harmless.
        size = len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
        self._evict(self._limit - size)
        if size <= self._limit:
            self._entries.appendleft(field)
            self._size += size

    def _evict(self, room):
        """Drop the oldest entries until the table is at most ``room``
        octets (RFC 7541 §4.3, §4.4)."""
        entries = self._entries
        while entries and self._size > room:
            name, value = entries.pop()
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD


# The encoder's choices, which RFC 7541 leaves to it (§2.1, §7.1).
#
# RFC 7541 §7.1.3: "An encoder might also choose not to index values for
# header fields that are considered to be highly valuable or sensitive to
# recovery, such as the Cookie or Authorization header fields."  Credentials
# are sent as never-indexed literals, which also binds intermediaries
# (§6.2.3); so are cookies shorter than 20 octets, whose values are few
# enough to guess (§7.1.3: "short or low-entropy values are more readily
# recovered").  A longer cookie is indexed like any field: a guess must
# match its whole value.
_NEVER_INDEXED_NAMES = frozenset((b"authorization", b"proxy-authorization"))
_SHORT_SENSITIVE_NAMES = frozenset((b"cookie", b"set-cookie"))
_SHORT_SENSITIVE_LENGTH = 20
# Fields whose values differ from one message to the next are sent without
# indexing: storing them would only evict entries that do repeat.
_UNINDEXED_NAMES = frozenset((b":path", b"content-length", b"content-range"))
# The most of the peer's SETTINGS_HEADER_TABLE_SIZE the encoder uses, in
# octets: RFC 7541 §4.2 lets an encoder use less than the decoder allows,
# and a peer that allows a megabyte gets the default 4 KiB of memory from
# us, not a megabyte.
_ENCODER_TABLE_CAP = 4096


class HPACKEncoder(_DynamicTable):
    """The encoding context of the header blocks we send on one HTTP/2
    connection.  Blocks must be sent in the order encode() made them.

    Each field becomes the shortest of: an index (a whole match in the
    static or the dynamic table), a literal with incremental indexing (the
    usual case: the next identical field costs one octet), a literal
    without indexing (_UNINDEXED_NAMES, and a field larger than 3/4 of the
    table, which would evict nearly everything), or a never-indexed literal
    (_NEVER_INDEXED_NAMES, short _SHORT_SENSITIVE_NAMES).  A literal's name
    is an index when either table has it; strings are Huffman-coded when
    that is shorter.
    """

    def __init__(self):
        self._entries = collections.deque()     # (name, value), newest first: index 62 is [0]
        self._size = 0                          # RFC 7541 §4.1 size of the entries
        self._limit = 4096                      # the table's maximum size (RFC 9113 §6.5.2:
                                                # SETTINGS_HEADER_TABLE_SIZE starts at 4096)
        self._added = 0                         # entries ever added; the newest is number
                                                # _added - 1, at index 62
        self._by_field = {}                     # (name, value) -> number of its newest entry
        self._by_name = {}                      # name -> number of its newest entry
        self._update = None                     # (smallest, final) sizes to signal at the
                                                # start of the next block, or None

    def set_max_table_size(self, size):
        """The peer's SETTINGS_HEADER_TABLE_SIZE changed to ``size``: the
        table will use min(size, _ENCODER_TABLE_CAP), signalled at the start
        of the next block (RFC 7541 §6.3)."""
        size = min(size, _ENCODER_TABLE_CAP)
        if self._update is not None:
            # RFC 7541 §4.2: "If this change in maximum size is reduced
            # more than once between two header blocks, the smallest
            # maximum table size that occurs in that interval MUST be
            # signaled"; then the final one.
            self._update = (min(self._update[0], size), size)
        elif size != self._limit:
            self._update = (size, size)

    def encode(self, headers):
        """``headers``, a list of (name, value) pairs of bytes, as one header
        block.  Names go as given: HTTP/2 wants them lower-case (RFC 9113
        §8.2.1), which is the caller's business."""
        out = bytearray()
        if self._update is not None:
            smallest, final = self._update
            self._update = None
            for size in ((smallest, final) if smallest < final else (final,)):
                out += _encode_integer(size, 5, 0x20)    # RFC 7541 §6.3: 001 + 5-bit size
                self._limit = size
                self._evict(size)
        for name, value in headers:
            out += self._field(bytes(name), bytes(value))
        return bytes(out)

    def _index(self, number):
        """The index of dynamic entry ``number`` (_evict forgets the numbers
        of the entries it drops, so the entry is still there)."""
        return 62 + self._added - 1 - number

    def _field(self, name, value):
        sensitive = name in _NEVER_INDEXED_NAMES or (
            name in _SHORT_SENSITIVE_NAMES and len(value) < _SHORT_SENSITIVE_LENGTH)
        if not sensitive:
            index = _STATIC_FIELD_INDEX.get((name, value))
            if index is None and (name, value) in self._by_field:
                index = self._index(self._by_field[(name, value)])
            if index is not None:
                return _encode_integer(index, 7, 0x80)   # RFC 7541 §6.1
        name_index = _STATIC_NAME_INDEX.get(name)
        if name_index is None and name in self._by_name:
            name_index = self._index(self._by_name[name])
        size = len(name) + len(value) + _ENTRY_OVERHEAD
        if sensitive:
            head = _encode_integer(name_index or 0, 4, 0x10)     # §6.2.3: never indexed
        elif name in _UNINDEXED_NAMES or size > self._limit * 3 // 4:
            head = _encode_integer(name_index or 0, 4, 0x00)     # §6.2.2: without indexing
        else:
            head = _encode_integer(name_index or 0, 6, 0x40)     # §6.2.1: incremental indexing
            self._add(name, value, size)
        if name_index is None:
            head += _encode_string(name)
        return head + _encode_string(value)

    def _add(self, name, value, size):
        # RFC 7541 §4.4, as the decoder does it (the caller keeps fields no
        # larger than the table).
        self._evict(self._limit - size)
        number = self._added
        self._added += 1
        self._entries.appendleft((name, value))
        self._size += size
        self._by_field[(name, value)] = number
        self._by_name[name] = number

    def _evict(self, room):
        entries = self._entries
        while entries and self._size > room:
            number = self._added - len(entries)      # the oldest entry's number
            name, value = entries.pop()
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD
            if self._by_field.get((name, value)) == number:
                del self._by_field[(name, value)]
            if self._by_name.get(name) == number:
                del self._by_name[name]


# ============================================================================
# 4b. HTTP/2 frames and streams, sans-I/O (RFC 9113)
#
# H2Protocol is the whole of HTTP/2 that can be said with bytes alone: the
# client's connection preface, the frame codec (every frame type of RFC
# 9113 §6), the SETTINGS exchange, PING, GOAWAY, the stream states of §5.1,
# both directions of flow control (§5.2, §6.9), header blocks across
# CONTINUATION frames, and every connection and stream error with its code
# (§5.4, §7).  feed(bytes) returns events (H2Request, H2Data, H2Trailers,
# H2Reset, H2WindowOpened, H2GoAway); the send_* methods and the answers
# the protocol gives by itself (SETTINGS and PING acknowledgements, window
# updates, RST_STREAM and GOAWAY for errors) queue bytes that
# data_to_send() hands over.  Header blocks are (de)compressed by section
# 4a's HPACKDecoder and HPACKEncoder.
#
# What must not go in here: PAGI scopes, events or disconnect reasons;
# sockets; timers.  The protocol says what arrived and what went wrong; the
# connection (section 6a) decides what an application sees.
#
# Before you edit: a stream error (RST_STREAM) must leave the connection
# usable, so a header block is always decoded -- even for a stream that is
# refused or reset -- or HPACK's dynamic table would drift from the
# client's (RFC 9113 §4.3).  Anything that cannot be decoded is a
# connection error.
# ============================================================================

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"   # RFC 9113 §3.4

# RFC 9113 §6: frame types.
H2_DATA, H2_HEADERS, H2_PRIORITY, H2_RST_STREAM, H2_SETTINGS, H2_PUSH_PROMISE, \
    H2_PING, H2_GOAWAY, H2_WINDOW_UPDATE, H2_CONTINUATION = range(10)
# Flags (§6.x): the same bit means different things in different types.
H2_FLAG_END_STREAM = 0x1      # DATA, HEADERS
H2_FLAG_ACK = 0x1             # SETTINGS, PING
H2_FLAG_END_HEADERS = 0x4     # HEADERS, CONTINUATION
H2_FLAG_PADDED = 0x8          # DATA, HEADERS
H2_FLAG_PRIORITY = 0x20       # HEADERS

# RFC 9113 §7: error codes.
H2_NO_ERROR, H2_PROTOCOL_ERROR, H2_INTERNAL_ERROR, H2_FLOW_CONTROL_ERROR, \
    H2_SETTINGS_TIMEOUT, H2_STREAM_CLOSED, H2_FRAME_SIZE_ERROR, H2_REFUSED_STREAM, \
    H2_CANCEL, H2_COMPRESSION_ERROR, H2_CONNECT_ERROR, H2_ENHANCE_YOUR_CALM, \
    H2_INADEQUATE_SECURITY, H2_HTTP_1_1_REQUIRED = range(14)

# RFC 9113 §6.5.2: setting identifiers, and their initial values.
H2_SETTINGS_HEADER_TABLE_SIZE = 0x1
H2_SETTINGS_ENABLE_PUSH = 0x2
H2_SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
H2_SETTINGS_INITIAL_WINDOW_SIZE = 0x4
H2_SETTINGS_MAX_FRAME_SIZE = 0x5
H2_SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
_H2_DEFAULT_WINDOW = 65535            # §6.9.2: the initial window, both levels
_H2_MIN_FRAME_SIZE = 16384            # §4.2: SETTINGS_MAX_FRAME_SIZE floor (and default)
_H2_MAX_FRAME_SIZE = (1 << 24) - 1    # §6.5.2: its ceiling
_H2_MAX_WINDOW = (1 << 31) - 1        # §6.9.1: a window may not exceed this

# Defences (issue 15; docs/http2.md).  Each is a count, not a rate, so that
# the same bytes get the same answer however fast they arrive.
_H2_FLOOD_BUDGET = 1000   # PING, SETTINGS, PRIORITY, empty DATA and CONTINUATION
                          # frames a client may send beyond what its requests earn
_H2_FLOOD_REFILL = 10     # ... each stream it opens earns this many more
_H2_BLOCK_FRAMES = 64     # HEADERS + CONTINUATION frames in one header block
_H2_CLOSED_MEMORY = 256   # closed streams remembered (STREAM_CLOSED vs PROTOCOL_ERROR)
_H2_GRANT_FRACTION = 2    # a window is topped up once 1/2 of it has been used

# RFC 9113 §8.2.2: connection-specific fields, malformed in HTTP/2.
_H2_CONNECTION_FIELDS = frozenset((b"connection", b"keep-alive", b"proxy-connection",
                                   b"transfer-encoding", b"upgrade"))
# RFC 9113 §8.3.1: the request pseudo-header fields.
_H2_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path"))
# RFC 9113 §8.2.1: a value MUST NOT contain NUL, LF or CR, nor start or end
# with SP or HTAB.
_H2_FIELD_VALUE_BAD = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")


class H2ConnectionError(Exception):
    """RFC 9113 §5.4.1: the connection ends with GOAWAY and ``code``."""

    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code


class H2StreamError(Exception):
    """RFC 9113 §5.4.2: one stream ends with RST_STREAM and ``code``."""

    def __init__(self, stream_id, code, message):
        Exception.__init__(self, message)
        self.stream_id = stream_id
        self.code = code


def h2_frame(ftype, flags, stream_id, payload=b""):
    """RFC 9113 §4.1: Length (24), Type (8), Flags (8), R (1), Stream
    Identifier (31), then the payload."""
    size = len(payload)
    return bytes((size >> 16, (size >> 8) & 0xff, size & 0xff, ftype, flags)) + \
        (stream_id & 0x7fffffff).to_bytes(4, "big") + payload


def h2_settings_payload(settings):
    """§6.5.1: each setting is an identifier (16) and a value (32)."""
    return b"".join(ident.to_bytes(2, "big") + value.to_bytes(4, "big")
                    for ident, value in settings)


# -- events ------------------------------------------------------------------

class H2Request:
    """A stream opened with a request head (RFC 9113 §8.1): ``head`` is a
    section-4 RequestHead with ``http_version`` "2"."""
    __slots__ = ("stream_id", "head", "end_stream")

    def __init__(self, stream_id, head, end_stream):
        self.stream_id = stream_id
        self.head = head
        self.end_stream = end_stream

    def __repr__(self):
        return "<H2Request %d %r end_stream=%s>" % (self.stream_id, self.head, self.end_stream)


class H2Data:
    """Request body bytes; ``flow`` is what the frame cost the stream's
    window (padding included), to give back with consumed()."""
    __slots__ = ("stream_id", "data", "flow", "end_stream")

    def __init__(self, stream_id, data, flow, end_stream):
        self.stream_id = stream_id
        self.data = data
        self.flow = flow
        self.end_stream = end_stream

    def __repr__(self):
        return "<H2Data %d %d bytes end_stream=%s>" % (self.stream_id, len(self.data),
                                                       self.end_stream)


class H2Trailers:
    """The trailer section that ends a request (RFC 9113 §8.1)."""
    __slots__ = ("stream_id", "headers")

    def __init__(self, stream_id, headers):
        self.stream_id = stream_id
        self.headers = headers

    def __repr__(self):
        return "<H2Trailers %d %r>" % (self.stream_id, self.headers)


class H2Reset:
    """A stream ended abnormally: the client reset it (``remote``), or we
    did, for a stream error with ``code``."""
    __slots__ = ("stream_id", "code", "remote")

    def __init__(self, stream_id, code, remote):
        self.stream_id = stream_id
        self.code = code
        self.remote = remote

    def __repr__(self):
        return "<H2Reset %d code=%d %s>" % (self.stream_id, self.code,
                                            "remote" if self.remote else "local")


class H2WindowOpened:
    """Send windows grew: stream ``stream_id``'s, or every stream's (0)."""
    __slots__ = ("stream_id",)

    def __init__(self, stream_id):
        self.stream_id = stream_id

    def __repr__(self):
        return "<H2WindowOpened %d>" % self.stream_id


class H2GoAway:
    """The connection is ending: the client sent GOAWAY (``remote``), or a
    connection error made us send one (then nothing more is read)."""
    __slots__ = ("code", "last_stream_id", "remote", "message")

    def __init__(self, code, last_stream_id, remote, message=""):
        self.code = code
        self.last_stream_id = last_stream_id
        self.remote = remote
        self.message = message

    def __repr__(self):
        return "<H2GoAway code=%d last=%d %s %s>" % (
            self.code, self.last_stream_id, "remote" if self.remote else "local",
            self.message)


class H2HeadersTooLarge:
    """A request head over the header-list limit (RFC 9113 §10.5.1): the
    connection answers the stream 431.  The HPACK table is intact."""
    __slots__ = ("stream_id", "end_stream")

    def __init__(self, stream_id, end_stream):
        self.stream_id = stream_id
        self.end_stream = end_stream

    def __repr__(self):
        return "<H2HeadersTooLarge %d>" % self.stream_id


# -- streams -------------------------------------------------------------------

# RFC 9113 §5.1 states a server's stream can be in (no push: no "reserved").
_H2_OPEN, _H2_HALF_CLOSED_REMOTE, _H2_HALF_CLOSED_LOCAL, _H2_CLOSED = \
    "open", "half-closed (remote)", "half-closed (local)", "closed"


class _H2StreamState:
    __slots__ = ("stream_id", "state", "send_window", "recv_window", "unacked",
                 "content_length", "received")

    def __init__(self, stream_id, send_window, recv_window):
        self.stream_id = stream_id
        self.state = _H2_OPEN
        self.send_window = send_window     # bytes we may still send (client's window)
        self.recv_window = recv_window     # bytes the client may still send us
        self.unacked = 0                   # bytes consumed but not yet granted back
        self.content_length = None         # declared content-length (§8.1.1)
        self.received = 0                  # body bytes received


# The RFC 9113 §5.1 transitions on what is received and sent: (state, event)
# -> next state.  A pair not listed changes nothing.
_H2_TRANSITIONS = {
    (_H2_OPEN, "recv END_STREAM"): _H2_HALF_CLOSED_REMOTE,
    (_H2_OPEN, "send END_STREAM"): _H2_HALF_CLOSED_LOCAL,
    (_H2_HALF_CLOSED_LOCAL, "recv END_STREAM"): _H2_CLOSED,
    (_H2_HALF_CLOSED_REMOTE, "send END_STREAM"): _H2_CLOSED,
}


class H2Protocol:
    """The server's side of one HTTP/2 connection, without I/O.

    The arguments are our settings, sent by initiate():
    SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_MAX_HEADER_LIST_SIZE and
    SETTINGS_INITIAL_WINDOW_SIZE (each stream's receive window).  A
    connection error ends the protocol: feed() returns the events so far
    and an H2GoAway, and ignores what comes after.
    """

    def __init__(self, max_concurrent_streams=100, max_header_list_size=65536,
                 initial_window_size=_H2_DEFAULT_WINDOW):
        self.max_concurrent_streams = max_concurrent_streams
        self.max_header_list_size = max_header_list_size
        self.local_window = initial_window_size   # each stream's receive window
        self.max_frame_size = _H2_MIN_FRAME_SIZE  # frames we accept (the default setting)
        # The header block bound (CONTINUATION flood, 2024): a compressed
        # block is never larger than the list it decodes to, but for
        # padding-free table size updates, so twice the list limit is room.
        self.max_block_size = 2 * max_header_list_size + 1024
        self.decoder = HPACKDecoder(max_table_size=4096,
                                    max_header_list_size=max_header_list_size)
        self.encoder = HPACKEncoder()
        self.buffer = bytearray()          # bytes received, not yet a whole frame
        self.preface_done = False          # the 24-byte client preface arrived
        self.settings_seen = False         # the client's first SETTINGS arrived
        self.out = []                      # bytes to send
        self.data_queued = 0               # DATA payload bytes in ``out``
        self.events = []                   # events of the current feed()
        self.streams = {}                  # stream id -> _H2StreamState, not closed
        self.closed_streams = collections.OrderedDict()   # id -> reset by us (bool)
        self.highest_stream_id = 0         # the last stream the client opened
        self.peer_max_frame_size = _H2_MIN_FRAME_SIZE
        self.peer_initial_window = _H2_DEFAULT_WINDOW
        self.send_window = _H2_DEFAULT_WINDOW      # connection: what we may send
        self.recv_window = _H2_DEFAULT_WINDOW      # connection: what the client may send
        self.recv_unacked = 0                      # connection bytes not yet granted back
        self.block = None                  # a header block in progress: [id, end_stream,
                                           #   fragments, size, frames, priority-ok]
        self.goaway_sent = False
        self.ended = False                 # a connection error happened: read no more
        self.flood_budget = _H2_FLOOD_BUDGET
        self.reset_budget = 2 * max_concurrent_streams   # rapid reset (CVE-2023-44487)

    def __repr__(self):
        return "<H2Protocol streams=%d highest=%d%s>" % (
            len(self.streams), self.highest_stream_id, " ended" if self.ended else "")

    # -- output ----------------------------------------------------------------

    def initiate(self):
        """RFC 9113 §3.4: the server's preface is a SETTINGS frame."""
        settings = [(H2_SETTINGS_MAX_CONCURRENT_STREAMS, self.max_concurrent_streams),
                    (H2_SETTINGS_MAX_HEADER_LIST_SIZE, self.max_header_list_size)]
        if self.local_window != _H2_DEFAULT_WINDOW:
            settings.append((H2_SETTINGS_INITIAL_WINDOW_SIZE, self.local_window))
        self.out.append(h2_frame(H2_SETTINGS, 0, 0, h2_settings_payload(settings)))

    def data_to_send(self):
        out = self.out
        if not out:
            return b""
        self.out = []
        self.data_queued = 0
        return out[0] if len(out) == 1 else b"".join(out)

    def send_headers(self, stream_id, headers, end_stream=False):
        """A HEADERS frame (and CONTINUATIONs past the client's frame size)."""
        block = self.encoder.encode(headers)
        size = self.peer_max_frame_size
        flags = H2_FLAG_END_STREAM if end_stream else 0
        if len(block) <= size:
            self.out.append(h2_frame(H2_HEADERS, flags | H2_FLAG_END_HEADERS, stream_id, block))
        else:
            self.out.append(h2_frame(H2_HEADERS, flags, stream_id, block[:size]))
            for start in range(size, len(block), size):
                last = start + size >= len(block)
                self.out.append(h2_frame(H2_CONTINUATION, H2_FLAG_END_HEADERS if last else 0,
                                         stream_id, block[start:start + size]))
        if end_stream:
            self._sent_end(stream_id)

    def send_window_for(self, stream_id):
        """Bytes of DATA the client's windows let us send on the stream now."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return 0
        return max(0, min(self.send_window, stream.send_window))

    def send_data(self, stream_id, data, end_stream=False):
        """DATA frames for ``data`` (at most send_window_for(stream_id) bytes)."""
        size = len(data)
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.send_window -= size
        self.send_window -= size
        self.data_queued += size
        step = self.peer_max_frame_size
        if size <= step:
            self.out.append(h2_frame(H2_DATA, H2_FLAG_END_STREAM if end_stream else 0,
                                     stream_id, data))
        else:
            view = memoryview(data)
            for start in range(0, size, step):
                last = start + step >= size
                self.out.append(h2_frame(
                    H2_DATA, H2_FLAG_END_STREAM if (end_stream and last) else 0,
                    stream_id, bytes(view[start:start + step])))
        if end_stream:
            self._sent_end(stream_id)

    def reset_stream(self, stream_id, code):
        """RST_STREAM (§6.4): the stream is closed; later frames on it are ignored."""
        self.out.append(h2_frame(H2_RST_STREAM, 0, stream_id, code.to_bytes(4, "big")))
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self._remember_closed(stream_id, True)
            # What the client has in flight on it still costs the connection
            # window; what it had sent and nobody will consume is given back.
            self._grant_connection(stream.unacked)

    def goaway(self, code=H2_NO_ERROR, message=""):
        """GOAWAY (§6.8) naming the last stream we will process."""
        if self.goaway_sent:
            return
        self.goaway_sent = True
        self.out.append(h2_frame(H2_GOAWAY, 0, 0,
                                 self.highest_stream_id.to_bytes(4, "big")
                                 + code.to_bytes(4, "big")
                                 + message.encode("ascii", "replace")[:256]))

    def consumed(self, stream_id, size):
        """The application took ``size`` bytes of the stream's body: give
        the window back once enough has been taken (§6.9)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.state in (_H2_HALF_CLOSED_REMOTE, _H2_CLOSED):
            return
        stream.unacked += size
        if stream.unacked * _H2_GRANT_FRACTION >= self.local_window:
            self.out.append(h2_frame(H2_WINDOW_UPDATE, 0, stream_id,
                                     stream.unacked.to_bytes(4, "big")))
            stream.recv_window += stream.unacked
            stream.unacked = 0

    def _grant_connection(self, size):
        self.recv_unacked += size
        if self.recv_unacked * _H2_GRANT_FRACTION >= _H2_DEFAULT_WINDOW:
            self.out.append(h2_frame(H2_WINDOW_UPDATE, 0, 0,
                                     self.recv_unacked.to_bytes(4, "big")))
            self.recv_window += self.recv_unacked
            self.recv_unacked = 0

    def _sent_end(self, stream_id):
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._transition(stream, "send END_STREAM")

    def _transition(self, stream, what):
        state = _H2_TRANSITIONS.get((stream.state, what), stream.state)
        stream.state = state
        if state == _H2_CLOSED:
            del self.streams[stream.stream_id]
            self._remember_closed(stream.stream_id, False)

    def _remember_closed(self, stream_id, reset_by_us):
        closed = self.closed_streams
        closed[stream_id] = reset_by_us
        if len(closed) > _H2_CLOSED_MEMORY:
            closed.popitem(last=False)

    # -- input -------------------------------------------------------------------

    def feed(self, data):
        """Take bytes from the client; return the events they make."""
        if self.ended:
            return []
        self.buffer += data
        self.events = events = []
        try:
            self._read_frames()
        except H2ConnectionError as err:
            self._connection_error(err.code, str(err))
        self.events = []
        return events

    def _connection_error(self, code, message):
        self.ended = True
        self.buffer = bytearray()
        self.goaway_sent = False
        self.goaway(code, message)
        self.events.append(H2GoAway(code, self.highest_stream_id, False, message))

    def _read_frames(self):
        buffer = self.buffer
        if not self.preface_done:
            # RFC 9113 §3.4: the client preface, then a SETTINGS frame.
            have = bytes(buffer[:len(H2_PREFACE)])
            if not H2_PREFACE.startswith(have):
                raise H2ConnectionError(H2_PROTOCOL_ERROR, "invalid connection preface")
            if len(have) < len(H2_PREFACE):
                return
            del buffer[:len(H2_PREFACE)]
            self.preface_done = True
        pos = 0
        end = len(buffer)
        limit = self.max_frame_size
        try:
            while end - pos >= 9 and not self.ended:
                size = (buffer[pos] << 16) | (buffer[pos + 1] << 8) | buffer[pos + 2]
                ftype = buffer[pos + 3]
                if size > limit:
                    # §4.2: a frame larger than SETTINGS_MAX_FRAME_SIZE.
                    raise H2ConnectionError(H2_FRAME_SIZE_ERROR,
                                            "frame of %d bytes, over %d" % (size, limit))
                if end - pos - 9 < size:
                    break
                flags = buffer[pos + 4]
                stream_id = int.from_bytes(buffer[pos + 5:pos + 9], "big") & 0x7fffffff
                payload = bytes(buffer[pos + 9:pos + 9 + size])
                pos += 9 + size
                if not self.settings_seen:
                    if ftype != H2_SETTINGS or flags & H2_FLAG_ACK:
                        raise H2ConnectionError(H2_PROTOCOL_ERROR,
                                                "the client preface must end with SETTINGS")
                    self.settings_seen = True
                try:
                    self._frame(ftype, flags, stream_id, payload)
                except H2StreamError as err:
                    self._stream_error(err.stream_id, err.code)
        finally:
            if not self.ended:
                del buffer[:pos]

    def _stream_error(self, stream_id, code):
        known = stream_id in self.streams
        self.reset_stream(stream_id, code)
        if known:
            self.events.append(H2Reset(stream_id, code, False))

    def _flood(self, what):
        self.flood_budget -= 1
        if self.flood_budget < 0:
            raise H2ConnectionError(H2_ENHANCE_YOUR_CALM, "too many %s frames" % what)

    def _frame(self, ftype, flags, stream_id, payload):
        block = self.block
        if block is not None and (ftype != H2_CONTINUATION or stream_id != block[0]):
            # §6.10: a header block is a contiguous sequence of frames.
            raise H2ConnectionError(H2_PROTOCOL_ERROR,
                                    "a header block must continue with CONTINUATION "
                                    "frames on stream %d" % block[0])
        handler = _H2_FRAME_HANDLERS.get(ftype)
        if handler is not None:
            handler(self, flags, stream_id, payload)
        # §5.5: frames of an unknown type are ignored.

    @staticmethod
    def _unpad(flags, payload):
        """§6.1, §6.2: strip Pad Length and padding; a pad as long as the
        payload is a connection error."""
        if flags & H2_FLAG_PADDED:
            if not payload:
                raise H2ConnectionError(H2_FRAME_SIZE_ERROR, "padded frame without Pad Length")
            pad = payload[0]
            if pad >= len(payload):
                raise H2ConnectionError(H2_PROTOCOL_ERROR, "padding longer than the payload")
            return payload[1:len(payload) - pad]
        return payload

    def _closed_stream(self, stream_id, ftype_name):
        """A frame for a stream that is not open: §5.1's answer."""
        if stream_id > self.highest_stream_id:
            # §5.1 idle: only HEADERS and PRIORITY are allowed.
            raise H2ConnectionError(H2_PROTOCOL_ERROR, "%s on idle stream %d"
                                    % (ftype_name, stream_id))
        reset_by_us = self.closed_streams.get(stream_id)
        if reset_by_us:
            return None     # §5.1 closed: frames after our RST_STREAM are ignored
        raise H2ConnectionError(H2_STREAM_CLOSED, "%s on closed stream %d"
                                % (ftype_name, stream_id))

    def _on_data(self, flags, stream_id, payload):
        if stream_id == 0:
            raise H2ConnectionError(H2_PROTOCOL_ERROR, "DATA on stream 0")   # §6.1
        flow = len(payload)
        # §6.9: every DATA frame counts against the connection window.
        if flow > self.recv_window:
            raise H2ConnectionError(H2_FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.recv_window -= flow
        data = self._unpad(flags, payload)
        end_stream = bool(flags & H2_FLAG_END_STREAM)
        if not data and not end_stream:
            self._flood("empty DATA")
        # The connection window comes back at once: each stream's own window
        # bounds what waits for its application (docs/http2.md).
        self._grant_connection(flow)
        stream = self.streams.get(stream_id)
        if stream is None:
            self._closed_stream(stream_id, "DATA")
            return
        if stream.state in (_H2_HALF_CLOSED_REMOTE, _H2_CLOSED):
            raise H2StreamError(stream_id, H2_STREAM_CLOSED, "DATA after END_STREAM")
        if flow > stream.recv_window:
            raise H2StreamError(stream_id, H2_FLOW_CONTROL_ERROR, "DATA beyond the stream window")
        stream.recv_window -= flow
        stream.received += len(data)
        if stream.content_length is not None and (
                stream.received > stream.content_length
                or (end_stream and stream.received != stream.content_length)):
            # §8.1.1: content-length must equal the DATA payload.
            raise H2StreamError(stream_id, H2_PROTOCOL_ERROR, "body length differs from "
                                "content-length")
        if flow != len(data):
            stream.unacked += flow - len(data)     # padding: never the application's
        if end_stream:
            self._transition(stream, "recv END_STREAM")
        self.events.append(H2Data(stream_id, data, len(data), end_stream))

    def _on_headers(self, flags, stream_id, payload):
        if stream_id == 0:
            raise H2ConnectionError(H2_PROTOCOL_ERROR, "HEADERS on stream 0")   # §6.2
        fragment = self._unpad(flags, payload)
        priority_error = False
        if flags & H2_FLAG_PRIORITY:
            if len(fragment) < 5:
                raise H2ConnectionError(H2_FRAME_SIZE_ERROR, "HEADERS too short for priority")
            depends = int.from_bytes(fragment[:4], "big") & 0x7fffffff
            priority_error = depends == stream_id     # §5.3.1: not on itself
            fragment = fragment[5:]
        self.block = [stream_id, bool(flags & H2_FLAG_END_STREAM), [fragment],
                      len(fragment), 1, priority_error]
        self._check_block()
        if flags & H2_FLAG_END_HEADERS:
            self._end_block()

    def _on_continuation(self, flags, stream_id, payload):
        block = self.block
        if block is None:
            if stream_id == 0:
                raise H2ConnectionError(H2_PROTOCOL_ERROR, "CONTINUATION on stream 0")
            raise H2ConnectionError(H2_PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        if not payload:
            self._flood("empty CONTINUATION")
        block[2].append(payload)
        block[3] += len(payload)
        block[4] += 1
        self._check_block()
        if flags & H2_FLAG_END_HEADERS:
            self._end_block()

    def _check_block(self):
        """CONTINUATION floods (2024): a block is bounded in bytes and frames,
        and past the bound cannot be decoded, so the connection ends."""
        block = self.block
        if block[3] > self.max_block_size or block[4] > _H2_BLOCK_FRAMES:
            raise H2ConnectionError(H2_ENHANCE_YOUR_CALM,
                                    "header block over %d bytes or %d frames"
                                    % (self.max_block_size, _H2_BLOCK_FRAMES))

    def _end_block(self):
        stream_id, end_stream, fragments, _size, _frames, priority_error = self.block
        self.block = None
        too_large = False
        try:
            headers = self.decoder.decode(b"".join(fragments))
        except HeaderListTooLarge:
            too_large = True
            headers = None
        except HPACKError as exc:
            # RFC 9113 §4.3: a block that cannot be decoded ends the connection.
            raise H2ConnectionError(H2_COMPRESSION_ERROR, "HPACK: %s" % exc)
        try:
            self._open_stream(stream_id, headers, end_stream, too_large, priority_error)
        except H2StreamError as err:
            if err.stream_id == 0:      # from the field checks: this stream's
                raise H2StreamError(stream_id, err.code, str(err))
            raise

    def _open_stream(self, stream_id, headers, end_stream, too_large, priority_error):
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._trailers(stream, headers, end_stream, too_large)
            return
        if stream_id <= self.highest_stream_id:
            if stream_id in self.closed_streams:
                if self.closed_streams[stream_id]:
                    return       # reset by us: ignored (§5.1), the block was decoded
                raise H2ConnectionError(H2_STREAM_CLOSED,
                                        "HEADERS on closed stream %d" % stream_id)
            # §5.1.1: a new stream's identifier must be larger than all before.
            raise H2ConnectionError(H2_PROTOCOL_ERROR, "stream %d is lower than stream %d"
                                    % (stream_id, self.highest_stream_id))
        if stream_id % 2 == 0:
            # §5.1.1: clients open odd-numbered streams.
            raise H2ConnectionError(H2_PROTOCOL_ERROR, "even stream %d from a client"
                                    % stream_id)
        if self.goaway_sent:
            return               # §6.8: streams after our GOAWAY are ignored
        self.highest_stream_id = stream_id
        self.flood_budget = min(_H2_FLOOD_BUDGET, self.flood_budget + _H2_FLOOD_REFILL)
        if priority_error:
            self._remember_closed(stream_id, True)
            self.reset_stream(stream_id, H2_PROTOCOL_ERROR)
            return
        if len(self.streams) >= self.max_concurrent_streams:
            # §5.1.2: past SETTINGS_MAX_CONCURRENT_STREAMS: REFUSED_STREAM.
            self._remember_closed(stream_id, True)
            self.reset_stream(stream_id, H2_REFUSED_STREAM)
            return
        stream = self.streams[stream_id] = _H2StreamState(
            stream_id, self.peer_initial_window, self.local_window)
        if end_stream:
            self._transition(stream, "recv END_STREAM")
        if too_large:
            self.events.append(H2HeadersTooLarge(stream_id, end_stream))
            return
        head, stream.content_length = h2_request_head(headers)
        if end_stream and stream.content_length:
            raise H2StreamError(stream_id, H2_PROTOCOL_ERROR,
                                "content-length without DATA")
        self.events.append(H2Request(stream_id, head, end_stream))

    def _trailers(self, stream, headers, end_stream, too_large):
        """A second header block on an open stream: trailers (§8.1)."""
        stream_id = stream.stream_id
        if stream.state in (_H2_HALF_CLOSED_REMOTE, _H2_CLOSED):
            raise H2StreamError(stream_id, H2_STREAM_CLOSED, "HEADERS after END_STREAM")
        if not end_stream:
            raise H2StreamError(stream_id, H2_PROTOCOL_ERROR,
                                "trailers without END_STREAM")
        if too_large:
            raise H2StreamError(stream_id, H2_PROTOCOL_ERROR, "trailers over the limit")
        fields = []
        for name, value in headers:
            if name[:1] == b":":
                raise H2StreamError(stream_id, H2_PROTOCOL_ERROR,
                                    "pseudo-header field in trailers")
            _h2_check_field(name, value)
            fields.append((name, value))
        if stream.content_length is not None and stream.received != stream.content_length:
            raise H2StreamError(stream_id, H2_PROTOCOL_ERROR,
                                "body length differs from content-length")
        self._transition(stream, "recv END_STREAM")
        self.events.append(H2Trailers(stream_id, fields))

    def _on_priority(self, flags, stream_id, payload):
        if stream_id == 0:
            raise H2ConnectionError(H2_PROTOCOL_ERROR, "PRIORITY on stream 0")   # §6.3
        if len(payload) != 5:
            raise H2StreamError(stream_id, H2_FRAME_SIZE_ERROR, "PRIORITY of %d bytes"
                                % len(payload))
        self._flood("PRIORITY")
        if int.from_bytes(payload[:4], "big") & 0x7fffffff == stream_id:
            raise H2StreamError(stream_id, H2_PROTOCOL_ERROR, "stream depends on itself")
        # RFC 9113 §5.3.2: priority signals may be ignored, and are.

    def _on_rst_stream(self, flags, stream_id, payload):
        if stream_id == 0:
            raise H2ConnectionError(H2_PROTOCOL_ERROR, "RST_STREAM on stream 0")  # §6.4
        if len(payload) != 4:
            raise H2ConnectionError(H2_FRAME_SIZE_ERROR, "RST_STREAM of %d bytes"
                                    % len(payload))
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            if stream_id > self.highest_stream_id:
                raise H2ConnectionError(H2_PROTOCOL_ERROR, "RST_STREAM on idle stream %d"
                                        % stream_id)
            return
        self._remember_closed(stream_id, False)
        self._grant_connection(stream.unacked)
        # Rapid reset (CVE-2023-44487): each reset of a stream still open
        # costs the budget; each stream that completes earns one back.
        self.reset_budget -= 1
        self.events.append(H2Reset(stream_id, int.from_bytes(payload, "big"), True))
        if self.reset_budget < 0:
            raise H2ConnectionError(H2_ENHANCE_YOUR_CALM, "too many streams reset")

    def stream_completed(self):
        """The connection says a stream ended normally: rapid reset credit."""
        self.reset_budget = min(2 * self.max_concurrent_streams, self.reset_budget + 1)

    def _on_settings(self, flags, stream_id, payload):
        if stream_id != 0:
            raise H2ConnectionError(H2_PROTOCOL_ERROR, "SETTINGS on stream %d" % stream_id)
        if flags & H2_FLAG_ACK:
            if payload:
                raise H2ConnectionError(H2_FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise H2ConnectionError(H2_FRAME_SIZE_ERROR, "SETTINGS of %d bytes" % len(payload))
        self._flood("SETTINGS")
        opened = False
        for pos in range(0, len(payload), 6):
            ident = int.from_bytes(payload[pos:pos + 2], "big")
            value = int.from_bytes(payload[pos + 2:pos + 6], "big")
            if ident == H2_SETTINGS_HEADER_TABLE_SIZE:
                self.encoder.set_max_table_size(min(value, 4096))
            elif ident == H2_SETTINGS_ENABLE_PUSH:
                if value > 1:
                    raise H2ConnectionError(H2_PROTOCOL_ERROR, "ENABLE_PUSH must be 0 or 1")
            elif ident == H2_SETTINGS_INITIAL_WINDOW_SIZE:
                if value > _H2_MAX_WINDOW:
                    raise H2ConnectionError(H2_FLOW_CONTROL_ERROR,
                                            "INITIAL_WINDOW_SIZE over 2^31-1")
                # §6.9.2: the change applies to every stream's window.
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > _H2_MAX_WINDOW:
                        raise H2ConnectionError(H2_FLOW_CONTROL_ERROR,
                                                "a stream window over 2^31-1")
                opened = opened or delta > 0
            elif ident == H2_SETTINGS_MAX_FRAME_SIZE:
                if not _H2_MIN_FRAME_SIZE <= value <= _H2_MAX_FRAME_SIZE:
                    raise H2ConnectionError(H2_PROTOCOL_ERROR,
                                            "MAX_FRAME_SIZE out of range: %d" % value)
                self.peer_max_frame_size = value
            # Other settings (MAX_CONCURRENT_STREAMS: we open none;
            # MAX_HEADER_LIST_SIZE: advisory) and unknown ones are ignored.
        self.out.append(h2_frame(H2_SETTINGS, H2_FLAG_ACK, 0))     # §6.5.3
        if opened:
            self.events.append(H2WindowOpened(0))

    def _on_push_promise(self, flags, stream_id, payload):
        # §8.4: a client cannot push.
        raise H2ConnectionError(H2_PROTOCOL_ERROR, "PUSH_PROMISE from a client")

    def _on_ping(self, flags, stream_id, payload):
        if stream_id != 0:
            raise H2ConnectionError(H2_PROTOCOL_ERROR, "PING on stream %d" % stream_id)
        if len(payload) != 8:
            raise H2ConnectionError(H2_FRAME_SIZE_ERROR, "PING of %d bytes" % len(payload))
        if not flags & H2_FLAG_ACK:
            self._flood("PING")
            self.out.append(h2_frame(H2_PING, H2_FLAG_ACK, 0, payload))   # §6.7

    def _on_goaway(self, flags, stream_id, payload):
        if stream_id != 0:
            raise H2ConnectionError(H2_PROTOCOL_ERROR, "GOAWAY on stream %d" % stream_id)
        if len(payload) < 8:
            raise H2ConnectionError(H2_FRAME_SIZE_ERROR, "GOAWAY of %d bytes" % len(payload))
        self.events.append(H2GoAway(int.from_bytes(payload[4:8], "big"),
                                    int.from_bytes(payload[:4], "big") & 0x7fffffff, True,
                                    payload[8:].decode("ascii", "replace")))

    def _on_window_update(self, flags, stream_id, payload):
        if len(payload) != 4:
            raise H2ConnectionError(H2_FRAME_SIZE_ERROR, "WINDOW_UPDATE of %d bytes"
                                    % len(payload))
        increment = int.from_bytes(payload, "big") & 0x7fffffff
        if stream_id == 0:
            if increment == 0:
                raise H2ConnectionError(H2_PROTOCOL_ERROR, "WINDOW_UPDATE of 0")  # §6.9
            self.send_window += increment
            if self.send_window > _H2_MAX_WINDOW:
                raise H2ConnectionError(H2_FLOW_CONTROL_ERROR,
                                        "connection window over 2^31-1")    # §6.9.1
            self.events.append(H2WindowOpened(0))
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.highest_stream_id:
                raise H2ConnectionError(H2_PROTOCOL_ERROR, "WINDOW_UPDATE on idle stream %d"
                                        % stream_id)
            return      # §5.1: a closed stream may still get one
        if increment == 0:
            raise H2StreamError(stream_id, H2_PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        stream.send_window += increment
        if stream.send_window > _H2_MAX_WINDOW:
            raise H2StreamError(stream_id, H2_FLOW_CONTROL_ERROR, "stream window over 2^31-1")
        self.events.append(H2WindowOpened(stream_id))


_H2_FRAME_HANDLERS = {
    H2_DATA: H2Protocol._on_data,
    H2_HEADERS: H2Protocol._on_headers,
    H2_PRIORITY: H2Protocol._on_priority,
    H2_RST_STREAM: H2Protocol._on_rst_stream,
    H2_SETTINGS: H2Protocol._on_settings,
    H2_PUSH_PROMISE: H2Protocol._on_push_promise,
    H2_PING: H2Protocol._on_ping,
    H2_GOAWAY: H2Protocol._on_goaway,
    H2_WINDOW_UPDATE: H2Protocol._on_window_update,
    H2_CONTINUATION: H2Protocol._on_continuation,
}


def _h2_check_field(name, value):
    """RFC 9113 §8.2.1, §8.2.2: what makes a field malformed in HTTP/2."""
    if _LOWER_TOKEN.fullmatch(name) is None:
        raise H2StreamError(0, H2_PROTOCOL_ERROR, "invalid field name %r" % name)
    if value and _H2_FIELD_VALUE_BAD.search(value):
        raise H2StreamError(0, H2_PROTOCOL_ERROR, "invalid value for %r" % name)
    if name in _H2_CONNECTION_FIELDS:
        raise H2StreamError(0, H2_PROTOCOL_ERROR, "connection-specific field %r" % name)
    if name == b"te" and value != b"trailers":
        raise H2StreamError(0, H2_PROTOCOL_ERROR, "te other than trailers")


def h2_request_head(headers):
    """RFC 9113 §8.3.1: a decoded request header list -> (a RequestHead of
    section 4 with ``http_version`` "2", the declared content-length or None).  Pseudo-header fields come
    first, once each, only the four of a request; :method, :scheme and a
    non-empty :path are required (CONNECT is refused: no tunnels here).
    PAGI "HTTP/2 Stream Mapping": the pseudo-headers are removed and
    :authority becomes the host header.  Malformed: H2StreamError
    PROTOCOL_ERROR (§8.1.1), its stream id 0 for the caller to fill in."""
    pseudo = {}
    fields = []
    cookies = []
    content_length = None
    accept = None
    for name, value in headers:
        if name[:1] == b":":
            if fields or cookies:
                raise H2StreamError(0, H2_PROTOCOL_ERROR, "pseudo-header after a field")
            if name not in _H2_REQUEST_PSEUDO:
                raise H2StreamError(0, H2_PROTOCOL_ERROR, "unknown pseudo-header %r" % name)
            if name in pseudo:
                raise H2StreamError(0, H2_PROTOCOL_ERROR, "repeated pseudo-header %r" % name)
            pseudo[name] = value
            continue
        _h2_check_field(name, value)
        if name == b"cookie":
            cookies.append(value)      # §8.2.3: crumbs are joined again below
            continue
        if name == b"content-length":
            if content_length is not None or not value.isdigit() or \
                    len(value.lstrip(b"0")) > _MAX_LENGTH_DIGITS:
                raise H2StreamError(0, H2_PROTOCOL_ERROR, "invalid content-length")
            content_length = int(value)
        elif name == b"accept":
            # For Server.exchange_kind, as section 4 gathers it.
            accept = value if accept is None else accept + b", " + value
        elif name == b"host":
            continue                   # :authority wins (below); else kept
        fields.append((name, value))
    method = pseudo.get(b":method")
    scheme = pseudo.get(b":scheme")
    path = pseudo.get(b":path")
    authority = pseudo.get(b":authority")
    if method == b"CONNECT":
        raise H2StreamError(0, H2_PROTOCOL_ERROR, "CONNECT is not supported")
    if not method or scheme is None or not path:
        raise H2StreamError(0, H2_PROTOCOL_ERROR,
                            "missing :method, :scheme or :path")
    if not _TOKEN.fullmatch(method):
        raise H2StreamError(0, H2_PROTOCOL_ERROR, "invalid :method")
    if _TARGET_BAD.search(path) or not (path[:1] == b"/" or (path == b"*" and
                                                               method == b"OPTIONS")):
        raise H2StreamError(0, H2_PROTOCOL_ERROR, "invalid :path")
    if authority is not None and (b"@" in authority or not _HOST.fullmatch(authority)):
        raise H2StreamError(0, H2_PROTOCOL_ERROR, "invalid :authority")
    if authority is None:
        for name, value in headers:
            if name == b"host":
                authority = value      # §8.3.1: Host when :authority is absent
                break
    if authority is not None:
        fields.append((b"host", authority))
    if cookies:
        fields.append((b"cookie", b"; ".join(cookies)))
    head = RequestHead(_METHODS.get(method) or method.decode("ascii"), path, "2", fields)
    raw_path, _, query = path.partition(b"?")
    head.path = raw_path
    head.query_string = query
    head.authority = authority
    head.keep_alive = True
    head.content_length = content_length or 0
    head.accept = accept
    return head, content_length


# ============================================================================
# 5. Byte streams, outgoing buffer and flow control (PAGI "Transport Flow
#    Control"; PAGI tls extension; RFC 8446, RFC 7301 for ALPN)
#
# A byte stream is the one thing above the socket: SocketStream for a plain
# TCP or Unix socket, TLSStream for one wrapped by the ssl module.  Both
# offer the same small interface (SocketStream's attribute block lists it),
# and nothing above this section calls recv, send, sendmsg or sendfile.
#
# Before you edit: SocketStream binds the socket's own methods as its
# attributes, so the plain path costs no Python frame per call (E1 counts
# instructions per request: bench/instructions.py).
#
# Every byte accepted for a client and not yet written to its stream is
# counted in Transport.buffered_amount().  A write goes straight to the
# stream while the buffer is empty and queues only what the kernel did not
# take.  The watermarks work as asyncio's _FlowControlMixin: crossing up to
# the high mark fires on_high_water and makes send() suspend; falling below
# the low mark fires on_drain and resumes the suspended sends.  File bodies
# queue as (file, offset, length) slices and go out with os.sendfile, or by
# positional reads where sendfile cannot be used (TLS, a file without a
# descriptor): a file is never read whole into memory, and its bytes count
# against the same watermarks.  Over TLS the counts are of the application's
# bytes (plaintext), as on a plain socket.
# ============================================================================

_SENDFILE_MAX = 1 << 21    # bytes per os.sendfile call
_READ_CHUNK = 1 << 16      # bytes per read when sendfile is not available
_IOV_MAX = 64              # buffers per sendmsg call
_TLS_WRITE_MAX = 1 << 16   # plaintext bytes joined for one TLS send_many


def _address(family, address):
    """A socket address as the scope's ``client``/``server`` want it:
    [host, port] for IPv4 and IPv6 (the flow and scope ids dropped), the
    path for a Unix socket (PAGI: ``server`` is [path, None] there), None
    when there is none (an unnamed Unix socket)."""
    if family in (socket.AF_INET, socket.AF_INET6):
        return (address[0], address[1])
    if family == getattr(socket, "AF_UNIX", None):
        if isinstance(address, bytes):
            address = address.decode("utf-8", "surrogateescape")
        return (address, None) if address else None
    return None


class SocketStream:
    """A connected, non-blocking plain socket: TCP or Unix."""

    # The interface.  The callables are set per instance: here the socket's
    # own bound methods, in TLSStream its Python ones.
    fd = -1                 # the descriptor, for the reactor
    peer_address = None     # (host, port), (path, None) or None: scope["client"]
    local_address = None    # the same for our end: scope["server"]
    recv = None             # recv(size) -> bytes, b"" at the peer's end;
                            #   BlockingIOError: nothing now; other OSError: failed
    send = None             # send(data) -> bytes taken (maybe fewer); BlockingIOError
    send_many = None        # send_many(buffers) -> the same, for a list (one sendmsg)
    sendfile = None         # None, or sendfile(in_fd, offset, count) -> bytes sent
    scheme_secure = False   # "http"/"ws", not "https"/"wss"
    tls = None              # the tls scope extension's dict (PAGI tls: never on cleartext)

    def __init__(self, sock, peer=None):
        self.sock = sock
        self.fd = sock.fileno()
        family = sock.family
        self.local_address = _address(family, sock.getsockname())
        self.peer_address = _address(family, peer if peer is not None else sock.getpeername())
        # The socket's own methods, bound: no Python frame on the hot path.
        self.recv = sock.recv
        self.send = sock.send
        self.send_many = sock.sendmsg
        if hasattr(os, "sendfile"):
            self.sendfile = functools.partial(os.sendfile, self.fd)

    def __repr__(self):
        return "<%s fd=%d peer=%r>" % (type(self).__name__, self.fd, self.peer_address)

    def peek(self, size):
        """Up to ``size`` bytes that have arrived, left for the next recv
        (section 6a reads a new connection's first bytes this way)."""
        return self.sock.recv(size, socket.MSG_PEEK)

    def has_bytes(self):
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK))
        except OSError:
            return False      # nothing (BlockingIOError), or a reset: not busy

    def shutdown_write(self):
        self.sock.shutdown(socket.SHUT_WR)

    def close(self):
        self.sock.close()


class TLSStream(SocketStream):
    """A non-blocking ssl.SSLSocket (wrapped with do_handshake_on_connect
    off).  The handshake runs inside the first recv(), in the reactor:
    until it is done, recv() raises BlockingIOError, so the connection above
    simply waits for bytes -- under its header_timeout, which therefore
    also bounds a client that stalls in the handshake.  An ssl.SSLSocket has
    no sendmsg (NotImplementedError) and no sendfile: send_many joins the
    buffers and file bodies go by reads (sendfile None)."""

    scheme_secure = True

    def __init__(self, sock, loop, server_cert=None, peer=None):
        SocketStream.__init__(self, sock, peer)
        self.loop = loop
        self.server_cert = server_cert   # PEM, for the tls extension
        self.handshaken = False
        self.tls = None            # set when the handshake completes
        self.recv = self._recv     # instance attributes of SocketStream, replaced
        self.send = self._send
        self.send_many = self._send_many
        self.sendfile = None

    def _handshake(self):
        """One step of the handshake: True once it is complete."""
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLWantWriteError:
            # The kernel has no room for our flight: go on when it has.
            # (Nothing else writes before the handshake ends.)
            self.loop.add_writer(self.fd, self._writable_in_handshake)
            return False
        self.handshaken = True
        self.tls = _tls_extension(self.sock, self.server_cert)
        return True

    def _writable_in_handshake(self):
        self.loop.remove_writer(self.fd)
        try:
            self._handshake()
        except OSError:
            pass    # the next recv() meets the same failure and reports it

    def _recv(self, size):
        if not self.handshaken and not self._handshake():
            raise BlockingIOError("TLS handshake in progress")
        sock = self.sock
        chunks = []
        got = 0
        # One SSL read returns at most one record (16 KiB).  Read on while
        # the ssl object holds decrypted bytes (pending()): they would wait
        # for a readable event that may never come.
        while got < size:
            try:
                data = sock.recv(size - got)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                # (TODO-GAP: a read that wants to write -- a TLS 1.3
                # KeyUpdate meeting a full kernel buffer -- is retried on
                # the next readable event, not on writability.)
                break
            except ssl.SSLZeroReturnError:
                data = b""
            if not data:
                if chunks:
                    break          # the end comes on the next call
                return b""
            chunks.append(data)
            got += len(data)
            if not sock.pending():
                break
        if not chunks:
            raise BlockingIOError("no TLS record complete yet")
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _send(self, data):
        """Plaintext bytes taken.  With a partial write (the kernel full
        after some records), the ssl object keeps no half-written record
        of ours: Python sets SSL_MODE_ENABLE_PARTIAL_WRITE and
        ACCEPT_MOVING_WRITE_BUFFER, and the Transport offers the same
        bytes again from where this count ends."""
        sock = self.sock
        total = 0
        size = len(data)
        view = memoryview(data)
        while total < size:
            try:
                sent = sock.send(view[total:])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                if total:
                    break
                raise BlockingIOError("TLS stream full")
            if not sent:
                break
            total += sent
        return total

    def _send_many(self, buffers):
        """The leading buffers joined, up to about _TLS_WRITE_MAX bytes: the
        same bytes from the same start on a retry, as SSL_write wants."""
        parts = []
        size = 0
        for buffer in buffers:
            parts.append(buffer)
            size += len(buffer)
            if size >= _TLS_WRITE_MAX:
                break
        return self._send(b"".join(parts))

    def has_bytes(self):
        if self.sock.pending():
            return True
        try:
            return bool(socket.socket.recv(self.sock, 1, socket.MSG_PEEK))
        except OSError:
            return False

    def shutdown_write(self):
        """Our close_notify (RFC 8446 §6.1), then the TCP half-close."""
        if self.handshaken:
            try:
                self.sock.unwrap()
            except (ssl.SSLError, OSError, ValueError):
                pass    # sent, or the peer is gone: the half-close follows
        socket.socket.shutdown(self.sock, socket.SHUT_WR)


def _with_tls(extensions, stream):
    """PAGI tls §When to use this extension: ``tls`` on a TLS connection,
    never on a cleartext one.  Each scope gets its own copy."""
    if stream.tls is not None:
        tls = dict(stream.tls)
        tls["client_cert_chain"] = list(tls["client_cert_chain"])
        extensions["tls"] = tls
    return extensions


# TLS 1.2 and 1.3 cipher suites by OpenSSL name -> IANA number (RFC 8446
# §B.4, RFC 5289, RFC 7905), for the tls extension's cipher_suite: the ssl
# module reports only the name.  A suite not listed is reported as None, as
# the extension allows ("cannot determine").
_CIPHER_SUITES = {
    "TLS_AES_128_GCM_SHA256": 0x1301, "TLS_AES_256_GCM_SHA384": 0x1302,
    "TLS_CHACHA20_POLY1305_SHA256": 0x1303, "TLS_AES_128_CCM_SHA256": 0x1304,
    "TLS_AES_128_CCM_8_SHA256": 0x1305,
    "ECDHE-ECDSA-AES128-GCM-SHA256": 0xC02B, "ECDHE-ECDSA-AES256-GCM-SHA384": 0xC02C,
    "ECDHE-RSA-AES128-GCM-SHA256": 0xC02F, "ECDHE-RSA-AES256-GCM-SHA384": 0xC030,
    "ECDHE-RSA-CHACHA20-POLY1305": 0xCCA8, "ECDHE-ECDSA-CHACHA20-POLY1305": 0xCCA9,
    "DHE-RSA-AES128-GCM-SHA256": 0x009E, "DHE-RSA-AES256-GCM-SHA384": 0x009F,
    "DHE-RSA-CHACHA20-POLY1305": 0xCCAA,
    "ECDHE-ECDSA-AES128-SHA256": 0xC023, "ECDHE-ECDSA-AES256-SHA384": 0xC024,
    "ECDHE-RSA-AES128-SHA256": 0xC027, "ECDHE-RSA-AES256-SHA384": 0xC028,
    "AES128-GCM-SHA256": 0x009C, "AES256-GCM-SHA384": 0x009D,
}
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def _rfc4514(subject):
    """RFC 4514 §2: the RDNs of a DN from the last to the first, ',' between
    them, '+' inside a multi-valued one, and the special characters escaped
    (§2.4).  ``subject`` is getpeercert()'s tuple of RDNs, in certificate
    order.  Types outside §3's table keep the ssl module's long name
    (``emailAddress``), as OpenSSL's own RFC 2253 output does, rather than
    the dotted OID the RFC asks for: the ssl module does not give the OID."""
    short = {"commonName": "CN", "localityName": "L", "stateOrProvinceName": "ST",
             "organizationName": "O", "organizationalUnitName": "OU",
             "countryName": "C", "streetAddress": "STREET", "domainComponent": "DC",
             "userId": "UID"}

    def escape(value):
        out = []
        for i, ch in enumerate(value):
            if ch in ',+"\\<>;' or (ch == "#" and i == 0) or (
                    ch == " " and i in (0, len(value) - 1)):
                out.append("\\" + ch)
            elif ch == "\0":
                out.append("\\00")
            else:
                out.append(ch)
        return "".join(out)

    return ",".join("+".join("%s=%s" % (short.get(k, k), escape(v)) for k, v in rdn)
                    for rdn in reversed(subject))


def _tls_extension(sock, server_cert):
    """PAGI tls §TLS Connection Scope: the ``tls`` extension of a finished
    handshake.  The chain is the leaf only: the ssl module of CPython before
    3.13 gives no access to the rest of what the client sent."""
    chain = []
    name = None
    der = sock.getpeercert(binary_form=True)
    if der:
        chain.append(ssl.DER_cert_to_PEM_cert(der))
        info = sock.getpeercert()     # empty when the certificate was not verified
        if info and info.get("subject"):
            name = _rfc4514(info["subject"])
    cipher = sock.cipher()
    return {
        "server_cert": server_cert,
        "client_cert_chain": chain,
        "client_cert_name": name,
        # With ssl_cert_reqs 1 or 2 a certificate that fails verification
        # fails the handshake: an open connection has none to report.
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(sock.version()),
        "cipher_suite": _CIPHER_SUITES.get(cipher[0]) if cipher else None,
    }


def tls_context(config):
    """The server's ssl.SSLContext from the ssl_* fields of ``config``, or
    None without ssl_certfile.  Raises ConfigError naming the field that
    cannot be used.  One context serves every connection (and every worker:
    each builds it from the same Config)."""
    if not config.ssl_certfile:
        return None
    if ssl is None:
        raise ConfigError("ssl_certfile: this Python has no ssl module")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # RFC 8996: TLS 1.0 and 1.1 "MUST NOT be used"; 1.2 is the floor.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile,
                                config.ssl_keyfile_password)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("ssl_certfile/ssl_keyfile %s: cannot load the certificate "
                          "and key: %s" % (config.ssl_certfile, exc))
    context.verify_mode = {0: ssl.CERT_NONE, 1: ssl.CERT_OPTIONAL,
                           2: ssl.CERT_REQUIRED}[config.ssl_cert_reqs]
    if config.ssl_ca_certs:
        try:
            context.load_verify_locations(config.ssl_ca_certs)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("ssl_ca_certs %s: %s" % (config.ssl_ca_certs, exc))
    if config.ssl_ciphers:
        try:
            context.set_ciphers(config.ssl_ciphers)
        except ssl.SSLError as exc:
            raise ConfigError("ssl_ciphers %r: %s" % (config.ssl_ciphers, exc))
    # RFC 7301: ALPN; RFC 9113 §3.2: "h2" is HTTP/2 over TLS (section 6a).
    context.set_alpn_protocols(["h2", "http/1.1"] if config.http2 else ["http/1.1"])
    return context


def server_certificate(path):
    """The first PEM certificate of ssl_certfile (the server's own, the
    chain follows it): the tls extension's server_cert.  None if unreadable."""
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    try:
        with open(path, "r", encoding="ascii", errors="replace") as f:
            text = f.read()
        start = text.index(begin)
        return text[start:text.index(end, start) + len(end)] + "\n"
    except (OSError, ValueError):
        return None


class _FileSlice:
    """``remaining`` bytes of ``file`` from ``offset``, queued for the socket."""

    __slots__ = ("file", "fd", "offset", "remaining", "owned", "future")

    def __init__(self, file, offset, remaining, owned):
        self.file = file            # a binary file object
        self.fd = None              # its descriptor, if it has one
        try:
            self.fd = file.fileno()
        except (AttributeError, OSError, ValueError):
            pass
        self.offset = offset
        self.remaining = remaining
        self.owned = owned          # True for "file" (we close it), not "fh"
        self.future = None          # resolved when the slice has been written

    def __len__(self):
        return self.remaining

    def finish(self):
        if self.owned:
            self.file.close()
        if self.future is not None and not self.future.done():
            self.future.set_result(None)

    def read(self, size):
        if self.fd is not None:
            return os.pread(self.fd, size, self.offset)
        self.file.seek(self.offset)
        return self.file.read(size)


class _Watermarks:
    """The spec's half of a ``pagi.transport`` (PAGI "Transport Flow
    Control"): the two marks, the callbacks on their edges, and the Future
    send() returns while the count is above the high one.  A subclass
    counts the bytes (buffered_amount), holds ``_loop``, and calls _rose()
    and _fell() when its count crosses a mark: Transport for a socket,
    H2StreamTransport (section 6a) for an HTTP/2 stream."""

    def __init__(self, loop, high, low):
        self._loop = loop
        self._high = high                 # bytes: the high-water mark
        self._low = low                   # bytes: the low-water mark
        self._above = False               # high edge seen, drain edge not yet
        self._high_callbacks = []         # on_high_water registrations
        self._drain_callbacks = []        # on_drain registrations
        self._drain_waiters = []          # send() Futures waiting for the drain
        self.high_water_events = 0        # times the high edge was crossed

    # -- the spec's interface --------------------------------------------------

    def high_water_mark(self):
        return self._high

    def low_water_mark(self):
        return self._low

    def on_high_water(self, callback):
        self._high_callbacks.append(callback)
        if self.buffered_amount() >= self._high:
            self._call(callback)

    def on_drain(self, callback):
        self._drain_callbacks.append(callback)

    def forget_callbacks(self):
        """Between requests: callbacks are registered per request."""
        self._high_callbacks = []
        self._drain_callbacks = []

    # -- the edges ----------------------------------------------------------------

    def suspend(self):
        """What send() returns: done, or pending until the drain edge."""
        if not self._above or self.closed:
            return _NO_WAIT
        waiter = Future(self._loop)
        self._drain_waiters.append(waiter)
        return waiter

    def _rose(self):
        """The count reached the high mark."""
        self._above = True
        self.high_water_events += 1
        for callback in list(self._high_callbacks):
            self._call(callback)

    def _fell(self):
        """The count went below the low mark: callbacks, then suspended sends."""
        self._above = False
        for callback in list(self._drain_callbacks):
            self._call(callback)
        self._wake_waiters()

    def _wake_waiters(self):
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _call(self, callback):
        try:
            callback()
        except Exception:
            self._loop.log.error("error in a pagi.transport callback %r\n%s",
                                 callback, traceback.format_exc().rstrip())


class Transport(_Watermarks):
    """``scope["pagi.transport"]``: the counted outgoing buffer of a socket.

    The spec's methods are buffered_amount, high_water_mark, low_water_mark,
    on_high_water and on_drain; the rest is the server's side of it.
    """

    def __init__(self, stream, loop, high, low, on_error, limit=0):
        _Watermarks.__init__(self, loop, high, low)
        self._stream = stream             # the byte stream (SocketStream, TLSStream)
        self._fd = stream.fd
        self._limit = limit               # bytes: the hard limit (0: none)
        self._queue = collections.deque()  # bytes, memoryview or _FileSlice
        self._buffered = 0                # bytes in _queue
        self._flush_waiters = []          # callbacks for "buffer empty"
        self.on_error = on_error          # on_error(OSError) when a write fails
        self._sendfile = stream.sendfile  # None: file bodies go by reads
        self.closed = False               # nothing more will be written
        self.last_progress = loop.now     # when bytes last left the buffer
        self.bytes_queued = 0             # bytes ever given to write/write_file
        self.bytes_written = 0            # bytes ever taken by the kernel

    def __repr__(self):
        return "<Transport fd=%d buffered=%d high-water-events=%d%s%s>" % (
            self._fd, self._buffered, self.high_water_events,
            " above-high" if self._above else "", " closed" if self.closed else "")

    # -- the spec's interface --------------------------------------------------

    def buffered_amount(self):
        return self._buffered

    # -- writing ----------------------------------------------------------------

    def write(self, data):
        """Queue bytes for the socket, writing at once what the kernel takes."""
        if self.closed or not data:
            return
        self.bytes_queued += len(data)
        if self._above and self._limit and self._buffered > self._limit:
            # A writer that does not wait for the drain (a send() not
            # awaited): the watermarks cannot hold it, so the connection
            # goes (PAGI reason queue_overflow) rather than the memory.
            self._fail(BufferError("%d bytes queued for the client, over the limit of %d"
                                   % (self._buffered, self._limit)))
            return
        if not self._queue:
            try:
                sent = self._stream.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail(exc)
                return
            if sent:
                self.last_progress = self._loop.now
                self.bytes_written += sent
                if sent == len(data):
                    return
            data = memoryview(data)[sent:]
            self._loop.add_writer(self._fd, self._on_writable)
        self._queue.append(data)
        self._grew(len(data))

    def write_file(self, file, offset, length, owned):
        """Queue a file slice; the returned Future resolves once it is sent."""
        item = _FileSlice(file, offset, length, owned)
        item.future = Future(self._loop)
        if self.closed or length == 0:
            item.finish()
            return item.future
        self.bytes_queued += length
        was_empty = not self._queue
        self._queue.append(item)
        self._grew(length)
        if was_empty:
            self._loop.add_writer(self._fd, self._on_writable)
            self._on_writable()
        return item.future

    def when_flushed(self, callback):
        """callback() once every queued byte has been written (now, if so)."""
        if not self._queue:
            callback()
        else:
            self._flush_waiters.append(callback)

    def _grew(self, size):
        self._buffered += size
        if not self._above and self._buffered >= self._high:
            self._rose()

    def _shrank(self, size):
        self._buffered -= size
        if self._above and self._buffered < self._low:
            self._fell()

    def _on_writable(self):
        queue = self._queue
        stream = self._stream
        try:
            while queue:
                item = queue[0]
                if item.__class__ is _FileSlice:
                    if not self._write_file_slice(item):
                        break
                    continue
                if len(queue) > 1 and len(item) < 65536:
                    # Gather small buffers into one sendmsg, up to a file slice.
                    parts = []
                    for part in queue:
                        if part.__class__ is _FileSlice or len(parts) == _IOV_MAX:
                            break
                        parts.append(part)
                    offered = sum(map(len, parts))
                    sent = stream.send_many(parts)
                else:
                    offered = len(item)
                    sent = stream.send(item)
                if sent:
                    self.last_progress = self._loop.now
                    self.bytes_written += sent
                    self._consume(sent)
                if sent < offered:
                    break   # the kernel took less than offered: it is full
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._fail(exc)
            return
        if not queue and not self.closed:
            self._loop.remove_writer(self._fd)
            waiters, self._flush_waiters = self._flush_waiters, []
            for callback in waiters:
                callback()

    def _consume(self, sent):
        queue = self._queue
        left = sent
        while left:
            item = queue[0]
            size = len(item)
            if size <= left:
                queue.popleft()
                left -= size
            else:
                queue[0] = memoryview(item)[left:]
                left = 0
        self._shrank(sent)

    def _write_file_slice(self, item):
        """Send part of a file slice; False when the socket would block."""
        count = min(item.remaining, _SENDFILE_MAX)
        sent = 0
        if self._sendfile is not None and item.fd is not None:
            try:
                sent = self._sendfile(item.fd, item.offset, count)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                                     errno.ENOTSOCK, errno.ESPIPE):
                    raise
                self._sendfile = None    # not a plain socket or file: read instead
                return True
            if sent == 0:
                self._end_slice(item)    # the file is shorter than promised
                return True
        else:
            data = item.read(min(count, _READ_CHUNK))
            if not data:
                self._end_slice(item)
                return True
            try:
                sent = self._stream.send(data)
            except (BlockingIOError, InterruptedError):
                return False
            # Bytes the stream did not take are read again next time (the
            # same bytes from the same offset: what a TLS retry needs).
        self.last_progress = self._loop.now
        self.bytes_written += sent
        item.offset += sent
        item.remaining -= sent
        self._shrank(sent)
        if item.remaining == 0:
            self._queue.popleft()
            item.finish()
        return True

    def _end_slice(self, item):
        self._queue.popleft()
        self._shrank(item.remaining)
        item.remaining = 0
        item.finish()

    def _fail(self, exc):
        self.close()
        self.on_error(exc)

    def close(self):
        """Drop whatever is queued: nobody will read it.  Suspended sends
        resolve (a send after a disconnect is a no-op, never an error)."""
        if self.closed:
            return
        self.closed = True
        self._loop.remove_writer(self._fd)
        queue, self._queue = self._queue, collections.deque()
        for item in queue:
            if item.__class__ is _FileSlice:
                item.finish()
        self._buffered = 0
        self._above = False
        self._flush_waiters = []
        self._wake_waiters()


# ============================================================================
# 6. Connections and the HTTP scope (PAGI HTTP; RFC 9112 §9; RFC 9110)
#
# HTTPConnection owns a socket, its RequestParser and its Transport, and
# serves one request at a time: requests that arrive together (pipelining)
# wait in the parser until the current exchange is over -- its response
# delivered and its application returned.  An Exchange is one request and its
# response: the scope, receive(), send(), and the pagi.connection object.
#
# Their phases are named, and the moves between them are tables of data
# (h11's model, "the state machines" below): an exchange has three machines
# (the request body, the response, the application), a connection one;
# Exchange._settle alone decides that an exchange is over.  Connection is
# what HTTP and WebSocket (section 7) share: the socket side, the common
# scope, the start of an application, and the short list of what a
# connection may use of its server (section 10), in its docstring.
#
# What must not go in here: response framing (section 4), socket calls
# (section 5), and anything about listeners, admission or supervisors.
# ============================================================================

class EventError(ValueError):
    """An event the application sent that breaks the protocol; the message
    names the event type and the field."""


# The events an http application may send: field -> (kind, required).
# Validation, docs/spec.md and tests draw on this one table.  Extra fields
# are allowed (forward compatibility, PAGI core "Error Handling").
HTTP_SEND_EVENTS = {
    "http.response.start": {"status": ("status", True), "headers": ("headers", False),
                            "trailers": ("flag", False)},
    "http.response.body": {"body": ("bytes", False), "more": ("flag", False),
                           "file": ("path", False), "fh": ("file", False),
                           "offset": ("count", False), "length": ("count", False)},
    "http.response.trailers": {"headers": ("headers", False)},
    "http.fullflush": {},
}

_HEADER_VALUE_BAD = re.compile(rb"[\r\n\x00]")              # PAGI "header byte safety"
_BYTES_TYPES = (bytes, bytearray, memoryview)


def _kind_name(value):
    return type(value).__name__


def _check_headers(etype, field, headers):
    try:
        for name, value in headers:
            if _LOWER_TOKEN.fullmatch(name) is None or _HEADER_VALUE_BAD.search(value):
                break
        else:
            return            # the common case: every pair is good
    except (TypeError, ValueError):
        pass
    _diagnose_headers(etype, field, headers)


def _diagnose_headers(etype, field, headers):
    """Say exactly what is wrong with a headers list that failed the check."""
    if not isinstance(headers, (list, tuple)):
        raise EventError("%s: %r must be a list of (name, value) pairs, got %s"
                         % (etype, field, _kind_name(headers)))
    for i, pair in enumerate(headers):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise EventError("%s: %r[%d] must be a (name, value) pair, got %r"
                             % (etype, field, i, pair))
        name, value = pair
        if not isinstance(name, _BYTES_TYPES) or not isinstance(value, _BYTES_TYPES):
            raise EventError("%s: %r[%d] name and value must be bytes, got %s and %s"
                             % (etype, field, i, _kind_name(name), _kind_name(value)))
        # RFC 9110 §5.1 (field names are tokens) and PAGI "Header byte
        # safety": CR, LF, NUL anywhere, or any control in a name, would let
        # the application split the response; we refuse, never rewrite.
        if not _LOWER_TOKEN.fullmatch(name):
            raise EventError("%s: %r[%d] name %r is not a lower-case token"
                             % (etype, field, i, bytes(name)))
        if _HEADER_VALUE_BAD.search(value):
            raise EventError("%s: %r[%d] value for %r contains CR, LF or NUL"
                             % (etype, field, i, bytes(name)))
    raise EventError("%s: %r is not a list of (name, value) byte pairs" % (etype, field))


def _expect(ok, etype, field, what, value):
    if not ok:
        raise EventError("%s: %r must be %s, got %s" % (etype, field, what, _kind_name(value)))


def _check_bytes(etype, field, value):
    if value.__class__ is not bytes:          # bytes: the common case, no call
        _expect(isinstance(value, _BYTES_TYPES), etype, field, "bytes", value)


def _check_flag(etype, field, value):
    _expect(isinstance(value, int), etype, field, "int (0 or 1) or bool", value)


def _check_status(etype, field, value):
    if value.__class__ is not int:            # an int: the common case, no call
        _expect(isinstance(value, int) and not isinstance(value, bool), etype, field,
                "int", value)
    # RFC 9110 §15: 1xx are interim responses, which PAGI has no event
    # for; http.response.start carries the final one (docs/deviations.md).
    if not 200 <= value <= 599:
        raise EventError("%s: %r must be a final status in 200..599, got %d"
                         % (etype, field, value))


def _check_count(etype, field, value):
    _expect(isinstance(value, int) and not isinstance(value, bool), etype, field,
            "non-negative int", value)
    if value < 0:
        raise EventError("%s: %r must not be negative, got %d" % (etype, field, value))


def _check_text(etype, field, value):
    _expect(isinstance(value, str), etype, field, "str", value)


def _check_seconds(etype, field, value):
    _expect(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
            etype, field, "a non-negative number of seconds", value)


def _check_path(etype, field, value):
    _expect(isinstance(value, (str, bytes, os.PathLike)), etype, field, "str or path", value)


def _check_file(etype, field, value):
    _expect(hasattr(value, "read") or hasattr(value, "fileno"), etype, field,
            "binary file object", value)


# The kinds a schema names, and the function that checks each.
_FIELD_CHECKS = {"bytes": _check_bytes, "flag": _check_flag, "status": _check_status,
                 "count": _check_count, "path": _check_path, "text": _check_text,
                 "file": _check_file, "headers": _check_headers, "seconds": _check_seconds}


# ASGI habits, named.  ASGI events look like PAGI's but differ in a few
# keys and types, and PAGI allows extra fields -- so without these tables
# an ASGI habit is accepted and silently means something else (an
# http.response.body with ASGI's "more_body": True ends the response).
# Each ASGI key or type that PAGI spells differently fails with a message
# that names the PAGI way (docs/tutorial.md, "Coming from ASGI").
#   ASGI key -> (what to say, the event types where ASGI has it)
ASGI_KEYS = {
    "more_body": ("PAGI uses 'more', not ASGI's 'more_body'",
                  ("http.response.body", "websocket.http.response.body",
                   "sse.http.response.body")),
    "more_trailers": ("PAGI sends all trailers in one http.response.trailers event; "
                      "ASGI's 'more_trailers' has no PAGI meaning",
                      ("http.response.trailers",)),
}
#   ASGI event type -> what to send in PAGI instead
ASGI_TYPES = {
    "http.response.pathsend": "PAGI sends a file with http.response.body's 'file' field, "
                              "not ASGI's http.response.pathsend",
    "http.response.zerocopy": "PAGI sends an open file with http.response.body's 'fh', "
                              "'offset' and 'length' fields, not ASGI's http.response.zerocopy",
    "http.response.push": "PAGI has no server push (ASGI's http.response.push)",
    "http.response.early_hint": "PAGI has no interim responses (ASGI's "
                                "http.response.early_hint); send the final response",
}


def _asgi_key_check(message):
    def check(etype, field, value):
        raise EventError("%s: %s" % (etype, message))
    return check


def compile_schema(table, kinds=None):
    """{type: {field: (kind, required)}} -> {type: ((field, check, required), ...)}

    ``kinds`` adds a protocol's own kinds of field ({kind: check}) to the
    common ones.  A type that ASGI spells with another key (ASGI_KEYS)
    refuses that key."""
    known = _FIELD_CHECKS if kinds is None else dict(_FIELD_CHECKS, **kinds)
    compiled = {}
    for etype, fields in table.items():
        checks = [(field, known[kind], required) for field, (kind, required) in fields.items()]
        checks += [(key, _asgi_key_check(message), False)
                   for key, (message, types) in ASGI_KEYS.items() if etype in types]
        compiled[etype] = tuple(checks)
    return compiled


_HTTP_SEND_SCHEMA = compile_schema(HTTP_SEND_EVENTS)


def validate_event(event, schema):
    """Check an event against its compiled schema; returns its type.  Raises
    EventError naming the event and the field (PAGI core "Error Handling")."""
    if event.__class__ is not dict and not isinstance(event, dict):
        raise EventError("an event must be a dict, got %s" % _kind_name(event))
    etype = event.get("type")
    fields = schema.get(etype)
    if fields is None:
        if not isinstance(etype, str):
            raise EventError("event has no 'type' string: %r" % (event,))
        if etype in ASGI_TYPES:
            raise EventError("%s: %s" % (etype, ASGI_TYPES[etype]))
        raise EventError("%s: unknown event type for this scope (expected one of %s)"
                         % (etype, ", ".join(sorted(schema))))
    for field, check, required in fields:
        value = event.get(field)
        if value is None:
            if required:
                raise EventError("%s: missing required field %r" % (etype, field))
        else:
            check(etype, field, value)
    return etype


# -- pagi.connection ------------------------------------------------------------

# PAGI HTTP "Standard Disconnect Reasons" (abnormal ends only).
DISCONNECT_REASONS = (
    "client_closed", "client_timeout", "idle_timeout", "keepalive_timeout",
    "write_timeout", "write_error", "read_error", "protocol_error",
    "server_shutdown", "server_error", "body_too_large", "queue_overflow",
)


class ConnectionState:
    """``scope["pagi.connection"]``: one request's view of its connection.

    Exactly one of on_disconnect (abnormal end, with a reason) and
    on_complete (the response was fully delivered) fires per request.
    """

    __slots__ = ("_connected", "_socket_open", "_reason", "_ended", "_started", "_complete",
                 "_disconnect_callbacks", "_complete_callbacks", "_future", "_log")

    def __init__(self, log, socket_open=None):
        self._connected = True          # False once this request ended abnormally
        self._socket_open = socket_open or [True]   # [False] once the socket closed
        self._reason = None             # disconnect_reason()
        self._ended = False             # one of the two terminal signals fired
        self._started = False           # response_started()
        self._complete = False          # response_complete()
        self._disconnect_callbacks = None   # lists, made on first registration
        self._complete_callbacks = None
        self._future = None             # disconnect_future(), made on demand
        self._log = log

    def __repr__(self):
        return "<pagi.connection connected=%s reason=%s started=%s complete=%s>" % (
            self._connected, self._reason, self._started, self._complete)

    def is_connected(self):
        """True while the connection is open; never True again once False."""
        return self._connected and self._socket_open[0]

    def disconnect_reason(self):
        return self._reason

    def response_started(self):
        return self._started

    def response_complete(self):
        return self._complete

    def on_disconnect(self, callback):
        if self._disconnect_callbacks is None:
            self._disconnect_callbacks = []
        self._disconnect_callbacks.append(callback)
        if self._reason is not None:
            self._call(callback, self._reason)

    def on_complete(self, callback):
        if self._complete_callbacks is None:
            self._complete_callbacks = []
        self._complete_callbacks.append(callback)
        if self._ended and self._reason is None:
            self._call(callback)

    def disconnect_future(self):
        if self._future is None:
            self._future = Future()
            if self._reason is not None:
                self._future.set_result(self._reason)
        return self._future

    def _call(self, callback, *args):
        try:
            callback(*args)
        except Exception:
            self._log.error("error in a pagi.connection callback %r\n%s",
                            callback, traceback.format_exc().rstrip())

    def _disconnected(self, reason):
        """PAGI HTTP "State Transition Order", steps 1-4 (step 5, the
        http.disconnect event, is the Exchange's)."""
        if self._ended:
            self._connected = False
            return False
        self._ended = True
        self._connected = False                     # 1
        self._reason = reason                       # 2
        if self._future is not None and not self._future.done():
            self._future.set_result(reason)         # 3
        for callback in list(self._disconnect_callbacks or ()):
            self._call(callback, reason)            # 4
        return True

    def _completed(self):
        if self._ended:
            return
        self._ended = True
        for callback in list(self._complete_callbacks or ()):
            self._call(callback)


class AccessEntry:
    """What one access-log line says about one request, WebSocket session
    or event stream; a connection hands it to ``server.log_access`` and
    section 10 formats it (AccessLog, Apache's tokens in brackets)."""

    __slots__ = ("client", "received", "duration", "request_line", "status", "size",
                 "request_headers", "response_headers", "bytes_in", "bytes_out", "end")

    def __init__(self, client, received, duration, request_line, status, size,
                 request_headers=(), response_headers=(), bytes_in=0, bytes_out=0,
                 end="done"):
        self.client = client                  # (host, port) or None (%h)
        self.received = received              # time.time() at arrival (%t)
        self.duration = duration              # seconds (%D, %T)
        self.request_line = request_line      # str (%r)
        self.status = status                  # int, or None (%s)
        self.size = size                      # body bytes that reached the socket (%b)
        self.request_headers = request_headers    # (%{Name}i)
        self.response_headers = response_headers  # (%{Name}o)
        self.bytes_in = bytes_in              # bytes received (%I)
        self.bytes_out = bytes_out            # bytes written (%O)
        self.end = end                        # how it ended (%{end}x)


# -- the state machines -------------------------------------------------------------
#
# h11's model: what each party of a connection has done so far is a named
# phase, and the moves between phases are a table of data, (phase, event,
# next phase).  Every move is one lookup in its machine's table,
#
#     self.response_phase = RESPONSE_MOVES[self.response_phase]["complete"]
#
# and a move the table lacks raises StateError there (a bug in pagi_ref,
# never the client's or the application's doing).  No phase is assigned any
# other way (tests/test_connections.py reads the module to check), and
# docs/architecture.md draws its diagrams from these tables
# (tests/test_docs.py keeps them equal).
#
# Discussion: why a lookup and not a method.  A keep-alive GET makes six
# moves (four of its exchange, two of its connection).  Under callgrind a
# move costs about 450 CPU instructions as this lookup, 1,000 as a method
# call, 1,900 as one generic method (getattr/setattr), which, tried first,
# cost the keep-alive GET 8% in bench/instructions.py.  What a move sets
# off (h11's "state-triggered transitions") is written beside the few
# moves that can set it off: Exchange._settle.

class StateError(RuntimeError):
    """A move its machine's table does not allow: a bug in pagi_ref.  The
    message names the machine, the phase and the event."""


class _Moves(dict):
    """The moves out of one phase of one machine: event -> next phase."""

    __slots__ = ("machine", "phase")

    def __missing__(self, event):
        raise StateError("%s machine: no transition from %s on %r (from %s: %s)"
                         % (self.machine, self.phase, event, self.phase,
                            ", ".join(sorted(self)) if self else "none, it is final"))


class Machine:
    """One transition table: ``rows`` of (phase, event, next phase), the
    phases an object may start in (``initial``), and the attribute that
    holds its phase (``attr``).  ``moves[phase][event]`` is the next phase."""

    __slots__ = ("name", "attr", "initial", "rows", "moves")

    def __init__(self, name, attr, initial, rows):
        self.name = name
        self.attr = attr
        self.initial = tuple(initial)
        self.rows = tuple(rows)
        self.moves = {}
        for phase in self.phases():
            moves = self.moves[phase] = _Moves()
            moves.machine, moves.phase = name, phase
        for phase, event, new in self.rows:
            if event in self.moves[phase]:
                raise ValueError("%s machine: two moves from %s on %r" % (name, phase, event))
            self.moves[phase][event] = new

    def __repr__(self):
        return "<Machine %s>" % self.name

    def phases(self):
        """Every phase: the initial ones, those with moves out (in the order
        of the rows), then the final ones."""
        froms = [row[0] for row in self.rows]
        seen = [p for p in self.initial if p in froms]
        for p in froms + list(self.initial) + [row[2] for row in self.rows]:
            if p not in seen:
                seen.append(p)
        return seen


# The phases of an exchange (one request and its response), three machines:
# the client's request body, the response, and the application's task.
BODY, DISCARDING, BODY_DONE = "BODY", "DISCARDING", "BODY_DONE"
NOT_STARTED, START_PENDING, HEAD_SENT, TRAILERS_DUE, DONE, DELIVERED, ANSWERED = (
    "NOT_STARTED", "START_PENDING", "HEAD_SENT", "TRAILERS_DUE", "DONE", "DELIVERED", "ANSWERED")
RUNNING, RETURNED = "RUNNING", "RETURNED"

REQUEST_MACHINE = Machine("request", "request_phase", (BODY, BODY_DONE), [
    # Initial: BODY when the head announces a body, else BODY_DONE.
    (BODY, "end_of_body", BODY_DONE),       # the parser's EndOfMessage
    (BODY, "discard", DISCARDING),          # over without reading it all (RFC 9112 §9.3)
    (DISCARDING, "end_of_body", BODY_DONE),
])

RESPONSE_MACHINE = Machine("response", "response_phase", (NOT_STARTED,), [
    (NOT_STARTED, "start", START_PENDING),  # http.response.start accepted; no byte written
    (NOT_STARTED, "server_answer", ANSWERED),   # the server answered instead (a 500, a 4xx)
    (START_PENDING, "server_answer", ANSWERED),
    (START_PENDING, "head", HEAD_SENT),     # the head is written; the body goes on
    (START_PENDING, "last_body", TRAILERS_DUE),   # head and last body; trailers=1
    (START_PENDING, "complete", DONE),      # head and last body in one event
    (HEAD_SENT, "last_body", TRAILERS_DUE),
    (HEAD_SENT, "complete", DONE),          # the more=0 body event (or a file)
    (TRAILERS_DUE, "complete", DONE),       # http.response.trailers
    (DONE, "flushed", DELIVERED),           # its last byte left the buffer
])

APPLICATION_MACHINE = Machine("application", "app_phase", (RUNNING,), [
    (RUNNING, "returned", RETURNED),        # the Task ended (or never started)
])

REQUEST_MOVES = REQUEST_MACHINE.moves
RESPONSE_MOVES = RESPONSE_MACHINE.moves
APPLICATION_MOVES = APPLICATION_MACHINE.moves

_HEAD_OUT = frozenset((HEAD_SENT, TRAILERS_DUE, DONE, DELIVERED))   # the head is written
_BODY_ENDED = frozenset((TRAILERS_DUE, DONE, DELIVERED))   # the last body event is had
_RESPONSE_DONE = frozenset((DONE, DELIVERED))               # the final event is had


# -- the exchange -----------------------------------------------------------------

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_COMBINE_LIMIT = 16384     # bodies up to this size share the head's write


class Exchange:
    """One request and its response: the ``http`` scope, receive() and send().

    Its phases are three machines (REQUEST_MACHINE, RESPONSE_MACHINE,
    APPLICATION_MACHINE); _settle, reached when the response is delivered,
    the application returns or a body being discarded ends, is the one place
    that decides the exchange is over.

    Discussion: the state below is declared once on the class, so that an
    exchange starts with the defaults and its __init__ sets only the
    attributes that differ per request -- fewer stores on the path of every
    keep-alive GET.  Assigning an attribute on the instance shadows the
    class default, as usual.
    """

    REQUEST = "http.request"      # the type of request-body events
    FIN_ENDS_RESPONSE = False     # a FIN after the request is a half-close, not a leave
    ANNOUNCE_KEEP_ALIVE = False   # say "Connection: keep-alive" in HTTP/1.1 too
    # the phases (section 6, "the state machines")
    request_phase = BODY_DONE     # REQUEST_MACHINE: BODY when the head announced a body
    response_phase = NOT_STARTED  # RESPONSE_MACHINE
    app_phase = RUNNING           # APPLICATION_MACHINE
    # request side
    final_given = False           # the more=0 event was handed out
    waiter = None                 # a pending receive() Future
    continue_sent = False         # the interim 100 went out
    # response side
    status = 0
    headers = None                # the headers to send: the application's, then ours
    app_close = False             # the application sent Connection: close
    has_date = False              # the application sent a Date
    has_server = False            # the application sent a Server
    length = None                 # declared Content-Length, if any
    sent = 0                      # body bytes accepted
    chunked = False               # the body goes out in chunked coding
    no_body = False               # HEAD, 204, 304
    trailers = False              # trailers=1 on the start event
    bytes_out = 0                 # body bytes, for the access log
    logged = False                # the access-log line was written
    received = 0.0                # time.time() at arrival (access log %t)
    t0 = 0.0                      # time.monotonic() at arrival (%D, %T)
    wire_start = 0                # transport.bytes_written at arrival (%O)
    in_start = 0                  # conn.bytes_in when the head began (%I)
    proxied_client = False        # --proxy-headers: the scope's client, for %h

    def __init__(self, conn, head):
        self.conn = conn
        self.head = head
        self.state = ConnectionState(conn.log, conn.socket_open)
        self.queue = collections.deque()   # http.request events not yet received
        self.keep_alive = head.keep_alive  # the connection may carry another request
        if head.chunked or head.content_length:
            self.request_phase = BODY
        if conn.server.access_log is not None:
            self.received = time.time()
            self.t0 = time.monotonic()
            self.wire_start = conn.transport.bytes_written  # the socket's count so far
            self.in_start = conn.head_base                  # this request's first byte

    def __repr__(self):
        return "<Exchange %s %r status=%d request=%s response=%s app=%s>" % (
            self.head.method, self.head.target, self.status, self.request_phase,
            self.response_phase, self.app_phase)

    scope_type = "http"

    def loop_context(self):
        # ascii(): a client's path cannot forge log lines.
        return "%s %s %s" % (self.scope_type, self.head.method,
                             ascii(decode_path(self.head.path))[1:-1])

    def scope(self):
        conn = self.conn
        scope = conn.base_scope("http", self.head,
                                "https" if conn.stream.scheme_secure else "http",
                                {"fullflush": {}})
        scope["method"] = self.head.method
        scope["pagi.connection"] = self.state
        if conn.server.trusted_peers is not None:
            self.proxied_client = scope["client"]
        return scope

    def what(self):
        """The request, as the error log names it."""
        return "%s %s" % (self.head.method, self.head.target.decode("latin-1"))

    # -- receive ------------------------------------------------------------------

    def receive(self):
        queue = self.queue
        if queue:
            event = queue.popleft()
            if not event["more"]:
                self.final_given = True
            conn = self.conn
            if not conn.reading and not conn.closed:
                conn.resume_reading()
            return _resolved(event)
        if self.request_phase is BODY_DONE and not self.final_given:
            self.final_given = True
            return _resolved({"type": self.REQUEST, "body": b"", "more": 0})
        if self.state._reason is not None or self.response_phase in _RESPONSE_DONE:
            # PAGI HTTP "Disconnect": after the response, or once gone.
            return _resolved(self.disconnect_event())
        if self.waiter is not None:
            return _failed(RuntimeError("receive() called while another receive() is pending"))
        # RFC 9110 §10.1.1: the interim 100 goes out when the application
        # first asks for the body, and never once it has answered.
        if (self.head.expect_continue and not self.continue_sent
                and self.response_phase not in _HEAD_OUT):
            self.continue_sent = True
            self.conn.transport.write(_CONTINUE)
            self.conn.start_body_clock()
        self.waiter = waiter = Future(self.conn.loop)
        return waiter

    def disconnect_event(self):
        return {"type": "http.disconnect"}

    def shutdown(self):
        """Server shutdown: an HTTP response is let finish."""

    def _deliver(self, event):
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(event)
                return
        self.queue.append(event)

    def push_body(self, data, more=1):
        if self.request_phase is DISCARDING:
            return
        if not more and self.waiter is not None:
            self.final_given = True
        self._deliver({"type": self.REQUEST, "body": data, "more": more})

    def end_body(self):
        phase = self.request_phase
        self.request_phase = REQUEST_MOVES[phase]["end_of_body"]
        if phase is DISCARDING:
            self._settle()
        elif self.final_given:
            pass
        elif self.queue:
            self.queue[-1]["more"] = 0
        elif self.waiter is not None:
            self.final_given = True
            self._deliver({"type": self.REQUEST, "body": b"", "more": 0})

    def disconnected(self, reason):
        """The abnormal end: pagi.connection in the spec's order, then
        http.disconnect for a receive() in progress (step 5)."""
        if self.state._disconnected(reason):
            self.conn.log.debug("%s: %s ended early: %s", self.conn.client,
                                self.head.request_line(), reason)
            self.log_access()
            if self.waiter is not None:
                self._deliver(self.disconnect_event())

    # -- send -------------------------------------------------------------------

    def send(self, event):
        if self.state._reason is not None or self.conn.phase is CLOSED:
            return _NO_WAIT      # PAGI core: send after a disconnect is a no-op
        try:
            etype = validate_event(event, _HTTP_SEND_SCHEMA)
            if etype == "http.response.body":
                return self._send_body(event)
            if etype == "http.response.start":
                return self._send_start(event)
            if etype == "http.response.trailers":
                return self._send_trailers(event)
            return self._send_fullflush()
        except (EventError, OSError) as exc:
            return _failed(exc)

    def _send_start(self, event):
        if self.response_phase is not NOT_STARTED:
            raise EventError("http.response.start: the response has already started")
        headers = []
        for name, value in event.get("headers") or ():
            if name.__class__ is not bytes:
                name = bytes(name)
            if value.__class__ is not bytes:
                value = bytes(value)
            if name == b"content-length":
                if not value.isdigit() or self.length is not None:
                    raise EventError("http.response.start: 'headers' content-length %r is "
                                     "not a single non-negative integer" % value)
                self.length = int(value)
            elif name == b"transfer-encoding":
                continue    # PAGI HTTP: the application's Transfer-Encoding is ignored
            elif name == b"connection":
                if b"close" in value.lower():
                    self.app_close = True
                continue    # the server manages Connection (PAGI HTTP)
            elif name == b"date":
                self.has_date = True
            elif name == b"server":
                self.has_server = True
            headers.append((name, value))
        status = event["status"]
        self.status = status
        self.headers = headers
        self.trailers = bool(event.get("trailers"))
        # RFC 9110 §9.3.2, §15.3.5, §15.4.5, RFC 9112 §6.3: no body for HEAD,
        # 204 and 304 (frame_response drops a 204's Content-Length).
        self.no_body = self.head.method == "HEAD" or status in (204, 304)
        self.state._started = True
        self.response_phase = RESPONSE_MOVES[self.response_phase]["start"]
        return _NO_WAIT

    def may_persist(self):
        """Keep-alive, decided here only (RFC 9112 §9.3, §9.6): may the
        connection carry another request after this exchange?  Not if the
        client did not ask for it (RequestHead.keep_alive: HTTP/1.1 without
        Connection: close, HTTP/1.0 with Connection: keep-alive), has
        half-closed, or the server is shutting down; not while a body we
        never asked for (Expect: 100-continue unanswered) may be on its way;
        and never once the head said close (``keep_alive``, which
        _build_head sets with the response's own say: the application's
        Connection: close, a body delimited by the close).  Asked when the
        head is written and again when the exchange is over."""
        conn = self.conn
        head = self.head
        return (self.keep_alive and not conn.peer_eof and not conn.server.shutting_down
                and not (head.expect_continue and not self.continue_sent
                         and self.request_phase is not BODY_DONE))

    def _build_head(self, final_size):
        """The response head, once the framing is known (frame_response,
        section 4).  ``final_size`` is the body size when the first body
        event is also the last."""
        head = self.head
        conn = self.conn
        out, self.headers, body, length, self.keep_alive = frame_response(
            self.status, self.headers, head.method, head.http_version, self.length,
            self.app_close, self.may_persist(), self.trailers, final_size,
            self.ANNOUNCE_KEEP_ALIVE, conn.server.stamp, self.has_server, self.has_date)
        # self.headers is now what went out (for the access log).
        if body is BODY_CHUNKED:
            self.chunked = True
        elif body is BODY_LENGTH:
            self.length = length
        return out

    def _send_body(self, event):
        phase = self.response_phase
        if phase is NOT_STARTED:
            raise EventError("http.response.body: the response has not started "
                             "(send http.response.start first)")
        if phase in _BODY_ENDED:
            raise EventError("http.response.body: the response body is already complete")
        if "file" in event or "fh" in event:
            sources = [k for k in ("body", "file", "fh") if event.get(k) is not None]
            if len(sources) > 1:
                raise EventError("http.response.body: %s are mutually exclusive"
                                 % " and ".join(repr(s) for s in sources))
            if sources and sources[0] != "body":
                return self._send_file(event, sources[0])
        body = event.get("body") or b""
        if body.__class__ is not bytes:
            body = bytes(body)
        more = bool(event.get("more"))
        size = len(body)
        if self.length is not None and not self.no_body and self.sent + size > self.length:
            raise EventError("http.response.body: 'body' would exceed the declared "
                             "content-length (%d bytes, %d already sent)"
                             % (self.length, self.sent))
        self.sent += size
        return self._write_body(body, more, size, phase)

    def _write_body(self, body, more, size, phase):
        """HTTP/1.1's framing of one accepted body event: the head with the
        first, chunks when chunked, the last chunk with the last."""
        transport = self.conn.transport
        out = self._build_head(None if more else size) if phase is START_PENDING else b""
        if self.no_body:
            body = b""
        elif self.chunked:
            if body:
                body = chunk(body)
            if not more and not self.trailers:
                body += LAST_CHUNK
        self.bytes_out += 0 if self.no_body else size
        if out and len(body) <= _COMBINE_LIMIT:
            transport.write(out + body)
        else:
            if out:
                transport.write(out)
            transport.write(body)
        if more:
            if phase is START_PENDING:
                self.response_phase = RESPONSE_MOVES[phase]["head"]
        elif self.trailers:
            self.response_phase = RESPONSE_MOVES[phase]["last_body"]
        else:
            self._response_end()
        return transport.suspend()

    def _send_file(self, event, source):
        offset = event.get("offset") or 0
        length = event.get("length")
        if source == "file":
            file = open(event["file"], "rb")   # FileNotFoundError, PermissionError
            owned = True
        else:
            file = event["fh"]
            if getattr(file, "closed", False):
                raise EventError("http.response.body: 'fh' is closed")
            owned = False
        try:
            info = os.fstat(file.fileno())
        except (AttributeError, OSError, ValueError):
            position = file.tell()      # a file object without a descriptor
            size = file.seek(0, os.SEEK_END)
            file.seek(position)
        else:
            if not stat.S_ISREG(info.st_mode):
                if owned:
                    file.close()
                # A pipe or socket has no size and no offsets: it cannot be
                # a file body (docs/deviations.md); stream it as body events.
                raise EventError("http.response.body: %r is not a regular file "
                                 "(stream pipes and sockets with 'body' events)" % source)
            size = info.st_size
        available = max(0, size - offset)   # PAGI: offset past the end sends nothing
        count = available if length is None else min(length, available)
        if self.length is not None and not self.no_body and self.sent + count > self.length:
            if owned:
                file.close()
            raise EventError("http.response.body: the file would exceed the declared "
                             "content-length (%d bytes)" % self.length)
        self.sent += count
        return self._write_file(file, offset, count, owned)

    def _write_file(self, file, offset, count, owned):
        """HTTP/1.1's framing of an accepted file body (always the last)."""
        transport = self.conn.transport
        if self.response_phase is START_PENDING:
            transport.write(self._build_head(count))
        if self.trailers:     # a file is the last body
            self.response_phase = RESPONSE_MOVES[self.response_phase]["last_body"]
        if self.no_body or count == 0:
            if self.chunked and not self.trailers:
                transport.write(LAST_CHUNK)
            if owned:
                file.close()
            if not self.trailers:
                self._response_end()
            return transport.suspend()
        self.bytes_out += count
        if self.chunked:
            transport.write(b"%x\r\n" % count)
        done = transport.write_file(file, offset, count, owned)
        if self.chunked:
            transport.write(b"\r\n" if self.trailers else b"\r\n" + LAST_CHUNK)
        if not self.trailers:
            self._response_end()
        # For "fh" the application closes the file after this Future: it must
        # not resolve before the last byte of the slice has been written.
        return done

    def _send_trailers(self, event):
        if not self.trailers:
            raise EventError("http.response.trailers: the start event did not "
                             "announce trailers (trailers=1)")
        if self.response_phase in _RESPONSE_DONE:
            raise EventError("http.response.trailers: trailers were already sent")
        if self.response_phase is not TRAILERS_DUE:
            raise EventError("http.response.trailers: the body is not complete yet")
        return self._write_trailers(event.get("headers") or ())

    def _write_trailers(self, fields):
        transport = self.conn.transport
        if self.chunked:
            transport.write(trailer_section(fields))
        # Without chunked framing (a Content-Length, or HTTP/1.0) there is no
        # place for trailer fields: they are dropped (docs/deviations.md).
        self._response_end()
        return transport.suspend()

    def _send_fullflush(self):
        if self.response_phase is NOT_STARTED:
            raise EventError("http.fullflush: the response has not started")
        transport = self.conn.transport
        if self.response_phase is START_PENDING:
            transport.write(self._build_head(None))
            self.response_phase = RESPONSE_MOVES[self.response_phase]["head"]
        future = Future(self.conn.loop)
        transport.when_flushed(lambda: future.done() or future.set_result(None))
        return future

    def _response_end(self):
        self.response_phase = RESPONSE_MOVES[self.response_phase]["complete"]
        self.state._complete = True
        if self.length is not None and self.sent < self.length and not self.no_body:
            # Fewer bytes than declared: the client would wait for the rest.
            self.conn.log.warning("%s %s: response ended after %d of %d declared bytes; "
                                  "closing the connection", self.head.method,
                                  self.head.target.decode("latin-1"), self.sent, self.length)
            self.keep_alive = False
            self.conn.abort_after_flush(self, "server_error")
            return
        self.conn.transport.when_flushed(self._delivered)

    def _delivered(self):
        if self.response_phase is not DONE or self.state._reason is not None:
            return
        state = self.state
        if state._complete_callbacks is not None:
            state._completed()
        else:
            state._ended = True                 # (_completed, without callbacks to call)
        if self.conn.server.access_log is not None:
            self.log_access()
        if self.waiter is not None and self.request_phase is BODY_DONE and self.final_given:
            # PAGI HTTP "Disconnect": a receive() still waiting once the
            # response has been sent gets http.disconnect.
            self._deliver(self.disconnect_event())
        self.response_phase = RESPONSE_MOVES[DONE]["flushed"]
        if self.app_phase is RETURNED:
            self._settle()

    def log_access(self):
        access_log = self.conn.server.access_log
        if access_log is None or self.logged:
            return
        self.logged = True
        head = self.head
        conn = self.conn
        transport = conn.transport
        # What reached the client: the bytes written since the exchange
        # began.  The body count of a response cut short is the
        # application's bytes less those still unwritten (or that were, when
        # the connection went) -- chunk framing of the lost part aside.
        unwritten = transport.bytes_queued - transport.bytes_written
        client = conn.client if self.proxied_client is False else self.proxied_client
        conn.server.log_access(AccessEntry(
            client, self.received, time.monotonic() - self.t0, head.request_line(),
            self.status, max(0, self.bytes_out - unwritten), head.headers, self.headers,
            bytes_in=conn.bytes_in - self.in_start,
            bytes_out=transport.bytes_written - self.wire_start, end=self.access_end()))

    def access_end(self):
        """How the exchange ended, for the access log's %{end}x."""
        reason = self.state._reason
        return "done" if reason is None else "cut:" + reason

    # -- the application's end ----------------------------------------------------

    def app_exited(self, task):
        conn = self.conn
        exc = task._exception
        phase = self.response_phase
        if self.state._reason is not None or conn.phase is CLOSED:
            if exc is not None:
                conn.log.debug("application raised after the client left: %r", exc)
            phase = None                 # PAGI HTTP: not an application error
        elif exc is not None:
            conn.log.error("application raised: %s\n%s", self.what(),
                           "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())
        elif phase is NOT_STARTED:
            conn.log.error("application returned without starting a response: %s "
                           "(500 sent)", self.what())
        elif phase not in _RESPONSE_DONE:
            conn.log.error("application returned before its response was complete: %s",
                           self.what())
        else:
            phase = None                 # a clean end
        if phase is NOT_STARTED or phase is START_PENDING:
            # Nothing of the response is on the wire yet: the client gets a
            # 500 (PAGI HTTP "Application Produced No Response").
            conn.respond_error(500, "Internal Server Error", "server_error")
        elif phase is not None and conn.phase is not CLOSED:
            # The head is out: truncate -- no terminating chunk, and the
            # connection closes, so the client can tell.
            conn.abort("server_error")
        self.app_phase = APPLICATION_MOVES[self.app_phase]["returned"]
        if self.response_phase is DELIVERED:
            self._settle()

    def _settle(self):
        """Reached when the response is delivered, the application returns,
        or a discarded body ends: the one place that decides the exchange is
        over -- its response delivered and its application returned.  What
        follows is the connection's (exchange_over)."""
        if self.app_phase is RETURNED and self.response_phase is DELIVERED:
            self.conn.exchange_over(self)


# -- the connection ---------------------------------------------------------------

_LINGER_SECONDS = 2.0    # how long a closing socket keeps draining input
_PIPELINE_BUFFER = 65536  # bytes of pipelined requests read ahead of the current one
_FIRST_REQUEST_GRACE = 1.0  # seconds a request on its way at shutdown gets to arrive


def _below_min_rate(waited, received, grace, min_rate):
    """Apache mod_reqtimeout's rule: ``grace`` seconds, then one second more
    for every ``min_rate`` bytes received.  So a client must average at
    least ``min_rate`` bytes/s after the grace, and bytes sent early are
    credit for later.  ``min_rate`` 0: no minimum."""
    return min_rate > 0 and waited > grace + received / min_rate


class _Linger:
    """Close a stream without losing the response just written to it.

    RFC 9112 §9.6: closing while the client is still sending makes the
    kernel answer with RST, which can destroy the response in flight.  So we
    shut down our side, read and drop what still arrives until the client
    closes too or a short time passes, then close.  ``on_closed(linger)``
    tells the server (section 10) that the descriptor is free, which may
    also ask for it sooner: cut_short().
    """

    timer = None

    def __init__(self, loop, stream, on_closed=None):
        self.loop = loop
        self.stream = stream
        self.fd = stream.fd
        self.on_closed = on_closed
        try:
            stream.shutdown_write()
        except OSError:
            self.close()
            return
        loop.add_reader(self.fd, self._drain)
        self.timer = loop.call_later(_LINGER_SECONDS, self.close)

    def _drain(self):
        try:
            while self.stream.recv(65536):
                pass
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.close()

    def cut_short(self):
        """The descriptor is needed now: drop what has arrived (so that the
        close sends no RST for it), then close."""
        if self.stream is not None:
            self._drain()
        self.close()

    def close(self):
        if self.stream is None:
            return
        if self.timer is not None:
            self.timer.cancel()
        self.loop.forget(self.fd)
        self.stream.close()
        self.stream = None
        if self.on_closed is not None:
            self.on_closed(self)


# The phases of a connection.  An HTTP connection serves one exchange at a
# time and loops through IDLE and BUSY while it is kept alive; every kind
# ends CLOSING (flushing what is queued: close_after_flush) and CLOSED (the
# socket closed, or lingering in a _Linger that the server holds in the
# connection's slot), or hands its socket to another protocol (UPGRADED).
IDLE, BUSY, OPEN, CLOSING, CLOSED, UPGRADED = (
    "IDLE", "BUSY", "OPEN", "CLOSING", "CLOSED", "UPGRADED")

HTTP_CONNECTION_MACHINE = Machine("http connection", "phase", (IDLE,), [
    (IDLE, "request", BUSY),                # a request head is parsed (_begin)
    (BUSY, "keep_alive", IDLE),             # the exchange is over, the connection persists
    (IDLE, "upgrade", UPGRADED),            # RFC 9110 §7.8: handed over (_hand_over)
    (IDLE, "close_after_flush", CLOSING),   # no more requests: flush, then linger
    (BUSY, "close_after_flush", CLOSING),
    (IDLE, "close", CLOSED),                # closed now (close, abort), or lingering
    (BUSY, "close", CLOSED),
    (CLOSING, "close", CLOSED),
])
HTTP_CONNECTION_MOVES = HTTP_CONNECTION_MACHINE.moves

# A WebSocket's socket: the protocol's own phases are WEBSOCKET_MACHINE
# (section 7); this one is only the socket's.
SOCKET_MACHINE = Machine("websocket socket", "phase", (OPEN,), [
    (OPEN, "close_after_flush", CLOSING),
    (OPEN, "close", CLOSED),
    (CLOSING, "close", CLOSED),
])


class Connection:
    """What every kind of client connection shares: its stream and Transport,
    reading (the reader callback, pause and resume), the common part of its
    scope, starting its application, and the two ways it ends -- abort()
    now, dropping what is queued, or close_after_flush(), which lets the
    queued bytes out and then lingers (_Linger) so that the last response is
    not destroyed by a reset.

    A subclass supplies _received(data) (bytes arrived), _on_eof() (the
    client sent FIN), _advance() (hand on what the parser holds), abort()
    and check_timeouts(); it reads and writes nothing else of the socket.

    What a connection may use of its server (section 10), and nothing more
    (docs/architecture.md, "The server around it"):

    - read only: ``loop``, ``log``, ``config``, ``app``, ``state``,
      ``stamp``, ``trusted_peers``, ``upgrades``, ``exchange_kind``,
      ``shutting_down``, and ``access_log`` (None: no access log is kept);
    - calls: connection_opened(conn) (a connection made by an upgrade takes
      its slot), connection_closed(conn) (the slot's descriptor is closed,
      lingering or handed on), linger(stream), log_access(entry) (one
      AccessEntry), max_requests_reached();
    - two per-request touches, attributes rather than calls because they
      are on the common path: ``requests`` (add one per request begun,
      then compare with ``max_requests``) and ``idle`` (an ordered dict: a
      keep-alive connection between requests enters it, and leaves it when
      the next head's first bytes arrive).
    """

    MACHINE = SOCKET_MACHINE  # the socket's phases; ``phase`` holds one
    phase = OPEN
    reading = False         # the reader callback is registered
    peer_eof = False        # the client sent FIN
    advancing = False       # inside _advance (no re-entry)
    paused_at = None        # when reading last paused (None: reading)
    paused_for = 0.0        # seconds spent paused since the clock was last reset

    def __init__(self, server, stream, transport):
        self.server = server
        self.loop = server.loop
        self.log = server.log
        self.config = server.config
        self.stream = stream
        self.fd = stream.fd
        self.client = stream.peer_address         # the scope's client ...
        self.server_address = stream.local_address  # ... and server
        self.transport = transport
        transport.on_error = self._write_failed
        self.last_activity = self.loop.now        # last byte received
        self.bytes_in = 0                         # bytes received on this socket

    @property
    def closed(self):
        """The socket is closed, lingering, or handed to another owner."""
        return self.phase is CLOSED or self.phase is UPGRADED

    @property
    def closing(self):
        """No more requests: what is queued is flushed, then the socket lingers."""
        return self.phase is CLOSING

    # -- reading ------------------------------------------------------------------

    def resume_reading(self):
        if not self.reading and not self.closed and not self.peer_eof:
            self.reading = True
            if self.paused_at is not None:
                self.paused_for += self.loop.now - self.paused_at
                self.paused_at = None
            self.loop.add_reader(self.fd, self._on_readable)
            # What was parked may need no more bytes (an end of message).
            if not self.advancing:
                self.loop.call_soon(self._advance)

    def pause_reading(self):
        if self.reading:
            self.reading = False
            self.paused_at = self.loop.now
            self.loop.remove_reader(self.fd)

    def _on_readable(self):
        try:
            data = self.stream.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except (ConnectionResetError, ConnectionAbortedError):
            self.abort("client_closed")   # the client reset: it is gone
            return
        except OSError as exc:
            # A failed TLS handshake comes here too (ssl.SSLError): the
            # client's doing, so DEBUG, where an operator can find why.
            self.log.debug("%s: read failed: %s", self.client, exc)
            self.abort("read_error")
            return
        self.last_activity = self.loop.now
        if data:
            self._received(data)
        else:
            self.peer_eof = True
            self.pause_reading()
            self._on_eof()

    def _write_failed(self, exc):
        self.abort(_write_failure_reason(exc, self.peer_eof))

    # -- the scope and the application ----------------------------------------------

    def base_scope(self, scope_type, head, scheme, extensions):
        """The keys every scope of a connection has (PAGI HTTP "Connection
        Scope", WebSocket "Connection Scope"), from the request head;
        --proxy-headers applied."""
        scope = {
            "type": scope_type,
            "pagi": {"version": PAGI_VERSION, "spec_version": PAGI_SPEC_VERSION},
            "http_version": head.http_version,
            "scheme": scheme,
            "path": decode_path(head.path),
            "raw_path": head.path,
            "query_string": head.query_string,
            "root_path": self.config.root_path,
            "headers": head.headers,
            "client": list(self.client) if self.client else None,
            "server": list(self.server_address) if self.server_address else None,
            "state": dict(self.server.state),
            "extensions": extensions if self.stream.tls is None
            else _with_tls(extensions, self.stream),
            "pagi.transport": self.transport,
        }
        trusted = self.server.trusted_peers
        if trusted is not None:
            apply_proxy_headers(scope, self.client, trusted)
        return scope

    def cannot_start(self, exc, what):
        """start_application raised CannotStart for the request ``what``.
        Logged at ERROR; the caller answers 500 (docs/spec.md, CORE-APP-4)."""
        cause = exc.__cause__
        if cause is None:
            self.log.error("TypeError: %s, for %s", exc, what)
        else:
            self.log.error("application raised when called: %s\n%s", what, "".join(
                traceback.format_exception(type(cause), cause, cause.__traceback__)).rstrip())

    # -- the end --------------------------------------------------------------------

    def close_after_flush(self):
        if self.phase is CLOSING or self.closed:
            return
        self.phase = self.MACHINE.moves[self.phase]["close_after_flush"]
        self.transport.when_flushed(self._linger)

    def _linger(self):
        if self.closed:
            return
        self._release()
        self.server.linger(self.stream)

    def close(self):
        """A normal close: nothing in flight."""
        if not self.closed:
            self._release()
            self.stream.close()

    def _release(self):
        self.phase = self.MACHINE.moves[self.phase]["close"]
        self.reading = False
        self.transport.close()
        self.loop.forget(self.fd)
        self.server.connection_closed(self)

    def write_timed_out(self, now, config):
        """The client has left a full buffer unread for write_timeout."""
        transport = self.transport
        return bool(transport.buffered_amount()) and \
            now - transport.last_progress > config.write_timeout


def _write_failure_reason(exc, peer_eof):
    """The PAGI reason for a Transport failure."""
    if isinstance(exc, BufferError):
        return "queue_overflow"
    return "client_closed" if peer_eof else "write_error"


def apply_proxy_headers(scope, peer, trusted):
    """--proxy-headers: a trusted peer's word on the client and the scheme
    (section 4, forwarded()), written into ``scope``.  A peer over a Unix
    socket (``peer`` None) is trusted: only who may open the socket file
    can connect (gunicorn decides the same).  The client's port is 0 when
    the proxy does not say it; ``client`` is None for a client the proxy
    calls ``unknown`` or by an obfuscated name (RFC 7239 §6)."""
    if peer is not None and not trusted(peer[0]):
        return
    hop, secure = forwarded(scope["headers"], trusted)
    if hop is not None:
        scope["client"] = forwarded_node(hop)
    if secure is not None:
        if scope["type"] == "websocket":
            scope["scheme"] = "wss" if secure else "ws"
        else:
            scope["scheme"] = "https" if secure else "http"


# PAGI HTTP "Disconnect Reasons": what a request body's HTTPError (section
# 4) is called on pagi.connection; any other status is a protocol_error.
_HTTP_ERROR_REASONS = {
    413: "body_too_large",     # past max_body_size, declared or as it came
    408: "client_timeout",     # the body arrives too slowly (body_min_rate)
}


class HTTPConnection(Connection):
    """One client socket: parser in, transport out, one exchange at a time
    (HTTP_CONNECTION_MACHINE)."""

    MACHINE = HTTP_CONNECTION_MACHINE
    phase = IDLE

    def __init__(self, server, stream):
        config = server.config
        Connection.__init__(self, server, stream, Transport(
            stream, server.loop, config.write_high_watermark, config.write_low_watermark,
            None, config.write_buffer_limit))
        self.parser = RequestParser(config)
        self.exchange = None          # the request being served
        self.socket_open = [True]     # shared by this socket's pagi.connection objects
        self.requests = 0             # requests begun on this connection
        self.idle_set = server.idle   # the server's evictable connections (section 10)
        self.head_started = self.last_activity  # when the current head began to arrive
        # The minimum data rates (section 1): byte counts, and the body's
        # clock, which runs only while the server waits for body bytes
        # (paused_at and paused_for, kept by Connection, leave out pauses).
        self.head_base = 0            # bytes_in when the current head began
        self.body_started = None      # when the wait for this body began (None: not yet)
        self.body_base = 0            # bytes_in then

    def loop_context(self):
        if self.exchange is not None:
            return self.exchange.loop_context()
        return "http connection from %s" % (self.client[0] if self.client else "?")

    def __repr__(self):
        return "<HTTPConnection fd=%d client=%r requests=%d %s>" % (
            self.fd, self.client, self.requests, self.phase)

    def start(self):
        self.resume_reading()

    # -- reading ------------------------------------------------------------------

    def start_body_clock(self):
        """The server now waits for body bytes: the body's minimum rate
        counts from here.  Bytes that came with the head are the body's."""
        self.body_started = now = self.loop.now
        self.body_base = self.bytes_in - self.parser.buffered
        self.paused_for = 0.0
        self.paused_at = None if self.reading else now

    def body_waited(self, now):
        """Seconds the server has waited for this body, pauses excluded."""
        paused = self.paused_for
        if self.paused_at is not None:
            paused += now - self.paused_at
        return now - self.body_started - paused

    def _received(self, data):
        if self.phase is CLOSING:
            return        # a closing connection drops what still arrives
        parser = self.parser
        if parser.in_head and not parser.buffered:
            # The first bytes of a head: the connection is no longer idle.
            self.head_started = self.last_activity
            self.head_base = self.bytes_in
            self.idle_set.pop(self, None)
        self.bytes_in += len(data)
        parser.feed(data)
        self._advance()

    def _on_eof(self):
        exchange = self.exchange
        if self.phase is not BUSY:
            self.close()          # idle, or between requests: nothing is lost
        elif exchange.request_phase is not BODY_DONE or (
                exchange.FIN_ENDS_RESPONSE and exchange.response_phase not in _RESPONSE_DONE):
            self.abort("client_closed")
        # Otherwise the request is complete and the client only half-closed:
        # the response still goes out, then the connection closes.  (A client
        # that closed completely is found out by the next write: reason
        # client_closed.  docs/deviations.md.)

    def _advance(self):
        """Parse what has arrived and hand it on: start the next request, or
        feed the body of the current one.  Never re-entered."""
        if self.advancing:
            return
        self.advancing = True
        try:
            self._advance_loop()
        finally:
            self.advancing = False

    def _advance_loop(self):
        parser = self.parser
        limit = self.config.max_receive_queue
        while self.phase is IDLE or self.phase is BUSY:
            exchange = self.exchange
            if exchange is None:
                try:
                    event = parser.next_event()
                except HTTPError as err:
                    self._parser_failed(err)
                    self.respond_error(err.status, err.message, None, err.head)
                    return
                if event is None:
                    return
                self._begin(event)
                continue
            if exchange.request_phase is BODY_DONE:
                # Bytes of pipelined requests wait in the parser until this
                # exchange is over; past a bound, stop reading them.
                if parser.buffered > _PIPELINE_BUFFER:
                    self.pause_reading()
                return
            if len(exchange.queue) >= limit:
                # Inbound backpressure: the application has not taken what is
                # queued, so stop reading; receive() resumes it.
                self.pause_reading()
                return
            try:
                event = parser.next_event()
            except HTTPError as err:
                self._parser_failed(err)
                self._body_error(exchange, err)
                return
            if event is None:
                return
            if event.__class__ is bytes:
                if parser.body_exhausted:
                    # The last bytes of a Content-Length body: one event
                    # with more=0 rather than the data and an empty event.
                    parser.next_event()
                    exchange.push_body(event, 0)
                    exchange.end_body()
                else:
                    exchange.push_body(event)
            else:
                exchange.end_body()

    def _begin(self, head):
        server = self.server
        server.requests += 1              # counted against max_requests (section 10)
        if server.requests == server.max_requests:
            server.max_requests_reached()
        if head.upgrade is not None:
            upgrade = self.server.upgrades.get(head.upgrade)
            if upgrade is not None:
                self._hand_over(upgrade, head)
                return
        self.requests += 1
        self.phase = HTTP_CONNECTION_MOVES[self.phase]["request"]
        # The scope type: a request with Accept is the server's to sort out
        # (an event stream is section 8's, Server.exchange_kind).
        kind = Exchange if head.accept is None else self.server.exchange_kind(head)
        exchange = self.exchange = kind(self, head)    # its request phase is BODY_DONE ...
        if not head.chunked and not head.content_length:
            self.parser.next_event()      # ... after the EndOfMessage of a body-less request
        elif head.expect_continue:
            self.body_started = None      # the client waits for the 100 (Exchange.receive)
        else:
            self.start_body_clock()
        try:
            start_application(server.app, exchange.scope(), exchange.receive, exchange.send,
                              self.loop, exchange.app_exited)
        except CannotStart as exc:
            self.cannot_start(exc, exchange.what())
            # PAGI HTTP "Application Produced No Response": the backstop 500.
            self.respond_error(500, "Internal Server Error", "server_error")
            exchange.app_phase = APPLICATION_MOVES[exchange.app_phase]["returned"]

    def _hand_over(self, upgrade, head):
        """RFC 9110 §7.8: the socket now speaks another protocol; its new
        owner gets the socket, the Transport and any bytes already read."""
        self.requests += 1
        if not head.chunked and not head.content_length:
            self.parser.next_event()      # the EndOfMessage of the handshake
        self.phase = HTTP_CONNECTION_MOVES[self.phase]["upgrade"]   # done with the socket
        self.reading = False
        self.loop.remove_reader(self.fd)
        self.server.connection_closed(self)   # the new owner takes the slot
        leftover = self.parser.take_buffered()
        upgrade(self.server, self.stream, self.transport, head, leftover)

    def check_timeouts(self, now, config):
        """The server's sweep: which timeout, if any, has this connection hit?"""
        transport = self.transport
        exchange = self.exchange
        if self.write_timed_out(now, config):
            self.abort("write_timeout")
        elif self.closing:
            pass
        elif exchange is None:
            if self.parser.buffered or self.requests == 0:
                # slowloris: the head must arrive within header_timeout, and
                # at header_min_rate once its grace is over
                took = now - self.head_started
                if took > config.header_timeout:
                    if self.parser.buffered:
                        self.respond_error(408, "Request Timeout", None)
                    else:
                        self.close()
                elif self.parser.buffered and _below_min_rate(
                        took, self.bytes_in - self.head_base,
                        config.header_grace, config.header_min_rate):
                    self.respond_error(408, "Request Timeout", None)
            elif now - self.last_activity > config.keepalive_timeout:
                self.close()
        elif exchange.request_phase is BODY_DONE:
            pass
        elif self.reading and now - max(
                self.last_activity, transport.last_progress) > config.client_timeout:
            self.abort("client_timeout")
        elif self.body_started is not None and _below_min_rate(
                self.body_waited(now), self.bytes_in - self.body_base,
                config.body_grace, config.body_min_rate):
            self._body_error(exchange, HTTPError(
                408, "Request Timeout: the request body arrives too slowly"))

    def evict(self):
        """Admission control (section 10) needs this idle connection's slot:
        close it, as RFC 9112 §9.6 lets a server close an idle connection at
        any time.  False if the next request has in fact begun to arrive."""
        if self.stream.has_bytes():
            return False          # bytes wait in the kernel: busy, not idle
        self.log.debug("%s: idle connection closed to admit a new one", self.client)
        self.close()
        return True

    def shutdown(self):
        """Server shutdown: an idle keep-alive connection closes now; a busy
        one after its response (Connection: close).  A request on its way (a
        new connection that has not sent its head yet, or part of a head)
        gets a moment to arrive and is then served, with Connection: close:
        the connection was accepted before the listener closed, and closing
        it would fail a request no client could have known to retry (a
        reload must not lose one)."""
        if self.exchange is not None:
            self.exchange.shutdown()
        elif self.requests == 0 or self.parser.buffered:
            self.loop.call_later(_FIRST_REQUEST_GRACE, self._close_if_idle)
        else:
            self.close()

    def _close_if_idle(self):
        if self.exchange is None and not self.closed:
            self.close()

    def _parser_failed(self, err):
        """A parser error caused by a bug in the parser, not by the client,
        still answers 400 -- and goes to the error log with its traceback."""
        if err.__cause__ is not None:
            self.log.error("the request parser failed on input from %s\n%s",
                           self.client, "".join(
                               traceback.format_exception(type(err.__cause__), err.__cause__,
                                                          err.__cause__.__traceback__)).rstrip())

    def _body_error(self, exchange, err):
        """The request body broke a rule while the application runs."""
        reason = _HTTP_ERROR_REASONS.get(err.status, "protocol_error")
        if exchange.response_phase in _HEAD_OUT:
            self.abort(reason)
        else:
            self.respond_error(err.status, err.message, reason)

    # -- the end of an exchange ----------------------------------------------------

    def exchange_over(self, exchange):
        """The exchange is over (Exchange._settle decides): its response
        delivered and its application returned.  Go on to the next request
        -- after dropping what is left of its body -- or close."""
        if exchange is not self.exchange or self.phase is not BUSY:
            return
        if not exchange.may_persist():
            self.close_after_flush()
            return
        if exchange.request_phase is not BODY_DONE:
            if exchange.request_phase is BODY:
                # The application did not read the whole body: drop the rest
                # before the next request can be read (RFC 9112 §9.3); its
                # end enters BODY_DONE, and this runs again.
                exchange.request_phase = REQUEST_MOVES[BODY]["discard"]
                exchange.queue.clear()
                self.resume_reading()
                if not self.advancing:
                    self.loop.call_soon(self._advance)
            return
        self.exchange = None
        self.phase = HTTP_CONNECTION_MOVES[self.phase]["keep_alive"]
        self.transport.forget_callbacks()   # they belonged to that request
        self.last_activity = self.head_started = self.loop.now
        self.resume_reading()
        buffered = self.parser.buffered
        if not buffered:
            # Idle: a candidate for eviction at max_connections (section 10).
            # The next head's first bytes set head_base (_received).
            self.idle_set[self] = None
        else:
            self.head_base = self.bytes_in - buffered   # pipelined: already here
            if not self.advancing:
                self._advance()

    def respond_error(self, status, message, reason, head=None):
        """A server-generated response, then close.  ``reason`` is reported on
        pagi.connection when a request was in progress; ``head``, a request
        refused before it began (a 413 for its Content-Length), is logged
        with its request line."""
        if self.closed:
            return
        response = error_response(status, message, stamp=self.server.stamp)
        self.transport.write(response)
        exchange = self.exchange
        if exchange is not None and reason is not None:
            exchange.response_phase = RESPONSE_MOVES[exchange.response_phase]["server_answer"]
            exchange.state._started = True
            exchange.status = status
            exchange.headers = None
            exchange.disconnected(reason)
        elif self.server.access_log is not None:
            self.server.log_access(AccessEntry(
                self.client, time.time(), 0.0, head.request_line() if head is not None else "-",
                status, len(response) - response.index(b"\r\n\r\n") - 4,
                head.headers if head is not None else (),
                bytes_in=self.bytes_in - self.head_base, bytes_out=len(response)))
        self.log.debug("%s: answered %d %s", self.client, status, message)
        self.close_after_flush()

    def abort_after_flush(self, exchange, reason):
        exchange.disconnected(reason)
        self.close_after_flush()

    def abort(self, reason):
        """An abnormal end: the socket closes now and queued bytes are dropped."""
        if self.closed:
            return
        exchange = self.exchange
        self._release()
        self.stream.close()
        if exchange is not None:
            exchange.disconnected(reason)

    def _release(self):
        self.socket_open[0] = False   # every request's is_connected() is now False
        Connection._release(self)


# ============================================================================
# 6a. HTTP/2 connections: streams as PAGI scopes (PAGI "HTTP/2 Stream
#     Mapping"; RFC 9113 §5, §8)
#
# H2Connection owns a socket, its Transport and an H2Protocol (section 4b),
# and turns each request stream into the scope section 6 would make for an
# HTTP/1.1 request: an Exchange (or, for Accept: text/event-stream, an
# SSEExchange) whose ``conn`` is the stream's H2Stream, so receive(), the
# event validation, pagi.connection and the application's start and end
# are section 6's own code; only the framing of the response differs
# (_H2Response: HEADERS and DATA frames instead of a status line and
# chunks).  Each stream has its own pagi.transport (H2StreamTransport):
# the bytes its application sent that wait for the client's flow-control
# window, on top of the connection's counted outgoing buffer.
#
# Which protocol a new connection speaks is decided by ProtocolChoice, before
# either connection exists: ALPN "h2" on TLS (RFC 7301), the client
# preface on cleartext (RFC 9113 §3.3, "prior knowledge").  "Upgrade: h2c"
# is not offered: RFC 9113 §3.1 deprecates it, and the HTTP/1.1 connection
# ignores it as it ignores any upgrade it does not serve (RFC 9110 §7.8).
#
# What must not go in here: frame bytes (section 4b writes them all);
# accept and admission (section 10).
# ============================================================================

def h2_header_list_limit(config):
    """The header-list limit (RFC 9113 §6.5.2 SETTINGS_MAX_HEADER_LIST_SIZE,
    RFC 7541 §4.1 sizes: name + value + 32 per field), tied to the HTTP/1.1
    limits: a request line and a header block of max_header_size each,
    plus the 32-byte overhead for max_header_count fields."""
    return 2 * config.max_header_size + 32 * config.max_header_count


class _H2End:
    """The end of a stream's response in its send queue: END_STREAM on the
    last DATA frame, or a HEADERS frame of trailers."""
    __slots__ = ("trailers",)

    def __init__(self, trailers):
        self.trailers = trailers

    def __len__(self):
        return 0


class H2StreamTransport(_Watermarks):
    """``scope["pagi.transport"]`` of one HTTP/2 stream.

    buffered_amount() is the stream's bytes that wait for the client's
    flow-control window plus the connection's outgoing buffer (the bytes
    every stream shares), so send() suspends on either: the stream's window
    or the socket.  The watermarks are the connection's (section 1)."""

    def __init__(self, conn, stream_id):
        _Watermarks.__init__(self, conn.loop, conn.config.write_high_watermark,
                             conn.config.write_low_watermark)
        self._conn = conn                 # the H2Connection
        self.stream_id = stream_id
        self._pending = collections.deque()   # bytes, memoryview, _FileSlice, _H2End
        self._pending_size = 0            # bytes in _pending
        self._flush_waiters = []          # callbacks once _pending is empty
        self.closed = False               # reset or ended: nothing more is sent
        self.ended = False                # END_STREAM went out
        self.bytes_queued = 0             # bytes ever given by the application
        self.bytes_written = 0            # bytes ever framed into the connection buffer
        self.last_progress = conn.loop.now

    def __repr__(self):
        return "<H2StreamTransport stream=%d pending=%d%s>" % (
            self.stream_id, self._pending_size, " closed" if self.closed else "")

    # -- the spec's interface --------------------------------------------------

    def buffered_amount(self):
        conn = self._conn
        return self._pending_size + conn.transport.buffered_amount() + conn.engine.data_queued

    # -- the stream's side ---------------------------------------------------------

    def write(self, data, end=False):
        """Queue body bytes; ``end``: END_STREAM on the last of them."""
        if self.closed or not data:
            return
        self.bytes_queued += len(data)
        limit = self._conn.config.write_buffer_limit
        if self._above and limit and self._pending_size > limit:
            # An application that does not wait for the drain: the stream
            # goes (reason queue_overflow), not the memory (section 5's rule).
            h2stream = self._conn.streams.get(self.stream_id)
            if h2stream is not None:
                h2stream.abort("queue_overflow")
            return
        if not self._pending:
            self.last_progress = self._loop.now   # the wait for the window starts
        self._pending.append(data)
        self._pending_size += len(data)
        if end:
            self._pending.append(_H2End(None))
        self._conn.pump(self)

    def write_file(self, file, offset, length, owned):
        item = _FileSlice(file, offset, length, owned)
        item.future = Future(self._loop)
        if self.closed or length == 0:
            item.finish()
            return item.future
        self.bytes_queued += length
        if not self._pending:
            self.last_progress = self._loop.now
        self._pending.append(item)
        self._pending_size += length
        self._conn.pump(self)
        return item.future

    def end(self, trailers=None):
        """END_STREAM once what is queued has gone (trailers: in HEADERS)."""
        if not self.closed:
            self._pending.append(_H2End(trailers))
            self._conn.pump(self)

    def when_flushed(self, callback):
        """callback() once every byte of the stream has left the socket."""
        if self._pending and not self.closed:
            self._flush_waiters.append(callback)
        else:
            self._conn.transport.when_flushed(callback)

    def check(self):
        """After any change to the counts: the watermark edges, and the
        flush waiters once the stream's queue is empty."""
        amount = self.buffered_amount()
        if not self._above and amount >= self._high:
            self._rose()
        elif self._above and amount < self._low:
            self._fell()
        if not self._pending and self._flush_waiters:
            waiters, self._flush_waiters = self._flush_waiters, []
            for callback in waiters:
                self._conn.transport.when_flushed(callback)

    def close(self):
        """The stream is over (reset, or the connection went): drop what is
        queued; suspended sends resolve (a send after a disconnect is a no-op)."""
        if self.closed:
            return
        self.closed = True
        pending, self._pending = self._pending, collections.deque()
        for item in pending:
            if item.__class__ is _FileSlice:
                item.finish()
        self._pending_size = 0
        self._above = False
        self._flush_waiters = []
        self._wake_waiters()


class _H2Response:
    """The HTTP/2 framing of a response, for Exchange and SSEExchange
    (section 6, 8): a HEADERS frame with :status instead of a status line,
    DATA frames instead of chunks, a HEADERS frame for trailers, END_STREAM
    instead of a last chunk or a close.  The response's phases move through
    RESPONSE_MACHINE as section 6's do.  RFC 9113 §8.2.2: no
    connection-specific fields go out."""

    def __init__(self, conn, head, end_stream=True):
        super().__init__(conn, head)
        if not end_stream:
            # REQUEST_MACHINE's initial phase: a body follows (DATA frames),
            # with or without a content-length.
            self.request_phase = BODY

    def receive(self):
        queue = self.queue
        if queue:
            event = queue[0]
            body = event["body"]
            if body.__class__ is bytearray:
                event["body"] = body = bytes(body)    # coalesced by H2Stream.push
            self.conn.consumed(len(body))
        return super().receive()

    def _h2_head(self, final_size):
        """The response's header list, once the framing is known."""
        headers = [(b":status", b"%d" % self.status)]
        for name, value in self.headers:
            if name not in _H2_CONNECTION_FIELDS:
                headers.append((name, value))
        self.conn.server.stamp.add_to(headers, self.has_server, self.has_date)
        if self.status == 204:
            headers = [(n, v) for n, v in headers if n != b"content-length"]
        elif self.length is None and final_size is not None and (
                not self.no_body or (self.head.method == "HEAD" and final_size)):
            headers.append((b"content-length", b"%d" % final_size))
            if not self.no_body:
                self.length = final_size
        self.headers = headers[1:]          # what went out, for the access log
        return headers

    def _short(self):
        """Fewer body bytes than the declared content-length."""
        return self.length is not None and not self.no_body and self.sent < self.length

    def _write_body(self, body, more, size, phase):
        """HTTP/2's framing of one accepted body event (section 6 checked
        it): HEADERS with the first, DATA frames, END_STREAM with the last."""
        conn = self.conn
        transport = conn.transport
        if self.no_body:
            body = b""
        # END_STREAM with the last body, unless trailers follow or the body
        # is short of its content-length (then _response_end resets it).
        ends = not more and not self.trailers and not self._short()
        if phase is START_PENDING:
            conn.send_headers(self._h2_head(None if more else size), ends and not body)
            if ends and not body:
                transport.ended = True
        if body:
            self.bytes_out += size
            transport.write(body, ends)      # END_STREAM rides on its last frame
        if more:
            if phase is START_PENDING:
                self.response_phase = RESPONSE_MOVES[phase]["head"]
        elif self.trailers:
            self.response_phase = RESPONSE_MOVES[phase]["last_body"]
        else:
            if ends and not transport.ended and not body:
                transport.end()
            self._response_end()
        return transport.suspend()

    def _write_file(self, file, offset, count, owned):
        """A file body in DATA frames, read as the windows allow."""
        conn = self.conn
        transport = conn.transport
        empty = self.no_body or count == 0
        ends = not self.trailers and not self._short()
        if self.response_phase is START_PENDING:
            conn.send_headers(self._h2_head(count), empty and ends)
            if empty and ends:
                transport.ended = True
        if self.trailers:     # a file is the last body
            self.response_phase = RESPONSE_MOVES[self.response_phase]["last_body"]
        if empty:
            if owned:
                file.close()
            if not self.trailers:
                if ends and not transport.ended:
                    transport.end()
                self._response_end()
            return transport.suspend()
        self.bytes_out += count
        done = transport.write_file(file, offset, count, owned)
        if not self.trailers:
            if ends:
                transport.end()
            self._response_end()
        return done

    def _write_trailers(self, fields):
        transport = self.conn.transport
        # RFC 9113 §8.1: trailers are a HEADERS frame with END_STREAM.
        fields = [(bytes(n), bytes(v)) for n, v in fields
                  if bytes(n) not in _H2_CONNECTION_FIELDS]
        transport.end(fields)
        self._response_end()
        return transport.suspend()

    def _send_fullflush(self):
        if self.response_phase is NOT_STARTED:
            raise EventError("http.fullflush: the response has not started")
        conn = self.conn
        if self.response_phase is START_PENDING:
            conn.send_headers(self._h2_head(None), False)
            self.response_phase = RESPONSE_MOVES[self.response_phase]["head"]
        future = Future(conn.loop)
        conn.transport.when_flushed(lambda: future.done() or future.set_result(None))
        return future

    def _response_end(self):
        self.response_phase = RESPONSE_MOVES[self.response_phase]["complete"]
        self.state._complete = True
        if self._short():
            # Fewer bytes than declared: RST_STREAM, so the client can tell.
            self.conn.log.warning("%s: response ended after %d of %d declared bytes; "
                                  "resetting the stream", self.what(), self.sent, self.length)
            self.conn.abort_after_flush(self, "server_error")
            return
        self.conn.transport.when_flushed(self._delivered)

    def app_exited(self, task):
        super().app_exited(task)
        # A stream that ended abnormally is never delivered (section 6's
        # _settle does not come): it is over once its application is.
        if self.state._reason is not None:
            self.conn.release()


class H2Exchange(_H2Response, Exchange):
    """One request stream: section 6's Exchange, framed for HTTP/2."""


class H2Stream:
    """One request stream as its Exchange sees a connection (section 6's
    ``exchange.conn``): the loop, the logs, the socket's addresses, its own
    pagi.transport, and the ways it ends -- for one stream, not the socket."""

    reading = True          # Exchange.receive never has to resume reading
    peer_eof = False        # a stream ends with END_STREAM, not a FIN
    head_base = 0           # the access log's %I counts from the stream's start
    body_clock = None       # --body-min-rate: the last sweep that saw the body due
    body_waited = 0.0       # seconds its window was open while the body was due
    start_body_clock = resume_reading = close_after_flush = staticmethod(lambda: None)
    # The scope's common keys and the words for an application that cannot
    # start are a Connection's (section 6), with this stream's transport.
    base_scope = Connection.base_scope
    cannot_start = Connection.cannot_start

    @property
    def phase(self):
        """As a Connection's phase: CLOSED once the stream is over for the
        application (Exchange.send and app_exited ask)."""
        return CLOSED if self.closed else OPEN

    def __init__(self, h2, stream_id):
        self.h2 = h2
        self.stream_id = stream_id
        self.server = h2.server
        self.loop = h2.loop
        self.log = h2.log
        self.config = h2.config
        self.stream = h2.stream
        self.client = h2.client
        self.server_address = h2.server_address
        self.socket_open = h2.socket_open
        self.transport = H2StreamTransport(h2, stream_id)
        self.exchange = None
        self.closed = False         # the stream is over for the application
        self.bytes_in = 0           # body bytes received
        self.released = False

    def __repr__(self):
        return "<H2Stream %d %r>" % (self.stream_id, self.exchange)

    # -- what the Exchange calls ----------------------------------------------------

    def send_headers(self, headers, end_stream):
        self.h2.engine.send_headers(self.stream_id, headers, end_stream)
        self.h2.flush()

    def consumed(self, size):
        """The application took ``size`` body bytes: the client may send more."""
        if size and not self.released:
            self.h2.engine.consumed(self.stream_id, size)
            self.h2.flush()

    def exchange_over(self, exchange):
        """Section 6's Exchange._settle: delivered, and the application returned."""
        self.release()

    def _over_if_returned(self, exchange):
        """An abnormal end is never delivered: over once the application is."""
        if exchange.app_phase is RETURNED:
            self.release()

    def abort_after_flush(self, exchange, reason):
        exchange.disconnected(reason)
        self.transport.when_flushed(lambda: self.reset(H2_INTERNAL_ERROR))

    def abort(self, reason):
        """The application's response cannot be finished: RST_STREAM."""
        self.reset(H2_INTERNAL_ERROR)
        if self.exchange is not None:
            self.exchange.disconnected(reason)
            self._over_if_returned(self.exchange)

    def respond_error(self, status, message, reason, head=None):
        """A server-generated response on this stream (section 4's words)."""
        if self.closed:
            return
        body = message.encode("utf-8") + b"\n"
        headers = [(b":status", b"%d" % status),
                   (b"content-type", b"text/plain; charset=utf-8"),
                   (b"content-length", b"%d" % len(body))]
        self.server.stamp.add_to(headers)
        self.send_headers(headers, False)
        self.transport.write(body)
        self.transport.end()
        exchange = self.exchange
        if exchange is not None and reason is not None:
            exchange.response_phase = RESPONSE_MOVES[exchange.response_phase]["server_answer"]
            exchange.state._started = True
            exchange.status = status
            exchange.headers = None
            exchange.disconnected(reason)
            self._over_if_returned(exchange)
        elif exchange is None:
            self.transport.when_flushed(self.release)
        self.closed = True          # the application's sends are no-ops now
        self.log.debug("%s: stream %d answered %d %s", self.client, self.stream_id,
                       status, message)

    # -- what the connection calls --------------------------------------------------

    def push(self, data, end_stream):
        """Request body bytes for the application (PAGI HTTP/2 Stream Mapping:
        DATA -> http.request with more 1, or 0 with END_STREAM)."""
        exchange = self.exchange
        self.bytes_in += len(data)
        if self.closed:
            self.consumed(len(data))
            return
        if exchange.waiter is not None:
            self.consumed(len(data))      # taken at once by a waiting receive()
        queue = exchange.queue
        if data and len(queue) >= self.config.max_receive_queue and queue[-1]["more"]:
            # A client that sends many small frames: one event holds them
            # (the stream's window bounds its size).
            last = queue[-1]
            if last["body"].__class__ is not bytearray:
                last["body"] = bytearray(last["body"])
            last["body"] += data
            if end_stream:
                exchange.end_body()
            return
        if data or not end_stream:
            exchange.push_body(data, 0 if end_stream else 1)
        if end_stream:
            exchange.end_body()

    def reset(self, code):
        """RST_STREAM from us; the application's sends become no-ops."""
        if not self.closed:
            self.closed = True
            self.transport.close()
            if self.stream_id in self.h2.engine.streams:
                self.h2.engine.reset_stream(self.stream_id, code)
                self.h2.flush()

    def reset_by_peer(self, reason):
        """RST_STREAM from the client (or our stream error): PAGI HTTP/2
        Stream Mapping, http.disconnect, and outstanding Futures resolve."""
        self.closed = True
        self.transport.close()
        exchange = self.exchange
        if exchange is None:
            self.release()
            return
        exchange.disconnected(reason)
        self._over_if_returned(exchange)

    def release(self):
        """The stream is done for us: forget it.  A stream cut short is
        reset (CANCEL).  A response complete before its request leaves the
        stream half-closed: RFC 9113 §8.1 lets the server reset it with
        NO_ERROR, but then every later frame on it would be ignored (§5.1)
        -- a content-length that lies, trailers without END_STREAM -- where
        the protocol still owes the client its errors; the rest of the
        request is read and dropped, its window given back (as section 6
        drains an unread HTTP/1.1 body)."""
        if self.released:
            return
        self.released = True
        self.closed = True
        h2 = self.h2
        exchange = self.exchange
        cut = exchange is not None and exchange.state._reason is not None
        if cut and self.stream_id in h2.engine.streams:
            h2.engine.reset_stream(self.stream_id, H2_CANCEL)
        if exchange is not None and not cut:
            h2.engine.stream_completed()
        h2.stream_released(self)


class H2Connection(Connection):
    """One HTTP/2 client socket: frames in, streams as scopes, frames out."""

    def __init__(self, server, stream):
        config = server.config
        # No hard limit on the connection's buffer: only the pump (never past
        # the high mark) and the protocol's own frames write to it; each
        # stream's transport holds the limit for its application's bytes.
        transport = Transport(stream, server.loop, config.write_high_watermark,
                              config.write_low_watermark, None)
        Connection.__init__(self, server, stream, transport)
        self.app = server.app
        transport.on_drain(self._on_drain)
        self.engine = H2Protocol(max_concurrent_streams=config.h2_max_concurrent_streams,
                                 max_header_list_size=h2_header_list_limit(config))
        self.streams = {}             # stream id -> H2Stream, until released
        self.socket_open = [True]     # shared by every stream's pagi.connection
        self.requests = 0             # streams begun
        self.goaway_received = False  # the client said it opens no more streams
        self.started = self.loop.now  # the preface is due within header_timeout
        self.idle_set = server.idle   # admission's idle connections (section 10)
        self.corked = False           # inside _on_readable: frames go out at its end

    def loop_context(self):
        return "http/2 connection from %s" % (self.client[0] if self.client else "?")

    def __repr__(self):
        return "<H2Connection fd=%d client=%r streams=%d requests=%d%s>" % (
            self.fd, self.client, len(self.streams), self.requests,
            " closed" if self.closed else " closing" if self.closing else "")

    def start(self):
        self.engine.initiate()
        self.flush()
        self.reading = True
        self.loop.add_reader(self.fd, self._on_readable)
        if self.server.shutting_down:
            self.goaway()        # chosen during a shutdown: no stream will be served

    def flush(self, force=False):
        """Hand the protocol's frames to the Transport.  Discussion: while
        one read's frames are handled (corked), the answers of every stream
        they start -- applications run inline -- are gathered and written
        once, at the end: one send for many responses."""
        if self.corked and not force:
            return
        data = self.engine.data_to_send()
        if data:
            self.transport.write(data)

    def close_after_flush(self):
        self.flush(force=True)
        Connection.close_after_flush(self)

    # -- reading ------------------------------------------------------------------

    def _on_eof(self):
        self.abort("client_closed")     # an HTTP/2 client does not half-close

    def _advance(self):
        pass                            # nothing waits in a parser: feed() took it all

    def _received(self, data):
        """Section 6's Connection read ``data``: frames in, events handled."""
        self.bytes_in += len(data)
        if self.closing:
            return
        self.corked = True
        try:
            for event in self.engine.feed(data):
                handler = _H2_EVENT_HANDLERS[event.__class__]
                handler(self, event)
                if self.closed:
                    return
        finally:
            self.corked = False
        self.flush()
        # What the corked frames held back: more DATA may fit now, and a
        # stream's watermark edges are judged on the written counts.
        for h2stream in list(self.streams.values()):
            st = h2stream.transport
            if st._pending:
                self.pump(st)
            elif st._above or st._flush_waiters:
                st.check()

    def _on_request(self, event):
        server = self.server
        server.requests += 1              # counted against max_requests (section 10)
        if server.requests == server.max_requests:
            server.max_requests_reached()
        self.requests += 1
        self.idle_set.pop(self, None)
        head = event.head
        h2stream = self.streams[event.stream_id] = H2Stream(self, event.stream_id)
        if self.config.max_body_size and head.content_length > self.config.max_body_size:
            h2stream.respond_error(413, "request body too large", None)
            return
        # PAGI SSE "Connection Detection", decided as for HTTP/1.1.
        kind = H2Exchange if head.accept is None else \
            server.h2_exchanges.get(server.exchange_kind(head), H2Exchange)
        exchange = h2stream.exchange = kind(h2stream, head, event.end_stream)
        try:
            start_application(self.app, exchange.scope(), exchange.receive, exchange.send,
                              self.loop, exchange.app_exited)
        except CannotStart as exc:
            h2stream.cannot_start(exc, exchange.what())
            # PAGI HTTP "Application Produced No Response": the backstop 500.
            h2stream.respond_error(500, "Internal Server Error", "server_error")
            exchange.app_phase = APPLICATION_MOVES[exchange.app_phase]["returned"]
            h2stream.release()

    def _on_too_large(self, event):
        h2stream = self.streams[event.stream_id] = H2Stream(self, event.stream_id)
        h2stream.respond_error(431, "Request Header Fields Too Large", None)

    def _on_data(self, event):
        h2stream = self.streams.get(event.stream_id)
        if h2stream is None or h2stream.exchange is None or h2stream.closed:
            self.engine.consumed(event.stream_id, event.flow)   # nobody will read it
            return
        limit = self.config.max_body_size
        if limit and h2stream.bytes_in + len(event.data) > limit:
            exchange = h2stream.exchange
            if exchange.response_phase in _HEAD_OUT:
                h2stream.abort("body_too_large")
            else:
                h2stream.respond_error(413, "request body too large", "body_too_large")
            return
        h2stream.push(event.data, event.end_stream)

    def _on_trailers(self, event):
        # PAGI's http.request has no field for request trailers: they end
        # the body, as section 6 does with a chunked body's trailers.
        h2stream = self.streams.get(event.stream_id)
        if h2stream is not None and h2stream.exchange is not None:
            h2stream.push(b"", True)

    def _on_reset(self, event):
        h2stream = self.streams.get(event.stream_id)
        if h2stream is not None:
            h2stream.reset_by_peer("client_closed" if event.remote else "protocol_error")

    def _on_window(self, event):
        if event.stream_id == 0:
            self.pump_all()
        else:
            h2stream = self.streams.get(event.stream_id)
            if h2stream is not None:
                self.pump(h2stream.transport)

    def _on_goaway(self, event):
        if event.remote:
            # The client opens no more streams; those open finish.
            self.goaway_received = True
            if not self.streams:
                self.close_after_flush()
            return
        # A connection error: GOAWAY is queued; every stream ends.
        self.log.debug("%s: HTTP/2 connection error %d: %s", self.client, event.code,
                       event.message)
        self.flush(force=True)
        self._end_streams("protocol_error")
        self.close_after_flush()

    # -- writing --------------------------------------------------------------------

    def pump(self, st):
        """Move a stream's queued bytes into DATA frames, as far as the
        client's windows and the connection's outgoing buffer allow."""
        engine = self.engine
        transport = self.transport
        high = transport.high_water_mark()
        pending = st._pending
        sid = st.stream_id
        while pending and not st.closed and \
                transport.buffered_amount() + engine.data_queued < high:
            item = pending[0]
            if item.__class__ is _H2End:
                pending.popleft()
                if item.trailers is not None:
                    engine.send_headers(sid, item.trailers, True)
                else:
                    engine.send_data(sid, b"", True)
                st.ended = True
                break
            # A piece at a time, each flushed to the Transport and never past
            # its high-water mark, so the connection's buffer stays bounded
            # however wide the client opens its windows.
            window = min(engine.send_window_for(sid), _READ_CHUNK,
                         high - transport.buffered_amount() - engine.data_queued)
            if window <= 0:
                break
            if item.__class__ is _FileSlice:
                data = item.read(min(window, item.remaining, _READ_CHUNK))
                if not data:                    # the file is shorter than promised
                    pending.popleft()
                    st._pending_size -= item.remaining
                    item.remaining = 0
                    item.finish()
                    continue
                size = len(data)
                item.offset += size
                item.remaining -= size
                if item.remaining == 0:
                    pending.popleft()
                    item.finish()
            else:
                size = len(item)
                if size <= window:
                    pending.popleft()
                    data = item
                else:
                    data = item[:window]
                    pending[0] = memoryview(item)[window:]
                    size = window
            end = False
            if pending and pending[0].__class__ is _H2End and pending[0].trailers is None:
                pending.popleft()          # END_STREAM rides on the last DATA frame
                end = st.ended = True
            st._pending_size -= size
            st.bytes_written += size
            st.last_progress = self.loop.now
            engine.send_data(sid, bytes(data), end)
            self.flush()
        self.flush()
        st.check()

    def pump_all(self):
        for h2stream in list(self.streams.values()):
            if h2stream.transport._pending:
                self.pump(h2stream.transport)

    def _on_drain(self):
        self.pump_all()
        for h2stream in list(self.streams.values()):
            h2stream.transport.check()

    # -- the end of streams and of the connection -------------------------------------

    def stream_released(self, h2stream):
        self.streams.pop(h2stream.stream_id, None)
        self.flush()
        if self.streams or self.closed:
            return
        if self.closing or self.goaway_received or self.server.shutting_down:
            self.close_after_flush()
        else:
            self.last_activity = self.loop.now
            self.idle_set[self] = None      # a candidate for eviction (section 10)

    def _end_streams(self, reason):
        streams = list(self.streams.values())
        for h2stream in streams:
            h2stream.closed = True
            h2stream.transport.close()
            if h2stream.exchange is not None:
                h2stream.exchange.disconnected(reason)

    def abort(self, reason):
        if self.closed:
            return
        self._release()
        self.stream.close()
        self._end_streams(reason)

    def _release(self):
        self.socket_open[0] = False
        Connection._release(self)

    def goaway(self):
        """GOAWAY NO_ERROR (RFC 9113 §6.8): no new streams; those open finish."""
        if not self.closed:
            self.engine.goaway(H2_NO_ERROR)
            self.flush()
            if not self.streams:
                self.close_after_flush()

    def shutdown(self):
        """Server shutdown: GOAWAY, then each stream finishes (an event
        stream is ended by the server, as section 8 does on HTTP/1.1)."""
        self.goaway()
        for h2stream in list(self.streams.values()):
            if h2stream.exchange is not None:
                h2stream.exchange.shutdown()

    def evict(self):
        """Admission (section 10) needs the slot of this idle connection."""
        if self.streams or self.stream.has_bytes():
            return False
        self.log.debug("%s: idle HTTP/2 connection closed to admit a new one", self.client)
        self.goaway()
        return True

    def _check_body_rate(self, h2stream, now, config):
        """--body-min-rate per stream (section 6's _below_min_rate): the time
        counted is the time the client could have sent -- its stream window
        open -- measured from sweep to sweep, so an application that does not
        read (the window shut) never makes its client slow.  Too slow: 408 on
        the stream, or RST_STREAM once the response has begun (client_timeout)."""
        exchange = h2stream.exchange
        state = self.engine.streams.get(h2stream.stream_id)
        if exchange is None or h2stream.closed or exchange.request_phase is not BODY \
                or state is None:
            h2stream.body_clock = None
            return
        if h2stream.body_clock is not None and state.recv_window > 0:
            h2stream.body_waited += now - h2stream.body_clock
        h2stream.body_clock = now
        if _below_min_rate(h2stream.body_waited, h2stream.bytes_in, config.body_grace,
                           config.body_min_rate):
            if exchange.response_phase in _HEAD_OUT:
                h2stream.abort("client_timeout")
            else:
                h2stream.respond_error(408, "Request Timeout: the request body arrives too "
                                       "slowly", "client_timeout")

    def check_timeouts(self, now, config):
        if self.write_timed_out(now, config):
            self.abort("write_timeout")
            return
        # A stream whose bytes wait for a window the client never opens
        # (a zero-window stall): reset after write_timeout, as a socket
        # nobody reads is dropped after it.
        for h2stream in list(self.streams.values()):
            st = h2stream.transport
            if st._pending and not st.closed and now - st.last_progress > config.write_timeout:
                h2stream.abort("write_timeout")
            elif config.body_min_rate:
                self._check_body_rate(h2stream, now, config)
        if self.closing:
            pass
        elif not self.engine.settings_seen:
            if now - self.started > config.header_timeout:
                self.close()          # no preface in time (slowloris)
        elif not self.streams:
            if now - self.last_activity > config.keepalive_timeout:
                self.goaway()
        elif now - max(self.last_activity, self.transport.last_progress) > \
                config.client_timeout and any(
                    s.exchange is not None and s.exchange.request_phase is not BODY_DONE
                    for s in self.streams.values()):
            self.abort("client_timeout")


_H2_EVENT_HANDLERS = {
    H2Request: H2Connection._on_request,
    H2HeadersTooLarge: H2Connection._on_too_large,
    H2Data: H2Connection._on_data,
    H2Trailers: H2Connection._on_trailers,
    H2Reset: H2Connection._on_reset,
    H2WindowOpened: H2Connection._on_window,
    H2GoAway: H2Connection._on_goaway,
}


class ProtocolChoice:
    """A new connection before it is known to speak HTTP/1.1 or HTTP/2.

    On TLS, the handshake's ALPN result decides (RFC 7301, RFC 9113 §3.2);
    on cleartext, the first bytes, read without taking them (MSG_PEEK;
    only a first "P" or "PR" is taken, and handed to the chosen connection):
    the client preface is HTTP/2 with prior knowledge (RFC 9113 §3.3),
    anything else HTTP/1.1.  The chosen connection then reads the socket
    from the start.  Until then this holds the slot, under header_timeout.
    It is not a Connection (it never reads, writes or lingers), only what
    the server asks of one: check_timeouts, shutdown, abort, evict, closed."""

    closed = False          # decided (handed over) or closed
    closing = False
    taken = b""             # "P" or "PR", read while the choice waits for a third byte

    def __init__(self, server, stream):
        self.server = server
        self.loop = server.loop
        self.log = server.log
        self.stream = stream
        self.fd = stream.fd
        self.client = stream.peer_address
        self.started = self.loop.now

    def __repr__(self):
        return "<ProtocolChoice fd=%d client=%r>" % (self.fd, self.client)

    def loop_context(self):
        return "new connection from %s" % (self.client[0] if self.client else "?")

    def start(self):
        self.loop.add_reader(self.fd, self._on_readable)

    def _on_readable(self):
        stream = self.stream
        try:
            if not stream.scheme_secure:
                first = self.taken + stream.peek(len(H2_PREFACE))
                if len(first) == len(self.taken):
                    self.close()          # the client left without a word
                    return
                if H2_PREFACE.startswith(first) and len(first) < 3:
                    # "P" or "PR": PUT, POST or the preface?  Take them, so
                    # that the socket is readable again only when more
                    # arrives (a peeked byte would wake us at once, forever);
                    # the chosen connection gets them first.
                    self.taken += stream.recv(len(first) - len(self.taken))
                    return
                http2 = first[:3] == b"PRI"
            else:
                try:
                    stream.recv(0)        # runs the handshake; takes no data
                except BlockingIOError:
                    if not stream.handshaken:
                        return
                http2 = stream.sock.selected_alpn_protocol() == "h2"
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.log.debug("%s: read failed: %s", self.client, exc)   # as section 6 says it
            self.close()
            return
        self._hand_over(H2Connection if http2 else HTTPConnection)

    def _hand_over(self, kind):
        self.closed = True
        self.loop.remove_reader(self.fd)
        server = self.server
        conn = kind(server, self.stream)
        server.connection_opened(conn)      # the new owner takes the slot ...
        server.connection_closed(self)      # ... this one held until now
        conn.start()
        if self.taken:
            conn._received(self.taken)       # before any byte still in the socket
        if self.stream.scheme_secure and self.stream.sock.pending():
            self.loop.call_soon(conn._on_readable)   # decrypted bytes wait in ssl

    def check_timeouts(self, now, config):
        if now - self.started > config.header_timeout:
            self.close()

    def shutdown(self):
        self.loop.call_later(_FIRST_REQUEST_GRACE, self.close)

    def abort(self, reason):
        self.close()

    def evict(self):
        return False

    def close(self):
        if not self.closed:
            self.closed = True
            self.loop.forget(self.fd)
            self.stream.close()
            self.server.connection_closed(self)


# ============================================================================
# 7. WebSocket (RFC 6455; RFC 7692; PAGI "WebSocket")
#
# A request with "Upgrade: websocket" is handed over by HTTPConnection, with
# its socket and its Transport, to a WebSocketConnection: one websocket
# scope for the whole session.  FrameParser is sans-I/O like section 4: it
# turns client bytes into messages (fragments reassembled, compressed ones
# inflated, text decoded as it arrives) and control frames, and raises
# FrameError -- which carries the close code -- for a frame that breaks
# RFC 6455 or RFC 7692.  PerMessageDeflate is the compression extension:
# the offer/answer of RFC 7692 §7 and one connection's zlib state, no I/O
# either.  Keepalive pings and their deadlines are timestamps the server's
# sweep checks (check_timeouts), never a timer per connection.
#
# Before you edit: the session has four states.  CONNECTING until the
# application accepts (101) or refuses (403, or its own denial response);
# OPEN; CLOSING once the server has sent a close frame and waits for the
# client's; CLOSED once the websocket.disconnect event is decided.
# ============================================================================

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"    # RFC 6455 §1.3
_OP_CONT, _OP_TEXT, _OP_BINARY = 0x0, 0x1, 0x2         # RFC 6455 §5.2
_OP_CLOSE, _OP_PING, _OP_PONG = 0x8, 0x9, 0xA
_WS_CLOSE_TIMEOUT = 5.0    # seconds to wait for the client's close frame
_PERMESSAGE_DEFLATE = "websocket.permessage-deflate"   # its scope["extensions"] key
_CONNECTING, _OPEN, _CLOSING, _CLOSED = "connecting", "open", "closing", "closed"

# RFC 6455's phases of one session, as WebSocketConnection keeps them in
# ``state`` (its socket's phase is Connection's SOCKET_MACHINE).
WEBSOCKET_MACHINE = Machine("websocket", "state", (_CONNECTING,), [
    (_CONNECTING, "accept", _OPEN),         # websocket.accept: the 101 is written
    (_CONNECTING, "refuse", _CLOSED),       # a bad handshake, websocket.close, 403/500/503
    (_CONNECTING, "denied", _CLOSED),       # the application's denial response ended
    (_CONNECTING, "ended", _CLOSED),        # the client left before an answer
    (_OPEN, "close", _CLOSING),             # our close frame is sent (§7.1.2)
    (_OPEN, "ended", _CLOSED),              # websocket.disconnect decided
    (_CLOSING, "ended", _CLOSED),
    (_CLOSED, "ended", _CLOSED),            # the disconnect event decided after a refusal
])
WEBSOCKET_MOVES = WEBSOCKET_MACHINE.moves


class FrameError(Exception):
    """A frame that breaks RFC 6455: the connection fails with ``code``."""

    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code


def valid_close_code(code):
    """RFC 6455 §7.4.1 and the IANA registry: codes a close frame may carry
    (1005, 1006 and 1015 are for reporting only, never sent)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _unmask(data, mask):
    """RFC 6455 §5.3: XOR with the 4-byte key, done on one big integer."""
    size = len(data)
    if not size:
        return b""
    key = int.from_bytes((mask * (size // 4 + 1))[:size], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(size, "big")


def ws_frame_head(opcode, size, compressed=False):
    """The head of a server frame: FIN set, not masked (RFC 6455 §5.1-5.2);
    RSV1 set for the frame of a compressed message (RFC 7692 §6)."""
    first = (0xC0 if compressed else 0x80) | opcode
    if size < 126:
        return bytes((first, size))
    if size < 65536:
        return bytes((first, 126)) + size.to_bytes(2, "big")
    return bytes((first, 127)) + size.to_bytes(8, "big")


def ws_frame(opcode, payload=b""):
    return ws_frame_head(opcode, len(payload)) + payload


def ws_close_payload(code, reason=""):
    if code == 1005:
        return b""       # "no status": an empty close frame
    # §5.5: a control frame carries at most 125 bytes; cut the reason on a
    # character boundary so that it stays UTF-8.
    encoded = reason.encode("utf-8")
    if len(encoded) > 123:
        encoded = encoded[:123].decode("utf-8", "ignore").encode("utf-8")
    return code.to_bytes(2, "big") + encoded


# -- permessage-deflate (RFC 7692) ---------------------------------------------
#
# Discussion: what compression costs per connection.  zlib's deflate state
# is about 2**(window_bits + 2) + 2**(mem_level + 9) bytes plus 6 KiB, its
# inflate state 2**window_bits plus 7 KiB.  With zlib's own defaults (15,
# 8) that is about 300 KiB for one connection, most of a small device's
# memory for a thousand idle chat clients.  pagi_ref compresses with a 4 KiB
# window (12 bits) and mem_level 5 -- about 40 KiB -- and asks the client
# for a 4 KiB window too when its offer lets the server choose (browsers'
# offers do); small JSON messages, the common case, lose little ratio to
# the smaller window.  The zlib objects are made on a connection's first
# compressed message, not at the handshake; a side that agreed to "no
# context takeover" keeps none between messages; and a session that has
# sent nothing for _DEFLATE_IDLE seconds drops its deflate state (the
# server's sweep does it), so an idle session keeps only its inflate state,
# which the client's next message may need.  bench/README.md has the
# measured figures.

_DEFLATE_WINDOW_BITS = 12     # the largest window pagi_ref compresses with or asks for
_DEFLATE_MEM_LEVEL = 5        # zlib memLevel: 2**(5 + 9) bytes of hash and buffer
_DEFLATE_LEVEL = 6            # zlib's default speed/ratio trade-off
_DEFLATE_TAIL = b"\x00\x00\xff\xff"   # §7.2.1 / §7.2.2: cut on send, appended on receive
_INFLATE_STEP = 65536         # compressed bytes handed to zlib at a time
_DEFLATE_IDLE = 10.0          # seconds without a message out before the deflate state goes
# §7.1.2: a window size is an integer from 8 to 15 (pagi_ref: written
# without leading zeros, as every client writes it).
_WINDOW_BITS_VALUES = {str(n): n for n in range(8, 16)}


def extension_offers(values):
    """RFC 6455 §9.1: the Sec-WebSocket-Extensions field values, parsed into
    [(name, [(parameter, value or None), ...]), ...] in the client's order.

        extension = extension-token *( ";" extension-param )
        extension-param = token [ "=" (token | quoted-string) ]
          ; a quoted-string value, unescaped, MUST conform to token

    Names and parameters are compared case-insensitively (lower-cased here).
    A value that does not fit the grammar raises ValueError.  Each step is a
    split or a fullmatch of one character class: linear in the input."""
    offers = []
    for value in values:
        for element in value.split(b","):
            if not element.strip(b" \t"):
                continue           # RFC 9110 §5.6.1: empty list elements are ignored
            parts = element.split(b";")
            name = parts[0].strip(b" \t")
            if not _TOKEN.fullmatch(name):
                raise ValueError("extension name %r is not a token" % name)
            params = []
            for part in parts[1:]:
                key, eq, val = part.partition(b"=")
                key = key.strip(b" \t")
                if not _TOKEN.fullmatch(key):
                    raise ValueError("extension parameter %r is not a token" % key)
                if eq:
                    val = val.strip(b" \t")
                    if val[:1] == b'"':
                        if len(val) < 2 or val[-1:] != b'"':
                            raise ValueError("unterminated quoted string %r" % val)
                        val = re.sub(rb"\\(.)", rb"\1", val[1:-1], flags=re.S)
                    if not _TOKEN.fullmatch(val):
                        raise ValueError("extension parameter value %r is not a token" % val)
                    val = val.decode("ascii")
                else:
                    val = None
                params.append((key.lower().decode("ascii"), val))
            offers.append((name.lower().decode("ascii"), params))
    return offers


class PerMessageDeflate:
    """The permessage-deflate extension as agreed with one client (RFC 7692
    §7), and that connection's zlib state.

    server_max_window_bits is the window the server compresses with,
    client_max_window_bits the one it inflates with (15 when the client's
    offer did not let the server choose)."""

    def __init__(self, server_no_context_takeover=False, client_no_context_takeover=False,
                 server_max_window_bits=15, client_max_window_bits=15, response=b""):
        self.server_no_context_takeover = server_no_context_takeover
        self.client_no_context_takeover = client_no_context_takeover
        self.server_max_window_bits = server_max_window_bits
        self.client_max_window_bits = client_max_window_bits
        self.response = response       # the Sec-WebSocket-Extensions value to answer
        self._compressor = None        # zlib state for messages out, made when needed
        self._decompressor = None      # zlib state for messages in, made when needed

    def __repr__(self):
        return "<PerMessageDeflate %s>" % self.response.decode("ascii")

    @classmethod
    def negotiate(cls, offers):
        """The agreement for the first acceptable permessage-deflate offer of
        ``offers`` (from extension_offers), or None: no compression."""
        for name, params in offers:
            if name == "permessage-deflate":
                agreed = cls.accept(params)
                if agreed is not None:
                    return agreed
        return None

    @classmethod
    def accept(cls, params):
        """RFC 7692 §7: the agreement answering one offer, or None to decline it.

        §7: "A server MUST decline an extension negotiation offer for this
        extension if ... the negotiation offer contains an extension
        parameter not defined for use in an offer ... an extension parameter
        with an invalid value ... multiple extension parameters with the
        same name."  Declining an offer lets the next one be tried."""
        seen = set()
        server_nct = client_nct = False
        server_bits = client_bits = None
        for name, value in params:
            if name in seen:
                return None
            seen.add(name)
            if name == "server_no_context_takeover" and value is None:
                server_nct = True            # §7.1.1.1: no value
            elif name == "client_no_context_takeover" and value is None:
                client_nct = True            # §7.1.1.2: no value
            elif name == "server_max_window_bits" and value in _WINDOW_BITS_VALUES:
                server_bits = _WINDOW_BITS_VALUES[value]   # §7.1.2.1: a value is required
            elif name == "client_max_window_bits" and (
                    value is None or value in _WINDOW_BITS_VALUES):
                # §7.1.2.2: the client may leave the value out ("any size").
                client_bits = _WINDOW_BITS_VALUES[value] if value else 15
            else:
                return None
        answer = [b"permessage-deflate"]
        # §7.1.1.1: an offered server_no_context_takeover is accepted by
        # echoing it; §7.1.1.2: client_no_context_takeover may be echoed
        # (then the server can free its inflate state between messages).
        if server_nct:
            answer.append(b"server_no_context_takeover")
        if client_nct:
            answer.append(b"client_no_context_takeover")
        # §7.1.2.1: the server may name a window no larger than the offered
        # one, and may name one when none was offered.
        ours = min(server_bits or 15, _DEFLATE_WINDOW_BITS)
        if ours < 15 or server_bits is not None:
            answer.append(b"server_max_window_bits=%d" % ours)
        # §7.1.2.2: the server may name the client's window only when the
        # offer has client_max_window_bits, and no larger than its value.
        theirs = 15
        if client_bits is not None:
            theirs = min(client_bits, _DEFLATE_WINDOW_BITS)
            answer.append(b"client_max_window_bits=%d" % theirs)
        return cls(server_nct, client_nct, ours, theirs, b"; ".join(answer))

    def scope_entry(self):
        """What the application sees: scope["extensions"]["websocket.permessage-deflate"]."""
        return {"server_no_context_takeover": self.server_no_context_takeover,
                "client_no_context_takeover": self.client_no_context_takeover,
                "server_max_window_bits": self.server_max_window_bits,
                "client_max_window_bits": self.client_max_window_bits}

    def compress(self, payload):
        """§7.2.1: one message's payload, compressed -- deflate, flushed to a
        byte boundary (which ends in 00 00 ff ff), those 4 octets removed.

        zlib cannot make a raw deflate stream with an 8-bit window; with 9
        bits its matches reach back at most 512 - 262 = 250 bytes, so a
        stream made with 9 is one an 8-bit (256-byte) window decodes: an
        agreed server_max_window_bits=8 compresses with 9."""
        compressor = self._compressor
        if compressor is None:
            compressor = zlib.compressobj(_DEFLATE_LEVEL, zlib.DEFLATED,
                                          -max(self.server_max_window_bits, 9),
                                          _DEFLATE_MEM_LEVEL)
        # §7.1.1.1: without context takeover, each message starts afresh;
        # dropping the state between messages is also what keeps an idle
        # connection small.
        self._compressor = None if self.server_no_context_takeover else compressor
        data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
        return data[:-4]

    def forget_compressor(self):
        """Let go of the deflate state (most of a session's compression
        memory); the next message starts a fresh one.  Allowed at any time:
        context takeover is a permission, not a duty (§7.1.1.1: "the server
        MAY ..."), and a message that refers to nothing earlier is one any
        client's inflater takes."""
        self._compressor = None

    def inflate(self, data, final, room):
        """§7.2.2: the next piece of a compressed message, decompressed.

        ``final`` marks the message's last frame (the 4 octets 00 00 ff ff
        are appended to it).  ``room`` is how many more bytes the message
        may inflate to (None: no limit).  The limit is checked while
        inflating: zlib is handed at most _INFLATE_STEP compressed bytes at
        a time and asked for at most room + 1 bytes out, so a deflate bomb
        stops at the limit with FrameError 1009 and is never held whole."""
        inflater = self._decompressor
        if inflater is None:
            inflater = self._decompressor = zlib.decompressobj(-self.client_max_window_bits)
        out = []
        size = 0
        steps = [memoryview(data)[i:i + _INFLATE_STEP]
                 for i in range(0, len(data), _INFLATE_STEP)]
        if final:
            steps.append(_DEFLATE_TAIL)
        for chunk in steps:
            while chunk:
                if inflater.eof:
                    # The message carried a final deflate block (BFINAL):
                    # only the tail appended above may follow it.
                    if chunk is _DEFLATE_TAIL and inflater.unused_data in (b"", _DEFLATE_TAIL):
                        break
                    raise FrameError(1007, "data after the end of a deflate stream")
                try:
                    piece = inflater.decompress(chunk, 0 if room is None else room - size + 1)
                except zlib.error as exc:
                    raise FrameError(1007, "compressed message is not valid deflate "
                                           "data: %s" % exc)
                size += len(piece)
                if room is not None and size > room:
                    raise FrameError(1009, "message over the size limit once inflated")
                out.append(piece)
                chunk = inflater.unconsumed_tail
        if final and (self.client_no_context_takeover or inflater.eof):
            # §7.1.1.2: no context to keep -- or a stream that ended with
            # BFINAL, after which zlib cannot go on: the next message
            # starts a new one.
            self._decompressor = None
        return b"".join(out)


class FrameParser:
    """Client frames in; ("text", str), ("bytes", bytes), ("ping", data),
    ("pong", data), ("close", code, reason) out; None for "need more".

    ``deflate`` is the PerMessageDeflate agreed at the handshake, if any:
    then RSV1 on a message's first frame means "compressed" (RFC 7692 §6)."""

    def __init__(self, max_message_size, deflate=None):
        self.max_message_size = max_message_size
        self.deflate = deflate
        self._buf = bytearray()     # bytes received, not yet parsed
        self._parts = None          # the fragments of a message in progress
        self._text = False          # that message is text
        self._compressed = False    # that message is compressed
        self._wire = 0              # its payload bytes on the wire so far
        self._size = 0              # its payload bytes delivered so far (inflated)
        self._decoder = None        # incremental UTF-8 decoder for text

    def feed(self, data):
        self._buf += data

    def _wire_limit(self, compressed):
        """The most payload bytes a message may take on the wire (0: any)."""
        limit = self.max_message_size
        if compressed and limit:
            # Deflate can grow incompressible data a little (stored blocks:
            # 5 bytes per 64 KiB); the inflated size is what the limit is for.
            return limit + (limit >> 10) + 64
        return limit

    def next_event(self):
        while True:
            buf = self._buf
            if len(buf) < 2:
                return None
            b0, b1 = buf[0], buf[1]
            fin, opcode, size = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            # RFC 6455 §5.2: RSV1-3 MUST be 0 unless an extension defines
            # them.  RFC 7692 §6: permessage-deflate defines RSV1, the "Per-
            # Message Compressed" bit, on the first frame of a data message
            # only -- never on a continuation or a control frame (§6.1).
            rsv = b0 & 0x70
            if rsv:
                if rsv != 0x40 or self.deflate is None:
                    raise FrameError(1002, "reserved bits set")
                if opcode not in (_OP_TEXT, _OP_BINARY):
                    raise FrameError(1002, "RSV1 set on a control or continuation frame")
            # §5.1: a server MUST close on a frame from the client that is
            # not masked.
            if not b1 & 0x80:
                raise FrameError(1002, "client frame not masked")
            if opcode >= 8:
                if opcode not in (_OP_CLOSE, _OP_PING, _OP_PONG):
                    raise FrameError(1002, "unknown opcode %d" % opcode)
                # §5.5: control frames are at most 125 bytes, never fragmented.
                if not fin:
                    raise FrameError(1002, "fragmented control frame")
                if size > 125:
                    raise FrameError(1002, "control frame over 125 bytes")
            elif opcode not in (_OP_CONT, _OP_TEXT, _OP_BINARY):
                raise FrameError(1002, "unknown opcode %d" % opcode)
            pos = 2
            if size == 126:
                if len(buf) < 4:
                    return None
                size, pos = int.from_bytes(buf[2:4], "big"), 4
            elif size == 127:
                if len(buf) < 10:
                    return None
                size, pos = int.from_bytes(buf[2:10], "big"), 10
                if size >> 63:
                    raise FrameError(1002, "payload length with the high bit set")
            if opcode < 8:
                compressed = bool(rsv) if opcode else self._compressed
                wire = self._wire if opcode == _OP_CONT else 0
                limit = self._wire_limit(compressed)
                if limit and wire + size > limit:
                    raise FrameError(1009, "message over %d bytes" % self.max_message_size)
            end = pos + 4 + size
            if len(buf) < end:
                return None
            payload = _unmask(bytes(buf[pos + 4:end]), bytes(buf[pos:pos + 4]))
            del buf[:end]
            if opcode == _OP_CLOSE:
                return self._close(payload)
            if opcode == _OP_PING:
                return ("ping", payload)
            if opcode == _OP_PONG:
                return ("pong", payload)
            # §5.4: a continuation needs a message to continue; a new message
            # may not start inside a fragmented one.
            if opcode == _OP_CONT:
                if self._parts is None:
                    raise FrameError(1002, "continuation frame with no message to continue")
            else:
                if self._parts is not None:
                    raise FrameError(1002, "new message inside a fragmented one")
                self._parts, self._text, self._size, self._wire = [], opcode == _OP_TEXT, 0, 0
                self._compressed = bool(rsv)
                self._decoder = codecs.getincrementaldecoder("utf-8")() if self._text else None
            self._wire += size
            if self._compressed:
                limit = self.max_message_size
                payload = self.deflate.inflate(payload, bool(fin),
                                               limit - self._size if limit else None)
            self._size += len(payload)
            if self._text:
                try:   # §8.1: fail as soon as the text is not UTF-8
                    self._parts.append(self._decoder.decode(payload, final=bool(fin)))
                except UnicodeDecodeError:
                    raise FrameError(1007, "text message is not UTF-8")
            else:
                self._parts.append(payload)
            if not fin:
                continue
            parts, self._parts, self._size, self._wire = self._parts, None, 0, 0
            if self._text:
                return ("text", "".join(parts))
            return ("bytes", b"".join(parts))

    @staticmethod
    def _close(payload):
        # §5.5.1: no body, or a 2-byte code then a UTF-8 reason.  §8.1 (and
        # PAGI): a reason that is not UTF-8 fails the connection with 1007.
        if not payload:
            return ("close", 1005, "")
        if len(payload) == 1:
            raise FrameError(1002, "close frame with a 1-byte payload")
        code = int.from_bytes(payload[:2], "big")
        if not valid_close_code(code):
            raise FrameError(1002, "close code %d is not allowed on the wire" % code)
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError(1007, "close reason is not UTF-8")
        return ("close", code, reason)


WEBSOCKET_SEND_EVENTS = {
    "websocket.accept": {"subprotocol": ("text", False), "headers": ("headers", False)},
    "websocket.send": {"bytes": ("bytes", False), "text": ("text", False)},
    "websocket.close": {"code": ("close_code", False), "reason": ("text", False)},
    "websocket.keepalive": {"interval": ("seconds", True), "timeout": ("seconds", False)},
    "websocket.http.response.start": {"status": ("status", True),
                                      "headers": ("headers", False)},
    "websocket.http.response.body": {"body": ("bytes", False), "more": ("flag", False)},
}


def _check_close_code(etype, field, value):
    """The code of websocket.close: one a close frame may carry."""
    _expect(isinstance(value, int) and not isinstance(value, bool), etype, field, "int", value)
    if not valid_close_code(value):
        raise EventError("%s: %r %d may not be sent in a close frame (RFC 6455 §7.4)"
                         % (etype, field, value))


_WEBSOCKET_SEND_SCHEMA = compile_schema(WEBSOCKET_SEND_EVENTS, {"close_code": _check_close_code})


def _websocket_handshake_error(head):
    """RFC 6455 §4.2.1-§4.2.2 and §4.4: (status, message, headers) or None."""
    if head.method != "GET" or head.http_version != "1.1":
        return (400, "a WebSocket handshake is a GET in HTTP/1.1", ())
    if head.chunked or head.content_length:
        return (400, "a WebSocket handshake has no body", ())
    version = key = None
    for name, value in head.headers:
        if name == b"sec-websocket-version":
            version = value.strip()
        elif name == b"sec-websocket-key":
            key = value.strip()
    if version != b"13":
        return (426, "Sec-WebSocket-Version must be 13", [(b"sec-websocket-version", b"13")])
    try:
        if key is None or len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError(key)
    except (ValueError, binascii.Error):
        return (400, "Sec-WebSocket-Key must be 16 bytes in base64", ())
    try:
        extension_offers(value for name, value in head.headers
                         if name == b"sec-websocket-extensions")
    except ValueError as exc:
        # §4.2.1: a handshake that does not match the description (here
        # §9.1's grammar of Sec-WebSocket-Extensions) gets 400.
        return (400, "Sec-WebSocket-Extensions is malformed: %s" % exc, ())
    return None


class WebSocketConnection(Connection):
    """One upgraded socket: the ``websocket`` scope, frames in and out."""

    def __init__(self, server, stream, transport, head, leftover):
        Connection.__init__(self, server, stream, transport)
        server.connection_opened(self)   # the slot the HTTPConnection held
        loop = self.loop
        self.access_client = self.client   # %h: the scope's client (--proxy-headers)
        self.head = head
        self.state = _CONNECTING      # WEBSOCKET_MACHINE
        self.queue = collections.deque([{"type": "websocket.connect"}])
        self.waiter = None            # a pending receive()
        self.disconnect = None        # the websocket.disconnect event, once decided
        self.parser = FrameParser(self.config.ws_max_message_size)
        self.parser.feed(leftover)
        self.denial = None            # a denial's headers, once its start was sent
        self.denial_body = None       # the denial's body mode, once its head went out
        self.failure = None           # (code, message) of a bad frame, not yet acted on
        self.deflate = None           # the PerMessageDeflate agreed, if any
        self.last_compressed = None   # when the last compressed message went out
        # Keepalive: deadlines on the loop's clock, kept by the server's
        # sweep (check_timeouts), not by a timer per connection.
        self.keepalive = (self.config.ws_ping_interval, self.config.ws_ping_timeout)
        self.ping_due = loop.now + self.keepalive[0] if self.keepalive[0] > 0 else None
        self.pong_due = None          # when the pong to the last ping is late
        self.close_due = None         # when the client's close frame is late
        # For the access log's one line per session, written when it ends.
        self.status = None            # 101, or the status of the refusal or denial
        self.bytes_in = len(leftover)  # bytes received after the handshake's head
        self.wire_start = transport.bytes_written
        self.received = time.time()
        self.t0 = time.monotonic()
        error = _websocket_handshake_error(head)
        if error is not None:
            status, message, headers = error
            self.status = status
            transport.write(error_response(status, message, headers, server.stamp))
            self.state = WEBSOCKET_MOVES[self.state]["refuse"]
            self.close_after_flush()
            return
        subprotocols = []
        for name, value in head.headers:
            if name == b"sec-websocket-protocol":
                subprotocols += [p.strip().decode("latin-1") for p in value.split(b",")
                                 if p.strip()]
        self.subprotocols = subprotocols
        extensions = {"websocket.http.response": {}}
        if self.config.ws_per_message_deflate:
            self.deflate = PerMessageDeflate.negotiate(extension_offers(
                value for name, value in head.headers if name == b"sec-websocket-extensions"))
            if self.deflate is not None:
                self.parser.deflate = self.deflate
                extensions[_PERMESSAGE_DEFLATE] = self.deflate.scope_entry()
        scope = self.base_scope("websocket", head, "wss" if stream.scheme_secure else "ws",
                                extensions)
        scope["subprotocols"] = subprotocols
        self.access_client = scope["client"]
        self.resume_reading()
        try:
            start_application(server.app, scope, self.receive, self.send, loop,
                              self._app_exited, "websocket")
        except CannotStart as exc:
            self.cannot_start(exc, "websocket %s" % head.target.decode("latin-1"))
            # Not accepted: the handshake's answer is the backstop 500.
            self._refuse(500, "Internal Server Error")

    def __repr__(self):
        return "<WebSocketConnection fd=%d %s>" % (self.fd, self.state)

    def _release(self):
        """The session is over: its one access-log line, then the socket."""
        if self.server.access_log is not None:
            code = self.disconnect["code"] if self.disconnect is not None else None
            self.server.log_access(AccessEntry(
                self.access_client, self.received, time.monotonic() - self.t0,
                self.head.request_line(), self.status, 0, self.head.headers,
                bytes_in=self.bytes_in,
                bytes_out=self.transport.bytes_written - self.wire_start,
                end="close:%d" % code if code is not None else "done"))
        Connection._release(self)

    def loop_context(self):
        return "websocket %s" % ascii(decode_path(self.head.path))[1:-1]

    # -- receive ----------------------------------------------------------------

    def receive(self):
        if self.failure is not None and not self.queue and self.state == _OPEN:
            self._fail(*self.failure)     # the messages before the bad frame are had
        if self.queue:
            if not self.reading and self.state in (_OPEN, _CLOSING) and self.failure is None:
                self.resume_reading()     # and _advance, for frames parked in the parser
            return _resolved(self.queue.popleft())
        if self.disconnect is not None:
            return _resolved(dict(self.disconnect))
        if self.waiter is not None:
            return _failed(RuntimeError("receive() called while another receive() is pending"))
        self.waiter = Future(self.loop)
        return self.waiter

    def _deliver(self, event):
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(event)
                return
        self.queue.append(event)

    def _ended(self, code, reason):
        """Decide the websocket.disconnect event (once) and deliver it."""
        if self.disconnect is not None:
            return
        self.state = WEBSOCKET_MOVES[self.state]["ended"]
        self.ping_due = self.pong_due = self.close_due = None
        self.disconnect = {"type": "websocket.disconnect", "code": code, "reason": reason}
        self._deliver(dict(self.disconnect))

    # -- send -------------------------------------------------------------------

    def send(self, event):
        if self.state == _CLOSED or self.closed:
            return _NO_WAIT    # PAGI core: send after the session ended is a no-op
        try:
            etype = validate_event(event, _WEBSOCKET_SEND_SCHEMA)
            return getattr(self, "_" + etype.replace(".", "_"))(event)
        except EventError as exc:
            return _failed(exc)

    def _websocket_accept(self, event):
        if self.state != _CONNECTING or self.denial is not None:
            raise EventError("websocket.accept: the handshake is already answered")
        key = None
        for name, value in self.head.headers:
            if name == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
        self.status = 101
        # RFC 6455 §4.2.2 step 5: Upgrade, Connection (frame_response adds
        # it to a 101) and Sec-WebSocket-Accept, then what was negotiated.
        fields = [(b"upgrade", b"websocket"), (b"sec-websocket-accept", accept)]
        subprotocol = event.get("subprotocol")
        if subprotocol is not None:
            if subprotocol not in self.subprotocols:
                raise EventError("websocket.accept: 'subprotocol' %r was not offered by the "
                                 "client (%r)" % (subprotocol, self.subprotocols))
            fields.append((b"sec-websocket-protocol", subprotocol.encode("latin-1")))
        if self.deflate is not None:
            fields.append((b"sec-websocket-extensions", self.deflate.response))
        headers = [(bytes(n), bytes(v)) for n, v in event.get("headers") or ()]
        for name, _value in headers:
            if name.lower() == b"sec-websocket-extensions":
                # Only the server can speak an extension's framing.
                raise EventError("websocket.accept: 'headers' may not set "
                                 "sec-websocket-extensions: the server negotiates extensions")
        self.transport.write(frame_response(101, fields + headers,
                                            stamp=self.server.stamp)[0])
        self.state = WEBSOCKET_MOVES[self.state]["accept"]
        self.resume_reading()
        self.loop.call_soon(self._advance)   # frames that came early
        return self.transport.suspend()

    def _websocket_send(self, event):
        data, text = event.get("bytes"), event.get("text")
        if (data is None) == (text is None):
            raise EventError("websocket.send: exactly one of 'bytes' and 'text' must be given")
        if self.state == _CONNECTING:
            raise EventError("websocket.send: the handshake is not accepted yet")
        if self.state != _OPEN:
            return _NO_WAIT
        if text is not None:
            opcode, payload = _OP_TEXT, text.encode("utf-8")
        else:
            opcode, payload = _OP_BINARY, bytes(data)
        compressed = self.deflate is not None
        if compressed:
            # RFC 7692 §6.1: the message is compressed, RSV1 marks it.  What
            # the Transport counts (and buffered_amount() reports) is the
            # compressed frame: the bytes that go on the wire.
            payload = self.deflate.compress(payload)
            self.last_compressed = self.loop.now
        head = ws_frame_head(opcode, len(payload), compressed)
        if len(payload) > _COMBINE_LIMIT:     # no copy of a large payload
            self.transport.write(head)
            self.transport.write(payload)
        else:
            self.transport.write(head + payload)
        return self.transport.suspend()

    def _websocket_close(self, event):
        code = event.get("code")
        code = 1000 if code is None else code
        reason = event.get("reason") or ""
        if self.state == _CONNECTING and self.denial is None:
            # PAGI: websocket.close before websocket.accept rejects with 403.
            self._refuse(403, "Forbidden")
            self._ended(code, reason)
        elif self.state == _OPEN:
            self._start_close(code, reason)
        return _NO_WAIT

    def _websocket_keepalive(self, event):
        # PAGI: the last websocket.keepalive wins; it replaces the server's
        # own schedule (ws_ping_interval, ws_ping_timeout) for this session,
        # and interval 0 stops the pings and any pending pong deadline.
        interval = event["interval"]
        self.keepalive = (interval, event.get("timeout") or 0)
        self.ping_due = self.loop.now + interval if interval > 0 else None
        self.pong_due = None
        return _NO_WAIT

    def _keep_alive(self, now):
        """The sweep's keepalive step: a ping when one is due, and the end of
        a connection whose peer left the last one unanswered too long."""
        interval, timeout = self.keepalive
        if self.pong_due is not None and now >= self.pong_due:
            if not self.reading:
                # The server itself stopped reading (inbound backpressure):
                # the pong may be waiting unread.  The deadline counts only
                # time spent listening.
                self.pong_due = now + timeout
            else:
                self._keepalive_failed()
                return
        if self.ping_due is not None and now >= self.ping_due:
            self.transport.write(ws_frame(_OP_PING))
            if timeout and self.pong_due is None:
                self.pong_due = now + timeout
            self.ping_due = now + interval

    def _keepalive_failed(self):
        """RFC 6455 §7.1.7, "Fail the WebSocket Connection": the peer stopped
        answering pings.  The close frame carries 1011 (an unexpected
        condition; the code the websockets library -- uvicorn's -- sends for
        a ping timeout) if it can go out at once, and the TCP connection is
        dropped without waiting for a close frame that will not come.  The
        application sees PAGI's 1006 with reason keepalive_timeout."""
        if not self.transport.buffered_amount():
            self.transport.write(ws_frame(_OP_CLOSE, ws_close_payload(
                1011, "keepalive ping timeout")))
        self.abort("keepalive_timeout")

    def _websocket_http_response_start(self, event):
        if self.state != _CONNECTING:
            return _NO_WAIT      # PAGI: denial events after accept are ignored
        if self.denial is not None:
            raise EventError("websocket.http.response.start: already sent")
        self.status = event["status"]
        # The server frames the denial and closes after it: the
        # application's framing fields are dropped (PAGI HTTP).
        headers = [(bytes(n), bytes(v)) for n, v in event.get("headers") or ()]
        self.denial = [(n, v) for n, v in headers
                       if n not in (b"content-length", b"transfer-encoding", b"connection")]
        return _NO_WAIT

    def _websocket_http_response_body(self, event):
        if self.state != _CONNECTING:
            return _NO_WAIT
        if self.denial is None:
            raise EventError("websocket.http.response.body: send "
                             "websocket.http.response.start first")
        body = bytes(event.get("body") or b"")
        more = bool(event.get("more"))
        out = b""
        mode = self.denial_body
        if mode is None:
            out, _fields, mode, _length, _keep_alive = frame_response(
                self.status, self.denial, final_size=None if more else len(body),
                keep_alive=False, stamp=self.server.stamp)
            self.denial_body = mode
        if mode is BODY_CHUNKED:
            out += (chunk(body) if body else b"") + (b"" if more else LAST_CHUNK)
        elif mode is BODY_LENGTH:
            out += body
        self.transport.write(out)
        if not more:
            # The WebSocket never opened: no websocket.disconnect is owed,
            # but a receive() still gets one rather than waiting forever.
            self.state = WEBSOCKET_MOVES[self.state]["denied"]
            self.disconnect = {"type": "websocket.disconnect", "code": 1006, "reason": ""}
            self.close_after_flush()
        return self.transport.suspend()

    # -- frames in ----------------------------------------------------------------

    def _received(self, data):
        self.bytes_in += len(data)
        self.parser.feed(data)
        if self.state == _CONNECTING and len(self.parser._buf) > _PIPELINE_BUFFER:
            self.pause_reading()     # a client talking before the 101: wait
            return
        self._advance()

    def _on_eof(self):
        if self.state == _CLOSED:
            self.close()
        else:
            self.abort("client_closed")

    def _advance(self):
        if self.state not in (_OPEN, _CLOSING) or self.closed or self.failure is not None:
            return          # frames wait for the accept (none are expected)
        limit = self.config.max_receive_queue
        while self.state in (_OPEN, _CLOSING):
            if len(self.queue) >= limit:
                # Inbound backpressure: stop reading until the app catches up.
                self.pause_reading()
                return
            if self.transport.buffered_amount() >= self.transport.high_water_mark():
                # What we answer (pongs) is not being read: stop reading
                # until the client drains its side.
                self.pause_reading()
                self.transport.suspend().add_done_callback(self._drained)
                return
            try:
                event = self.parser.next_event()
            except FrameError as err:
                self._protocol_error(err.code, str(err))
                return
            if event is None:
                return
            kind = event[0]
            if kind == "text":
                if self.state == _OPEN:
                    self._deliver({"type": "websocket.receive", "text": event[1],
                                   "bytes": None})
            elif kind == "bytes":
                if self.state == _OPEN:
                    self._deliver({"type": "websocket.receive", "bytes": event[1],
                                   "text": None})
            elif kind == "ping":
                # §5.5.2: answer with the same data -- also while our close
                # frame waits for the client's (only its close ends that).
                self.transport.write(ws_frame(_OP_PONG, event[1]))
            elif kind == "pong":
                self.pong_due = None       # §5.5.3: the peer answered (any pong will do)
            else:
                code, reason = event[1], event[2]
                if self.state == _OPEN:
                    # §5.5.1: answer a close with a close (echoing its code),
                    # then the server closes the TCP connection first.
                    self.transport.write(ws_frame(_OP_CLOSE, ws_close_payload(code)))
                self._ended(code, reason)
                self.close_after_flush()
                return

    def _drained(self, _future):
        if self.state in (_OPEN, _CLOSING) and not self.closed and self.failure is None:
            self.resume_reading()
            self._advance()

    def _start_close(self, code, reason):
        self.transport.write(ws_frame(_OP_CLOSE, ws_close_payload(code, reason)))
        self.state = WEBSOCKET_MOVES[self.state]["close"]
        self.close_due = self.loop.now + _WS_CLOSE_TIMEOUT

    def _protocol_error(self, code, message):
        """A frame broke the protocol: nothing more is read, and the
        connection fails (RFC 6455 §7.1.7) once the application has had
        the messages that came before that frame -- at once if it is
        waiting for one, else when it next asks for an event with none
        left (or returns) -- so that its answers to them go out before the
        close frame, not cut off by it (as Autobahn's cases 3.2, 4.1.3 and
        5.15 expect: the echo, then the close)."""
        if self.state != _OPEN or (self.waiter is not None and not self.queue):
            self._fail(code, message)
            return
        self.failure = (code, message)
        self.pause_reading()

    def _fail(self, code, message):
        """RFC 6455 §7.1.7: fail the connection with a close frame."""
        self.log.debug("websocket %r: failing with %d: %s", self.client, code, message)
        if self.state == _OPEN:
            self.transport.write(ws_frame(_OP_CLOSE, ws_close_payload(code, message)))
        self._ended(code, "protocol_error")
        self.close_after_flush()

    # -- the end --------------------------------------------------------------------

    def _refuse(self, status, message):
        self.status = status
        self.transport.write(error_response(status, message, stamp=self.server.stamp))
        self.state = WEBSOCKET_MOVES[self.state]["refuse"]
        self.close_after_flush()

    def _app_exited(self, task):
        exc = task._exception
        if exc is not None and self.state != _CLOSED:
            self.log.error("websocket application raised: %s\n%s",
                           self.head.target.decode("latin-1"), "".join(
                               traceback.format_exception(type(exc), exc,
                                                          exc.__traceback__)).rstrip())
        elif exc is not None:
            self.log.debug("websocket application raised after the end: %r", exc)
        if self.state == _CONNECTING:
            if self.denial is not None:
                # A denial response left unfinished: as HTTP does, a 500 if
                # nothing is on the wire yet, else a visible truncation.
                self.log.error("websocket application returned before finishing its "
                               "denial response: %s", self.head.target.decode("latin-1"))
                if self.denial_body is not None:     # its head went out
                    self.abort("server_error")
                else:
                    self._refuse(500, "Internal Server Error")
            elif exc is not None:
                self._refuse(500, "Internal Server Error")
            else:
                self.log.error("websocket application returned without accepting: %s (403 "
                               "sent)", self.head.target.decode("latin-1"))
                self._refuse(403, "Forbidden")
        elif self.state == _OPEN and self.failure is not None:
            self._fail(*self.failure)
        elif self.state == _OPEN:
            # An application that ends its session closes it: 1000 normally,
            # 1011 (internal error) when it raised.
            self._start_close(1011 if exc is not None else 1000, "")

    def abort(self, reason):
        """The connection ends without a close handshake: code 1006."""
        if self.closed:
            return
        self._ended(1006, reason)
        self.close()

    def shutdown(self):
        """Server shutdown: close the session with 1001 (going away)."""
        if self.state == _OPEN and self.failure is not None:
            self._fail(*self.failure)
        elif self.state == _OPEN:
            self._start_close(1001, "server shutdown")
        elif self.state == _CONNECTING and self.denial is None:
            self._refuse(503, "Service Unavailable")
            self._ended(1006, "server_shutdown")

    def check_timeouts(self, now, config):
        """The server's sweep: write timeout, close handshake, keepalive."""
        if self.write_timed_out(now, config):
            self.abort("write_timeout")
        elif self.close_due is not None and now >= self.close_due:
            self.abort("client_timeout")
        elif self.state == _OPEN and self.failure is None:   # pings once accepted
            self._keep_alive(now)
            if self.last_compressed is not None and now - self.last_compressed > _DEFLATE_IDLE:
                self.deflate.forget_compressor()      # an idle session's memory
                self.last_compressed = None


# ============================================================================
# 8. Server-Sent Events (WHATWG HTML "Server-sent events"; PAGI "SSE")
#
# A request whose Accept includes text/event-stream gets an ``sse`` scope.
# On the wire an event stream is an ordinary chunked HTTP response, so
# SSEExchange is an Exchange (section 6) that speaks sse.* events: it
# formats each dispatch (WHATWG §9.2.6: "event:", one "data:" per line,
# "id:", "retry:", a blank line) and hands the bytes to the HTTP framing.
# Instead of streaming, an application may decline with an ordinary
# response (sse.http.response.*): the first send decides which it is.
# ============================================================================

SSE_SEND_EVENTS = {
    "sse.start": {"status": ("status", False), "headers": ("headers", False)},
    "sse.send": {"data": ("text", True), "event": ("text", False), "id": ("text", False),
                 "retry": ("count", False)},
    "sse.comment": {"comment": ("text", True)},
    "sse.keepalive": {"interval": ("seconds", True), "comment": ("text", False)},
    "sse.close": {"reason": ("text", False)},
    "sse.http.response.start": {"status": ("status", True), "headers": ("headers", False)},
    "sse.http.response.body": {"body": ("bytes", False), "more": ("flag", False)},
}
_SSE_SEND_SCHEMA = compile_schema(SSE_SEND_EVENTS)
_SSE_LINE_BREAK = re.compile(r"\r\n|\r|\n")   # WHATWG: CRLF, CR or LF ends a line


def sse_dispatch(data, event=None, id=None, retry=None):
    """The bytes of one SSE dispatch (WHATWG HTML §9.2.6)."""
    lines = []
    if event is not None:
        lines.append("event: " + event)
    for line in _SSE_LINE_BREAK.split(data):
        lines.append("data: " + line)
    if id is not None:
        lines.append("id: " + id)
    if retry is not None:
        lines.append("retry: %d" % retry)
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def exchange_kind(head):
    """PAGI SSE "Connection Detection": a request whose Accept includes the
    media type text/event-stream, whatever the method and path, gets an
    ``sse`` scope (SSEExchange); any other, an ``http`` scope (Exchange)."""
    accept = head.accept
    if accept is not None and b"text/event-stream" in accept.lower():
        return SSEExchange
    return Exchange


class SSEExchange(Exchange):
    """One event-stream request: an Exchange whose events are sse.*."""

    REQUEST = "sse.request"
    scope_type = "sse"
    # An event-stream client that sends FIN has gone: it has nothing more
    # to send and would only ever read (unlike an HTTP half-close).
    FIN_ENDS_RESPONSE = True
    mode = None                   # "stream" after sse.start, "response" after a decline
    stream_closed = False         # sse.close was sent (or the stream ended)
    keepalive_timer = None        # sse.keepalive's next comment

    def scope(self):
        scope = Exchange.scope(self)
        scope["type"] = "sse"
        del scope["pagi.connection"]     # PAGI: not applicable to sse
        scope["extensions"] = _with_tls({}, self.conn.stream)
        return scope

    def access_end(self):
        # An event stream ends somehow: "done" when the application ended it.
        reason = self.state._reason
        return "done" if not reason else "ended:" + reason

    def disconnect_event(self):
        # A stream the application ended itself has no abnormal reason.
        return {"type": "sse.disconnect", "reason": self.state._reason or ""}

    def send(self, event):
        if self.state._reason is not None or self.conn.closed:
            return _NO_WAIT   # PAGI core: send after a disconnect is a no-op
        try:
            etype = validate_event(event, _SSE_SEND_SCHEMA)
            if etype.startswith("sse.http.response."):
                if self.mode == "stream":
                    raise EventError("%s: the event stream has started (first send wins)"
                                     % etype)
                self.mode = "response"
                try:
                    if etype == "sse.http.response.start":
                        self.app_close = True     # PAGI: the connection closes after it
                        return self._send_start(event)
                    return self._send_body({"body": event.get("body"),
                                            "more": event.get("more")})
                except EventError as exc:
                    # The HTTP machinery names http.response.*; the
                    # application sent sse.http.response.* (CORE-ERR-4).
                    raise EventError(str(exc).replace("http.response.", "sse.http.response."))
            if self.mode == "response":
                raise EventError("%s: the request was declined with an HTTP response "
                                 "(first send wins)" % etype)
            if etype == "sse.start":
                return self._start_stream(event)
            if self.mode is None:
                raise EventError("%s: send sse.start first" % etype)
            if etype == "sse.close":
                self._end_stream()
                return _NO_WAIT
            if self.stream_closed:
                raise EventError("%s: the stream is closed (sse.close)" % etype)
            if etype == "sse.send":
                for field in ("event", "id"):
                    value = event.get(field)
                    if value is not None and ("\r" in value or "\n" in value):
                        # PAGI SSE "Field validation": a line break would
                        # forge a dispatch boundary.
                        raise EventError("sse.send: %r contains CR or LF" % field)
                return self._write(sse_dispatch(event["data"], event.get("event"),
                                                event.get("id"), event.get("retry")))
            if etype == "sse.comment":
                return self._write(self._comment(event["comment"]))
            return self._keepalive(event)
        except (EventError, OSError) as exc:
            return _failed(exc)

    @staticmethod
    def _comment(text):
        if "\r" in text or "\n" in text:
            raise EventError("sse.comment: 'comment' contains CR or LF")
        return (text if text.startswith(":") else ":" + text).encode("utf-8") + b"\n\n"

    def _start_stream(self, event):
        if self.mode == "stream":
            raise EventError("sse.start: the stream has already started")
        headers = list(event.get("headers") or ())
        names = {bytes(n) for n, _ in headers}
        # PAGI SSE "Start": what an event stream needs, unless given.
        if b"content-type" not in names:
            headers.append((b"content-type", b"text/event-stream"))
        if b"cache-control" not in names:
            headers.append((b"cache-control", b"no-cache"))
        self.mode = "stream"
        self.ANNOUNCE_KEEP_ALIVE = True       # PAGI SSE: HTTP/1.1 streams say so
        self._send_start({"status": event.get("status") or 200, "headers": headers})
        return self._send_body({"body": b"", "more": 1})    # the head goes out now

    def _write(self, data):
        return self._send_body({"body": data, "more": 1})

    def _keepalive(self, event):
        if self.keepalive_timer is not None:
            self.keepalive_timer.cancel()
            self.keepalive_timer = None
        if event["interval"] > 0:
            comment = self._comment(event.get("comment") or "")
            self.keepalive_timer = self.conn.loop.call_later(
                event["interval"], self._keepalive_tick, event["interval"], comment)
        return _NO_WAIT

    def _keepalive_tick(self, interval, comment):
        self.keepalive_timer = None
        if self.stream_closed or self.state._reason is not None or self.conn.closed:
            return
        self._write(comment)
        self.keepalive_timer = self.conn.loop.call_later(
            interval, self._keepalive_tick, interval, comment)

    def _end_stream(self):
        """sse.close, or the application returned: the last chunk goes out."""
        if self.stream_closed:
            return          # PAGI: a second sse.close is ignored
        self.stream_closed = True
        if self.keepalive_timer is not None:
            self.keepalive_timer.cancel()
            self.keepalive_timer = None
        if self.response_phase not in _BODY_ENDED:
            self._send_body({"body": b"", "more": 0})

    def disconnected(self, reason):
        if self.keepalive_timer is not None:
            self.keepalive_timer.cancel()
            self.keepalive_timer = None
        Exchange.disconnected(self, reason)

    def shutdown(self):
        """Server shutdown: an event stream never ends by itself, so the
        server ends it -- sse.disconnect (server_shutdown) for the
        application, the last chunk for the client -- and closes."""
        if self.mode != "stream" or self.stream_closed or self.state._reason is not None:
            return
        self.disconnected("server_shutdown")
        self.stream_closed = True
        if self.response_phase not in _BODY_ENDED:
            self._send_body({"body": b"", "more": 0})
        self.conn.close_after_flush()

    def app_exited(self, task):
        # PAGI SSE: returning after sse.start ends the stream as sse.close does.
        if (self.mode == "stream" and task._exception is None
                and self.state._reason is None and not self.conn.closed):
            self._end_stream()
        Exchange.app_exited(self, task)


# ============================================================================
# 9. Lifespan (PAGI Lifespan)
#
# One ``lifespan`` scope per server loop, before any connection is accepted
# and after the last one is gone.  The application's startup can fill
# scope["state"]; every request gets a shallow copy of it (Exchange.scope).
# An application that raises on this scope, or returns without a startup
# signal, declines lifespan: that is logged at info level and the server
# starts as usual.  Only lifespan.startup.failed stops the server starting.
# ============================================================================

LIFESPAN_SEND_EVENTS = {
    "lifespan.startup.complete": {},
    "lifespan.startup.failed": {"message": ("text", False)},
    "lifespan.shutdown.complete": {},
    "lifespan.shutdown.failed": {"message": ("text", False)},
}
_LIFESPAN_SEND_SCHEMA = compile_schema(LIFESPAN_SEND_EVENTS)


class LifespanFailed(Exception):
    """The application sent lifespan.startup.failed; the message is its own."""


class Lifespan:
    """The ``lifespan`` scope of one server loop: receive(), send(), and the
    two Futures the server waits on, ``started`` and ``stopped``."""

    def __init__(self, app, loop, log, state, pagi_extra=None):
        self.loop = loop
        self.log = log
        self.queue = collections.deque([{"type": "lifespan.startup"}])  # events to give
        self.waiter = None                # a pending receive()
        self.started = Future(loop)       # True once started; False if declined
        self.stopped = Future(loop)       # resolved by shutdown.complete / .failed
        self.declined = False             # the application does not do lifespan
        self.shutdown_asked = False       # lifespan.shutdown was queued
        pagi = {"version": PAGI_VERSION, "spec_version": PAGI_SPEC_VERSION,
                "is_worker": 0, "worker_num": None}
        pagi.update(pagi_extra or {})
        self.scope = {"type": "lifespan", "pagi": pagi, "state": state}
        self.app = app
        self.task = None

    def loop_context(self):
        return "lifespan"

    def start(self):
        """Call the application; run this on the running loop (its first
        step may use sleep, to_thread...)."""
        try:
            self.task = start_application(self.app, self.scope, self.receive, self.send,
                                          self.loop, self._exited, "lifespan")
        except CannotStart as exc:
            self._decline(exc.__cause__ or exc)   # a lifespan that cannot start is declined

    def receive(self):
        if self.queue:
            return _resolved(self.queue.popleft())
        self.waiter = Future(self.loop)
        return self.waiter

    def send(self, event):
        try:
            etype = validate_event(event, _LIFESPAN_SEND_SCHEMA)
        except EventError as exc:
            return _failed(exc)
        message = event.get("message") or ""
        if etype == "lifespan.startup.complete":
            _resolve_if_pending(self.started, True)
        elif etype == "lifespan.startup.failed":
            if not self.started.done():
                self.started.set_exception(LifespanFailed(message))
        elif etype == "lifespan.shutdown.complete":
            _resolve_if_pending(self.stopped, None)
        else:
            self.log.error("lifespan.shutdown.failed: %s", message)
            _resolve_if_pending(self.stopped, None)
        return _NO_WAIT

    def shutdown(self):
        """Deliver lifespan.shutdown (unless declined); ``stopped`` resolves
        when the application answers or its task ends."""
        if self.declined or self.stopped.done() or self.shutdown_asked:
            _resolve_if_pending(self.stopped, None)
            return self.stopped
        self.shutdown_asked = True
        event = {"type": "lifespan.shutdown"}
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(event)
            self.waiter = None
        else:
            self.queue.append(event)
        return self.stopped

    def _decline(self, exc):
        self.declined = True
        self.log.info("the application declined lifespan (%s); starting without it",
                      "%s: %s" % (type(exc).__name__, exc) if exc else "it returned")
        _resolve_if_pending(self.started, False)
        _resolve_if_pending(self.stopped, None)

    def _exited(self, task):
        exc = task._exception
        if not self.started.done():
            self._decline(exc)          # raised or returned before any startup signal
        elif exc is not None and not self.shutdown_asked:
            # After startup.complete: log, keep serving (a degraded state).
            self.log.error("the lifespan task failed after startup\n%s", "".join(
                traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())
        elif exc is not None:
            self.log.error("the lifespan task failed during shutdown: %r", exc)
        _resolve_if_pending(self.stopped, None)


# ============================================================================
# 10. Server
#
# Listeners and accept, admission control, the timeout sweep, and shutdown.
# Admission: max_connections slots, each holding one client descriptor: an
# open connection, or the socket of a closed one still lingering (section
# 6, _Linger).  When they are all taken, a new connection makes room by
# cutting short the oldest lingering socket, else by closing the oldest
# idle keep-alive connection; only when every slot is busy does it get an
# answer of its own -- 503 with Retry-After -- and the ones already open
# keep being served.  Refused sockets linger in a small reserve of their
# own; when it is full, accept rests until one is let go.  So descriptors
# are bounded by the admission limit, not by the rate of closes.  When
# accept() fails anyway (EMFILE, ENFILE: a limit set above what ulimit
# allows) the listener is unwatched for a short back-off instead of
# spinning.  Timeouts are a periodic sweep over last-activity times and
# byte counts, so a busy connection pays nothing per read or write for them.
#
# Connections (sections 6 and 7) use only what Connection's docstring lists
# ("what a connection may call", below).  What must not go in here:
# anything about supervisors and workers (section 11 installs its own hooks
# on a worker's loop), or about a protocol's framing.
# ============================================================================

# -- the access log ------------------------------------------------------------
#
# Lines are formatted on the loop and handed to one writer thread through a
# bounded queue.  The loop never waits for the sink: a terminal or a pipe
# that reads slowly (the field report found a TTY log capped its server at
# the terminal's speed) only fills the queue, and lines that do not fit are
# dropped, counted, and reported in the error log -- never silently lost.

ACCESS_LOG_FORMATS = {
    # Apache's two, byte for byte, for the tools that parse them.
    "common": '%h %l %u %t "%r" %s %b',
    "combined": '%h %l %u %t "%r" %s %b "%{Referer}i" "%{User-Agent}i"',
    # The default: "common", then how long it took, the bytes that crossed
    # the wire each way, and how it ended (done; cut:REASON for a response
    # the client did not get whole; close:CODE for a WebSocket session;
    # ended:REASON for an event stream the application did not end).
    "pagi": '%h %l %u %t "%r" %s %b %Dus in=%I out=%O %{end}x',
}
_ACCESS_LOG_QUEUE = 10000       # lines waiting for the sink before drops begin
_ACCESS_LOG_DRAIN = 1.0        # seconds the sink gets at shutdown to take the rest
_ACCESS_LOG_TOKEN = re.compile(r"%(?:\{([^}]*)\}([iox])|([hlutrsbDTIO%]))")


_LOG_UNSAFE = re.compile(r'[\x00-\x1f\x7f-\xff"\\]')


def _log_escape(text):
    """As Apache does: a quote or backslash gets a backslash, a control or
    non-ASCII byte becomes \\xhh, so a client cannot forge log fields."""
    if not _LOG_UNSAFE.search(text):
        return text
    return _LOG_UNSAFE.sub(lambda m: "\\" + m.group() if m.group() in '"\\'
                           else "\\x%02x" % ord(m.group()), text)


def _clf_time(now):
    """[10/Oct/2000:13:55:36 +0000], the Common Log Format's %t (UTC)."""
    return time.strftime("[%d/%b/%Y:%H:%M:%S +0000]", time.gmtime(now))


class AccessLog:
    """One line per request, WebSocket session or event stream, in a format
    of Apache's tokens (mod_log_config, mod_logio):

    %h client address   %l "-"   %u "-"   %t time received   %r request line
    %s status   %b body bytes that reached the socket ("-" for none)
    %D microseconds   %T seconds   %I bytes received   %O bytes sent
    %{Name}i a request header   %{Name}o a response header   %% a percent sign
    and one of pagi_ref's own: %{end}x, how it ended (ACCESS_LOG_FORMATS).
    """

    def __init__(self, sink, fmt, error_log):
        self.error_log = error_log
        self.format = ACCESS_LOG_FORMATS.get(fmt, fmt)
        self._render = self._compile(self.format)
        # The writer thread writes to a descriptor of its own with os.write:
        # never through sys.stdout's buffer, whose lock the interpreter takes
        # at exit to flush it -- a thread stuck writing into a full pipe
        # held that lock and the process never exited.
        if sink == "-":
            try:
                stdout = sys.stdout.fileno()
            except (AttributeError, ValueError, OSError):
                stdout = 1        # sys.stdout replaced by something without a file
            self._fd = os.dup(stdout)
        else:
            self._fd = os.open(sink, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self._queue = collections.deque()   # lines for the writer thread
        self._wake = threading.Event()
        self._closing = False
        self._writing = 0                   # lines in the write() under way
        self.dropped = 0                    # lines dropped since the last report
        self.dropped_total = 0
        self._thread = threading.Thread(target=self._write_lines, name="pagi_ref.access_log",
                                        daemon=True)
        self._thread.start()

    @staticmethod
    def _compile(fmt):
        parts = []
        pos = 0
        for m in _ACCESS_LOG_TOKEN.finditer(fmt):
            if m.start() > pos:
                parts.append(fmt[pos:m.start()])
            name, where, token = m.groups()
            if token == "%":
                parts.append("%")
            elif token:
                parts.append(token)        # filled per line
            else:
                parts.append((where, name.lower().encode("latin-1")))
            pos = m.end()
        if pos < len(fmt):
            parts.append(fmt[pos:])
        return parts

    def record(self, entry):
        """Format one AccessEntry (section 6) and queue the line; never blocks."""
        if len(self._queue) >= _ACCESS_LOG_QUEUE:
            self.dropped += 1
            self.dropped_total += 1
            return
        status, size, duration = entry.status, entry.size, entry.duration
        out = []
        for part in self._render:
            if part.__class__ is tuple:
                where, name = part
                if where == "x":
                    out.append(_log_escape(entry.end) if name == b"end" else "-")
                    continue
                headers = entry.request_headers if where == "i" else entry.response_headers
                value = "-"
                for k, v in headers or ():
                    if k == name:
                        value = _log_escape(v.decode("latin-1"))
                        break
                out.append(value)
            elif len(part) == 1 and part in "hlutrsbDTIO":
                if part == "h":
                    out.append(entry.client[0] if entry.client else "-")
                elif part in "lu":
                    out.append("-")
                elif part == "t":
                    out.append(_clf_time(entry.received))
                elif part == "r":
                    out.append(_log_escape(entry.request_line))
                elif part == "s":
                    out.append(str(status) if status else "-")
                elif part == "b":
                    out.append(str(size) if size else "-")
                elif part == "D":
                    out.append(str(int(duration * 1e6)))
                elif part == "I":
                    out.append(str(entry.bytes_in))
                elif part == "O":
                    out.append(str(entry.bytes_out))
                else:
                    out.append(str(int(duration)))
            else:
                out.append(part)
        self._queue.append(("".join(out) + "\n").encode("utf-8", "replace"))
        self._wake.set()

    def report_drops(self):
        if self.dropped:
            self.error_log.error("access log: %d lines dropped because the sink is not "
                                   "keeping up (%d in all)", self.dropped, self.dropped_total)
            self.dropped = 0

    def _write_lines(self):
        queue = self._queue
        fd = self._fd
        while True:
            self._wake.wait()
            self._wake.clear()
            while queue:
                lines = []
                while queue and len(lines) < 1000:
                    lines.append(queue.popleft())
                self._writing = len(lines)
                data = memoryview(b"".join(lines))
                try:
                    while data:
                        data = data[os.write(fd, data):]
                except OSError as exc:
                    self.error_log.error("access log: cannot write: %s", exc)
                    return
                self._writing = 0
            if self._closing:
                return

    def close(self, drain=_ACCESS_LOG_DRAIN):
        """At shutdown: the sink gets ``drain`` seconds to take the queued
        lines; what it has not taken by then is dropped and counted, so that
        a sink nobody reads never holds the exit."""
        self._closing = True
        self._wake.set()
        self._thread.join(drain)
        if self._thread.is_alive():
            left = len(self._queue) + self._writing
            self._queue.clear()
            self.dropped += left
            self.dropped_total += left
            self.error_log.warning("access log: the sink did not take the last %d lines "
                                   "within %.1f s of the shutdown; dropped", left, drain)
        else:
            os.close(self._fd)
        self.report_drops()


_ACCEPT_BATCH = 64          # connections accepted per readiness event
_ACCEPT_BACKOFF = 0.5       # seconds the listener rests after EMFILE/ENFILE
_SWEEP_INTERVAL = 0.5       # seconds between timeout sweeps
_SHUTDOWN_GRACE = 0.1       # seconds aborted applications get to clean up
_REFUSAL_RESERVE = 16       # refused (503) sockets lingering at once, beyond max_connections


_SERVER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                   signal.SIGTTIN, signal.SIGTTOU)


def _exit_at_once(signum, frame):
    """SIGQUIT, and the second SIGTERM/SIGINT: no flush, no cleanup."""
    os._exit(1)


# -- listeners ------------------------------------------------------------------
#
# A server listens on one socket or several: TCP (IPv4, IPv6), Unix, or
# descriptors it inherits -- fd://N from whoever started it, or systemd's
# socket activation (sd_listen_fds(3): LISTEN_PID is this process,
# LISTEN_FDS descriptors from 3 on), picked up without options.  Workers
# inherit every listener through the fork and accept on all of them.  A
# Unix socket file is made by one process, and only that process removes it
# at shutdown -- and only if it is still the file it made.

_SD_LISTEN_FDS_START = 3    # sd_listen_fds(3): the first inherited descriptor


class ListenError(OSError):
    """A listener that cannot be opened; str() names it and says why."""


class Listener:
    """One listening, non-blocking socket, and the Unix socket file this
    process made for it (removed by close())."""

    __slots__ = ("sock", "path", "made")

    def __init__(self, sock, path=None, made=None):
        self.sock = sock
        self.path = path              # a Unix socket's path, else None
        self.made = made              # (pid, st_dev, st_ino) of the file this process bound

    @property
    def address(self):
        """(host, port) of a TCP listener, the path of a Unix one."""
        if self.sock.family == socket.AF_UNIX:
            return self.path if self.path is not None else self.sock.getsockname()
        return self.sock.getsockname()[:2]

    def url(self, secure=False):
        """How the listening line names it: http://HOST:PORT (https:// when
        the server speaks TLS), unix:PATH."""
        address = self.address
        if self.sock.family == socket.AF_UNIX:
            return "unix:%s" % (address,)
        scheme = "https" if secure else "http"
        if self.sock.family == socket.AF_INET6:
            return "%s://[%s]:%d" % ((scheme,) + tuple(address))
        return "%s://%s:%d" % ((scheme,) + tuple(address))

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        self.sock.close()
        made, self.made = self.made, None
        if made is not None and made[0] == os.getpid():
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == made[1:]:
                    os.unlink(self.path)      # ours still: not a successor's
            except OSError:
                pass


def _tcp_listener(host, port, backlog):
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                               socket.AI_PASSIVE)
    family, kind, proto, _name, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # [::] is IPv6 only, as asyncio (so uvicorn) makes it: IPv4
            # clients come through a 0.0.0.0 listener beside it, with their
            # own addresses, not as ::ffff:a.b.c.d -- the same on every system.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return Listener(sock)


def _unix_listener(path, backlog):
    """A stale socket file (left by a server that was killed) is replaced,
    as gunicorn, uvicorn and PAGI::Server do; but not a file that is not a
    socket, nor a socket some server still accepts on."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise ListenError("the file exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)                   # nobody listens: stale
        except OSError:
            pass                              # bind() says what is wrong
        else:
            raise ListenError("a server is already listening on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        st = os.stat(path)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return Listener(sock, path, (os.getpid(), st.st_dev, st.st_ino))


def inherited_listener(fd):
    """A listening socket this process was started with (fd://N, systemd)."""
    sock = socket.socket(fileno=fd)
    try:
        if sock.type != socket.SOCK_STREAM or \
                not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ListenError("not a listening stream socket")
        sock.setblocking(False)
        os.set_inheritable(fd, False)         # the application's subprocesses do not get it
    except OSError:
        sock.detach()                         # not ours to close
        raise
    path = None
    if sock.family == socket.AF_UNIX:
        path = sock.getsockname()
        if isinstance(path, bytes):
            path = path.decode("utf-8", "surrogateescape")
    return Listener(sock, path)


def activation_listeners(environ):
    """systemd socket activation: the descriptors systemd passed, when
    LISTEN_PID names this process; the variables are then removed, as
    sd_listen_fds(3) does, so that children do not take them for theirs."""
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    if not (count.isascii() and count.isdigit()):
        raise ListenError("socket activation: LISTEN_FDS is not a number: %r" % count)
    listeners = []
    for fd in range(_SD_LISTEN_FDS_START, _SD_LISTEN_FDS_START + int(count)):
        try:
            listeners.append(inherited_listener(fd))
        except OSError as exc:
            for listener in listeners:
                listener.close()
            raise ListenError("socket activation: descriptor %d: %s"
                              % (fd, exc.strerror or exc))
    return listeners


def open_listeners(config, environ=None):
    """Every listener the configuration asks for: systemd's (when
    ``environ`` is given and activates this process), then each --bind in
    order; config.host:config.port when there is neither."""
    listeners = activation_listeners(environ) if environ is not None else []
    specs = [parse_bind(text) for text in config.bind]
    if not specs and not listeners:
        specs = [("tcp", config.host, config.port)]
    try:
        for spec in specs:
            kind = spec[0]
            try:
                if kind == "tcp":
                    listeners.append(_tcp_listener(spec[1], spec[2], config.backlog))
                elif kind == "unix":
                    listeners.append(_unix_listener(spec[1], config.backlog))
                else:
                    listeners.append(inherited_listener(spec[1]))
            except (OSError, UnicodeError) as exc:
                where = ("%s:%d" % spec[1:] if kind == "tcp" else
                         "unix:%s" % spec[1] if kind == "unix" else "fd://%d" % spec[1])
                raise ListenError("cannot listen on %s: %s"
                                  % (where, getattr(exc, "strerror", None) or exc))
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def announce_listeners(log, listeners, secure=False):
    """The listening lines, one per listener, in the error log's format;
    ``secure``: the server speaks TLS on them."""
    for listener in listeners:
        _announce(log, "pagi_ref: listening on " + listener.url(secure))


def _announce(log, message):
    """A line that operators and supervisors wait for ("listening on"): in
    the error log's format, with its timestamp, whatever --log-level
    filters out -- Logger.handle skips the logger's level, not its
    handlers'."""
    log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, message, (), None))


class H2SSEExchange(_H2Response, SSEExchange):
    """An event stream on an HTTP/2 stream: section 8's events, section
    6a's framing (defined here, below both)."""


class Server:
    """Serves one PAGI application on one loop.

    ``bind()`` opens the listener (port 0: the OS picks one) and returns the
    address; ``serve()`` runs the loop until ``stop()``, which any thread may
    call.  Two servers in one process share nothing.
    """

    def __init__(self, app, config=None, logger=None, worker_num=None, loop=None,
                 clock=time.monotonic):
        self.app = app
        self.worker_num = worker_num  # 1..N under a Supervisor, else None
        self.config = config or Config()
        self.log = logger or logging.getLogger("pagi_ref")
        # The loop (or the clock of the one made here) can be injected, so
        # tests drive time instead of waiting for it.
        self.loop = loop or Loop(clock=clock, logger=self.log,
                                 slow_callback=self.config.slow_callback)
        self.requests = 0             # requests begun (max_requests counts them)
        self.max_requests = 0         # this process's limit, drawn in serve(); 0: none
        self.on_retire = None         # called once when max_requests is reached
        self.state = {}               # the lifespan "state" namespace
        self.connections = set()      # open connections: HTTP, WebSocket
        # Admission (see the banner).  Ordered dicts used as ordered sets,
        # oldest first, so that eviction takes the oldest in O(1).
        self.idle = collections.OrderedDict()       # HTTP connections between requests
        self.lingering = collections.OrderedDict()  # closed connections' _Lingers: slots
        self.refusing = collections.OrderedDict()   # refused sockets' _Lingers: the reserve
        self.listeners = []           # Listeners (listening sockets)
        self.address = None           # the first listener's (host, port), or its path
        # Proxy headers are read only from these peers (None: not at all).
        self.trusted_peers = (TrustedPeers(self.config.forwarded_allow_ips)
                              if self.config.proxy_headers else None)
        # The Server and Date fields of every response head (section 4).
        self.stamp = ResponseStamp(self.config.server_header, self.config.date_header)
        self.shutting_down = False
        self._accepting = False       # listeners are watched
        self._backoff_timer = None    # the listener rests after EMFILE/ENFILE
        self._accept_failures = 0     # failed accepts in this episode (0: none)
        self._refused = 0             # connections answered 503
        self._evicted = 0             # idle connections closed to admit new ones
        self._signals = 0             # shutdown signals received
        self._escalate = True         # a second signal exits at once
        self._previous_handlers = {}  # signum -> handler before install_signal_handlers
        self._shutdown_timer = None
        self.access_log = None        # AccessLog while serving, if configured
        self.lifespan = None          # the Lifespan scope, once started
        # Upgrade tokens (RFC 9110 §7.8) and who takes such a connection over.
        self.upgrades = {b"websocket": WebSocketConnection}
        # Which Exchange serves a request with an Accept field: an event
        # stream is an sse scope (section 8).
        self.exchange_kind = exchange_kind
        # The same kinds framed for HTTP/2 (section 6a), chosen by the same
        # function: exchange_kind's answer -> its HTTP/2 twin.
        self.h2_exchanges = {Exchange: H2Exchange, SSEExchange: H2SSEExchange}
        self._started = False         # startup() has run
        # TLS (section 5): one context wraps every accepted socket (ConfigError
        # from here names the ssl_* field that cannot be used).
        self.ssl_context = tls_context(self.config)
        self.server_cert = (server_certificate(self.config.ssl_certfile)
                            if self.ssl_context is not None else None)

    def __repr__(self):
        return "<Server %s connections=%d idle=%d lingering=%d refused=%d evicted=%d%s>" % (
            self.address, len(self.connections), len(self.idle), len(self.lingering),
            self._refused, self._evicted, " shutting-down" if self.shutting_down else "")

    # -- listening ------------------------------------------------------------------

    def bind(self):
        """Open the configured listeners (host and port, or every --bind);
        returns the first one's address.  (Socket activation is for the
        command line and run(): open_listeners(config, os.environ).)"""
        for listener in open_listeners(self.config):
            self.use_listener(listener)
        return self.address

    def use_listener(self, listener):
        """Serve on an already bound, listening, non-blocking socket (a
        worker's, inherited from the supervisor): a Listener, or a plain
        socket."""
        if not isinstance(listener, Listener):
            listener = Listener(listener)
        self.listeners.append(listener)
        if self.address is None:
            self.address = listener.address
        return self.address

    def startup(self):
        """Run the lifespan startup (unless config.lifespan is "off") before
        any connection is accepted.  False if the application refused to
        start (lifespan.startup.failed, or a decline with lifespan "on")."""
        if self._started:
            return True
        self._started = True
        mode = self.config.lifespan
        if mode == "off":
            return True
        worker = {"is_worker": 1, "worker_num": self.worker_num} if self.worker_num else None
        self.lifespan = Lifespan(self.app, self.loop, self.log, self.state, worker)
        self.loop.call_soon(self.lifespan.start)
        started = self.lifespan.started
        self.loop.run_until(started)
        if not started.done():
            return True        # a signal arrived during startup: serve() shuts down
        if started.exception() is not None:
            self.log.error("lifespan.startup.failed: %s; not starting", started.exception())
            return False
        if started.result() is False and mode == "on":
            self.log.error("the application declined lifespan, which --lifespan on requires")
            return False
        return True

    def serve(self, install_signals=False):
        """Run until stopped.  With install_signals (the command line), the
        first SIGTERM/SIGINT shuts down gracefully and a second exits at once.
        Returns False if the application refused to start."""
        if not self.listeners:
            self.bind()
        loop = self.loop
        if install_signals:
            self.install_signal_handlers()
        if self.config.access_log:
            self.access_log = AccessLog(self.config.access_log, self.config.access_log_format,
                                        self.log)
        if self.config.max_requests:
            # gunicorn's jitter: workers started together do not all retire
            # in the same second.
            self.max_requests = self.config.max_requests + random.randint(
                0, self.config.max_requests_jitter)
        try:
            if not self.startup():
                return False
            if not self.shutting_down:
                self._watch_listeners()
                loop.call_later(_SWEEP_INTERVAL, self._sweep)
                loop.run_forever()
            for conn in list(self.connections):
                conn.abort("server_shutdown")
            if self.lifespan is not None:
                # PAGI Lifespan: shutdown comes after the connections are
                # gone; its wait is bounded by shutdown_timeout.
                timer = loop.call_later(self.config.shutdown_timeout,
                                        _resolve_if_pending, self.lifespan.stopped, None)
                loop.run_until(self.lifespan.shutdown())
                timer.cancel()
            return True
        finally:
            self.close()

    def close(self):
        """Release everything: connections, listeners, the loop, the logs,
        and the signal handlers installed (the previous ones come back)."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}
        for conn in list(self.connections):
            conn.abort("server_shutdown")
        for listener in self.listeners:
            self.loop.forget(listener.fileno())
            listener.close()
        self.listeners = []
        for linger in list(self.lingering) + list(self.refusing):
            linger.close()
        self.loop.close()
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None

    def stop(self, timeout=None):
        """Graceful shutdown, from any thread: stop accepting, close idle
        connections, give in-flight requests ``timeout`` seconds (default:
        config.shutdown_timeout), then close the rest (server_shutdown)."""
        self.loop.call_soon_threadsafe(self._shutdown, timeout)

    def install_signal_handlers(self, escalate=True):
        """The signals of one process (main thread only; docs/server.md has
        the table).  SIGTERM and SIGINT shut down gracefully; with
        ``escalate`` a second one exits at once.  A worker does not escalate:
        it may get a signal both from its supervisor and from whoever
        signalled the process group, and the supervisor escalates for it.
        SIGQUIT exits at once.  SIGHUP, SIGTTIN and SIGTTOU need a
        supervisor: one process logs them and goes on (their default
        actions would end or freeze it)."""
        self._escalate = escalate
        for signum in _SERVER_SIGNALS:
            self._previous_handlers.setdefault(signum, signal.getsignal(signum))
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop_signal)
        signal.signal(signal.SIGQUIT, _exit_at_once)
        for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            self.loop.add_signal_handler(signum, self._unsupervised_signal)

    def _on_stop_signal(self, signum, frame):
        # A signal handler: count, and leave the rest to the loop.
        self._signals += 1
        if self._signals > 1:
            if self._escalate:
                os._exit(1)    # the second signal: exit at once
            return
        self.loop.call_soon_threadsafe(self._signalled_shutdown, signum)

    def _signalled_shutdown(self, signum):
        self.log.info("pagi_ref: %s received, shutting down", signal.Signals(signum).name)
        self._shutdown(None)
        busy = len(self.connections)
        if busy:
            self.log.info("pagi_ref: waiting for %d connection%s to finish (up to %g s)%s",
                          busy, "" if busy == 1 else "s", self.config.shutdown_timeout,
                          "; press Ctrl-C again to stop now" if self._escalate else "")

    def _unsupervised_signal(self, signum):
        self.log.info("pagi_ref: %s ignored: reloading and changing the number of "
                      "workers need a supervisor (--workers 2 or more)",
                      signal.Signals(signum).name)

    def max_requests_reached(self):
        """Section 6 counts the requests begun in ``requests`` (an attribute,
        not a call: the common path) and calls this when they reach
        ``max_requests``: retire gracefully."""
        if not self.shutting_down:
            self.log.info("pagi_ref: %d requests served (max_requests); shutting down "
                          "to be replaced", self.requests)
            if self.on_retire is not None:
                self.on_retire()
            self._shutdown(None)

    def _shutdown(self, timeout):
        if self.shutting_down:
            return
        self.shutting_down = True
        self._unwatch_listeners()
        for listener in self.listeners:
            listener.close()
        self.listeners = []
        for conn in list(self.connections):
            conn.shutdown()
        if timeout is None:
            timeout = self.config.shutdown_timeout
        self._shutdown_timer = self.loop.call_later(timeout, self._shutdown_expired)
        self._maybe_finished()

    def _shutdown_expired(self):
        for conn in list(self.connections):
            conn.abort("server_shutdown")
        # Let the applications run what follows their disconnect (cleanup,
        # finally blocks) for a moment before the loop stops.
        self.loop.call_later(_SHUTDOWN_GRACE, self.loop.stop)

    def _maybe_finished(self):
        if self.shutting_down and not self.connections:
            if self._shutdown_timer is not None:
                self._shutdown_timer.cancel()
            # Two more turns before stopping: applications woken by the last
            # closes (a disconnect event, say) get to see it.
            self.loop.call_soon(self.loop.call_soon, self.loop.stop)

    # -- what a connection may call (section 6, Connection's docstring) ----------

    def connection_opened(self, conn):
        """A connection made by an upgrade (section 7) takes a slot."""
        self.connections.add(conn)

    def connection_closed(self, conn):
        """The connection's descriptor is closed, lingering, or handed on."""
        self.connections.discard(conn)
        self.idle.pop(conn, None)
        if self._backoff_timer is not None:
            self._end_backoff()    # a descriptor was freed: try again now
        if self.shutting_down:
            self._maybe_finished()

    def log_access(self, entry):
        """One access-log line (an AccessEntry), if an access log is kept."""
        if self.access_log is not None:
            self.access_log.record(entry)

    def linger(self, stream):
        """A closed connection's stream drains (RFC 9112 §9.6) in its slot."""
        linger = _Linger(self.loop, stream, self._linger_ended)
        if linger.stream is not None:
            self.lingering[linger] = None

    def _linger_ended(self, linger):
        self.lingering.pop(linger, None)
        if self._backoff_timer is not None:
            self._end_backoff()

    def _refusal_ended(self, linger):
        self.refusing.pop(linger, None)
        self._end_backoff()        # a reserved descriptor is free: accept again

    # -- accepting --------------------------------------------------------------------

    def _watch_listeners(self):
        if (not self._accepting and not self.shutting_down
                and len(self.refusing) < _REFUSAL_RESERVE):
            self._accepting = True
            for listener in self.listeners:
                self.loop.add_reader(listener.fileno(),
                                     lambda s=listener.sock: self._accept(s))

    def _unwatch_listeners(self):
        if self._accepting:
            self._accepting = False
            for listener in self.listeners:
                self.loop.remove_reader(listener.fileno())

    def _accept(self, listener):
        config = self.config
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, client = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._begin_backoff(exc)
                elif exc.errno != errno.ECONNABORTED:
                    self.log.error("accept() failed: %s", exc)
                return
            if self._accept_failures:
                self.log.warning("accept() works again after %d failed attempts",
                                 self._accept_failures)
                self._accept_failures = 0
            sock.setblocking(False)
            if (len(self.connections) + len(self.lingering) >= config.max_connections
                    and not self._make_room()):
                self._refuse(sock)
                if len(self.refusing) >= _REFUSAL_RESERVE:
                    self._unwatch_listeners()   # rest until a refused socket is let go
                    return
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            try:
                stream = self._stream(sock, client)
            except OSError as exc:
                self.log.debug("%s: connection lost at once: %s", client, exc)
                sock.close()
                continue
            # With HTTP/2 on, the first bytes (or ALPN) choose (section 6a).
            conn = ProtocolChoice(self, stream) if config.http2 else \
                HTTPConnection(self, stream)
            self.connections.add(conn)
            conn.start()

    def _stream(self, sock, client):
        """The byte stream (section 5) of an accepted socket: TLS on a
        server with a certificate, whose handshake runs in the connection's
        first reads."""
        if self.ssl_context is None:
            return SocketStream(sock, client)
        tls_sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
        return TLSStream(tls_sock, self.loop, self.server_cert, client)

    def _make_room(self):
        """Eviction before refusal: free a slot by cutting short the oldest
        lingering socket (its response is out), else by closing the oldest
        idle keep-alive connection (no request in progress, no byte of the
        next one).  False if every slot holds a connection that is busy."""
        if self.lingering:
            next(iter(self.lingering)).cut_short()
            return True
        idle = self.idle
        while idle:
            conn, _ = idle.popitem(last=False)
            if conn.evict():
                self._evicted += 1
                return True
        return False

    def _refuse(self, sock):
        """Admission control: 503, Retry-After: 5, Connection: close; the
        socket lingers in the reserve."""
        self._refused += 1
        try:
            stream = SocketStream(sock)
            if self.ssl_context is None:
                stream.send(error_response(503, "Service Unavailable: too many connections",
                                           [(b"retry-after", b"5")], self.stamp))
            # With TLS, an answer would need a handshake first (CPU and a
            # slot): the client sees the connection closed instead.
        except OSError:
            sock.close()
            return
        linger = _Linger(self.loop, stream, self._refusal_ended)
        if linger.stream is not None:
            self.refusing[linger] = None

    def _begin_backoff(self, exc):
        """Out of descriptors: rest the listener instead of spinning on it,
        and say so once per episode (an episode ends when accept works)."""
        if not self._accept_failures:
            self.log.warning("accept() failed (%s): pausing accept until a connection "
                             "closes or %.1f s pass, retrying until it works",
                             exc.strerror, _ACCEPT_BACKOFF)
        self._accept_failures += 1
        self._unwatch_listeners()
        if self._backoff_timer is None:
            self._backoff_timer = self.loop.call_later(_ACCEPT_BACKOFF, self._end_backoff)

    def _end_backoff(self):
        if self._backoff_timer is not None:
            self._backoff_timer.cancel()
            self._backoff_timer = None
        self._watch_listeners()

    # -- timeouts -----------------------------------------------------------------------

    def _sweep(self):
        """One pass over the connections against their last-activity times."""
        loop = self.loop
        now = loop.time()
        config = self.config
        for conn in list(self.connections):
            if not conn.closed:
                conn.check_timeouts(now, config)
        if self.access_log is not None:
            self.access_log.report_drops()
        loop.call_later(_SWEEP_INTERVAL, self._sweep)


# ============================================================================
# 11. Workers (pre-fork; PAGI Lifespan "Execution Model")
#
# With --workers N the process opens its listeners once and becomes a
# supervisor: it forks N workers, each of which builds its own Server (its
# own loop -- nothing of the supervisor's loop may cross a fork) around
# every inherited listener, runs its own lifespan (pagi.is_worker 1,
# pagi.worker_num 1..N) and serves.  The kernel hands each new connection
# to one of the workers waiting in accept.
#
# The supervisor serves nothing.  It runs a Loop of its own whose callbacks
# are its signals (gunicorn's meanings, docs/server.md has the table), the
# deaths of its children (SIGCHLD) and one pipe per worker, on which the
# worker says it has started ("R"), that its loop still turns ("." every
# second: the watchdog), that it has served max_requests ("M"), or why its
# application could not be loaded ("E" and a line).  It holds a desired
# state -- N workers of the current generation -- and every event ends by
# comparing what runs with it (_fill).  A worker that dies unexpectedly is
# replaced after a back-off that doubles while deaths come quickly; the
# supervisor never gives up while it is not told to stop.  Only the first
# generation failing to start ends it (exit status 2 or 3), since then
# nothing has ever served.
#
# What must not go in here: anything about connections or HTTP.  A worker
# is a Server, configured and signalled; the supervisor never looks inside.
# ============================================================================

_WORKER_CANNOT_LOAD = 2      # a worker's exit status: the application does not import
_WORKER_REFUSED = 3          # a worker's exit status: its application refused to start
_RESPAWN_FIRST = 0.1         # seconds: the back-off after a quick death, then doubling
_RESPAWN_CAP = 30.0          # seconds: the longest back-off
_HEALTHY_RUN = 10.0          # seconds a worker must live for its slot's back-off to reset
_STACK_GRACE = 1.0           # seconds a stuck worker gets to write its stack before SIGKILL
_STACK_LIMIT = 65536         # bytes of a stuck worker's stack kept for the log
_SUPERVISED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                       signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)


def _watch_interval(config):
    """Seconds between a worker's heartbeats, and between the supervisor's
    checks of them."""
    return min(1.0, config.worker_timeout / 4) if config.worker_timeout else 1.0


def _describe_exit(code):
    if code < 0:
        try:
            return "was killed by signal %s" % signal.Signals(-code).name
        except ValueError:
            return "was killed by signal %d" % -code
    return "exited with status %d" % code


class _Worker:
    """The supervisor's record of one child."""

    __slots__ = ("pid", "slot", "generation", "pipe", "buf", "started", "ready",
                 "last_beat", "retiring", "stack", "stuck", "error")

    def __init__(self, pid, slot, generation, pipe, now):
        self.pid = pid
        self.slot = slot              # 1..N: its pagi.worker_num
        self.generation = generation  # which reload started it
        self.pipe = pipe              # read end of the worker's pipe
        self.buf = b""                # an "E" line not yet complete
        self.started = now            # when it was forked
        self.ready = False            # it sent "R": lifespan started, serving
        self.last_beat = now          # when its loop last said it turns
        self.retiring = False         # asked to stop (or stopping itself): not counted
        self.stack = None             # bytearray: the stack it wrote when stuck
        self.stuck = False            # the watchdog asked for its stack
        self.error = None             # why its application could not be loaded

    def __repr__(self):
        return "<worker %d pid %d gen %d%s%s>" % (
            self.slot, self.pid, self.generation, " ready" if self.ready else "",
            " retiring" if self.retiring else "")


class Supervisor:
    """Forks ``config.workers`` servers on one listener and keeps them alive.

    ``app`` is the application, or None with ``load``: a function that
    imports it, called in every new worker, so that a reload (SIGHUP) runs
    the code as it is on disk now.
    """

    def __init__(self, app, config, log, load=None, clock=time.monotonic):
        self.app = app
        self.load = load
        self.config = config
        self.log = log
        self.loop = Loop(clock=clock, logger=log, slow_callback=config.slow_callback)
        self.listeners = []           # every Listener, until the stop begins
        self.workers = {}             # pid -> _Worker
        self.size = config.workers    # the desired number of workers (TTIN/TTOU)
        self.generation = 1           # the generation that serves
        self.next_generation = None   # the generation a reload is starting
        self.generations = 1          # generations started so far
        self.reload_again = False     # a SIGHUP came during a reload
        self.first_ready = False      # the first generation has started
        self.backoff = {}             # slot -> seconds of its last back-off
        self.respawns = {}            # slot -> Timer of a respawn after a back-off
        self.stopping = False         # a stop signal arrived (or the start failed)
        self.signals = 0              # stop signals received
        self.exit_status = 0
        self.finished = Future(self.loop)   # resolved when the last worker is gone

    def __repr__(self):
        return "<Supervisor size=%d generation=%d workers=%r%s>" % (
            self.size, self.generation, sorted(self.workers.values(), key=lambda w: w.slot),
            " stopping" if self.stopping else "")

    # -- running ----------------------------------------------------------------

    def run(self, listeners):
        """Serve with workers on the open ``listeners`` (Listener objects, or
        one socket); returns the exit status."""
        if not isinstance(listeners, (list, tuple)):
            listeners = [listeners]
        self.listeners = [l if isinstance(l, Listener) else Listener(l) for l in listeners]
        loop = self.loop
        handlers = {signal.SIGTERM: self._on_stop_signal, signal.SIGINT: self._on_stop_signal,
                    signal.SIGQUIT: self._on_quit, signal.SIGHUP: self._on_hup,
                    signal.SIGTTIN: self._on_ttin, signal.SIGTTOU: self._on_ttou,
                    signal.SIGCHLD: self._on_sigchld}
        for signum in _SUPERVISED_SIGNALS:
            loop.add_signal_handler(signum, handlers[signum])
        try:
            self._fill()
            loop.call_later(_watch_interval(self.config), self._tick)
            loop.run_until(self.finished)
        finally:
            loop.remove_signal_handlers()
            for worker in list(self.workers.values()):
                _kill(worker.pid, signal.SIGKILL)    # only if run() itself failed
            self._close_listener()
            loop.close()
        return self.exit_status

    def _close_listener(self):
        """Every listener, and the Unix socket files the supervisor made."""
        for listener in self.listeners:
            listener.close()
        self.listeners = []

    def _live(self, generation):
        return [w for w in self.workers.values()
                if w.generation == generation and not w.retiring]

    def _fill(self):
        """Start what the desired state lacks: one worker per slot of the
        serving generation, except slots waiting out a back-off."""
        if self.stopping or self.next_generation is not None:
            return
        taken = {w.slot for w in self._live(self.generation)}
        for slot in range(1, self.size + 1):
            if slot not in taken and slot not in self.respawns:
                self._spawn(slot, self.generation)

    def _spawn(self, slot, generation):
        read_end, write_end = os.pipe()
        # Signals stay blocked across the fork, so that none reaches the
        # child before it has replaced the supervisor's handlers.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISED_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            os.close(read_end)
            os.close(write_end)
            self.log.error("cannot fork worker %d: %s; trying again in %.1f s",
                           slot, exc, _RESPAWN_CAP)
            self._respawn_later(slot, _RESPAWN_CAP)
            return
        if pid == 0:
            # The child: never returns into the supervisor's code.
            status = 1
            try:
                os.close(read_end)
                status = self._serve_child(slot, write_end, blocked)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(write_end)
        os.set_blocking(read_end, False)
        worker = _Worker(pid, slot, generation, read_end, self.loop.time())
        self.workers[pid] = worker
        self.loop.add_reader(read_end, lambda: self._on_pipe(worker))

    # -- the worker's side of the fork -------------------------------------------

    def _serve_child(self, slot, pipe, blocked):
        """In the new child: give back the supervisor's loop and signals,
        load the application, serve; returns the exit status."""
        self.loop.remove_signal_handlers()
        for worker in self.workers.values():
            os.close(worker.pipe)
        self.loop.abandon_after_fork()
        # The watchdog's question "where are you stuck?" (SIGUSR2) is answered
        # by faulthandler from C, even while Python code holds the loop -- or
        # while the application is still being imported: so it is answered
        # from here on, before the load (the other signals stay blocked).
        os.set_blocking(pipe, False)
        faulthandler.register(signal.SIGUSR2, file=pipe, all_threads=True)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGUSR2,))
        app = self.app
        if self.load is not None:
            try:
                app = self.load()
            except Exception as exc:
                message = str(exc) or type(exc).__name__
                os.write(pipe, b"E" + message.replace("\n", " ").encode("utf-8", "replace")
                         + b"\n")
                return _WORKER_CANNOT_LOAD
        server = Server(app, self.config, logger=self.log, worker_num=slot)
        supervisor = os.getppid()
        for listener in self.listeners:
            server.use_listener(listener)     # a fork's copy: the file stays the supervisor's
        # Ctrl-C reaches the whole process group, and a terminal hang-up
        # sends SIGHUP to it: the supervisor acts on those for the workers.
        # (Ignored before and after the server's own handlers, so that they
        # stay ignored when the server gives its handlers back.)
        supervised = (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
        for signum in supervised:
            signal.signal(signum, signal.SIG_IGN)
        server.install_signal_handlers(escalate=False)
        for signum in supervised:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        server.on_retire = lambda: _tell(pipe, b"M")
        interval = _watch_interval(self.config)

        def heartbeat():
            # The supervisor's watch, both ways: it hears the beat, and the
            # beat checks that it is still there.  When it is gone (even by
            # SIGKILL) the worker has been re-parented: it must not go on
            # alone, holding the port, so it shuts down as a signal would.
            if os.getppid() != supervisor:
                server.log.warning("the supervisor (pid %d) is gone; shutting down",
                                   supervisor)
                server.stop()
                return
            _tell(pipe, b".")
            server.loop.call_later(interval, heartbeat)
        server.loop.call_soon(heartbeat)
        if not server.startup():
            server.close()
            return _WORKER_REFUSED
        _tell(pipe, b"R")
        server.serve()
        return 0

    # -- what the workers say ------------------------------------------------------

    def _on_pipe(self, worker):
        try:
            data = os.read(worker.pipe, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:              # the worker has gone; SIGCHLD tells how
            self.loop.forget(worker.pipe)
            return
        if worker.stuck:          # what follows the watchdog's SIGUSR2 is the stack
            if len(worker.stack) < _STACK_LIMIT:
                worker.stack += data
            return
        data = worker.buf + data
        worker.buf = b""
        now = self.loop.time()
        while data:
            if data[:1] == b"E":
                line, newline, rest = data[1:].partition(b"\n")
                if not newline:
                    worker.buf = data
                    return
                worker.error = line.decode("utf-8", "replace")
                data = rest
                continue
            kind, data = data[:1], data[1:]
            worker.last_beat = now
            if kind == b"R":
                self._started(worker)
            elif kind == b"M":
                self.log.info("pagi_ref: worker %d (pid %d) reached max_requests; "
                              "starting its replacement", worker.slot, worker.pid)
                worker.retiring = True
                self._fill()

    def _started(self, worker):
        worker.ready = True
        if self.stopping:
            return
        if not self.first_ready:
            ready = [w for w in self._live(self.generation) if w.ready]
            if len(ready) >= self.size:
                self.first_ready = True
                self.log.info("pagi_ref: %d workers started", self.size)
                announce_listeners(self.log, self.listeners, bool(self.config.ssl_certfile))
                if self.reload_again:       # a SIGHUP came during the start
                    self.reload_again = False
                    self._on_hup(signal.SIGHUP)
        elif worker.generation == self.next_generation:
            ready = [w for w in self._live(worker.generation) if w.ready]
            if len(ready) >= self.size:
                self._switch_generation()

    # -- deaths -------------------------------------------------------------------

    def _on_sigchld(self, signum):
        self._reap()

    def _reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._died(worker, os.waitstatus_to_exitcode(status))
        if self.stopping and not self.workers:
            _resolve_if_pending(self.finished, None)

    def _died(self, worker, code):
        self.loop.forget(worker.pipe)
        os.close(worker.pipe)
        how = _describe_exit(code)
        if self.stopping:
            self.log.debug("worker %d (pid %d) %s", worker.slot, worker.pid, how)
            return
        if worker.retiring and not worker.stuck:
            self.log.info("pagi_ref: worker %d (pid %d) of generation %d %s",
                          worker.slot, worker.pid, worker.generation, how)
            self._fill()
            return
        why = how
        if code == _WORKER_CANNOT_LOAD and worker.error:
            why = "could not load the application: %s" % worker.error
        elif code == _WORKER_REFUSED:
            why = "refused to start (its lifespan startup failed)"
        if not self.first_ready and worker.generation == 1:
            self.log.error("worker %d (pid %d) %s; stopping", worker.slot, worker.pid, why)
            if code == _WORKER_CANNOT_LOAD and worker.error:
                sys.stderr.write("pagi_ref: error: %s\n" % worker.error)
                sys.stderr.flush()
            self.exit_status = code if code in (_WORKER_CANNOT_LOAD, _WORKER_REFUSED) else 1
            self._begin_stop()
            return
        if worker.generation == self.next_generation:
            self._abort_reload(worker, why)
            return
        if worker.retiring:      # stuck, killed by the watchdog, already replaced
            self.log.error("worker %d (pid %d) %s", worker.slot, worker.pid, why)
            return
        lived = self.loop.time() - worker.started
        if lived >= _HEALTHY_RUN:
            delay = 0.0
        else:
            delay = min(_RESPAWN_CAP, max(_RESPAWN_FIRST, 2 * self.backoff.get(worker.slot, 0)))
        self.backoff[worker.slot] = delay
        if worker.generation != self.generation:
            self.log.error("worker %d (pid %d) of generation %d %s", worker.slot,
                           worker.pid, worker.generation, why)
            return
        if delay:
            self.log.error("worker %d (pid %d) %s after %.1f s; starting another in %.1f s",
                           worker.slot, worker.pid, why, lived, delay)
            self._respawn_later(worker.slot, delay)
        else:
            self.log.error("worker %d (pid %d) %s; starting another",
                           worker.slot, worker.pid, why)
            self._fill()

    def _respawn_later(self, slot, delay):
        def due():
            self.respawns.pop(slot, None)
            self._fill()
        self.respawns[slot] = self.loop.call_later(delay, due)

    # -- the watchdog ---------------------------------------------------------------

    def _tick(self):
        self._reap()
        timeout = self.config.worker_timeout
        now = self.loop.time()
        boot = self.config.worker_boot_timeout
        for worker in list(self.workers.values()):
            if worker.stuck:
                continue
            if worker.ready:
                silent = now - worker.last_beat
                if timeout and silent > timeout:
                    self._ask_stack(worker, silent)
            # Not yet ready: loading the application (no beats: the loop has
            # not started) or in its lifespan startup (which may rightly
            # hold the loop, loading a model).  A worker that never gets
            # there -- an import that hangs -- would hold a reload forever.
            elif boot and now - worker.started > boot:
                self._ask_stack(worker, now - worker.started)
        self.loop.call_later(_watch_interval(self.config), self._tick)

    def _ask_stack(self, worker, waited):
        """Ask a stuck worker where it is (SIGUSR2), kill it a moment later."""
        worker.stuck = True
        worker.stack = bytearray()
        _kill(worker.pid, signal.SIGUSR2)
        self.loop.call_later(_STACK_GRACE, self._kill_stuck, worker, waited)

    def _kill_stuck(self, worker, waited):
        if self.workers.get(worker.pid) is not worker:
            return
        stack = bytes(worker.stack).decode("utf-8", "replace").rstrip()
        if worker.ready:
            what = "its loop has not turned for %.1f s (worker_timeout %.1f s)" % (
                waited, self.config.worker_timeout)
        else:
            what = ("it has not started (loading the application, its lifespan "
                    "startup) %.1f s after its fork (worker_boot_timeout %.1f s)"
                    % (waited, self.config.worker_boot_timeout))
        self.log.error("worker %d (pid %d) of generation %d: %s; killing it.  "
                       "Where it was stuck:\n%s", worker.slot, worker.pid,
                       worker.generation, what, stack or "(no stack received)")
        _kill(worker.pid, signal.SIGKILL)
        was_retiring, worker.retiring = worker.retiring, True
        if not was_retiring and not self.stopping:
            self._fill()       # its replacement starts now, back-off or not

    # -- reloading and resizing ------------------------------------------------------

    def _on_hup(self, signum):
        if self.stopping:
            return
        if self.next_generation is not None or not self.first_ready:
            self.log.info("pagi_ref: SIGHUP received while workers are starting; "
                          "reloading once they have")
            self.reload_again = True
            return
        self.generations += 1
        self.next_generation = self.generations
        self.log.info("pagi_ref: SIGHUP received: starting generation %d (%d workers); "
                      "generation %d serves until it has started", self.next_generation,
                      self.size, self.generation)
        for slot in range(1, self.size + 1):
            self._spawn(slot, self.next_generation)

    def _switch_generation(self):
        old, self.generation = self.generation, self.next_generation
        self.next_generation = None
        for timer in self.respawns.values():
            timer.cancel()
        self.respawns.clear()
        self.backoff.clear()
        stopping = [w for w in self.workers.values() if w.generation < self.generation]
        for worker in stopping:
            worker.retiring = True
            _kill(worker.pid, signal.SIGTERM)
        self.log.info("pagi_ref: generation %d serves; stopping generation %d "
                      "gracefully (%d workers)", self.generation, old, len(stopping))
        self._after_reload()

    def _abort_reload(self, worker, why):
        failed, self.next_generation = self.next_generation, None
        for other in self._live(failed):
            other.retiring = True
            _kill(other.pid, signal.SIGTERM)
        self.log.error("pagi_ref: reload failed: worker %d (pid %d) of generation %d %s; "
                       "generation %d goes on serving", worker.slot, worker.pid, failed,
                       why, self.generation)
        self._after_reload()

    def _after_reload(self):
        self._fill()
        if self.reload_again:
            self.reload_again = False
            self._on_hup(signal.SIGHUP)

    def _on_ttin(self, signum):
        if self.stopping:
            return
        self.size += 1
        self.log.info("pagi_ref: SIGTTIN received: %d workers", self.size)
        if self.next_generation is not None:    # the reload's generation grows too
            self._spawn(self.size, self.next_generation)
        self._fill()

    def _on_ttou(self, signum):
        if self.stopping:
            return
        if self.size == 1:
            self.log.info("pagi_ref: SIGTTOU received: staying at 1 worker")
            return
        self.size -= 1
        self.log.info("pagi_ref: SIGTTOU received: %d workers", self.size)
        timer = self.respawns.pop(self.size + 1, None)
        if timer is not None:
            timer.cancel()
        for worker in self.workers.values():
            if worker.slot > self.size and not worker.retiring and \
                    worker.generation in (self.generation, self.next_generation):
                worker.retiring = True
                _kill(worker.pid, signal.SIGTERM)

    # -- stopping -----------------------------------------------------------------------

    def _on_stop_signal(self, signum):
        self.signals += 1
        if self.signals > 1:
            self.log.info("pagi_ref: second %s received: stopping at once",
                          signal.Signals(signum).name)
            self._stop_now()
            return
        self.log.info("pagi_ref: %s received, stopping %d workers (each gets up to %g s to "
                      "finish its requests); press Ctrl-C again to stop now",
                      signal.Signals(signum).name, len(self.workers),
                      self.config.shutdown_timeout)
        self._begin_stop()

    def _on_quit(self, signum):
        self.log.info("pagi_ref: SIGQUIT received: stopping at once")
        self._stop_now()

    def _begin_stop(self):
        """Graceful: the listener closes first (new connections are refused
        at once), then every worker is told to finish what it is serving."""
        self.stopping = True
        self._close_listener()
        for timer in self.respawns.values():
            timer.cancel()
        self.respawns.clear()
        for worker in self.workers.values():
            _kill(worker.pid, signal.SIGTERM)
        self._reap()

    def _stop_now(self):
        self.stopping = True
        self.exit_status = 1
        self._close_listener()
        for worker in self.workers.values():
            _kill(worker.pid, signal.SIGKILL)
        self._reap()


def _tell(fd, message):
    """A worker's one-byte message to its supervisor; never blocks (a full
    pipe means the supervisor has plenty to read already)."""
    try:
        os.write(fd, message)
    except (BlockingIOError, InterruptedError):
        pass
    except OSError:
        pass    # the supervisor is gone: the heartbeat notices


def _kill(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# ============================================================================
# 12. Command line (and run(), its Python twin)
#
#   python pagi_ref.py MODULE:ATTR [options]
#   python -m pagi_ref MODULE:ATTR [options]
#   pagi_ref.run(app, host=..., port=..., **config_fields)
#
# MODULE is a dotted module name or a path to a .py file.  Every Config field
# is an option (--max-header-size, --write-high-watermark, ...).  An
# application that does ``import pagi_ref`` gets this very module, also when
# it runs as __main__ (see the bottom of the file).
# ============================================================================

def _error_log(config):
    """The "pagi_ref" logger to stderr at config.log_level, set up once."""
    log = logging.getLogger("pagi_ref")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(_LOG_LEVELS[config.log_level])
    return log


def run(app, host="127.0.0.1", port=8000, **config):
    """Serve ``app`` until SIGTERM/SIGINT: for people who vendor this file.
    Prints the listening line (with the real port) as the command line does."""
    config = Config(host=host, port=port, **config)
    listeners = open_listeners(config, os.environ)
    if config.workers > 1:
        status = Supervisor(app, config, _error_log(config)).run(listeners)
        if status:
            raise RuntimeError("pagi_ref: the workers stopped with status %d" % status)
        return
    server = Server(app, config, logger=_error_log(config))
    for listener in listeners:
        server.use_listener(listener)
    if not _start_and_serve(server):
        raise RuntimeError("pagi_ref: the application refused to start (lifespan)")


def _start_and_serve(server):
    """What main() and run() share: signals, the lifespan startup, then the
    listening line -- the moment a supervisor may send traffic -- and serve.
    False if the application refused to start."""
    if threading.current_thread() is threading.main_thread():
        server.install_signal_handlers()   # before the line a supervisor waits for
    if not server.startup():
        server.close()
        return False
    if not server.shutting_down:        # a signal may have come during startup
        announce_listeners(server.log, server.listeners, server.ssl_context is not None)
    server.serve()
    return True


class _UsageError(Exception):
    pass


def _split_app_spec(spec):
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise _UsageError("application must be given as MODULE:ATTR, got %r" % spec)
    return module_name, attr


def _import_machinery(filename):
    """A frame of pagi_ref's own loading or of importlib, not the application's."""
    return (filename == __file__ or filename.startswith("<frozen")
            or os.sep + "importlib" + os.sep in filename)


def load_app(spec):
    """Import ``MODULE:ATTR`` and return the attribute."""
    module_name, attr = _split_app_spec(spec)
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            path = os.path.abspath(module_name)
            if not os.path.isfile(path):
                raise _UsageError("no such file: %s" % module_name)
            directory = os.path.dirname(path)
            if directory not in sys.path:
                sys.path.insert(0, directory)
            name = os.path.splitext(os.path.basename(path))[0]
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except _UsageError:
        raise
    except Exception as exc:
        # The first line says what failed; the traceback below it, from the
        # application's own frames on (as uvicorn shows it), says where.
        # A module that is simply not there gets the one line.
        tb = exc.__traceback__
        while tb is not None and _import_machinery(tb.tb_frame.f_code.co_filename):
            tb = tb.tb_next
        where = "" if tb is None and not isinstance(exc, SyntaxError) else "\n" + "".join(
            traceback.format_exception(type(exc), exc, tb)).rstrip()
        raise _UsageError("cannot import %s: %s: %s%s" % (module_name, type(exc).__name__,
                                                           exc, where))
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise _UsageError("module %s has no attribute %r" % (module_name, attr))
    if not callable(obj):
        raise _UsageError("%s is not callable" % spec)
    return obj


def _uds_option(path):
    return "unix:" + path


def _fd_option(number):
    return "fd://%d" % int(number)


def _argument_parser():
    import argparse
    parser = argparse.ArgumentParser(
        prog="pagi_ref",
        description="pagi_ref %s: the reference server of the PAGI protocol." % __version__,
        epilog="Example: python pagi_ref.py examples/hello.py:app --port 8000")
    parser.add_argument("app", metavar="MODULE:ATTR",
                        help="the application: a dotted module or a .py path, and an attribute")
    parser.add_argument("--version", action="version", version="pagi_ref " + __version__)
    for name, default, kind, help_text in _CONFIG_FIELDS:
        if default is not None:
            shown = repr(default)
        elif name in _CONFIG_FACTORIES:
            shown = "from RLIMIT_NOFILE, now %r" % _CONFIG_FACTORIES[name]()
        else:
            shown = "off"
        help_text = ("%s (default: %s)" % (help_text, shown)).replace("%", "%%")
        flag = "--" + name.replace("_", "-")
        if kind is bool:      # --server-header / --no-server-header
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif kind is tuple:   # repeatable
            parser.add_argument(flag, dest=name, action="append", metavar="ADDRESS",
                                default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=None,
                                metavar=kind.__name__.upper(), help=help_text)
    # uvicorn's spellings of two kinds of --bind.
    parser.add_argument("--uds", dest="bind", action="append", metavar="PATH",
                        type=_uds_option, help="the same as --bind unix:PATH")
    parser.add_argument("--fd", dest="bind", action="append", metavar="N",
                        type=_fd_option, help="the same as --bind fd://N")
    parser.add_argument("--no-access-log", action="store_true",
                        help="no access log (the default is one line per request to stdout)")
    return parser


def main(argv=None):
    parser = _argument_parser()
    args = parser.parse_args(argv)
    fields = {name: getattr(args, name) for name, _d, _k, _h in _CONFIG_FIELDS
              if getattr(args, name) is not None}
    if args.no_access_log:
        fields["access_log"] = None
    try:
        if "bind" in fields and ("host" in fields or "port" in fields):
            raise _UsageError("--bind, --uds and --fd replace --host and --port: "
                              "give one or the other")
        config = Config(**fields)
        tls_context(config)     # a certificate that cannot be used stops us here
        # With workers, each worker imports the application after the fork
        # (so that a reload imports it afresh); the supervisor never does.
        app = load_app(args.app) if config.workers == 1 else _split_app_spec(args.app)
    except (ConfigError, _UsageError) as exc:
        sys.stderr.write("pagi_ref: error: %s\n" % exc)
        return 2
    if config.access_log not in (None, "-"):
        try:
            open(config.access_log, "ab").close()
        except OSError as exc:
            sys.stderr.write("pagi_ref: error: cannot open the access log %s: %s\n"
                             % (config.access_log, exc.strerror or exc))
            return 2
    try:
        listeners = open_listeners(config, os.environ)
    except OSError as exc:
        sys.stderr.write("pagi_ref: error: %s\n" % exc)
        return 1
    if config.workers > 1:
        return Supervisor(None, config, _error_log(config),
                          load=lambda: load_app(args.app)).run(listeners)
    server = Server(app, config, logger=_error_log(config))
    for listener in listeners:
        server.use_listener(listener)
    return 0 if _start_and_serve(server) else 3


def _demo_app(scope, receive, send):
    """A built-in demo: ``python pagi_ref.py pagi_ref:_demo_app``."""
    if scope["type"] != "http":
        raise ValueError("unsupported scope type %r" % scope["type"])
    body = b"Hello from pagi_ref " + __version__.encode() + b"\n"
    yield send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    yield send({"type": "http.response.body", "body": body})


# ============================================================================
# 13. Test client (for application authors)
#
# ``with pagi_ref.TestClient(app) as client:`` serves ``app`` with a real
# Server (sections 6 to 10, unchanged) on 127.0.0.1, on a port the OS picks,
# in a background thread, and talks to it over real sockets with three small
# blocking clients: HTTP/1.1 (RFC 9112), WebSocket (RFC 6455, the client's
# side: masked frames, §5.3) and event streams (WHATWG HTML "Server-sent
# events", §9.2.6 "Interpreting an event stream").  A test that passes here
# passes against the server, because it is the server.  The one addition is
# a wrapper around the application that registers each call under the
# client address of its scope and records what it raises, so that the test
# thread can wait for the call to end and raise the exception itself.
#
# What goes here: the client side of the three protocols, the thread that
# runs the Server, that wrapper.  What must not: anything the server needs
# (no section above uses this one; it uses Server's public face only: bind,
# startup, serve, stop, address, state), and any shortcut that skips the
# wire -- a client that called the application directly would pass tests
# the server fails.  Every wait is bounded by the client's ``timeout`` and
# fails with TestClientTimeout, naming what it waited for.
#
# The ``__main__`` block of section 12 stays below this section, at the very
# bottom: an application that imports pagi_ref while the module runs as a
# script gets the module as it is when main() starts, and it must be whole.
# ============================================================================

_TEST_HOST = "testserver"                 # the Host header the client sends
_CLIENT_MAX_HEAD = 65536                  # bytes of one response head
_CLIENT_MAX_LINE = 4096                   # bytes of one chunk-size or trailer line
_CLIENT_MAX_BODY = 256 * 1024 * 1024      # bytes of a body read whole (stream() for more)
_CLIENT_MAX_MESSAGE = 64 * 1024 * 1024    # bytes of a WebSocket message, characters of an event
# Printable ASCII but space: what a request target may hold as it is
# (RFC 9112 §3.2); anything else is percent-encoded as UTF-8.
_TARGET_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


class TestClientError(Exception):
    """The server's answer was not what the protocol allows, or the client
    was used wrongly.  ``response`` holds what arrived, when that helps (a
    body cut short, a WebSocket handshake refused)."""

    __test__ = False    # not a pytest test class, whatever its name

    def __init__(self, message, response=None):
        Exception.__init__(self, message)
        self.response = response


class TestClientTimeout(TestClientError):
    """Nothing arrived within the client's timeout; the message says what
    the client was waiting for."""

    __test__ = False


class WebSocketRejected(TestClientError):
    """The server answered the WebSocket handshake with something else than
    ``101``; ``response`` is that answer (a ``403`` for an application that
    closed before accepting, or the application's own denial response)."""


class WebSocketDisconnect(Exception):
    """The server closed the WebSocket session: ``code`` and ``reason`` of
    its close frame (1005 for a close frame without a code, 1006 for a
    connection that ended without one)."""

    def __init__(self, code=1000, reason=""):
        Exception.__init__(self, "the server closed the WebSocket session: %d %s"
                           % (code, reason))
        self.code = code
        self.reason = reason


class Headers:
    """Header fields as the client received them, looked up in any case:
    ``headers["Content-Type"]``, ``get(name, default)`` (several fields of
    one name are joined with ", "), ``get_list(name)``; ``items()`` gives
    (lower-case name, value) ``str`` pairs in order, ``raw`` the bytes."""

    def __init__(self, raw=()):
        self.raw = list(raw)     # [(lower-case name bytes, value bytes)]

    @staticmethod
    def _key(name):
        return (name.encode("latin-1") if isinstance(name, str) else bytes(name)).lower()

    def get_list(self, name):
        key = self._key(name)
        return [v.decode("latin-1") for k, v in self.raw if k == key]

    def get(self, name, default=None):
        values = self.get_list(name)
        return ", ".join(values) if values else default

    def __getitem__(self, name):
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name):
        key = self._key(name)
        return any(k == key for k, _ in self.raw)

    def keys(self):
        return list(dict.fromkeys(k.decode("latin-1") for k, _ in self.raw))

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self.keys())

    def items(self):
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw]

    def __repr__(self):
        return "Headers(%r)" % self.items()


class Response:
    """What the server answered: ``status_code``, ``reason_phrase``,
    ``http_version``, ``headers``, ``content`` (bytes), ``text``, ``json()``
    and, for a chunked response that had them, ``trailers``."""

    def __init__(self, request, status_code, reason_phrase, http_version, headers):
        self.request = request                  # "GET /path?query"
        self.status_code = status_code
        self.reason_phrase = reason_phrase
        self.http_version = http_version        # "HTTP/1.1"
        self.headers = headers
        self.trailers = Headers()
        self._content = None

    @property
    def content(self):
        if self._content is None:
            raise TestClientError("the body of %s has not been read: call read() "
                                  "(or iterate with iter_bytes()) first" % self.request)
        return self._content

    @property
    def encoding(self):
        """The charset of Content-Type, or utf-8."""
        for param in (self.headers.get("content-type") or "").split(";")[1:]:
            name, _, value = param.strip().partition("=")
            if name.lower() == "charset" and value:
                return value.strip('"')
        return "utf-8"

    @property
    def text(self):
        try:
            return self.content.decode(self.encoding, "replace")
        except LookupError:
            return self.content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)

    def __repr__(self):
        return "<Response [%d %s]>" % (self.status_code, self.reason_phrase)


class _Wire:
    """One client connection: a blocking socket and its unread bytes.  Every
    read waits at most ``timeout`` seconds, and fails naming ``what`` it
    waited for."""

    def __init__(self, address, timeout, what):
        self.timeout = timeout
        self.buf = bytearray()
        self.eof = False
        self.send_error = None      # the server closed while the request went out
        try:
            self.sock = socket.create_connection(address, timeout=timeout)
        except socket.timeout:
            raise TestClientTimeout("could not connect for %s within %g s" % (what, timeout))
        self.local = self.sock.getsockname()[:2]

    def send(self, data, what):
        if self.send_error is not None:
            return
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise TestClientTimeout("the server read none of %s for %g s"
                                    % (what, self.timeout))
        except OSError as exc:
            # The server may have answered early (a 413) and closed: keep
            # going, the answer is what the test wants to see.
            self.send_error = exc

    def fill(self, what):
        """One recv into the buffer; False at the end of the stream."""
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise TestClientTimeout("no %s within %g s" % (what, self.timeout))
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_until(self, marker, limit, what):
        """Up to and including ``marker``; at the end of the stream, what
        there is (without the marker)."""
        start = 0
        while True:
            i = self.buf.find(marker, start)
            if i >= 0:
                return self.take(i + len(marker))
            if len(self.buf) > limit:
                raise TestClientError("%s is longer than %d bytes" % (what, limit))
            start = max(0, len(self.buf) - len(marker) + 1)
            if not self.fill(what):
                return self.take(len(self.buf))

    def read_exact(self, size, what):
        """``size`` bytes, or fewer at the end of the stream."""
        while len(self.buf) < size and self.fill(what):
            pass
        return self.take(size)

    def read_some(self, most, what):
        """What has arrived, at most ``most`` bytes; b"" at the end."""
        if not self.buf:
            self.fill(what)
        return self.take(most)

    def take(self, size):
        out = bytes(self.buf[:size])
        del self.buf[:size]
        return out

    def close(self, abort=False):
        """``abort``: a reset (SO_LINGER 0) instead of a FIN, for a client
        that leaves in the middle of a response; the server learns of it at
        its next read or write, as when a browser tab is closed."""
        try:
            if abort:
                # struct linger {l_onoff 1, l_linger 0}, in either byte order
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     b"\x01\0\0\0\0\0\0\0")
            self.sock.close()
        except OSError:
            pass


def _body_bytes(content, data, json_body):
    """(body, content-type) of a request: bytes, or an iterator of pieces
    for a chunked body; None for no body."""
    given = [x for x in (content, data, json_body) if x is not None]
    if len(given) > 1:
        raise TypeError("give one of content=, data= and json=")
    if json_body is not None:
        return json.dumps(json_body).encode("utf-8"), b"application/json"
    if data is not None:
        return urlencode(data, doseq=True).encode("ascii"), b"application/x-www-form-urlencoded"
    if content is None:
        return None, None
    if isinstance(content, str):
        return content.encode("utf-8"), None
    if isinstance(content, (bytes, bytearray, memoryview)):
        return bytes(content), None
    return iter(content), None      # an iterable of pieces: chunked


def _header_pairs(headers):
    """(name, value) bytes pairs from a dict or a list of pairs, str or
    bytes; a CR, LF or NUL would split the request, so it is refused."""
    items = headers.items() if hasattr(headers, "items") else (headers or ())
    pairs = []
    for name, value in items:
        name = name.encode("latin-1") if isinstance(name, str) else bytes(name)
        value = value.encode("latin-1") if isinstance(value, str) else bytes(value)
        if any(c in name + value for c in b"\r\n\0"):
            raise ValueError("header %r contains CR, LF or NUL" % name)
        pairs.append((name, value))
    return pairs


def _request_target(path, params):
    """The origin-form target (RFC 9112 §3.2.1) of ``path``, with ``params``
    added to its query.  A whole http:// or ws:// URL gives its path."""
    for scheme in ("http://", "https://", "ws://", "wss://"):
        if path.startswith(scheme):
            path = "/" + path[len(scheme):].partition("/")[2]
    if not path.startswith("/"):
        raise ValueError("a request path starts with '/', not %r" % path)
    if params:
        path += ("&" if "?" in path else "?") + urlencode(params, doseq=True)
    return quote(path, safe=_TARGET_SAFE)


class _Conversation:
    """One request on a connection of its own, from the test's side: send
    the request, read the head, read the body as it comes, end.  Ending
    closes the socket, waits for the application's call to return, and
    raises what it raised."""

    def __init__(self, client, method, target, headers, body, timeout, extra=()):
        self.client = client
        self.method = method
        self.what = "%s %s" % (method, target)
        self.ended = False
        self.chunked = self.length = None
        self.response = None
        self.received = []          # the body's pieces so far
        self.complete = False       # the response was read to its end
        if not (method.isascii() and _TOKEN.fullmatch(method.encode("ascii"))):
            raise ValueError("a method is a token (RFC 9110 §9.1), not %r" % method)
        fields = _header_pairs(headers)
        names = {n.lower() for n, _ in fields}
        lines = [b"%s %s HTTP/1.1" % (method.encode("ascii"), target.encode("ascii"))]
        if b"host" not in names:
            lines.append(b"host: " + _TEST_HOST.encode("ascii"))
        if b"user-agent" not in names:
            lines.append(b"user-agent: testclient")
        lines.extend(n + b": " + v for n, v in list(extra) + fields)
        # Framing the test wrote itself (a lying Content-Length, say) is sent
        # as it is, and the body without any of ours.
        framed = b"content-length" in names or b"transfer-encoding" in names
        if body is None:
            body = b""
        if isinstance(body, bytes) and not framed and (body or method in ("POST", "PUT", "PATCH")):
            lines.append(b"content-length: %d" % len(body))
        elif not isinstance(body, bytes) and not framed:
            lines.append(b"transfer-encoding: chunked")
        self.wire = _Wire(client.address, timeout, "the request " + self.what)
        try:
            if isinstance(body, bytes):
                self.wire.send(b"\r\n".join(lines) + b"\r\n\r\n" + body,
                               "the request " + self.what)
                return
            self.wire.send(b"\r\n".join(lines) + b"\r\n\r\n", "the request " + self.what)
            for piece in body:
                if isinstance(piece, str):
                    piece = piece.encode("utf-8")
                elif not isinstance(piece, (bytes, bytearray, memoryview)):
                    raise TypeError("a piece of content= is bytes or str, not %s"
                                    % type(piece).__name__)
                if piece:
                    self.wire.send(bytes(piece) if framed else chunk(bytes(piece)),
                                   "the request body of " + self.what)
            if not framed:
                self.wire.send(LAST_CHUNK, "the request body of " + self.what)
        except BaseException:
            self.wire.close(abort=True)
            raise

    def read_head(self, upgrade=False):
        """A Response without its body; interim 1xx answers are skipped
        (but a 101 is final when ``upgrade``)."""
        what = "response head to " + self.what
        while True:
            raw = self.wire.read_until(b"\r\n\r\n", _CLIENT_MAX_HEAD, what)
            if not raw.endswith(b"\r\n\r\n"):
                message = "the server closed the connection before a complete %s" % what
                if self.wire.send_error is not None:
                    message += " (sending the request failed: %s)" % self.wire.send_error
                raise TestClientError(message + (": %r" % raw if raw else ""))
            lines = raw[:-4].split(b"\r\n")
            version, _, rest = lines[0].partition(b" ")
            status, _, reason = rest.partition(b" ")
            if not (version.startswith(b"HTTP/") and len(status) == 3 and status.isdigit()):
                raise TestClientError("not an HTTP status line in the %s: %r" % (what, lines[0]))
            fields = []
            for line in lines[1:]:
                name, colon, value = line.partition(b":")
                if not colon:
                    raise TestClientError("not a header field in the %s: %r" % (what, line))
                fields.append((name.strip().lower(), value.strip(b" \t")))
            code = int(status)
            if 100 <= code < 200 and not (upgrade and code == 101):
                continue
            break
        response = Response(self.what, code, reason.decode("latin-1"),
                            version.decode("latin-1"), Headers(fields))
        # RFC 9112 §6.3: how the body is framed.
        if self.method == "HEAD" or code < 200 or code in (204, 304):
            self.length = 0
        elif "transfer-encoding" in response.headers:
            coding = response.headers["transfer-encoding"].split(",")[-1].strip().lower()
            self.chunked = coding == "chunked"
        elif "content-length" in response.headers:
            values = {v.strip() for v in response.headers["content-length"].split(",")}
            value = values.pop()
            if values or not value or not all("0" <= c <= "9" for c in value):
                raise TestClientError("bad content-length in the %s: %r"
                                      % (what, response.headers["content-length"]))
            self.length = int(value)
        self.response = response
        return response

    def body(self, keep=True):
        """The body's pieces as they arrive (kept in ``received`` if
        ``keep``); a body cut short raises TestClientError after the last
        piece."""
        for piece in self._pieces():
            if keep:
                self.received.append(piece)
            yield piece
        self.complete = True

    def _pieces(self):
        wire, response = self.wire, self.response
        what = "more of the response body of " + self.what
        if self.chunked:
            while True:
                line = wire.read_until(b"\r\n", _CLIENT_MAX_LINE, "a chunk-size line of " + self.what)
                if not line.endswith(b"\r\n"):
                    raise self._cut("chunked, and the last chunk never came")
                size_text = line[:-2].split(b";")[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise TestClientError("bad chunk size %r in the response to %s"
                                          % (size_text, self.what))
                if size == 0:
                    break
                while size:
                    piece = wire.read_some(min(size, 65536), what)
                    if not piece:
                        raise self._cut("chunked, and a chunk was cut")
                    size -= len(piece)
                    yield piece
                if wire.read_exact(2, what) != b"\r\n":
                    raise TestClientError("a chunk of the response to %s does not end "
                                          "with CRLF" % self.what)
            trailers = []
            while True:
                line = wire.read_until(b"\r\n", _CLIENT_MAX_LINE, "the trailers of " + self.what)
                if not line.endswith(b"\r\n"):
                    raise self._cut("chunked, and the trailer section was cut")
                if line == b"\r\n":
                    break
                name, _, value = line[:-2].partition(b":")
                trailers.append((name.strip().lower(), value.strip(b" \t")))
            response.trailers = Headers(trailers)
        elif self.length is not None:
            left = self.length
            while left:
                piece = wire.read_some(min(left, 65536), what)
                if not piece:
                    raise self._cut("content-length %d, %d bytes missing" % (self.length, left))
                left -= len(piece)
                yield piece
        else:
            while True:      # no framing: the body ends when the connection does
                piece = wire.read_some(65536, what)
                if not piece:
                    break
                yield piece

    def read_body(self):
        size = 0
        for piece in self.body():
            size += len(piece)
            if size > _CLIENT_MAX_BODY:
                raise TestClientError("the body of %s passed %d bytes: read it with "
                                      "client.stream()" % (self.what, _CLIENT_MAX_BODY))
        return b"".join(self.received)

    def _cut(self, how):
        """A body that ended before its framing said: the error carries the
        response with what did arrive."""
        self.response._content = b"".join(self.received)
        return TestClientError("the response to %s was cut short (%s)" % (self.what, how),
                               self.response)

    def end(self, error=None, quiet=False):
        """Close; wait for the application's call to return (unless the
        client timed out already); raise what the application raised, else
        ``error``.  ``quiet``: raise nothing (the test is raising already)."""
        if self.ended:
            if error is not None and not quiet:
                raise error
            return
        self.ended = True
        self.wire.close(abort=not self.complete)
        if quiet:
            return
        self.client._after_call(self.wire.local, self.what,
                                wait=not isinstance(error, TestClientTimeout))
        if error is not None:
            raise error


class _OneConversation:
    """What holds one _Conversation open: a context manager that ends it
    (quietly when the with block raised), and close()."""

    def close(self):
        self._conversation.end()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._conversation.end(quiet=exc_type is not None)


class StreamingResponse(_OneConversation, Response):
    """A response whose body is read as it arrives: ``iter_bytes()``,
    ``iter_text()``, ``iter_lines()`` or ``read()``, inside ``with
    client.stream(...) as response:``; leaving the block closes the
    connection (the application sees the client leave)."""

    def __init__(self, conversation):
        head = conversation.response
        Response.__init__(self, head.request, head.status_code, head.reason_phrase,
                          head.http_version, head.headers)
        self._conversation = conversation
        self._started = False

    def iter_bytes(self):
        """The body's pieces as they arrive (not kept: ``content`` is for
        read())."""
        return self._iterate(keep=False)

    def _iterate(self, keep):
        if self._started:
            raise TestClientError("the body of %s is being read, or was" % self.request)
        self._started = True
        conversation = self._conversation
        try:
            for piece in conversation.body(keep):
                yield piece
        except TestClientError as exc:
            conversation.end(exc)
        self.trailers = conversation.response.trailers
        if keep:
            self._content = b"".join(conversation.received)
        conversation.end()

    def iter_text(self):
        decoder = codecs.getincrementaldecoder(self.encoding)("replace")
        for piece in self.iter_bytes():
            text = decoder.decode(piece)
            if text:
                yield text
        text = decoder.decode(b"", True)
        if text:
            yield text

    def iter_lines(self):
        """Lines without their line break (LF or CRLF)."""
        pending = ""
        for text in self.iter_text():
            pending += text
            lines = pending.split("\n")
            pending = lines.pop()
            for line in lines:
                yield line[:-1] if line.endswith("\r") else line
        if pending:
            yield pending

    def read(self):
        """The whole body (what is left of it), as ``content``."""
        for _ in self._iterate(keep=True):
            pass
        return self.content



class ServerSentEvent:
    """One dispatched event (WHATWG HTML §9.2.6): ``event`` ("message" when
    the stream named none), ``data`` (its data lines joined with "\\n"),
    ``id`` (the last event ID, which carries over from earlier events, as a
    browser's ``lastEventId`` does), ``retry`` (the ``retry:`` field of this
    event in milliseconds, or None)."""

    __slots__ = ("event", "data", "id", "retry")

    def __init__(self, data="", event="message", id="", retry=None):
        self.event = event
        self.data = data
        self.id = id
        self.retry = retry

    def json(self):
        return json.loads(self.data)

    def __eq__(self, other):
        if not isinstance(other, ServerSentEvent):
            return NotImplemented
        return ((self.event, self.data, self.id, self.retry)
                == (other.event, other.data, other.id, other.retry))

    def __repr__(self):
        return "ServerSentEvent(event=%r, data=%r, id=%r, retry=%r)" % (
            self.event, self.data, self.id, self.retry)


class _EventStreamParser:
    """WHATWG HTML §9.2.6 "Interpreting an event stream", sans I/O: feed text,
    get the events it completes.  What is pending at the end of the stream
    is discarded, as the standard says."""

    def __init__(self):
        self.text = ""             # undecoded remainder: an incomplete line
        self.first = True          # a U+FEFF at the very start is dropped
        self.after_cr = False      # the last text fed ended with CR
        self.data = []             # the data buffer, line by line
        self.data_size = 0         # characters in it (bounded: _CLIENT_MAX_MESSAGE)
        self.event = ""            # the event type buffer
        self.retry = None          # this event's retry field
        self.last_event_id = ""    # carries over from event to event
        self.reconnection_time = None   # the last valid retry field, in ms

    def feed(self, text):
        if self.first and text:
            self.first = False
            if text.startswith("\ufeff"):
                text = text[1:]
        if self.after_cr and text.startswith("\n"):
            text = text[1:]         # the LF of a CRLF split between two reads
            self.after_cr = False
        if text:
            self.after_cr = text.endswith("\r")
        text = self.text + text
        events, start = [], 0
        for match in _SSE_LINE_BREAK.finditer(text):
            event = self._line(text[start:match.start()])
            if event is not None:
                events.append(event)
            start = match.end()
        self.text = text[start:]
        if len(self.text) + self.data_size > _CLIENT_MAX_MESSAGE:
            raise TestClientError("an event of the stream passed %d characters"
                                  % _CLIENT_MAX_MESSAGE)
        return events

    def _line(self, line):
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None                     # a comment
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "event":
            self.event = value
        elif field == "data":
            self.data.append(value)
            self.data_size += len(value) + 1
        elif field == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif field == "retry":
            if value and all("0" <= c <= "9" for c in value):
                self.retry = self.reconnection_time = int(value)
        return None                         # any other field is ignored

    def _dispatch(self):
        data, event, retry = self.data, self.event, self.retry
        self.data, self.event, self.retry, self.data_size = [], "", None, 0
        if not data:
            return None                     # no data: nothing is dispatched
        return ServerSentEvent("\n".join(data), event or "message", self.last_event_id, retry)


class EventStream(_OneConversation):
    """``with client.sse(path) as events:`` -- iterate for ServerSentEvent
    objects until the server ends the stream; leaving the block closes the
    connection (the application gets sse.disconnect).  ``response`` is the
    response head; an answer that is not a stream (a status other than 200,
    or a content type other than text/event-stream: WHATWG "fail the
    connection") has its body read, and iterating raises TestClientError."""

    def __init__(self, conversation, response, is_stream):
        self._conversation = conversation
        self.response = response
        self.is_stream = is_stream
        self._parser = _EventStreamParser()
        self._started = False

    @property
    def last_event_id(self):
        return self._parser.last_event_id

    @property
    def reconnection_time(self):
        """The last ``retry:`` the server sent, in milliseconds, or None."""
        return self._parser.reconnection_time

    def __iter__(self):
        if not self.is_stream:
            response = self.response
            raise TestClientError("%s is not an event stream: %d %s, content-type %s"
                                  % (response.request, response.status_code,
                                     response.reason_phrase,
                                     response.headers.get("content-type")), response)
        if self._started:
            raise TestClientError("this event stream is being read, or was")
        self._started = True
        conversation, parser = self._conversation, self._parser
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            for piece in conversation.body(keep=False):
                for event in parser.feed(decoder.decode(piece)):
                    yield event
            parser.feed(decoder.decode(b"", True))
        except TestClientError as exc:
            conversation.end(exc)
        conversation.end()



class WebSocketSession:
    """The client's side of one WebSocket session (RFC 6455), after a 101.

    ``send_text``, ``send_bytes``, ``send_json``; ``receive()`` (a ``str``
    for a text message, ``bytes`` for a binary one), ``receive_text``,
    ``receive_bytes``, ``receive_json``; ``close(code, reason)``.  Frames
    are masked (§5.3), fragmented messages reassembled (§5.4), pings
    answered (§5.5.2); a close frame from the server is answered (§5.5.1),
    and receive raises WebSocketDisconnect with its code and reason.
    ``subprotocol`` is the one the server chose, or None; ``headers`` those
    of the 101."""

    def __init__(self, conversation, response, subprotocol):
        self._conversation = conversation
        self._wire = conversation.wire
        self.path = conversation.what.partition(" ")[2]
        self.headers = response.headers
        self.subprotocol = subprotocol
        self.closed = False              # a close frame was received, or we gave up
        self.close_sent = False
        self.close_code = None           # the server's close frame, once received
        self.close_reason = ""

    # -- sending (RFC 6455 §5.2, §5.3: every client frame masked) ------------

    def _send_frame(self, opcode, payload):
        if self.close_sent:
            raise TestClientError("the WebSocket session on %s is closing; "
                                  "nothing can be sent" % self.path)
        size = len(payload)
        if size < 126:
            head = bytes((0x80 | opcode, 0x80 | size))
        elif size < 65536:
            head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
        mask = os.urandom(4)
        self._wire.send(head + mask + _unmask(payload, mask),
                        "a WebSocket frame on " + self.path)

    def send_text(self, text):
        self._send_frame(_OP_TEXT, text.encode("utf-8"))

    def send_bytes(self, data):
        self._send_frame(_OP_BINARY, bytes(data))

    def send_json(self, value, mode="text"):
        text = json.dumps(value)
        if mode == "text":
            self.send_text(text)
        else:
            self.send_bytes(text.encode("utf-8"))

    # -- receiving ---------------------------------------------------------------------

    def _read_frame(self):
        what = "WebSocket message on " + self.path
        wire = self._wire
        head = wire.read_exact(2, what)
        if len(head) < 2:
            self._gone()
        fin, opcode, size = head[0] & 0x80, head[0] & 0x0F, head[1] & 0x7F
        if head[0] & 0x70:
            self._fail("RSV bits set, and no extension was agreed (RFC 6455 §5.2)")
        if head[1] & 0x80:
            self._fail("a masked frame from the server (RFC 6455 §5.1)")
        if size >= 126:
            extra = wire.read_exact(2 if size == 126 else 8, what)
            if len(extra) < (2 if size == 126 else 8):
                self._gone()
            size = int.from_bytes(extra, "big")
        if opcode >= 0x8 and (size > 125 or not fin):
            self._fail("a control frame longer than 125 bytes or fragmented (RFC 6455 §5.5)")
        if size > _CLIENT_MAX_MESSAGE:
            self._fail("a frame of %d bytes, past the client's %d" % (size, _CLIENT_MAX_MESSAGE),
                       1009)
        payload = wire.read_exact(size, what)
        if len(payload) < size:
            self._gone()
        return fin, opcode, payload

    def receive(self):
        """The next message: ``str`` (text) or ``bytes`` (binary)."""
        if self.closed:
            raise WebSocketDisconnect(self.close_code or 1006, self.close_reason)
        kind, parts, size = None, [], 0
        while True:
            fin, opcode, payload = self._read_frame()
            if opcode == _OP_PING:
                if not self.close_sent:
                    self._send_frame(_OP_PONG, payload)
                continue
            if opcode == _OP_PONG:
                continue
            if opcode == _OP_CLOSE:
                self._closed_by_server(payload)
            if opcode == _OP_CONT:
                if kind is None:
                    self._fail("a continuation frame with no message to continue (§5.4)")
            elif opcode in (_OP_TEXT, _OP_BINARY):
                if kind is not None:
                    self._fail("a new message inside a fragmented one (§5.4)")
                kind = opcode
            else:
                self._fail("unknown opcode 0x%x (§5.2)" % opcode)
            size += len(payload)
            if size > _CLIENT_MAX_MESSAGE:
                self._fail("a message of more than %d bytes" % _CLIENT_MAX_MESSAGE, 1009)
            parts.append(payload)
            if fin:
                break
        data = b"".join(parts)
        if kind == _OP_BINARY:
            return data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self._fail("a text message that is not UTF-8 (§8.1)", 1007)

    def receive_text(self):
        message = self.receive()
        if not isinstance(message, str):
            raise TestClientError("expected a text message on %s, got %d bytes of binary"
                                  % (self.path, len(message)))
        return message

    def receive_bytes(self):
        message = self.receive()
        if not isinstance(message, bytes):
            raise TestClientError("expected a binary message on %s, got text %r"
                                  % (self.path, message[:80]))
        return message

    def receive_json(self):
        return json.loads(self.receive())

    # -- closing (RFC 6455 §5.5.1, §7) --------------------------------------------------

    def _closed_by_server(self, payload):
        """The server's close frame: answer it, end, raise WebSocketDisconnect
        (or what the application raised: its exception is why a 1011 came)."""
        if len(payload) == 1:
            self._fail("a close frame with a 1-byte payload (§5.5.1)")
        code = int.from_bytes(payload[:2], "big") if payload else 1005
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            self._fail("a close reason that is not UTF-8 (§5.5.1)", 1007)
        if not self.close_sent:
            # §5.5.1: answer with a close frame, echoing the status code.
            self._send_frame(_OP_CLOSE, payload[:2])
            self.close_sent = True
        self.closed = True
        self.close_code, self.close_reason = code, reason
        self._conversation.complete = True      # a clean close: a FIN, not a reset
        self._conversation.end()
        raise WebSocketDisconnect(code, reason)

    def close(self, code=1000, reason=""):
        """Send a close frame, wait for the server's (messages that arrive
        meanwhile are dropped), end.  Once closed, this does nothing."""
        if self.closed:
            return
        if not self.close_sent:
            self._send_frame(_OP_CLOSE, ws_close_payload(code, reason))
            self.close_sent = True
        try:
            while True:
                self.receive()
        except WebSocketDisconnect:
            pass

    def _gone(self):
        """The connection ended without a close frame (1006)."""
        self.closed = True
        self.close_code = 1006
        self._conversation.end()
        raise WebSocketDisconnect(1006, "the connection ended without a close frame")

    def _fail(self, message, code=1002):
        """RFC 6455 §7.1.7: the server broke the protocol; fail the
        connection (a close frame with ``code``, then close)."""
        if not self.close_sent:
            try:
                self._send_frame(_OP_CLOSE, ws_close_payload(code))
            except TestClientError:
                pass
            self.close_sent = True
        self.closed = True
        self.close_code = code
        self._conversation.end(TestClientError("the WebSocket session on %s failed: %s"
                                               % (self.path, message)))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.closed = True
            self._conversation.end(quiet=True)
        else:
            self.close()


class _Call:
    """One call of the application, as the test client saw it."""

    __slots__ = ("scope_type", "done", "exception", "started")

    def __init__(self, scope_type):
        self.scope_type = scope_type
        self.done = threading.Event()    # set when the call has returned or raised
        self.exception = None            # what it raised (CancelledError aside)
        self.started = False             # lifespan: startup.complete was sent


class _RecordingApp:
    """The application as the test client's server calls it: each call is
    registered under the client address of its scope, and an exception it
    raises is recorded for the test thread, then raised on to the server,
    which answers as it always does (a 500, a close 1011, a cut stream).
    A generator application gets a generator (``yield from``), an ``async
    def`` one a coroutine (``await``): the server drives either the same
    way, so the wrapper changes nothing it sees.  An exception on the
    lifespan scope before startup.complete is a decline, not an error."""

    def __init__(self, app, raise_exceptions):
        self.app = app
        self.raise_exceptions = raise_exceptions
        self.lock = threading.Lock()
        self.calls = {}            # (host, port) of the client -> _Call
        self.errors = []           # exceptions the test has not seen yet
        self.lifespan = None       # the _Call of the lifespan scope
        self.startup_failed = None  # the message of lifespan.startup.failed

    def __call__(self, scope, receive, send):
        call = _Call(scope.get("type"))
        if call.scope_type == "lifespan":
            self.lifespan = call
            send = self._watching(send, call)
        elif scope.get("client"):
            with self.lock:
                self.calls[tuple(scope["client"])] = call
        try:
            coro = self.app(scope, receive, send)
            if not (hasattr(coro, "send") and hasattr(coro, "throw")):
                raise TypeError("the application must return a generator or a coroutine, "
                                "it returned %s (is it missing a 'yield' or 'async def'?)"
                                % type(coro).__name__)
        except Exception as exc:
            self._ended(call, exc)
            raise
        if hasattr(coro, "__await__"):
            return self._coroutine(coro, call)
        return self._generator(coro, call)

    def _generator(self, coro, call):
        exception = None
        try:
            return (yield from coro)
        except Exception as exc:
            exception = exc
            raise
        finally:
            self._ended(call, exception)

    async def _coroutine(self, coro, call):
        exception = None
        try:
            return await coro
        except Exception as exc:
            exception = exc
            raise
        finally:
            self._ended(call, exception)

    def _watching(self, send, call):
        def lifespan_send(event):
            etype = event.get("type") if isinstance(event, dict) else None
            if etype == "lifespan.startup.complete":
                call.started = True
            elif etype == "lifespan.startup.failed":
                self.startup_failed = event.get("message") or ""
            elif etype == "lifespan.shutdown.failed":
                self._record(LifespanFailed("lifespan.shutdown.failed: %s"
                                            % (event.get("message") or "")))
            return send(event)
        return lifespan_send

    def _ended(self, call, exception):
        if isinstance(exception, CancelledError):
            exception = None
        call.exception = exception
        declined = call.scope_type == "lifespan" and not call.started
        if exception is not None and not declined:
            self._record(exception)
        call.done.set()

    def _record(self, exception):
        if self.raise_exceptions:
            with self.lock:
                self.errors.append(exception)

    def call_of(self, client):
        with self.lock:
            return self.calls.pop(tuple(client), None)

    def take_error(self):
        with self.lock:
            return self.errors.pop(0) if self.errors else None


class _ServerThread:
    """A Server and the thread that runs it: the lifespan startup first
    (``ready`` is set after it, ``started`` says how it went), then
    serve() until stop()."""

    def __init__(self, server):
        self.server = server
        self.ready = threading.Event()
        self.started = None            # True; False if refused; or what startup raised
        self.thread = threading.Thread(target=self.run, name="pagi_ref.TestClient",
                                       daemon=True)

    def run(self):
        server = self.server
        try:
            self.started = server.startup()
        except BaseException as exc:    # a bug of the server: shown to the test
            self.started = exc
        self.ready.set()
        if self.started is True:
            server.serve()
        else:
            server.close()

    def stop(self, timeout):
        """Graceful stop (lifespan shutdown included); False if the thread
        is still running after twice ``timeout`` (the shutdown timeout: for
        the requests, then for the lifespan shutdown, as the server does),
        plus a margin."""
        self.server.stop(timeout)
        self.thread.join(2 * timeout + 5.0)
        return not self.thread.is_alive()


def _stop_forgotten(running, timeout):
    """A client dropped without close(): stop its server."""
    if running.thread.is_alive():
        running.stop(timeout)


class TestClient:
    """Test a PAGI application through the server, over real sockets.

        with pagi_ref.TestClient(app) as client:
            response = client.get("/")
            assert response.status_code == 200

    Entering the block starts a Server on 127.0.0.1 (a port the OS picks)
    and runs the lifespan startup; leaving it runs the shutdown and stops
    the server.  ``state`` is the lifespan state: requests get their
    shallow copy of it, as under the server.  Used without ``with``, the
    client starts the server at its first request, without lifespan (as
    Starlette's does), and ``close()`` stops it.

    Every request goes on a connection of its own and returns once the
    application's call has returned.  An exception the application raised
    is raised in the test (``raise_server_exceptions=False``: the test sees
    only what a client sees: a 500, a close 1011, a cut stream).  Each wait
    is bounded by ``timeout`` seconds.  Other keyword arguments are Config
    fields (``max_body_size=1024``, ``lifespan="on"``...); the access log
    is off unless asked for.
    """

    __test__ = False    # not a pytest test class, whatever its name

    def __init__(self, app, raise_server_exceptions=True, timeout=10.0, **config):
        self.app = app
        self.raise_server_exceptions = raise_server_exceptions
        self.timeout = timeout
        config.setdefault("access_log", None)
        config.setdefault("shutdown_timeout", timeout)     # a test waits no longer
        config.update(host="127.0.0.1", port=0)
        Config(**config)                # a bad field fails here, not at the first request
        self._config = config
        self.log = logging.getLogger("pagi_ref.testclient")
        self._app = None                # the _RecordingApp of the running server
        self._running = None            # its _ServerThread
        self._finalizer = None

    def __repr__(self):
        return "<TestClient %s %s>" % (
            getattr(self.app, "__qualname__", self.app),
            "on http://%s:%d" % self.address if self._running else "stopped")

    # -- the server -------------------------------------------------------------

    def __enter__(self):
        if self._running is not None:
            raise TestClientError("this TestClient is running already: enter it before "
                                  "its first request, and once")
        self._start(lifespan=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        self._stop(raise_errors=exc_type is None)

    def close(self):
        """Stop the server (after the lifespan shutdown, if it ran) and
        raise what the application raised that the test has not seen."""
        self._stop(raise_errors=True)

    def _start(self, lifespan):
        config = dict(self._config)
        if not lifespan:
            config["lifespan"] = "off"
        self._app = recording = _RecordingApp(self.app, self.raise_server_exceptions)
        server = Server(recording, Config(**config), logger=self.log)
        server.bind()
        self._running = running = _ServerThread(server)
        self._finalizer = weakref.finalize(self, _stop_forgotten, running,
                                           server.config.shutdown_timeout)
        running.thread.start()
        if not running.ready.wait(self.timeout):
            self._stop(raise_errors=False)
            raise TestClientTimeout("the lifespan startup did not complete within %g s"
                                    % self.timeout)
        started = running.started
        if started is True:
            return
        self._stop(raise_errors=False)
        if isinstance(started, BaseException):
            raise started
        if recording.startup_failed is not None:
            raise LifespanFailed(recording.startup_failed)
        declined = recording.lifespan.exception if recording.lifespan else None
        raise LifespanFailed("the application declined lifespan, which lifespan='on' "
                             "requires") from declined

    def _stop(self, raise_errors):
        running, self._running = self._running, None
        if running is None:
            return
        self._finalizer.detach()
        shutdown_timeout = running.server.config.shutdown_timeout
        if not running.stop(shutdown_timeout):
            raise TestClientTimeout("the server did not stop within %g s"
                                    % (2 * shutdown_timeout + 5.0))
        if raise_errors:
            self._raise_pending()

    def _ensure_running(self):
        if self._running is None:
            self._start(lifespan=False)
        self._raise_pending()

    def _raise_pending(self):
        if self._app is not None:
            error = self._app.take_error()
            if error is not None:
                raise error

    def _after_call(self, client, what, wait=True):
        """After the client closed the connection of ``what``: wait for the
        application's call on it to return, then raise what it raised."""
        call = self._app.call_of(client)
        if call is not None and wait and not call.done.wait(self.timeout):
            self._raise_pending()
            raise TestClientTimeout(
                "the application was still running %g s after the client closed the "
                "connection of %s: an application should return once the client has "
                "gone (receive() gives a disconnect event; see pagi.connection)"
                % (self.timeout, what))
        self._raise_pending()

    @property
    def address(self):
        """(host, port) of the running server: for clients other than this one."""
        if self._running is None:
            raise TestClientError("the server is not running: use 'with TestClient(app) as "
                                  "client:' or make a request first")
        return self._running.server.address

    @property
    def state(self):
        """The lifespan state: what the application's startup put in its
        ``scope["state"]``; each request gets a shallow copy."""
        if self._running is None:
            raise TestClientError("the server is not running: use 'with TestClient(app) as "
                                  "client:'")
        return self._running.server.state

    # -- HTTP ------------------------------------------------------------------------

    def _conversation(self, method, path, content, data, json_body, headers, params,
                      timeout, extra=()):
        self._ensure_running()
        body, content_type = _body_bytes(content, data, json_body)
        pairs = _header_pairs(headers or ())
        if content_type and not any(n.lower() == b"content-type" for n, _ in pairs):
            pairs.append((b"content-type", content_type))
        return _Conversation(self, method.upper(), _request_target(path, params), pairs, body,
                             self.timeout if timeout is None else timeout, extra)

    def request(self, method, path, *, content=None, data=None, json=None, headers=None,
                params=None, timeout=None):
        """Send one request, read the whole response.  ``content``: bytes,
        str (UTF-8), or an iterable of pieces (sent chunked); ``data``: a
        form (dict); ``json``: any JSON value.  ``headers``: a dict or a
        list of pairs.  ``params``: added to the query."""
        conversation = self._conversation(method, path, content, data, json, headers, params,
                                          timeout)
        try:
            response = conversation.read_head()
            response._content = conversation.read_body()
        except TestClientError as exc:
            conversation.end(exc)
        except BaseException:
            conversation.end(quiet=True)
            raise
        conversation.end()
        return response

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def head(self, path, **kwargs):
        return self.request("HEAD", path, **kwargs)

    def options(self, path, **kwargs):
        return self.request("OPTIONS", path, **kwargs)

    def delete(self, path, **kwargs):
        return self.request("DELETE", path, **kwargs)

    def post(self, path, **kwargs):
        return self.request("POST", path, **kwargs)

    def put(self, path, **kwargs):
        return self.request("PUT", path, **kwargs)

    def patch(self, path, **kwargs):
        return self.request("PATCH", path, **kwargs)

    def stream(self, method, path, *, content=None, data=None, json=None, headers=None,
               params=None, timeout=None):
        """``with client.stream("GET", path) as response:``, the body read
        as it arrives (``response.iter_bytes()`` and friends)."""
        conversation = self._conversation(method, path, content, data, json, headers, params,
                                          timeout)
        try:
            conversation.read_head()
        except TestClientError as exc:
            conversation.end(exc)
        except BaseException:
            conversation.end(quiet=True)
            raise
        return StreamingResponse(conversation)

    # -- Server-Sent Events ---------------------------------------------------------------

    def sse(self, path, *, method="GET", last_event_id=None, content=None, data=None,
            json=None, headers=None, params=None, timeout=None):
        """``with client.sse(path) as events: for event in events: ...``:
        a request with ``Accept: text/event-stream`` (the server gives the
        application an ``sse`` scope), read as a browser's EventSource
        reads it.  ``last_event_id``: sent as Last-Event-ID, as a browser
        does when it reconnects."""
        extra = [(b"accept", b"text/event-stream"), (b"cache-control", b"no-cache")]
        if last_event_id is not None:
            extra.append((b"last-event-id", str(last_event_id).encode("utf-8")))
        names = {n.lower() for n, _ in _header_pairs(headers or ())}
        extra = [(n, v) for n, v in extra if n not in names]
        conversation = self._conversation(method, path, content, data, json, headers, params,
                                          timeout, extra)
        try:
            response = conversation.read_head()
            media_type = (response.headers.get("content-type") or "").split(";")[0]
            is_stream = (response.status_code == 200
                         and media_type.strip().lower() == "text/event-stream")
            if not is_stream:
                response._content = conversation.read_body()
        except TestClientError as exc:
            conversation.end(exc)
        except BaseException:
            conversation.end(quiet=True)
            raise
        if not is_stream:
            conversation.end()
        return EventStream(conversation, response, is_stream)

    # -- WebSocket ------------------------------------------------------------------------

    def websocket_connect(self, path, subprotocols=None, *, headers=None, params=None,
                          timeout=None):
        """``with client.websocket_connect(path) as ws:``: the opening
        handshake (RFC 6455 §4.1), then a WebSocketSession.  A refusal (any
        answer but 101) raises WebSocketRejected with that answer."""
        key = base64.b64encode(os.urandom(16))
        extra = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
                 (b"sec-websocket-key", key), (b"sec-websocket-version", b"13")]
        if subprotocols:
            extra.append((b"sec-websocket-protocol", ", ".join(subprotocols).encode("ascii")))
        conversation = self._conversation("GET", path, None, None, None, headers, params,
                                          timeout, extra)
        try:
            response = conversation.read_head(upgrade=True)
            if response.status_code != 101:
                response._content = conversation.read_body()
        except TestClientError as exc:
            conversation.end(exc)
        except BaseException:
            conversation.end(quiet=True)
            raise
        if response.status_code != 101:
            conversation.end()
            raise WebSocketRejected("the WebSocket handshake to %s was answered %d %s"
                                    % (conversation.what, response.status_code,
                                       response.reason_phrase), response)
        # §4.1: the client checks the server's handshake before using it.
        expected = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest()).decode("ascii")
        chosen = response.headers.get("sec-websocket-protocol")
        problem = None
        if (response.headers.get("upgrade") or "").lower() != "websocket":
            problem = "no 'Upgrade: websocket'"
        elif "upgrade" not in (response.headers.get("connection") or "").lower():
            problem = "no 'Connection: Upgrade'"
        elif response.headers.get("sec-websocket-accept") != expected:
            problem = "a wrong Sec-WebSocket-Accept"
        elif chosen is not None and chosen not in (subprotocols or ()):
            problem = "a subprotocol the client did not offer: %r" % chosen
        elif "sec-websocket-extensions" in response.headers:
            problem = "an extension the client did not offer"
        if problem is not None:
            conversation.end(TestClientError("the 101 to %s has %s (RFC 6455 §4.1)"
                                             % (conversation.what, problem), response))
        return WebSocketSession(conversation, response, chosen)


if __name__ == "__main__":
    # Run as a script, this file is the module __main__; an application that
    # does ``import pagi_ref`` must get this same module (its Future is the
    # one the server knows), not a second copy.
    sys.modules.setdefault("pagi_ref", sys.modules[__name__])
    sys.exit(main())
