# The offline tests of the NixOS modules (scripts/test-nix runs them): the
# modules evaluated with the stub lib/pkgs/NixOS options of ./fixtures, the
# daemon package standing in as binaries built by `go build` (nbaBin).
#
#   nix-build offline.nix -A toml.<case>          rendered config (compared with expected/)
#   nix-build offline.nix -A configFile.<case>    ... checked by check-config
#   nix-build offline.nix -A haproxy.<case>       haproxy-config output, checked by haproxy -c
#   nix-instantiate --eval --strict --json offline.nix -A checks.<case>
#   nix-instantiate --eval --strict offline.nix -A bad.<name>   must fail (bad-cases.nix)
{
  nbaBin ? null,
}:
let
  lib = import ./fixtures/lib;
  pkgs = import ./fixtures/pkgs.nix { inherit lib nbaBin; };
  nixos = import ./fixtures/nixos.nix { inherit lib pkgs; };

  modules = [
    ../modules/buildbot-nix-autoscaler.nix
    { services.nix-builder-autoscaler.package = pkgs.nix-builder-autoscaler; }
    # buildbot-nix's master/worker options, for the examples
    ./fixtures/buildbot-nix.nix
  ];
  eval = module: (nixos.eval { modules = modules ++ [ module ]; }).config;

  cases = {
    default = ./cases/default.nix;
    two-pools = ./cases/two-pools.nix;
    ec2-only = ./cases/ec2-only.nix;
    buildbot-local = ./cases/buildbot-local.nix;
    buildbot-remote = ./cases/buildbot-remote.nix;
    # The examples of docs/nixos.md.
    haproxy-host = ../examples/haproxy-host.nix;
    buildbot-host = ../examples/buildbot-host.nix;
    single-host = ../examples/single-host.nix;
    builder-ami = ../examples/builder-ami.nix;
    # A combination only the daemon's check-config catches: the build fails.
    min-warm-max = {
      imports = [ ./cases/default.nix ];
      services.nix-builder-autoscaler.settings.pool = lib.mkForce [
        {
          name = "x86";
          systems = [ "x86_64-linux" ];
          max_builders = 4;
          min_builders = 3;
          warm_pool = 2;
          provider = "local";
        }
      ];
    };
  };
  configs = lib.mapAttrs (_: eval) cases;
  daemonOf = name: configs.${name}.services.nix-builder-autoscaler;
  daemonCases = [
    "default"
    "two-pools"
    "ec2-only"
    "min-warm-max"
    "haproxy-host"
    "single-host"
  ];
  forCases = names: f: lib.genAttrs names f;

  service = name: configs.${name}.systemd.services.nix-builder-autoscaler;
  sc = name: (service name).serviceConfig;

  # { name = expected; } pairs: check = what the module produced.
  check = name: got: want: {
    inherit name;
    ok = got == want;
    got = builtins.toJSON got;
    want = builtins.toJSON want;
  };
  hardening = case: [
    (check "${case}: User" (sc case).User "nix-builder-autoscaler")
    (check "${case}: ProtectSystem" (sc case).ProtectSystem "strict")
    (check "${case}: NoNewPrivileges" (sc case).NoNewPrivileges true)
    (check "${case}: CapabilityBoundingSet" (sc case).CapabilityBoundingSet "")
    (check "${case}: RestrictAddressFamilies" (sc case).RestrictAddressFamilies [
      "AF_UNIX"
      "AF_INET"
      "AF_INET6"
    ])
    (check "${case}: StateDirectory" (sc case).StateDirectory "nix-builder-autoscaler")
    (check "${case}: RuntimeDirectory" (sc case).RuntimeDirectory "nix-builder-autoscaler")
    (check "${case}: ExecStart runs the checked config" (sc case).ExecStart
      "${pkgs.nix-builder-autoscaler}/bin/nix-builder-autoscaler run --config ${(daemonOf case).configFile}"
    )
    (check "${case}: the daemon's user exists" configs.${case}.users.users.nix-builder-autoscaler.isSystemUser true)
  ];

  bbLocal = configs.buildbot-local;
  bbRemote = configs.buildbot-remote;
  masterPython = config: config.services.buildbot-master.pythonPackages pkgs.python3Packages;
in
{
  inherit lib pkgs;

  caseNames = builtins.attrNames cases;
  badNames = builtins.attrNames (import ./bad-cases.nix { inherit lib; });

  toml = forCases daemonCases (name: (daemonOf name).configFile.unchecked);
  configFile = forCases daemonCases (name: (daemonOf name).configFile);
  haproxy = forCases [
    "two-pools"
    "haproxy-host"
    "single-host"
  ] (name: (daemonOf name).haproxy.configDir);

  # Text outputs compared with expected/<case>.<what>.
  text = {
    "buildbot-local.ssh_config" = bbLocal.programs.ssh.extraConfig;
    "buildbot-remote.ssh_config" = bbRemote.programs.ssh.extraConfig;
    "buildbot-local.master.py" =
      bbLocal.services.buildbot-master.extraImports
      + "\n"
      + lib.concatMapStrings (c: c + "\n") bbLocal.services.buildbot-master.configurators;
    "buildbot-remote.master.py" =
      bbRemote.services.buildbot-master.extraImports
      + "\n"
      + lib.concatMapStrings (c: c + "\n") bbRemote.services.buildbot-master.configurators;
    "buildbot-local.machines.json" = builtins.toJSON (
      map (m: builtins.removeAttrs m [ "_module" ]) bbLocal.nix.buildMachines
    );
    "buildbot-remote.known_hosts.json" = builtins.toJSON (
      lib.mapAttrs (_: h: builtins.removeAttrs h [ "_module" ]) bbRemote.programs.ssh.knownHosts
    );
  };

  # What the modules must produce beyond the files: every entry must be ok.
  checks =
    hardening "default"
    ++ hardening "two-pools"
    ++ [
      (check "default: local pools outlive a restart (KillMode)" (sc "default").KillMode "process")
      (check "ec2-only: no local pool, the whole unit stops (KillMode)" (sc "ec2-only").KillMode "control-group")
      (check "default: no credentials" (sc "default").LoadCredential [ ])
      (check "ec2-only: the OAuth client's secret by LoadCredential" (sc "ec2-only").LoadCredential [
        "tailscale-oauth-secret:/run/secrets/tailscale-oauth-secret"
      ])
      (check "two-pools: secrets by LoadCredential" (sc "two-pools").LoadCredential [
        "token:/run/secrets/nix-builder-autoscaler-token"
        "tailscale-api-key:/run/secrets/tailscale-api-key"
        "aws-credentials:/run/secrets/nix-builder-autoscaler-aws"
      ])
      (check "two-pools: the AWS SDK finds its credential" (service "two-pools").environment {
        AWS_SHARED_CREDENTIALS_FILE = "/run/credentials/nix-builder-autoscaler.service/aws-credentials";
      })
      (check "default: autoscalerctl finds the socket" configs.default.environment.variables.NBA_SOCKET
        "/run/nix-builder-autoscaler/daemon.sock"
      )
      (check "two-pools: the daemon may use HAProxy's runtime socket" (sc "two-pools").SupplementaryGroups [
        "haproxy"
      ])
      (check "two-pools: HAProxy is enabled" configs.two-pools.services.haproxy.enable true)
      (check "two-pools: HAProxy's config is the generated one"
        configs.two-pools.services.haproxy.config
        (builtins.readFile "${(daemonOf "two-pools").haproxy.configDir}/haproxy.cfg")
      )
      (check "two-pools: stats page" (lib.hasInfix "stats enable" configs.two-pools.services.haproxy.config) true)
      (check "two-pools: runtime socket" (lib.hasInfix
        "stats socket /run/haproxy/nix-builder-autoscaler.sock mode 660 level admin"
        configs.two-pools.services.haproxy.config
      ) true)
      (check "two-pools: one frontend per pool" (
        lib.hasInfix "bind 0.0.0.0:2222" configs.two-pools.services.haproxy.config
        && lib.hasInfix "bind 0.0.0.0:2223" configs.two-pools.services.haproxy.config
      ) true)
      (check "two-pools: frontends open in the firewall" configs.two-pools.networking.firewall.allowedTCPPorts [
        2222
        2223
      ])
      (check "two-pools: state file seeded" configs.two-pools.systemd.tmpfiles.rules [
        "d /var/lib/haproxy 0750 haproxy haproxy -"
        "f /var/lib/haproxy/nix-builder-autoscaler.state 0640 haproxy haproxy - 1"
      ])
      (check "two-pools: HAProxy reloads when its config changes"
        (map toString configs.two-pools.systemd.services.haproxy.reloadTriggers)
        [ (toString (daemonOf "two-pools").haproxy.configDir) ]
      )
      (check "two-pools: starts after HAProxy" (builtins.elem "haproxy.service" (service "two-pools").after) true)
      (check "two-pools: starts after tailscaled (tailscale discovery)" (builtins.elem "tailscaled.service" (service "two-pools").after) true)
      (check "default: no tailscaled" (builtins.elem "tailscaled.service" (service "default").after) false)

      (check "buildbot-local: the master's user may use the daemon's socket"
        bbLocal.users.users.buildbot.extraGroups
        [ "nix-builder-autoscaler" ]
      )
      (check "buildbot-local: no token over the socket" bbLocal.systemd.services.buildbot-master.serviceConfig.LoadCredential or [ ] [ ])
      (check "buildbot-remote: the token is a Buildbot secret (LoadCredential)"
        bbRemote.systemd.services.buildbot-master.serviceConfig.LoadCredential
        [ "nix-builder-autoscaler-token:/run/secrets/nix-builder-autoscaler-token" ]
      )
      (check "buildbot-local: the extension is in the master's python"
        (map (p: p.pname) (masterPython bbLocal))
        [ "nix-builder-autoscaler-buildbot" ]
      )
      (check "buildbot-local: built from this repository's buildbot-ext/"
        (lib.hasSuffix "/buildbot-ext" (toString (builtins.head (masterPython bbLocal)).stubArgs.src.origSrc))
        true
      )
      (check "buildbot-local: remote builds only" bbLocal.nix.settings.max-jobs 0)
      (check "buildbot-local: builders use substitutes" bbLocal.nix.settings.builders-use-substitutes true)
      (check "buildbot-local: distributed builds" bbLocal.nix.distributedBuilds true)
      (check "buildbot-local: the hold comes from the daemon (4m + 60s)"
        (lib.hasInfix "ConnectTimeout 300" bbLocal.programs.ssh.extraConfig)
        true
      )

      # The examples.
      (check "buildbot-host: the extension's configurator after buildbot-nix's"
        (map (c: builtins.head (lib.splitString "(" c)) configs.buildbot-host.services.buildbot-master.configurators)
        [
          "util.JanitorConfigurator"
          "NixConfigurator"
          "AutoscalerConfigurator"
        ]
      )
      (check "buildbot-host: the token is a Buildbot secret"
        configs.buildbot-host.systemd.services.buildbot-master.serviceConfig.LoadCredential
        [ "nix-builder-autoscaler-token:/run/secrets/nix-builder-autoscaler-token" ]
      )
      (check "buildbot-host: known_hosts trusts the builders' CA"
        (builtins.removeAttrs configs.buildbot-host.programs.ssh.knownHosts.nix-builders [ "_module" ])
        {
          certAuthority = true;
          extraHostNames = [ ];
          hostNames = [ "nix-builders" ];
          publicKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleBuilderCAPublicKey000000000000000 nix-builders-ca";
          publicKeyFile = null;
        }
      )
      (check "single-host: the configurator uses the socket, after buildbot-nix's"
        (lib.last configs.single-host.services.buildbot-master.configurators)
        ''AutoscalerConfigurator(builder_suffix="/nix-build", lease="10m", socket="/run/nix-builder-autoscaler/daemon.sock", wait_timeout="2h")''
      )
      (check "single-host: one remote builder per pool, at HAProxy on this host"
        (map (m: { inherit (m) hostName maxJobs systems supportedFeatures; }) configs.single-host.nix.buildMachines)
        [
          {
            hostName = "nix-builders-x86";
            maxJobs = 32;
            systems = [
              "x86_64-linux"
              "i686-linux"
            ];
            supportedFeatures = [
              "big-parallel"
              "nixos-test"
              "benchmark"
            ];
          }
        ]
      )
      (check "single-host: the master joins the daemon's group" configs.single-host.users.users.buildbot.extraGroups [
        "nix-builder-autoscaler"
      ])
      (check "single-host: no TCP API, no token" (sc "single-host").LoadCredential [
        "tailscale-api-key:/run/secrets/tailscale-api-key"
        "aws-credentials:/run/secrets/nix-builder-autoscaler-aws"
      ])
      (check "builder-ami: Nix over ssh-ng for the Buildbot host, trusted" (
        let
          s = configs.builder-ami.nix.sshServe;
        in
        [
          s.enable
          s.write
          s.protocol
        ]
      ) [
        true
        true
        "ssh-ng"
      ])
      (check "builder-ami: secrets before sshd, tailnet join after them" (
        let
          sv = configs.builder-ami.systemd.services;
        in
        [
          (builtins.elem "sshd.service" sv.nix-builder-secrets.before)
          (builtins.elem "nix-builder-secrets.service" sv.nix-builder-join.after)
          (lib.hasInfix "tailscale up --auth-key=file:/run/keys/tailscale-authkey --hostname=\"$name\"" sv.nix-builder-join.script)
          (lib.hasInfix ''name="nix-builder-$(imds instance-id)"'' sv.nix-builder-join.script)
        ]
      ) [
        true
        true
        true
        true
      ])
      (check "builder-ami: HAProxy's health checks are not penalized"
        configs.builder-ami.services.openssh.settings.PerSourcePenaltyExemptList
        "100.64.0.0/10"
      )
      (check "builder-ami: host name from the instance id" configs.builder-ami.networking.hostName "")
    ];

  # Evaluates what a system build would: assertions (nixos.eval), the
  # rendered config, the units and the Buildbot host's Nix and ssh settings.
  bad = lib.mapAttrs (
    _: c:
    let
      config = eval c.module;
      d = config.services.nix-builder-autoscaler;
    in
    builtins.deepSeq [
      (if d.enable then d.configFile.unchecked.drvPath else null)
      (config.systemd.services.nix-builder-autoscaler.serviceConfig or { })
      config.programs.ssh.extraConfig
      (map (m: builtins.removeAttrs m [ "_module" ]) config.nix.buildMachines)
      config.services.buildbot-master.configurators
    ] "evaluated"
  ) (import ./bad-cases.nix { inherit lib; });
  badExpect = lib.mapAttrs (_: c: c.expect) (import ./bad-cases.nix { inherit lib; });
}
