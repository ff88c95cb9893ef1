{
  description = "nix-builder-autoscaler: elastic Nix remote builders on EC2 behind HAProxy, for Buildbot (buildbot-nix)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # The NAR hash of `go mod vendor`'s output. After a change to go.mod or
      # go.sum, run scripts/update-vendor-hash (scripts/test-nix fails while
      # this is stale).
      vendorHash = "sha256-X6fEahJZvdtlS14K/XDr+Mt9cK4A+tQKt4Uk1yO2oyk=";

      # go.mod says go 1.26.
      goBuilder = pkgs: pkgs.buildGo126Module or pkgs.buildGoModule;

      daemonPackage =
        pkgs: args:
        pkgs.callPackage ./nix/package.nix (
          {
            inherit vendorHash;
            buildGoModule = goBuilder pkgs;
          }
          // args
        );
    in
    {
      packages = forAllSystems (pkgs: rec {
        nix-builder-autoscaler = daemonPackage pkgs { };
        buildbot-autoscale-ext = pkgs.python3Packages.callPackage ./nix/buildbot-ext.nix { };
        default = nix-builder-autoscaler;
      });

      overlays.default = final: prev: {
        nix-builder-autoscaler = daemonPackage final { };
        pythonPackagesExtensions = (prev.pythonPackagesExtensions or [ ]) ++ [
          (pyFinal: _pyPrev: {
            nix-builder-autoscaler-buildbot = pyFinal.callPackage ./nix/buildbot-ext.nix { };
          })
        ];
      };

      # Both modules carry a key, so importing both (the second imports the
      # first) declares the daemon's options once.
      nixosModules = {
        nix-builder-autoscaler =
          { lib, pkgs, ... }:
          {
            key = "nix-builder-autoscaler#nixosModules.nix-builder-autoscaler";
            _file = "${toString ./flake.nix}#nixosModules.nix-builder-autoscaler";
            imports = [ ./nix/modules/nix-builder-autoscaler.nix ];
            config.services.nix-builder-autoscaler.package =
              lib.mkDefault
                self.packages.${pkgs.stdenv.hostPlatform.system}.nix-builder-autoscaler;
          };

        buildbot-nix-autoscaler = {
          key = "nix-builder-autoscaler#nixosModules.buildbot-nix-autoscaler";
          _file = "${toString ./flake.nix}#nixosModules.buildbot-nix-autoscaler";
          imports = [
            self.nixosModules.nix-builder-autoscaler
            ./nix/modules/buildbot-nix-autoscaler.nix
          ];
        };

        default = self.nixosModules.buildbot-nix-autoscaler;
      };

      checks = forAllSystems (
        pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
          p = self.packages.${system};
        in
        {
          # Builds the daemon, and the Buildbot extension with its Python tests.
          inherit (p) nix-builder-autoscaler buildbot-autoscale-ext;

          # The Go test suite, with a real HAProxy and moto_server (e2e/ is
          # left to the VM test).
          go-test = daemonPackage pkgs {
            runTests = true;
            inherit (pkgs) haproxy python3;
          };

          # Both modules with real nixpkgs, without a VM: a host with the
          # daemon, HAProxy, a Buildbot master with the extension and the
          # remote builders. Building it renders the config file and checks it
          # with check-config, generates HAProxy's configuration and checks it
          # with haproxy -c, and builds the master's Python with the extension.
          nixos-system =
            (lib.nixosSystem {
              inherit system;
              modules = [
                self.nixosModules.buildbot-nix-autoscaler
                ./nix/tests/cases/buildbot-local.nix
                {
                  boot.isContainer = true;
                  system.stateVersion = "25.11";
                }
              ];
            }).config.system.build.toplevel;

          # HAProxy + daemon (local provider) + a builder VM: a reservation
          # served end to end, scale from zero, a gated Buildbot build.
          vm = import ./nix/tests/vm.nix {
            inherit pkgs;
            modules = [ self.nixosModules.buildbot-nix-autoscaler ];
          };
        }
      );

      formatter = forAllSystems (pkgs: pkgs.nixfmt-rfc-style);

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            (pkgs.go_1_26 or pkgs.go)
            pkgs.gopls
            pkgs.haproxy
            pkgs.sqlite-interactive
            pkgs.nix
            pkgs.nixfmt-rfc-style
            pkgs.openssh
            pkgs.jq
            (pkgs.python3.withPackages (ps: [
              ps.buildbot
              ps.buildbot-worker
              ps.treq
              ps.moto
            ] ++ (ps.moto.optional-dependencies.server or [ ])))
          ];
          # go-sqlite3
          CGO_ENABLED = "1";
        };
      });
    };
}
