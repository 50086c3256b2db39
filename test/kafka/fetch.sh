#!/usr/bin/env bash
# Fetch Apache Kafka (broker + runtime dependencies) from Maven Central into a
# git-ignored cache next to this script.  Idempotent: does nothing when the
# jars are already there.  Prints the directory holding the jars.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${VOUTBOX_KAFKA_CACHE:-$here/.cache}
lib=$cache/lib
if [ ! -f "$lib/.complete" ]; then
	command -v mvn >/dev/null || { echo "fetch.sh: mvn is not installed" >&2; exit 1; }
	rm -rf "$lib"
	mkdir -p "$lib"
	mvn -q -B -f "$here/pom.xml" -Dmaven.repo.local="$cache/m2" \
		dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$lib" >&2
	ls "$lib"/kafka_2.13-*.jar >/dev/null
	touch "$lib/.complete"
fi
echo "$lib"
