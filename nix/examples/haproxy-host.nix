# nix/examples/haproxy-host.nix
# The autoscaler host: the daemon and the HAProxy in front of the builders.
# Import nix-builder-autoscaler.nixosModules.nix-builder-autoscaler too.
# Builders join the tailnet; this host reaches them (and the Buildbot host
# reaches this one) over it. Secrets are files on this host, never in the
# Nix store (agenix, sops-nix or by hand).
{ ... }:
{
  services.tailscale.enable = true;

  services.nix-builder-autoscaler = {
    enable = true;
    haproxy.enable = true;
    # The Buildbot master is on another host: it uses the TCP API with this token.
    tokenFile = "/run/secrets/nix-builder-autoscaler-token";
    # Deletes terminated builders from the tailnet at once.
    tailscaleApiKeyFile = "/run/secrets/tailscale-api-key";
    # Not needed when this host runs on EC2 with an instance profile.
    awsCredentialsFile = "/run/secrets/nix-builder-autoscaler-aws";

    settings = {
      # This host's tailnet address.
      daemon.listen = "100.64.0.1:8470";
      # Builders take about 2 minutes to boot and join the tailnet.
      haproxy.hold = "4m";
      pool = [
        {
          name = "x86";
          systems = [
            "x86_64-linux"
            "i686-linux"
          ];
          features = [
            "big-parallel"
            "nixos-test"
            "benchmark"
          ];
          max_builders = 4;
          # The builders' nix max-jobs (nix/examples/builder-ami.nix).
          max_jobs = 8;
          idle_timeout = "10m";
          frontend = "0.0.0.0:2222";
          provider = "ec2";
          ec2 = {
            region = "eu-central-1";
            ami = "ami-0123456789abcdef0";
            instance_types = [
              "c7i.4xlarge"
              "c6i.4xlarge"
              "m7i.4xlarge"
            ];
            subnets = [
              "subnet-0123456789abcdef0"
              "subnet-0123456789abcdef1"
            ];
            security_groups = [ "sg-0123456789abcdef0" ];
            instance_profile = "nix-builder";
            root_volume_gb = 200;
            on_demand_fallback = true;
          };
        }
      ];
    };
  };

  # The frontend and the TCP API, on the tailnet only.
  networking.firewall.interfaces.tailscale0.allowedTCPPorts = [
    2222
    8470
  ];
}
