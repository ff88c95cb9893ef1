"""AutoscalerConfigurator: which builders it patches, where the steps go,
and that patching twice changes nothing."""

import types

import os
import sys
import tomllib

from buildbot.config import BuilderConfig, ConfigErrors
from buildbot.process.factory import BuildFactory
from buildbot.steps.shell import ShellCommand
from twisted.trial import unittest

from nix_builder_autoscaler_buildbot import (AutoscalerConfigurator, CapacityGate, ForecastDemand, ReleaseCapacity,
                                             WithdrawForecast)
from nix_builder_autoscaler_buildbot.configurator import step_class

HERE = os.path.dirname(os.path.abspath(__file__))


def factory(*names):
    f = BuildFactory()
    for n in names:
        f.addStep(ShellCommand(name=n, command=["true"]))
    return f


def builder(name, f):
    return BuilderConfig(name=name, workernames=["w1"], factory=f)


def classes(f):
    return [step_class(s) for s in f.steps]


class ConfiguratorTest(unittest.TestCase):
    def config(self):
        self.build_f = factory("Build flake attr", "Register gcroot")
        self.eval_f = factory("evaluate")
        return {
            "builders": [
                builder("github:org/repo/nix-build", self.build_f),
                builder("github:org/repo/nix-eval", self.eval_f),
                builder("other/nix-build-cache", factory("x")),
            ],
        }

    def test_patches_only_nix_build_and_nix_eval_builders(self):
        c = self.config()
        conf = AutoscalerConfigurator(lease="5m")
        conf.configure(c)
        self.assertEqual(conf.patched, ["github:org/repo/nix-build"])
        self.assertEqual(conf.patched_evals, ["github:org/repo/nix-eval"])
        got = classes(self.build_f)
        self.assertIs(got[0], CapacityGate)
        self.assertIs(got[-1], ReleaseCapacity)
        self.assertEqual(len(got), 4)
        self.assertNotIn(ForecastDemand, got)
        self.assertEqual(classes(self.eval_f), [ForecastDemand, step_class(self.eval_f.steps[1]), WithdrawForecast])
        self.assertEqual(len(c["builders"][2].factory.steps), 1, "other builders are untouched")

        gate = self.build_f.steps[0].buildStep()
        self.assertEqual(gate.lease, "5m")
        self.assertTrue(gate.haltOnFailure)
        release = self.build_f.steps[-1].buildStep()
        self.assertTrue(release.alwaysRun)
        self.assertFalse(release.flunkOnFailure)

    def test_idempotent(self):
        c = self.config()
        conf = AutoscalerConfigurator()
        conf.configure(c)
        before, before_eval = list(self.build_f.steps), list(self.eval_f.steps)
        conf.configure(c)
        AutoscalerConfigurator(lease="1h").configure(c)  # a second instance as well
        self.assertEqual(self.build_f.steps, before)
        self.assertEqual(self.eval_f.steps, before_eval)
        self.assertEqual(conf.patched, [])
        self.assertEqual(conf.patched_evals, [])

    def test_forecast_steps(self):
        c = self.config()
        AutoscalerConfigurator(forecast_systems=["x86_64-linux", "aarch64-linux"], forecast_ttl="45m",
                               forecast_timeout="3s", features=["kvm"]).configure(c)
        forecast, withdraw = self.eval_f.steps[0].buildStep(), self.eval_f.steps[-1].buildStep()
        self.assertEqual(forecast.systems, ["x86_64-linux", "aarch64-linux"])
        self.assertEqual(forecast.ttl, "45m")
        self.assertEqual(forecast.features, ["kvm"])
        for step in (forecast, withdraw):
            self.assertEqual(step.request_timeout, 3.0)
            # A forecast never fails, halts or changes the evaluation's result.
            self.assertFalse(step.haltOnFailure)
            self.assertFalse(step.flunkOnFailure)
            self.assertFalse(step.flunkOnWarnings)
            self.assertFalse(step.warnOnWarnings)
        self.assertFalse(forecast.alwaysRun)
        self.assertTrue(withdraw.alwaysRun, "the withdrawal runs when the evaluation fails too")

    def test_forecasts_can_be_disabled(self):
        c = self.config()
        conf = AutoscalerConfigurator(forecasts=False)
        conf.configure(c)
        self.assertEqual(len(self.eval_f.steps), 1)
        self.assertEqual(conf.patched_evals, [])
        self.assertIs(classes(self.build_f)[0], CapacityGate, "the gate is still there")

    def test_forecast_systems_default(self):
        # buildbot-nix's NixConfigurator keeps its BuildbotNixConfig as
        # .config; its build_systems are what the evaluations build.
        nix = types.SimpleNamespace(config=types.SimpleNamespace(build_systems=["x86_64-linux", "aarch64-linux"]))
        for kw, configurators, want in (
            ({}, [nix], ["x86_64-linux", "aarch64-linux"]),
            ({"forecast_systems": ["riscv64-linux"]}, [nix], ["riscv64-linux"]),
            ({"forecast_systems": "i686-linux x86_64-linux"}, [], ["i686-linux", "x86_64-linux"]),
            ({"default_system": "aarch64-linux"}, [], ["aarch64-linux"]),
            ({}, [], ["x86_64-linux"]),
        ):
            c = self.config()
            conf = AutoscalerConfigurator(**kw)
            c["configurators"] = configurators + [conf]
            conf.configure(c)
            self.assertEqual(self.eval_f.steps[0].buildStep().systems, want, kw)
            self.assertEqual(conf.systems_used[0], want)

    def test_custom_eval_selection(self):
        f = factory("evaluate")
        c = {"builders": [builder("evaluations", f)]}
        AutoscalerConfigurator(eval_builders=lambda name: name == "evaluations").configure(c)
        self.assertEqual(classes(f)[0], ForecastDemand)
        self.assertEqual(classes(f)[-1], WithdrawForecast)

    def test_step_instances_in_steps_list(self):
        # A factory whose steps list holds step instances (appended by hand)
        # is recognised too.
        f = factory("build")
        f.steps.insert(0, CapacityGate())
        c = {"builders": [builder("p/nix-build", f)]}
        AutoscalerConfigurator().configure(c)
        self.assertEqual(classes(f).count(CapacityGate), 1)
        self.assertIs(classes(f)[-1], ReleaseCapacity)

    def test_shared_factory_is_copied(self):
        shared = factory("build")
        c = {"builders": [builder("p/nix-build", shared), builder("p/other", shared)]}
        AutoscalerConfigurator().configure(c)
        self.assertEqual(len(shared.steps), 1, "the builder that is not gated keeps the original factory")
        patched = c["builders"][0].factory
        self.assertIsNot(patched, shared)
        self.assertEqual(classes(patched), [CapacityGate, step_class(shared.steps[0]), ReleaseCapacity])

    def test_dict_builders_and_custom_selection(self):
        f = factory("build")
        c = {"builders": [{"name": "x86-builds", "workernames": ["w1"], "factory": f}]}
        AutoscalerConfigurator(builders=lambda name: name.startswith("x86")).configure(c)
        self.assertEqual(classes(f)[0], CapacityGate)

    def test_settings_reach_both_steps(self):
        f = factory("build")
        c = {"builders": [builder("p/nix-build", f)]}
        AutoscalerConfigurator(url="http://127.0.0.1:8470", token_file="/run/secrets/nba-token",
                               request_timeout="3s").configure(c)
        gate, release = f.steps[0].buildStep(), f.steps[-1].buildStep()
        for step in (gate, release):
            self.assertEqual(step.url, "http://127.0.0.1:8470")
            self.assertEqual(step.token_file, "/run/secrets/nba-token")
            self.assertEqual(step.request_timeout, 3.0)
        e = factory("evaluate")
        c = {"builders": [builder("p/nix-eval", e)]}
        AutoscalerConfigurator(url="http://127.0.0.1:8470", token_file="/run/secrets/nba-token",
                               source="fixed-source").configure(c)
        forecast, withdraw = e.steps[0].buildStep(), e.steps[-1].buildStep()
        for step in (forecast, withdraw):
            self.assertEqual(step.url, "http://127.0.0.1:8470")
            self.assertEqual(step.token_file, "/run/secrets/nba-token")
            self.assertEqual(step.request_timeout, 5.0, "forecasts have their own short timeout")
        self.assertEqual(forecast.source, "fixed-source")

    def test_token_secret_is_a_renderable(self):
        from buildbot.interfaces import IRenderable

        conf = AutoscalerConfigurator(url="http://127.0.0.1:8470", token_secret="nba-token")
        self.assertTrue(IRenderable.providedBy(conf.gate_kwargs["token"]))

    def test_bad_settings_are_config_errors(self):
        with self.assertRaises(ConfigErrors):
            AutoscalerConfigurator(url="http://127.0.0.1:8470")
        with self.assertRaises(ConfigErrors):
            AutoscalerConfigurator(poll="soon")
        with self.assertRaises(ConfigErrors):
            AutoscalerConfigurator(token="a", token_secret="b", url="http://h:1")
        with self.assertRaises(ConfigErrors):
            AutoscalerConfigurator(forecast_ttl="7h")
        with self.assertRaises(ConfigErrors):
            AutoscalerConfigurator(forecast_timeout="soon")
        with self.assertRaises(ConfigErrors):
            AutoscalerConfigurator(forecast_systems=["x86_64-linux", ""])

    def test_no_match_is_harmless(self):
        c = {"builders": [builder("a", factory("x"))]}
        AutoscalerConfigurator().configure(c)
        self.assertEqual(len(c["builders"][0].factory.steps), 1)

    def test_entry_points_resolve(self):
        # master.cfg can use util.AutoscalerConfigurator / steps.CapacityGate
        # once the package is installed (Buildbot's plugin entry points).
        with open(os.path.join(HERE, "..", "pyproject.toml"), "rb") as fh:
            eps = tomllib.load(fh)["project"]["entry-points"]
        seen = 0
        for group in ("buildbot.util", "buildbot.steps"):
            for name, target in eps[group].items():
                mod, _, attr = target.partition(":")
                __import__(mod)
                self.assertEqual(getattr(sys.modules[mod], attr).__name__, name)
                seen += 1
        self.assertEqual(seen, 5)
