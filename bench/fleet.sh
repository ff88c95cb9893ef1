#!/usr/bin/env bash
# Runs BenchmarkIdleFleet (bench/README.md, "Idle fleet") COUNT times and
# prints the median of every figure over the runs, with each run's value.
#
#   bench/fleet.sh                       COUNT=3 runs
#   COUNT=5 FLEET_IDLE=30s bench/fleet.sh
#   OUT=dir bench/fleet.sh summary       only summarise earlier raw output
#
# Environment: COUNT (default 3), FLEET_IDLE (the idle window, 60s),
# FLEET_ROUNDS (forced reconcile rounds, 200), FLEET_ROUND_GAP (time between
# them, 100ms), OUT (directory for the raw
# output; default a new temporary directory).
set -euo pipefail

cd "$(dirname "$0")/.."

COUNT=${COUNT:-3}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/nba-fleet.XXXXXX")}
mkdir -p "$OUT"

# A run cut short (^C, go test's timeout) runs none of the benchmark's
# cleanups, and HAProxy and the 128 builders are in process groups of their
# own, so nothing else stops them. The benchmark lists their pids in this
# file and removes it once it has stopped them all.
pids=$OUT/fleet.pids
leftovers() {
	[ -s "$pids" ] || return 0
	local pid cmd
	while read -r pid; do
		cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || continue
		case $cmd in
		*haproxy* | *nix-builder-autoscaler*)
			echo "fleet.sh: killing leftover $pid: $cmd" >&2
			kill -KILL "$pid" 2>/dev/null || true
			;;
		esac
	done <"$pids"
	rm -f "$pids"
}
trap leftovers EXIT
trap 'exit 130' INT TERM

status=0
if [ "${1:-}" != summary ]; then
	if ! command -v haproxy >/dev/null 2>&1; then
		echo "haproxy not found: install Debian's haproxy package (2.6); the benchmark starts it" >&2
		exit 1
	fi
	{
		echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
		echo "# cores $(nproc), ulimit -n $(ulimit -n), $(haproxy -v | head -1), $(go version)"
		echo "# COUNT=$COUNT FLEET_IDLE=${FLEET_IDLE:-60s} FLEET_ROUNDS=${FLEET_ROUNDS:-200} FLEET_ROUND_GAP=${FLEET_ROUND_GAP:-100ms}"
	} >"$OUT/fleet.txt"
	echo "== go test ./e2e/ -run '^\$' -bench IdleFleet -benchtime 1x -count $COUNT -timeout 60m" >&2
	NBA_FLEET_PIDS=$pids go test ./e2e/ -run '^$' -bench IdleFleet -benchtime 1x -count "$COUNT" -timeout 60m 2>&1 |
		tee -a "$OUT/fleet.txt" >&2 || status=$?
fi

echo
echo "Raw output: $OUT/fleet.txt"
awk "$(cat bench/stats.awk)"'
function show(u,    i, runs) {
	if (!(u in nv) || (u in shown)) return
	shown[u] = 1
	runs = ""
	for (i = 1; i <= nv[u]; i++) runs = runs sprintf(" %.4g", v[u, i])
	printf "  %-16s %10.4g   %-13s runs:%s\n", u, median(u), goal[u], runs
}
BEGIN {
	goal["daemon-cpu-%"] = "(goal <= 2)"
	goal["round-p99-ms"] = "(goal <= 10)"
	n = split("daemon-cpu-% round-p50-ms round-p99-ms round-max-ms round-cpu-ms round-own-p99-ms haproxy-stat-p50-ms haproxy-stat-p99-ms observe-p99-ms store-p99-ms list-p99-ms servers-p99-ms plan-p99-ms apply-p99-ms publish-p99-ms push-p99-ms steal-% burst-p50-ms burst-p99-ms haproxy-cpu-% builders-cpu-% agent-checks/s idle-rounds/min fleet-up-s", order, " ")
}
# The figures follow the iteration count; anything printed while the
# benchmark ran (NBA_BENCH_TRACE=1) can sit between its name and them.
/ ns\/op/ {
	for (k = 1; k <= NF && $k != "ns/op"; k++) ;
	runs++
	for (i = k - 1; i + 1 <= NF; i += 2) {
		u = $(i + 1)
		if (!(u in nv)) units[++nu] = u
		v[u, ++nv[u]] = $i
	}
}
END {
	if (!runs) { print "no BenchmarkIdleFleet result"; exit }
	printf "BenchmarkIdleFleet: median of %d run(s)\n", runs
	for (i = 1; i <= n; i++) show(order[i])
	for (i = 1; i <= nu; i++) show(units[i])
}' "$OUT/fleet.txt"
exit "$status"
