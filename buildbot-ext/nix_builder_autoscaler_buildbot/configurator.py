"""AutoscalerConfigurator: gate every <project>/nix-build builder.

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

from .steps import CapacityGate, ReleaseCapacity

_DAEMON_KEYS = ("socket", "url", "token", "token_file", "request_timeout")


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


class AutoscalerConfigurator(ConfiguratorBase):
    """Adds CapacityGate first and ReleaseCapacity last to each selected builder.

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
    Selection:
      builder_suffix ("/nix-build"), or builders: a predicate name -> bool
    """

    def __init__(self, *, socket=None, url=None, token=None, token_file=None, token_secret=None,
                 lease="10m", wait_timeout="2h", poll="30s", request_timeout="10s", heartbeat=None,
                 pool=None, features=None, features_from_drv=True, default_system=None,
                 skip_cached=True, builder_suffix="/nix-build", builders=None,
                 retry_initial="1s", retry_max="30s"):
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
            skip_cached=skip_cached, retry_initial=retry_initial, retry_max=retry_max)
        self.release_kwargs = {k: self.gate_kwargs[k] for k in _DAEMON_KEYS}
        # Validate now, while the config is being loaded, so mistakes are
        # reported as config errors with the key's name.
        CapacityGate(**self.gate_kwargs)
        ReleaseCapacity(**self.release_kwargs)
        self.builder_suffix = builder_suffix
        self.select = builders or (lambda name: name.endswith(builder_suffix))
        self.patched = []  # names of the builders patched by the last configure()

    def configure(self, config_dict):
        super().configure(config_dict)
        builders = config_dict["builders"]
        chosen, others = [], []
        for b in builders:
            (chosen if self.select(_name(b)) else others).append(b)
        # A factory shared with a builder we do not gate is copied first, so
        # the other builder stays untouched.
        foreign = {id(_factory(b)) for b in others}
        self.patched = []
        for b in chosen:
            factory = _factory(b)
            if factory is None or not isinstance(getattr(factory, "steps", None), list):
                config_error(f"nix-builder-autoscaler: builder {_name(b)} has no BuildFactory with a steps list")
                continue
            if id(factory) in foreign:
                factory = copy.copy(factory)
                factory.steps = list(factory.steps)
                _set_factory(b, factory)
            if self.patch_factory(factory):
                self.patched.append(_name(b))
        if not chosen:
            twlog.msg("nix-builder-autoscaler: no builder matched (names ending in "
                      f"{self.builder_suffix!r}); list AutoscalerConfigurator after NixConfigurator")

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
