-- The dead-letter queue's SQL administration, and the statistics views.
-- No worker runs in this instance: the worker's moves are simulated.
CREATE EXTENSION voutbox;
SELECT extversion FROM pg_extension WHERE extname = 'voutbox';

SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{"n": 1}', idempotency_key => 'k-1') AS id1 \gset
SELECT outbox_save('acme', 'lead', '2', 'lead.updated.v1', '{"n": 2}') AS id2 \gset
SELECT outbox_save('globex', 'order', '3', 'order.paid.v2', '{"n": 3}') AS id3 \gset
SELECT outbox_save('globex', 'order', '4', 'order.paid.v2', '{"n": 4}') AS id4 \gset

-- Waiting events per tenant and topic.  No worker: its state says why.
SELECT tenant_id, topic, pending, oldest_pending_age > '0' AS has_age, waiting_for_retry,
       in_dlq, delivered_since_start, worker_state
  FROM outbox_stats ORDER BY tenant_id, topic;
SELECT pid, state, rounds, delivered FROM outbox_worker;

-- What the worker does when events give up: the cursor passes them all and
-- three go to the DLQ.
INSERT INTO voutbox.batches (lo, reach, events)
SELECT pg_current_snapshot(), pg_snapshot_xmax(pg_current_snapshot()), 4;
SET session_replication_role = replica;   -- as the worker's move: no trigger
INSERT INTO voutbox.dlq (id, tenant_id, aggregate_type, aggregate_id, event_type, event_version,
                        payload, metadata, idempotency_key, trace_id, traceparent, correlation_id,
                        created_at, scheduled_for, pii, pii_fields, consent, producer, topic,
                        msg_key, seq, retry_count, last_error, error_code, reason)
SELECT id, tenant_id, aggregate_type, aggregate_id, event_type, event_version, payload, metadata,
       coalesce(idempotency_key, id::text), trace_id, traceparent, correlation_id, created_at,
       scheduled_for, pii, pii_fields, consent, producer, topic, msg_key, seq,
       CASE WHEN tenant_id = 'acme' THEN 11 ELSE 1 END,
       CASE WHEN tenant_id = 'acme' THEN 'REQUEST_TIMED_OUT: Broker: Request timed out'
            ELSE 'MSG_SIZE_TOO_LARGE: Broker: Message size too large' END,
       CASE WHEN tenant_id = 'acme' THEN 'REQUEST_TIMED_OUT' ELSE 'MSG_SIZE_TOO_LARGE' END,
       CASE WHEN tenant_id = 'acme' THEN 'max_retries_exceeded' ELSE 'permanent_error' END
  FROM voutbox.events WHERE id <> :'id4';
RESET session_replication_role;

SELECT aggregate_id, status, retry_count, last_error_code FROM outbox ORDER BY aggregate_id;
SELECT tenant_id, event_type, topic, reason, error_code, events FROM outbox_dlq_summary
 ORDER BY tenant_id, event_type;
SELECT tenant_id, topic, pending, in_dlq, last_error FROM outbox_stats ORDER BY tenant_id, topic;

-- The DLQ's reasons are a closed set.
\set VERBOSITY terse
UPDATE outbox_dlq SET reason = 'bored' WHERE id = :'id1';
\set VERBOSITY default

-- A filter is required, and checked.
SELECT outbox_dlq_requeue_where();
SELECT outbox_dlq_discard_where(reason => 'bored');
SELECT outbox_dlq_discard_where(tenant_id => 'acme', reason => 'bored');
SELECT count(*) AS nothing_discarded FROM outbox_dlq;
DO $$
BEGIN
	PERFORM outbox_dlq_requeue_where();
EXCEPTION WHEN invalid_parameter_value THEN
	RAISE NOTICE 'SQLSTATE %', SQLSTATE;
END
$$;

-- Everything works in the caller's transaction: a rolled-back requeue
-- leaves the event dead.
BEGIN;
SELECT outbox_dlq_requeue(:'id1');
SELECT count(*) AS queued FROM voutbox.deferred;
ROLLBACK;
SELECT count(*) AS still_dead FROM outbox_dlq WHERE id = :'id1';

-- Fix the data and requeue it, atomically.  The event keeps its id and
-- idempotency key, starts again with no failed attempt, and is due now.
BEGIN;
UPDATE outbox_dlq SET payload = '{"n": 1, "fixed": true}' WHERE id = :'id1';
SELECT outbox_dlq_requeue(:'id1') AS requeued;
COMMIT;
SELECT id = :'id1' AS same_id, idempotency_key, payload, attempts, holds_key,
       due_at <= now() AS due, last_error
  FROM voutbox.deferred;
SELECT aggregate_id, status, retry_count FROM outbox ORDER BY aggregate_id;
-- An event still in flight when the worker settled its round (a straggler,
-- due at 'infinity' until its report comes) is on its way: pending, with no
-- next attempt, and not held.
UPDATE voutbox.deferred SET due_at = 'infinity' WHERE id = :'id1';
SELECT status, next_attempt_at FROM outbox WHERE id = :'id1';
SELECT topic, pending, held, waiting_for_retry FROM outbox_stats WHERE tenant_id = 'acme' ORDER BY topic;
UPDATE voutbox.deferred SET due_at = now() WHERE id = :'id1';
-- Saving the same idempotency key again still returns the same event.
SELECT outbox_save('acme', 'lead', '1', 'lead.created.v1', '{}', idempotency_key => 'k-1') = :'id1'
    AS idempotent;
-- An id that is not dead (any more) affects nothing.
SELECT outbox_dlq_requeue(:'id1') AS again, outbox_dlq_requeue(:'id4') AS never_dead,
       outbox_dlq_requeue(NULL) AS null_id;

-- Filters: by tenant, event type, error, reason, time.
SELECT outbox_dlq_requeue_where(tenant_id => 'nobody') AS nobody,
       outbox_dlq_requeue_where(moved_after => now() + interval '1 hour') AS future;
BEGIN;
SELECT outbox_dlq_discard_where(error_code => 'MSG_SIZE_TOO_LARGE',
                                created_before => now() + interval '1 hour') AS discarded;
ROLLBACK;
SELECT outbox_dlq_requeue_where(tenant_id => 'acme', event_type => 'lead.updated.v1',
                                reason => 'max_retries_exceeded') AS requeued;
SELECT outbox_dlq_discard(:'id3') AS discarded, outbox_dlq_discard(:'id3') AS again;
SELECT count(*) AS left_in_dlq FROM outbox_dlq;
-- An empty DLQ still checks the filter.
SELECT outbox_dlq_discard_where();
SELECT aggregate_id, status FROM outbox ORDER BY aggregate_id;
SELECT tenant_id, topic, pending, in_dlq FROM outbox_stats ORDER BY tenant_id, topic;

-- Administration is not for everybody.
CREATE ROLE voutbox_app;
GRANT SELECT ON outbox_dlq, outbox_stats TO voutbox_app;
SET ROLE voutbox_app;
SELECT outbox_dlq_requeue(:'id2');
SELECT outbox_dlq_discard_where(tenant_id => 'acme');
SELECT count(*) >= 0 AS can_read_stats FROM outbox_stats;
RESET ROLE;
REVOKE ALL ON outbox_dlq, outbox_stats FROM voutbox_app;
DROP ROLE voutbox_app;

DROP EXTENSION voutbox;

-- Upgrading an installation of 0.1.0 keeps its events.
CREATE EXTENSION voutbox VERSION '0.1.0';
SELECT outbox_save('acme', 'lead', '9', 'lead.created.v1', '{"n": 9}') AS old_id \gset
ALTER EXTENSION voutbox UPDATE;
SELECT extversion FROM pg_extension WHERE extname = 'voutbox';
SELECT id = :'old_id' AS kept, status FROM outbox;
SELECT tenant_id, pending FROM outbox_stats;
DROP EXTENSION voutbox;

-- A trigger or foreign key another role put on the 0.2.0 table stops the
-- update: the table moves where the worker, a superuser, writes it.
CREATE EXTENSION voutbox VERSION '0.2.0';
CREATE ROLE regress_dlq_user;
GRANT TRIGGER, REFERENCES ON outbox_dlq TO regress_dlq_user;
GRANT CREATE ON SCHEMA public TO regress_dlq_user;
SET ROLE regress_dlq_user;
CREATE FUNCTION regress_trap() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
CREATE TRIGGER trap BEFORE INSERT ON outbox_dlq FOR EACH ROW EXECUTE FUNCTION regress_trap();
CREATE TABLE regress_ref (dead_id uuid REFERENCES outbox_dlq (id));
RESET ROLE;
ALTER EXTENSION voutbox UPDATE;
\echo :LAST_ERROR_SQLSTATE
DROP TRIGGER trap ON outbox_dlq;
ALTER EXTENSION voutbox UPDATE;
DROP TABLE regress_ref;
ALTER EXTENSION voutbox UPDATE;
SELECT extversion FROM pg_extension WHERE extname = 'voutbox';
SELECT count(*) AS foreign_triggers FROM pg_trigger
 WHERE tgrelid = 'voutbox.dlq'::regclass AND tgname <> 'dlq_check' AND NOT tgisinternal;
DROP EXTENSION voutbox;
DROP FUNCTION regress_trap();
REVOKE CREATE ON SCHEMA public FROM regress_dlq_user;
DROP ROLE regress_dlq_user;
