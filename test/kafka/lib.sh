# Shared by start.sh and start-cluster.sh (sourced): a free loopback port,
# a new cluster id, the brokers' log settings, and formatting a node's
# storage.

free_port() {
	python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

new_cluster_id() {
	python3 -c 'import base64,uuid;print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))'
}

# write_log4j2 DIR: DIR/log4j2.properties, Kafka's own INFO lines only.
write_log4j2() {
	cat >"$1/log4j2.properties" <<'LOG'
rootLogger.level=WARN
rootLogger.appenderRef.stdout.ref=STDOUT
appender.stdout.type=Console
appender.stdout.name=STDOUT
appender.stdout.layout.type=PatternLayout
appender.stdout.layout.pattern=[%d] %p %m (%c)%n
logger.kafka.name=kafka
logger.kafka.level=INFO
LOG
}

# format_storage DIR CLUSTER_ID [--standalone]: format the node of
# DIR/server.properties (jars in $lib).  A cluster id may begin with "-":
# it goes as --cluster-id=ID, never as a separate argument that would read
# as an option.
format_storage() {
	java -cp "$lib/*" -Dlog4j2.configurationFile="$1/log4j2.properties" \
		kafka.tools.StorageTool format ${3:-} --cluster-id="$2" \
		-c "$1/server.properties" >"$1/format.log" 2>&1 ||
		{ cat "$1/format.log" >&2; return 1; }
}
