-- Idempotency on (tenant_id, idempotency_key).
CREATE EXTENSION voutbox;

SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{"n": 1}',
                   idempotency_key => 'k-1') AS first \gset
-- Saving the same key again returns the first event's id and stores nothing.
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{"n": 2}',
                   idempotency_key => 'k-1') = :'first' AS same_id;
SELECT count(*), min(payload->>'n') AS payload_kept FROM outbox WHERE idempotency_key = 'k-1';

-- Keys are per tenant.
SELECT outbox_save('globex', 'lead', '1', 'lead.created.v1', '{}',
                   idempotency_key => 'k-1') <> :'first' AS new_id_for_other_tenant;

-- Within one transaction too.
BEGIN;
SELECT outbox_save('acme', 'lead', '2', 'lead.created.v1', '{}', idempotency_key => 'k-2') AS in_tx \gset
SELECT outbox_save('acme', 'lead', '2', 'lead.created.v1', '{}', idempotency_key => 'k-2') = :'in_tx' AS same_id;
COMMIT;

-- A key whose first event was rolled back is free.
BEGIN;
SELECT outbox_save('acme', 'lead', '3', 'lead.created.v1', '{}', idempotency_key => 'k-3') AS rolled_back \gset
ROLLBACK;
SELECT outbox_save('acme', 'lead', '3', 'lead.created.v1', '{}', idempotency_key => 'k-3') <> :'rolled_back' AS new_id;

-- The key stays taken while the event is in the dead-letter queue.
INSERT INTO outbox_dlq (id, tenant_id, aggregate_type, aggregate_id, event_type, event_version,
                        payload, idempotency_key, correlation_id, created_at, pii, topic, seq,
                        retry_count, reason)
VALUES ('01900000-0000-7000-8000-000000000001', 'acme', 'lead', '4', 'lead.created.v1', 1,
        '{}', 'k-4', '4', now(), false, 'acme.lead.created.v1', 0, 11, 'max_retries_exceeded');
SELECT outbox_save('acme', 'lead', '4', 'lead.created.v1', '{}', idempotency_key => 'k-4');

-- Without a key, the key is the event id, and every call saves an event.
SELECT outbox_save('acme', 'lead', '5', 'lead.created.v1', '{}') AS a,
       outbox_save('acme', 'lead', '5', 'lead.created.v1', '{}') AS b \gset
SELECT :'a' <> :'b' AS distinct_events;
SELECT idempotency_key = id::text AS key_is_id FROM outbox WHERE aggregate_id = '5';

-- Idempotent calls take a transaction-level lock, released at commit.
BEGIN;
SELECT outbox_save('acme', 'lead', '6', 'lead.created.v1', '{}', idempotency_key => 'k-6') IS NOT NULL;
SELECT locktype, mode, granted FROM pg_locks
 WHERE locktype = 'advisory' AND objsubid = 30319 AND pid = pg_backend_pid();
COMMIT;
SELECT count(*) AS locks_after_commit FROM pg_locks
 WHERE locktype = 'advisory' AND objsubid = 30319 AND pid = pg_backend_pid();

DROP EXTENSION voutbox;
