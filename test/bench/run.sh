#!/usr/bin/env bash
# Run voutbox's benchmarks (test/bench/bench.pl) on this machine:
#   bash test/bench/run.sh
# Builds and installs like test/run.sh, then runs as an unprivileged user.
# Settings: BENCH_EVENTS (200000), BENCH_BATCH (10000), BENCH_SECONDS (15),
# BENCH_RATE (100).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$here"
sudo=
[ "$(id -u)" -eq 0 ] || sudo=sudo
bash test/install-deps.sh
export PATH=/usr/lib/postgresql/15/bin:$PATH
test/kafka/fetch.sh >/dev/null
make -s PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config all test-tools
$sudo make -s PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config install

work=$(mktemp -d /tmp/voutbox-bench.XXXXXX)
trap 'pkill -f "kafka.Kafka $work" 2>/dev/null || true; rm -rf "$work"' EXIT
cp -a "$here/." "$work/"
run=()
if [ "$(id -u)" -eq 0 ]; then
	user=${VOUTBOX_TEST_USER:-voutbox_test}
	id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
	chown -R "$user" "$work"
	run=(runuser -u "$user" --)
fi
cd "$work"
"${run[@]}" mkdir -p tmp_check/log
pgxs=$(dirname "$(/usr/lib/postgresql/15/bin/pg_config --pgxs)")/../../src/test/perl
"${run[@]}" env TESTDIR="$work" PG_REGRESS="$pgxs/../regress/pg_regress" BENCH_REPORT="$work/report.md" \
	perl -I "$pgxs" -I test/perl test/bench/bench.pl >/dev/null ||
	{ tail -40 tmp_check/log/regress_log_bench >&2; exit 1; }
cat "$work/report.md"
