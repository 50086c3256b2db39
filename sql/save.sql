-- outbox_save(): every argument, every default, and what is stored.
CREATE EXTENSION voutbox;

-- Callable unqualified with the default search_path, positional arguments only.
SELECT outbox_save('acme', 'lead', '42', 'lead.created.v1', '{"source": "web"}') AS id \gset
SELECT id = :'id' AS same_id, tenant_id, aggregate_type, aggregate_id, event_type,
       event_version, payload, metadata, idempotency_key = :'id' AS key_is_id,
       trace_id, correlation_id, created_at > now() - interval '1 minute' AS created_recently,
       published_at, retry_count, last_error, scheduled_for, pii, pii_fields,
       consent, producer, topic, key, status
  FROM outbox;

-- The id is a version 7 UUID.
SELECT substr(:'id', 15, 1) AS uuid_version;

-- Every argument named.
SELECT outbox_save(tenant_id      => 'acme',
                   aggregate_type => 'order',
                   aggregate_id   => 'o-7',
                   event_type     => 'order.paid.v3',
                   payload        => '{"amount": 12.50, "big": 123456789012345678901234567890}',
                   event_version  => 3,
                   metadata       => '{"source": "checkout"}',
                   idempotency_key => 'pay-o-7',
                   correlation_id => 'flow-9',
                   trace_id       => '4bf92f3577b34da6a3ce929d0e0e4736',
                   pii            => true,
                   pii_fields     => ARRAY['email', 'phone'],
                   consent        => '{"marketing": false}',
                   producer       => 'billing@1.4.2',
                   scheduled_for  => '2030-01-01 00:00:00+00') AS id2 \gset
SELECT event_version, payload, metadata, idempotency_key, trace_id, correlation_id,
       pii, pii_fields, consent, producer, scheduled_for, topic, key, status
  FROM outbox WHERE id = :'id2';
-- The traceparent header has the trace id and a random parent id.
SELECT traceparent ~ '^00-4bf92f3577b34da6a3ce929d0e0e4736-[0-9a-f]{16}-01$' AS traceparent_ok
  FROM voutbox.events WHERE id = :'id2';

-- Defaults from the session: voutbox.producer and voutbox.traceparent.
SET voutbox.producer = 'leads@2.0.0';
SET voutbox.traceparent = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01';
SELECT outbox_save('acme', 'lead', '43', 'lead.created.v1', '{}') AS id3 \gset
SELECT e.producer, e.trace_id, e.traceparent
  FROM voutbox.events e WHERE e.id = :'id3';
-- An explicit argument wins over the session.
SELECT outbox_save('acme', 'lead', '44', 'lead.created.v1', '{}', producer => 'other',
                   trace_id => '11111111111111111111111111111111') AS id4 \gset
SELECT e.producer, e.trace_id, e.traceparent ~ '^00-1{32}-[0-9a-f]{16}-01$' AS own_parent
  FROM voutbox.events e WHERE e.id = :'id4';
RESET voutbox.producer;
RESET voutbox.traceparent;

-- Templates route topic and key (superuser settings; default shown above).
SET voutbox.topic_template = 'events.{aggregate_type}.v{event_version}';
SET voutbox.key_template = '{tenant_id}/{aggregate_id}';
SELECT outbox_save('globex', 'invoice', 'i-1', 'invoice.sent.v2', '{}') AS id5 \gset
SELECT topic, key FROM outbox WHERE id = :'id5';
SET voutbox.key_template = '';
SELECT outbox_save('globex', 'invoice', 'i-2', 'invoice.sent.v2', '{}') AS id6 \gset
SELECT topic, key FROM outbox WHERE id = :'id6';
RESET voutbox.topic_template;
RESET voutbox.key_template;
SET voutbox.topic_template = '{nope}';

-- Atomicity: a rolled-back transaction stores nothing.
SELECT count(*) AS before FROM outbox \gset
BEGIN;
SELECT outbox_save('acme', 'lead', '50', 'lead.created.v1', '{}') IS NOT NULL AS saved;
ROLLBACK;
BEGIN;
SELECT outbox_save('acme', 'lead', '51', 'lead.created.v1', '{}') IS NOT NULL AS saved;
SAVEPOINT s;
SELECT outbox_save('acme', 'lead', '52', 'lead.created.v1', '{}') IS NOT NULL AS saved;
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT (SELECT count(*) FROM outbox) - :before AS added,
       (SELECT array_agg(aggregate_id) FROM outbox WHERE aggregate_id IN ('50', '51', '52')) AS ids;

-- Ids increase within a transaction, and so does the save order.
BEGIN;
SELECT count(outbox_save('acme', 'lead', 'seq', 'lead.created.v1', jsonb_build_object('n', g)))
  FROM generate_series(1, 5) g;
COMMIT;
SELECT array_agg(e.payload->>'n' ORDER BY e.id) AS by_id,
       array_agg(e.payload->>'n' ORDER BY e.seq) AS by_save_order
  FROM voutbox.events e WHERE e.aggregate_id = 'seq';

-- Every saved event carries its transaction's id.
BEGIN;
SELECT outbox_save('acme', 'lead', 'tx', 'lead.created.v1', '{}') IS NOT NULL AS saved;
SELECT txid = pg_current_xact_id() AS own_txid FROM voutbox.events WHERE aggregate_id = 'tx';
COMMIT;

DROP EXTENSION voutbox;
