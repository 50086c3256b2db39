-- Bad input: an ERROR with a specific SQLSTATE that names the argument, and
-- nothing stored.
CREATE EXTENSION voutbox;
\set VERBOSITY default

-- required arguments
SELECT outbox_save(NULL, 'lead', '1', 'lead.created.v1', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('', 'lead', '1', 'lead.created.v1', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', NULL, '1', 'lead.created.v1', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', '', '1', 'lead.created.v1', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', NULL, 'lead.created.v1', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', '', 'lead.created.v1', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', '1', NULL, '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}', pii => NULL);
\echo :LAST_ERROR_SQLSTATE

-- event_type must be name.vN
SELECT outbox_save('acme', 'lead', '1', 'lead.created', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', '1', 'v1', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', '1', '.v1', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', '1', 'lead..created.v1', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v0', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v01', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1x', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v99999999999', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', '1', 'lead created.v1', '{}');
\echo :LAST_ERROR_SQLSTATE
-- ... and agree with event_version
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v2', '{}', event_version => 1);
\echo :LAST_ERROR_SQLSTATE

-- payload size limit (JSON text of the payload)
SET voutbox.max_payload_bytes = 100;
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1',
                   jsonb_build_object('blob', repeat('x', 200)));
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', 'fits', 'lead.created.v1',
                   jsonb_build_object('blob', repeat('x', 80))) IS NOT NULL AS fits;
-- ... and of the event's data together: payload, metadata, consent and
-- pii_fields (a control character is 6 bytes of JSON text: \u0001).
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}',
                   metadata => jsonb_build_object('m', repeat(chr(1), 20)));
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', jsonb_build_object('blob', repeat('x', 40)),
                   consent => jsonb_build_object('c', repeat('y', 50)));
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}',
                   pii_fields => array_fill('field'::text, ARRAY[20]));
SELECT outbox_save('acme', 'lead', 'fits', 'lead.created.v1', '{"a": 1}',
                   metadata => '{"m": 1}', consent => '{"c": 1}',
                   pii_fields => ARRAY['email']) IS NOT NULL AS fits;
RESET voutbox.max_payload_bytes;

-- metadata must be an object
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}', metadata => '[1, 2]');
\echo :LAST_ERROR_SQLSTATE

-- optional text arguments may be NULL (default) but not empty
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}', idempotency_key => '');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}', correlation_id => '');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}', producer => '');
\echo :LAST_ERROR_SQLSTATE

-- malformed trace ids
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}', trace_id => 'abc');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}',
                   trace_id => '4BF92F3577B34DA6A3CE929D0E0E4736');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}',
                   trace_id => '00000000000000000000000000000000');
\echo :LAST_ERROR_SQLSTATE
SET voutbox.traceparent = 'not-a-traceparent';
\echo :LAST_ERROR_SQLSTATE
SET voutbox.traceparent = '00-00000000000000000000000000000000-b7ad6b7169203331-01';
\echo :LAST_ERROR_SQLSTATE

-- pii_fields
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}', pii_fields => ARRAY['a', NULL]);
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}', pii_fields => ARRAY[['a'], ['b']]);
\echo :LAST_ERROR_SQLSTATE

-- scheduled_for must be finite
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}', scheduled_for => 'infinity');
\echo :LAST_ERROR_SQLSTATE

-- a topic Kafka would refuse, named by the argument that makes it so
SELECT outbox_save('acme corp', 'lead', '1', 'lead.created.v1', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme/eu', 'lead', '1', 'lead.created.v1', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save(repeat('t', 240), 'lead', '1', 'lead.created.v1', '{}');
\echo :LAST_ERROR_SQLSTATE
-- the aggregate id is not part of the default topic, so anything goes there
SELECT outbox_save('acme', 'lead', 'any thing/ü', 'lead.created.v1', '{}') IS NOT NULL AS saved;

-- bad templates are refused when set
SET voutbox.topic_template = '{tenant}.{event_type}';
\echo :LAST_ERROR_SQLSTATE
SET voutbox.key_template = '{aggregate_id';
\echo :LAST_ERROR_SQLSTATE
SET voutbox.key_template = 'x}';
\echo :LAST_ERROR_SQLSTATE

-- librdkafka properties are checked by librdkafka itself
ALTER SYSTEM SET voutbox.kafka_properties = 'compression.type=zstd; linger.ms=20';
ALTER SYSTEM SET voutbox.kafka_properties = 'no.such.property=1';
\echo :LAST_ERROR_SQLSTATE
ALTER SYSTEM SET voutbox.kafka_properties = 'enable.idempotence=false';
\echo :LAST_ERROR_SQLSTATE
ALTER SYSTEM SET voutbox.kafka_properties = 'bootstrap.servers=elsewhere:9092';
\echo :LAST_ERROR_SQLSTATE
ALTER SYSTEM SET voutbox.kafka_properties = 'linger.ms';
\echo :LAST_ERROR_SQLSTATE
ALTER SYSTEM RESET voutbox.kafka_properties;

-- lengths: names up to 255 bytes, keys up to 1024 (they are indexed)
SELECT outbox_save(repeat('t', 256), 'lead', '1', 'lead.created.v1', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('acme', repeat('é', 128), '1', 'lead.created.v1', '{}');
SELECT outbox_save('acme', 'lead', repeat('a', 1025), 'lead.created.v1', '{}');
SELECT outbox_save('acme', 'lead', '1', repeat('e', 260) || '.v1', '{}');
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}', idempotency_key => repeat('k', 1025));
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}', correlation_id => repeat('c', 1025));
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}', producer => repeat('p', 256));
SELECT set_config('voutbox.producer', repeat('p', 256), false);
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}', trace_id => repeat('0', 256));
SET voutbox.key_template = '{aggregate_id}-{aggregate_id}';
SELECT outbox_save('acme', 'lead', repeat('a', 600), 'lead.created.v1', '{}');
RESET voutbox.key_template;
-- at the limits, with values that do not compress (the index rows fit)
SET voutbox.topic_template = 'limits';
SELECT string_agg(md5(g::text), '') AS noise FROM generate_series(1, 32) g \gset
SELECT count(*) AS at_the_limits FROM (
  SELECT outbox_save(left(:'noise', 255), left(:'noise', 255), :'noise', 'lead.created.v1', '{}',
                     idempotency_key => :'noise', correlation_id => :'noise',
                     producer => left(:'noise', 255))) s;
RESET voutbox.topic_template;
DELETE FROM voutbox.events WHERE topic = 'limits';

-- a failed call aborts the transaction and takes earlier events with it
BEGIN;
SELECT outbox_save('acme', 'lead', 'tx-1', 'lead.created.v1', '{}') IS NOT NULL AS saved;
SELECT outbox_save('acme', 'lead', 'tx-2', 'bad', '{}');
COMMIT;

-- nothing but the two valid events above was stored
SELECT aggregate_id FROM outbox ORDER BY aggregate_id;

DROP EXTENSION voutbox;
