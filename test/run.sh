#!/usr/bin/env bash
# Run voutbox's whole test suite on a fresh Debian 12 machine:
#   bash test/run.sh
# Installs the dependencies, fetches Kafka, builds and installs the
# extension, then runs pg_regress, the isolation tests and the TAP suite
# (each TAP test starts its own PostgreSQL cluster and Kafka broker on
# loopback), a short run of the benchmark, and builds the Debian package and
# runs the demo against it.  PostgreSQL refuses to run as
# root, so as root the tests run as an unprivileged user on a copy of the
# tree.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"

. test/setup.sh
voutbox_build

if [ "$(id -u)" -eq 0 ]; then
	workdir=$(mktemp -d /tmp/voutbox-test.XXXXXX)
	cp -a "$here/." "$workdir/"
	cd "$workdir"
else
	workdir=$here
fi
voutbox_as_user "$workdir"

# Print what failed: pg_regress diffs and the end of the failed TAP tests' logs.
show_failures() {
	echo "=== test failures${1:+ ($1)} ===" >&2
	for f in regression.diffs output_iso/regression.diffs; do
		[ -f "$f" ] && cat "$f" >&2
	done
	# (The logs' lines start with a timestamp: "[22:06:44.560](1.523s) not ok 8 - ...".)
	local failed='(^|s\) )not ok |Bail out|Looks like you failed|timed out waiting|sanitizer reports'
	for f in tmp_check/log/regress_log_*; do
		[ -f "$f" ] || continue
		grep -qE "$failed" "$f" || continue
		echo "--- $f: the failures" >&2
		grep -E -A12 "$failed" "$f" | head -120 >&2
		echo "--- $f: its end" >&2
		tail -40 "$f" >&2
	done
}

status=0
"${as[@]}" make -s PG_CONFIG=$PG_CONFIG installcheck || status=$?
[ $status -eq 0 ] || show_failures

# The TAP suite again, with the extension built with ASan and UBSan and the
# server (only) running with libasan preloaded; any report fails.  Skip with
# VOUTBOX_SANITIZE_PASS=0.
if [ $status -eq 0 ] && [ "${VOUTBOX_SANITIZE_PASS:-1}" != 0 ]; then
	sudo=
	[ "$(id -u)" -eq 0 ] || sudo=sudo
	sandir=$(mktemp -d /tmp/voutbox-sanitize.XXXXXX)
	# Whatever happens, leave the normal build (of $here) installed.
	trap 'rm -rf "$sandir"; cd "$here" && $sudo make -s PG_CONFIG=$PG_CONFIG install >/dev/null ||
		echo "could not reinstall the normal build: run make install" >&2' EXIT
	cd "$here"
	voutbox_sanitize_build "$sandir"
	cd "$workdir"
	start=$SECONDS
	"${as[@]}" env VOUTBOX_SANITIZE_PRELOAD="$VOUTBOX_SANITIZE_PRELOAD" \
		make -s PG_CONFIG=$PG_CONFIG installcheck REGRESS= ISOLATION= || status=$?
	echo "sanitizer pass: $((SECONDS - start))s" >&2
	# Every report, including any a test's own check missed (e.g. one from a
	# process that failed while the test's nodes were torn down).  ASan's are
	# files, UBSan's are in the server logs.  A crash-looping worker can leave
	# hundreds: the first three of each kind are printed.
	asan=$(ls -tr tmp_check/sanitizer 2>/dev/null | sed 's|^|tmp_check/sanitizer/|' || true)
	ubsan=$(grep -l -E "runtime error:|Sanitizer" tmp_check/log/*.log 2>/dev/null || true)
	if [ -n "$asan$ubsan" ]; then
		status=1
		echo "=== sanitizer reports: $(echo "$asan" | grep -c .) ASan report files;" \
			"UBSan/other in: ${ubsan:-none} ===" >&2
		for f in $(echo "$asan" | head -3); do
			echo "--- $f" >&2
			cat "$f" >&2
		done
		for f in $ubsan; do
			echo "--- $f" >&2
			grep -m3 -E -A25 "runtime error:|Sanitizer" "$f" >&2
		done
	fi
	[ $status -eq 0 ] || show_failures "sanitizer pass"
fi

# Nothing the tests started may outlive them.
pkill -f "kafka.Kafka $workdir" 2>/dev/null || true

# A short run of the benchmark: it still produces every figure.  Skip with
# VOUTBOX_BENCH_SMOKE=0.
if [ $status -eq 0 ] && [ "${VOUTBOX_BENCH_SMOKE:-1}" != 0 ]; then
	cd "$here"
	start=$SECONDS
	bash test/bench/smoke.sh || status=$?
	echo "benchmark smoke run: $((SECONDS - start))s" >&2
fi
# The Debian package: built with pg_buildext, installed in place of the
# build above, the demo run against it (test/deb.sh).  Skip with
# VOUTBOX_DEB=0.
if [ $status -eq 0 ] && [ "${VOUTBOX_DEB:-1}" != 0 ]; then
	cd "$here"
	start=$SECONDS
	bash test/deb.sh || status=$?
	echo "Debian package and demo: $((SECONDS - start))s" >&2
fi
exit $status
