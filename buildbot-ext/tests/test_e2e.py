"""Acceptance 2: a real Buildbot master and worker (Debian's packages) with
the extension, against the real daemon (local provider), in a temporary
directory, on loopback only. Results come from Buildbot's REST API and the
daemon's API (over its unix socket).

The daemon has three local pools: "x86" (x86_64-linux) whose stand-in
builders answer after boot_delay 10s, so a build visibly waits (long enough
for the test to see the gate waiting, on a busy machine too), "arm"
(aarch64-linux) whose builders take 10 minutes, so a build waits until it is
stopped, and "fc" (i686-linux, boot_delay 8s, idle_timeout 2s) for demand
forecasts. The builder "demo/nix-build" runs one shell step that asks the
daemon about its own reservation (so the log shows it was ready while the
step ran) and then sleeps; AutoscalerConfigurator adds the gate and the
release. Lease 6s, heartbeat every 2s. A gate over the unix socket asks
for long polls of 10 minutes (the daemon's max_poll is 1h), so only a change
of the reservation, or the gate cancelling it, ends one.

"fcdemo/nix-eval" plays buildbot-nix's evaluation: its project (the source
stamp's, as buildbot-nix's change sources set it) is "e2e/fcdemo", it
"evaluates" for longer than an fc builder takes to boot, then triggers two
builds of "fcdemo/nix-build" and waits for them. The configurator adds the
forecast steps to it, and to "broken/nix-eval", whose evaluation fails.

Waits for a condition are bounded generously (WAIT), and only a stuck test
reaches the bound. The forecast scenario checks, from the daemon's events,
that each build of the second evaluation found its builder already ready;
the one check that compares times is that their gates waited less than a
boot, which the test measures first on the same daemon. (What a gate waits
for a ready builder is the daemon's own latency, up to a reconcile
interval plus a round; on a loaded machine that alone takes seconds, so a
fixed bound of 1-2 s would test the machine's load.)

Everything is started by the test and stopped by its PID. NBA_KEEP=1 keeps
the directory; NBA_DAEMON_BINARY uses a daemon binary built elsewhere;
NBA_SKIP_E2E=1 skips this file.
"""

import glob
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))
EXT = os.path.dirname(HERE)
REPO = os.path.dirname(EXT)
PYTHON = "/usr/bin/python3"

SUCCESS, WARNINGS, FAILURE, SKIPPED, EXCEPTION, RETRY, CANCELLED = 0, 1, 2, 3, 4, 5, 6
GATE = "reserve builder capacity"
RELEASE = "release builder capacity"
FORECAST = "forecast builder demand"
WITHDRAW = "withdraw builder forecast"
FC_PROJECT = "e2e/fcdemo"
FC_SYSTEM = "i686-linux"

DAEMON_CONFIG = """\
[daemon]
socket = "{dir}/d.sock"
listen = "127.0.0.1:{port}"
token_file = "{dir}/token"
state_dir = "{dir}/state"
metrics_listen = ""
reconcile_interval = "1s"
log_level = "debug"

[reservations]
max_poll = "1h"

[[pool]]
name = "x86"
systems = ["x86_64-linux"]
max_builders = 2
idle_timeout = "1m"
provider = "local"
[pool.local]
boot_delay = "10s"

[[pool]]
name = "arm"
systems = ["aarch64-linux"]
max_builders = 1
provider = "local"
[pool.local]
boot_delay = "10m"

[[pool]]
name = "fc"
systems = ["i686-linux"]
max_builders = 2
idle_timeout = "2s"
provider = "local"
[pool.local]
boot_delay = "8s"
"""

# Runs on the worker as the "build": prints the daemon's view of this
# build's reservation, then sleeps; exits early if the worker dies.
CHECK_SCRIPT = """\
import http.client, json, os, socket, sys, time
sock, rid, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sock)
c = C("localhost", timeout=60)
c.request("GET", "/v1/reservations/" + rid)
r = json.loads(c.getresponse().read())
print("reservation %s state=%s pool=%s slot=%s" % (rid, r.get("state"), r.get("pool"), r.get("slot")), flush=True)
parent = os.getppid()
end = time.monotonic() + secs
while time.monotonic() < end:
    if os.getppid() != parent:
        sys.exit(1)  # the worker is gone
    time.sleep(0.1)
print("done", flush=True)
"""

MASTER_CFG = """\
from buildbot.plugins import schedulers, steps, util, worker

c = BuildmasterConfig = {{}}
c["buildbotNetUsageData"] = None
c["title"] = "nba e2e"
c["buildbotURL"] = "http://127.0.0.1:{www}/"
c["www"] = {{"port": "tcp:{www}:interface=127.0.0.1", "plugins": {{}}}}
c["protocols"] = {{"pb": {{"port": "tcp:{pb}:interface=127.0.0.1"}}}}
c["db"] = {{"db_url": "sqlite:///state.sqlite"}}
c["workers"] = [worker.Worker("w1", "pass")]

build = util.BuildFactory()
build.addStep(steps.ShellCommand(
    name="nix build (stand-in)",
    command=["{python}", "{check}", "{sock}",
             util.Interpolate("%(prop:nix_builder_autoscaler_reservation)s"),
             util.Interpolate("%(prop:sleep)s")],
    logEnviron=False))
evaluate = util.BuildFactory()
evaluate.addStep(steps.ShellCommand(name="evaluate", command=["true"], logEnviron=False))


# Triggers `count` builds, as buildbot-nix's evaluation triggers one
# nix-build per attribute (with the evaluation's source stamp).
class TriggerBuilds(steps.Trigger):
    def __init__(self, count, **kwargs):
        self.count = count
        super().__init__(**kwargs)

    def getSchedulersAndProperties(self):
        return [{{"sched_name": self.schedulerNames[0], "unimportant": False,
                  "props_to_set": {{"system": "{fc_system}", "cacheStatus": "notBuilt", "sleep": "1",
                                   "attr": "pkg%d" % i}}}}
                for i in range(self.count)]


# An evaluation that takes longer than a builder's boot (eval_seconds), then
# triggers two gated builds and waits for them.
fc_eval = util.BuildFactory()
fc_eval.addStep(steps.ShellCommand(name="evaluate (stand-in)", command=["sleep", util.Property("eval_seconds")],
                                   haltOnFailure=True, logEnviron=False))
fc_eval.addStep(TriggerBuilds(2, name="trigger builds", schedulerNames=["fcdemo-nix-build"], waitForFinish=True))
broken_eval = util.BuildFactory()
broken_eval.addStep(steps.ShellCommand(name="evaluate (fails)", command=["false"], haltOnFailure=True,
                                       logEnviron=False))
broken_eval.addStep(steps.ShellCommand(name="never runs", command=["true"], logEnviron=False))

c["builders"] = [
    util.BuilderConfig(name="demo/nix-build", workernames=["w1"], factory=build),
    util.BuilderConfig(name="remote/nix-build", workernames=["w1"], factory=build),
    util.BuilderConfig(name="demo/nix-eval", workernames=["w1"], factory=evaluate),
    util.BuilderConfig(name="fcdemo/nix-build", workernames=["w1"], factory=build, collapseRequests=False),
    util.BuilderConfig(name="fcdemo/nix-eval", workernames=["w1"], factory=fc_eval),
    util.BuilderConfig(name="broken/nix-eval", workernames=["w1"], factory=broken_eval),
]
c["schedulers"] = [
    schedulers.ForceScheduler(
        name="force", builderNames=["demo/nix-build", "remote/nix-build", "demo/nix-eval", "broken/nix-eval"],
        properties=[util.StringParameter(name="system", default="x86_64-linux"),
                    util.StringParameter(name="cacheStatus", default="notBuilt"),
                    util.StringParameter(name="sleep", default="1")]),
    # The evaluation's source stamp names its project, as buildbot-nix's
    # change sources do; Buildbot makes it the "project" property.
    schedulers.ForceScheduler(
        name="force-fc", builderNames=["fcdemo/nix-eval"],
        codebases=[util.CodebaseParameter("", project=util.FixedParameter(name="project", default="{fc_project}"))],
        properties=[util.StringParameter(name="eval_seconds", default="20")]),
    schedulers.Triggerable(name="fcdemo-nix-build", builderNames=["fcdemo/nix-build"]),
]

# What a buildbot-nix master.cfg adds after NixConfigurator (here through
# the plugin entry point, as the NixOS form in README.md does).
# "remote/nix-build" shares demo's factory but reaches the daemon over TCP
# with a bearer token, as a master on another host would; the configurator
# copies the shared factory before patching it.
# The first one also adds the forecast steps to the two evaluations (not to
# demo/nix-eval, which the first scenario checks is left alone).
c["configurators"] = [
    util.AutoscalerConfigurator(socket="{sock}", lease="6s", poll="10m", wait_timeout="5m",
                                builders=lambda name: name in ("demo/nix-build", "fcdemo/nix-build"),
                                eval_builders=lambda name: name in ("fcdemo/nix-eval", "broken/nix-eval"),
                                forecast_systems=["{fc_system}"]),
    util.AutoscalerConfigurator(url="http://127.0.0.1:{api_port}", token_file="{token_file}",
                                lease="6s", poll="10s", wait_timeout="5m", forecasts=False),
]
"""

# A stand-in for buildbot-www (Debian does not package the web UI): the
# REST API is served by the master itself, but its www service needs a
# "base" plugin to exist.
WWW_STUB = """\
from buildbot.www.plugin import Application
ep = Application(__name__, "REST API only (test stand-in for buildbot-www)")
"""


WAIT = 180  # seconds: the bound of every wait for a condition
HTTP_TIMEOUT = 60  # seconds: one request to the master or the daemon
SUBPROCESS_TIMEOUT = 300  # seconds: buildbot create-master, checkconfig, ...


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path, timeout=HTTP_TIMEOUT):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def epoch(text):
    """An RFC 3339 time of the daemon (nanoseconds, "Z") as epoch seconds."""
    head, _, frac = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (frac or "0"))


def wait_for(what, pred, timeout=WAIT, interval=0.2, on_fail=None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except (OSError, ValueError, KeyError, IndexError, http.client.HTTPException) as e:
            last = None
            err = e
        else:
            err = None
        if last:
            return last
        time.sleep(interval)
    extra = on_fail() if on_fail else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {err})" if err else "") + extra)


class Proc:
    """A child process we started; stopped by its PID."""

    def __init__(self, name, argv, cwd, env, logfile):
        self.name = name
        self.logfile = logfile
        self.out = open(logfile, "ab")
        print(f"  start {name}: {' '.join(argv)}", file=sys.stderr)
        self.p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self.out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self):
        return self.p.pid

    def alive(self):
        return self.p.poll() is None

    def kill9(self):
        os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait(SUBPROCESS_TIMEOUT)

    def stop(self, grace=10):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(grace)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(SUBPROCESS_TIMEOUT)
        self.out.close()


@unittest.skipIf(os.environ.get("NBA_SKIP_E2E") == "1", "NBA_SKIP_E2E=1")
class BuildbotEndToEnd(unittest.TestCase):
    procs = []
    dir = None

    # Setup: daemon, master, worker.

    def setUp(self):
        # One setup for all scenarios, in setUp/tearDown rather than
        # setUpClass so that trial (which ignores class fixtures) runs it too.
        type(self)._setup()
        self.addCleanup(type(self)._teardown)

    def test_buildbot_with_daemon(self):
        scenarios = [
            self.scenario_cached_build_skips_gate_and_other_builders_are_untouched,
            self.scenario_build_waits_for_capacity_runs_and_releases,
            self.scenario_tcp_api_with_bearer_token,
            self.scenario_stop_while_waiting_releases,
            self.scenario_forecast_boots_builders_while_the_evaluation_runs,
            self.scenario_worker_killed_reservation_expires_by_lease,  # last: it kills the worker
        ]
        for scenario in scenarios:
            t0 = time.monotonic()
            print(f"  {scenario.__name__[len('scenario_'):]} ...", file=sys.stderr)
            scenario()
            print(f"    ok ({time.monotonic() - t0:.1f}s)", file=sys.stderr)

    @classmethod
    def _setup(cls):
        started = time.monotonic()
        for tool in ("buildbot", "buildbot-worker"):
            if not shutil.which(tool):
                raise RuntimeError(f"{tool} is not installed: apt-get install buildbot buildbot-worker python3-treq")
        cls.dir = tempfile.mkdtemp(prefix="nbae2e")
        cls.procs = []
        try:
            cls._start_daemon()
            cls._start_master()
            cls._start_worker()
        except BaseException:
            cls._teardown()
            raise
        print(f"  e2e setup took {time.monotonic() - started:.1f}s", file=sys.stderr)

    @classmethod
    def _start_daemon(cls):
        binary = os.environ.get("NBA_DAEMON_BINARY")
        if not binary:
            if not shutil.which("go"):
                raise RuntimeError("Go is needed to build the daemon for the e2e test (or set NBA_DAEMON_BINARY)")
            binary = os.path.join(cls.dir, "nix-builder-autoscaler")
            argv = ["go", "build", "-o", binary, "./cmd/nix-builder-autoscaler"]
            print(f"  {' '.join(argv)}", file=sys.stderr)
            subprocess.run(argv, cwd=REPO, check=True, timeout=600, env=dict(os.environ, CGO_ENABLED="1"))
        cls.sock = os.path.join(cls.dir, "d.sock")
        os.makedirs(os.path.join(cls.dir, "state"))
        cfg = os.path.join(cls.dir, "config.toml")
        cls.api_port = free_port()
        cls.token_file = os.path.join(cls.dir, "token")
        with open(cls.token_file, "w") as f:
            f.write(os.urandom(16).hex() + "\n")
        os.chmod(cls.token_file, 0o600)
        with open(cfg, "w") as f:
            f.write(DAEMON_CONFIG.format(dir=cls.dir, port=cls.api_port))
        cls.daemon = Proc("daemon", [binary, "run", "--config", cfg], cls.dir, dict(os.environ),
                          os.path.join(cls.dir, "daemon.log"))
        cls.procs.append(cls.daemon)
        wait_for("the daemon's API", lambda: cls.api("GET", "/healthz")[0] == 200,
                 on_fail=lambda: cls.log_tail(cls.daemon.logfile))

    @classmethod
    def _pylib(cls):
        """The extension (with its Buildbot plugin entry points) and the www stand-in."""
        lib = os.path.join(cls.dir, "pylib")
        stub = os.path.join(lib, "nba_e2e_www")
        os.makedirs(os.path.join(stub, "static"))
        with open(os.path.join(stub, "__init__.py"), "w") as f:
            f.write(WWW_STUB)
        with open(os.path.join(stub, "VERSION"), "w") as f:
            f.write("0\n")
        with open(os.path.join(stub, "static", "index.html"), "w") as f:
            f.write("<p>REST API at /api/v2</p>\n")
        egg = os.path.join(lib, "nba_e2e_www.egg-info")
        os.makedirs(egg)
        with open(os.path.join(egg, "PKG-INFO"), "w") as f:
            f.write("Metadata-Version: 1.0\nName: nba-e2e-www\nVersion: 0\n")
        with open(os.path.join(egg, "entry_points.txt"), "w") as f:
            f.write("[buildbot.www]\nbase = nba_e2e_www:ep\n")
        # The extension's own metadata, so util.AutoscalerConfigurator exists
        # (what an installed package provides).
        subprocess.run([PYTHON, "-W", "ignore", "-c",
                        "import sys; from setuptools import setup; "
                        "sys.argv = ['setup.py', '-q', 'egg_info', '--egg-base', sys.argv[1]]; setup()", lib],
                       cwd=EXT, check=True, timeout=SUBPROCESS_TIMEOUT, stdout=subprocess.DEVNULL)
        return lib

    @classmethod
    def _start_master(cls):
        lib = cls._pylib()
        cls.env = dict(os.environ, PYTHONPATH=os.pathsep.join([lib, EXT]), PYTHONDONTWRITEBYTECODE="1")
        cls.www, cls.pb = free_port(), free_port()
        master = os.path.join(cls.dir, "master")
        subprocess.run(["buildbot", "create-master", "-q", master], check=True, timeout=SUBPROCESS_TIMEOUT, env=cls.env)
        check = os.path.join(cls.dir, "check_reservation.py")
        with open(check, "w") as f:
            f.write(CHECK_SCRIPT)
        with open(os.path.join(master, "master.cfg"), "w") as f:
            f.write(MASTER_CFG.format(www=cls.www, pb=cls.pb, python=PYTHON, check=check, sock=cls.sock,
                                      api_port=cls.api_port, token_file=cls.token_file,
                                      fc_project=FC_PROJECT, fc_system=FC_SYSTEM))
        subprocess.run(["buildbot", "checkconfig", master], check=True, timeout=SUBPROCESS_TIMEOUT, env=cls.env,
                       stdout=subprocess.DEVNULL)
        cls.master_log = os.path.join(master, "twistd.log")
        cls.master = Proc("master", ["buildbot", "start", "--nodaemon", master], master, cls.env,
                          os.path.join(cls.dir, "master.out"))
        cls.procs.append(cls.master)

        def builders():
            if not cls.master.alive():
                raise AssertionError("the master exited" + cls.log_tail(cls.master_log))
            names = {b["name"]: b["builderid"] for b in cls.rest("/builders")["builders"]}
            return names if "demo/nix-build" in names else None

        cls.builderids = wait_for("the master's REST API", builders, on_fail=lambda: cls.log_tail(cls.master_log))

    @classmethod
    def _start_worker(cls):
        wdir = os.path.join(cls.dir, "worker")
        subprocess.run(["buildbot-worker", "create-worker", "-q", wdir, f"127.0.0.1:{cls.pb}", "w1", "pass"],
                       check=True, timeout=SUBPROCESS_TIMEOUT, env=cls.env)
        cls.worker = Proc("worker", ["buildbot-worker", "start", "--nodaemon", wdir], wdir, cls.env,
                          os.path.join(cls.dir, "worker.out"))
        cls.worker_log = os.path.join(wdir, "twistd.log")
        cls.procs.append(cls.worker)
        wait_for("the worker to connect", lambda: cls.rest("/workers")["workers"][0]["connected_to"],
                 on_fail=lambda: cls.log_tail(cls.worker_log))

    @classmethod
    def _teardown(cls):
        for p in reversed(cls.procs):
            try:
                p.stop()
            except Exception as e:  # keep stopping the others
                print(f"  stopping {p.name}: {e}", file=sys.stderr)
        cls.procs = []
        # The local provider's stand-in builders outlive the daemon (as EC2
        # instances would): stop each by the PID in its instance record,
        # after checking the PID still runs that builder.
        for rec in glob.glob(os.path.join(cls.dir or "/nonexistent", "state", "**", "instances", "*.json"),
                             recursive=True):
            try:
                with open(rec) as f:
                    r = json.load(f)
                pid, marker = int(r.get("pid") or 0), r.get("marker") or r.get("id")
                if pid <= 0:
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() not in f.read():
                        continue
                os.kill(pid, signal.SIGKILL)
                print(f"  stopped stand-in builder {r.get('id')} (pid {pid})", file=sys.stderr)
            except (OSError, ValueError):
                pass
        if cls.dir and os.environ.get("NBA_KEEP") != "1":
            shutil.rmtree(cls.dir, ignore_errors=True)
        elif cls.dir:
            print(f"  kept {cls.dir}", file=sys.stderr)

    # Talking to the daemon and to Buildbot.

    @classmethod
    def api(cls, method, path, body=None):
        c = UnixHTTP(cls.sock)
        try:
            if body is None:
                c.request(method, path)
            else:
                c.request(method, path, json.dumps(body), {"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, json.loads(r.read() or b"null")
        finally:
            c.close()

    @classmethod
    def rest(cls, path, body=None):
        c = http.client.HTTPConnection("127.0.0.1", cls.www, timeout=HTTP_TIMEOUT)
        try:
            if body is None:
                c.request("GET", "/api/v2" + path)
            else:
                c.request("POST", "/api/v2" + path, json.dumps(body), {"Content-Type": "application/json"})
            r = c.getresponse()
            data = r.read()
            if r.status != 200:
                raise AssertionError(f"{path}: {r.status} {data[:500]!r}")
            return json.loads(data)
        finally:
            c.close()

    @classmethod
    def rpc(cls, path, method, **params):
        doc = cls.rest(path, {"jsonrpc": "2.0", "method": method, "id": 1, "params": params})
        if "error" in doc:
            raise AssertionError(f"{path} {method}: {doc['error']}")
        return doc["result"]

    @classmethod
    def log_tail(cls, path, n=60):
        try:
            with open(path, errors="replace") as f:
                lines = f.readlines()[-n:]
        except OSError:
            return ""
        return f"\n--- last lines of {path}:\n" + "".join(lines)

    def logs(self):
        return "".join(self.log_tail(p) for p in (self.daemon.logfile, self.master_log, self.worker_log))

    def force(self, builder="demo/nix-build", scheduler="force", **props):
        if scheduler == "force":
            props.setdefault("system", "x86_64-linux")
            props.setdefault("sleep", "1")
        _, brids = self.rpc(f"/forceschedulers/{scheduler}", "force", builderid=self.builderids[builder], **props)
        brid = list(brids.values())[0]
        return wait_for("the build to start", lambda: self.rest(f"/buildrequests/{brid}/builds")["builds"],
                        on_fail=self.logs)[0]["buildid"]

    def build(self, buildid):
        return self.rest(f"/builds/{buildid}")["builds"][0]

    def wait_build(self, buildid):
        return wait_for(f"build {buildid} to finish", lambda: (lambda b: b if b["complete"] else None)(self.build(buildid)),
                        on_fail=self.logs)

    def steps(self, buildid):
        """The build's steps by name, without Buildbot's own worker_preparation."""
        return {s["name"]: s for s in self.rest(f"/builds/{buildid}/steps")["steps"] if s["name"] != "worker_preparation"}

    def prop(self, buildid, name):
        props = self.rest(f"/builds/{buildid}/properties")["properties"][0]
        return props.get(name, [None])[0]

    def step_log(self, buildid, step_number, slug):
        logs = self.rest(f"/builds/{buildid}/steps/{step_number}/logs")["logs"]
        for lg in logs:
            if lg["slug"] == slug:
                chunks = self.rest(f"/logs/{lg['logid']}/contents")["logchunks"]
                text = "".join(ch["content"] for ch in chunks)
                # Stream logs prefix each line with its stream (o, e, h).
                if lg["type"] == "s":
                    text = "".join(line[1:] + "\n" for line in text.splitlines())
                return text
        raise AssertionError(f"no log {slug!r} in step {step_number} of build {buildid}: {[lg['slug'] for lg in logs]}")

    def reservation(self, rid):
        status, res = self.api("GET", "/v1/reservations/" + rid)
        self.assertEqual(status, 200, res)
        return res

    def events(self, rid):
        status, doc = self.api("GET", f"/v1/events?reservation={rid}&limit=1000")
        self.assertEqual(status, 200, doc)
        return [e["kind"] for e in sorted(doc["events"], key=lambda e: e["at"])]

    def gate_running_with_id(self, buildid):
        """The reservation id, once the gate step runs and has recorded it."""
        rid = self.prop(buildid, "nix_builder_autoscaler_reservation")
        gate = self.steps(buildid).get(GATE)
        if rid and gate and not gate["complete"]:
            return rid
        return None

    def forecast(self, fid):
        status, doc = self.api("GET", "/v1/forecasts")
        self.assertEqual(status, 200, doc)
        for fc in doc["forecasts"]:
            if fc["id"] == fid:
                return fc
        raise AssertionError(f"the daemon lists no forecast {fid}: {doc}")

    def step_order(self, buildid):
        return [s["name"] for s in sorted(self.steps(buildid).values(), key=lambda s: s["number"])]

    def pool_empty(self, name):
        """True when the pool runs no builder and holds no live reservation."""
        status, doc = self.api("GET", "/v1/status")
        self.assertEqual(status, 200, doc)
        pool = next(p for p in doc["pools"] if p["name"] == name)
        return (not any(n for state, n in pool["slots"].items() if state != "empty")
                and not any(pool["reservations"].values()))

    def probe(self, rid):
        """Seconds from a reservation in the fc pool until it is ready (it
        is left ready)."""
        t0 = time.monotonic()
        status, res = self.api("POST", "/v1/reservations", {"id": rid, "system": FC_SYSTEM, "lease": "1m",
                                                             "owner": "e2e probe"})
        self.assertIn(status, (200, 201), res)
        while res["state"] == "pending" and time.monotonic() - t0 < WAIT:
            status, res = self.api("GET", f"/v1/reservations/{rid}?wait=30s")
        self.assertEqual(res["state"], "ready", res)
        return time.monotonic() - t0

    def measure_boot(self):
        """What a reservation waits in the fc pool: when it is empty (a
        boot: what a build waits without a forecast), and right after the
        first one is released (a ready builder: the daemon's own latency)."""
        wait_for("the fc pool to be empty", lambda: self.pool_empty("fc"), interval=0.5, on_fail=self.logs)
        boot = self.probe("e2e-boot-probe")
        self.assertEqual(self.api("DELETE", "/v1/reservations/e2e-boot-probe")[0], 200)
        ready = self.probe("e2e-ready-probe")
        self.assertEqual(self.api("DELETE", "/v1/reservations/e2e-ready-probe")[0], 200)
        return boot, ready

    def builder_ready_before(self, rid):
        """(when the builder that served rid became ready, when rid was
        created), from the daemon's events, in epoch seconds."""
        res = self.reservation(rid)
        status, doc = self.api("GET", f"/v1/events?reservation={rid}&limit=1000")
        self.assertEqual(status, 200, doc)
        assigned = [e for e in doc["events"] if e["kind"] == "assigned"]
        self.assertEqual(len(assigned), 1, doc)
        slot, instance = assigned[0]["slot"], assigned[0]["instance_id"]
        status, doc = self.api("GET", f"/v1/events?pool=fc&slot={slot}&limit=1000")
        self.assertEqual(status, 200, doc)
        ready = [epoch(e["at"]) for e in doc["events"] if e["kind"] == "ready" and e.get("instance_id") == instance]
        self.assertEqual(len(ready), 1, (instance, doc))
        return ready[0], epoch(res["created_at"])

    def evaluate(self, eval_seconds):
        """Force fcdemo/nix-eval; returns (its build, its forecast, [(build, its gate's wait, its reservation)])."""
        fcb = self.builderids["fcdemo/nix-build"]
        before = {b["buildid"] for b in self.rest(f"/builders/{fcb}/builds")["builds"]}
        bid = self.force("fcdemo/nix-eval", scheduler="force-fc", eval_seconds=f"{eval_seconds:.1f}")
        b = self.wait_build(bid)
        self.assertEqual(b["results"], SUCCESS, self.logs())
        self.assertEqual(self.step_order(bid), [FORECAST, "evaluate (stand-in)", "trigger builds", WITHDRAW])
        st = self.steps(bid)
        self.assertEqual(st[FORECAST]["results"], SUCCESS, st[FORECAST]["state_string"])
        self.assertEqual(st[WITHDRAW]["results"], SUCCESS, st[WITHDRAW]["state_string"])
        self.assertEqual(self.prop(bid, "project"), FC_PROJECT)
        ids = self.prop(bid, "nix_builder_autoscaler_forecasts")
        self.assertEqual(len(ids), 1, ids)
        fc = self.forecast(ids[0])
        self.assertEqual((fc["source"], fc["pool"], fc["state"]), (FC_PROJECT, "fc", "withdrawn"), fc)
        builds = [x for x in self.rest(f"/builders/{fcb}/builds")["builds"] if x["buildid"] not in before]
        self.assertEqual(len(builds), 2, builds)
        waits = []
        for x in builds:
            self.assertEqual(x["results"], SUCCESS, self.logs())
            self.assertEqual(self.prop(x["buildid"], "project"), FC_PROJECT, "the triggered build has the project")
            rid = self.prop(x["buildid"], "nix_builder_autoscaler_reservation")
            res = self.reservation(rid)
            self.assertEqual((res["source"], res["pool"]), (FC_PROJECT, "fc"), res)
            waits.append((x, self.prop(x["buildid"], "nix_builder_autoscaler_wait_seconds"), rid))
        log = self.step_log(bid, st[FORECAST]["number"], "forecast")
        print("  forecast step log:\n" + "".join("    | " + line + "\n" for line in log.splitlines()),
              file=sys.stderr)
        return b, self.forecast(ids[0]), waits

    # The scenarios (they share one master, worker and daemon).

    def scenario_cached_build_skips_gate_and_other_builders_are_untouched(self):
        bid = self.force(cacheStatus="cached")
        b = self.wait_build(bid)
        self.assertEqual(b["results"], SUCCESS, self.logs())
        st = self.steps(bid)
        self.assertEqual(st[GATE]["results"], SKIPPED)
        self.assertIn("cacheStatus=cached", st[GATE]["state_string"])
        self.assertEqual(st[RELEASE]["results"], SKIPPED)
        self.assertIsNone(self.prop(bid, "nix_builder_autoscaler_reservation"))
        self.assertEqual(self.api("GET", "/v1/reservations")[1]["reservations"], [])

        bid = self.force("demo/nix-eval")
        self.wait_build(bid)
        self.assertEqual(list(self.steps(bid)), ["evaluate"])

    def scenario_build_waits_for_capacity_runs_and_releases(self):
        t0 = time.monotonic()
        bid = self.force(sleep="1")
        # The id is a build property (stored through the REST API) while the
        # gate still waits: the daemon has no builder up yet (boot_delay 10s).
        rid = wait_for("the gate to record its reservation", lambda: self.gate_running_with_id(bid),
                       interval=0.1, on_fail=self.logs)
        self.assertEqual(self.reservation(rid)["state"], "pending")
        # The step's state string tells the UI what it waits for.
        wait_for("the gate's state string", lambda: "waiting for x86_64-linux capacity in pool x86"
                 in self.steps(bid)[GATE]["state_string"], interval=0.1, on_fail=self.logs)

        b = self.wait_build(bid)
        took = time.monotonic() - t0
        self.assertEqual(b["results"], SUCCESS, self.logs())
        st = self.steps(bid)
        self.assertEqual([s["name"] for s in sorted(st.values(), key=lambda s: s["number"])],
                         [GATE, "nix build (stand-in)", RELEASE])
        gate = st[GATE]
        self.assertEqual(gate["results"], SUCCESS)
        self.assertIn("capacity ready after", gate["state_string"])
        self.assertIn("x86/slot", gate["state_string"])
        # The gate waited for the boot: the daemon created the reservation
        # pending (its log says so, and the test saw it pending while the gate
        # ran, above), and the build step then found it ready (below).

        # The build step ran while the daemon said the reservation was ready.
        out = self.step_log(bid, st["nix build (stand-in)"]["number"], "stdio")
        self.assertIn(f"reservation {rid} state=ready pool=x86 slot=slot", out)

        log = self.step_log(bid, gate["number"], "reservation")
        print("  gate step log:\n" + "".join("    | " + line + "\n" for line in log.splitlines()), file=sys.stderr)
        self.assertIn("reserving capacity for system x86_64-linux", log)
        self.assertIn(f"reservation {rid} is pending in pool x86", log)
        for want in ("pool x86", "slot slot", "instance ", "address 127.0.0.1:", "capacity ready after"):
            self.assertIn(want, log)

        res = self.reservation(rid)
        self.assertEqual(res["state"], "released")
        self.assertTrue(res["owner"].startswith(f"demo/nix-build#{b['number']} http://127.0.0.1:{self.www}/"),
                        res["owner"])
        self.assertEqual(res["lease"], "6s")
        kinds = self.events(rid)
        self.assertIn("assigned", kinds)
        self.assertIn("released", kinds)
        self.assertLess(kinds.index("assigned"), kinds.index("released"), kinds)
        self.assertEqual(self.prop(bid, "nix_builder_autoscaler_pool"), "x86")
        print(f"  forced build waited {gate['complete_at'] - gate['started_at']}s for capacity, "
              f"whole build {took:.1f}s", file=sys.stderr)

    def scenario_tcp_api_with_bearer_token(self):
        bid = self.force("remote/nix-build")
        b = self.wait_build(bid)
        self.assertEqual(b["results"], SUCCESS, self.logs())
        st = self.steps(bid)
        self.assertEqual(st[GATE]["results"], SUCCESS)
        self.assertEqual(st[RELEASE]["results"], SUCCESS)
        log = self.step_log(bid, st[GATE]["number"], "reservation")
        self.assertIn(f"daemon at http://127.0.0.1:{self.api_port}", log)
        rid = self.prop(bid, "nix_builder_autoscaler_reservation")
        res = self.reservation(rid)
        self.assertEqual(res["state"], "released")
        self.assertTrue(res["owner"].startswith(f"remote/nix-build#{b['number']} "), res["owner"])
        # Without the token the TCP API refuses.
        c = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=HTTP_TIMEOUT)
        c.request("GET", "/v1/reservations/" + rid)
        self.assertEqual(c.getresponse().status, 401)
        c.close()

    def scenario_stop_while_waiting_releases(self):
        bid = self.force(system="aarch64-linux")  # the "arm" pool boots in 10 minutes
        rid = wait_for("the gate to record its reservation", lambda: self.gate_running_with_id(bid),
                       interval=0.1, on_fail=self.logs)
        wait_for("the reservation to be pending", lambda: self.reservation(rid)["state"] == "pending")
        # The gate is in its long poll: it names the pool in its state string
        # once the daemon has answered the create, in the same turn as it
        # sends the first poll.
        wait_for("the gate to wait in its long poll", lambda: "waiting for aarch64-linux capacity in pool arm"
                 in self.steps(bid)[GATE]["state_string"], interval=0.1, on_fail=self.logs)
        self.rpc(f"/builds/{bid}", "stop", reason="stopped by the e2e test")
        # Stop build ends the wait at once: nothing else would end the 10
        # minute poll (or the 5 minute wait_timeout) before WAIT runs out.
        b = self.wait_build(bid)
        self.assertEqual(b["results"], CANCELLED, self.logs())
        st = self.steps(bid)
        self.assertEqual(st[GATE]["results"], CANCELLED)
        self.assertIn("cancelled after waiting", st[GATE]["state_string"])
        self.assertNotIn("nix build (stand-in)", st)
        self.assertIn(RELEASE, st, "the release step runs on a stopped build (alwaysRun)")
        self.assertNotEqual(st[RELEASE]["results"], FAILURE)
        res = self.reservation(rid)
        self.assertEqual(res["state"], "released")
        self.assertIn("released", self.events(rid))
        self.assertIn(f"released reservation {rid}", self.step_log(bid, st[GATE]["number"], "reservation"))

    def scenario_forecast_boots_builders_while_the_evaluation_runs(self):
        # What a build waits without a forecast: a boot of an fc builder;
        # and what it waits when a builder is ready: the daemon's latency.
        boot, ready = self.measure_boot()
        print(f"  a reservation in the fc pool waits {boot:.1f}s when it is empty (a boot), "
              f"{ready:.1f}s when a builder is ready", file=sys.stderr)
        self.assertGreater(boot, 4, "boot_delay is 8s: the comparison below needs a real boot")

        # An evaluation that fails: the forecast is withdrawn all the same
        # (alwaysRun), and its source comes from the builder's name (the
        # "force" scheduler gives no project).
        bid = self.force("broken/nix-eval")
        b = self.wait_build(bid)
        self.assertEqual(b["results"], FAILURE, self.logs())
        self.assertEqual(self.step_order(bid), [FORECAST, "evaluate (fails)", WITHDRAW])
        st = self.steps(bid)
        self.assertEqual(st[FORECAST]["results"], SUCCESS, st[FORECAST]["state_string"])
        self.assertEqual(st[WITHDRAW]["results"], SUCCESS, st[WITHDRAW]["state_string"])
        fc = self.forecast(self.prop(bid, "nix_builder_autoscaler_forecasts")[0])
        self.assertEqual((fc["source"], fc["state"]), ("broken", "withdrawn"), fc)

        # The evaluation "runs" longer than a boot, by half a boot and 5s.
        eval_seconds = boot * 1.5 + 5
        # First evaluation of the project: the daemon learns how many builds
        # it triggers (the forecast's "arrived").
        wait_for("the fc pool to be empty", lambda: self.pool_empty("fc"), interval=0.5, on_fail=self.logs)
        _, first, waits1 = self.evaluate(eval_seconds)
        self.assertEqual(first["arrived"], 2, first)
        # Second evaluation, from an empty pool again: the forecast, estimated
        # from the first, boots builders while it evaluates.
        wait_for("the fc pool to be empty", lambda: self.pool_empty("fc"), interval=0.5, on_fail=self.logs)
        _, second, waits2 = self.evaluate(eval_seconds)
        print(f"  first evaluation: forecast {first['builds']} builds (estimated={first['estimated']}), "
              f"{first['arrived']} arrived; gates waited {[w for _, w, _ in waits1]}s", file=sys.stderr)
        print(f"  second evaluation: forecast {second['builds']} builds (estimated={second['estimated']}), "
              f"{second['arrived']} arrived; gates waited {[w for _, w, _ in waits2]}s", file=sys.stderr)
        # The daemon estimated the second forecast from the first's arrivals.
        self.assertTrue(second["estimated"], second)
        self.assertEqual(second["builds"], 2, second)
        self.assertEqual(second["arrived"], 2, second)
        for x, waited, rid in waits2:
            # Each build found its builder already ready: the forecast booted
            # it while the evaluation ran.
            ready_at, asked_at = self.builder_ready_before(rid)
            print(f"  build {x['number']}: its builder was ready {asked_at - ready_at:.1f}s before it asked; "
                  f"its gate waited {waited}s", file=sys.stderr)
            self.assertLess(ready_at, asked_at, f"build {x['number']}'s builder became ready only after the build "
                                                f"asked for it: the forecast booted nothing" + self.logs())
            # So its gate waited what a ready builder costs, less than a boot.
            self.assertIsNotNone(waited, x)
            self.assertLess(waited, boot, f"build {x['number']} waited {waited}s for a ready builder "
                                          f"(a boot takes {boot:.1f}s)" + self.logs())

    def scenario_worker_killed_reservation_expires_by_lease(self):
        bid = self.force(sleep="3600")  # runs until the worker is killed
        rid = wait_for("the build step to run", lambda: (
            self.prop(bid, "nix_builder_autoscaler_reservation")
            if "nix build (stand-in)" in self.steps(bid) else None), on_fail=self.logs)
        self.assertEqual(self.reservation(rid)["state"], "ready")
        time.sleep(7)  # longer than the 6s lease: the time passing is what is tested (heartbeats keep it)
        self.assertEqual(self.reservation(rid)["state"], "ready", "heartbeats keep the lease while the build runs")

        self.worker.kill9()
        b = self.wait_build(bid)
        self.assertEqual(b["results"], RETRY, self.logs())
        self.assertNotIn(RELEASE, self.steps(bid), "no step runs after the worker is lost")
        t0 = time.monotonic()
        res = wait_for("the daemon to expire the lease", lambda: (lambda r: r if r["state"] != "ready" else None)(
            self.reservation(rid)), interval=0.5, on_fail=self.logs)
        self.assertEqual(res["state"], "expired", res)
        kinds = self.events(rid)
        self.assertIn("expired", kinds)
        self.assertNotIn("released", kinds)
        print(f"  lease expired {time.monotonic() - t0:.1f}s after the build ended", file=sys.stderr)


if __name__ == "__main__":
    unittest.main()
