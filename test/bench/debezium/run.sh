#!/usr/bin/env bash
# Build if needed, then run the Debezium baseline:  run.sh key=value ...
# (see DebeziumBench.java for the keys).  Prints "ready" on stdout once streaming.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cp=$("$here/build.sh")
exec java ${DEBEZIUM_BENCH_JAVA_OPTS:--Xms256m -Xmx512m} -cp "$cp" DebeziumBench "$@"
