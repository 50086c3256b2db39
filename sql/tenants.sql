-- Tenant isolation and the privileges of README's table "Who may do what",
-- each tried as a role that is neither a superuser nor the extension's
-- owner.  No worker runs in this instance: its moves to the DLQ are
-- simulated.
CREATE EXTENSION voutbox;
\set VERBOSITY default
\set SHOW_CONTEXT never

CREATE ROLE regress_acme;            -- the application of tenant acme
CREATE ROLE regress_acme_web IN ROLE regress_acme;   -- inherits its rights
CREATE ROLE regress_acme_noinherit NOINHERIT IN ROLE regress_acme;
CREATE ROLE regress_globex;          -- the application of tenant globex
CREATE ROLE regress_reader;          -- bound to no tenant
CREATE ROLE regress_ops IN ROLE voutbox_admin;       -- an operator
GRANT SELECT ON outbox, outbox_dlq, outbox_dlq_summary, outbox_stats, outbox_worker, outbox_tenants
   TO regress_acme, regress_globex, regress_reader;
GRANT UPDATE, INSERT ON outbox_dlq TO regress_acme, regress_ops;
GRANT EXECUTE ON FUNCTION outbox_dlq_requeue(uuid), outbox_dlq_discard(uuid),
      outbox_dlq_requeue_where(text, text, text, text, timestamptz, timestamptz, timestamptz, timestamptz),
      outbox_dlq_discard_where(text, text, text, text, timestamptz, timestamptz, timestamptz, timestamptz)
   TO regress_acme, regress_globex;

-- ---- Without any binding: today's behaviour, any caller, every tenant.
SELECT count(*) AS bindings FROM voutbox.tenant_roles;
SET ROLE regress_acme;
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{"n": 1}', idempotency_key => 'k-1') AS a1 \gset
SELECT outbox_save('globex', 'order', '2', 'order.paid.v1', '{"n": 2}', idempotency_key => 'k-2') AS g1 \gset
SELECT tenant_id, count(*) FROM outbox GROUP BY 1 ORDER BY 1;
RESET ROLE;

-- ---- Bindings are data, changed in transactions.
BEGIN;
SELECT outbox_tenant_grant('acme', 'regress_acme') AS added;
SELECT outbox_tenant_grant('acme', 'regress_acme') AS added_again;
ROLLBACK;
SELECT count(*) AS bindings_after_rollback FROM voutbox.tenant_roles;
SELECT outbox_tenant_grant('acme', 'regress_acme'), outbox_tenant_grant('globex', 'regress_globex');
SELECT outbox_tenant_grant('acme', 'no_such_role');
SELECT tenant_id, role FROM outbox_tenants ORDER BY 1;

-- ---- Saving: only for one's own tenants (42501), also the idempotency
-- keys: another tenant's key cannot be squatted or probed.
SET ROLE regress_acme;
SELECT outbox_save('acme', 'lead', '3', 'lead.created.v1', '{"n": 3}') IS NOT NULL AS saved;
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}', idempotency_key => 'k-1') = :'a1' AS same_id;
SELECT outbox_save('globex', 'order', '4', 'order.paid.v1', '{"n": 4}');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('globex', 'order', '2', 'order.paid.v1', '{}', idempotency_key => 'k-2');
\echo :LAST_ERROR_SQLSTATE
SELECT outbox_save('initech', 'lead', '5', 'lead.created.v1', '{}');
\echo :LAST_ERROR_SQLSTATE
-- Views show the own tenant's rows only, every column of them.
SELECT tenant_id, aggregate_id FROM outbox ORDER BY aggregate_id;
SELECT count(*) AS rows, count(published_at) AS published FROM (SELECT * FROM outbox) o;
SELECT tenant_id, topic, pending FROM outbox_stats ORDER BY 1, 2;
SELECT tenant_id FROM outbox_tenants;
-- The storage, the bindings and the internal functions are not the
-- application's to read or change.
SELECT count(*) FROM voutbox.events;
SELECT count(*) FROM voutbox.tenant_roles;
SELECT voutbox.acts_for('globex');
SELECT outbox_tenant_grant('globex', 'regress_acme');
-- A security barrier: a function of the caller's sees no other tenant's row.
CREATE FUNCTION pg_temp.peek(t text) RETURNS boolean COST 0.0000001 LANGUAGE plpgsql AS
  $$ BEGIN RAISE NOTICE 'peeked at %', t; RETURN true; END $$;
SELECT count(*) FROM outbox WHERE pg_temp.peek(tenant_id);
SELECT count(*) FROM outbox_dlq WHERE pg_temp.peek(tenant_id);
DROP FUNCTION pg_temp.peek(text);
RESET ROLE;

-- A member that inherits the role's rights acts for its tenants; one that
-- does not inherit them must SET ROLE first.
SET ROLE regress_acme_web;
SELECT outbox_save('acme', 'lead', '6', 'lead.created.v1', '{}') IS NOT NULL AS saved_by_member;
RESET ROLE;
SET ROLE regress_acme_noinherit;
SELECT outbox_save('acme', 'lead', '7', 'lead.created.v1', '{}');
SET ROLE regress_acme;
SELECT outbox_save('acme', 'lead', '7', 'lead.created.v1', '{}') IS NOT NULL AS saved_after_set_role;
RESET ROLE;

-- A role bound to no tenant acts for none once isolation is on.
SET ROLE regress_reader;
SELECT outbox_save('acme', 'lead', '8', 'lead.created.v1', '{}');
SELECT count(*) AS sees FROM outbox;
RESET ROLE;

-- Members of voutbox_admin act for every tenant.
SET ROLE regress_ops;
SELECT outbox_save('initech', 'lead', '9', 'lead.created.v1', '{}') IS NOT NULL AS saved_any_tenant;
SELECT tenant_id, count(*) FROM outbox GROUP BY 1 ORDER BY 1;
RESET ROLE;

-- ---- The dead-letter queue.  The worker gives up on every event (simulated).
INSERT INTO voutbox.batches (lo, reach, events)
SELECT pg_current_snapshot(), pg_snapshot_xmax(pg_current_snapshot()), 0;
SET session_replication_role = replica;   -- as the worker's move: no trigger
INSERT INTO voutbox.dlq (id, tenant_id, aggregate_type, aggregate_id, event_type, event_version,
                        payload, idempotency_key, correlation_id, created_at, pii, topic, msg_key,
                        seq, retry_count, last_error, error_code, reason)
SELECT id, tenant_id, aggregate_type, aggregate_id, event_type, event_version, payload,
       coalesce(idempotency_key, id::text), correlation_id, created_at, pii, topic, msg_key, seq,
       1, 'MSG_SIZE_TOO_LARGE: Broker: Message size too large', 'MSG_SIZE_TOO_LARGE', 'permanent_error'
  FROM voutbox.events;
RESET session_replication_role;

SET ROLE regress_acme;
SELECT tenant_id, aggregate_id, status FROM outbox ORDER BY aggregate_id;
SELECT tenant_id, aggregate_id FROM outbox_dlq ORDER BY aggregate_id;
SELECT tenant_id, events FROM outbox_dlq_summary;
SELECT tenant_id, in_dlq FROM outbox_stats;
-- Another tenant's dead event is not there for it.
SELECT outbox_dlq_requeue(:'g1') AS requeued_other, outbox_dlq_discard(:'g1') AS discarded_other;
SELECT outbox_dlq_requeue_where(tenant_id => 'globex');
SELECT outbox_dlq_discard_where(tenant_id => 'initech', reason => 'permanent_error');
-- Fixing its own dead event: the payload yes; not what routes it, nor its
-- identity, nor moving it to another tenant.
UPDATE outbox_dlq SET payload = '{"n": 1, "fixed": true}' WHERE id = :'a1';
UPDATE outbox_dlq SET topic = 'globex.order.paid.v1' WHERE id = :'a1';
UPDATE outbox_dlq SET msg_key = 'x' WHERE id = :'a1';
UPDATE outbox_dlq SET id = gen_random_uuid() WHERE id = :'a1';
UPDATE outbox_dlq SET tenant_id = 'globex' WHERE id = :'a1';
UPDATE outbox_dlq SET payload = '{}' WHERE id = :'g1' RETURNING id;
-- Nor anything the worker could not send (outbox_save()'s rules and SQLSTATEs).
UPDATE outbox_dlq SET created_at = '-infinity' WHERE id = :'a1';
UPDATE outbox_dlq SET pii_fields = ARRAY['email', NULL] WHERE id = :'a1';
UPDATE outbox_dlq SET event_type = 'lead.created.v2' WHERE id = :'a1';
UPDATE outbox_dlq SET metadata = '[1]' WHERE id = :'a1';
UPDATE outbox_dlq SET trace_id = 'xyz' WHERE id = :'a1';
UPDATE outbox_dlq SET aggregate_id = '' WHERE id = :'a1';
RESET ROLE;
SET voutbox.max_payload_bytes = 100;   -- (a superuser setting)
SET ROLE regress_acme;
UPDATE outbox_dlq SET payload = jsonb_build_object('blob', repeat('x', 200)) WHERE id = :'a1';
UPDATE outbox_dlq SET metadata = jsonb_build_object('blob', repeat('x', 100)) WHERE id = :'a1';
RESET ROLE;
RESET voutbox.max_payload_bytes;
SET ROLE regress_acme;
-- Adding a dead event is for who acts for every tenant.
INSERT INTO outbox_dlq (id, tenant_id, aggregate_type, aggregate_id, event_type, event_version,
                        payload, idempotency_key, correlation_id, created_at, pii, topic, seq,
                        retry_count, reason)
VALUES (gen_random_uuid(), 'acme', 'x', 'x', 'x.v1', 1, '{}', 'k', 'x', now(), false, 'globex.x.v1', 0, 0, 'permanent_error');
-- Its own events: requeued and discarded.
SELECT outbox_dlq_requeue(:'a1') AS requeued;
SELECT outbox_dlq_discard_where(moved_before => now() + interval '1 hour') AS discarded;
SELECT tenant_id, aggregate_id, status FROM outbox ORDER BY aggregate_id;
RESET ROLE;
SELECT tenant_id, count(*) AS still_dead FROM outbox_dlq GROUP BY 1 ORDER BY 1;

-- globex sees and administers its own.
SET ROLE regress_globex;
SELECT tenant_id, aggregate_id, status FROM outbox ORDER BY aggregate_id;
SELECT outbox_dlq_requeue_where(tenant_id => 'globex') AS requeued;
UPDATE outbox_dlq SET payload = '{}';
RESET ROLE;

-- An operator changes what routes a dead event, and the binding of roles.
SET ROLE regress_ops;
UPDATE outbox_dlq SET topic = 'initech.lead.fixed.v1' WHERE tenant_id = 'initech' RETURNING topic;
UPDATE outbox_dlq SET topic = 'no good' WHERE tenant_id = 'initech';
-- An added dead event may not take the id of an event still retained.
INSERT INTO outbox_dlq (id, tenant_id, aggregate_type, aggregate_id, event_type, event_version,
                        payload, idempotency_key, correlation_id, created_at, pii, topic, seq,
                        retry_count, reason)
SELECT id, 'acme', 'x', 'x', 'x.v1', 1, '{}', 'k', 'x', now(), false, 'acme.x.v1', 0, 0, 'permanent_error'
  FROM outbox WHERE aggregate_id = '3';
SELECT outbox_tenant_revoke('globex') AS revoked;
SELECT outbox_tenant_revoke('acme', 'regress_acme') AS revoked;
RESET ROLE;
SELECT count(*) AS bindings FROM voutbox.tenant_roles;

-- ---- Bindings name roles: a dropped role's binding grants nothing (and shows
-- the name it had).
CREATE ROLE regress_gone;
SELECT outbox_tenant_grant('initech', 'regress_gone');
DROP ROLE regress_gone;
SELECT tenant_id, role FROM outbox_tenants;
CREATE ROLE regress_gone;   -- a new role of the same name: bound again, by name
SET ROLE regress_gone;
SELECT outbox_save('initech', 'lead', '12', 'lead.created.v1', '{}') IS NOT NULL AS saved_by_name;
RESET ROLE;
DROP ROLE regress_gone;
SELECT outbox_tenant_revoke('initech', 'regress_gone') AS revoked_by_name;
SELECT outbox_tenant_grant('initech', 'regress_ops') AS bound_again;
-- With isolation on, tenant ids must contain neither "_" nor ".", whatever
-- the template: Kafka takes "acme_lead.x.v1" and "acme.lead_x.v1", or
-- "a.b-x.v1" and "a_b-x.v1", for the same topic.
SELECT outbox_save('acme_lead', 'lead', '13', 'x.v1', '{}');
SET voutbox.topic_template = '{tenant_id}-{event_type}';
SELECT outbox_save('a.b', 'lead', '13', 'x.v1', '{}');
RESET voutbox.topic_template;
-- A superuser may change what a tenant's role may not; a row it left so can
-- still be fixed in its other columns.
UPDATE outbox_dlq SET created_at = '-infinity' WHERE tenant_id = 'initech';
SET ROLE regress_ops;
UPDATE outbox_dlq SET payload = '{"fixed": true}' WHERE tenant_id = 'initech' RETURNING payload;
UPDATE outbox_dlq SET created_at = '-infinity', payload = '{}' WHERE tenant_id = 'initech';
RESET ROLE;
SELECT outbox_tenant_revoke('initech') AS revoked;

-- ---- With every binding gone, isolation is off again.
SET ROLE regress_reader;
SELECT outbox_save('globex', 'order', '10', 'order.paid.v1', '{}') IS NOT NULL AS saved_again;
SELECT count(DISTINCT tenant_id) AS tenants_seen FROM outbox;
SELECT outbox_save('acme_lead', 'lead', '13', 'x.v1', '{}') IS NOT NULL AS underscore_ok_without_isolation;
RESET ROLE;

-- ---- Settings: Kafka properties and the secrets file are superusers' only;
-- secret-bearing properties are refused in voutbox.kafka_properties, and no
-- message shows their value.
SET ROLE regress_reader;
SHOW voutbox.kafka_properties;
SHOW voutbox.kafka_secrets_file;
SELECT count(*) AS visible FROM pg_settings WHERE name LIKE 'voutbox.kafka%';
SELECT count(*) AS visible FROM pg_settings WHERE name = 'voutbox.brokers';
RESET ROLE;
ALTER SYSTEM SET voutbox.kafka_properties = 'linger.ms=5; sasl.password=hunter2';
ALTER SYSTEM SET voutbox.kafka_properties = 'ssl.key.password=hunter2';
ALTER SYSTEM SET voutbox.kafka_properties = 'sasl.oauthbearer.client.secret=hunter2';
ALTER SYSTEM SET voutbox.kafka_properties = 'ssl.key.pem=-----BEGIN';
ALTER SYSTEM SET voutbox.kafka_properties = 'my.secret.thing=hunter2';
-- nor properties that would make librdkafka run code in the server
ALTER SYSTEM SET voutbox.kafka_properties = 'plugin.library.paths=/tmp/evil.so';
ALTER SYSTEM SET voutbox.kafka_properties = 'sasl.kerberos.kinit.cmd=/tmp/evil.sh';
ALTER SYSTEM RESET voutbox.kafka_properties;

-- ---- Two tenants never share a topic: the template puts "." after the
-- tenant id, so a tenant id may not contain one.
SELECT outbox_save('acme.lead', 'x', '1', 'created.v1', '{}');
SET voutbox.topic_template = '{event_type}.{tenant_id}';
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}');
SET voutbox.topic_template = '{tenant_id}{event_type}';
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}');
SET voutbox.topic_template = '{tenant_id}-{aggregate_type}.{event_type}';
SELECT outbox_save('acme-eu', 'lead', '1', 'lead.created.v1', '{}');
SELECT outbox_save('acme.eu', 'lead', '1', 'lead.created.v1', '{}') IS NOT NULL AS saved;
SET voutbox.topic_template = 'shared.{event_type}';
SELECT outbox_save('acme.lead', 'lead', '1', 'lead.created.v1', '{}') IS NOT NULL AS saved_shared;
RESET voutbox.topic_template;

-- ---- Idempotency after requeue: the ring table of a dead event is
-- truncated by retention; requeued, the event is still found by its key and
-- still shown in outbox.
SELECT outbox_save('acme', 'lead', '11', 'lead.created.v1', '{"n": 11}', idempotency_key => 'k-11') AS a11 \gset
INSERT INTO voutbox.batches (lo, reach, events)
SELECT pg_current_snapshot(), pg_snapshot_xmax(pg_current_snapshot()), 1;
SET session_replication_role = replica;   -- as the worker's move: no trigger
INSERT INTO voutbox.dlq (id, tenant_id, aggregate_type, aggregate_id, event_type, event_version,
                        payload, idempotency_key, correlation_id, created_at, pii, topic, msg_key,
                        seq, retry_count, reason)
SELECT id, tenant_id, aggregate_type, aggregate_id, event_type, event_version, payload,
       idempotency_key, correlation_id, created_at, pii, topic, msg_key, seq, 11, 'max_retries_exceeded'
  FROM voutbox.events WHERE id = :'a11';
RESET session_replication_role;
TRUNCATE voutbox.events_0, voutbox.events_1, voutbox.events_2;
SELECT id = :'a11' AS still_there, status FROM outbox WHERE idempotency_key = 'k-11';
SELECT outbox_dlq_requeue(:'a11') AS requeued;
SELECT id = :'a11' AS still_there, status, retry_count FROM outbox WHERE idempotency_key = 'k-11';
SELECT outbox_save('acme', 'lead', '11', 'lead.created.v1', '{}', idempotency_key => 'k-11') = :'a11' AS same_id;
SELECT count(*) AS saved_twice FROM outbox WHERE idempotency_key = 'k-11';

DROP EXTENSION voutbox;
DROP ROLE regress_acme_web, regress_acme_noinherit, regress_acme, regress_globex,
          regress_reader, regress_ops;
