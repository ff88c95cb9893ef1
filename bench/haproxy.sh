#!/bin/sh
# Runs the HAProxy/SPOE benchmarks (bench/README.md) -count times and prints
# the median of every figure across the runs, the largest of the "max"
# figures, and the SPOE/plain connection rates and their ratio.
#
#   bench/haproxy.sh              all three parts
#   bench/haproxy.sh spoa conns   only some: spoa, conns, reach
#   OUT=dir bench/haproxy.sh summary   only summarise earlier raw output
#
# Environment: COUNT (default 3), SPOA_BENCHTIME (1s), CONNS_BENCHTIME
# (10000x), REACH_BENCHTIME (5x), OUT (directory for the raw output; default
# a new temporary directory).
set -eu

cd "$(dirname "$0")/.."

if ! command -v haproxy >/dev/null 2>&1; then
	echo "haproxy not found: install Debian's haproxy package (2.6); the e2e benchmarks start it" >&2
	exit 1
fi

COUNT=${COUNT:-3}
SPOA_BENCHTIME=${SPOA_BENCHTIME:-1s}
CONNS_BENCHTIME=${CONNS_BENCHTIME:-10000x}
REACH_BENCHTIME=${REACH_BENCHTIME:-5x}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/nba-bench.XXXXXX")}
mkdir -p "$OUT"

parts=${*:-spoa conns reach}

run() { # name, go test arguments...
	name=$1
	shift
	echo "== $name: go test $*" >&2
	go test "$@" | tee "$OUT/$name.txt" >&2
}

for p in $parts; do
	case $p in
	spoa)
		run spoa ./spoa/ -run '^$' -bench . -benchtime "$SPOA_BENCHTIME" -count "$COUNT"
		;;
	conns)
		run conns ./e2e/ -run '^$' -bench 'HAProxyConnections' -benchtime "$CONNS_BENCHTIME" -count "$COUNT" -timeout 30m
		;;
	reach)
		run reach ./e2e/ -run '^$' -bench 'ReachableToReady' -benchtime "$REACH_BENCHTIME" -count "$COUNT" -timeout 90m
		;;
	summary) ;;
	*)
		echo "unknown part $p (want spoa, conns, reach or summary)" >&2
		exit 2
		;;
	esac
done

echo
echo "Raw output: $OUT"
echo "Figures: median over $COUNT runs (for *max* figures also the largest)."
for p in spoa conns reach; do
	if [ -f "$OUT/$p.txt" ]; then cat "$OUT/$p.txt"; fi
done | awk "$(cat bench/stats.awk)"'
function largest(k,    i, m) {
	m = v[k, 1] + 0
	for (i = 2; i <= nv[k]; i++) if (v[k, i] + 0 > m) m = v[k, i] + 0
	return m
}
/^Benchmark/ {
	name = $1
	sub(/-[0-9]+$/, "", name)
	if (!(name in seen)) { seen[name] = 1; names[++nn] = name }
	for (i = 3; i + 1 <= NF; i += 2) {
		k = name SUBSEP $(i + 1)
		if (!(k in nv)) { nu[name]++; unit[name, nu[name]] = $(i + 1) }
		v[k, ++nv[k]] = $i
	}
}
END {
	for (n = 1; n <= nn; n++) {
		name = names[n]
		printf "\n%s\n", name
		for (u = 1; u <= nu[name]; u++) {
			k = name SUBSEP unit[name, u]
			line = sprintf("  %-28s %12.4g", unit[name, u], median(k))
			if (unit[name, u] ~ /max/) line = line sprintf("   (largest %.4g)", largest(k))
			print line
		}
	}
	for (n = 1; n <= nn; n++) {
		name = names[n]
		if (!((name SUBSEP "spoe-conns/s") in nv)) continue
		if (!hdr++) printf "\nConnections/s, SPOE vs plain (goal: ratio >= 0.8), medians:\n"
		c = name
		sub(/.*\//, "", c)
		printf "  %-12s spoe %8.0f  plain %8.0f  ratio %.2f\n", c,
			median(name SUBSEP "spoe-conns/s"), median(name SUBSEP "plain-conns/s"), median(name SUBSEP "ratio")
	}
}'
