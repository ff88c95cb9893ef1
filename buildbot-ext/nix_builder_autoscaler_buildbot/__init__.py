"""Buildbot side of nix-builder-autoscaler: wait for builder capacity before
each buildbot-nix nix-build, and give it back afterwards; tell the daemon as
each evaluation starts that builds are coming.

    from nix_builder_autoscaler_buildbot import AutoscalerConfigurator
    c["configurators"].append(AutoscalerConfigurator())  # after NixConfigurator

See README.md in buildbot-ext/.
"""

from .client import DEFAULT_SOCKET, APIError, DaemonClient
from .configurator import AutoscalerConfigurator
from .forecast import ForecastDemand, WithdrawForecast
from .steps import PROPERTY_FORECASTS, PROPERTY_ID, CapacityGate, ReleaseCapacity

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SOCKET",
    "PROPERTY_FORECASTS",
    "PROPERTY_ID",
    "APIError",
    "AutoscalerConfigurator",
    "CapacityGate",
    "DaemonClient",
    "ForecastDemand",
    "ReleaseCapacity",
    "WithdrawForecast",
]
