from nix_builder_autoscaler_buildbot import AutoscalerConfigurator
AutoscalerConfigurator(builder_suffix="/nix-build", lease="10m", socket="/run/nix-builder-autoscaler/daemon.sock", wait_timeout="2h")
