# Derivations for the end-to-end tests that need nothing but /bin/sh (no
# nixpkgs, no fetching): every build is new because of the nonce.
#
#   nix-build derivation.nix --argstr nonce N --argstr system S
#     [--argstr count K] [--argstr sleep SECONDS] [--argstr stamp 1]
#
# One derivation `nba-e2e-N`, or with count > 1 a list of K derivations
# `nba-e2e-N-1` … `nba-e2e-N-K`. Each writes "ok" to $out, after sleeping
# SECONDS (a decimal, run by /bin/sleep) if sleep is not "0". With stamp "1"
# the output first records when the build started and ended on the builder
# ("start NANOS" and "end NANOS" lines, from /bin/date), so that a test can
# see builds overlap rather than time them.
{ nonce, system, count ? "1", sleep ? "0", stamp ? "0" }:
let
  n = builtins.fromJSON count;
  pause = if sleep == "0" then "" else "/bin/sleep ${sleep}; ";
  body =
    if stamp == "1" then
      "echo start $(/bin/date +%s%N) > $out; ${pause}echo end $(/bin/date +%s%N) >> $out; echo ok >> $out"
    else
      "${pause}echo ok > $out";
  one = name: derivation {
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" body ];
  };
in
if n == 1 then one "nba-e2e-${nonce}"
else builtins.genList (i: one "nba-e2e-${nonce}-${toString (i + 1)}") n
