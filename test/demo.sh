#!/usr/bin/env bash
# voutbox demo on a fresh Debian 12 machine:
#   bash test/demo.sh
# Installs what is needed, builds and installs voutbox, starts a throwaway
# PostgreSQL 15 with voutbox preloaded and a local Apache Kafka broker,
# saves a few events in transactions (one rolled back) in two databases,
# each served by its own delivery worker, one database routing its invoices
# as CloudEvents, and prints what arrived in Kafka.  Everything it starts is stopped at the end.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"

. test/setup.sh
voutbox_build

work=$(mktemp -d /tmp/voutbox-demo.XXXXXX)
voutbox_as_user "$work"
pgdata=$work/pgdata
cleanup() {
	"${as[@]}" pg_ctl -D "$pgdata" -m fast stop >/dev/null 2>&1 || true
	test/kafka/stop.sh "$work/kafka" >/dev/null 2>&1 || true
	rm -rf "$work"
}
trap cleanup EXIT

echo "== starting Apache Kafka (single KRaft node on loopback)"
brokers=$(test/kafka/start.sh "$work/kafka")
echo "   $brokers"

echo "== starting PostgreSQL 15 with voutbox"
"${as[@]}" initdb -D "$pgdata" -A trust -U postgres --encoding=UTF8 --locale=C.UTF-8 >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >>"$pgdata/postgresql.conf" <<CONF
port = $port
listen_addresses = ''
unix_socket_directories = '$work'
shared_preload_libraries = 'voutbox'
voutbox.database = 'app, billing'
voutbox.brokers = '$brokers'
CONF
"${as[@]}" pg_ctl -D "$pgdata" -l "$work/postgres.log" -w start >/dev/null
psql=(psql -X -q -h "$work" -p "$port" -U postgres -v ON_ERROR_STOP=1)
"${psql[@]}" -d postgres -c 'CREATE DATABASE app' -c 'CREATE DATABASE billing'
"${psql[@]}" -d app <<'SQL'
CREATE EXTENSION voutbox;
CREATE TABLE leads (id int PRIMARY KEY, tenant_id text, source text);

-- A lead is created: the row and its event commit together.
BEGIN;
INSERT INTO leads VALUES (42, 'acme', 'web');
SELECT outbox_save(tenant_id => 'acme', aggregate_type => 'lead', aggregate_id => '42',
                   event_type => 'lead.created.v1', payload => '{"source": "web"}',
                   producer => 'demo@0.1') AS event_id \gset
COMMIT;

-- This one rolls back: neither the row nor the event ever existed.
BEGIN;
INSERT INTO leads VALUES (43, 'acme', 'phone');
SELECT outbox_save('acme', 'lead', '43', 'lead.created.v1', '{"source": "phone"}') AS rolled_back_id \gset
ROLLBACK;

-- An order is paid, with a trace context and an idempotency key.
SET voutbox.traceparent = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01';
SELECT outbox_save('acme', 'order', 'o-7', 'order.paid.v1', '{"amount": 129.90, "currency": "EUR"}',
                   idempotency_key => 'pay-o-7') IS NOT NULL AS saved;
-- Saved again (a client retry): same event, nothing new stored.
SELECT outbox_save('acme', 'order', 'o-7', 'order.paid.v1', '{"amount": 129.90, "currency": "EUR"}',
                   idempotency_key => 'pay-o-7') IS NOT NULL AS saved_again;
SQL

# A second database, with its own outbox and its own delivery worker.
"${psql[@]}" -d billing <<'SQL'
CREATE EXTENSION voutbox;
-- A route: billing's invoices go out as CloudEvents (structured mode), to a
-- topic of their own, with a static header.  Routes are rows, changed in
-- transactions.
INSERT INTO outbox_routes (name, event_type_pattern, topic_template, format, headers)
VALUES ('invoices-as-cloudevents', 'invoice.*', '{tenant_id}.invoices', 'cloudevents',
        '{"x-source-system": "billing"}');
SELECT outbox_save('acme', 'invoice', 'inv-2026-001', 'invoice.sent.v1', '{"total": 129.90}') IS NOT NULL AS saved;
SQL

echo "== waiting for delivery"
deadline=$((SECONDS + 60))
until [ "$("${psql[@]}" -d app -Atc "SELECT count(*) FROM outbox WHERE status = 'delivered'")" = 2 ]; do
	[ $SECONDS -lt $deadline ] || { echo "not delivered in time; see $work/postgres.log" >&2; exit 1; }
	sleep 0.1
done
until [ "$("${psql[@]}" -d billing -Atc "SELECT count(*) FROM outbox WHERE status = 'delivered'")" = 1 ]; do
	[ $SECONDS -lt $deadline ] || { echo "not delivered in time; see $work/postgres.log" >&2; exit 1; }
	sleep 0.1
done
"${psql[@]}" -d app -c 'SELECT event_type, aggregate_id, status, topic, key, published_at FROM outbox ORDER BY created_at'
"${psql[@]}" -d billing -c 'SELECT event_type, aggregate_id, status, topic, key, published_at FROM outbox'
"${psql[@]}" -d app -c 'SELECT database, pid IS NOT NULL AS running, state, delivered FROM outbox_worker ORDER BY database'

echo "== what arrived in Kafka"
for topic in acme.lead.created.v1 acme.order.paid.v1 acme.invoices; do
	kcat -b "$brokers" -C -t "$topic" -o beginning -e -q \
		-f '\ntopic %t  partition %p  offset %o  key %k\nheaders %h\n%s\n'
done
echo
echo "== the rolled-back lead 43 is not there; the retried payment is there once."
