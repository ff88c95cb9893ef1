# Two pools behind HAProxy: EC2 Spot builders found on the tailnet, and a
# local pool whose builders come from operator commands; the TCP API for a
# Buildbot master on another host.
{
  services.nix-builder-autoscaler = {
    enable = true;
    haproxy = {
      enable = true;
      openFirewall = true;
    };
    tokenFile = "/run/secrets/nix-builder-autoscaler-token";
    tailscaleApiKeyFile = "/run/secrets/tailscale-api-key";
    awsCredentialsFile = "/run/secrets/nix-builder-autoscaler-aws";
    settings = {
      daemon = {
        listen = "100.64.0.1:8470";
        log_format = "json";
      };
      reservations.lease = "15m";
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
            "kvm"
            "nixos-test"
          ];
          max_builders = 6;
          warm_pool = 1;
          max_jobs = 4;
          idle_timeout = "10m";
          frontend = "0.0.0.0:2222";
          provider = "ec2";
          ec2 = {
            region = "eu-central-1";
            ami = "ami-0123456789abcdef0";
            instance_types = [
              "c8i.2xlarge"
              "m8i.2xlarge"
            ];
            subnets = [
              "subnet-0123456789abcdef0"
              "subnet-0123456789abcdef1"
            ];
            security_groups = [ "sg-0123456789abcdef0" ];
            root_volume_gb = 100;
            nested_virtualization = true;
          };
        }
        {
          name = "vms";
          systems = [ "x86_64-linux" ];
          max_builders = 2;
          frontend = "0.0.0.0:2223";
          provider = "local";
          local = {
            launch_command = "/usr/local/bin/start-vm {{quote .InstanceID}}";
            terminate_command = "/usr/local/bin/stop-vm {{quote .InstanceID}}";
          };
        }
      ];
    };
  };
}
