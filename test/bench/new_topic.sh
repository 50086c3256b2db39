#!/usr/bin/env bash
# First event on a brand-new topic (test/bench/new_topic.pl):
#   bash test/bench/new_topic.sh
# Builds and installs like test/run.sh, then runs as an unprivileged user.
# NEW_TOPIC_CONF: extra postgresql.conf settings, as a JSON object.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$here"
. test/setup.sh
voutbox_build

work=$(mktemp -d /tmp/voutbox-bench.XXXXXX)
trap 'pkill -f "kafka.Kafka $work" 2>/dev/null || true; rm -rf "$work"' EXIT
cp -a "$here/." "$work/"
voutbox_as_user "$work"
cd "$work"
"${as[@]}" mkdir -p tmp_check/log
pgxs=$(dirname "$($PG_CONFIG --pgxs)")/../../src/test/perl
"${as[@]}" env TESTDIR="$work" PG_REGRESS="$pgxs/../regress/pg_regress" NEW_TOPIC_REPORT="$work/report.md" \
	NEW_TOPICS="${NEW_TOPICS:-5}" NEW_TOPIC_DEADLINE="${NEW_TOPIC_DEADLINE:-20}" \
	NEW_TOPIC_CONF="${NEW_TOPIC_CONF:-{\"voutbox.create_topics\":\"on\"\}}" perl -I "$pgxs" -I test/perl test/bench/new_topic.pl ||
	{ tail -40 tmp_check/log/regress_log_new_topic >&2; exit 1; }
cat "$work/report.md"
