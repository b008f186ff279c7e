"""Shared fixtures: a real pagi_ref server on 127.0.0.1, a port the OS picks.

`serve(app, **config)` starts a `pagi_ref.Server` in a thread of this
process and yields a handle with `.port`, `.server` and `.errors` (the
error-log lines, tracebacks included).  Tests that are about processes
(workers, signals, the command line) start `python pagi_ref.py` instead.
"""
import contextlib
import logging
import os
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
# The wire helpers (a raw-socket HTTP/1.1 client) are the conformance suite's:
# one copy, spec_tests/spec_wire.py.
SPEC_TESTS = os.path.join(ROOT, "spec_tests")
if SPEC_TESTS not in sys.path:
    sys.path.insert(0, SPEC_TESTS)

import pagi_ref  # noqa: E402


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


class Running:
    def __init__(self, server, handler):
        self.server = server
        self.host, self.port = server.address
        self._handler = handler

    @property
    def errors(self):
        """Formatted error-log lines at WARNING or above (tracebacks included)."""
        return [l for l in self._handler.lines if not l.startswith(("DEBUG", "INFO"))]

    @property
    def log(self):
        return list(self._handler.lines)


_counter = [0]


class FakeClock:
    """A loop clock the test moves (``serve(app, clock=FakeClock())``): the
    server's timers and timeout sweeps see time pass only when told, so a
    test drives a timeout instead of waiting for it."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@contextlib.contextmanager
def serve(app, clock=None, **config):
    _counter[0] += 1
    logger = logging.getLogger("pagi_ref.test.%d" % _counter[0])
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = _ListHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    config.setdefault("host", "127.0.0.1")
    config.setdefault("port", 0)
    # Most tests are about http; those about lifespan ask for it.
    config.setdefault("lifespan", "off")
    # The access log (on by default, to stdout) only where a test asks for it.
    config.setdefault("access_log", None)
    server = pagi_ref.Server(app, pagi_ref.Config(**config), logger=logger,
                             **({} if clock is None else {"clock": clock}))
    server.bind()
    thread = threading.Thread(target=server.serve, name="pagi_ref-test-server", daemon=True)
    thread.start()
    try:
        yield Running(server, handler)
    finally:
        server.stop(timeout=2)
        thread.join(10)
        logger.removeHandler(handler)
        if thread.is_alive():
            raise RuntimeError("server thread did not stop within 10 s")
