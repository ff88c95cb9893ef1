"""Shared test helpers (real reactor, short timings).

Waits are bounded generously (WAIT): on a busy machine a condition may take
long to come true, and only a test that is truly stuck may hit the bound.
The test classes' trial timeout (TEST_TIMEOUT) is above it, so a stuck wait
reports what it waited for."""

import os
import shutil
import socket
import tempfile
import time

from twisted.internet import defer, reactor, task

WAIT = 120.0  # seconds; the default bound of wait_until
TEST_TIMEOUT = 300  # trial's timeout of one test, above WAIT


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_until(pred, timeout=WAIT, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        yield sleep(0.01)


def short_dir(testcase):
    """A temporary directory with a path short enough for a unix socket."""
    d = tempfile.mkdtemp(prefix="nba")
    testcase.addCleanup(shutil.rmtree, d, True)
    return d


def free_port():
    """A loopback TCP port nothing listens on (right now)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def sock_path(testcase):
    return os.path.join(short_dir(testcase), "d.sock")


def serve_fake_daemon(testcase):
    """Give testcase a FakeDaemon on a unix socket (testcase.daemon,
    .sock, .dir), recording to testcase.events; stopped at cleanup."""
    from .fakedaemon import FakeDaemon

    testcase.dir = short_dir(testcase)
    testcase.events = []
    testcase.daemon = FakeDaemon()
    testcase.daemon.events = testcase.events
    testcase.addCleanup(testcase.daemon.stop)
    testcase.sock = os.path.join(testcase.dir, "d.sock")
    testcase.daemon.listen_unix(testcase.sock)
