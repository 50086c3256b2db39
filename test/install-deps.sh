#!/usr/bin/env bash
# Install what voutbox needs to build, test and run its demo on Debian 12:
# PostgreSQL 15 with its server headers, librdkafka, json-c, kcat, the TAP
# test modules' IPC::Run, Maven and a JDK (for the Kafka test broker and the
# benchmark's Debezium baseline), gnuplot (the benchmark's chart), postgres_exporter
# (the metrics test), debhelper and postgresql-server-dev-all (pg_buildext:
# the Debian package, test/deb.sh).
# Runs apt-get only for what is missing.  Needs root or sudo.
set -euo pipefail

packages=(postgresql-15 postgresql-server-dev-15 postgresql-contrib librdkafka-dev
	libjson-c-dev kcat libipc-run-perl maven make gcc pkg-config python3 gnuplot-nox
	prometheus-postgres-exporter debhelper postgresql-server-dev-all dpkg-dev)
command -v javac >/dev/null 2>&1 || packages+=(openjdk-17-jdk-headless)

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=
[ "$(id -u)" -eq 0 ] || sudo=sudo
echo "install-deps: installing ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
