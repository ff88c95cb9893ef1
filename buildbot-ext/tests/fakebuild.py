"""Minimal fakes of what a BuildStep touches (Debian's Buildbot ships no
buildbot.test): the build, its properties, and master.data.updates for logs
and properties. Steps run through their run() method, as startStep would
after rendering."""

from buildbot.process.properties import Properties
from twisted.internet import defer


class FakeUpdates:
    def __init__(self, events):
        self.events = events
        self.build_properties = {}
        self.logs = {}  # logid -> [name, text, finished]
        self.state_strings = []

    def setBuildProperty(self, buildid, name, value, source):  # noqa: N802
        self.events.append(("property", name, value))
        self.build_properties[name] = (value, source)
        return defer.succeed(None)

    def addLog(self, stepid, name, type):  # noqa: N802,A002
        logid = len(self.logs) + 1
        self.logs[logid] = [name, "", False]
        return defer.succeed(logid)

    def appendLog(self, logid, content):  # noqa: N802
        self.logs[logid][1] += content
        return defer.succeed(None)

    def finishLog(self, logid):  # noqa: N802
        self.logs[logid][2] = True
        return defer.succeed(None)

    def compressLog(self, logid):  # noqa: N802
        return defer.succeed(None)

    def setStepStateString(self, stepid, text):  # noqa: N802
        self.state_strings.append(text)
        return defer.succeed(None)

    def log_text(self, name):
        return "".join(text for n, text, _ in self.logs.values() if n == name)


class FakeConfig:
    logEncoding = "utf-8"


class FakeData:
    def __init__(self, events):
        self.updates = FakeUpdates(events)


class FakeMaster:
    def __init__(self, events):
        self.data = FakeData(events)
        self.config = FakeConfig()


class FakeBuilder:
    name = "demo/nix-build"


class FakeBuild:
    def __init__(self, events, props=None):
        self.master = FakeMaster(events)
        self.builder = FakeBuilder()
        self.number = 7
        self.buildid = 70
        self.finished = False
        self.properties = Properties()
        for k, v in (props or {}).items():
            self.properties.setProperty(k, v, "test")
        self._finished_waiters = []

    def getProperties(self):  # noqa: N802
        return self.properties

    def render(self, value):
        return defer.succeed(value)

    def getUrl(self):  # noqa: N802
        return defer.succeed("http://buildbot.example/#/builders/1/builds/7")

    def waitUntilFinished(self):  # noqa: N802
        d = defer.Deferred()
        self._finished_waiters.append(d)
        return d

    def finish(self):
        self.finished = True
        waiters, self._finished_waiters = self._finished_waiters, []
        for d in waiters:
            d.callback(None)


def attach(step, build):
    """Give a step its build, as Build.setupBuildSteps does, and a step id."""
    step.setBuild(build)
    step.stepid = 1
    step.updateSummary = lambda: None  # debounced with a 1 s timer in Buildbot
    return step
