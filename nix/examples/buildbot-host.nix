# nix/examples/buildbot-host.nix
# The Buildbot host (buildbot-nix), with the autoscaler on another host
# (nix/examples/haproxy-host.nix). Import buildbot-nix's master and worker
# modules and nix-builder-autoscaler.nixosModules.buildbot-nix-autoscaler.
{ ... }:
{
  services.tailscale.enable = true;

  services.buildbot-nix.master = {
    enable = true;
    domain = "buildbot.example.org";
    workersFile = "/run/secrets/buildbot-nix-workers.json";
    # ... the rest of your buildbot-nix configuration (GitHub/Gitea, admins)
  };
  services.buildbot-nix.worker = {
    enable = true;
    workerPasswordFile = "/run/secrets/buildbot-nix-worker-password";
  };

  services.buildbot-nix.nix-build-autoscaler = {
    enable = true;
    # The autoscaler host's TCP API (its settings.daemon.listen) and token.
    url = "http://100.64.0.1:8470";
    tokenFile = "/run/secrets/nix-builder-autoscaler-token";

    remoteBuilders = {
      # The key Nix logs in to the builders with (the builders' nix.sshServe.keys
      # has its public half); readable by root only.
      sshKey = "/etc/nix/builder_ed25519";
      # Builders have host certificates signed by this CA for the principal
      # "nix-builders" (or give their shared host key as hostKey instead).
      certAuthority = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleBuilderCAPublicKey000000000000000 nix-builders-ca";
      # The daemon's haproxy.hold: ssh's ConnectTimeout is set above it.
      hold = "4m";
      pools = [
        {
          name = "x86";
          # The autoscaler host's tailnet name (MagicDNS) and the pool's frontend port.
          host = "nix-autoscaler";
          port = 2222;
          systems = [
            "x86_64-linux"
            "i686-linux"
          ];
          supportedFeatures = [
            "big-parallel"
            "nixos-test"
            "benchmark"
          ];
          # max_builders × max_jobs of the pool.
          maxJobs = 32;
        }
      ];
    };
  };
}
