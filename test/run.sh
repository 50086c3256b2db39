#!/usr/bin/env bash
# Run voutbox's whole test suite on a fresh Debian 12 machine:
#   bash test/run.sh
# Installs the dependencies, fetches Kafka, builds and installs the
# extension, then runs pg_regress, the isolation tests and the TAP suite
# (each TAP test starts its own PostgreSQL cluster and Kafka broker on
# loopback).  PostgreSQL refuses to run as root, so as root the tests run as
# an unprivileged user on a copy of the tree.
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

status=0
"${as[@]}" make -s PG_CONFIG=$PG_CONFIG installcheck || status=$?

if [ $status -ne 0 ]; then
	echo "=== test failures ===" >&2
	for f in regression.diffs output_iso/regression.diffs; do
		[ -f "$f" ] && cat "$f" >&2
	done
	for f in tmp_check/log/regress_log_*; do
		[ -f "$f" ] || continue
		grep -q "^not ok\|Bail out\|timed out" "$f" || continue
		echo "--- $f" >&2
		tail -60 "$f" >&2
	done
fi

# Nothing the tests started may outlive them.
pkill -f "kafka.Kafka $workdir" 2>/dev/null || true
exit $status
