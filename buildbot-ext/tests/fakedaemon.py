"""A Twisted web server that plays the daemon's reservation and forecast
API for tests.

It keeps reservations and forecasts in memory and can be told to answer
errors, hold long polls, delay answers, expire leases, and refuse the
"source" field as a daemon older than sources does, on a unix socket and/or
TCP.
"""

import json
import re
import time
from datetime import datetime, timezone

from twisted.internet import reactor
from twisted.web import resource, server

from nix_builder_autoscaler_buildbot.durations import parse_duration


def _now_iso():
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class FakeDaemon(resource.Resource):
    isLeaf = True

    def __init__(self, token=None):
        super().__init__()
        self.token = token
        self.reservations = {}
        self.log = []  # (monotonic time, method, path, body) for every request
        self.uris = []  # the request URIs, with query
        self.events = None  # a shared list to append ("daemon", method, path) to, if set
        self.ready_after = 0  # GETs of a reservation before it becomes ready
        self.fail_reason = None  # fail instead of becoming ready
        self.hold_pending = False  # a GET ?wait= of a pending reservation waits the whole wait
        self.create_delay = 0.0  # seconds before POST answers
        self.errors = {"create": [], "get": [], "heartbeat": [], "release": [],
                       "forecast": [], "withdraw": [], "forecasts": []}  # statuses to answer first
        self.always = {}  # route -> status answered every time
        self.disconnected = []  # (route, id) of requests whose client went away before the answer
        self.in_flight = []  # (route, id) of requests being held right now
        self.default_lease = "10m"
        self.ports = []
        self.forecasts = {}
        self.forecast_estimate = 3  # the builds a forecast without "builds" gets
        self.forecast_delay = 0.0  # seconds before POST /v1/forecasts answers
        self.pools = {"x86_64-linux": "x86", "aarch64-linux": "arm"}  # system -> pool (forecasts)
        self.knows_source = True  # False: refuse "source" like a daemon older than sources
        self.forecast_api = True  # False: /v1/forecasts answers like a daemon without it

    # Listening.

    def listen_unix(self, path):
        port = reactor.listenUNIX(path, server.Site(self))
        self.ports.append(port)
        return port

    def listen_tcp(self, port=0):
        p = reactor.listenTCP(port, server.Site(self), interface="127.0.0.1")
        self.ports.append(p)
        return p.getHost().port

    def stop(self):
        ds = [p.stopListening() for p in self.ports]
        self.ports = []
        from twisted.internet import defer

        return defer.gatherResults([d for d in ds if d is not None])

    # State.

    def count(self, method, route_prefix=""):
        return sum(1 for _, m, p, _ in self.log if m == method and p.startswith(route_prefix))

    def current(self, rid):
        res = self.reservations.get(rid)
        if res is not None:
            self._expire(res)
        return res

    def _expire(self, res):
        if res["state"] in ("pending", "ready") and time.monotonic() > res["_expires"]:
            res["state"] = "expired"
            res["reason"] = "lease expired"
            res["slot"] = ""

    def _view(self, res):
        return {k: v for k, v in res.items() if not k.startswith("_")}

    # HTTP.

    def render(self, request):
        method = request.method.decode()
        path = request.path.decode()
        body = request.content.read() if request.content else b""
        self.log.append((time.monotonic(), method, path, body))
        self.uris.append(request.uri.decode())
        if self.events is not None:
            self.events.append(("daemon", method, path))
        if self.token is not None:
            got = request.getHeader("authorization")
            if got != "Bearer " + self.token:
                return self._error(request, 401, "unauthorized", "missing or wrong bearer token")
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["v1", "forecasts"] and not self.forecast_api:
            return self._error(request, 404, "not_found", f"no endpoint {method} {path}; see docs/design.md §3.1")
        route, rid = self._route(method, parts)
        if route is None:
            return self._error(request, 404, "not_found", "no endpoint")
        if route in self.always:
            return self._error(request, self.always[route], "internal", f"injected {route} error")
        if self.errors[route]:
            status = self.errors[route].pop(0)
            return self._error(request, status, "unavailable", f"injected {route} error")
        return getattr(self, "_" + route)(request, rid, body)

    @staticmethod
    def _route(method, parts):
        if parts[:2] == ["v1", "reservations"]:
            if method == "POST" and len(parts) == 2:
                return "create", None
            if method == "GET" and len(parts) == 3:
                return "get", parts[2]
            if method == "POST" and len(parts) == 4 and parts[3] == "heartbeat":
                return "heartbeat", parts[2]
            if method == "DELETE" and len(parts) == 3:
                return "release", parts[2]
        if parts[:2] == ["v1", "forecasts"]:
            if method == "POST" and len(parts) == 2:
                return "forecast", None
            if method == "GET" and len(parts) == 2:
                return "forecasts", None
            if method == "DELETE" and len(parts) == 3:
                return "withdraw", parts[2]
        return None, None

    def _json(self, request, status, doc):
        request.setResponseCode(status)
        request.setHeader("content-type", "application/json")
        return json.dumps(doc).encode()

    def _error(self, request, status, code, msg):
        return self._json(request, status, {"error": msg, "code": code})

    def _hold(self, request, route, rid, delay, answer):
        """Answer after delay seconds, unless the client goes away first."""
        key = (route, rid)
        self.in_flight.append(key)
        done = []

        def finish():
            if key in self.in_flight:
                self.in_flight.remove(key)
            if done:
                return
            done.append(True)
            request.write(answer())
            request.finish()

        call = reactor.callLater(delay, finish)

        def gone(_):
            if not done:
                done.append(True)
                self.disconnected.append(key)
                if key in self.in_flight:
                    self.in_flight.remove(key)
                if call.active():
                    call.cancel()

        request.notifyFinish().addErrback(gone)
        return server.NOT_DONE_YET

    def _create(self, request, _rid, body):
        try:
            req = json.loads(body)
        except ValueError:
            return self._error(request, 400, "bad_request", "invalid JSON body")
        if not req.get("system"):
            return self._error(request, 400, "bad_request", "system: required")
        if "source" in req:
            if not self.knows_source:
                return self._error(request, 400, "bad_request", 'invalid JSON body: json: unknown field "source"')
            if len(req["source"].encode()) > 256 or not req["source"].isprintable():
                return self._error(request, 400, "bad_request", "source: at most 256 bytes of printable text")
        rid = req.get("id") or f"r-{len(self.reservations) + 1}"
        status = 200
        res = self.reservations.get(rid)
        if res is None:
            status = 201
            lease = req.get("lease") or self.default_lease
            res = {
                "id": rid, "pool": req.get("pool") or "x86", "system": req["system"],
                "features": req.get("features") or [], "owner": req.get("owner", ""), "source": req.get("source", ""),
                "state": "pending", "lease": lease, "created_at": _now_iso(), "wait_seconds": 0.0,
                "_lease": parse_duration(lease), "_polls": 0, "_created": time.monotonic(),
                "_heartbeats": 0,
            }
            res["_expires"] = time.monotonic() + res["_lease"]
            self.reservations[rid] = res
            for fc in self.forecasts.values():
                if fc["source"] == res["source"] and fc["pool"] == res["pool"] and time.monotonic() < fc["_until"]:
                    fc["arrived"] += 1
        self._expire(res)
        if self.create_delay:
            return self._hold(request, "create", rid, self.create_delay,
                              lambda: json.dumps(self._view(res)).encode())
        return self._json(request, status, self._view(res))

    def _advance(self, res):
        res["_polls"] += 1
        if res["state"] == "pending" and res["_polls"] >= self.ready_after and not self.hold_pending:
            if self.fail_reason:
                res["state"], res["reason"] = "failed", self.fail_reason
            else:
                res.update(state="ready", slot="slot1", instance_id="i-fake1", address="127.0.0.9:2222",
                           assigned_at=_now_iso(), wait_seconds=round(time.monotonic() - res["_created"], 3))

    def _get(self, request, rid, _body):
        res = self.current(rid)
        if res is None:
            return self._error(request, 404, "not_found", f"no reservation {rid!r}")
        self._advance(res)
        wait = request.args.get(b"wait", [b""])[0].decode()
        if res["state"] == "pending" and wait and self.hold_pending:
            return self._hold(request, "get", rid, parse_duration(wait),
                              lambda: json.dumps(self._view(self.current(rid))).encode())
        return self._json(request, 200, self._view(res))

    def _heartbeat(self, request, rid, _body):
        res = self.current(rid)
        if res is None:
            return self._error(request, 404, "not_found", f"no reservation {rid!r}")
        if res["state"] not in ("pending", "ready"):
            return self._error(request, 409, "conflict", f"reservation {rid} is {res['state']}; create a new one")
        res["_heartbeats"] += 1
        res["_expires"] = time.monotonic() + res["_lease"]
        return self._json(request, 200, self._view(res))

    def _release(self, request, rid, _body):
        res = self.current(rid)
        if res is None:
            res = {"id": rid, "state": "released", "reason": "released before it was created",
                   "_expires": 0, "_lease": 0, "_polls": 0, "_created": time.monotonic(), "_heartbeats": 0}
            self.reservations[rid] = res
        elif res["state"] in ("pending", "ready"):
            res["state"] = "released"
            res["slot"] = ""
        return self._json(request, 200, self._view(res))

    # Forecasts (the daemon's contract, minus the scaling).

    _FORECAST_ID = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}$")

    def _forecast(self, request, _rid, body):
        try:
            req = json.loads(body)
        except ValueError:
            return self._error(request, 400, "bad_request", "invalid JSON body")
        unknown = set(req) - {"id", "source", "system", "features", "pool", "builds", "ttl"}
        if unknown:
            return self._error(request, 400, "bad_request", f'invalid JSON body: json: unknown field "{sorted(unknown)[0]}"')
        if not isinstance(req.get("id"), str) or not self._FORECAST_ID.match(req["id"]):
            return self._error(request, 400, "bad_request", "id: 1 to 128 characters of [A-Za-z0-9._:@/-]")
        source = req.get("source")
        if not isinstance(source, str) or not source or len(source.encode()) > 256 or not source.isprintable():
            return self._error(request, 400, "bad_request", "source: required, at most 256 bytes of printable text")
        ttl = parse_duration(req.get("ttl") or "30m")
        if ttl <= 0 or ttl > 6 * 3600:
            return self._error(request, 400, "bad_request", "ttl: more than 0 and at most 6h")
        if "builds" in req and not (isinstance(req["builds"], int) and 0 <= req["builds"] <= 10000):
            return self._error(request, 400, "bad_request", "builds: 0 to 10000")
        fc = self.forecasts.get(req["id"])
        status = 200
        if fc is None:
            pool = req.get("pool") or self.pools.get(req.get("system") or "x86_64-linux")
            if not pool:
                return self._error(request, 404, "not_found", f"no pool serves system {req.get('system')}")
            status = 201
            estimated = "builds" not in req
            fc = {
                "id": req["id"], "source": source, "pool": pool, "system": req.get("system", ""),
                "features": req.get("features") or [], "builds": self.forecast_estimate if estimated else req["builds"],
                "estimated": estimated, "arrived": 0, "state": "open", "created_at": _now_iso(),
                "expires_at": _now_iso(), "ttl": req.get("ttl") or "30m", "_until": time.monotonic() + ttl,
            }
            self.forecasts[req["id"]] = fc
        if self.forecast_delay:
            return self._hold(request, "forecast", req["id"], self.forecast_delay,
                              lambda: json.dumps(self._view(fc)).encode())
        return self._json(request, status, self._view(fc))

    def _withdraw(self, request, fid, _body):
        fc = self.forecasts.get(fid)
        if fc is None:
            return self._error(request, 404, "not_found", f"no forecast {fid!r}")
        if fc["state"] == "open":
            fc["state"] = "withdrawn"
        return self._json(request, 200, self._view(fc))

    def _forecasts(self, request, _rid, _body):
        return self._json(request, 200, {"forecasts": [self._view(f) for f in self.forecasts.values()]})
