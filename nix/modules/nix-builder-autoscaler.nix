# services.nix-builder-autoscaler: the daemon, and optionally the HAProxy in
# front of its builders.
#
# `settings` mirrors the daemon's config file (docs/configuration.md) key for
# key, with the daemon's defaults; it is rendered to TOML and checked with
# `nix-builder-autoscaler check-config` when the system is built, so a bad
# combination of values fails the build with the daemon's own message. With
# `haproxy.enable`, HAProxy's configuration is generated from the same file
# by `nix-builder-autoscaler haproxy-config` and given to services.haproxy.
#
# Secrets are never in the Nix store: `tokenFile` and `tailscaleApiKeyFile`
# are paths on the target machine, handed to the daemon with systemd's
# LoadCredential.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.nix-builder-autoscaler;
  inherit (lib) mkOption types;

  settingsFormat = pkgs.formats.toml { };

  credentialsDir = "/run/credentials/nix-builder-autoscaler.service";

  # --- value types of the config file ---

  # Go's time.ParseDuration syntax, with a unit (the daemon rejects "300").
  durationPattern = "(([0-9]+(\\.[0-9]*)?|\\.[0-9]+)(ns|us|µs|μs|ms|s|m|h))+";
  durationOrZero = types.strMatching durationPattern // {
    description = ''duration: a Go duration string, like "30s", "5m" or "1h30m" ("0s" allowed)'';
  };
  duration =
    types.addCheck durationOrZero (s: builtins.match ".*[1-9].*" s != null)
    // {
      description = ''duration greater than zero: a Go duration string, like "30s", "5m" or "1h30m"'';
    };
  # idle_timeout: "auto", or a duration as above.
  autoOrDuration = types.addCheck types.str (s: s == "auto" || duration.check s) // {
    description = ''"auto", or a duration greater than zero: a Go duration string, like "5m"'';
  };
  hostPortPattern = "(\\[[0-9A-Fa-f:.]+]|[A-Za-z0-9._-]*):[0-9]{1,5}";
  hostPort = types.strMatching hostPortPattern // {
    description = ''address host:port, like "127.0.0.1:5555" ("[::1]:8470" for IPv6, ":8470" for every address)'';
  };
  hostPortOrEmpty = types.strMatching "(${hostPortPattern})?" // {
    description = ''address host:port, or "" for none'';
  };
  absolutePath = types.strMatching "/.*" // {
    description = "absolute path";
  };
  absolutePathOrEmpty = types.strMatching "(/.*)?" // {
    description = ''absolute path, or "" for none'';
  };
  socketPath =
    types.addCheck absolutePath (s: builtins.stringLength s <= 107)
    // {
      description = "absolute path of at most 107 bytes (a unix socket)";
    };
  # An absolute path on the target machine, kept out of the Nix store.
  secretPath = types.strMatching "/.*" // {
    description = "absolute path (a string: the file stays out of the Nix store)";
  };
  httpURL = types.strMatching "https?://[^/ ]+.*" // {
    description = "http(s) URL";
  };
  httpURLOrEmpty = types.strMatching "(https?://[^/ ]+.*)?" // {
    description = ''http(s) URL, or "" for none'';
  };

  opt =
    type: default: description:
    mkOption { inherit type default description; };
  required =
    type: description:
    mkOption {
      inherit type;
      description = description + " Required.";
    };

  # --- [[pool]] ---

  localModule = {
    options = {
      address = opt (types.strMatching "127\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}" // {
        description = "IPv4 loopback address (127.0.0.0/8)";
      }) "127.0.0.1" "The address the pool's stand-in builders listen on, and HAProxy connects to.";
      boot_delay = opt durationOrZero "0s" "How long a stand-in builder waits before answering with an SSH banner.";
      launch_command = opt types.str "" ''
        A shell command (a Go text/template) that starts a real builder instead
        of the built-in stand-in and prints its address host:port on its last line.
        "" uses the stand-ins.
      '';
      terminate_command = opt types.str "" "A shell command that stops a builder started by launch_command; required with it.";
    };
  };

  ec2Module = {
    options = {
      region = required (types.strMatching "[a-z]{2}(-[a-z]+)+-[0-9]" // {
        description = ''AWS region name, like "eu-central-1"'';
      }) "The AWS region the pool's builders run in.";
      endpoint = opt httpURLOrEmpty "" "An EC2 API endpoint other than AWS's (an emulator, in tests).";
      launch_template_id = opt (types.strMatching "(lt-[0-9a-f]{8,17})?") "" "A launch template, by id.";
      launch_template_name = opt types.str "" "A launch template, by name.";
      launch_template_version = opt types.str "$Default" ''Which version of the launch template: a number, "$Default" or "$Latest".'';
      ami = opt (types.strMatching "(ami-[0-9a-f]{8,17})?") "" "The builder image; required without a launch template.";
      instance_types = required (types.nonEmptyListOf (
        types.strMatching "[a-z][a-z0-9-]*\\.[a-z0-9]+"
      )) "Instance types in order of preference.";
      subnets = required (types.nonEmptyListOf (
        types.strMatching "subnet-[0-9a-f]{8,17}"
      )) "One subnet per availability zone.";
      security_groups = opt (types.listOf (types.strMatching "sg-[0-9a-f]{8,17}")) [ ] "Security groups for the builders.";
      instance_profile = opt types.str "" "An IAM instance profile (name or ARN) for the builders.";
      key_name = opt types.str "" "An EC2 key pair for emergency SSH access.";
      root_volume_gb = opt (types.ints.between 0 16384) 0 "The root volume's size in GiB; 0 keeps the image's.";
      root_device_name = opt absolutePath "/dev/xvda" "The image's root device, which root_volume_gb resizes.";
      user_data = opt types.str "" "User data for each builder, a Go text/template over .Cluster .Pool .Slot .LaunchID.";
      market = opt (types.nullOr (types.enum [
        "spot"
        "on-demand"
      ])) null "The market launches start in; null: spot, or on-demand with nested_virtualization.";
      on_demand_fallback = opt types.bool false "Launch on-demand when every Spot offering lacks capacity.";
      nested_virtualization = opt types.bool false "Launch with nested virtualization (c8i, m8i, r8i).";
      unavailable_for = opt duration "5m" "How long an instance type in a subnet without capacity is skipped.";
      discovery = opt (types.enum [
        "tailscale"
        "ec2-private-ip"
        "ec2-public-ip"
      ]) "tailscale" "How a booted builder's address is found.";
      ssh_port = opt types.port 22 "The port the builders' sshd listens on.";
    };
  };

  poolModule = {
    options = {
      name = required (types.strMatching "[a-z0-9][a-z0-9_-]{0,31}" // {
        description = "pool name: 1 to 32 lower-case letters, digits, '_' and '-', starting with a letter or digit";
      }) "The pool's name, used in the API, HAProxy backend names and metrics.";
      systems = required (types.nonEmptyListOf (
        types.strMatching "[a-z0-9_]+-[a-z0-9_]+" // {
          description = ''Nix system, like "x86_64-linux"'';
        }
      )) "The Nix systems the pool's builders build for.";
      features = opt (types.listOf (
        types.strMatching "[a-z0-9][a-z0-9._-]*" // {
          description = ''Nix system feature, like "kvm" or "big-parallel"'';
        }
      )) [ ] "The Nix system features the builders offer.";
      max_builders = required (types.ints.between 1 64) "The most builders the pool runs at once (its number of slots).";
      min_builders = opt types.ints.unsigned 0 "Builders kept running even with no demand.";
      warm_pool = opt types.ints.unsigned 0 "Spare builders kept running beyond current demand.";
      reservations_per_builder = opt types.ints.positive 1 "How many reservations one builder takes at once.";
      max_jobs = opt types.ints.positive 1 "The most concurrent Nix jobs (SSH connections) HAProxy sends to one builder.";
      idle_timeout = opt autoOrDuration "auto" ''
        How long an idle builder is kept before it is drained; "auto": as long
        as a boot of the pool costs, as the daemon measures it.
      '';
      billing_minimum = opt (types.nullOr durationOrZero) null ''
        The least time the provider bills a builder for; an idle builder is kept
        at least that long after its launch. null: "60s" for ec2, "0s" for local.
      '';
      drain_timeout = opt duration "2h" "How long a draining builder may keep running jobs.";
      launch_timeout = opt duration "5m" "How long a launched builder may take to be running.";
      boot_timeout = opt duration "10m" "How long a running builder may take until its address is known.";
      bind_timeout = opt duration "5m" "How long a bound builder may take until HAProxy reports it up.";
      frontend = opt (types.nullOr hostPort) null ''
        Where HAProxy accepts this pool's SSH connections, like "0.0.0.0:2222".
        Required with haproxy.runtime_socket (and so with haproxy.enable).
      '';
      max_lifetime = opt durationOrZero "0s" ''Builders older than this are drained and replaced; "0s": never.'';
      forecast_max_builders = opt (types.nullOr types.ints.unsigned) null ''
        The most builders demand forecasts alone make the pool launch; null: max_builders, 0: ignore forecasts.
      '';
      provider = required (types.enum [
        "local"
        "ec2"
      ]) "Where builders come from.";
      local = opt (types.submodule localModule) { } ''
        [pool.local], used (and rendered) only with provider = "local".
      '';
      ec2 = opt (types.submodule ec2Module) { } ''
        [pool.ec2], used (and rendered) only with provider = "ec2".
      '';
    };
  };

  # --- the whole file ---

  settingsModule = {
    options = {
      daemon = opt (types.submodule {
        options = {
          cluster = opt (types.strMatching "[a-z0-9][a-z0-9-]{0,62}" // {
            description = "cluster name: 1 to 63 lower-case letters, digits and '-', starting with a letter or digit";
          }) "nix-builders" "A name tagged on every instance the daemon launches.";
          socket = opt socketPath "/run/nix-builder-autoscaler/daemon.sock" "The unix socket of the reservation and operator API (mode 0660).";
          socket_group = opt types.str "" ''
            The group that owns the socket; "" keeps the daemon's own group
            (services.nix-builder-autoscaler.group), whose members may use the API.
          '';
          listen = opt hostPortOrEmpty "" ''Also serve the API over TCP here (needs tokenFile); "" serves no TCP API.'';
          token_file = mkOption {
            type = absolutePathOrEmpty;
            readOnly = true;
            description = "Set from tokenFile (the daemon reads it from its systemd credentials); do not set it.";
          };
          metrics_listen = opt hostPortOrEmpty "127.0.0.1:9464" ''Prometheus metrics; "" serves none.'';
          state_dir = opt absolutePath "/var/lib/nix-builder-autoscaler" "The daemon's state directory; must be under /var/lib (a systemd StateDirectory).";
          database = opt absolutePathOrEmpty "" ''The SQLite database; "" means <state_dir>/state.db.'';
          log_level = opt (types.enum [
            "debug"
            "info"
            "warn"
            "error"
          ]) "info" "How much the daemon logs.";
          log_format = opt (types.enum [
            "text"
            "json"
          ]) "text" "Log lines as key=value text or JSON.";
          reconcile_interval = opt duration "10s" "How often the daemon reconciles even without a change in demand.";
          event_retention = opt duration "720h" "How long the event log is kept.";
        };
      }) { } "[daemon]";

      reservations = opt (types.submodule {
        options = {
          lease = opt duration "10m" "The lease of a reservation whose request names none.";
          max_lease = opt duration "24h" "The longest lease a request may ask for.";
          pending_timeout = opt duration "1h" "How long a reservation may wait for a builder.";
          max_poll = opt duration "60s" "The longest single long poll.";
        };
      }) { } "[reservations]";

      haproxy = opt (types.submodule {
        options = {
          runtime_socket = opt absolutePathOrEmpty "" ''
            HAProxy's admin socket; "" means no HAProxy. With
            services.nix-builder-autoscaler.haproxy.enable it defaults to
            /run/haproxy/nix-builder-autoscaler.sock.
          '';
          agent_listen = opt hostPort "127.0.0.1:5555" "Where the agent-check responder listens (keep it on loopback).";
          spoa_listen = opt hostPort "127.0.0.1:12345" "Where the SPOE agent listens (keep it on loopback).";
          hold = opt duration "3m" "How long a connection is held while a builder starts for it.";
          check_interval = opt duration "1s" "How often HAProxy checks each server.";
          agent_interval = opt duration "10s" "How often HAProxy asks the daemon's agent for each server's state (the daemon pushes changes at once; the agent restores state after a reload).";
          stats_listen = opt hostPortOrEmpty "127.0.0.1:8404" ''Where the stats page is served; "" leaves it out.'';
          state_file = opt absolutePath "/var/lib/haproxy/nix-builder-autoscaler.state" "HAProxy's server-state-file.";
          timeout = opt duration "5s" "How long one runtime-API call may take.";
          log = opt types.nonEmptyStr "/dev/log" ''Where HAProxy logs: "/dev/log" (syslog) or "stdout".'';
          placeholder = opt (types.strMatching "[0-9]{1,3}(\\.[0-9]{1,3}){3}:[0-9]{1,5}" // {
            description = "IPv4 ip:port";
          }) "192.0.2.1:22" "Where a server without a builder points.";
        };
      }) { } "[haproxy]";

      tailscale = opt (types.submodule {
        options = {
          socket = opt absolutePath "/var/run/tailscale/tailscaled.sock" "tailscaled's LocalAPI socket.";
          hostname = opt types.nonEmptyStr "nix-builder-{{.InstanceID}}" "The builders' tailnet host name, a Go text/template.";
          api_key_file = mkOption {
            type = absolutePathOrEmpty;
            readOnly = true;
            description = "Set from tailscaleApiKeyFile (read from the daemon's systemd credentials); do not set it.";
          };
          oauth_client_id = opt (types.strMatching "[^/[:space:]]*" // {
            description = ''OAuth client id, or ""'';
          }) "" ''
            The id of a Tailscale OAuth client with the devices:core scope, like
            "k123456CNTRL"; with tailscaleOAuthClientSecretFile, the daemon deletes
            terminated builders' devices with it instead of an API key (an OAuth
            client does not expire). "" for none.
          '';
          oauth_client_secret_file = mkOption {
            type = absolutePathOrEmpty;
            readOnly = true;
            description = "Set from tailscaleOAuthClientSecretFile (read from the daemon's systemd credentials); do not set it.";
          };
          tailnet = opt types.nonEmptyStr "-" ''The tailnet of the API key or OAuth client; "-" is its default tailnet.'';
          api_url = opt httpURL "https://api.tailscale.com" "Tailscale's API.";
        };
      }) { } "[tailscale]";

      pool = opt (types.listOf (types.submodule poolModule)) [ ] ''
        The [[pool]] tables, in order: a reservation that names no pool goes to
        the first pool that serves its system and features.
      '';
    };
  };

  # --- rendering ---

  # Submodule values carry _module; TOML has no null (null = leave the key out).
  clean =
    v:
    if lib.isAttrs v then
      lib.mapAttrs (_: clean) (lib.filterAttrs (n: x: n != "_module" && x != null) v)
    else if lib.isList v then
      map clean v
    else
      v;

  renderPool =
    p:
    clean (
      builtins.removeAttrs p [
        "local"
        "ec2"
      ]
    )
    // lib.optionalAttrs (p.provider == "local") { local = clean p.local; }
    // lib.optionalAttrs (p.provider == "ec2") { ec2 = clean p.ec2; };

  # The config file as an attribute set, exactly what is written as TOML.
  rendered =
    clean (builtins.removeAttrs cfg.settings [ "pool" ])
    // {
      pool = map renderPool cfg.settings.pool;
    };

  uncheckedFile = settingsFormat.generate "nix-builder-autoscaler-unchecked.toml" rendered;

  # The file the daemon reads, checked by the daemon itself at build time.
  configFile =
    pkgs.runCommand "nix-builder-autoscaler.toml"
      {
        nativeBuildInputs = [ cfg.package ];
        passthru.unchecked = uncheckedFile;
      }
      ''
        nix-builder-autoscaler check-config ${uncheckedFile}
        cp ${uncheckedFile} "$out"
      '';

  haproxyPackage = config.services.haproxy.package or pkgs.haproxy;

  # haproxy.cfg and the SPOE file it names, from the same config file; HAProxy
  # checks the result (haproxy -c) at build time.
  haproxyFiles =
    pkgs.runCommand "nix-builder-autoscaler-haproxy"
      {
        nativeBuildInputs = [
          cfg.package
          haproxyPackage
        ];
      }
      ''
        nix-builder-autoscaler haproxy-config --config ${configFile} --out "$out"
        haproxy -c -f "$out/haproxy.cfg"
      '';

  localPools = builtins.filter (p: p.provider == "local") cfg.settings.pool;
  usesTailscale = builtins.any (
    p: p.provider == "ec2" && p.ec2.discovery == "tailscale"
  ) cfg.settings.pool;

  portOf = address: lib.toInt (lib.last (lib.splitString ":" address));
  frontendPorts = map (p: portOf p.frontend) (builtins.filter (p: p.frontend != null) cfg.settings.pool);

  stateDir = cfg.settings.daemon.state_dir;
  socketDir = builtins.dirOf cfg.settings.daemon.socket;
  database = cfg.settings.daemon.database;
in
{
  options.services.nix-builder-autoscaler = {
    enable = lib.mkEnableOption "nix-builder-autoscaler, elastic Nix remote builders behind HAProxy";

    package = mkOption {
      type = types.package;
      description = ''
        The nix-builder-autoscaler package (both binaries). The flake's
        nixosModules set it to the flake's package.
      '';
    };

    user = mkOption {
      type = types.str;
      default = "nix-builder-autoscaler";
      description = "The system user the daemon runs as (created by this module when left at the default).";
    };

    group = mkOption {
      type = types.str;
      default = "nix-builder-autoscaler";
      description = ''
        The daemon's group. Unless settings.daemon.socket_group says
        otherwise, members of this group may use the API socket (add
        operators who run autoscalerctl, and the Buildbot master's user).
      '';
    };

    tokenFile = mkOption {
      type = types.nullOr secretPath;
      default = null;
      example = "/run/secrets/nix-builder-autoscaler-token";
      description = ''
        A file on this machine holding the bearer token of the TCP API
        (settings.daemon.listen). Loaded with systemd's LoadCredential, so it
        may be readable by root only; it never enters the Nix store.
      '';
    };

    tailscaleApiKeyFile = mkOption {
      type = types.nullOr secretPath;
      default = null;
      example = "/run/secrets/tailscale-api-key";
      description = ''
        A file holding a Tailscale API key, with which the daemon deletes a
        terminated builder's device from the tailnet (LoadCredential). An API
        key expires after at most 90 days; tailscaleOAuthClientSecretFile does
        not. Set one of the two.
      '';
    };

    tailscaleOAuthClientSecretFile = mkOption {
      type = types.nullOr secretPath;
      default = null;
      example = "/run/secrets/tailscale-oauth-secret";
      description = ''
        A file holding the secret of the Tailscale OAuth client named by
        settings.tailscale.oauth_client_id (scope devices:core), with which the
        daemon deletes a terminated builder's device from the tailnet
        (LoadCredential). Unlike an API key it does not expire.
      '';
    };

    awsCredentialsFile = mkOption {
      type = types.nullOr secretPath;
      default = null;
      example = "/run/secrets/nix-builder-autoscaler-aws";
      description = ''
        An AWS shared credentials file ("[default]" with aws_access_key_id and
        aws_secret_access_key) for EC2 pools, when the daemon does not run on EC2
        with an instance profile. Loaded with LoadCredential; the daemon's AWS SDK
        reads it through AWS_SHARED_CREDENTIALS_FILE.
      '';
    };

    settings = mkOption {
      type = types.submodule settingsModule;
      default = { };
      description = ''
        The daemon's config file, key for key (docs/configuration.md), with the
        daemon's defaults. Rendered to TOML and checked with
        `nix-builder-autoscaler check-config` at build time.
      '';
    };

    configFile = mkOption {
      type = types.path;
      readOnly = true;
      default = configFile;
      defaultText = lib.literalExpression "the checked TOML rendered from settings";
      description = "The config file the daemon reads (rendered from settings, checked). Read-only.";
    };

    haproxy = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Run HAProxy in front of the builders (services.haproxy), with the
          configuration `nix-builder-autoscaler haproxy-config` generates from
          settings: one frontend per pool, the stats page, the SPOE agent and
          agent checks, and a runtime socket the daemon's user may use.
        '';
      };

      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open the pools' frontend ports in the firewall.";
      };

      configDir = mkOption {
        type = types.path;
        readOnly = true;
        default = haproxyFiles;
        defaultText = lib.literalExpression "haproxy.cfg and nba-spoe.conf generated from settings";
        description = "The generated haproxy.cfg and nba-spoe.conf (read-only).";
      };
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        services.nix-builder-autoscaler.settings = {
          daemon.token_file = if cfg.tokenFile != null then "${credentialsDir}/token" else "";
          tailscale.api_key_file =
            if cfg.tailscaleApiKeyFile != null then "${credentialsDir}/tailscale-api-key" else "";
          tailscale.oauth_client_secret_file =
            if cfg.tailscaleOAuthClientSecretFile != null then
              "${credentialsDir}/tailscale-oauth-secret"
            else
              "";
        };

        assertions = [
          {
            assertion = cfg.settings.pool != [ ];
            message = "services.nix-builder-autoscaler.settings.pool: at least one pool is required.";
          }
          {
            assertion = lib.hasPrefix "/var/lib/" stateDir && builtins.match ".*/" stateDir == null;
            message = "services.nix-builder-autoscaler.settings.daemon.state_dir must be a directory under /var/lib/ (it is the service's StateDirectory), not ${stateDir}.";
          }
          {
            assertion = lib.hasPrefix "/run/" socketDir && socketDir != "/run";
            message = "services.nix-builder-autoscaler.settings.daemon.socket must be in a directory under /run/ (the service's RuntimeDirectory), not ${cfg.settings.daemon.socket}.";
          }
          {
            assertion = !(cfg.tailscaleApiKeyFile != null && cfg.tailscaleOAuthClientSecretFile != null);
            message = "services.nix-builder-autoscaler: set tailscaleApiKeyFile or tailscaleOAuthClientSecretFile, not both; the OAuth client does not expire.";
          }
          {
            assertion = (cfg.settings.tailscale.oauth_client_id != "") == (cfg.tailscaleOAuthClientSecretFile != null);
            message = "services.nix-builder-autoscaler: settings.tailscale.oauth_client_id and tailscaleOAuthClientSecretFile go together: set both (the OAuth client's id and the file holding its secret) or neither.";
          }
          {
            assertion = cfg.settings.daemon.listen != "" -> cfg.tokenFile != null;
            message = "services.nix-builder-autoscaler.tokenFile is required when settings.daemon.listen is set: every TCP request must carry the bearer token.";
          }
          {
            assertion =
              cfg.haproxy.enable
              -> builtins.all (p: p.frontend != null) cfg.settings.pool;
            message = "services.nix-builder-autoscaler: with haproxy.enable, every settings.pool needs a frontend (where HAProxy accepts its SSH connections), like \"0.0.0.0:2222\".";
          }
        ];

        users.users = lib.optionalAttrs (cfg.user == "nix-builder-autoscaler") {
          nix-builder-autoscaler = {
            isSystemUser = true;
            inherit (cfg) group;
            description = "nix-builder-autoscaler daemon";
          };
        };
        users.groups = lib.optionalAttrs (cfg.group == "nix-builder-autoscaler") {
          nix-builder-autoscaler = { };
        };

        environment.systemPackages = [ cfg.package ];
        # autoscalerctl finds the daemon's socket.
        environment.variables.NBA_SOCKET = cfg.settings.daemon.socket;

        systemd.services.nix-builder-autoscaler = {
          description = "nix-builder-autoscaler: elastic Nix remote builders";
          wantedBy = [ "multi-user.target" ];
          after = [ "network-online.target" ] ++ lib.optional usesTailscale "tailscaled.service";
          wants = [ "network-online.target" ];
          # Where launch_command/terminate_command find their tools.
          path = [ pkgs.bash ];
          environment = lib.optionalAttrs (cfg.awsCredentialsFile != null) {
            AWS_SHARED_CREDENTIALS_FILE = "${credentialsDir}/aws-credentials";
          };

          serviceConfig = {
            ExecStart = "${lib.getExe' cfg.package "nix-builder-autoscaler"} run --config ${configFile}";
            User = cfg.user;
            Group = cfg.group;
            SupplementaryGroups =
              lib.optional (cfg.settings.daemon.socket_group != "") cfg.settings.daemon.socket_group
              ++ lib.optional cfg.haproxy.enable config.services.haproxy.group;
            Restart = "on-failure";
            RestartSec = "5s";

            StateDirectory = lib.removePrefix "/var/lib/" stateDir;
            StateDirectoryMode = "0700";
            # The socket is 0660 in here; the directory lets the group through.
            RuntimeDirectory = lib.removePrefix "/run/" socketDir;
            RuntimeDirectoryMode = "0750";
            LoadCredential =
              lib.optional (cfg.tokenFile != null) "token:${cfg.tokenFile}"
              ++ lib.optional (cfg.tailscaleApiKeyFile != null) "tailscale-api-key:${cfg.tailscaleApiKeyFile}"
              ++ lib.optional (
                cfg.tailscaleOAuthClientSecretFile != null
              ) "tailscale-oauth-secret:${cfg.tailscaleOAuthClientSecretFile}"
              ++ lib.optional (cfg.awsCredentialsFile != null) "aws-credentials:${cfg.awsCredentialsFile}";
            ReadWritePaths = lib.optional (
              database != "" && !(lib.hasPrefix "${stateDir}/" database)
            ) (builtins.dirOf database);

            # Stand-in builders and launch_command's builders of local pools
            # are the daemon's children: a restart must not take them down
            # (the daemon adopts them again from its state).
            KillMode = if localPools != [ ] then "process" else "control-group";

            # Hardening. The daemon needs the network (EC2, Tailscale API,
            # HAProxy, builders), its state and runtime directories, unix
            # sockets (HAProxy's runtime socket, tailscaled), and nothing else.
            NoNewPrivileges = true;
            CapabilityBoundingSet = "";
            AmbientCapabilities = "";
            ProtectSystem = "strict";
            ProtectHome = true;
            PrivateTmp = true;
            PrivateDevices = true;
            ProtectKernelTunables = true;
            ProtectKernelModules = true;
            ProtectKernelLogs = true;
            ProtectControlGroups = true;
            ProtectClock = true;
            ProtectHostname = true;
            ProtectProc = "invisible";
            RestrictAddressFamilies = [
              "AF_UNIX"
              "AF_INET"
              "AF_INET6"
            ];
            RestrictNamespaces = true;
            RestrictRealtime = true;
            RestrictSUIDSGID = true;
            LockPersonality = true;
            MemoryDenyWriteExecute = true;
            SystemCallArchitectures = "native";
            # chown: the socket is handed to socket_group.
            SystemCallFilter = [
              "@system-service"
              "~@privileged"
              "@chown"
            ];
            SystemCallErrorNumber = "EPERM";
            UMask = "0027";
          };
        };
      }

      (lib.mkIf cfg.haproxy.enable {
        services.nix-builder-autoscaler.settings.haproxy.runtime_socket = lib.mkDefault "/run/haproxy/nix-builder-autoscaler.sock";

        # The generated file is read at evaluation time (it is built from
        # settings by the daemon's own generator).
        services.haproxy = {
          enable = true;
          config = builtins.readFile "${haproxyFiles}/haproxy.cfg";
        };

        systemd.services.haproxy.reloadTriggers = [ haproxyFiles ];
        systemd.services.nix-builder-autoscaler = {
          after = [ "haproxy.service" ];
          wants = [ "haproxy.service" ];
        };

        # server-state-file: HAProxy reads it at start; an empty state file
        # (version line only) keeps it from warning on the first start.
        systemd.tmpfiles.rules = [
          "d ${builtins.dirOf cfg.settings.haproxy.state_file} 0750 ${config.services.haproxy.user} ${config.services.haproxy.group} -"
          "f ${cfg.settings.haproxy.state_file} 0640 ${config.services.haproxy.user} ${config.services.haproxy.group} - 1"
        ];

        networking.firewall.allowedTCPPorts = lib.mkIf cfg.haproxy.openFirewall frontendPorts;
      })
    ]
  );
}
