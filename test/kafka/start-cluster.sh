#!/usr/bin/env bash
# Start a throwaway Apache Kafka cluster of N KRaft nodes on loopback, each a
# broker and a controller (a static quorum of N voters), with replication
# factor N and min.insync.replicas N-1 for new topics.
#
#   test/kafka/start-cluster.sh STATE_DIR N [key=value ...]
#
# Node i keeps its state in STATE_DIR/node<i>, as test/kafka/start.sh does:
# stop.sh STATE_DIR/node<i> [kill] stops (or kills) it, start.sh
# STATE_DIR/node<i> starts it again on the same port.  Extra key=value pairs
# go into every node's server.properties.  Prints the bootstrap list
# "127.0.0.1:P1,127.0.0.1:P2,..." once every node answers.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
state=${1:?usage: start-cluster.sh STATE_DIR N [key=value ...]}
n=${2:?usage: start-cluster.sh STATE_DIR N [key=value ...]}
shift 2
mkdir -p "$state"
state=$(cd "$state" && pwd)
lib=$("$here/fetch.sh")
. "$here/lib.sh"

if [ ! -f "$state/node1/server.properties" ]; then
	voters=
	for i in $(seq 1 "$n"); do
		mkdir -p "$state/node$i"
		free_port >"$state/node$i/port"
		free_port >"$state/node$i/cport"
		voters="$voters${voters:+,}$i@127.0.0.1:$(cat "$state/node$i/cport")"
	done
	cluster_id=$(new_cluster_id)
	for i in $(seq 1 "$n"); do
		d=$state/node$i
		port=$(cat "$d/port")
		cport=$(cat "$d/cport")
		cat >"$d/server.properties" <<PROPS
process.roles=broker,controller
node.id=$i
controller.quorum.voters=$voters
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$d/data
num.partitions=4
default.replication.factor=$n
min.insync.replicas=$((n - 1))
auto.create.topics.enable=true
offsets.topic.replication.factor=$n
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=$n
transaction.state.log.min.isr=$((n - 1))
share.coordinator.state.topic.replication.factor=$n
share.coordinator.state.topic.min.isr=$((n - 1))
group.initial.rebalance.delay.ms=0
unclean.leader.election.enable=false
PROPS
		for kv in "$@"; do echo "$kv" >>"$d/server.properties"; done
		write_log4j2 "$d"
		format_storage "$d" "$cluster_id" || exit 1
	done
fi

# Every node first (the quorum needs a majority), then wait for each.
for i in $(seq 1 "$n"); do
	KAFKA_NO_WAIT=1 "$here/start.sh" "$state/node$i" >/dev/null
done
brokers=
deadline=$((SECONDS + ${KAFKA_START_TIMEOUT:-120}))
for i in $(seq 1 "$n"); do
	port=$(cat "$state/node$i/port")
	until kcat -b "127.0.0.1:$port" -L -m 2 2>/dev/null | grep -q "^ *$n brokers:"; do
		if [ $SECONDS -ge $deadline ]; then
			echo "start-cluster.sh: node $i did not see $n brokers in time" >&2
			tail -30 "$state/node$i/kafka.log" >&2
			exit 1
		fi
		sleep 0.2
	done
	brokers="$brokers${brokers:+,}127.0.0.1:$port"
done
echo "$brokers"
