"""The forecast steps of an evaluation: ForecastDemand tells the daemon that
builds are coming when it starts, WithdrawForecast that it ended. Neither
ever fails, halts or delays the evaluation."""

import re
import time
import uuid
import weakref

from buildbot.config import error as config_error
from buildbot.process import buildstep
from buildbot.process.results import CANCELLED, SKIPPED, SUCCESS, WARNINGS
from twisted.internet import defer
from twisted.python import log as twlog

from .client import APIError
from .durations import format_duration
from .steps import PROPERTY_FORECASTS, _DaemonSettings, _DemandSource, _seconds, _StepLog, record_property

FORECAST_ID_MAX = 128
FORECAST_TTL_MAX = 6 * 3600.0
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._:@-]+")

# The forecasts of each evaluation not yet withdrawn: build -> (client, ids).
# WithdrawForecast takes them; if it never runs (worker lost), the end of the
# build withdraws them.
_open_forecasts = weakref.WeakKeyDictionary()


def _forecast_error(e):
    """An APIError of the forecast API as a log line, with a hint when the
    daemon does not seem to have that API at all."""
    text = str(e)
    # A daemon without the API answers an unknown route with 404 "no
    # endpoint ..." (Go's own mux: a plain-text 404 or 405); a routing
    # failure of a forecast is a 404 too, but names the system or pool.
    if isinstance(e, APIError) and e.status in (404, 405) and (not e.code or "no endpoint" in e.message):
        text += " (a daemon without the forecast API? update it, or set forecasts=False)"
    return text


def _forecast_line(fc):
    """What the daemon made of a forecast: "3 builds (estimated) in pool x86"."""
    builds = fc.get("builds")
    text = f"{builds if builds is not None else '?'} build{'' if builds == 1 else 's'}"
    if fc.get("estimated"):
        text += " (estimated)"
    if fc.get("pool"):
        text += f" in pool {fc['pool']}"
    return text


class _QuietSteps(buildstep.BuildStep):
    """A step that never fails, halts or changes its build's result: it ends
    in SUCCESS, SKIPPED or WARNINGS, and its WARNINGS stay on the step."""

    def _quiet_defaults(self, kwargs):
        kwargs.setdefault("haltOnFailure", False)
        kwargs.setdefault("flunkOnFailure", False)
        kwargs.setdefault("flunkOnWarnings", False)
        kwargs.setdefault("warnOnFailure", False)
        kwargs.setdefault("warnOnWarnings", False)
        return kwargs

    @defer.inlineCallbacks
    def _quietly(self, work, failed):
        """Run work(log) with the step's "forecast" log; an exception it
        raises is logged and ends the step in WARNINGS, with
        failed(error) -> (log line, summary)."""
        log = _StepLog(self, "forecast", time.monotonic())
        try:
            yield log.open()
        except Exception:
            pass
        try:
            result = yield work(log)
        except Exception as e:
            line, self._summary = failed(e)
            log(line)
            result = WARNINGS
        yield log.flush()
        return result


def _withdraw_left_over(build, why):
    """Withdraw the forecasts WithdrawForecast did not take (it never ran)."""
    entry = _open_forecasts.pop(build, None)
    if entry is None:
        return defer.succeed(None)
    client, ids = entry
    ds = []
    for fid in ids:
        d = client.withdraw_forecast(fid)
        d.addCallbacks(lambda _res, fid=fid: twlog.msg(f"nix-builder-autoscaler: withdrew forecast {fid} ({why})"),
                       lambda f, fid=fid: twlog.msg(f"nix-builder-autoscaler: could not withdraw forecast {fid} "
                                                    f"({why}): {f.value}; its ttl ends it"))
        ds.append(d)
    return defer.DeferredList(ds)


class ForecastDemand(_DaemonSettings, _DemandSource, _QuietSteps):
    """Tell the daemon, as an evaluation starts, that builds of this project
    are coming, so builders boot while it evaluates.

    The first step of every <project>/nix-eval builder (AutoscalerConfigurator
    puts it there). It sends one forecast per system (or one for a forced
    pool), with the project as its source and no build count: the daemon
    estimates how many builds come from the project's earlier evaluations.
    The ids are stored as the build property nix_builder_autoscaler_forecasts
    before the requests go out, for WithdrawForecast.

    It never fails or holds up the evaluation: each request has a short
    timeout (request_timeout, 5 s) and none is retried; any error ends the
    step in WARNINGS with the reason in its log, and the evaluation goes on.
    """

    name = "forecast builder demand"
    description = ["forecasting builder demand"]
    renderables = ["token", "source", "systems", "features", "pool"]

    def __init__(self, *, socket=None, url=None, token=None, token_file=None, request_timeout="5s",
                 systems=("x86_64-linux",), features=None, pool=None, ttl="30m",
                 source=None, source_property="project", **kwargs):
        super().__init__(**self._quiet_defaults(kwargs))
        self._init_daemon(socket, url, token, token_file, request_timeout)
        self._init_source(source, source_property)
        if isinstance(systems, (list, tuple)) and not all(isinstance(x, str) and x for x in systems):
            config_error(f"nix-builder-autoscaler: forecast systems must be non-empty strings: {systems!r}")
        self.systems = list(systems) if isinstance(systems, (list, tuple)) else systems
        self.features = features
        self.pool = pool
        ttl_seconds = _seconds("forecast ttl", ttl, positive=True)
        if ttl_seconds > FORECAST_TTL_MAX:
            config_error("nix-builder-autoscaler: forecast ttl must be at most 6h")
        self.ttl = ttl if isinstance(ttl, str) else format_duration(ttl_seconds)
        self._inflight = None
        self._interrupted = None
        self._summary = None

    def getResultSummary(self):  # noqa: N802
        return {"step": self._summary or "forecast builder demand"}

    def interrupt(self, reason):
        self._interrupted = reason
        if self._inflight is not None:
            self._inflight.cancel()
        return super().interrupt(reason)

    def _targets(self):
        """[(label, routing)]: one per system, or one for a forced pool."""
        if self.pool:
            return [(f"pool {self.pool}", {"pool": str(self.pool)})]
        systems = self.systems
        if isinstance(systems, str):
            systems = systems.split()
        features = self.features
        if isinstance(features, str):
            features = features.split()
        features = sorted({f for f in (features or []) if f})
        out = []
        for system in dict.fromkeys(x for x in (systems or []) if x):
            routing = {"system": system}
            if features:
                routing["features"] = features
            out.append((system, routing))
        return out

    def _forecast_id(self, tag, label):
        suffix = _ID_UNSAFE.sub("-", label).strip("-") or "x"
        return f"{tag}-{suffix}"[:FORECAST_ID_MAX]

    @defer.inlineCallbacks
    def run(self):
        try:
            # Never fail the evaluation because of a forecast.
            result = yield self._quietly(self._run, lambda e: (f"no forecast sent: {e}", f"no forecast: {e}"))
        finally:
            self._inflight = None
        return result

    @defer.inlineCallbacks
    def _run(self, log):
        targets = self._targets()
        if not targets:
            self._summary = "no forecast: no systems to forecast"
            log("no systems to forecast (forecast_systems is empty)")
            return SKIPPED
        source = self._demand_source()
        if not source:
            self._summary = "no forecast: the build's project is unknown"
            log(f"no '{self.source_property}' property and no project in the builder's name: no forecast")
            return WARNINGS
        try:
            client = self._client()
        except (OSError, ValueError) as e:
            self._summary = f"no forecast: cannot read the daemon's token: {e}"
            log(self._summary)
            return WARNINGS

        build = self.build
        tag = f"bb-eval-{getattr(build, 'buildid', None) or 0}-{uuid.uuid4().hex[:8]}"
        bodies = []
        for label, routing in targets:
            body = {"id": self._forecast_id(tag, label), "source": source, "ttl": self.ttl}
            body.update(routing)
            bodies.append((label, body))
        ids = [b["id"] for _, b in bodies]
        yield record_property(self, PROPERTY_FORECASTS, ids, log)
        # From here on the forecasts may exist: withdraw them at the build's
        # end if WithdrawForecast does not.
        _open_forecasts[build] = (client, ids)
        waiter = getattr(build, "waitUntilFinished", None)
        if waiter is not None:
            try:
                waiter().addBoth(lambda _: _withdraw_left_over(build, "the evaluation ended"))
            except Exception as e:
                twlog.msg(f"nix-builder-autoscaler: cannot watch the build's end: {e}")

        log(f"forecasting builds of {source} for {', '.join(label for label, _ in bodies)}: "
            f"ttl {self.ttl}, daemon at {client.where}")
        self._inflight = defer.DeferredList([client.forecast(b) for _, b in bodies], consumeErrors=True)
        if self._interrupted is not None:
            self._inflight.cancel()
        answers = yield self._inflight
        if self._interrupted is not None:
            self._summary = "forecast cancelled"
            log(f"cancelled: {self._interrupted}")
            return CANCELLED

        sent, failed = [], []
        for (label, body), (ok, value) in zip(bodies, answers):
            if ok:
                line = _forecast_line(value)
                log(f"forecast {body['id']}: {line}, open until {value.get('expires_at') or '?'}")
                sent.append(f"{label}: {line}")
            else:
                err = _forecast_error(value.value)
                log(f"forecast {body['id']} for {label} not sent: {err}")
                failed.append((label, err))
        if failed:
            label, err = failed[0]
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            self._summary = f"no forecast for {label}{more}: {err}"
            log("the evaluation goes on; its builds wait for builders to boot as they would without a forecast")
            return WARNINGS
        self._summary = "forecast " + "; ".join(sent)
        return SUCCESS


class WithdrawForecast(_DaemonSettings, _QuietSteps):
    """Withdraw the evaluation's forecasts (DELETE /v1/forecasts/{id}).

    The last step of every <project>/nix-eval builder, alwaysRun, so it also
    runs when the evaluation fails or is stopped. Like ForecastDemand it never
    fails the evaluation: an error ends in WARNINGS, and the forecast's ttl
    ends it. The log says how many builds were forecast and how many arrived.
    """

    name = "withdraw builder forecast"
    description = ["withdrawing builder forecast"]
    renderables = ["token"]

    def __init__(self, *, socket=None, url=None, token=None, token_file=None, request_timeout="5s", **kwargs):
        kwargs.setdefault("alwaysRun", True)
        super().__init__(**self._quiet_defaults(kwargs))
        self._init_daemon(socket, url, token, token_file, request_timeout)
        self._summary = None

    def getResultSummary(self):  # noqa: N802
        return {"step": self._summary or "withdrew builder forecast"}

    @defer.inlineCallbacks
    def run(self):
        ids = self.getProperty(PROPERTY_FORECASTS)
        _open_forecasts.pop(self.build, None)  # this step withdraws them, not the build's end
        if isinstance(ids, str):
            ids = [ids]
        if not ids:
            self._summary = "no forecast to withdraw"
            return SKIPPED
        result = yield self._quietly(lambda log: self._run(list(ids), log), lambda e: (
            f"could not withdraw the forecasts: {e}", f"could not withdraw the forecasts (their ttl ends them): {e}"))
        return result

    @defer.inlineCallbacks
    def _run(self, ids, log):
        try:
            client = self._client()
        except (OSError, ValueError) as e:
            self._summary = f"could not withdraw the forecasts (their ttl ends them): cannot read the daemon's token: {e}"
            log(self._summary)
            return WARNINGS
        answers = yield defer.DeferredList([client.withdraw_forecast(fid) for fid in ids], consumeErrors=True)
        done, failed = [], []
        for fid, (ok, value) in zip(ids, answers):
            if ok:
                arrived = value.get("arrived")
                line = f"{_forecast_line(value)} forecast, {arrived if arrived is not None else '?'} arrived so far"
                log(f"withdrew forecast {fid}: {line}; now {value.get('state') or '?'}")
                done.append(line)
            elif isinstance(value.value, APIError) and value.value.status == 404 and value.value.code == "not_found":
                log(f"forecast {fid} is unknown to the daemon (it was never created): nothing to withdraw")
            else:
                err = _forecast_error(value.value)
                log(f"could not withdraw forecast {fid}: {err}")
                failed.append(err)
        if failed:
            log("the daemon ends a forecast when its ttl runs out")
            self._summary = f"could not withdraw {len(failed)} forecast{'s' if len(failed) > 1 else ''} " \
                            f"(their ttl ends them): {failed[0]}"
            return WARNINGS
        self._summary = ("withdrew forecast: " + "; ".join(done)) if done else "no forecast was open"
        return SUCCESS
