# The Buildbot extension (buildbot-ext/), for a Buildbot master's Python:
# python3Packages.callPackage, or, from the NixOS module, the master's own
# python.pkgs.callPackage.
{
  lib,
  buildPythonPackage,
  setuptools,
  twisted,
  treq,
  buildbot,
}:
buildPythonPackage {
  pname = "nix-builder-autoscaler-buildbot";
  version = "0.1.0";
  pyproject = true;

  src = lib.cleanSourceWith {
    name = "nix-builder-autoscaler-buildbot-source";
    src = lib.cleanSource ../buildbot-ext;
    filter =
      path: _type:
      !(builtins.elem (baseNameOf path) [
        "_trial_temp"
        "__pycache__"
        "build"
        "dist"
      ]);
  };

  build-system = [ setuptools ];

  # Buildbot itself is the master's: propagating it would put a second
  # Buildbot into the master's environment.
  dependencies = [
    twisted
    treq
  ];
  pythonRemoveDeps = [ "buildbot" ];

  nativeCheckInputs = [ buildbot ];
  # The end-to-end test starts a Buildbot master, a worker and the daemon;
  # the NixOS VM test (checks.vm) does that instead.
  checkPhase = ''
    runHook preCheck
    NBA_SKIP_E2E=1 python -m twisted.trial tests
    runHook postCheck
  '';

  pythonImportsCheck = [ "nix_builder_autoscaler_buildbot" ];

  meta = {
    description = "Buildbot steps that reserve nix-builder-autoscaler capacity before each buildbot-nix nix-build";
  };
}
