from nix_builder_autoscaler_buildbot import AutoscalerConfigurator
AutoscalerConfigurator(builder_suffix="/nix-build", forecast_systems=["x86_64-linux"], forecast_ttl="45m", lease="10m", token_secret="nix-builder-autoscaler-token", url="http://100.64.0.1:8470", wait_timeout="3h", features=["big-parallel"])
