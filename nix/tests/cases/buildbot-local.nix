# The Buildbot host runs the daemon and HAProxy too: the pools, the socket
# and the hold come from services.nix-builder-autoscaler.
{
  imports = [ ./two-pools.nix ];
  services.buildbot-master.enable = true;
  services.buildbot-nix.nix-build-autoscaler = {
    enable = true;
    remoteBuilders = {
      sshKey = "/etc/nix/builder_ed25519";
      certAuthority = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBuilderCAKeyForTestsOnly0000000000000000 nix-builders-ca";
    };
  };
}
