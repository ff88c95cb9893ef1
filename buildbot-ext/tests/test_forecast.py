"""ForecastDemand and WithdrawForecast as BuildSteps, with a fake build
(tests/fakebuild.py) and the fake daemon: what an evaluation sends, and that
no error of the daemon fails or holds up the evaluation."""

import json
import os
import re
import time
import types

from buildbot.process.results import CANCELLED, SKIPPED, SUCCESS, WARNINGS
from twisted.internet import defer
from twisted.trial import unittest

from nix_builder_autoscaler_buildbot import forecast as forecastmod, steps as stepsmod
from nix_builder_autoscaler_buildbot.forecast import ForecastDemand, WithdrawForecast
from nix_builder_autoscaler_buildbot.steps import PROPERTY_FORECASTS

from .fakebuild import FakeBuild, attach
from .helpers import TEST_TIMEOUT, serve_fake_daemon, sleep, wait_until

PROJECT = "github:org/repo"
EVAL_BUILDER = "github:org/repo/nix-eval"
ID_RE = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}$")  # the contract's forecast id


class ForecastTest(unittest.TestCase):
    timeout = TEST_TIMEOUT

    def setUp(self):
        serve_fake_daemon(self)

    def build(self, builder=EVAL_BUILDER, **props):
        b = FakeBuild(self.events, props)
        b.builder = types.SimpleNamespace(name=builder)
        return b

    def forecast(self, build, **kw):
        kw.setdefault("socket", self.sock)
        return attach(ForecastDemand(**kw), build)

    def withdraw(self, build, **kw):
        kw.setdefault("socket", self.sock)
        return attach(WithdrawForecast(**kw), build)

    def posted(self):
        return [json.loads(b) for _, m, p, b in self.daemon.log if m == "POST" and p == "/v1/forecasts"]

    def text(self, build):
        return build.master.data.updates.log_text("forecast")

    @defer.inlineCallbacks
    def test_forecast_at_eval_start_with_project_as_source(self):
        build = self.build(project=PROJECT)
        step = self.forecast(build, systems=["x86_64-linux", "aarch64-linux"])
        self.assertEqual((yield step.run()), SUCCESS)
        ids = build.properties.getProperty(PROPERTY_FORECASTS)
        self.assertEqual(len(ids), 2)
        # The ids were stored as a build property before the daemon saw a POST.
        order = [e for e in self.events if e[0] == "property" or e[1] == "POST"]
        self.assertEqual(order[0], ("property", PROPERTY_FORECASTS, ids))
        bodies = self.posted()
        self.assertEqual([b["system"] for b in bodies], ["x86_64-linux", "aarch64-linux"])
        for fid, body in zip(ids, bodies):
            self.assertEqual(body, {"id": fid, "source": PROJECT, "system": body["system"], "ttl": "30m"},
                             "no build count: the daemon estimates it")
            self.assertRegex(fid, ID_RE)
            self.assertTrue(fid.startswith("bb-eval-70-"), fid)
            self.assertTrue(fid.endswith("-" + body["system"]), fid)
            self.assertEqual(self.daemon.forecasts[fid]["state"], "open")
        summary = step.getResultSummary()["step"]
        self.assertIn("x86_64-linux: 3 builds (estimated) in pool x86", summary)
        self.assertIn("aarch64-linux: 3 builds (estimated) in pool arm", summary)
        text = self.text(build)
        self.assertIn(f"forecasting builds of {PROJECT} for x86_64-linux, aarch64-linux: ttl 30m", text)
        self.assertIn(f"forecast {ids[0]}: 3 builds (estimated) in pool x86, open until", text)

        # A second evaluation of the same build number gets other ids.
        build2 = self.build(project=PROJECT)
        self.assertEqual((yield self.forecast(build2, systems=["x86_64-linux"]).run()), SUCCESS)
        self.assertNotIn(build2.properties.getProperty(PROPERTY_FORECASTS)[0], ids)

    @defer.inlineCallbacks
    def test_withdraw_after_the_evaluation(self):
        build = self.build(project=PROJECT)
        self.assertEqual((yield self.forecast(build).run()), SUCCESS)
        fid = build.properties.getProperty(PROPERTY_FORECASTS)[0]
        # Two builds of the project arrive while the forecast is open.
        for i in range(2):
            gate = attach(stepsmod.CapacityGate(socket=self.sock, poll="200ms"), FakeBuild(self.events, {
                "system": "x86_64-linux", "project": PROJECT}))
            self.assertEqual((yield gate.run()), SUCCESS)
        self.assertEqual(self.daemon.forecasts[fid]["arrived"], 2)

        step = self.withdraw(build)
        self.assertTrue(step.alwaysRun, "it also runs after a failed or stopped evaluation")
        self.assertEqual((yield step.run()), SUCCESS)
        self.assertEqual(self.daemon.forecasts[fid]["state"], "withdrawn")
        self.assertEqual(self.daemon.count("DELETE", "/v1/forecasts/"), 1)
        self.assertIn(f"withdrew forecast {fid}: 3 builds (estimated) in pool x86 forecast, 2 arrived so far; "
                      "now withdrawn", self.text(build))
        self.assertEqual(step.getResultSummary()["step"],
                         "withdrew forecast: 3 builds (estimated) in pool x86 forecast, 2 arrived so far")
        # The build's end does not withdraw again.
        build.finish()
        yield sleep(0.1)
        self.assertEqual(self.daemon.count("DELETE", "/v1/forecasts/"), 1)

    @defer.inlineCallbacks
    def test_withdraw_after_a_failed_evaluation(self):
        # Buildbot runs an alwaysRun step after a failed (or stopped) step;
        # the step itself does not look at the build's result.
        from buildbot.process.results import FAILURE

        build = self.build(project=PROJECT)
        self.assertEqual((yield self.forecast(build).run()), SUCCESS)
        build.results = FAILURE
        step = self.withdraw(build)
        self.assertTrue(step.alwaysRun)
        self.assertEqual((yield step.run()), SUCCESS)
        fid = build.properties.getProperty(PROPERTY_FORECASTS)[0]
        self.assertEqual(self.daemon.forecasts[fid]["state"], "withdrawn")

    @defer.inlineCallbacks
    def test_build_end_withdraws_when_the_step_never_runs(self):
        # Worker lost: Buildbot runs no further step, not even alwaysRun.
        build = self.build(project=PROJECT)
        self.assertEqual((yield self.forecast(build).run()), SUCCESS)
        fid = build.properties.getProperty(PROPERTY_FORECASTS)[0]
        build.finish()
        yield wait_until(lambda: self.daemon.forecasts[fid]["state"] == "withdrawn", what="withdrawal at build end")

    @defer.inlineCallbacks
    def test_daemon_down_warns_and_the_evaluation_goes_on(self):
        yield self.daemon.stop()
        build = self.build(project=PROJECT)
        step = self.forecast(build)
        self.assertFalse(step.haltOnFailure)
        self.assertFalse(step.flunkOnFailure)
        self.assertFalse(step.warnOnWarnings, "the WARNINGS stay on the step, not on the evaluation")
        t0 = time.monotonic()
        self.assertEqual((yield step.run()), WARNINGS)
        self.assertLess(time.monotonic() - t0, step.request_timeout, "a refused connection does not wait")
        text = self.text(build)
        self.assertIn("not sent: POST /v1/forecasts: cannot reach the daemon", text)
        self.assertIn("the evaluation goes on", text)
        self.assertIn("no forecast for x86_64-linux: ", step.getResultSummary()["step"])
        # The withdrawal then warns as well, and does not fail either.
        wd = self.withdraw(build)
        self.assertEqual((yield wd.run()), WARNINGS)
        self.assertIn("their ttl ends them", wd.getResultSummary()["step"])
        self.assertIn("cannot reach the daemon", self.text(build))

    @defer.inlineCallbacks
    def test_errors_warn_without_retrying(self):
        for status in (500, 503, 400, 401):
            self.daemon.log.clear()
            self.daemon.errors["forecast"] = [status]
            build = self.build(project=PROJECT)
            step = self.forecast(build)
            self.assertEqual((yield step.run()), WARNINGS, status)
            self.assertEqual(len(self.posted()), 1, "no retry: the evaluation is not held up")
            self.assertIn(f"{status} injected forecast error", step.getResultSummary()["step"])
        self.daemon.always["withdraw"] = 500
        wd = self.withdraw(build)
        self.assertEqual((yield wd.run()), WARNINGS)
        self.assertIn("could not withdraw forecast", self.text(build))

    @defer.inlineCallbacks
    def test_timeout_is_short(self):
        self.daemon.forecast_delay = 60
        build = self.build(project=PROJECT)
        step = self.forecast(build, request_timeout="300ms")
        t0 = time.monotonic()
        self.assertEqual((yield step.run()), WARNINGS)
        self.assertLess(time.monotonic() - t0, 30, "the step ended at its request timeout, not the daemon's answer")
        self.assertIn("no answer from the daemon", self.text(build))

    def test_default_timeout_is_5s(self):
        self.assertEqual(ForecastDemand().request_timeout, 5.0)
        self.assertEqual(WithdrawForecast().request_timeout, 5.0)
        self.assertEqual(ForecastDemand().systems, ["x86_64-linux"])

    @defer.inlineCallbacks
    def test_one_system_unrouted_the_others_sent(self):
        build = self.build(project=PROJECT)
        step = self.forecast(build, systems=["x86_64-linux", "riscv64-linux"])
        self.assertEqual((yield step.run()), WARNINGS)
        ids = build.properties.getProperty(PROPERTY_FORECASTS)
        self.assertEqual(self.daemon.forecasts[ids[0]]["state"], "open")
        self.assertNotIn(ids[1], self.daemon.forecasts)
        self.assertIn("no forecast for riscv64-linux: POST /v1/forecasts: 404 no pool serves system riscv64-linux",
                      step.getResultSummary()["step"])
        # The withdrawal finds one forecast and one the daemon never made.
        wd = self.withdraw(build)
        self.assertEqual((yield wd.run()), SUCCESS)
        self.assertEqual(self.daemon.forecasts[ids[0]]["state"], "withdrawn")
        self.assertIn(f"forecast {ids[1]} is unknown to the daemon (it was never created)", self.text(build))

    @defer.inlineCallbacks
    def test_daemon_without_forecast_api(self):
        self.daemon.forecast_api = False
        build = self.build(project=PROJECT)
        step = self.forecast(build)
        self.assertEqual((yield step.run()), WARNINGS)
        self.assertIn("a daemon without the forecast API? update it, or set forecasts=False",
                      step.getResultSummary()["step"])
        # Its withdrawal finds nothing to withdraw, and says so.
        wd = self.withdraw(build)
        self.assertEqual((yield wd.run()), SUCCESS)
        self.assertIn("unknown to the daemon", self.text(build))

    @defer.inlineCallbacks
    def test_source_from_builder_name_and_limits(self):
        build = self.build()  # no project property
        self.assertEqual((yield self.forecast(build).run()), SUCCESS)
        self.assertEqual(self.posted()[-1]["source"], PROJECT)
        build = self.build(project="")  # an empty property is no project
        self.assertEqual((yield self.forecast(build).run()), SUCCESS)
        self.assertEqual(self.posted()[-1]["source"], PROJECT)
        # At most 256 bytes of printable text, cut at a character boundary.
        build = self.build(project="gitea:" + "é" * 200 + "\n")
        self.assertEqual((yield self.forecast(build).run()), SUCCESS)
        source = self.posted()[-1]["source"]
        self.assertLessEqual(len(source.encode()), 256)
        self.assertEqual(source, ("gitea:" + "é" * 125))
        # A configured source wins.
        build = self.build(project=PROJECT)
        self.assertEqual((yield self.forecast(build, source="team-a").run()), SUCCESS)
        self.assertEqual(self.posted()[-1]["source"], "team-a")

    @defer.inlineCallbacks
    def test_pool_features_and_ttl(self):
        build = self.build(project=PROJECT)
        self.assertEqual((yield self.forecast(build, systems=["x86_64-linux"], features=["kvm"], ttl="1h").run()),
                         SUCCESS)
        body = self.posted()[-1]
        self.assertEqual((body["features"], body["ttl"]), (["kvm"], "1h"))
        # A forced pool: one forecast for the pool, whatever the systems.
        build = self.build(project=PROJECT)
        self.assertEqual((yield self.forecast(build, systems=["x86_64-linux", "aarch64-linux"], pool="big").run()),
                         SUCCESS)
        body = self.posted()[-1]
        self.assertEqual(len(build.properties.getProperty(PROPERTY_FORECASTS)), 1)
        self.assertEqual(body["pool"], "big")
        self.assertNotIn("system", body)
        self.assertTrue(body["id"].endswith("-pool-big"), body["id"])

    @defer.inlineCallbacks
    def test_no_systems_skips(self):
        build = self.build(project=PROJECT)
        self.assertEqual((yield self.forecast(build, systems=[]).run()), SKIPPED)
        self.assertEqual(self.daemon.log, [])
        self.assertEqual((yield self.withdraw(build).run()), SKIPPED)

    @defer.inlineCallbacks
    def test_bad_token_file_warns(self):
        build = self.build(project=PROJECT)
        step = self.forecast(build, url="http://127.0.0.1:1", token_file=os.path.join(self.dir, "missing"))
        self.assertEqual((yield step.run()), WARNINGS)
        self.assertIn("cannot read the daemon's token", step.getResultSummary()["step"])
        build.properties.setProperty(PROPERTY_FORECASTS, ["bb-eval-1-x"], "test")
        wd = self.withdraw(build, url="http://127.0.0.1:1", token_file=os.path.join(self.dir, "missing"))
        self.assertEqual((yield wd.run()), WARNINGS)

    @defer.inlineCallbacks
    def test_stop_build_while_forecast_in_flight(self):
        self.daemon.forecast_delay = 60
        build = self.build(project=PROJECT)
        step = self.forecast(build, request_timeout="60s")
        d = step.run()
        yield wait_until(lambda: any(k[0] == "forecast" for k in self.daemon.in_flight), what="forecast in flight")
        yield step.interrupt("stopped by a test")
        self.assertEqual((yield d), CANCELLED)
        # The withdrawal (alwaysRun) still names the id.
        wd = self.withdraw(build)
        self.assertEqual((yield wd.run()), SUCCESS)
        fid = build.properties.getProperty(PROPERTY_FORECASTS)[0]
        self.assertEqual(self.daemon.forecasts[fid]["state"], "withdrawn")

    def test_config_errors(self):
        from buildbot.config import ConfigErrors

        with self.assertRaises(ConfigErrors):
            ForecastDemand(ttl="7h")
        with self.assertRaises(ConfigErrors):
            ForecastDemand(ttl="soon")
        with self.assertRaises(ConfigErrors):
            ForecastDemand(systems=["x86_64-linux", ""])
        with self.assertRaises(ConfigErrors):
            WithdrawForecast(url="http://127.0.0.1:1")  # no token

    def tearDown(self):
        for build in list(stepsmod._heartbeats.keys()):
            stepsmod._heartbeats.pop(build).stop("test ended")
        forecastmod._open_forecasts.clear()
        return sleep(0)
