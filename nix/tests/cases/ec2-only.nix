# Only EC2 pools: no local builders, so a restart may stop the whole unit.
{
  services.nix-builder-autoscaler = {
    enable = true;
    # Device deletion with an OAuth client (the x86 pool is found on the tailnet).
    tailscaleOAuthClientSecretFile = "/run/secrets/tailscale-oauth-secret";
    settings.tailscale.oauth_client_id = "k123456CNTRL";
    settings.pool = [
      {
        name = "arm";
        systems = [ "aarch64-linux" ];
        max_builders = 3;
        provider = "ec2";
        ec2 = {
          region = "us-east-1";
          launch_template_name = "nix-builder";
          instance_types = [ "c7g.2xlarge" ];
          subnets = [ "subnet-0123456789abcdef0" ];
          discovery = "ec2-private-ip";
        };
      }
      {
        name = "x86";
        systems = [ "x86_64-linux" ];
        max_builders = 2;
        provider = "ec2";
        ec2 = {
          region = "us-east-1";
          launch_template_name = "nix-builder";
          instance_types = [ "c7i.2xlarge" ];
          subnets = [ "subnet-0123456789abcdef0" ];
        };
      }
    ];
  };
}
