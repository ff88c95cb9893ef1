"""The HTTP client, the gate and the heartbeat against a fake daemon
(tests/fakedaemon.py) on a unix socket and on TCP. Plain Twisted, real
reactor, short timings."""

import os

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from nix_builder_autoscaler_buildbot import gate as g
from nix_builder_autoscaler_buildbot.client import APIError, DaemonClient
from nix_builder_autoscaler_buildbot.durations import parse_duration

from .fakedaemon import FakeDaemon
from .helpers import TEST_TIMEOUT, free_port, short_dir, sleep, wait_until

REQ = {"id": "bb-test-1", "system": "x86_64-linux", "owner": "demo/nix-build#1", "lease": "10m"}


class Base(unittest.TestCase):
    timeout = TEST_TIMEOUT

    def setUp(self):
        self.dir = short_dir(self)  # removed after the daemon stops (cleanups run last-in first-out)
        self.daemon = FakeDaemon()
        self.addCleanup(self.daemon.stop)
        self.lines = []

    def sock(self, name="d.sock"):
        return os.path.join(self.dir, name)

    def unix_client(self, **kw):
        path = self.sock()
        self.daemon.listen_unix(path)
        return DaemonClient(socket=path, **kw)

    def tcp_client(self, token=None, **kw):
        port = self.daemon.listen_tcp()
        return DaemonClient(url=f"http://127.0.0.1:{port}", token=token, **kw)

    def gate(self, client, **kw):
        kw.setdefault("poll", 0.2)
        kw.setdefault("backoff", g.Backoff(0.05, 0.2))
        kw.setdefault("clock", reactor)
        return g.Gate(client, dict(REQ), log=self.lines.append, **kw)

    def logged(self, text):
        return any(text in line for line in self.lines)


class ReadyTest(Base):
    @defer.inlineCallbacks
    def check_ready(self, client):
        self.daemon.ready_after = 3
        created = []
        out = yield self.gate(client, on_created=created.append).run()
        self.assertEqual(out.kind, g.READY, out)
        self.assertEqual(out.reservation["slot"], "slot1")
        self.assertEqual([m for _, m, _, _ in self.daemon.log], ["POST", "GET", "GET", "GET"])
        self.assertEqual(len(created), 1)
        self.assertEqual(created[0]["state"], "pending")
        text = "\n".join(self.lines)
        self.assertIn("reserving capacity for system x86_64-linux", text)
        self.assertIn("reservation bb-test-1", text)
        for want in ("pool x86", "slot slot1", "instance i-fake1", "address 127.0.0.9:2222"):
            self.assertIn(want, out.message)

    def test_ready_after_polls_unix(self):
        return self.check_ready(self.unix_client())

    def test_ready_after_polls_tcp(self):
        return self.check_ready(self.tcp_client())

    @defer.inlineCallbacks
    def test_bearer_token(self):
        self.daemon.token = "s3cret"
        out = yield self.gate(self.tcp_client(token="s3cret")).run()
        self.assertEqual(out.kind, g.READY)

    @defer.inlineCallbacks
    def test_wrong_token_is_permanent(self):
        self.daemon.token = "s3cret"
        out = yield self.gate(self.tcp_client(token="wrong")).run()
        self.assertEqual(out.kind, g.ERROR)
        self.assertIn("401", out.message)
        self.assertIn("bearer token", out.message)
        self.assertEqual(self.daemon.count("POST"), 1, "a 401 is not retried")

    @defer.inlineCallbacks
    def test_long_poll_uses_wait(self):
        self.daemon.ready_after = 2
        yield self.gate(self.unix_client(), poll=7).run()
        gets = [u for u in self.daemon.uris if u.startswith("/v1/reservations/bb-test-1")]
        self.assertEqual(gets, ["/v1/reservations/bb-test-1?wait=7000ms"] * 2)


class FailureTest(Base):
    @defer.inlineCallbacks
    def test_failed(self):
        self.daemon.ready_after = 1
        self.daemon.fail_reason = "pool x86 is at max_builders (4) and pending_timeout 1h passed"
        out = yield self.gate(self.unix_client()).run()
        self.assertEqual(out.kind, g.FAILED)
        self.assertIn("max_builders", out.message)

    @defer.inlineCallbacks
    def test_timeout(self):
        # The daemon keeps the reservation pending, answering each long poll
        # only when its wait is up. The gate polls until wait_timeout and then
        # gives up; no long poll it asks for reaches past that deadline,
        # although poll (30 s) is far longer.
        self.daemon.hold_pending = True
        out = yield self.gate(self.unix_client(), poll=30, wait_timeout=0.5).run()
        self.assertEqual(out.kind, g.TIMEOUT, out)
        self.assertIn("still pending", out.message)
        waits = [parse_duration(u.split("?wait=", 1)[1]) for u in self.daemon.uris if "?wait=" in u]
        self.assertTrue(waits, "the gate gave up without waiting for capacity")
        for wait in waits:
            self.assertLessEqual(wait, 0.5, f"a long poll past the wait deadline: {self.daemon.uris}")

    @defer.inlineCallbacks
    def test_permanent_error_not_retried(self):
        self.daemon.errors["create"] = [400]
        out = yield self.gate(self.unix_client()).run()
        self.assertEqual(out.kind, g.ERROR)
        self.assertIn("400", out.message)
        self.assertEqual(self.daemon.count("POST"), 1)

    @defer.inlineCallbacks
    def test_released_meanwhile(self):
        # A release that arrived before the create leaves a tombstone; the
        # create then gets it back (README "Reservation API").
        client = self.unix_client()
        yield client.release("bb-test-1")
        out = yield self.gate(client).run()
        self.assertEqual(out.kind, g.RELEASED)


class TransientTest(Base):
    @defer.inlineCallbacks
    def test_503_retried(self):
        self.daemon.errors["create"] = [503, 502]
        self.daemon.errors["get"] = [503]
        self.daemon.ready_after = 1
        out = yield self.gate(self.unix_client()).run()
        self.assertEqual(out.kind, g.READY, out)
        self.assertEqual(self.daemon.count("POST"), 3)
        text = "\n".join(self.lines)
        self.assertIn("503", text)
        self.assertIn("retrying in", text)
        self.assertIn("answered again after 2 failed attempts", text)

    @defer.inlineCallbacks
    def test_connection_refused_tcp(self):
        # The daemon starts listening once the gate has been refused.
        port = free_port()
        client = DaemonClient(url=f"http://127.0.0.1:{port}", token="t")
        d = self.gate(client).run()
        yield wait_until(lambda: self.logged("cannot reach the daemon"), what="a refused attempt")
        self.daemon.listen_tcp(port)
        out = yield d
        self.assertEqual(out.kind, g.READY, out)
        self.assertIn("cannot reach the daemon", "\n".join(self.lines))

    @defer.inlineCallbacks
    def test_connection_refused_unix(self):
        path = self.sock()
        client = DaemonClient(socket=path)
        d = self.gate(client).run()
        yield wait_until(lambda: self.logged("cannot reach the daemon"), what="a refused attempt")
        self.daemon.listen_unix(path)
        out = yield d
        self.assertEqual(out.kind, g.READY, out)
        text = "\n".join(self.lines)
        self.assertIn("cannot reach the daemon (unix socket " + path, text)

    @defer.inlineCallbacks
    def test_unreachable_until_deadline(self):
        # The gate retries an unreachable daemon until wait_timeout, then
        # gives up with an error, rather than sleeping past the deadline (or
        # retrying for ever). Its clock is the test's, moved on over each
        # backoff sleep and nothing else, so the gate's time is exactly the
        # sum of its sleeps, however slow the machine.
        client = DaemonClient(socket=self.sock("absent.sock"))
        clock = task.Clock()
        gate = self.gate(client, wait_timeout=0.5, clock=clock)
        self.addCleanup(gate.cancel)
        d = gate.run()
        slept = []
        while not d.called and sum(slept) < 0.5:
            yield wait_until(lambda: d.called or clock.getDelayedCalls(), what="the gate to retry or give up")
            for call in clock.getDelayedCalls():
                slept.append(call.getTime() - clock.seconds())
                clock.advance(slept[-1])
        self.assertGreater(len(slept), 1, "the gate retried while there was time left")
        self.assertLess(sum(slept), 0.5, f"backoff sleeps past the deadline: {slept}")
        out = yield d
        self.assertEqual(out.kind, g.ERROR)
        self.assertIn("cannot reach the daemon", out.message)

    @defer.inlineCallbacks
    def test_request_timeout(self):
        self.daemon.create_delay = 5
        client = self.unix_client(request_timeout=0.2)
        with self.assertRaises(APIError) as cm:
            yield client.create(dict(REQ))
        self.assertTrue(cm.exception.transient)
        self.assertIn("within 0.2s", str(cm.exception))


class CancelTest(Base):
    @defer.inlineCallbacks
    def test_cancel_while_poll_in_flight(self):
        self.daemon.hold_pending = True
        gate = self.gate(self.unix_client(), poll=30)
        d = gate.run()
        key = ("get", "bb-test-1")
        yield wait_until(lambda: key in self.daemon.in_flight, what="long poll in flight")
        gate.cancel()
        out = yield d
        self.assertEqual(out.kind, g.CANCELLED)
        # run() returned before the daemon answered the 30 s poll: the poll is
        # still held, or the daemon already saw its client go away.
        self.assertTrue(key in self.daemon.in_flight or key in self.daemon.disconnected,
                        "run() waited for the long poll's answer")
        # The connection of the long poll was closed, not left to run out.
        yield wait_until(lambda: ("get", "bb-test-1") in self.daemon.disconnected, what="poll connection closed")

    @defer.inlineCallbacks
    def test_cancel_while_create_in_flight(self):
        self.daemon.create_delay = 30
        gate = self.gate(self.unix_client(request_timeout=60))
        d = gate.run()
        yield wait_until(lambda: ("create", "bb-test-1") in self.daemon.in_flight, what="create in flight")
        gate.cancel()
        out = yield d
        self.assertEqual(out.kind, g.CANCELLED)
        yield wait_until(lambda: ("create", "bb-test-1") in self.daemon.disconnected, what="create connection closed")

    @defer.inlineCallbacks
    def test_cancel_during_backoff(self):
        # The gate's clock never moves, so its backoff sleep after the 503
        # never ends by itself: only cancel() can end the wait.
        self.daemon.always["create"] = 503
        gate = self.gate(self.unix_client(), backoff=g.Backoff(30, 30), clock=task.Clock())
        d = gate.run()
        yield wait_until(lambda: self.logged("retrying in"), what="the backoff after the first 503")
        gate.cancel()
        yield wait_until(lambda: d.called, what="run() to return after cancel() during the backoff")
        out = yield d
        self.assertEqual(out.kind, g.CANCELLED)
        self.assertEqual(self.daemon.count("POST"), 1)

    @defer.inlineCallbacks
    def test_cancel_before_run(self):
        gate = self.gate(self.unix_client())
        gate.cancel()
        out = yield gate.run()
        self.assertEqual(out.kind, g.CANCELLED)
        self.assertEqual(self.daemon.count("POST"), 0)


class HeartbeatTest(Base):
    @defer.inlineCallbacks
    def test_heartbeat_keeps_lease(self):
        client = self.unix_client()
        yield client.create(dict(REQ, lease="500ms"))
        hb = g.Heartbeat(client, "bb-test-1", 0.15, clock=reactor, log=self.lines.append)
        hb.start()
        yield sleep(1.5)  # three leases: the time passing is what is tested
        res = self.daemon.current("bb-test-1")
        self.assertEqual(res["state"], "pending")
        # Outliving three 500 ms leases takes three renewals, and a beat is
        # sent only after the answer to the one before (counted in hb.sent).
        self.assertGreaterEqual(res["_heartbeats"], 3)
        self.assertGreaterEqual(hb.sent, 2)
        hb.stop()
        yield wait_until(lambda: self.daemon.current("bb-test-1")["state"] == "expired",
                         what="the lease to run out without heartbeats")

    @defer.inlineCallbacks
    def test_without_heartbeat_lease_expires(self):
        client = self.unix_client()
        yield client.create(dict(REQ, lease="300ms"))
        yield wait_until(lambda: self.daemon.current("bb-test-1")["state"] == "expired", what="the lease to run out")

    @defer.inlineCallbacks
    def test_heartbeat_survives_transient_errors(self):
        client = self.unix_client()
        yield client.create(dict(REQ, lease="10m"))
        self.daemon.errors["heartbeat"] = [503, 500]
        hb = g.Heartbeat(client, "bb-test-1", 0.05, clock=reactor, log=self.lines.append)
        hb.start()
        yield wait_until(lambda: hb.sent >= 2, what="heartbeats after errors")
        hb.stop()
        self.assertEqual(hb.failed, 2)
        self.assertTrue(any("trying again" in line for line in self.lines))

    @defer.inlineCallbacks
    def test_heartbeat_stops_when_reservation_gone(self):
        client = self.unix_client()
        yield client.create(dict(REQ))
        yield client.release("bb-test-1")
        hb = g.Heartbeat(client, "bb-test-1", 0.05, clock=reactor, log=self.lines.append)
        hb.start()
        yield wait_until(lambda: not hb.running, what="heartbeat stop on 409")
        self.assertIn("409", hb.stopped_because)

    @defer.inlineCallbacks
    def test_heartbeat_stops_when_build_ends(self):
        # The heartbeat's clock is the test's: beats happen when it advances.
        # Every beat goes through client.heartbeat, counted here as it is called.
        client = self.unix_client()
        yield client.create(dict(REQ))
        calls = []
        beat = client.heartbeat
        client.heartbeat = lambda rid: calls.append(rid) or beat(rid)
        ended = []
        clock = task.Clock()
        hb = g.Heartbeat(client, "bb-test-1", 0.05, clock=clock, should_stop=lambda: bool(ended))
        hb.start()
        clock.advance(0.05)
        yield wait_until(lambda: hb.sent >= 1, what="the first heartbeat's answer")
        ended.append(True)
        clock.advance(0.05)  # the next beat finds the build ended
        self.assertFalse(hb.running, "heartbeat stop at build end")
        self.assertEqual(hb.stopped_because, "the build has ended")
        # Nothing is left scheduled, so no beat follows, however long we wait.
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(3600)
        self.assertEqual(calls, ["bb-test-1"], "one heartbeat before the build ended, none after")
        self.assertEqual(hb.sent, 1)

    def test_interval(self):
        self.assertEqual(g.heartbeat_interval(600), 60)
        self.assertEqual(g.heartbeat_interval(6), 2)
        self.assertEqual(g.heartbeat_interval(600, heartbeat=5), 5)
