#!/usr/bin/env bash
# Start a throwaway single-node Apache Kafka broker (KRaft, broker+controller in
# one process) on a free loopback port.
#
#   test/kafka/start.sh STATE_DIR [key=value ...]
#
# Extra key=value pairs are appended to server.properties.  On success prints
# "127.0.0.1:PORT" and leaves STATE_DIR/{pid,port,server.properties,kafka.log}.
# The broker keeps its data in STATE_DIR/data, so stop.sh followed by start.sh
# with the same STATE_DIR restarts the same broker on the same port.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
state=${1:?usage: start.sh STATE_DIR [key=value ...]}
shift
mkdir -p "$state"
state=$(cd "$state" && pwd)
lib=$("$here/fetch.sh")
. "$here/lib.sh"

if [ ! -f "$state/server.properties" ]; then
	port=$(free_port)
	cport=$(free_port)
	cat >"$state/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$state/data
num.partitions=4
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.flush.interval.messages=9223372036854775807
PROPS
	for kv in "$@"; do echo "$kv" >>"$state/server.properties"; done
	echo "$port" >"$state/port"
	write_log4j2 "$state"
	format_storage "$state" "$(new_cluster_id)" --standalone || exit 1
fi
port=$(cat "$state/port")

if [ -f "$state/pid" ] && kill -0 "$(cat "$state/pid")" 2>/dev/null; then
	echo "127.0.0.1:$port"
	exit 0
fi

# A small heap: the tests run several brokers one after another on a 2-core box.
setsid java -Xms256m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto \
	-Djava.awt.headless=true \
	-Dlog4j2.configurationFile="$state/log4j2.properties" \
	-cp "$lib/*" kafka.Kafka "$state/server.properties" >>"$state/kafka.log" 2>&1 </dev/null &
echo $! >"$state/pid"

# KAFKA_NO_WAIT=1: return at once (start-cluster.sh starts every node of a
# quorum before any can answer).
if [ -n "${KAFKA_NO_WAIT:-}" ]; then
	echo "127.0.0.1:$port"
	exit 0
fi

# Wait (with a deadline) until the broker answers a metadata request.
deadline=$((SECONDS + ${KAFKA_START_TIMEOUT:-90}))
until kcat -b "127.0.0.1:$port" -L -m 2 >/dev/null 2>&1; do
	if ! kill -0 "$(cat "$state/pid")" 2>/dev/null; then
		echo "start.sh: kafka exited; see $state/kafka.log" >&2
		tail -30 "$state/kafka.log" >&2
		exit 1
	fi
	if [ $SECONDS -ge $deadline ]; then
		echo "start.sh: kafka did not answer on 127.0.0.1:$port in time" >&2
		tail -30 "$state/kafka.log" >&2
		exit 1
	fi
	sleep 0.2
done
echo "127.0.0.1:$port"
