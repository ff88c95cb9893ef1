"""The capacity gate and the heartbeat as plain Twisted code.

Gate.run() creates a reservation (with an id chosen by the caller), then
long-polls until the daemon answers with anything but "pending", or until
the wait deadline. Transient errors are retried with backoff within that
deadline. Gate.cancel() ends the wait at once, also while a request is in
flight. The Buildbot steps (steps.py) wrap this; tests drive it directly.
"""

from twisted.internet import defer, task
from twisted.python import log as twlog

from .client import APIError
from .durations import human

# Outcome kinds.
READY = "ready"
FAILED = "failed"  # the daemon failed the reservation (reason says why)
EXPIRED = "expired"  # the lease ran out before it was ready
RELEASED = "released"  # released meanwhile (by someone else, or a tombstone)
TIMEOUT = "timeout"  # still pending at our wait deadline
CANCELLED = "cancelled"  # Gate.cancel()
ERROR = "error"  # the daemon refused the request (permanent error) or the deadline passed while it was unreachable


class Outcome:
    def __init__(self, kind, reservation=None, message="", waited=0.0):
        self.kind = kind
        self.reservation = reservation or {}
        self.message = message
        self.waited = waited

    def __repr__(self):
        return f"Outcome({self.kind!r}, {self.message!r}, waited={self.waited:.1f})"


class Backoff:
    """Exponential backoff: initial, 2x, 4x ... capped at maximum."""

    def __init__(self, initial=1.0, maximum=30.0):
        self.initial, self.maximum = float(initial), float(maximum)
        self.next = self.initial

    def reset(self):
        self.next = self.initial

    def step(self):
        d = self.next
        self.next = min(self.maximum, self.next * 2)
        return d


def rejects_field(err, field):
    """True when err is the daemon's 400 for a body field it does not know
    (its strict JSON decoding answers 'json: unknown field "<field>"')."""
    return err.status == 400 and f'unknown field "{field}"' in err.message


def describe(res):
    """Where a ready reservation landed: "pool x86, slot slot1, instance i-1, address 10.0.0.1:22"."""
    parts = []
    for key, label in (("pool", "pool"), ("slot", "slot"), ("instance_id", "instance"), ("address", "address")):
        if res.get(key):
            parts.append(f"{label} {res[key]}")
    return ", ".join(parts) or "no details"


class Gate:
    """Reserve capacity and wait until it is ready.

    client: a DaemonClient. request: the POST body, with "id" set.
    poll: seconds of one long poll. wait_timeout: seconds until the gate
    gives up (None: wait as long as the daemon keeps the reservation pending).
    log: called with one line of text per event. on_created: called with the
    reservation once the daemon has acknowledged it (start heartbeats there).
    progress: called with the reservation after every poll answer.
    """

    def __init__(self, client, request, *, clock, poll=30.0, wait_timeout=None, backoff=None,
                 log=None, on_created=None, progress=None):
        if not request.get("id"):
            raise ValueError("the reservation id must be chosen before the request")
        self.client = client
        self.request = dict(request)
        self.id = request["id"]
        self.clock = clock
        self.poll = float(poll)
        self.wait_timeout = wait_timeout
        self.backoff = backoff or Backoff()
        self.log = log or (lambda line: None)
        self.on_created = on_created or (lambda res: None)
        self.progress = progress or (lambda res: None)
        self.cancelled = False
        self.created = None  # the reservation as the daemon acknowledged it
        self.last = None  # the latest reservation seen
        self._current = None  # the Deferred in flight (request or sleep)
        self._started = None

    def cancel(self):
        """End the wait now; run() then returns a CANCELLED outcome."""
        if self.cancelled:
            return
        self.cancelled = True
        if self._current is not None:
            self._current.cancel()

    def elapsed(self):
        return 0.0 if self._started is None else self.clock.seconds() - self._started

    def _remaining(self):
        if self.wait_timeout is None:
            return None
        return self.wait_timeout - self.elapsed()

    @defer.inlineCallbacks
    def _track(self, d):
        """Wait for d, and let cancel() reach it."""
        self._current = d
        try:
            result = yield d
        finally:
            self._current = None
        return result

    @defer.inlineCallbacks
    def _sleep(self, seconds):
        yield self._track(task.deferLater(self.clock, seconds, lambda: None))

    @defer.inlineCallbacks
    def _retrying(self, what, call):
        """call() until it succeeds, a permanent error, cancel, or the deadline.

        Returns the result; raises APIError (permanent, or the last transient
        one when the deadline passed) or CancelledError.
        """
        self.backoff.reset()
        attempt = 0
        while True:
            if self.cancelled:
                raise defer.CancelledError()
            attempt += 1
            try:
                result = yield self._track(call())
                if attempt > 1:
                    self.log(f"{what}: the daemon answered again after {attempt - 1} failed attempts")
                return result
            except APIError as e:
                if self.cancelled:
                    raise defer.CancelledError()
                if not e.transient:
                    raise
                delay = self.backoff.step()
                remaining = self._remaining()
                if remaining is not None and remaining <= delay:
                    raise
                self.log(f"{what}: {e}; retrying in {human(delay)} (attempt {attempt})")
            except defer.CancelledError:
                raise
            yield self._sleep(delay)

    @defer.inlineCallbacks
    def run(self):
        self._started = self.clock.seconds()
        try:
            outcome = yield self._run()
        except defer.CancelledError:
            outcome = Outcome(CANCELLED, self.last, "cancelled while waiting for capacity")
        if self.cancelled and outcome.kind != CANCELLED:
            outcome = Outcome(CANCELLED, self.last, "cancelled while waiting for capacity")
        outcome.waited = self.elapsed()
        return outcome

    @defer.inlineCallbacks
    def _run(self):
        req = self.request
        want = f"system {req.get('system')}"
        if req.get("features"):
            want += f" with features {', '.join(req['features'])}"
        if req.get("pool"):
            want += f" in pool {req['pool']}"
        if req.get("source"):
            want += f" (source {req['source']})"
        self.log(f"reserving capacity for {want}: reservation {self.id}, lease {req.get('lease') or 'daemon default'}, "
                 f"daemon at {self.client.where}")
        while True:
            try:
                res = yield self._retrying("create reservation", lambda: self.client.create(self.request))
                break
            except APIError as e:
                if "source" in self.request and rejects_field(e, "source"):
                    # A daemon older than reservation sources refuses the
                    # field; the reservation works without it.
                    self.log("the daemon does not know reservation sources (an older daemon): "
                             "reserving without one")
                    self.request.pop("source")
                    continue
                return Outcome(ERROR, None, f"cannot create the reservation: {e}")
        self.created = self.last = res
        state = res.get("state")
        self.log(f"reservation {self.id} is {state} in pool {res.get('pool') or '?'}")
        if state in ("pending", "ready"):
            self.on_created(res)
        self.progress(res)
        announced = 0.0
        while state == "pending":
            remaining = self._remaining()
            if remaining is not None and remaining <= 0:
                return Outcome(TIMEOUT, res, f"still pending after {human(self.elapsed())} (wait_timeout); "
                                             f"no builder in pool {res.get('pool')} became ready")
            wait = self.poll if remaining is None else max(0.05, min(self.poll, remaining))
            try:
                res = yield self._retrying("wait for capacity", lambda: self.client.get(self.id, wait=wait))
            except APIError as e:
                if e.transient:
                    return Outcome(TIMEOUT, self.last, f"the daemon was unreachable until the wait deadline "
                                                       f"({human(self.elapsed())}): {e}")
                return Outcome(ERROR, self.last, f"cannot read the reservation: {e}")
            self.last = res
            state = res.get("state")
            self.progress(res)
            if state == "pending" and self.elapsed() - announced >= 60:
                announced = self.elapsed()
                self.log(f"still waiting after {human(self.elapsed())}: pool {res.get('pool')} has no free builder yet")
        if state == "ready":
            return Outcome(READY, res, f"ready after {human(self.elapsed())}: {describe(res)}")
        reason = res.get("reason") or "no reason given"
        if state == "failed":
            return Outcome(FAILED, res, f"the daemon failed the reservation: {reason}")
        if state == "expired":
            return Outcome(EXPIRED, res, f"the reservation's lease expired before it was ready: {reason}")
        if state == "released":
            return Outcome(RELEASED, res, f"the reservation was released before it was ready: {reason}")
        return Outcome(ERROR, res, f"the daemon answered an unknown state {state!r}")


class Heartbeat:
    """Renews a reservation's lease every interval seconds until stopped.

    should_stop: checked before each beat (e.g. "the build has finished");
    when true the loop ends without a request. A 404 or 409 (the
    reservation is gone or no longer live) ends the loop too; transient
    errors are logged and the next beat tries again.
    """

    def __init__(self, client, rid, interval, *, clock, should_stop=None, log=None):
        self.client = client
        self.id = rid
        self.interval = float(interval)
        self.clock = clock
        self.should_stop = should_stop or (lambda: False)
        self.log = log or (lambda line: twlog.msg(line))
        self.sent = 0
        self.failed = 0
        self.last_ok = None
        self.last_error = None
        self.stopped_because = None
        self._call = None
        self._inflight = None
        self.running = False

    def start(self):
        if self.running:
            return
        self.running = True
        self._schedule()

    def stop(self, why="stopped"):
        if not self.running:
            return
        self.running = False
        self.stopped_because = why
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._inflight is not None:
            self._inflight.cancel()

    def _schedule(self):
        if self.running:
            self._call = self.clock.callLater(self.interval, self._beat)

    def _beat(self):
        self._call = None
        if not self.running:
            return
        try:
            stop = self.should_stop()
        except Exception as e:  # a broken predicate must not keep a lease alive forever
            stop, e_ = True, e
            self.log(f"heartbeat {self.id}: stop check failed: {e_}")
        if stop:
            self.stop("the build has ended")
            return
        d = self._inflight = self.client.heartbeat(self.id)

        def ok(res):
            self.sent += 1
            self.last_ok = self.clock.seconds()
            if res.get("state") not in ("pending", "ready"):
                self.stop(f"reservation is {res.get('state')}")

        def bad(f):
            if f.check(defer.CancelledError):
                return
            self.failed += 1
            self.last_error = str(f.value)
            if f.check(APIError) and f.value.status in (404, 409):
                self.log(f"heartbeat {self.id}: {f.value}; stopping heartbeats")
                self.stop(str(f.value))
                return
            self.log(f"heartbeat {self.id}: {f.value}; trying again in {human(self.interval)}")

        def next_(_):
            self._inflight = None
            self._schedule()

        d.addCallbacks(ok, bad)
        d.addErrback(lambda f: self.log(f"heartbeat {self.id}: {f.value}"))
        d.addBoth(next_)


def heartbeat_interval(lease_seconds, heartbeat=None):
    """Beat three times per lease, at most once a minute, at least every 0.1 s."""
    if heartbeat is not None:
        return float(heartbeat)
    return max(0.1, min(60.0, lease_seconds / 3.0))
