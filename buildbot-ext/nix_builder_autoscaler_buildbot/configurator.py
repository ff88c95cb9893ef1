"""AutoscalerConfigurator: gate every <project>/nix-build builder, and
forecast demand from every <project>/nix-eval builder.

List it in c['configurators'] after buildbot-nix's NixConfigurator (Buildbot
runs configurators in order, and NixConfigurator is the one that adds the
builders). It edits the factories in place; it does not touch buildbot-nix's
code.
"""

import copy

from buildbot.config import error as config_error
from buildbot.configurators import ConfiguratorBase
from buildbot.process import buildstep
from twisted.python import log as twlog

from .forecast import ForecastDemand, WithdrawForecast
from .steps import CapacityGate, ReleaseCapacity

_DAEMON_KEYS = ("socket", "url", "token", "token_file", "request_timeout")

# The systems forecast when neither forecast_systems, buildbot-nix's
# build_systems nor default_system says otherwise.
FALLBACK_FORECAST_SYSTEMS = ("x86_64-linux",)


def step_class(item):
    """The BuildStep class of an entry of BuildFactory.steps.

    Buildbot 3.7 and 4.x keep _BuildStepFactory objects there (the class is
    .factory); a step instance appended by hand is accepted too.
    """
    if isinstance(item, buildstep.BuildStep):
        return type(item)
    cls = getattr(item, "factory", None)
    if isinstance(cls, type):
        return cls
    get = getattr(item, "get_step_factory", None)
    if get is not None:
        return getattr(get(), "factory", None)
    return None


def _is(item, cls):
    c = step_class(item)
    return isinstance(c, type) and issubclass(c, cls)


def buildbot_nix_systems(config_dict):
    """The build_systems of a buildbot-nix NixConfigurator in config_dict's
    configurators (its BuildbotNixConfig, kept as .config), or None."""
    for conf in config_dict.get("configurators") or ():
        systems = getattr(getattr(conf, "config", None), "build_systems", None)
        if isinstance(systems, (list, tuple)) and systems and all(isinstance(x, str) and x for x in systems):
            return list(systems)
    return None


class AutoscalerConfigurator(ConfiguratorBase):
    """Adds CapacityGate first and ReleaseCapacity last to each selected
    nix-build builder, and ForecastDemand first and WithdrawForecast last to
    each selected nix-eval builder.

    Connection (one of):
      socket: the daemon's unix socket (default /run/nix-builder-autoscaler/daemon.sock)
      url: the daemon's TCP API, e.g. "http://100.64.0.1:8470", with a bearer
           token from token_file (a path), token_secret (the name of a
           Buildbot secret) or token (a string or renderable)
    Reservation:
      lease ("10m"): the lease asked for; a heartbeat renews it 3 times per lease
      wait_timeout ("2h"): fail the build when no capacity came by then
      poll ("30s"): one long poll (the daemon caps it at its max_poll)
      request_timeout ("10s"): one request
      pool: force a pool (default: the daemon picks by system and features)
      features: required features added to every reservation (list or renderable)
      features_from_drv (True): add the requiredSystemFeatures of the build's
          .drv (property drv_path) when the master can read it
      default_system: the system when a build has no "system" property
      skip_cached (True): skip the gate when buildbot-nix says the outputs
          are cached (cacheStatus "cached"/"local", or isCached)
      source: the demand source of every reservation and forecast (default:
          the build's "project" property, else the builder name without
          its last "/part")
    Selection:
      builder_suffix ("/nix-build"), or builders: a predicate name -> bool
    Forecasts (on the nix-eval builders):
      forecasts (True): False adds no forecast steps
      forecast_systems: the systems to forecast, one forecast each (default:
          buildbot-nix's build_systems, else [default_system], else
          ["x86_64-linux"]); with pool set, one forecast for that pool
      forecast_ttl ("30m"): how long a forecast counts at most (max 6h);
          keep it above the evaluation's length
      forecast_timeout ("5s"): the limit of each forecast request
      eval_suffix ("/nix-eval"), or eval_builders: a predicate name -> bool
    """

    def __init__(self, *, socket=None, url=None, token=None, token_file=None, token_secret=None,
                 lease="10m", wait_timeout="2h", poll="30s", request_timeout="10s", heartbeat=None,
                 pool=None, features=None, features_from_drv=True, default_system=None,
                 skip_cached=True, builder_suffix="/nix-build", builders=None,
                 retry_initial="1s", retry_max="30s", source=None,
                 forecasts=True, forecast_systems=None, forecast_ttl="30m", forecast_timeout="5s",
                 eval_suffix="/nix-eval", eval_builders=None):
        super().__init__()
        if token_secret is not None:
            if token is not None or token_file is not None:
                config_error("nix-builder-autoscaler: set only one of token, token_file, token_secret")
            from buildbot.process.properties import Secret

            token = Secret(token_secret)
        self.gate_kwargs = dict(
            socket=socket, url=url, token=token, token_file=token_file, request_timeout=request_timeout,
            lease=lease, wait_timeout=wait_timeout, poll=poll, heartbeat=heartbeat, pool=pool,
            features=features, features_from_drv=features_from_drv, default_system=default_system,
            skip_cached=skip_cached, retry_initial=retry_initial, retry_max=retry_max, source=source)
        self.release_kwargs = {k: self.gate_kwargs[k] for k in _DAEMON_KEYS}
        self.forecasts = bool(forecasts)
        if forecast_systems is not None and isinstance(forecast_systems, str):
            forecast_systems = forecast_systems.split()
        self.forecast_systems = forecast_systems
        self.forecast_kwargs = dict({k: self.gate_kwargs[k] for k in _DAEMON_KEYS},
                                    request_timeout=forecast_timeout, features=features, pool=pool,
                                    ttl=forecast_ttl, source=source)
        self.withdraw_kwargs = dict(self.release_kwargs, request_timeout=forecast_timeout)
        self.default_system = default_system
        # Validate now, while the config is being loaded, so mistakes are
        # reported as config errors with the key's name.
        CapacityGate(**self.gate_kwargs)
        ReleaseCapacity(**self.release_kwargs)
        if self.forecasts:
            ForecastDemand(systems=list(forecast_systems or FALLBACK_FORECAST_SYSTEMS), **self.forecast_kwargs)
            WithdrawForecast(**self.withdraw_kwargs)
        self.builder_suffix = builder_suffix
        self.select = builders or (lambda name: name.endswith(builder_suffix))
        self.eval_suffix = eval_suffix
        self.select_eval = eval_builders or (lambda name: name.endswith(eval_suffix))
        self.patched = []  # names of the nix-build builders patched by the last configure()
        self.patched_evals = []  # names of the nix-eval builders patched by the last configure()
        self.systems_used = None  # the forecast systems of the last configure(), and where they came from

    def configure(self, config_dict):
        super().configure(config_dict)
        builders = config_dict["builders"]
        self.patched = self._patch(builders, self.select, self.patch_factory)
        if not any(self.select(_name(b)) for b in builders):
            twlog.msg("nix-builder-autoscaler: no builder matched (names ending in "
                      f"{self.builder_suffix!r}); list AutoscalerConfigurator after NixConfigurator")
        self.patched_evals = []
        if self.forecasts:
            systems, where = self._forecast_systems(config_dict)
            self.systems_used = (systems, where)
            self.patched_evals = self._patch(builders, lambda n: self.select_eval(n) and not self.select(n),
                                             lambda f: self.patch_eval_factory(f, systems))
            if self.patched_evals:
                twlog.msg(f"nix-builder-autoscaler: forecasts for {', '.join(systems)} ({where}) "
                          f"from {len(self.patched_evals)} evaluation builders")

    def _forecast_systems(self, config_dict):
        if self.forecast_systems is not None:
            return list(self.forecast_systems), "forecast_systems"
        found = buildbot_nix_systems(config_dict)
        if found:
            return found, "buildbot-nix's build_systems"
        if self.default_system:
            return [self.default_system], "default_system"
        return list(FALLBACK_FORECAST_SYSTEMS), "the default"

    def _patch(self, builders, select, patch):
        """patch(factory) on each selected builder; returns the names changed."""
        chosen, others = [], []
        for b in builders:
            (chosen if select(_name(b)) else others).append(b)
        # A factory shared with a builder we do not select is copied first,
        # so the other builder stays untouched.
        foreign = {id(_factory(b)) for b in others}
        changed = []
        for b in chosen:
            factory = _factory(b)
            if factory is None or not isinstance(getattr(factory, "steps", None), list):
                config_error(f"nix-builder-autoscaler: builder {_name(b)} has no BuildFactory with a steps list")
                continue
            if id(factory) in foreign:
                factory = copy.copy(factory)
                factory.steps = list(factory.steps)
                _set_factory(b, factory)
            if patch(factory):
                changed.append(_name(b))
        return changed

    def patch_eval_factory(self, factory, systems):
        """Insert the forecast first and its withdrawal last; False when both are there already."""
        steps = factory.steps
        changed = False
        if not any(_is(s, ForecastDemand) for s in steps):
            steps.insert(0, buildstep.get_factory_from_step_or_factory(
                ForecastDemand(systems=list(systems), **self.forecast_kwargs)))
            changed = True
        if not any(_is(s, WithdrawForecast) for s in steps):
            steps.append(buildstep.get_factory_from_step_or_factory(WithdrawForecast(**self.withdraw_kwargs)))
            changed = True
        return changed

    def patch_factory(self, factory):
        """Insert the gate first and the release last; False when both are there already."""
        steps = factory.steps
        changed = False
        if not any(_is(s, CapacityGate) for s in steps):
            steps.insert(0, buildstep.get_factory_from_step_or_factory(CapacityGate(**self.gate_kwargs)))
            changed = True
        if not any(_is(s, ReleaseCapacity) for s in steps):
            steps.append(buildstep.get_factory_from_step_or_factory(ReleaseCapacity(**self.release_kwargs)))
            changed = True
        return changed


def _name(b):
    return b["name"] if isinstance(b, dict) else b.name


def _factory(b):
    return b.get("factory") if isinstance(b, dict) else getattr(b, "factory", None)


def _set_factory(b, factory):
    if isinstance(b, dict):
        b["factory"] = factory
    else:
        b.factory = factory
