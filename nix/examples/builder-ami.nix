# nix/examples/builder-ami.nix
# An EC2 builder image for a pool with discovery = "tailscale". At boot it
# fetches its secrets from SSM Parameter Store with its instance profile
# (the shared SSH host key, optionally its host certificate, and an
# ephemeral, pre-approved, tagged Tailscale auth key), names itself
# nix-builder-<instance id>, joins the tailnet under that name (what the
# daemon's tailscale.hostname looks for), and serves Nix over SSH to the
# Buildbot host's key as the trusted user nix-ssh.
#
# Build the AMI with nixpkgs' Amazon image support, for example
#   nixos-rebuild build-image --image-variant amazon --flake .#nix-builder
# and register it (docs/ec2.md, "The builder image").
{
  lib,
  pkgs,
  modulesPath,
  ...
}:
let
  # The public half of the Buildbot host's remoteBuilders.sshKey.
  buildbotHostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleBuildbotHostKey00000000000000000000 root@buildbot";
  # SSM parameters (SecureString) the instance profile may read.
  ssm = {
    tailscaleAuthKey = "/nix-builders/tailscale-authkey";
    hostKey = "/nix-builders/ssh_host_ed25519_key";
    # "" without host certificates (shared host key only).
    hostCertificate = "/nix-builders/ssh_host_ed25519_key-cert.pub";
  };
  # The pool's max_jobs; HAProxy sends each builder at most this many builds.
  maxJobs = 8;
  # Only for nested_virtualization pools (c8i/m8i/r8i): add "kvm".
  systemFeatures = [
    "nixos-test"
    "big-parallel"
    "benchmark"
  ];

  imds = ''
    token=$(curl -sf --retry 10 --retry-connrefused -X PUT \
      -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' \
      http://169.254.169.254/latest/api/token)
    imds() { curl -sf --retry 10 --retry-connrefused -H "X-aws-ec2-metadata-token: $token" "http://169.254.169.254/latest/meta-data/$1"; }
  '';
in
{
  imports = [ "${modulesPath}/virtualisation/amazon-image.nix" ];

  system.stateVersion = "25.11";

  # The host name is set at boot, from the instance id.
  networking.hostName = "";

  services.openssh = {
    enable = true;
    # Reached over the tailnet only (below).
    openFirewall = false;
    hostKeys = [
      {
        path = "/etc/ssh/ssh_host_ed25519_key";
        type = "ed25519";
      }
    ];
    settings = {
      PasswordAuthentication = false;
      KbdInteractiveAuthentication = false;
      # HAProxy's health checks connect every second without logging in;
      # OpenSSH >= 9.8 would otherwise refuse HAProxy's address as a penalty.
      PerSourcePenaltyExemptList = "100.64.0.0/10";
    };
    extraConfig = lib.optionalString (ssm.hostCertificate != "") ''
      HostCertificate /etc/ssh/ssh_host_ed25519_key-cert.pub
    '';
  };
  networking.firewall.interfaces.tailscale0.allowedTCPPorts = [ 22 ];

  # Nix over SSH for the Buildbot host's nix-daemon (ssh-ng, trusted user).
  nix.sshServe = {
    enable = true;
    protocol = "ssh-ng";
    write = true;
    keys = [ buildbotHostKey ];
  };
  nix.settings = {
    max-jobs = maxJobs;
    cores = 0;
    system-features = systemFeatures;
    # Builders are short-lived; keep the disk from filling up during a long day.
    min-free = 10 * 1024 * 1024 * 1024;
    max-free = 50 * 1024 * 1024 * 1024;
  };

  services.tailscale.enable = true;

  # Secrets from SSM, before sshd and the tailnet join.
  systemd.services.nix-builder-secrets = {
    description = "Fetch the builder's secrets from SSM Parameter Store";
    wantedBy = [ "multi-user.target" ];
    before = [
      "sshd.service"
      "nix-builder-join.service"
    ];
    requiredBy = [ "sshd.service" ];
    after = [ "network-online.target" ];
    wants = [ "network-online.target" ];
    path = [
      pkgs.awscli2
      pkgs.curl
      pkgs.openssh
    ];
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
    };
    script = ''
      set -eu
      ${imds}
      export AWS_DEFAULT_REGION=$(imds placement/region)
      get() { aws ssm get-parameter --with-decryption --name "$1" --query Parameter.Value --output text; }
      umask 077
      mkdir -p /run/keys
      get ${lib.escapeShellArg ssm.tailscaleAuthKey} > /run/keys/tailscale-authkey
      get ${lib.escapeShellArg ssm.hostKey} > /etc/ssh/ssh_host_ed25519_key
      ssh-keygen -y -f /etc/ssh/ssh_host_ed25519_key > /etc/ssh/ssh_host_ed25519_key.pub
      ${lib.optionalString (ssm.hostCertificate != "") ''
        get ${lib.escapeShellArg ssm.hostCertificate} > /etc/ssh/ssh_host_ed25519_key-cert.pub
      ''}
      chmod 644 /etc/ssh/ssh_host_ed25519_key.pub
    '';
  };

  # Take the name nix-builder-<instance id>, and join the tailnet under it with
  # the ephemeral auth key. Never `tailscale up --ssh`: it would take port 22
  # on the tailnet address away from sshd.
  systemd.services.nix-builder-join = {
    description = "Join the tailnet as nix-builder-<instance id>";
    wantedBy = [ "multi-user.target" ];
    after = [
      "tailscaled.service"
      "network-online.target"
      "nix-builder-secrets.service"
    ];
    wants = [
      "tailscaled.service"
      "network-online.target"
    ];
    requires = [ "nix-builder-secrets.service" ];
    path = [
      pkgs.curl
      pkgs.tailscale
    ];
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
    };
    script = ''
      set -eu
      ${imds}
      name="nix-builder-$(imds instance-id)"
      echo "$name" > /proc/sys/kernel/hostname
      tailscale up --auth-key=file:/run/keys/tailscale-authkey --hostname="$name"
    '';
  };
}
