#!/usr/bin/env bash
# A short run of the benchmark (test/bench/run.sh), for CI: tiny sizes, and a
# check that it produces every figure and the chart.  Its figures mean nothing.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=$(mktemp -d /tmp/voutbox-smoke.XXXXXX)
trap 'rm -rf "$out"' EXIT
BENCH_EVENTS=2000 BENCH_SECONDS=2 BENCH_RATES=50,100 BENCH_BULK=500 BENCH_CHART_OUT="$out/bench.png" \
	bash "$here/test/bench/run.sh" >"$out/report.md"
fail=0
for row in 'a. drain: 2000 events' 'a. drain: first event' 'c. drain: CPU' \
	'b. latency at 50 events/s' 'b. latency at 100 events/s' 'c. CPU at 50 events/s' 'c. CPU at 100 events/s' \
	'c. peak RSS' "e. other topics' latency at 50 events/s" 'd. save path, no keys' 'd. save path with idempotency keys' \
	'd. save path in bulk, no keys' 'd. save path in bulk, with idempotency keys' 'd. save path with 20 routes' \
	'f. exactly_once drain: 2000 events' 'f. exactly_once drain: worker CPU'; do
	line=$(grep -F "| $row" "$out/report.md" || true)
	# every figure column filled: no '-' where Debezium's or a ratio belongs, no nan
	if [ -z "$line" ] || echo "$line" | grep -qiE 'nan|inf\b'; then
		echo "benchmark smoke: missing or bad row: $row" >&2
		fail=1
	fi
done
if grep -F '| a. drain: 2000' "$out/report.md" | grep -qF '| - |'; then
	echo "benchmark smoke: no Debezium figure" >&2
	fail=1
fi
[ -s "$out/bench.png" ] || { echo "benchmark smoke: no chart" >&2; fail=1; }
[ $fail -eq 0 ] || { cat "$out/report.md" >&2; exit 1; }
echo "benchmark smoke: every figure produced" >&2
