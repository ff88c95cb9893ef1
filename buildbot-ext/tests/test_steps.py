"""CapacityGate and ReleaseCapacity as BuildSteps, with a fake build
(tests/fakebuild.py) and the fake daemon."""

import os
import re

from buildbot.process.results import CANCELLED, FAILURE, RETRY, SKIPPED, SUCCESS, WARNINGS
from twisted.internet import defer, error as ierror
from twisted.python.failure import Failure
from twisted.trial import unittest

from nix_builder_autoscaler_buildbot import steps as stepsmod
from nix_builder_autoscaler_buildbot.durations import parse_duration
from nix_builder_autoscaler_buildbot.steps import PROPERTY_ID, CapacityGate, ReleaseCapacity

from .fakebuild import FakeBuild, attach
from .helpers import TEST_TIMEOUT, serve_fake_daemon, sleep, wait_until

DRV = ('Derive([("out","/nix/store/abc-vm-test","","")],[],[],"x86_64-linux","/bin/sh",["-c","true"],'
       '[("builder","/bin/sh"),("name","vm-test"),("requiredSystemFeatures","nixos-test kvm"),'
       '("system","x86_64-linux")])')


class StepTest(unittest.TestCase):
    timeout = TEST_TIMEOUT

    def setUp(self):
        serve_fake_daemon(self)

    def build(self, **props):
        props.setdefault("system", "x86_64-linux")
        return FakeBuild(self.events, props)

    def gate(self, build, **kw):
        kw.setdefault("socket", self.sock)
        kw.setdefault("poll", "200ms")
        kw.setdefault("retry_initial", "50ms")
        kw.setdefault("retry_max", "200ms")
        return attach(CapacityGate(**kw), build)

    def release(self, build, **kw):
        kw.setdefault("socket", self.sock)
        return attach(ReleaseCapacity(**kw), build)

    def posted(self):
        import json

        return [json.loads(b) for _, m, p, b in self.daemon.log if m == "POST" and p == "/v1/reservations"]

    @defer.inlineCallbacks
    def test_gate_then_release(self):
        self.daemon.ready_after = 2
        build = self.build()
        step = self.gate(build)
        result = yield step.run()
        self.assertEqual(result, SUCCESS)
        rid = build.properties.getProperty(PROPERTY_ID)
        self.assertTrue(rid.startswith("bb-"))

        # The id was stored as a build property before the daemon saw the POST.
        order = [e for e in self.events if e[0] == "property" or e[1] == "POST"]
        self.assertEqual(order[0], ("property", PROPERTY_ID, rid))
        self.assertEqual(order[1], ("daemon", "POST", "/v1/reservations"))
        body = self.posted()[0]
        self.assertEqual(body["id"], rid)
        self.assertEqual(body["system"], "x86_64-linux")
        self.assertEqual(body["lease"], "10m")
        self.assertEqual(body["owner"], "demo/nix-build#7 http://buildbot.example/#/builders/1/builds/7")
        self.assertNotIn("features", body)

        self.assertEqual(build.properties.getProperty("nix_builder_autoscaler_slot"), "slot1")
        self.assertEqual(build.properties.getProperty("nix_builder_autoscaler_instance"), "i-fake1")
        self.assertIn("capacity ready after", step.getResultSummary()["step"])
        self.assertIn("x86/slot1", step.getResultSummary()["step"])
        text = build.master.data.updates.log_text("reservation")
        self.assertIn("reserving capacity for system x86_64-linux", text)
        self.assertIn("slot slot1, instance i-fake1, address 127.0.0.9:2222", text)
        self.assertIn("capacity ready after", text)

        hb = stepsmod.heartbeat_for(build)
        self.assertIsNotNone(hb)
        self.assertTrue(hb.running)

        rel = self.release(build)
        result = yield rel.run()
        self.assertEqual(result, SUCCESS)
        self.assertFalse(hb.running, "the release stops the heartbeat")
        self.assertEqual(self.daemon.current(rid)["state"], "released")
        self.assertIn("released reservation " + rid, build.master.data.updates.log_text("release"))

    @defer.inlineCallbacks
    def test_gate_sends_the_project_as_source(self):
        # buildbot-nix's nix-build builds carry the project in the "project"
        # property (from their source stamp).
        build = self.build(project="github:org/repo")
        self.assertEqual((yield self.gate(build).run()), SUCCESS)
        body = self.posted()[-1]
        self.assertEqual(body["source"], "github:org/repo")
        rid = build.properties.getProperty(PROPERTY_ID)
        self.assertEqual(self.daemon.current(rid)["source"], "github:org/repo")
        self.assertIn("reserving capacity for system x86_64-linux (source github:org/repo)",
                      build.master.data.updates.log_text("reservation"))
        # Without the property: the builder name without "/nix-build".
        build = self.build()
        self.assertEqual((yield self.gate(build).run()), SUCCESS)
        self.assertEqual(self.posted()[-1]["source"], "demo")
        # At most 256 bytes.
        build = self.build(project="o/" + "x" * 300)
        self.assertEqual((yield self.gate(build).run()), SUCCESS)
        self.assertEqual(self.posted()[-1]["source"], "o/" + "x" * 254)
        # A configured source wins.
        build = self.build(project="github:org/repo")
        self.assertEqual((yield self.gate(build, source="team-a").run()), SUCCESS)
        self.assertEqual(self.posted()[-1]["source"], "team-a")

    @defer.inlineCallbacks
    def test_daemon_without_sources_reserves_without_one(self):
        # A daemon older than sources refuses the unknown field; the gate
        # then reserves without it instead of failing every build.
        self.daemon.knows_source = False
        build = self.build(project="github:org/repo")
        self.assertEqual((yield self.gate(build).run()), SUCCESS)
        bodies = self.posted()
        self.assertEqual(len(bodies), 2)
        self.assertEqual(bodies[0]["source"], "github:org/repo")
        self.assertNotIn("source", bodies[1])
        self.assertEqual(bodies[0]["id"], bodies[1]["id"])
        self.assertIn("the daemon does not know reservation sources", build.master.data.updates.log_text("reservation"))
        # Other 400s still fail at once.
        self.daemon.knows_source = True
        self.daemon.errors["create"] = [400]
        self.assertEqual((yield self.gate(self.build()).run()), FAILURE)

    @defer.inlineCallbacks
    def test_heartbeat_keeps_lease_until_build_ends(self):
        build = self.build()
        step = self.gate(build, lease="600ms")
        self.assertEqual((yield step.run()), SUCCESS)
        rid = build.properties.getProperty(PROPERTY_ID)
        yield sleep(1.5)  # more than two leases: the time passing is what is tested
        self.assertEqual(self.daemon.current(rid)["state"], "ready")
        self.assertGreaterEqual(self.daemon.current(rid)["_heartbeats"], 3)
        # The worker is lost: the build ends without the release step. The
        # heartbeat stops and the lease runs out.
        build.finish()
        hb = stepsmod.heartbeat_for(build)
        self.assertFalse(hb.running)
        yield wait_until(lambda: self.daemon.current(rid)["state"] == "expired", what="lease expiry")

    @defer.inlineCallbacks
    def test_owner_names_the_attr(self):
        build = self.build(attr="checks.x86_64-linux.vm-test")
        self.assertEqual((yield self.gate(build).run()), SUCCESS)
        self.assertEqual(self.posted()[0]["owner"], "demo/nix-build#7 http://buildbot.example/#/builders/1/builds/7"
                                                    " (checks.x86_64-linux.vm-test)")

    @defer.inlineCallbacks
    def test_skip_when_cached(self):
        for props in ({"cacheStatus": "cached"}, {"cacheStatus": "local"}, {"isCached": True}):
            build = self.build(**props)
            step = self.gate(build)
            self.assertEqual((yield step.run()), SKIPPED)
            self.assertIn("nothing to build remotely", step.getResultSummary()["step"])
            self.assertIsNone(build.properties.getProperty(PROPERTY_ID))
            self.assertEqual((yield self.release(build).run()), SKIPPED)
        self.assertEqual(self.daemon.log, [])

    @defer.inlineCallbacks
    def test_not_cached_is_gated(self):
        build = self.build(cacheStatus="notBuilt")
        self.assertEqual((yield self.gate(build).run()), SUCCESS)
        yield self.release(build).run()

    @defer.inlineCallbacks
    def test_failed_fails_build_with_reason(self):
        self.daemon.ready_after = 1
        self.daemon.fail_reason = "no pool serves system riscv64-linux"
        build = self.build(system="riscv64-linux")
        step = self.gate(build)
        result = yield step.run()
        self.assertEqual(result, FAILURE)
        step.results = result
        summary = step.getResultSummary()
        self.assertIn("no pool serves system riscv64-linux", summary["step"])
        self.assertEqual(summary["build"], summary["step"])
        self.assertTrue(step.haltOnFailure)

    @defer.inlineCallbacks
    def test_timeout_fails_and_releases(self):
        self.daemon.hold_pending = True
        build = self.build()
        step = self.gate(build, wait_timeout="500ms")
        result = yield step.run()
        self.assertEqual(result, FAILURE)
        rid = build.properties.getProperty(PROPERTY_ID)
        self.assertEqual(self.daemon.current(rid)["state"], "released")
        self.assertIn("still pending", step.getResultSummary()["step"])

    @defer.inlineCallbacks
    def test_stop_build_while_waiting(self):
        self.daemon.hold_pending = True
        build = self.build()
        step = self.gate(build, poll="30s")
        d = step.run()
        yield wait_until(lambda: any(k[0] == "get" for k in self.daemon.in_flight), what="long poll")
        rid = build.properties.getProperty(PROPERTY_ID)
        yield step.interrupt("stopped by a test")
        result = yield d
        self.assertEqual(result, CANCELLED)
        # The step ended without waiting for the 30 s poll's answer: the poll
        # is still held, or the daemon already saw its client go away.
        key = ("get", rid)
        self.assertTrue(key in self.daemon.in_flight or key in self.daemon.disconnected,
                        "the step waited for the long poll's answer")
        self.assertEqual(self.daemon.current(rid)["state"], "released")
        self.assertFalse(stepsmod.heartbeat_for(build))
        self.assertIn("cancelled after waiting", step.getResultSummary()["step"])
        # ReleaseCapacity (alwaysRun) then releases again: harmless.
        self.assertEqual((yield self.release(build).run()), SUCCESS)

    @defer.inlineCallbacks
    def test_stop_build_while_create_in_flight(self):
        self.daemon.create_delay = 30
        build = self.build()
        step = self.gate(build, request_timeout="60s")
        d = step.run()
        yield wait_until(lambda: any(k[0] == "create" for k in self.daemon.in_flight), what="create in flight")
        yield step.interrupt("stopped by a test")
        self.assertEqual((yield d), CANCELLED)
        rid = build.properties.getProperty(PROPERTY_ID)
        # The create's answer never arrived; the release still names the id.
        self.assertEqual(self.daemon.current(rid)["state"], "released")

    @defer.inlineCallbacks
    def test_worker_lost_while_waiting_retries(self):
        self.daemon.hold_pending = True
        build = self.build()
        step = self.gate(build, poll="30s")
        d = step.run()
        yield wait_until(lambda: any(k[0] == "get" for k in self.daemon.in_flight), what="long poll")
        yield step.interrupt(Failure(ierror.ConnectionLost()))
        self.assertEqual((yield d), RETRY)
        self.assertEqual(self.daemon.current(build.properties.getProperty(PROPERTY_ID))["state"], "released")

    @defer.inlineCallbacks
    def test_release_error_does_not_fail_build(self):
        build = self.build()
        self.assertEqual((yield self.gate(build).run()), SUCCESS)
        self.daemon.always["release"] = 500
        rel = self.release(build)
        self.assertTrue(rel.alwaysRun)
        self.assertFalse(rel.flunkOnFailure)
        self.assertFalse(rel.haltOnFailure)
        result = yield rel.run()
        self.assertEqual(result, WARNINGS)
        self.assertEqual(self.daemon.count("DELETE"), 3, "transient errors are retried a few times")
        self.assertIn("the lease returns it", rel.getResultSummary()["step"])
        text = build.master.data.updates.log_text("release")
        self.assertIn("500", text)
        # The retries hold up the build's end briefly: the waits the step
        # announces between its attempts add up to less than 5 s.
        waits = [parse_duration(w) for w in re.findall(r"retrying in (\S+)", text)]
        self.assertEqual(len(waits), 2, text)
        self.assertLess(sum(waits), 5, text)

    @defer.inlineCallbacks
    def test_release_unreachable_does_not_fail_build(self):
        build = self.build()
        self.assertEqual((yield self.gate(build).run()), SUCCESS)
        yield self.daemon.stop()
        result = yield self.release(build).run()
        self.assertEqual(result, WARNINGS)
        self.assertIn("cannot reach the daemon", build.master.data.updates.log_text("release"))

    @defer.inlineCallbacks
    def test_release_with_bad_token_file_warns(self):
        build = self.build()
        build.properties.setProperty(PROPERTY_ID, "bb-x", "test")
        rel = self.release(build, url="http://127.0.0.1:1", token_file=os.path.join(self.dir, "missing"))
        self.assertEqual((yield rel.run()), WARNINGS)

    @defer.inlineCallbacks
    def test_unreadable_token_fails_before_reserving(self):
        build = self.build()
        step = self.gate(build, url="http://127.0.0.1:1", token_file=os.path.join(self.dir, "missing"))
        self.assertEqual((yield step.run()), FAILURE)
        self.assertIn("cannot read the daemon's token", step.getResultSummary()["step"])
        self.assertIsNone(build.properties.getProperty(PROPERTY_ID), "nothing reserved, nothing to release")

    @defer.inlineCallbacks
    def test_no_system_property(self):
        build = FakeBuild(self.events, {})
        step = self.gate(build)
        self.assertEqual((yield step.run()), WARNINGS)
        self.assertIn("no 'system' property", step.getResultSummary()["step"])
        self.assertEqual(self.daemon.log, [])
        build = FakeBuild(self.events, {})
        self.assertEqual((yield self.gate(build, default_system="aarch64-linux").run()), SUCCESS)
        self.assertEqual(self.posted()[0]["system"], "aarch64-linux")

    @defer.inlineCallbacks
    def test_features_from_drv_and_config(self):
        drv = os.path.join(self.dir, "abc-vm-test.drv")
        with open(drv, "w") as f:
            f.write(DRV)
        build = self.build(drv_path=drv)
        self.assertEqual((yield self.gate(build, features=["big-parallel"], pool="x86").run()), SUCCESS)
        body = self.posted()[0]
        self.assertEqual(body["features"], ["big-parallel", "kvm", "nixos-test"])
        self.assertEqual(body["pool"], "x86")
        self.assertIn("requires system features: kvm nixos-test", build.master.data.updates.log_text("reservation"))

    @defer.inlineCallbacks
    def test_unreadable_drv_is_not_fatal(self):
        build = self.build(drv_path="/nonexistent/xyz.drv")
        self.assertEqual((yield self.gate(build).run()), SUCCESS)
        self.assertIn("required system features unknown", build.master.data.updates.log_text("reservation"))

    @defer.inlineCallbacks
    def test_tcp_with_token_file(self):
        yield self.daemon.stop()
        self.daemon.token = "tok-123"
        port = self.daemon.listen_tcp()
        token_file = os.path.join(self.dir, "token")
        with open(token_file, "w") as f:
            f.write("tok-123\n")
        build = self.build()
        url = f"http://127.0.0.1:{port}"
        self.assertEqual((yield self.gate(build, url=url, token_file=token_file).run()), SUCCESS)
        self.assertEqual((yield self.release(build, url=url, token_file=token_file).run()), SUCCESS)
        # A secret (rendered by Buildbot before run()) works the same way.
        build = self.build()
        self.assertEqual((yield self.gate(build, url=url, token="tok-123").run()), SUCCESS)
        build = self.build()
        step = self.gate(build, url=url, token="wrong")
        self.assertEqual((yield step.run()), FAILURE)
        self.assertIn("401", step.getResultSummary()["step"])

    @defer.inlineCallbacks
    def test_transient_errors_then_ready(self):
        self.daemon.errors["create"] = [503]
        self.daemon.errors["get"] = [502, 503]
        self.daemon.ready_after = 1
        build = self.build()
        self.assertEqual((yield self.gate(build).run()), SUCCESS)
        self.assertIn("retrying in", build.master.data.updates.log_text("reservation"))
        yield self.release(build).run()

    def test_config_errors(self):
        from buildbot.config import ConfigErrors

        with self.assertRaises(ConfigErrors):
            CapacityGate(url="http://127.0.0.1:1")  # no token
        with self.assertRaises(ConfigErrors):
            CapacityGate(lease="ten minutes")
        with self.assertRaises(ConfigErrors):
            CapacityGate(url="127.0.0.1:8470", token="x")

    def tearDown(self):
        # Heartbeats of finished tests must not outlive them.
        for build in list(stepsmod._heartbeats.keys()):
            stepsmod._heartbeats.pop(build).stop("test ended")
        return sleep(0)

