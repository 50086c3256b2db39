#!/usr/bin/env bash
# Stop the broker started by start.sh STATE_DIR.  "stop.sh STATE_DIR kill"
# kills it with SIGKILL (a crash); otherwise SIGTERM and a bounded wait.
set -euo pipefail
state=${1:?usage: stop.sh STATE_DIR [kill]}
mode=${2:-term}
[ -f "$state/pid" ] || exit 0
pid=$(cat "$state/pid")
if kill -0 "$pid" 2>/dev/null; then
	if [ "$mode" = kill ]; then kill -KILL "$pid"; else kill -TERM "$pid"; fi
	deadline=$((SECONDS + 60))
	while kill -0 "$pid" 2>/dev/null; do
		if [ $SECONDS -ge $deadline ]; then kill -KILL "$pid" 2>/dev/null || true; fi
		sleep 0.1
	done
fi
rm -f "$state/pid"
