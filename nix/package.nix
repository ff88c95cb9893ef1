# The Go daemon and its CLI: nix-builder-autoscaler and autoscalerctl.
# go-sqlite3 needs cgo. vendorHash lives in flake.nix, which passes it here;
# scripts/update-vendor-hash recomputes it (scripts/test-nix checks it).
{
  lib,
  buildGoModule,
  vendorHash,
  version ? "0.1.0",
  # true: build every package and run the Go test suite (checks.go-test)
  # instead of building the two commands.
  runTests ? false,
  haproxy ? null,
  python3 ? null,
}:
let
  root = ../.;
  # Only what the Go build reads: no docs, no Nix, no Python.
  skipTop = [
    "buildbot-ext"
    "nix"
    "docs"
    "scripts"
    "bench"
    ".ci"
    "flake.nix"
    "flake.lock"
    "README.md"
    "result"
  ];
  src = lib.cleanSourceWith {
    name = "nix-builder-autoscaler-source";
    src = lib.cleanSource root;
    filter =
      path: _type:
      let
        rel = lib.removePrefix (toString root + "/") (toString path);
      in
      !(builtins.elem (builtins.head (lib.splitString "/" rel)) skipTop);
  };
in
buildGoModule {
  pname = if runTests then "nix-builder-autoscaler-go-test" else "nix-builder-autoscaler";
  inherit version src vendorHash;

  env.CGO_ENABLED = 1;
  ldflags = [
    "-s"
    "-w"
  ];

  subPackages = lib.optionals (!runTests) [
    "cmd/nix-builder-autoscaler"
    "cmd/autoscalerctl"
  ];

  doCheck = runTests;
  # e2e/ needs a Nix daemon, sshd and network namespaces; the NixOS VM test
  # (checks.vm) covers the same path end to end.
  excludedPackages = [ "e2e" ];
  # The tests start a real HAProxy and moto_server (the EC2 emulator) on
  # loopback ports.
  nativeCheckInputs = lib.optionals runTests [
    haproxy
    (python3.withPackages (ps: [ ps.moto ] ++ (ps.moto.optional-dependencies.server or [ ])))
  ];
  preCheck = ''
    export HOME=$TMPDIR
  '';

  meta = {
    description = "Elastic Nix remote builders on EC2 behind HAProxy, for Buildbot";
    mainProgram = "nix-builder-autoscaler";
    platforms = lib.platforms.linux;
  };
}
