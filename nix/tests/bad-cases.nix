# Configurations that must fail evaluation, and what the error must say (the
# option's name). scripts/test-nix evaluates each and compares.
{ lib }:
let
  pool = {
    name = "x86";
    systems = [ "x86_64-linux" ];
    max_builders = 2;
    provider = "local";
  };
  daemon = settings: {
    services.nix-builder-autoscaler = {
      enable = true;
      settings = {
        pool = [ pool ];
      }
      // settings;
    };
  };
  withPool = attrs: daemon { pool = [ (pool // attrs) ]; };
  entry = ''services.nix-builder-autoscaler.settings.pool."[definition 1-entry 1]"'';
  bb = attrs: {
    services.buildbot-master.enable = true;
    services.buildbot-nix.nix-build-autoscaler = {
      enable = true;
      url = "http://100.64.0.1:8470";
      tokenFile = "/run/secrets/token";
      remoteBuilders = {
        sshKey = "/etc/nix/builder_ed25519";
        hostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAISharedHostKeyForTestsOnly000000000000000";
        pools = [
          {
            name = "x86";
            host = "nix-haproxy";
            port = 2222;
            systems = [ "x86_64-linux" ];
            maxJobs = 4;
          }
        ];
      };
    }
    // attrs;
  };
in
{
  max-builders-zero = {
    module = withPool { max_builders = 0; };
    expect = "A definition for option `${entry}.max_builders' is not of type `integer between 1 and 64";
  };
  max-builders-string = {
    module = withPool { max_builders = "4"; };
    expect = "`${entry}.max_builders' is not of type";
  };
  pool-name = {
    module = withPool { name = "X86!"; };
    expect = "`${entry}.name' is not of type `pool name";
  };
  system = {
    module = withPool { systems = [ "x86_64" ]; };
    expect = ''`${entry}.systems."[definition 1-entry 1]"' is not of type `Nix system'';
  };
  no-systems = {
    module = withPool { systems = [ ]; };
    expect = "`${entry}.systems' is not of type `non-empty list";
  };
  missing-max-builders = {
    module = daemon {
      pool = [ (builtins.removeAttrs pool [ "max_builders" ]) ];
    };
    expect = "The option `${entry}.max_builders' is used but not defined.";
  };
  provider = {
    module = withPool { provider = "gcp"; };
    expect = "`${entry}.provider' is not of type `one of \"local\", \"ec2\"";
  };
  idle-timeout-zero = {
    module = withPool { idle_timeout = "0s"; };
    expect = "`${entry}.idle_timeout' is not of type `\"auto\", or a duration greater than zero";
  };
  billing-minimum = {
    module = withPool { billing_minimum = "1 minute"; };
    expect = "`${entry}.billing_minimum' is not of type `null or duration";
  };
  local-address = {
    module = withPool { local.address = "10.0.0.1"; };
    expect = "`${entry}.local.address' is not of type `IPv4 loopback address";
  };
  ec2-missing-region = {
    module = withPool {
      provider = "ec2";
      ec2 = {
        ami = "ami-0123456789abcdef0";
        instance_types = [ "c7i.large" ];
        subnets = [ "subnet-0123456789abcdef0" ];
      };
    };
    expect = "The option `${entry}.ec2.region' is used but not defined.";
  };
  ec2-subnet = {
    module = withPool {
      provider = "ec2";
      ec2 = {
        region = "eu-central-1";
        ami = "ami-0123456789abcdef0";
        instance_types = [ "c7i.large" ];
        subnets = [ "subnet-x" ];
      };
    };
    expect = ''`${entry}.ec2.subnets."[definition 1-entry 1]"' is not of type'';
  };
  tailscale-two-credentials = {
    module = {
      services.nix-builder-autoscaler = (daemon { }).services.nix-builder-autoscaler // {
        tailscaleApiKeyFile = "/run/secrets/tailscale-api-key";
        tailscaleOAuthClientSecretFile = "/run/secrets/tailscale-oauth-secret";
      };
    };
    expect = "set tailscaleApiKeyFile or tailscaleOAuthClientSecretFile, not both";
  };
  tailscale-oauth-secret-without-id = {
    module = {
      services.nix-builder-autoscaler = (daemon { }).services.nix-builder-autoscaler // {
        tailscaleOAuthClientSecretFile = "/run/secrets/tailscale-oauth-secret";
      };
    };
    expect = "settings.tailscale.oauth_client_id and tailscaleOAuthClientSecretFile go together";
  };
  log-level = {
    module = daemon { daemon.log_level = "verbose"; };
    expect = "`services.nix-builder-autoscaler.settings.daemon.log_level' is not of type `one of \"debug\", \"info\", \"warn\", \"error\"'";
  };
  lease-duration = {
    module = daemon { reservations.lease = "10 minutes"; };
    expect = "`services.nix-builder-autoscaler.settings.reservations.lease' is not of type `duration greater than zero";
  };
  hold-int = {
    module = daemon { haproxy.hold = 180; };
    expect = "`services.nix-builder-autoscaler.settings.haproxy.hold' is not of type";
  };
  socket-too-long = {
    module = daemon {
      daemon.socket = "/run/nix-builder-autoscaler/" + builtins.concatStringsSep "" (builtins.genList (_: "x") 90) + ".sock";
    };
    expect = "`services.nix-builder-autoscaler.settings.daemon.socket' is not of type `absolute path of at most 107 bytes";
  };
  unknown-key = {
    module = daemon { daemon.colour = "blue"; };
    expect = "The option `services.nix-builder-autoscaler.settings.daemon.colour' does not exist.";
  };
  unknown-pool-key = {
    module = withPool { max_builder = 3; };
    expect = "The option `${entry}.max_builder' does not exist.";
  };
  token-file-directly = {
    module = daemon { daemon.token_file = "/etc/nix-builder-autoscaler/token"; };
    expect = "The option `services.nix-builder-autoscaler.settings.daemon.token_file' is read-only";
  };
  token-relative = {
    module.imports = [
      (daemon { })
      { services.nix-builder-autoscaler.tokenFile = "secrets/token"; }
    ];
    expect = "`services.nix-builder-autoscaler.tokenFile' is not of type `null or absolute path";
  };
  listen-without-token = {
    module = daemon { daemon.listen = "100.64.0.1:8470"; };
    expect = "services.nix-builder-autoscaler.tokenFile is required when settings.daemon.listen is set";
  };
  no-pools = {
    module = daemon { pool = [ ]; };
    expect = "services.nix-builder-autoscaler.settings.pool: at least one pool is required";
  };
  state-dir = {
    module = daemon { daemon.state_dir = "/srv/nba"; };
    expect = "services.nix-builder-autoscaler.settings.daemon.state_dir must be a directory under /var/lib/";
  };
  haproxy-without-frontend = {
    module.imports = [
      (daemon { })
      { services.nix-builder-autoscaler.haproxy.enable = true; }
    ];
    expect = "with haproxy.enable, every settings.pool needs a frontend";
  };

  bb-port = {
    module.imports = [
      (bb { })
      {
        services.buildbot-nix.nix-build-autoscaler.remoteBuilders.pools = lib.mkForce [
        {
          name = "x86";
          host = "nix-haproxy";
          port = 70000;
          systems = [ "x86_64-linux" ];
          maxJobs = 4;
        }
      ];
      }
    ];
    expect = ''`services.buildbot-nix.nix-build-autoscaler.remoteBuilders.pools."[definition 1-entry 1]".port' is not of type `16 bit unsigned integer'';
  };
  bb-ssh-key-relative = {
    module.imports = [
      (bb { })
      { services.buildbot-nix.nix-build-autoscaler.remoteBuilders.sshKey = lib.mkForce "builder_ed25519"; }
    ];
    expect = "`services.buildbot-nix.nix-build-autoscaler.remoteBuilders.sshKey' is not of type `null or absolute path";
  };
  bb-no-pools = {
    module.imports = [
      (bb { })
      { services.buildbot-nix.nix-build-autoscaler.remoteBuilders.pools = lib.mkForce [ ]; }
    ];
    expect = "remoteBuilders.pools is empty";
  };
  bb-no-host-key = {
    module.imports = [
      (bb { })
      { services.buildbot-nix.nix-build-autoscaler.remoteBuilders.hostKey = lib.mkForce null; }
    ];
    expect = "set exactly one of hostKey (the builders' shared host key) and certAuthority";
  };
  bb-both-host-keys = {
    module.imports = [
      (bb { })
      {
        services.buildbot-nix.nix-build-autoscaler.remoteBuilders.certAuthority = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBuilderCAKeyForTestsOnly0000000000000000";
      }
    ];
    expect = "set exactly one of hostKey (the builders' shared host key) and certAuthority";
  };
  bb-url-without-token = {
    module = {
      services.buildbot-nix.nix-build-autoscaler = {
        enable = true;
        url = "http://100.64.0.1:8470";
        remoteBuilders.enable = false;
      };
    };
    expect = "services.buildbot-nix.nix-build-autoscaler.tokenFile is required with url";
  };
  bb-connect-timeout = {
    module.imports = [
      (bb { })
      { services.buildbot-nix.nix-build-autoscaler.remoteBuilders.connectTimeout = 60; }
    ];
    expect = "remoteBuilders.connectTimeout (60s) must exceed hold (3m = 180s)";
  };
  bb-lease = {
    module = bb { lease = "ten minutes"; };
    expect = "`services.buildbot-nix.nix-build-autoscaler.lease' is not of type `Go duration";
  };
}
