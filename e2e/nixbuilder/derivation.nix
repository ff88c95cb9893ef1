# Derivations for the end-to-end tests that need nothing but /bin/sh (no
# nixpkgs, no fetching): every build is new because of the nonce.
#
#   nix-build derivation.nix --argstr nonce N --argstr system S
#     [--argstr count K] [--argstr sleep SECONDS]
#
# One derivation `nba-e2e-N`, or with count > 1 a list of K derivations
# `nba-e2e-N-1` … `nba-e2e-N-K`. Each writes "ok" to $out, after sleeping
# SECONDS (a decimal, run by /bin/sleep) if sleep is not "0".
{ nonce, system, count ? "1", sleep ? "0" }:
let
  n = builtins.fromJSON count;
  pause = if sleep == "0" then "" else "/bin/sleep ${sleep}; ";
  one = name: derivation {
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" "${pause}echo ok > $out" ];
  };
in
if n == 1 then one "nba-e2e-${nonce}"
else builtins.genList (i: one "nba-e2e-${nonce}-${toString (i + 1)}") n
