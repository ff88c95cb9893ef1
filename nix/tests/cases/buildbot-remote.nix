# The Buildbot host talks to a daemon on another host over the tailnet.
{
  services.buildbot-master.enable = true;
  services.buildbot-nix.nix-build-autoscaler = {
    enable = true;
    url = "http://100.64.0.1:8470";
    tokenFile = "/run/secrets/nix-builder-autoscaler-token";
    waitTimeout = "3h";
    forecasts = {
      systems = [ "x86_64-linux" ];
      ttl = "45m";
    };
    extraArguments.features = ''["big-parallel"]'';
    remoteBuilders = {
      sshKey = "/etc/nix/builder_ed25519";
      hostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAISharedHostKeyForTestsOnly000000000000000";
      hold = "4m";
      pools = [
        {
          name = "x86";
          host = "nix-haproxy";
          port = 2222;
          systems = [
            "x86_64-linux"
            "i686-linux"
          ];
          supportedFeatures = [
            "big-parallel"
            "kvm"
            "nixos-test"
          ];
          maxJobs = 24;
        }
      ];
    };
  };
}
