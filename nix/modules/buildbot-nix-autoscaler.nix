# services.buildbot-nix.nix-build-autoscaler: the Buildbot host's side.
#
#   - installs the Buildbot extension (buildbot-ext/) into the Buildbot
#     master's Python, and appends its AutoscalerConfigurator after
#     buildbot-nix's NixConfigurator (lib.mkAfter), so every */nix-build
#     builder first reserves capacity and releases it at the end;
#   - tells it where the daemon is: its unix socket on this host, or its TCP
#     API with the bearer token as a Buildbot secret (systemd LoadCredential;
#     buildbot-nix's secrets provider reads $CREDENTIALS_DIRECTORY);
#   - configures this host's Nix to build remotely: one nix.buildMachines
#     entry per pool, pointing at the pool's HAProxy frontend, with
#     max-jobs = 0, builders-use-substitutes, an ssh_config entry per pool
#     (HostKeyAlias, keepalives, ConnectTimeout above HAProxy's hold) and the
#     builders' host key (shared key, or @cert-authority) in known_hosts.
#
# Works with the daemon on the same host (services.nix-builder-autoscaler,
# whose pools then need not be repeated) or on another one.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.buildbot-nix.nix-build-autoscaler;
  daemon = config.services.nix-builder-autoscaler;
  master = config.services.buildbot-master;
  inherit (lib) mkOption types;

  secretName = "nix-builder-autoscaler-token";

  # --- helpers ---

  # Whole seconds of a Go duration ("3m", "1h30m", "90s"; ms/us/ns round up).
  durationSeconds =
    s:
    let
      go =
        rest: acc:
        if rest == "" then
          acc
        else
          let
            m = builtins.match "([0-9]+)(ms|us|µs|ns|h|m|s)([0-9].*)?" rest;
            n = lib.toIntBase10 (builtins.elemAt m 0);
            unit = builtins.elemAt m 1;
            tail = if builtins.elemAt m 2 == null then "" else builtins.elemAt m 2;
            seconds =
              {
                h = n * 3600;
                m = n * 60;
                s = n;
                ms = (n + 999) / 1000;
                us = (n + 999999) / 1000000;
                "µs" = (n + 999999) / 1000000;
                ns = (n + 999999999) / 1000000000;
              }
              .${unit};
          in
          if m == null then
            throw "nix-build-autoscaler: cannot read the duration \"${s}\" (write it with whole numbers, like \"3m\" or \"2m30s\")"
          else
            go tail (acc + seconds);
    in
    go s 0;

  # host and port of "host:port" / "[v6]:port"; a wildcard host means this host.
  splitHostPort =
    address:
    let
      m =
        if lib.hasPrefix "[" address then
          builtins.match "\\[([^]]*)]:([0-9]+)" address
        else
          builtins.match "([^:]*):([0-9]+)" address;
      host = builtins.elemAt m 0;
    in
    {
      host =
        if
          builtins.elem host [
            ""
            "0.0.0.0"
            "::"
          ]
        then
          "127.0.0.1"
        else
          host;
      port = lib.toInt (builtins.elemAt m 1);
    };

  # A Nix value as a Python literal (JSON strings are Python strings).
  toPython =
    v:
    if v == null then
      "None"
    else if builtins.isBool v then
      (if v then "True" else "False")
    else if builtins.isInt v then
      toString v
    else if builtins.isString v then
      builtins.toJSON v
    else if builtins.isList v then
      "[" + lib.concatMapStringsSep ", " toPython v + "]"
    else
      throw "nix-build-autoscaler: cannot write a ${builtins.typeOf v} as Python";

  duration = types.strMatching "([0-9]+(ns|us|µs|ms|s|m|h))+" // {
    description = ''Go duration with whole numbers, like "10m" or "1h30m"'';
  };
  secretPath = types.strMatching "/.*" // {
    description = "absolute path (a string: the file stays out of the Nix store)";
  };

  # --- the configurator ---

  configuratorArgs = lib.filterAttrs (_: v: v != null) {
    socket = if cfg.url == null then cfg.socket else null;
    url = cfg.url;
    token_secret = if cfg.tokenFile != null then secretName else null;
    lease = cfg.lease;
    wait_timeout = cfg.waitTimeout;
    builder_suffix = cfg.builderSuffix;
    # Only what differs from the extension's defaults.
    forecasts = if cfg.forecasts.enable then null else false;
    forecast_systems = cfg.forecasts.systems;
    forecast_ttl = cfg.forecasts.ttl;
  };

  configurator =
    "AutoscalerConfigurator("
    + lib.concatStringsSep ", " (
      lib.mapAttrsToList (n: v: "${n}=${toPython v}") configuratorArgs
      ++ lib.mapAttrsToList (n: v: "${n}=${v}") cfg.extraArguments
    )
    + ")";

  extension = ps: if cfg.package != null then cfg.package else ps.callPackage ../buildbot-ext.nix { };

  socketGroup =
    if daemon.settings.daemon.socket_group != "" then daemon.settings.daemon.socket_group else daemon.group;

  # --- remote builders ---

  rb = cfg.remoteBuilders;
  holdSeconds = durationSeconds rb.hold;
  alias = pool: "${rb.hostPrefix}${pool.name}";

  # The pools of a daemon on this host, as remote builders.
  localPools = map (
    p:
    let
      hp = splitHostPort p.frontend;
    in
    {
      inherit (p) name systems;
      inherit (hp) host port;
      supportedFeatures = p.features;
      maxJobs = p.max_builders * p.max_jobs;
    }
  ) (builtins.filter (p: p.frontend != null) daemon.settings.pool);

  poolModule = {
    options = {
      name = mkOption {
        type = types.strMatching "[a-z0-9][a-z0-9_-]{0,31}";
        description = "The pool's name (the daemon's pool.name); the ssh host alias is hostPrefix + name.";
      };
      host = mkOption {
        type = types.nonEmptyStr;
        description = "The HAProxy host, as this host reaches it (a Tailscale name or address, or 127.0.0.1).";
      };
      port = mkOption {
        type = types.port;
        description = "The pool's HAProxy frontend port (the port of the daemon's pool.frontend).";
      };
      systems = mkOption {
        type = types.nonEmptyListOf types.str;
        description = "The Nix systems the pool builds for.";
      };
      supportedFeatures = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "The pool's system features (the daemon's pool.features).";
      };
      mandatoryFeatures = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Features a derivation must require to be sent to this pool.";
      };
      maxJobs = mkOption {
        type = types.ints.positive;
        description = "Jobs Nix sends to the pool at once: the pool's max_builders × max_jobs.";
      };
      speedFactor = mkOption {
        type = types.ints.positive;
        default = 1;
        description = "Nix's speed factor for the pool.";
      };
    };
  };

  # One ssh host per pool: the pool's HAProxy frontend, known by the one
  # HostKeyAlias of all builders.
  sshConfig = lib.concatMapStringsSep "\n" (p: ''
    # nix-builder-autoscaler pool ${p.name}: HAProxy frontend ${p.host}:${toString p.port}
    Host ${alias p}
      HostName ${p.host}
      Port ${toString p.port}
      HostKeyAlias ${rb.hostKeyAlias}
      ConnectTimeout ${toString rb.connectTimeout}
      ServerAliveInterval ${toString rb.serverAliveInterval}
      ServerAliveCountMax ${toString rb.serverAliveCountMax}
      TCPKeepAlive yes
      ControlMaster no
  '') rb.pools;
in
{
  imports = [ ./nix-builder-autoscaler.nix ];

  options.services.buildbot-nix.nix-build-autoscaler = {
    enable = lib.mkEnableOption "capacity reservations of nix-builder-autoscaler before each buildbot-nix nix-build, and remote builds through its HAProxy";

    package = mkOption {
      type = types.nullOr types.package;
      default = null;
      description = ''
        The Buildbot extension (python package nix-builder-autoscaler-buildbot).
        null builds it from this repository for the Buildbot master's Python.
      '';
    };

    url = mkOption {
      type = types.nullOr (types.strMatching "https?://[^/ ]+/?");
      default = null;
      example = "http://100.64.0.1:8470";
      description = ''
        The daemon's TCP API (its settings.daemon.listen), for a daemon on
        another host; needs tokenFile. null: the unix socket on this host.
      '';
    };

    socket = mkOption {
      type = types.strMatching "/.*";
      default = daemon.settings.daemon.socket;
      defaultText = lib.literalExpression "config.services.nix-builder-autoscaler.settings.daemon.socket";
      description = ''
        The daemon's unix socket, used when url is null. With the daemon on this
        host, the Buildbot master's user joins the socket's group.
      '';
    };

    tokenFile = mkOption {
      type = types.nullOr secretPath;
      default = null;
      example = "/run/secrets/nix-builder-autoscaler-token";
      description = ''
        A file on this host with the TCP API's bearer token (the daemon's
        tokenFile). Given to the master as the Buildbot secret
        "${secretName}" via systemd LoadCredential.
      '';
    };

    lease = mkOption {
      type = duration;
      default = "10m";
      description = "The lease each reservation asks for; the gate heartbeats it while the build runs.";
    };

    waitTimeout = mkOption {
      type = duration;
      default = "2h";
      description = "A build fails when no capacity came within this time.";
    };

    builderSuffix = mkOption {
      type = types.str;
      default = "/nix-build";
      description = "Builders whose name ends in this are gated (buildbot-nix names them <project>/nix-build).";
    };

    forecasts = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Send the daemon a demand forecast when a project's evaluation
          (<project>/nix-eval) starts, and withdraw it when it ends, so that
          builders boot while it evaluates. It never fails an evaluation.
        '';
      };
      systems = mkOption {
        type = types.nullOr (types.listOf types.str);
        default = null;
        example = [ "x86_64-linux" "aarch64-linux" ];
        description = "The systems forecast for each evaluation; null: buildbot-nix's buildSystems.";
      };
      ttl = mkOption {
        type = types.nullOr duration;
        default = null;
        description = "How long a forecast counts at most; null: the extension's default, 30m.";
      };
    };

    extraArguments = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        features = ''["big-parallel"]'';
        default_system = ''"x86_64-linux"'';
      };
      description = "More AutoscalerConfigurator keyword arguments, as Python expressions.";
    };

    configurator = mkOption {
      type = types.str;
      readOnly = true;
      default = configurator;
      description = "The Python expression appended to services.buildbot-master.configurators (read-only).";
    };

    remoteBuilders = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Configure this host's Nix to build on the pools through HAProxy
          (nix.buildMachines, ssh_config, known_hosts, max-jobs = 0).
        '';
      };

      pools = mkOption {
        type = types.listOf (types.submodule poolModule);
        default = localPools;
        defaultText = lib.literalExpression "the pools of services.nix-builder-autoscaler on this host, at their frontends";
        description = "One remote builder per pool, each at its HAProxy frontend.";
      };

      hostPrefix = mkOption {
        type = types.str;
        default = "nix-builders-";
        description = "The ssh host alias of a pool is this prefix and the pool's name.";
      };

      sshUser = mkOption {
        type = types.str;
        default = "nix-ssh";
        description = "The user Nix logs in as on the builders (nix.sshServe's user on the builder image).";
      };

      sshKey = mkOption {
        type = types.nullOr secretPath;
        default = null;
        example = "/etc/nix/builder_ed25519";
        description = "The private key (readable by root, which runs the nix-daemon) Nix logs in with.";
      };

      hostKeyAlias = mkOption {
        type = types.strMatching "[A-Za-z0-9._-]+";
        default = "nix-builders";
        description = ''
          The name every pool's builders are known by in known_hosts
          (ssh's HostKeyAlias): all builders behind HAProxy are one host to ssh.
        '';
      };

      hostKey = mkOption {
        type = types.nullOr (types.strMatching "(ssh|ecdsa)-[^ ]+ [A-Za-z0-9+/=]+( .*)?");
        default = null;
        example = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA...";
        description = "The builders' shared host public key. Set this or certAuthority.";
      };

      certAuthority = mkOption {
        type = types.nullOr (types.strMatching "(ssh|ecdsa)-[^ ]+ [A-Za-z0-9+/=]+( .*)?");
        default = null;
        description = ''
          The public key of the CA that signs the builders' host certificates
          (for the principal hostKeyAlias): known_hosts gets
          "@cert-authority <hostKeyAlias> <key>". Set this or hostKey.
        '';
      };

      hold = mkOption {
        type = duration;
        default = if daemon.enable then daemon.settings.haproxy.hold else "3m";
        defaultText = lib.literalExpression ''config.services.nix-builder-autoscaler.settings.haproxy.hold, or "3m"'';
        description = "The daemon's haproxy.hold: how long HAProxy may hold a connection while a builder boots.";
      };

      connectTimeout = mkOption {
        type = types.ints.positive;
        default = holdSeconds + 60;
        defaultText = lib.literalExpression "hold in seconds + 60";
        description = ''
          ssh's ConnectTimeout (seconds) for the pools, which also bounds the
          wait for the server's banner: it must exceed hold, or a connection
          that scales a pool up from zero gives up before the builder is there.
        '';
      };

      serverAliveInterval = mkOption {
        type = types.ints.positive;
        default = 30;
        description = "ssh's ServerAliveInterval: keeps silent builds' connections alive, notices a lost builder.";
      };

      serverAliveCountMax = mkOption {
        type = types.ints.positive;
        default = 4;
        description = "ssh's ServerAliveCountMax.";
      };

      maxLocalJobs = mkOption {
        type = types.either types.ints.unsigned (types.enum [ "auto" ]);
        default = 0;
        description = "nix.settings.max-jobs on this host; 0 sends every build to the pools.";
      };
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        assertions = [
          {
            assertion = cfg.url != null -> cfg.tokenFile != null;
            message = "services.buildbot-nix.nix-build-autoscaler.tokenFile is required with url: the daemon's TCP API wants its bearer token.";
          }
          {
            assertion = cfg.url == null -> cfg.tokenFile == null;
            message = "services.buildbot-nix.nix-build-autoscaler.tokenFile is used only with url (the unix socket needs no token); remove it or set url.";
          }
        ];

        services.buildbot-master = lib.mkIf master.enable {
          pythonPackages = ps: [ (extension ps) ];
          extraImports = "from nix_builder_autoscaler_buildbot import AutoscalerConfigurator";
          # After buildbot-nix's NixConfigurator, which creates the builders.
          configurators = lib.mkAfter [ configurator ];
        };

        systemd.services.buildbot-master = lib.mkIf (master.enable && cfg.tokenFile != null) {
          serviceConfig.LoadCredential = [ "${secretName}:${cfg.tokenFile}" ];
        };

        # The master talks to the daemon's socket on this host.
        users.users.${master.user} = lib.mkIf (master.enable && cfg.url == null && daemon.enable) {
          extraGroups = [ socketGroup ];
        };
      }

      (lib.mkIf rb.enable {
        assertions = [
          {
            assertion = rb.pools != [ ];
            message = "services.buildbot-nix.nix-build-autoscaler.remoteBuilders.pools is empty: list the pools (name, host, port, systems, maxJobs), or run services.nix-builder-autoscaler with HAProxy on this host.";
          }
          {
            assertion = (rb.hostKey == null) != (rb.certAuthority == null);
            message = "services.buildbot-nix.nix-build-autoscaler.remoteBuilders: set exactly one of hostKey (the builders' shared host key) and certAuthority (the CA of their host certificates).";
          }
          {
            assertion = rb.sshKey != null;
            message = "services.buildbot-nix.nix-build-autoscaler.remoteBuilders.sshKey is required: the private key Nix logs in to the builders with.";
          }
          {
            assertion = rb.connectTimeout > holdSeconds;
            message = "services.buildbot-nix.nix-build-autoscaler.remoteBuilders.connectTimeout (${toString rb.connectTimeout}s) must exceed hold (${rb.hold} = ${toString holdSeconds}s), or ssh gives up while HAProxy holds the connection for a booting builder.";
          }
        ];

        nix.distributedBuilds = true;
        nix.buildMachines = map (p: {
          hostName = alias p;
          protocol = "ssh-ng";
          inherit (rb) sshUser sshKey;
          inherit (p)
            systems
            maxJobs
            speedFactor
            supportedFeatures
            mandatoryFeatures
            ;
        }) rb.pools;
        nix.settings = {
          max-jobs = rb.maxLocalJobs;
          builders-use-substitutes = true;
        };

        # Before any "Host *" block of other modules: ssh takes the first value.
        programs.ssh.extraConfig = lib.mkBefore sshConfig;
        programs.ssh.knownHosts.${rb.hostKeyAlias} = {
          hostNames = [ rb.hostKeyAlias ];
          certAuthority = rb.certAuthority != null;
          publicKey = if rb.certAuthority != null then rb.certAuthority else rb.hostKey;
        };
      })
    ]
  );
}
