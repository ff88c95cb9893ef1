"""Buildbot steps: CapacityGate (first) and ReleaseCapacity (last, alwaysRun)
on each nix-build; ForecastDemand (first) and WithdrawForecast (last,
alwaysRun) on each nix-eval.

Written for Buildbot 3.7 (Debian 12, Twisted 22.4) and 4.x: run() is a
@defer.inlineCallbacks generator, never "async def", and HTTP goes through
treq (client.py). The waiting and retrying is in gate.py; this module only
connects it to a build: properties, logs, summaries, Stop build.
"""

import time
import uuid
import weakref

from buildbot.config import error as config_error
from buildbot.process import buildstep
from buildbot.process.results import CANCELLED, FAILURE, RETRY, SKIPPED, SUCCESS, WARNINGS
from twisted.internet import defer, error as ierror, task, threads
from twisted.python import failure, log as twlog

from . import gate as gatemod
from .client import DEFAULT_SOCKET, APIError, DaemonClient, read_token_file
from .drv import read_features
from .durations import format_duration, human, parse_duration

# Build properties this extension sets.
PROPERTY_ID = "nix_builder_autoscaler_reservation"
PROPERTY_POOL = "nix_builder_autoscaler_pool"
PROPERTY_SLOT = "nix_builder_autoscaler_slot"
PROPERTY_INSTANCE = "nix_builder_autoscaler_instance"
PROPERTY_ADDRESS = "nix_builder_autoscaler_address"
PROPERTY_WAITED = "nix_builder_autoscaler_wait_seconds"
PROPERTY_FORECASTS = "nix_builder_autoscaler_forecasts"
SOURCE = "nix-builder-autoscaler"

# The daemon's limits (the forecast contract): a demand source is at most
# 256 bytes of printable text; a forecast id 1 to 128 characters of
# [A-Za-z0-9._:@/-] ("/" is left out here, so an id is one URL path
# segment); a forecast's ttl at most 6 hours.
SOURCE_MAX_BYTES = 256

# buildbot-nix sets cacheStatus ("cached", "local", "notBuilt") on each
# nix-build; "cached" builds are scheduled but only substitute. Releases
# before August 2024 set isCached (a bool) instead.
SKIP_CACHE_STATUSES = ("cached", "local")

# The heartbeat of each build that holds a reservation; ReleaseCapacity
# stops it, and so does the end of the build.
_heartbeats = weakref.WeakKeyDictionary()



def heartbeat_for(build):
    return _heartbeats.get(build)


def _reactor():
    from twisted.internet import reactor

    return reactor


class _DaemonSettings:
    """How to reach the daemon; shared by both steps.

    socket: the daemon's unix socket (used when url is not set).
    url: "http://host:port" of the daemon's TCP API, with a bearer token from
        token_file (a path, read at each build so it can rotate) or token (a
        string or a renderable such as util.Secret("nix-builder-autoscaler")).
    request_timeout: seconds for one request.
    """

    def _init_daemon(self, socket, url, token, token_file, request_timeout):
        if url is not None and not isinstance(url, str):
            config_error("nix-builder-autoscaler: url must be a string like \"http://10.0.0.1:8470\"")
        if url and not (url.startswith("http://") or url.startswith("https://")):
            config_error(f"nix-builder-autoscaler: url {url!r} must start with http:// or https://")
        if url and token is None and token_file is None:
            config_error("nix-builder-autoscaler: url needs a bearer token: set token_file or token (e.g. util.Secret(...))")
        if token is not None and token_file is not None:
            config_error("nix-builder-autoscaler: set token or token_file, not both")
        self.socket = socket or DEFAULT_SOCKET
        self.url = url or None
        self.token = token
        self.token_file = token_file
        self.request_timeout = _seconds("request_timeout", request_timeout, positive=True)

    def _client(self):
        """A client for this build; the token is read (or rendered) now."""
        token = None
        if self.token_file:
            token = read_token_file(self.token_file)
        elif self.token is not None:
            token = str(self.token)
        return DaemonClient(socket=self.socket, url=self.url, token=token if self.url else None,
                            request_timeout=self.request_timeout, reactor=self._clock())

    def _clock(self):
        return _reactor()


def _seconds(name, value, positive=False, allow_none=False):
    if value is None and allow_none:
        return None
    try:
        s = parse_duration(value)
    except ValueError as e:
        config_error(f"nix-builder-autoscaler: {name}: {e}")
        return 0.0
    if positive and s <= 0:
        config_error(f"nix-builder-autoscaler: {name}: must be greater than zero")
    return s


@defer.inlineCallbacks
def record_property(step, name, value, log):
    """Set a build property from step and store it now, not at the step's
    end, so that a later step (or the build's end) finds it even if this one
    is interrupted; a failure to store it is logged, and the in-memory
    property is enough for the steps of this build."""
    step.setProperty(name, value, SOURCE, runtime=True)
    buildid = getattr(step.build, "buildid", None)
    if buildid is None:
        return
    try:
        yield step.master.data.updates.setBuildProperty(buildid, name, value, SOURCE)
    except Exception as e:
        log(f"could not store property {name} yet: {e}")


def clean_source(value):
    """value as a demand source: printable characters only, at most 256 bytes
    of UTF-8 (cut at a character boundary)."""
    text = "".join(ch for ch in str(value) if ch.isprintable()).strip()
    return text.encode("utf-8")[:SOURCE_MAX_BYTES].decode("utf-8", "ignore").strip()


def project_from_builder(name):
    """The project in a buildbot-nix builder name: "<project>/nix-build" and
    "<project>/nix-eval" give "<project>" (which may contain "/" itself, as
    in "owner/repo"). A name without "/" is its own project."""
    name = name or ""
    return name.rsplit("/", 1)[0] if "/" in name else name


class _DemandSource:
    """The demand source a step reports: the project its builds belong to.

    source: a fixed source (or a renderable); by default the build property
    source_property ("project", which buildbot-nix's builds carry from their
    source stamp), else the builder name without its last "/part".
    """

    def _init_source(self, source, source_property):
        self.source = source
        self.source_property = source_property

    def _demand_source(self):
        for value in (self.source, self.getProperty(self.source_property) if self.source_property else None):
            if isinstance(value, str) and clean_source(value):
                return clean_source(value)
        builder = getattr(getattr(self.build, "builder", None), "name", None) or ""
        return clean_source(project_from_builder(builder))


class _StepLog:
    """Lines into a step log, in order, with the time since the step began."""

    def __init__(self, step, name, started):
        self.step = step
        self.name = name
        self.started = started
        self._log = None
        self._chain = defer.succeed(None)
        self.lines = []

    def open(self):
        def opened(log):
            self._log = log

        self._chain.addCallback(lambda _: self.step.addLog(self.name)).addCallback(opened)
        return self._chain

    def __call__(self, line):
        text = f"[{time.monotonic() - self.started:7.1f}s] {line}"
        self.lines.append(text)

        def write(_):
            if self._log is not None and not getattr(self._log, "finished", False):
                return self._log.addStdout(text + "\n")

        self._chain.addCallback(write)
        self._chain.addErrback(lambda f: twlog.msg(f"nix-builder-autoscaler: cannot write step log: {f.value}"))

    def flush(self):
        """A Deferred that fires once every line so far is written."""
        d = defer.Deferred()

        def fire(result):
            d.callback(None)
            return result

        self._chain.addBoth(fire)
        return d


@defer.inlineCallbacks
def _release(client, rid, log, attempts=3, clock=None):
    """DELETE the reservation, retrying transient errors a few times.

    Returns the released reservation; raises the last APIError.
    """
    clock = clock or client.reactor
    delay = 0.5
    for attempt in range(1, attempts + 1):
        try:
            res = yield client.release(rid)
            return res
        except APIError as e:
            if not e.transient or attempt == attempts:
                raise
            log(f"release {rid}: {e}; retrying in {human(delay)}")
            yield task.deferLater(clock, delay, lambda: None)
            delay *= 2


class CapacityGate(_DaemonSettings, _DemandSource, buildstep.BuildStep):
    """Reserve a builder for this build and wait until the daemon has one ready.

    The first step of every <project>/nix-build builder (AutoscalerConfigurator
    puts it there). It chooses the reservation id and records it as the build
    property nix_builder_autoscaler_reservation before it asks the daemon, so
    ReleaseCapacity can release it even if the daemon's answer is lost. The
    reservation names the build's project as its demand source, which is
    what a ForecastDemand of the project's evaluation counts as arrived.
    """

    name = "reserve builder capacity"
    description = ["reserving builder capacity"]
    renderables = ["token", "pool", "features", "source"]

    def __init__(self, *, socket=None, url=None, token=None, token_file=None, lease="10m",
                 wait_timeout="2h", poll="30s", request_timeout="10s", heartbeat=None,
                 pool=None, features=None, features_from_drv=True, system_property="system",
                 default_system=None, skip_cached=True, retry_initial="1s", retry_max="30s",
                 source=None, source_property="project", **kwargs):
        kwargs.setdefault("haltOnFailure", True)
        kwargs.setdefault("flunkOnFailure", True)
        kwargs.setdefault("warnOnWarnings", True)  # "not gated" shows on the build
        super().__init__(**kwargs)
        self._init_daemon(socket, url, token, token_file, request_timeout)
        self.lease = lease
        self.lease_seconds = _seconds("lease", lease, positive=True)
        self.wait_timeout = _seconds("wait_timeout", wait_timeout, positive=True, allow_none=True)
        self.poll = _seconds("poll", poll, positive=True)
        self.heartbeat = _seconds("heartbeat", heartbeat, positive=True, allow_none=True)
        self.retry_initial = _seconds("retry_initial", retry_initial, positive=True)
        self.retry_max = _seconds("retry_max", retry_max, positive=True)
        self.pool = pool
        self.features = features
        self.features_from_drv = features_from_drv
        self.system_property = system_property
        self.default_system = default_system
        self.skip_cached = skip_cached
        self._init_source(source, source_property)
        self._gate = None
        self._interrupted = None
        self._summary = None
        self._status = "reserving builder capacity"

    # Summaries shown in the UI.

    def getCurrentSummary(self):  # noqa: N802 (Buildbot's API)
        return {"step": self._status}

    def getResultSummary(self):  # noqa: N802
        summary = {"step": self._summary or self._status}
        if self.results in (FAILURE, CANCELLED) and self._summary:
            summary["build"] = self._summary
        return summary

    def _set_status(self, text):
        self._status = text
        try:
            self.updateSummary()
        except Exception as e:  # the summary is cosmetic
            twlog.msg(f"nix-builder-autoscaler: updateSummary: {e}")

    def interrupt(self, reason):
        """Stop build: end the wait now (CapacityGate.run releases)."""
        self._interrupted = reason
        if self._gate is not None:
            self._gate.cancel()
        return super().interrupt(reason)

    def _skip_reason(self):
        if not self.skip_cached:
            return None
        status = self.getProperty("cacheStatus")
        if status in SKIP_CACHE_STATUSES:
            return f"nothing to build remotely (cacheStatus={status})"
        if self.getProperty("isCached"):
            return "nothing to build remotely (isCached)"
        return None

    @defer.inlineCallbacks
    def _features(self, log):
        feats = set()
        if self.features:
            configured = self.features
            if isinstance(configured, str):
                configured = configured.split()
            feats.update(f for f in configured if f)
        drv = self.getProperty("drv_path")
        if self.features_from_drv and isinstance(drv, str) and drv:
            try:
                found = yield threads.deferToThread(read_features, drv)
                if found:
                    log(f"{drv} requires system features: {' '.join(found)}")
                feats.update(found)
            except (OSError, ValueError) as e:
                log(f"required system features unknown (cannot read {drv}: {e})")
        return sorted(feats)

    @defer.inlineCallbacks
    def _owner(self):
        builder = getattr(getattr(self.build, "builder", None), "name", None) or "?"
        number = getattr(self.build, "number", None)
        owner = f"{builder}#{number}"
        try:
            url = yield self.build.getUrl()
            if url:
                owner += " " + url
        except Exception as e:
            twlog.msg(f"nix-builder-autoscaler: build URL unknown: {e}")
        attr = self.getProperty("attr")  # buildbot-nix: the flake attribute being built
        if isinstance(attr, str) and attr:
            owner += f" ({attr})"
        return owner[:512]


    @defer.inlineCallbacks
    def run(self):
        started = time.monotonic()
        log = _StepLog(self, "reservation", started)
        try:
            yield log.open()
        except Exception:
            pass
        try:
            result = yield self._run(log)
        finally:
            yield log.flush()
        return result

    @defer.inlineCallbacks
    def _run(self, log):
        skip = self._skip_reason()
        if skip:
            self._summary = f"skipped: {skip}"
            log(f"not reserving: {skip}")
            return SKIPPED

        system = self.getProperty(self.system_property) or self.default_system
        if not system:
            self._summary = f"not gated: the build has no '{self.system_property}' property"
            log(f"the build has no '{self.system_property}' property and no default_system is set; "
                "nix-build runs without a reservation (HAProxy's hold still waits for a builder)")
            return WARNINGS

        try:
            client = self._client()
        except (OSError, ValueError) as e:
            self._summary = f"no builder capacity: cannot read the daemon's token: {e}"
            log(self._summary)
            return FAILURE
        clock = self._clock()

        features = yield self._features(log)
        rid = "bb-" + uuid.uuid4().hex
        yield record_property(self, PROPERTY_ID, rid, log)
        owner = yield self._owner()
        lease = self.lease if isinstance(self.lease, str) else format_duration(self.lease_seconds)
        body = {"id": rid, "system": system, "owner": owner, "lease": lease}
        source = self._demand_source()
        if source:
            body["source"] = source
        if features:
            body["features"] = features
        if self.pool:
            body["pool"] = str(self.pool)
        build = self.build

        def on_created(res):
            interval = gatemod.heartbeat_interval(self.lease_seconds, self.heartbeat)
            old = _heartbeats.pop(build, None)
            if old is not None:
                old.stop("replaced")
            hb = gatemod.Heartbeat(client, rid, interval, clock=clock,
                                   should_stop=lambda: bool(getattr(build, "finished", False)),
                                   log=lambda line: twlog.msg("nix-builder-autoscaler: " + line))
            _heartbeats[build] = hb
            hb.start()
            log(f"heartbeat every {human(interval)} keeps the {body['lease']} lease while the build runs")
            waiter = getattr(build, "waitUntilFinished", None)
            if waiter is not None:
                try:
                    waiter().addBoth(lambda _: hb.stop("the build has ended"))
                except Exception as e:
                    twlog.msg(f"nix-builder-autoscaler: cannot watch the build's end: {e}")

        pool_seen = []

        def progress(res):
            if res.get("pool"):
                pool_seen[:] = [res["pool"]]
            if res.get("state") == "pending":
                refresh()

        def refresh():
            where = f" in pool {pool_seen[0]}" if pool_seen else ""
            self._set_status(f"waiting for {system} capacity{where} ({human(time.monotonic() - log.started)})")

        # The UI shows how long the build has waited so far.
        ticker = task.LoopingCall(refresh)
        ticker.clock = clock

        g = self._gate = gatemod.Gate(
            client, body, clock=clock, poll=self.poll, wait_timeout=self.wait_timeout,
            backoff=gatemod.Backoff(self.retry_initial, self.retry_max), log=log,
            on_created=on_created, progress=progress)
        ticker.start(5, now=True)
        if self._interrupted is not None:
            g.cancel()
        try:
            outcome = yield g.run()
        finally:
            self._gate = None
            ticker.stop()

        if outcome.kind == gatemod.READY:
            res = outcome.reservation
            log(f"capacity {outcome.message} (the daemon counted {float(res.get('wait_seconds') or 0):.1f}s)")
            for prop, key in ((PROPERTY_POOL, "pool"), (PROPERTY_SLOT, "slot"),
                              (PROPERTY_INSTANCE, "instance_id"), (PROPERTY_ADDRESS, "address")):
                if res.get(key):
                    self.setProperty(prop, res[key], SOURCE, runtime=True)
            self.setProperty(PROPERTY_WAITED, round(outcome.waited, 1), SOURCE, runtime=True)
            where = "/".join(x for x in (res.get("pool"), res.get("slot")) if x)
            self._summary = f"capacity ready after {human(outcome.waited)} on {where or 'a builder'}"
            return SUCCESS

        # Not ready: stop the heartbeat and give the reservation back.
        hb = _heartbeats.pop(build, None)
        if hb is not None:
            hb.stop(outcome.kind)
        if outcome.kind in (gatemod.CANCELLED, gatemod.TIMEOUT, gatemod.ERROR):
            try:
                yield _release(client, rid, log, clock=clock)
                log(f"released reservation {rid}")
            except Exception as e:
                log(f"could not release reservation {rid}: {e}; its lease returns the capacity")

        if outcome.kind == gatemod.CANCELLED:
            log(f"cancelled after {human(outcome.waited)}: {self._interrupted or 'stopped'}")
            self._summary = f"cancelled after waiting {human(outcome.waited)} for capacity; reservation released"
            reason = self._interrupted
            if isinstance(reason, failure.Failure) and reason.check(ierror.ConnectionLost):
                return RETRY
            return CANCELLED
        log(f"no capacity: {outcome.message}")
        self._summary = f"no builder capacity: {outcome.message}"
        return FAILURE


class ReleaseCapacity(_DaemonSettings, buildstep.BuildStep):
    """Release the build's reservation. Never fails the build: a release that
    cannot reach the daemon ends in WARNINGS, and the lease returns the
    capacity."""

    name = "release builder capacity"
    description = ["releasing builder capacity"]
    renderables = ["token"]

    def __init__(self, *, socket=None, url=None, token=None, token_file=None, request_timeout="10s",
                 attempts=3, **kwargs):
        kwargs.setdefault("alwaysRun", True)
        kwargs.setdefault("haltOnFailure", False)
        kwargs.setdefault("flunkOnFailure", False)
        kwargs.setdefault("warnOnWarnings", True)
        super().__init__(**kwargs)
        self._init_daemon(socket, url, token, token_file, request_timeout)
        self.attempts = int(attempts)
        self._summary = None

    def getResultSummary(self):  # noqa: N802
        return {"step": self._summary or "released builder capacity"}

    @defer.inlineCallbacks
    def run(self):
        started = time.monotonic()
        rid = self.getProperty(PROPERTY_ID)
        hb = _heartbeats.pop(self.build, None)
        if hb is not None:
            hb.stop("released")
        if not rid:
            self._summary = "nothing to release"
            return SKIPPED
        log = _StepLog(self, "release", started)
        try:
            yield log.open()
        except Exception:
            pass
        try:
            result = yield self._run(rid, hb, log)
        except Exception as e:  # never fail the build because of a release
            log(f"could not release {rid}: {e}")
            self._summary = f"could not release {rid}: {e}"
            result = WARNINGS
        yield log.flush()
        return result

    @defer.inlineCallbacks
    def _run(self, rid, hb, log):
        if hb is not None:
            log(f"heartbeats sent: {hb.sent}, failed: {hb.failed}"
                + (f" (last error: {hb.last_error})" if hb.last_error else ""))
        try:
            client = self._client()
            res = yield _release(client, rid, log, attempts=self.attempts, clock=self._clock())
        except Exception as e:
            log(f"could not release {rid}: {e}")
            log("the daemon returns the capacity when the reservation's lease runs out")
            self._summary = f"could not release {rid} (the lease returns it): {e}"
            return WARNINGS
        state = res.get("state")
        held = ""
        if res.get("slot") or self.getProperty(PROPERTY_SLOT):
            held = f" from {self.getProperty(PROPERTY_POOL) or res.get('pool')}/{self.getProperty(PROPERTY_SLOT) or res.get('slot')}"
        log(f"released reservation {rid}{held}: now {state}"
            + (f" ({res['reason']})" if res.get("reason") else ""))
        self._summary = f"released builder capacity{held}"
        if state not in ("released", "expired", "failed"):
            log(f"unexpected state after release: {state}")
        if state == "expired":
            self._summary = f"reservation had already expired ({res.get('reason') or 'lease ran out'})"
            return WARNINGS
        return SUCCESS
