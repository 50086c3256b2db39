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

/*
 * The cursor row that settled an event of transaction p_txid with seq
 * p_seq (none while the event is pending): the one definition of "settled
 * by", for published_at() and receipt().
 */
CREATE FUNCTION voutbox.settling_batch(p_txid xid8, p_seq bigint)
RETURNS SETOF voutbox.batches
LANGUAGE sql STABLE STRICT PARALLEL SAFE ROWS 1
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT b.*
	  FROM voutbox.batches b
	 WHERE b.reach > p_txid
	   AND (pg_visible_in_snapshot(p_txid, b.lo)
			OR (b.hi IS NOT NULL
				AND pg_visible_in_snapshot(p_txid, b.hi)
				AND p_seq <= b.done_seq))
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
	SELECT b.settled_at FROM voutbox.settling_batch(p_txid, p_seq) b
$$;

/*
 * The receipt of an event delivered with its window: read as the owner
 * (SECURITY DEFINER, as published_at()), since the view's readers have no
 * access to the storage.  NULLs for an event not delivered, or delivered
 * by a version before 0.7.0.
 */
CREATE FUNCTION voutbox.receipt(p_txid xid8, p_seq bigint,
								OUT kafka_partition integer, OUT kafka_offset bigint)
RETURNS record
LANGUAGE sql STABLE STRICT PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT b.receipt_partitions[i.i], b.receipt_offsets[i.i]
	  FROM voutbox.settling_batch(p_txid, p_seq) b
	 CROSS JOIN LATERAL array_position(b.receipt_seqs, p_seq) AS i(i)
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
								AND (h.batch_id, h.seq) < (d.batch_id, d.seq)) THEN 'held'
			WHEN d.id IS NOT NULL AND d.due_at = 'infinity' THEN 'pending'
			WHEN d.id IS NOT NULL AND d.due_at > now() AND d.scheduled_for > now() THEN 'scheduled'
			WHEN d.id IS NOT NULL AND d.due_at > now() THEN 'held'
			WHEN d.id IS NOT NULL THEN 'pending'
			WHEN pg_visible_in_snapshot(e.txid, c.lo)
				 OR (c.hi IS NOT NULL AND pg_visible_in_snapshot(e.txid, c.hi)
					 AND e.seq <= c.done_seq) THEN 'delivered'
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
 CROSS JOIN (SELECT lo, hi, done_seq FROM voutbox.batches
			  ORDER BY batch_id DESC LIMIT 1) c
  LEFT JOIN voutbox.deferred d ON d.id = e.id
  LEFT JOIN voutbox.dlq q ON q.id = e.id
  LEFT JOIN voutbox.discarded x ON x.id = e.id
 WHERE voutbox.acts_for(e.tenant_id);

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
GRANT EXECUTE ON FUNCTION @extschema@.outbox_locate(uuid) TO voutbox_admin;
