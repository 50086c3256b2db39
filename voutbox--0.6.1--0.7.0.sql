/* voutbox 0.6.1 -> 0.7.0: delivery receipts. */
\echo Use "ALTER EXTENSION voutbox UPDATE TO '0.7.0'" to load this file. \quit

/* Every name below is qualified; this path serves built-in types and operators only. */
SET LOCAL search_path = pg_catalog, pg_temp;

/* ---------------------------------------------------------------------
 * Delivery receipts: the partition and offset Kafka gave each delivered
 * event.  Without an UPDATE per event: the cursor row that settles a round
 * (one per round, appended as before) also holds the receipts of the
 * round's delivered events, in three arrays of one order.  An event
 * delivered from voutbox.deferred (a retry, a straggler, an event held
 * behind its key) keeps its receipt in its deferred row, which is updated
 * then anyway.  Receipts go when their cursor row or deferred row goes,
 * which is after the event (retention.c).
 * ---------------------------------------------------------------------
 */
ALTER TABLE voutbox.batches
	ADD COLUMN receipt_seqs bigint[],
	ADD COLUMN receipt_partitions integer[],
	ADD COLUMN receipt_offsets bigint[];
COMMENT ON COLUMN voutbox.batches.receipt_seqs IS
	'seq of each event of the round that was delivered; receipt_partitions and receipt_offsets in the same order';
ALTER TABLE voutbox.deferred
	ADD COLUMN kafka_partition integer,
	ADD COLUMN kafka_offset bigint;

/* ---------------------------------------------------------------------
 * Commit order.  Events of one window (transactions that committed between
 * two snapshots of the worker) went out in save order, which is not commit
 * order when a transaction that saved first commits last.  Now each
 * transaction that saves events takes a number from voutbox.commit_seq as
 * it commits (at pre-commit, save.c) and appends it, with its transaction
 * id, to the commit_order table of the ring slot its last event went to
 * (truncated with it: a transaction's number lives as long as its newest
 * event).  The worker reads a window in (commit position, seq) order and
 * its cursor rows say how far with done_commit beside done_seq.  Events
 * saved before this (no number) have position 0.
 * ---------------------------------------------------------------------
 */
CREATE SEQUENCE voutbox.commit_seq AS bigint;
COMMENT ON SEQUENCE voutbox.commit_seq IS 'commit order of the transactions that save events';
CREATE TABLE voutbox.commit_order (
	txid		xid8		NOT NULL,
	commit_seq	bigint		NOT NULL
);
COMMENT ON TABLE voutbox.commit_order IS 'the commit position of each transaction that saved events (parent of commit_order_0..2)';
CREATE TABLE voutbox.commit_order_0 () INHERITS (voutbox.commit_order);
CREATE TABLE voutbox.commit_order_1 () INHERITS (voutbox.commit_order);
CREATE TABLE voutbox.commit_order_2 () INHERITS (voutbox.commit_order);
CREATE UNIQUE INDEX commit_order_0_txid ON voutbox.commit_order_0 (txid) INCLUDE (commit_seq);
CREATE UNIQUE INDEX commit_order_1_txid ON voutbox.commit_order_1 (txid) INCLUDE (commit_seq);
CREATE UNIQUE INDEX commit_order_2_txid ON voutbox.commit_order_2 (txid) INCLUDE (commit_seq);
ALTER TABLE voutbox.batches ADD COLUMN done_commit bigint;
COMMENT ON COLUMN voutbox.batches.done_commit IS
	'with done_seq: the window is settled up to (done_commit, done_seq) in (commit position, seq) order; NULL: 0';
/* (Orders a key's queue in the retry queue as the window did.) */
ALTER TABLE voutbox.deferred ADD COLUMN commit_pos bigint NOT NULL DEFAULT 0;

/*
 * (The views and settling_batch() find a transaction's commit position by
 * a probe of commit_order of their own, as the worker does (storage.c): a
 * function called per row cost tens of microseconds each, which made the
 * outbox view of a large open window slow.)
 */

/*
 * The cursor row that settled an event of transaction p_txid with seq
 * p_seq (none while the event is pending): the one definition of "settled
 * by", for published_at() and receipt().
 */
CREATE FUNCTION voutbox.settling_batch(p_txid xid8, p_seq bigint)
RETURNS bigint
LANGUAGE sql STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT b.batch_id
	  FROM voutbox.batches b
	 WHERE b.reach > p_txid
	   AND (pg_visible_in_snapshot(p_txid, b.lo)
			OR (b.hi IS NOT NULL
				AND pg_visible_in_snapshot(p_txid, b.hi)
				AND ((SELECT coalesce(pg_catalog.max(co.commit_seq), 0) FROM voutbox.commit_order co
					   WHERE co.txid OPERATOR(pg_catalog.=) p_txid), p_seq)
					<= (coalesce(b.done_commit, 0), b.done_seq)))
	 ORDER BY b.reach, b.batch_id
	 LIMIT 1
$$;
REVOKE ALL ON FUNCTION voutbox.settling_batch(xid8, bigint) FROM PUBLIC;

/* (As the owner, as before: see voutbox--0.2.0--0.3.0.sql.) */
CREATE OR REPLACE FUNCTION voutbox.published_at(p_txid xid8, p_seq bigint)
RETURNS timestamptz
LANGUAGE sql STABLE STRICT PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT b.settled_at FROM voutbox.batches b
	 WHERE b.batch_id OPERATOR(pg_catalog.=) voutbox.settling_batch(p_txid, p_seq)
$$;

/*
 * The receipt of an event delivered with its window: read as the owner
 * (SECURITY DEFINER, as published_at()), since the view's readers have no
 * access to the storage.  NULLs for an event not delivered, or delivered
 * by a version before 0.7.0 (or acknowledged without an offset).  Anyone
 * may call it, as published_at(): given a transaction id and a seq, it
 * tells a partition and an offset, nothing of the event (the outbox view
 * shows only the rows of the tenants the caller acts for).  It costs a
 * look at the round's arrays: select the columns for the rows you need.
 */
CREATE FUNCTION voutbox.receipt(p_txid xid8, p_seq bigint,
								OUT kafka_partition integer, OUT kafka_offset bigint)
RETURNS record
LANGUAGE sql STABLE STRICT PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE WHEN o.o >= 0 THEN b.receipt_partitions[i.i] END, CASE WHEN o.o >= 0 THEN o.o END
	  FROM voutbox.batches b
	 CROSS JOIN LATERAL array_position(b.receipt_seqs, p_seq) AS i(i)
	 CROSS JOIN LATERAL (SELECT b.receipt_offsets[i.i]) AS o(o)
	 WHERE b.batch_id OPERATOR(pg_catalog.=) voutbox.settling_batch(p_txid, p_seq)
$$;

/* The outbox view gains the receipt's columns (at its end: CREATE OR REPLACE VIEW keeps the others). */
CREATE OR REPLACE VIEW @extschema@.outbox WITH (security_barrier) AS
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
			WHEN d.id IS NOT NULL AND d.dead_reason IS NOT NULL THEN 'dead'
			WHEN d.id IS NOT NULL AND d.delivered_at IS NOT NULL THEN 'delivered'
			WHEN d.id IS NOT NULL AND d.attempts > 0 THEN 'retrying'
			WHEN d.id IS NULL AND x.id IS NOT NULL THEN 'discarded'
			WHEN d.id IS NOT NULL AND d.holds_key
				 AND EXISTS (SELECT 1 FROM voutbox.deferred h
							  WHERE h.delivered_at IS NULL AND h.holds_key AND h.dead_reason IS NULL
								AND h.topic = d.topic AND h.msg_key = d.msg_key
								AND (h.batch_id, h.commit_pos, h.seq)
									< (d.batch_id, d.commit_pos, d.seq)) THEN 'held'
			WHEN d.id IS NOT NULL AND d.due_at = 'infinity' THEN 'pending'
			WHEN d.id IS NOT NULL AND d.due_at > now() AND d.scheduled_for > now() THEN 'scheduled'
			WHEN d.id IS NOT NULL AND d.due_at > now() THEN 'held'
			WHEN d.id IS NOT NULL THEN 'pending'
			WHEN pg_visible_in_snapshot(e.txid, c.lo)
				 OR (c.hi IS NOT NULL AND pg_visible_in_snapshot(e.txid, c.hi)
					 AND ((SELECT coalesce(max(co.commit_seq), 0) FROM voutbox.commit_order co
						   WHERE co.txid = e.txid), e.seq)
						 <= (coalesce(c.done_commit, 0), c.done_seq)) THEN 'delivered'
			ELSE 'pending' END AS status,
	   CASE WHEN q.id IS NULL AND d.delivered_at IS NULL AND d.dead_reason IS NULL
				 AND d.due_at > '-infinity' AND d.due_at < 'infinity'
			THEN d.due_at END AS next_attempt_at,
	   coalesce(q.error_code, d.last_error_code) AS last_error_code,
	   coalesce(q.moved_at, d.last_error_at) AS last_error_at,
	   CASE WHEN q.id IS NOT NULL OR x.id IS NOT NULL THEN NULL
			WHEN d.id IS NOT NULL THEN d.kafka_partition
			ELSE (voutbox.receipt(e.txid, e.seq)).kafka_partition END AS kafka_partition,
	   CASE WHEN q.id IS NOT NULL OR x.id IS NOT NULL THEN NULL
			WHEN d.id IS NOT NULL THEN d.kafka_offset
			ELSE (voutbox.receipt(e.txid, e.seq)).kafka_offset END AS kafka_offset
  FROM voutbox.retained_events e
 CROSS JOIN (SELECT lo, hi, done_seq, done_commit FROM voutbox.batches
			  ORDER BY batch_id DESC LIMIT 1) c
  LEFT JOIN voutbox.deferred d ON d.id = e.id
  LEFT JOIN voutbox.dlq q ON q.id = e.id
  LEFT JOIN voutbox.discarded x ON x.id = e.id
 WHERE voutbox.acts_for(e.tenant_id);

/* Its pending count follows the cursor's commit order too. */
CREATE OR REPLACE VIEW @extschema@.outbox_stats WITH (security_barrier) AS
WITH cursor AS (
	SELECT lo, hi, done_seq, done_commit FROM voutbox.batches ORDER BY batch_id DESC LIMIT 1
), waiting AS (
	SELECT e.tenant_id, e.topic, e.created_at, e.scheduled_for, 'pending' AS state
	  FROM voutbox.events e, cursor c
	 WHERE (e.txid >= pg_snapshot_xmax(c.lo)
			OR e.txid = ANY (ARRAY(SELECT pg_snapshot_xip(c.lo))))
	   AND NOT (c.hi IS NOT NULL AND pg_visible_in_snapshot(e.txid, c.hi)
				AND ((SELECT coalesce(max(co.commit_seq), 0) FROM voutbox.commit_order co
					  WHERE co.txid = e.txid), e.seq)
					<= (coalesce(c.done_commit, 0), c.done_seq))
	   AND (voutbox.acts_for(e.tenant_id) OR voutbox.monitors())
	UNION ALL
	SELECT d.tenant_id, d.topic, d.created_at, d.scheduled_for,
		   CASE WHEN d.attempts > 0 THEN 'retrying'
				WHEN d.holds_key
					 AND EXISTS (SELECT 1 FROM voutbox.deferred h
								  WHERE h.delivered_at IS NULL AND h.holds_key AND h.dead_reason IS NULL
									AND h.topic = d.topic AND h.msg_key = d.msg_key
									AND (h.batch_id, h.commit_pos, h.seq)
										< (d.batch_id, d.commit_pos, d.seq)) THEN 'held'
				WHEN d.due_at = 'infinity' THEN 'pending'
				WHEN d.due_at > now() AND (d.scheduled_for IS NULL OR d.scheduled_for <= now())
				THEN 'held'
				ELSE 'pending' END
	  FROM voutbox.deferred d
	 WHERE d.delivered_at IS NULL AND d.dead_reason IS NULL
	   AND (voutbox.acts_for(d.tenant_id) OR voutbox.monitors())
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
	  FROM voutbox.dlq
	 WHERE (voutbox.acts_for(tenant_id) OR voutbox.monitors())
	 GROUP BY tenant_id, topic
), k AS (
	SELECT * FROM voutbox.topic_counters() t
	 WHERE CASE WHEN t.tenant_id IS NULL THEN (voutbox.acts_for_all() OR voutbox.monitors())
				ELSE (voutbox.acts_for(t.tenant_id) OR voutbox.monitors()) END
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
	   (SELECT s.state FROM voutbox.workers() s
		 WHERE s.database = pg_catalog.current_database()) AS worker_state
  FROM w
  FULL JOIN q USING (tenant_id, topic)
  FULL JOIN k USING (tenant_id, topic);

/*
 * "Where is event X?": its status, and where Kafka has it.  No row when
 * the event is unknown, gone with retention, or of a tenant the caller
 * does not act for (it reads the outbox view as the caller).
 */
CREATE FUNCTION @extschema@.outbox_locate(id uuid)
RETURNS TABLE (id uuid, tenant_id text, event_type text, status text, topic text, key text,
			   kafka_partition integer, kafka_offset bigint, published_at timestamptz,
			   retry_count integer, last_error text, created_at timestamptz)
LANGUAGE sql STABLE STRICT SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT o.id, o.tenant_id, o.event_type, o.status, o.topic, o.key,
		   o.kafka_partition, o.kafka_offset, o.published_at, o.retry_count, o.last_error,
		   o.created_at
	  FROM @extschema@.outbox o
	 WHERE o.id OPERATOR(pg_catalog.=) $1
$$;
COMMENT ON FUNCTION @extschema@.outbox_locate(uuid) IS
	'voutbox: where an event is: its status, topic, key, and the partition and offset Kafka gave it';
