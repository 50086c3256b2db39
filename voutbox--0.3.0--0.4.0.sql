/* voutbox--0.3.0--0.4.0.sql: streaming delivery */

\echo Use "ALTER EXTENSION voutbox UPDATE TO '0.4.0'" to load this file. \quit

/* Every name below is qualified; this path serves built-in types and operators only. */
SET LOCAL search_path = pg_catalog, pg_temp;

/*
 * The streaming worker settles a round without its stragglers (events still
 * in flight while later ones were acknowledged, most likely of a topic that
 * does not answer): they wait in voutbox.deferred, due at 'infinity' until
 * their report comes (or the next worker starts).  Such an event is on its
 * way: the views say "pending" (or "retrying" once a timeout was counted,
 * or "held" behind an earlier event of its key), with no next attempt.
 */
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
	   coalesce(q.moved_at, d.last_error_at) AS last_error_at
  FROM voutbox.retained_events e
 CROSS JOIN (SELECT lo, hi, done_seq FROM voutbox.batches
			  ORDER BY batch_id DESC LIMIT 1) c
  LEFT JOIN voutbox.deferred d ON d.id = e.id
  LEFT JOIN voutbox.dlq q ON q.id = e.id
  LEFT JOIN voutbox.discarded x ON x.id = e.id
 WHERE voutbox.acts_for(e.tenant_id);

CREATE OR REPLACE VIEW @extschema@.outbox_stats WITH (security_barrier) AS
WITH cursor AS (
	SELECT lo, hi, done_seq FROM voutbox.batches ORDER BY batch_id DESC LIMIT 1
), waiting AS (
	SELECT e.tenant_id, e.topic, e.created_at, e.scheduled_for, 'pending' AS state
	  FROM voutbox.events e, cursor c
	 WHERE (e.txid >= pg_snapshot_xmax(c.lo)
			OR e.txid = ANY (ARRAY(SELECT pg_snapshot_xip(c.lo))))
	   AND NOT (c.hi IS NOT NULL AND pg_visible_in_snapshot(e.txid, c.hi)
				AND e.seq <= c.done_seq)
	   AND voutbox.acts_for(e.tenant_id)
	UNION ALL
	SELECT d.tenant_id, d.topic, d.created_at, d.scheduled_for,
		   CASE WHEN d.attempts > 0 THEN 'retrying'
				WHEN d.holds_key
					 AND EXISTS (SELECT 1 FROM voutbox.deferred h
								  WHERE h.delivered_at IS NULL AND h.holds_key AND h.dead_reason IS NULL
									AND h.topic = d.topic AND h.msg_key = d.msg_key
									AND (h.batch_id, h.seq) < (d.batch_id, d.seq)) THEN 'held'
				WHEN d.due_at = 'infinity' THEN 'pending'
				WHEN d.due_at > now() AND (d.scheduled_for IS NULL OR d.scheduled_for <= now())
				THEN 'held'
				ELSE 'pending' END
	  FROM voutbox.deferred d
	 WHERE d.delivered_at IS NULL AND d.dead_reason IS NULL
	   AND voutbox.acts_for(d.tenant_id)
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
	 WHERE voutbox.acts_for(tenant_id)
	 GROUP BY tenant_id, topic
), k AS (
	SELECT * FROM voutbox.topic_counters() t
	 WHERE CASE WHEN t.tenant_id IS NULL THEN voutbox.acts_for_all()
				ELSE voutbox.acts_for(t.tenant_id) END
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
