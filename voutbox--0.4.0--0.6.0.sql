/* voutbox 0.4.0 -> 0.6.0: a delivery worker per listed database. */
\echo Use "ALTER EXTENSION voutbox UPDATE TO '0.6.0'" to load this file. \quit

/* Every name below is qualified; this path serves built-in types and operators only. */
SET LOCAL search_path = pg_catalog, pg_temp;

/*
 * One row per database in voutbox.database (this database's, and the
 * others' to members of pg_read_all_stats), or a "disabled" row for this
 * database when it is not listed.
 */
CREATE FUNCTION voutbox.workers(OUT database text, OUT pid integer, OUT state text,
								OUT state_since timestamptz, OUT detail text,
								OUT started_at timestamptz, OUT rounds bigint,
								OUT delivered bigint, OUT failed_attempts bigint,
								OUT dead bigint, OUT producers_built bigint,
								OUT last_error text, OUT last_error_at timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'voutbox_workers'
LANGUAGE C VOLATILE;

/* Replaced, not dropped: the privileges granted on it stay. */
CREATE OR REPLACE VIEW @extschema@.outbox_worker AS
SELECT pid, state, state_since, detail, started_at, rounds, delivered, failed_attempts,
	   dead, producers_built, last_error, last_error_at, database
  FROM voutbox.workers();
COMMENT ON VIEW @extschema@.outbox_worker IS
	'voutbox: the delivery workers, one per database in voutbox.database: what each does now and its counters since the server started';

/*
 * A role that reads the figures of every tenant and changes nothing: for
 * monitoring (postgres_exporter, monitoring/postgres_exporter.yaml).  Its
 * members see outbox_stats whole and outbox_worker; not the events
 * (outbox, outbox_dlq), not the DLQ administration.
 */
DO $$
DECLARE
	members text;
BEGIN
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'voutbox_monitor') THEN
		CREATE ROLE voutbox_monitor NOLOGIN;
	ELSE
		SELECT pg_catalog.string_agg(pg_catalog.quote_ident(m.rolname), ', ' ORDER BY m.rolname) INTO members
		  FROM pg_catalog.pg_auth_members a
		  JOIN pg_catalog.pg_roles m ON m.oid OPERATOR(pg_catalog.=) a.member
		 WHERE a.roleid OPERATOR(pg_catalog.=) 'voutbox_monitor'::pg_catalog.regrole;
		RAISE NOTICE 'the role voutbox_monitor exists already; its members read every tenant''s figures of voutbox in every database: %',
			COALESCE(members, '(none)')
			USING HINT = 'Check that it is the role you meant; voutbox adopts it as its monitoring role.';
	END IF;
END $$;

/* Whether the current user monitors every tenant's figures. */
CREATE FUNCTION voutbox.monitors() RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_catalog.pg_has_role('voutbox_monitor', 'USAGE') $$;

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
	   AND (voutbox.acts_for(e.tenant_id) OR voutbox.monitors())
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
GRANT SELECT ON @extschema@.outbox_stats, @extschema@.outbox_worker TO voutbox_monitor;


DROP FUNCTION voutbox.worker_status();
