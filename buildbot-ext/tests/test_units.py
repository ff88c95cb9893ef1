"""Durations and .drv feature parsing."""

import json

from twisted.trial import unittest

from nix_builder_autoscaler_buildbot.drv import features_from_drv_text
from nix_builder_autoscaler_buildbot.durations import format_duration, human, parse_duration


class DurationTest(unittest.TestCase):
    def test_parse(self):
        for text, want in [("10m", 600), ("1h30m", 5400), ("30s", 30), ("1.5s", 1.5), ("500ms", 0.5),
                           ("2h", 7200), (45, 45), (0.25, 0.25), ("0", 0)]:
            self.assertAlmostEqual(parse_duration(text), want, msg=text)

    def test_parse_errors(self):
        for bad in ["", "10", "ten minutes", "5d", "-1s", -1, None, True]:
            with self.assertRaises(ValueError, msg=repr(bad)):
                parse_duration(bad)

    def test_format_round_trips(self):
        for secs, text in [(600, "10m"), (5400, "1h30m"), (6, "6s"), (0.5, "500ms"), (3661, "1h1m1s"), (0, "0s")]:
            self.assertEqual(format_duration(secs), text)
            self.assertAlmostEqual(parse_duration(text), secs)

    def test_human(self):
        self.assertEqual(human(0.42), "0.4s")
        self.assertEqual(human(42), "42s")
        self.assertEqual(human(185), "3m05s")
        self.assertEqual(human(3720), "1h02m")


class DrvTest(unittest.TestCase):
    def test_env_features(self):
        text = ('Derive([("out","/nix/store/x","","")],[],[],"x86_64-linux","/bin/sh",[],'
                '[("name","t"),("requiredSystemFeatures","kvm nixos-test kvm")])')
        self.assertEqual(features_from_drv_text(text), ["kvm", "nixos-test"])

    def test_structured_attrs(self):
        attrs = json.dumps({"name": "t", "requiredSystemFeatures": ["big-parallel"], "x": "a\"b"})
        escaped = attrs.replace("\\", "\\\\").replace('"', '\\"')
        text = f'Derive([],[],[],"x86_64-linux","/bin/sh",[],[("__json","{escaped}"),("out","/nix/store/x")])'
        self.assertEqual(features_from_drv_text(text), ["big-parallel"])

    def test_none(self):
        self.assertEqual(features_from_drv_text('Derive([],[],[],"x86_64-linux","/bin/sh",[],[("name","t")])'), [])

    def test_other_env_mentions_do_not_count(self):
        text = 'Derive([],[],[],"x","/bin/sh",[],[("doc","(\\"requiredSystemFeatures\\",\\"kvm\\")")])'
        self.assertEqual(features_from_drv_text(text), [])
