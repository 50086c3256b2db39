#!/usr/bin/env bash
# Fetch Debezium 3.6.1 (embedded engine + PostgreSQL connector), kafka-clients
# and log4j from Maven Central into a git-ignored cache next to this script,
# compile DebeziumBench.java with javac, and print the classpath to run it:
#
#   java -cp "$(test/bench/debezium/build.sh)" DebeziumBench key=value ...
#
# Idempotent: fetches only once (remove .cache/lib after changing pom.xml),
# compiles only when the source is newer.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${VOUTBOX_DEBEZIUM_CACHE:-$here/.cache}
lib=$cache/lib
classes=$cache/classes
if [ ! -f "$lib/.complete" ]; then
	command -v mvn >/dev/null || { echo "build.sh: mvn is not installed" >&2; exit 1; }
	rm -rf "$lib"
	mkdir -p "$lib"
	mvn -q -B -Dstyle.color=never -f "$here/pom.xml" -Dmaven.repo.local="$cache/m2" \
		dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$lib" >&2
	ls "$lib"/debezium-connector-postgres-*.jar "$lib"/kafka-clients-*.jar >/dev/null
	touch "$lib/.complete"
fi
if [ ! -f "$classes/DebeziumBench.class" ] || [ "$here/DebeziumBench.java" -nt "$classes/DebeziumBench.class" ] ||
	[ "$here/log4j2.properties" -nt "$classes/DebeziumBench.class" ]; then
	command -v javac >/dev/null || { echo "build.sh: javac is not installed" >&2; exit 1; }
	rm -rf "$classes"
	mkdir -p "$classes"
	javac -nowarn --release 17 -cp "$lib/*" -d "$classes" "$here/DebeziumBench.java" >&2
	cp "$here/log4j2.properties" "$classes/log4j2.properties"
fi
echo "$lib/*:$classes"
