#!/bin/sh
# The long form of the chaos test (e2e/chaos_test.go, docs/reliability.md):
# DURATION of faults with daemon kills, then SOAK of every fault but kills
# while the daemon's goroutines and RSS are sampled. Prints the figures and
# keeps them as JSON in $REPORT.
#
#   bench/chaos.sh                         20m + 10m soak, 4 clients
#   DURATION=1h SOAK=30m bench/chaos.sh
#   SEED=123 bench/chaos.sh                replay a run's fault order
set -eu
cd "$(dirname "$0")/.."
here=$(pwd)/scripts

DURATION=${DURATION:-20m}
SOAK=${SOAK:-10m}
WORKERS=${WORKERS:-4}
SEED=${SEED:-0}
REPORT=${REPORT:-$(mktemp "${TMPDIR:-/tmp}/nba-chaos.XXXXXX.json")}

"$here/apt-need" gcc libc6-dev haproxy
. "$here/need-moto"
export CGO_ENABLED=1

echo "== chaos: $DURATION with kills + $SOAK soak, $WORKERS clients; figures go to $REPORT" >&2
LOG=${REPORT%.json}.log
# The test bounds its own waits, so no -timeout. Progress (once a minute)
# and any violation are shown as they come.
go test ./e2e/ -run '^TestChaos$' -count=1 -timeout 0 -v -args \
	-chaos.duration="$DURATION" -chaos.soak="$SOAK" -chaos.workers="$WORKERS" \
	-chaos.seed="$SEED" -chaos.report="$REPORT" >"$LOG" 2>&1 &
pid=$!
tail -n +1 -f --pid=$pid "$LOG" | grep --line-buffered -E 'chaos [0-9]|INVARIANT' >&2 &
if wait $pid; then status=0; else status=$?; fi
wait
grep -E '^(--- |PASS|FAIL|ok )|INVARIANT|chaos seed' "$LOG" >&2 || true
if [ ! -s "$REPORT" ]; then
	echo "no report; the test's output is in $LOG" >&2
	exit 1
fi
cat "$REPORT"
python3 - "$REPORT" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
kills = sum(v for k, v in r["faults"].items() if k.startswith("kill"))
print(f"cycles {r['cycles']}, sessions {r['sessions']}, instances {r['instances']}, daemon kills {kills}, "
      f"faults {sum(r['faults'].values())}, injected EC2 errors {sum(r['injected_errors'].values())}, "
      f"invariant checks {r['invariant_checks']}, violations {len(r['violations'])}")
print(f"soak: goroutines {r['soak_goroutines_first']:.0f} -> {r['soak_goroutines_last']:.0f} (max {r['soak_goroutines_max']:.0f}), "
      f"RSS {r['soak_rss_first_mib']:.1f} -> {r['soak_rss_last_mib']:.1f} MiB (max {r['soak_rss_max_mib']:.1f}) over {r['soak_samples']} samples")
PY
[ "$status" -eq 0 ] || echo "the test failed (exit $status); its output is in $LOG" >&2
exit "$status"
