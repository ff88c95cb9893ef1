# NixOS VM test: HAProxy and the daemon (local provider) on one machine, which
# is also the Buildbot host, and a builder VM behind HAProxy.
#
# The pool's launch_command "launches" the builder VM by printing its
# address, so every step of a real launch runs for real: the daemon binds the
# address into HAProxy, HAProxy's SSH check passes, the slot becomes ready, a
# reservation is assigned, Nix builds on the builder through the frontend,
# and the idle builder is drained and "terminated" again. Then a connection
# without a reservation scales the pool up from zero (the SPOE hold), and a
# Buildbot build gated by the extension reserves and releases capacity.
#
# Run: nix build .#checks.x86_64-linux.vm  (needs KVM). Offline, the nodes are
# only evaluated (scripts/test-nix).
{
  pkgs,
  # the flake's nixosModules.buildbot-nix-autoscaler (it imports the daemon's)
  modules,
}:
let
  inherit (pkgs) lib;
  keys = import ./vm-keys.nix;
  system = pkgs.stdenv.hostPlatform.system;

  # A derivation that can only be built remotely (max-jobs = 0 here); stamp
  # makes each build a new one.
  remoteNix = pkgs.writeText "remote.nix" ''
    { stamp ? "0" }:
    derivation {
      name = "nba-remote-''${stamp}";
      system = "${system}";
      builder = "/bin/sh";
      args = [ "-c" "echo built remotely: ''${stamp} > $out" ];
    }
  '';
in
pkgs.testers.runNixOSTest {
  name = "nix-builder-autoscaler";

  nodes = {
    builder =
      { ... }:
      {
        services.openssh = {
          enable = true;
          hostKeys = [
            {
              path = "/etc/ssh/ssh_host_ed25519_key";
              type = "ed25519";
            }
          ];
          # HAProxy's SSH health checks connect and leave without logging in;
          # OpenSSH >= 9.8 would otherwise penalize (refuse) HAProxy's address.
          settings.PerSourcePenaltyExemptList = "192.168.0.0/16";
        };
        # The pool's shared host key (a test key).
        environment.etc."ssh/ssh_host_ed25519_key" = {
          text = keys.hostPrivate;
          mode = "0600";
        };
        environment.etc."ssh/ssh_host_ed25519_key.pub".text = keys.hostPublic + "\n";

        nix.sshServe = {
          enable = true;
          protocol = "ssh-ng";
          write = true;
          keys = [ keys.clientPublic ];
        };
        nix.settings = {
          max-jobs = 2;
          substituters = lib.mkForce [ ];
        };
        virtualisation.memorySize = 1024;
      };

    autoscaler =
      { nodes, ... }:
      {
        imports = modules;

        services.nix-builder-autoscaler = {
          enable = true;
          haproxy.enable = true;
          settings = {
            daemon.log_level = "debug";
            haproxy = {
              hold = "2m";
              check_interval = "500ms";
            };
            pool = [
              {
                name = "x86";
                systems = [ system ];
                max_builders = 1;
                max_jobs = 2;
                idle_timeout = "15s";
                frontend = "0.0.0.0:2222";
                provider = "local";
                local = {
                  launch_command = "echo ${nodes.builder.networking.primaryIPAddress}:22";
                  terminate_command = "true";
                };
              }
            ];
          };
        };

        services.buildbot-nix.nix-build-autoscaler = {
          enable = true;
          extraArguments.default_system = builtins.toJSON system;
          remoteBuilders = {
            sshKey = "/etc/nix/builder_ed25519";
            hostKey = keys.hostPublic;
          };
        };
        environment.etc."nix/builder_ed25519" = {
          text = keys.clientPrivate;
          mode = "0600";
        };
        environment.etc."nba-test/remote.nix".source = remoteNix;
        nix.settings.substituters = lib.mkForce [ ];

        # A Buildbot master with one buildbot-nix-style builder, "demo/nix-build",
        # which the extension gates, and a worker that runs nix-build.
        services.buildbot-master = {
          enable = true;
          workers = [ "worker.Worker('worker1', 'pass')" ];
          builders = [ "util.BuilderConfig(name='demo/nix-build', workernames=['worker1'], factory=factory)" ];
          schedulers = [ "schedulers.ForceScheduler(name='force', builderNames=['demo/nix-build'])" ];
          factorySteps = [
            "steps.ShellCommand(command=['nix-build', '--no-out-link', '/etc/nba-test/remote.nix', '--argstr', 'stamp', util.Interpolate('buildbot-%(prop:buildnumber)s')])"
          ];
        };
        services.buildbot-worker = {
          enable = true;
          workerUser = "worker1";
          workerPass = "pass";
          masterUrl = "localhost:9989";
          packages = [ pkgs.nix ];
        };

        environment.systemPackages = [
          pkgs.curl
          pkgs.jq
        ];
        virtualisation.memorySize = 2048;
      };
  };

  testScript = ''
    import json

    start_all()
    builder.wait_for_unit("sshd.service")
    autoscaler.wait_for_unit("haproxy.service")
    autoscaler.wait_for_unit("nix-builder-autoscaler.service")
    autoscaler.wait_until_succeeds("autoscalerctl health")


    def wait_all_empty():
        autoscaler.wait_until_succeeds(
            "autoscalerctl slots --json | jq -e 'all(.slots[]; .state == \"empty\")'",
            timeout=180,
        )


    with subtest("the service is hardened, HAProxy serves the stats page"):
        autoscaler.succeed("systemctl show -p KillMode nix-builder-autoscaler | grep -qx KillMode=process")
        autoscaler.succeed("systemctl show -p NoNewPrivileges nix-builder-autoscaler | grep -qx NoNewPrivileges=yes")
        autoscaler.succeed("test -S /run/haproxy/nix-builder-autoscaler.sock")
        autoscaler.succeed("curl -sf http://127.0.0.1:8404/ | grep -q nba_x86")

    with subtest("a reservation is served end to end"):
        r = json.loads(autoscaler.succeed(
            "autoscalerctl reserve --system ${system} --owner vm-test --wait --wait-timeout 3m --json"
        ))
        assert r["state"] == "ready", r
        # max-jobs = 0 here: this can only build on the builder, through HAProxy.
        out = autoscaler.succeed("nix-build --no-out-link /etc/nba-test/remote.nix --argstr stamp reserved")
        autoscaler.succeed(f"grep -q 'built remotely: reserved' {out.strip()}")
        autoscaler.succeed(f"autoscalerctl release {r['id']}")
        # idle_timeout: the idle builder is drained and terminated
        wait_all_empty()

    with subtest("scale from zero: HAProxy holds a connection until a builder is ready"):
        autoscaler.succeed("nix-build --no-out-link /etc/nba-test/remote.nix --argstr stamp unreserved")
        wait_all_empty()

    with subtest("Buildbot: the gate reserves capacity before nix-build, the release gives it back"):
        autoscaler.wait_for_unit("buildbot-master.service")
        autoscaler.wait_until_succeeds(
            "curl -sf http://127.0.0.1:8010/api/v2/workers | jq -e '.workers[0].connected_to | length > 0'",
            timeout=120,
        )
        autoscaler.succeed(
            "curl -sf -X POST -H 'Content-Type: application/json' "
            + "-d '{\"jsonrpc\": \"2.0\", \"method\": \"force\", \"id\": 1, \"params\": {\"builderid\": \"1\"}}' "
            + "http://127.0.0.1:8010/api/v2/forceschedulers/force"
        )
        autoscaler.wait_until_succeeds(
            "curl -sf 'http://127.0.0.1:8010/api/v2/builds?complete=true' | jq -e '.builds[0].results == 0'",
            timeout=300,
        )
        autoscaler.succeed(
            "autoscalerctl reservations --json"
            + " | jq -e '[.reservations[] | select(.owner | startswith(\"demo/nix-build\"))]"
            + " | length == 1 and .[0].state == \"released\"'"
        )
  '';
}
