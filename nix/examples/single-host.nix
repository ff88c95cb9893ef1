# nix/examples/single-host.nix
# Buildbot, the daemon and HAProxy on one host. The Buildbot master uses the
# daemon's unix socket (no token), and the remote builders, the socket and
# ssh's ConnectTimeout come from the daemon's own settings. Import buildbot-nix
# and nix-builder-autoscaler.nixosModules.buildbot-nix-autoscaler.
{ lib, ... }:
{
  imports = [ ./haproxy-host.nix ];

  # No TCP API: the master is on this host.
  services.nix-builder-autoscaler.tokenFile = lib.mkForce null;
  services.nix-builder-autoscaler.settings.daemon.listen = lib.mkForce "";

  services.buildbot-nix.master = {
    enable = true;
    domain = "buildbot.example.org";
    workersFile = "/run/secrets/buildbot-nix-workers.json";
    # ... the rest of your buildbot-nix configuration
  };
  services.buildbot-nix.worker = {
    enable = true;
    workerPasswordFile = "/run/secrets/buildbot-nix-worker-password";
  };

  services.buildbot-nix.nix-build-autoscaler = {
    enable = true;
    remoteBuilders = {
      sshKey = "/etc/nix/builder_ed25519";
      certAuthority = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleBuilderCAPublicKey000000000000000 nix-builders-ca";
    };
  };
}
