"""HTTP client of the daemon's reservation and forecast API (docs/design.md §3.1).

Plain Twisted: no Buildbot imports, so it can be tested on its own. Every
request has a timeout, every answer is classified as success, transient
(retry: 5xx, 408, 429, connection refused or lost, timeouts) or permanent (any
other 4xx), and a request in flight can be cancelled.
"""

import json
from urllib.parse import quote

import treq
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

DEFAULT_SOCKET = "/run/nix-builder-autoscaler/daemon.sock"
USER_AGENT = b"nix-builder-autoscaler-buildbot/0.1"
# Bodies from the daemon are small; anything larger is not the daemon.
MAX_BODY = 1 << 20


class APIError(Exception):
    """A request to the daemon did not succeed.

    transient: retrying may help (daemon restarting, overloaded, unreachable).
    status: the HTTP status, or None when no answer came.
    code: the daemon's error code ("not_found", "conflict", ...), if any.
    """

    def __init__(self, message, *, transient, status=None, code=None):
        super().__init__(message)
        self.message = message
        self.transient = transient
        self.status = status
        self.code = code

    def __str__(self):
        return self.message


class RequestTimeout(APIError):
    def __init__(self, message):
        super().__init__(message, transient=True)


_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


@implementer(IAgentEndpointFactory)
class _UnixEndpointFactory:
    """Every request goes to one unix socket, whatever the URL's host."""

    def __init__(self, reactor, path, connect_timeout):
        self._reactor = reactor
        self._path = path
        self._timeout = connect_timeout

    def endpointForURI(self, uri):  # noqa: N802 (Twisted's interface)
        return UNIXClientEndpoint(self._reactor, self._path, timeout=self._timeout)


try:
    from twisted.web.client import _HTTP11ClientFactory

    class _QuietFactory(_HTTP11ClientFactory):
        noisy = False

except ImportError:  # a Twisted without it: keep its default factory
    _QuietFactory = HTTPConnectionPool._factory


def _transport_errors():
    from twisted.web import client as wc

    return (
        ierror.ConnectError,  # refused, no such socket file, DNS, connect timeout
        ierror.ConnectionLost,
        ierror.ConnectionDone,
        ierror.TimeoutError,
        wc.ResponseNeverReceived,
        wc.RequestTransmissionFailed,
        wc.ResponseFailed,
        OSError,
    )


class DaemonClient:
    """Talks to the daemon over its unix socket or over TCP.

    socket: path of the daemon's unix socket (the default when url is None).
    url: "http://host:port" of the daemon's TCP API; needs token.
    token: the bearer token (a str) sent as "Authorization: Bearer <token>".
    request_timeout: seconds for one request (connect, send, answer, body);
        a long poll gets its wait on top.
    """

    def __init__(self, *, socket=None, url=None, token=None, request_timeout=10.0, reactor=None):
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.request_timeout = float(request_timeout)
        self.token = token
        # Fresh connection per request: heartbeats are minutes apart, and no
        # idle connection outlives a build (or a test).
        pool = HTTPConnectionPool(reactor, persistent=False)
        pool._factory = _QuietFactory  # no "Starting factory" line per request in twistd.log
        connect_timeout = max(1, int(round(self.request_timeout)))
        if url:
            self.base = url.rstrip("/")
            self.where = self.base
            agent = Agent(reactor, connectTimeout=connect_timeout, pool=pool)
        else:
            path = socket or DEFAULT_SOCKET
            self.base = "http://nix-builder-autoscaler"
            self.where = f"unix socket {path}"
            agent = Agent.usingEndpointFactory(reactor, _UnixEndpointFactory(reactor, path, connect_timeout), pool=pool)
        self._http = HTTPClient(agent)

    # The API.

    def create(self, body):
        """POST /v1/reservations; returns the reservation (dict)."""
        return self._call("POST", "/v1/reservations", body=body)

    def get(self, rid, wait=None):
        """GET /v1/reservations/{id}[?wait=Ns]: a long poll when wait is set."""
        path = "/v1/reservations/" + quote(rid, safe="")
        extra = 0.0
        if wait:
            path += f"?wait={int(wait * 1000)}ms"
            extra = float(wait)
        return self._call("GET", path, extra_timeout=extra)

    def heartbeat(self, rid):
        return self._call("POST", "/v1/reservations/" + quote(rid, safe="") + "/heartbeat")

    def release(self, rid):
        return self._call("DELETE", "/v1/reservations/" + quote(rid, safe=""))

    def health(self):
        return self._call("GET", "/healthz")

    def forecast(self, body):
        """POST /v1/forecasts; returns the forecast (dict). Idempotent by id."""
        return self._call("POST", "/v1/forecasts", body=body)

    def withdraw_forecast(self, fid):
        """DELETE /v1/forecasts/{id}; returns the withdrawn forecast."""
        return self._call("DELETE", "/v1/forecasts/" + quote(fid, safe=""))

    def forecasts(self):
        """GET /v1/forecasts: the newest page, {"forecasts": [...], "next": cursor if more}."""
        return self._call("GET", "/v1/forecasts")

    # Plumbing.

    def _call(self, method, path, body=None, extra_timeout=0.0):
        """One request with a deadline over all of it (connect to body)."""
        timeout = self.request_timeout + extra_timeout
        timed_out = []
        d = self._do(method, path, body)

        def on_timeout():
            timed_out.append(True)
            d.cancel()

        call = self.reactor.callLater(timeout, on_timeout)

        def done(result):
            if call.active():
                call.cancel()
            return result

        def failed(f):
            if timed_out:
                raise RequestTimeout(f"{method} {path}: no answer from the daemon ({self.where}) within {timeout:g}s")
            if f.check(defer.CancelledError, APIError):
                return f
            if f.check(*_transport_errors()):
                raise APIError(f"{method} {path}: cannot reach the daemon ({self.where}): {_describe(f)}", transient=True)
            return f

        d.addBoth(done)
        d.addErrback(failed)
        return d

    @defer.inlineCallbacks
    def _do(self, method, path, body):
        headers = {b"User-Agent": [USER_AGENT], b"Accept": [b"application/json"]}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers[b"Content-Type"] = [b"application/json"]
        if self.token:
            headers[b"Authorization"] = [b"Bearer " + self.token.encode()]
        resp = yield self._http.request(method, self.base + path, headers=headers, data=data, allow_redirects=False)
        raw = yield treq.content(resp)
        if len(raw) > MAX_BODY:
            raise APIError(f"{method} {path}: answer larger than {MAX_BODY} bytes; is {self.where} the daemon?", transient=False, status=resp.code)
        try:
            doc = json.loads(raw.decode("utf-8")) if raw else None
        except ValueError:
            doc = None
        if 200 <= resp.code < 300:
            if not isinstance(doc, dict):
                raise APIError(f"{method} {path}: answer {resp.code} is not a JSON object; is {self.where} the daemon?", transient=False, status=resp.code)
            return doc
        msg, code = None, None
        if isinstance(doc, dict):
            msg, code = doc.get("error"), doc.get("code")
        if not msg:
            msg = raw[:200].decode("utf-8", "replace").strip() or "no message"
        raise APIError(f"{method} {path}: {resp.code} {msg}", transient=resp.code in _TRANSIENT_STATUS, status=resp.code, code=code)


def _describe(f):
    v = f.value
    # ResponseNeverReceived and friends wrap a list of failures.
    reasons = getattr(v, "reasons", None)
    if reasons:
        return "; ".join(_describe(r) for r in reasons)
    text = str(v) or type(v).__name__
    return text


def read_token_file(path):
    """The bearer token in path, without surrounding whitespace."""
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token
