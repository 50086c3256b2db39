#!/usr/bin/env bash
# Run voutbox's benchmarks (test/bench/bench.pl) on this machine:
#   bash test/bench/run.sh
# Builds and installs like test/run.sh, then runs as an unprivileged user.
# Prints the report (Markdown) and writes the chart to test/bench/bench.png.
# Settings: BENCH_EVENTS (200000), BENCH_BATCH (10000), BENCH_SECONDS (15),
# BENCH_RATES (500,2000), BENCH_BATCH_BYTES (8MB), BENCH_BULK (20000),
# BENCH_LINGER (1), BENCH_PARTS (save,drain,latency,silent,debezium).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$here"
. test/setup.sh
voutbox_build
# Debezium 3.6.1 and its dependencies, from Maven (cached next to it).
bash test/bench/debezium/build.sh >/dev/null

work=$(mktemp -d /tmp/voutbox-bench.XXXXXX)
trap 'pkill -f "kafka.Kafka $work" 2>/dev/null || true; rm -rf "$work"' EXIT
cp -a "$here/." "$work/"
voutbox_as_user "$work"
cd "$work"
"${as[@]}" mkdir -p tmp_check/log
pgxs=$(dirname "$($PG_CONFIG --pgxs)")/../../src/test/perl
"${as[@]}" env TESTDIR="$work" PG_REGRESS="$pgxs/../regress/pg_regress" BENCH_REPORT="$work/report.md" \
	BENCH_CHART="$work/bench.png" perl -I "$pgxs" -I test/perl test/bench/bench.pl >/dev/null ||
	{ tail -40 tmp_check/log/regress_log_bench >&2; exit 1; }
cat "$work/report.md"
[ ! -f "$work/bench.png" ] || cp "$work/bench.png" "${BENCH_CHART_OUT:-$here/test/bench/bench.png}"
