/* voutbox--0.1.0--0.2.0.sql: error classes, DLQ administration, statistics */

\echo Use "ALTER EXTENSION voutbox UPDATE TO '0.2.0'" to load this file. \quit

/*
 * Deferred events learn two things: "alone" sends the event in a round of
 * its own (after a permanent error in a shared batch, to tell the event at
 * fault from its batch-mates), and "dead_reason" marks it for the
 * dead-letter queue at the end of the settling transaction.
 */
ALTER TABLE voutbox.deferred
	ADD COLUMN alone			boolean	NOT NULL DEFAULT false,
	ADD COLUMN last_error_code	text,
	ADD COLUMN dead_reason		text;
CREATE INDEX deferred_alone ON voutbox.deferred (seq)
	WHERE delivered_at IS NULL AND alone;
CREATE INDEX deferred_dead ON voutbox.deferred (seq)
	WHERE dead_reason IS NOT NULL;

/* The DLQ says which error killed an event, by its librdkafka name. */
ALTER TABLE @extschema@.outbox_dlq
	ADD COLUMN error_code text,
	ADD CONSTRAINT outbox_dlq_reason
		CHECK (reason IN ('max_retries_exceeded', 'permanent_error'));
CREATE INDEX outbox_dlq_tenant_type ON @extschema@.outbox_dlq (tenant_id, event_type);
COMMENT ON TABLE @extschema@.outbox_dlq IS
	'voutbox: events that gave up (a permanent error, or voutbox.max_retries used up)';

/*
 * Dead events discarded from the DLQ, so that the outbox view does not take
 * them for delivered (the cursor passed them).  Trimmed with the events.
 */
CREATE TABLE voutbox.discarded (
	id				uuid		PRIMARY KEY,
	discarded_at	timestamptz	NOT NULL DEFAULT now()
);
CREATE INDEX discarded_at ON voutbox.discarded (discarded_at);

/* ---------------------------------------------------------------------
 * Waking the worker at commit (requeued events are due at once)
 * ---------------------------------------------------------------------
 */
CREATE FUNCTION voutbox.wake_worker_at_commit()
RETURNS void
AS 'MODULE_PATHNAME', 'voutbox_wake_worker_at_commit'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
REVOKE ALL ON FUNCTION voutbox.wake_worker_at_commit() FROM PUBLIC;

/* ---------------------------------------------------------------------
 * DLQ administration.  Every function works in the caller's transaction:
 * fix a row of outbox_dlq, requeue it, and commit both or neither.
 * ---------------------------------------------------------------------
 */

/*
 * Move the given dead events back to delivery.  They keep their id, seq and
 * idempotency key, start again with no failed attempt, and become the head
 * of their key: later events of that key wait behind them.
 */
CREATE FUNCTION voutbox.requeue(p_ids uuid[])
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n bigint;
BEGIN
	WITH moved AS (
		DELETE FROM @extschema@.outbox_dlq q WHERE q.id = ANY (p_ids) RETURNING q.*)
	INSERT INTO voutbox.deferred (id, seq, txid, tenant_id, aggregate_type, aggregate_id,
								  event_type, event_version, payload, metadata, idempotency_key,
								  trace_id, traceparent, correlation_id, created_at, scheduled_for,
								  pii, pii_fields, consent, producer, topic, msg_key,
								  holds_key, attempts, due_at)
	SELECT m.id, m.seq, pg_current_xact_id(), m.tenant_id, m.aggregate_type, m.aggregate_id,
		   m.event_type, m.event_version, m.payload, m.metadata, m.idempotency_key,
		   m.trace_id, m.traceparent, m.correlation_id, m.created_at, m.scheduled_for,
		   m.pii, m.pii_fields, m.consent, m.producer, m.topic, m.msg_key,
		   m.msg_key IS NOT NULL, 0, now()
	  FROM moved m;
	GET DIAGNOSTICS n = ROW_COUNT;
	IF n > 0 THEN
		PERFORM voutbox.wake_worker_at_commit();
	END IF;
	RETURN n;
END
$$;

/*
 * The ids of the dead events that match a filter; NULL arguments match all.
 * (Callers pass their arguments by position: in a query over outbox_dlq,
 * a parameter named like a column would mean the column.)
 */
CREATE FUNCTION voutbox.dlq_matching(p_caller text, p_tenant_id text, p_event_type text,
									 p_error_code text, p_reason text,
									 p_created_after timestamptz, p_created_before timestamptz,
									 p_moved_after timestamptz, p_moved_before timestamptz)
RETURNS uuid[]
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF num_nonnulls(p_tenant_id, p_event_type, p_error_code, p_reason, p_created_after,
					p_created_before, p_moved_after, p_moved_before) = 0 THEN
		RAISE EXCEPTION '%: no filter given', p_caller
			USING ERRCODE = 'invalid_parameter_value',
				  DETAIL = 'Without a filter the call would affect every event in outbox_dlq.',
				  HINT = 'Pass at least one of tenant_id, event_type, error_code, reason, created_after, created_before, moved_after, moved_before; to match every row, pass moved_before => now().';
	END IF;
	IF p_reason IS NOT NULL AND p_reason NOT IN ('max_retries_exceeded', 'permanent_error') THEN
		RAISE EXCEPTION '%: unknown reason "%"', p_caller, p_reason
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'The reasons are max_retries_exceeded and permanent_error.';
	END IF;
	RETURN ARRAY(
		SELECT q.id FROM @extschema@.outbox_dlq q
		 WHERE (p_tenant_id IS NULL OR q.tenant_id = p_tenant_id)
		   AND (p_event_type IS NULL OR q.event_type = p_event_type)
		   AND (p_error_code IS NULL OR q.error_code = p_error_code)
		   AND (p_reason IS NULL OR q.reason = p_reason)
		   AND (p_created_after IS NULL OR q.created_at >= p_created_after)
		   AND (p_created_before IS NULL OR q.created_at < p_created_before)
		   AND (p_moved_after IS NULL OR q.moved_at >= p_moved_after)
		   AND (p_moved_before IS NULL OR q.moved_at < p_moved_before)
		 ORDER BY q.seq
		   FOR UPDATE);
END
$$;

/* Delete the given dead events for good, leaving their tombstones. */
CREATE FUNCTION voutbox.discard(p_ids uuid[])
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
	WITH gone AS (DELETE FROM @extschema@.outbox_dlq q WHERE q.id = ANY (p_ids) RETURNING q.id),
	tomb AS (INSERT INTO voutbox.discarded (id) SELECT id FROM gone ON CONFLICT DO NOTHING)
	SELECT count(*) FROM gone
$$;

CREATE FUNCTION @extschema@.outbox_dlq_requeue(id uuid)
RETURNS bigint
LANGUAGE sql VOLATILE STRICT SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT voutbox.requeue(ARRAY[id]) $$;
COMMENT ON FUNCTION @extschema@.outbox_dlq_requeue(uuid) IS
	'voutbox: send a dead event again (same id and idempotency key); returns 1, or 0 if it is not in outbox_dlq';

CREATE FUNCTION @extschema@.outbox_dlq_requeue_where(tenant_id text DEFAULT NULL,
													  event_type text DEFAULT NULL,
													  error_code text DEFAULT NULL,
													  reason text DEFAULT NULL,
													  created_after timestamptz DEFAULT NULL,
													  created_before timestamptz DEFAULT NULL,
													  moved_after timestamptz DEFAULT NULL,
													  moved_before timestamptz DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT voutbox.requeue(voutbox.dlq_matching('outbox_dlq_requeue_where',
												$1, $2, $3, $4, $5, $6, $7, $8))
$$;
COMMENT ON FUNCTION @extschema@.outbox_dlq_requeue_where(text, text, text, text, timestamptz,
														 timestamptz, timestamptz, timestamptz) IS
	'voutbox: send every dead event that matches the filter again; returns how many';

CREATE FUNCTION @extschema@.outbox_dlq_discard(id uuid)
RETURNS bigint
LANGUAGE sql VOLATILE STRICT SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT voutbox.discard(ARRAY[id])
$$;
COMMENT ON FUNCTION @extschema@.outbox_dlq_discard(uuid) IS
	'voutbox: delete a dead event for good; returns 1, or 0 if it is not in outbox_dlq';

CREATE FUNCTION @extschema@.outbox_dlq_discard_where(tenant_id text DEFAULT NULL,
													  event_type text DEFAULT NULL,
													  error_code text DEFAULT NULL,
													  reason text DEFAULT NULL,
													  created_after timestamptz DEFAULT NULL,
													  created_before timestamptz DEFAULT NULL,
													  moved_after timestamptz DEFAULT NULL,
													  moved_before timestamptz DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT voutbox.discard(voutbox.dlq_matching('outbox_dlq_discard_where',
												$1, $2, $3, $4, $5, $6, $7, $8))
$$;
COMMENT ON FUNCTION @extschema@.outbox_dlq_discard_where(text, text, text, text, timestamptz,
														 timestamptz, timestamptz, timestamptz) IS
	'voutbox: delete every dead event that matches the filter; returns how many';

/* Administration is for the owner and whom it grants it to. */
REVOKE ALL ON FUNCTION @extschema@.outbox_dlq_requeue(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.outbox_dlq_requeue_where(text, text, text, text, timestamptz,
															timestamptz, timestamptz, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.outbox_dlq_discard(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.outbox_dlq_discard_where(text, text, text, text, timestamptz,
															timestamptz, timestamptz, timestamptz) FROM PUBLIC;

/* What sits in the DLQ, grouped for a quick look. */
CREATE VIEW @extschema@.outbox_dlq_summary AS
SELECT tenant_id, event_type, topic, reason, error_code,
	   count(*) AS events,
	   min(moved_at) AS first_moved_at,
	   max(moved_at) AS last_moved_at,
	   (array_agg(last_error ORDER BY moved_at DESC))[1] AS last_error
  FROM @extschema@.outbox_dlq
 GROUP BY tenant_id, event_type, topic, reason, error_code;
COMMENT ON VIEW @extschema@.outbox_dlq_summary IS
	'voutbox: the dead-letter queue grouped by tenant, event type, topic, reason and error';

/* ---------------------------------------------------------------------
 * Statistics
 * ---------------------------------------------------------------------
 */

/* The worker's counters in shared memory, since the server started. */
CREATE FUNCTION voutbox.topic_counters(OUT tenant_id text, OUT topic text,
									   OUT delivered bigint, OUT failed_attempts bigint,
									   OUT dead bigint, OUT last_error text,
									   OUT last_error_at timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'voutbox_topic_counters'
LANGUAGE C VOLATILE STRICT;

CREATE FUNCTION voutbox.worker_status(OUT pid integer, OUT state text, OUT state_since timestamptz,
									  OUT detail text, OUT started_at timestamptz,
									  OUT rounds bigint, OUT delivered bigint,
									  OUT failed_attempts bigint, OUT dead bigint,
									  OUT producers_built bigint, OUT last_error text,
									  OUT last_error_at timestamptz)
RETURNS record
AS 'MODULE_PATHNAME', 'voutbox_worker_status'
LANGUAGE C VOLATILE;

CREATE VIEW @extschema@.outbox_worker AS
SELECT * FROM voutbox.worker_status();
COMMENT ON VIEW @extschema@.outbox_worker IS
	'voutbox: the delivery worker: what it does now and its counters since the server started';

/*
 * Per tenant and topic.  Waiting events are read from the storage: the
 * committed events the cursor has not passed (two index scans on txid, as
 * the worker's own window query), plus the deferred ones.  Counters since
 * start come from shared memory.
 */
CREATE VIEW @extschema@.outbox_stats AS
WITH cursor AS (
	SELECT lo, hi, done_seq FROM voutbox.batches ORDER BY batch_id DESC LIMIT 1
), waiting AS (
	SELECT e.tenant_id, e.topic, e.created_at, e.scheduled_for, 'pending' AS state
	  FROM voutbox.events e, cursor c
	 WHERE (e.txid >= pg_snapshot_xmax(c.lo)
			OR e.txid = ANY (ARRAY(SELECT pg_snapshot_xip(c.lo))))
	   AND NOT (c.hi IS NOT NULL AND pg_visible_in_snapshot(e.txid, c.hi)
				AND e.seq <= c.done_seq)
	UNION ALL
	SELECT d.tenant_id, d.topic, d.created_at, d.scheduled_for,
		   CASE WHEN d.attempts > 0 THEN 'retrying'
				WHEN d.holds_key
					 AND EXISTS (SELECT 1 FROM voutbox.deferred h
								  WHERE h.delivered_at IS NULL AND h.holds_key
									AND h.topic = d.topic AND h.msg_key = d.msg_key
									AND h.seq < d.seq) THEN 'held'
				WHEN d.due_at > now() AND (d.scheduled_for IS NULL OR d.scheduled_for <= now())
				THEN 'held'
				ELSE 'pending' END
	  FROM voutbox.deferred d
	 WHERE d.delivered_at IS NULL
), w AS (
	SELECT tenant_id, topic,
		   count(*) AS pending,
		   min(created_at) FILTER (WHERE scheduled_for IS NULL OR scheduled_for <= now()) AS oldest,
		   count(*) FILTER (WHERE state = 'retrying') AS retrying,
		   count(*) FILTER (WHERE state = 'held') AS held,
		   count(*) FILTER (WHERE scheduled_for > now()) AS scheduled
	  FROM waiting GROUP BY tenant_id, topic
), q AS (
	SELECT tenant_id, topic, count(*) AS dead,
		   max(moved_at) AS last_moved_at,
		   (array_agg(last_error ORDER BY moved_at DESC))[1] AS last_dead_error
	  FROM @extschema@.outbox_dlq GROUP BY tenant_id, topic
), k AS (
	SELECT * FROM voutbox.topic_counters()
)
SELECT tenant_id,
	   topic,
	   coalesce(w.pending, 0) AS pending,
	   now() - w.oldest AS oldest_pending_age,
	   coalesce(w.retrying, 0) AS waiting_for_retry,
	   coalesce(w.held, 0) AS held,
	   coalesce(w.scheduled, 0) AS scheduled,
	   coalesce(q.dead, 0) AS in_dlq,
	   coalesce(k.delivered, 0) AS delivered_since_start,
	   coalesce(k.failed_attempts, 0) AS failed_attempts_since_start,
	   coalesce(k.dead, 0) AS dead_since_start,
	   coalesce(k.last_error, q.last_dead_error) AS last_error,
	   CASE WHEN k.last_error IS NOT NULL THEN k.last_error_at
			ELSE q.last_moved_at END AS last_error_at,
	   (SELECT s.state FROM voutbox.worker_status() s) AS worker_state
  FROM w
  FULL JOIN q USING (tenant_id, topic)
  FULL JOIN k USING (tenant_id, topic);
COMMENT ON VIEW @extschema@.outbox_stats IS
	'voutbox: per tenant and topic: waiting events, the DLQ, counters since start, the last error, the worker state';

/*
 * The outbox view: a deferred event that is due and heads its key (a
 * requeued one, or one sent again after a shutdown) is pending; one that
 * waits for its topic to answer again is held;
 * an event discarded from the DLQ is "discarded"; the time of the last
 * error and its code are shown too.
 */
CREATE OR REPLACE VIEW @extschema@.outbox AS
SELECT e.id,
	   e.tenant_id,
	   e.aggregate_id,
	   e.aggregate_type,
	   e.event_type,
	   e.event_version,
	   e.payload,
	   e.metadata,
	   coalesce(e.idempotency_key, e.id::text) AS idempotency_key,
	   e.trace_id,
	   e.correlation_id,
	   e.created_at,
	   CASE WHEN q.id IS NOT NULL THEN NULL
			WHEN d.id IS NOT NULL THEN d.delivered_at
			WHEN x.id IS NOT NULL THEN NULL
			ELSE voutbox.published_at(e.txid, e.seq) END AS published_at,
	   coalesce(q.retry_count, d.attempts, 0) AS retry_count,
	   coalesce(q.last_error, d.last_error) AS last_error,
	   e.scheduled_for,
	   e.pii,
	   e.pii_fields,
	   e.consent,
	   e.producer,
	   e.topic,
	   e.msg_key AS key,
	   CASE WHEN q.id IS NOT NULL THEN 'dead'
			WHEN d.id IS NOT NULL AND d.delivered_at IS NOT NULL THEN 'delivered'
			WHEN d.id IS NOT NULL AND d.attempts > 0 THEN 'retrying'
			WHEN d.id IS NULL AND x.id IS NOT NULL THEN 'discarded'
			WHEN d.id IS NOT NULL AND d.holds_key
				 AND EXISTS (SELECT 1 FROM voutbox.deferred h
							  WHERE h.delivered_at IS NULL AND h.holds_key
								AND h.topic = d.topic AND h.msg_key = d.msg_key
								AND h.seq < d.seq) THEN 'held'
			WHEN d.id IS NOT NULL AND d.due_at > now() AND d.scheduled_for > now() THEN 'scheduled'
			WHEN d.id IS NOT NULL AND d.due_at > now() THEN 'held'
			WHEN d.id IS NOT NULL THEN 'pending'
			WHEN pg_visible_in_snapshot(e.txid, c.lo)
				 OR (c.hi IS NOT NULL AND pg_visible_in_snapshot(e.txid, c.hi)
					 AND e.seq <= c.done_seq) THEN 'delivered'
			ELSE 'pending' END AS status,
	   CASE WHEN q.id IS NULL AND d.delivered_at IS NULL AND d.due_at > '-infinity'
			THEN d.due_at END AS next_attempt_at,
	   coalesce(q.error_code, d.last_error_code) AS last_error_code,
	   coalesce(q.moved_at, d.last_error_at) AS last_error_at
  FROM voutbox.events e
 CROSS JOIN (SELECT lo, hi, done_seq FROM voutbox.batches
			  ORDER BY batch_id DESC LIMIT 1) c
  LEFT JOIN voutbox.deferred d ON d.id = e.id
  LEFT JOIN @extschema@.outbox_dlq q ON q.id = e.id
  LEFT JOIN voutbox.discarded x ON x.id = e.id;
