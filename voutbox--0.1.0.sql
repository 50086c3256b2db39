/* voutbox--0.1.0.sql: install script of the voutbox extension */

\echo Use "CREATE EXTENSION voutbox" to load this file. \quit

/*
 * Layout.
 *
 * The user-facing API (outbox_save, the outbox view, the outbox_dlq table)
 * lives in the schema the extension is created in (public by default), so
 * that it works unqualified right after CREATE EXTENSION.  The storage lives
 * in the schema "voutbox", which the extension owns.
 *
 * Storage is insert-only on the hot path (see README, "Storage"):
 *   voutbox.events_0..2  a ring of three tables; outbox_save() appends to the
 *                        current one; retention truncates a whole retired
 *                        table once every event in it is settled and expired.
 *   voutbox.batches      one row appended per delivered batch: the worker's
 *                        cursor, as a pair of snapshots (PgQ's ticker idea).
 *   voutbox.deferred     the rare events that wait: failed deliveries waiting
 *                        for a retry, later events of their key held behind
 *                        them, and events scheduled for later.
 */

CREATE SCHEMA voutbox;
COMMENT ON SCHEMA voutbox IS 'voutbox internal storage; query the outbox view instead';

CREATE SEQUENCE voutbox.event_seq AS bigint CACHE 1;
COMMENT ON SEQUENCE voutbox.event_seq IS 'save order of events: orders the events of one batch';

/* Parent of the ring; never holds rows itself. */
CREATE TABLE voutbox.events (
	id				uuid		NOT NULL,
	seq				bigint		NOT NULL,
	txid			xid8		NOT NULL,
	tenant_id		text		NOT NULL,
	aggregate_type	text		NOT NULL,
	aggregate_id	text		NOT NULL,
	event_type		text		NOT NULL,
	event_version	integer		NOT NULL,
	payload			jsonb		NOT NULL,
	metadata		jsonb,
	idempotency_key	text,			/* NULL: defaults to the event id */
	trace_id		text,
	traceparent		text,			/* W3C header value sent with the event */
	correlation_id	text		NOT NULL,
	created_at		timestamptz	NOT NULL,
	scheduled_for	timestamptz,
	pii				boolean		NOT NULL,
	pii_fields		text[],
	consent			jsonb,
	producer		text,
	topic			text		NOT NULL,
	msg_key			text			/* NULL: no key, any partition */
);
COMMENT ON TABLE voutbox.events IS 'all retained events (parent of the ring events_0..2)';

CREATE TABLE voutbox.events_0 () INHERITS (voutbox.events);
CREATE TABLE voutbox.events_1 () INHERITS (voutbox.events);
CREATE TABLE voutbox.events_2 () INHERITS (voutbox.events);

CREATE INDEX events_0_txid ON voutbox.events_0 (txid);
CREATE INDEX events_1_txid ON voutbox.events_1 (txid);
CREATE INDEX events_2_txid ON voutbox.events_2 (txid);
CREATE INDEX events_0_id ON voutbox.events_0 (id);
CREATE INDEX events_1_id ON voutbox.events_1 (id);
CREATE INDEX events_2_id ON voutbox.events_2 (id);
CREATE UNIQUE INDEX events_0_idempotency ON voutbox.events_0 (tenant_id, idempotency_key)
	WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX events_1_idempotency ON voutbox.events_1 (tenant_id, idempotency_key)
	WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX events_2_idempotency ON voutbox.events_2 (tenant_id, idempotency_key)
	WHERE idempotency_key IS NOT NULL;

/*
 * The ring: which table takes new events.  Updated only when the worker
 * rotates (once per half retention period), never per event.
 */
CREATE TABLE voutbox.ring (
	slot		integer		PRIMARY KEY CHECK (slot BETWEEN 0 AND 2),
	state		text		NOT NULL CHECK (state IN ('current', 'retired', 'empty')),
	since		timestamptz	NOT NULL DEFAULT now(),	/* when it entered its state */
	opened_at	timestamptz		/* when it last became current */
);
CREATE UNIQUE INDEX ring_one_current ON voutbox.ring ((true)) WHERE state = 'current';
INSERT INTO voutbox.ring (slot, state, opened_at)
	VALUES (0, 'current', now()), (1, 'empty', NULL), (2, 'empty', NULL);

/*
 * The cursor.  The worker appends one row per settled batch and never
 * updates one.  Every event whose transaction is visible in "lo" is settled;
 * when "hi" is set, the worker is inside the window of transactions visible
 * in "hi" but not in "lo", and the events of that window are settled up to
 * "done_seq" (windows are delivered in seq order).  "reach" is the xmax of
 * the newest snapshot of the row; it only grows, and indexes the lookup of
 * when an event was published.
 */
CREATE TABLE voutbox.batches (
	batch_id	bigint		GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	lo			pg_snapshot	NOT NULL,
	hi			pg_snapshot,
	done_seq	bigint,
	reach		xid8		NOT NULL,
	events		integer		NOT NULL,
	settled_at	timestamptz	NOT NULL DEFAULT clock_timestamp(),
	CHECK ((hi IS NULL) = (done_seq IS NULL))
);
CREATE INDEX batches_reach ON voutbox.batches (reach, batch_id);
/*
 * Nothing is settled yet: the empty snapshot sees no transaction.  The row
 * gets an explicit id so that the identity sequence is first used after
 * this transaction: with wal_level = minimal, values a sequence hands out in
 * its creating transaction are not WAL-logged, and after a crash it would
 * hand them out again.
 */
INSERT INTO voutbox.batches (batch_id, lo, reach, events) OVERRIDING SYSTEM VALUE
	VALUES (0, '1:1:', '1', 0);

/*
 * Events that wait, copied out of the ring: retries (attempts > 0), events
 * held behind an earlier event of their key (holds_key), and events
 * scheduled for later.  Rows are rare; they are updated and deleted.
 */
CREATE TABLE voutbox.deferred (
	LIKE voutbox.events,
	holds_key		boolean		NOT NULL,
	attempts		integer		NOT NULL DEFAULT 0,
	due_at			timestamptz	NOT NULL,
	last_error		text,
	last_error_at	timestamptz,
	delivered_at	timestamptz,
	PRIMARY KEY (id)
);
CREATE INDEX deferred_key ON voutbox.deferred (topic, msg_key, seq)
	WHERE delivered_at IS NULL AND holds_key;
CREATE INDEX deferred_due ON voutbox.deferred (due_at)
	WHERE delivered_at IS NULL;
CREATE INDEX deferred_delivered ON voutbox.deferred (delivered_at)
	WHERE delivered_at IS NOT NULL;

/* Events that gave up (user-facing). */
CREATE TABLE outbox_dlq (
	id				uuid		PRIMARY KEY,
	tenant_id		text		NOT NULL,
	aggregate_type	text		NOT NULL,
	aggregate_id	text		NOT NULL,
	event_type		text		NOT NULL,
	event_version	integer		NOT NULL,
	payload			jsonb		NOT NULL,
	metadata		jsonb,
	idempotency_key	text		NOT NULL,
	trace_id		text,
	traceparent		text,
	correlation_id	text		NOT NULL,
	created_at		timestamptz	NOT NULL,
	scheduled_for	timestamptz,
	pii				boolean		NOT NULL,
	pii_fields		text[],
	consent			jsonb,
	producer		text,
	topic			text		NOT NULL,
	msg_key			text,
	seq				bigint		NOT NULL,
	retry_count		integer		NOT NULL,
	last_error		text,
	reason			text		NOT NULL,
	moved_at		timestamptz	NOT NULL DEFAULT now()
);
CREATE INDEX outbox_dlq_idempotency ON outbox_dlq (tenant_id, idempotency_key);
CREATE INDEX outbox_dlq_moved_at ON outbox_dlq (moved_at);
COMMENT ON TABLE outbox_dlq IS 'voutbox: events that gave up after voutbox.max_retries';

/* When the batch that settled an event was committed; NULL while pending. */
CREATE FUNCTION voutbox.published_at(p_txid xid8, p_seq bigint)
RETURNS timestamptz
LANGUAGE sql STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT b.settled_at
	  FROM voutbox.batches b
	 WHERE b.reach > p_txid
	   AND (pg_visible_in_snapshot(p_txid, b.lo)
			OR (b.hi IS NOT NULL
				AND pg_visible_in_snapshot(p_txid, b.hi)
				AND p_seq <= b.done_seq))
	 ORDER BY b.reach, b.batch_id
	 LIMIT 1
$$;

/*
 * Status comes from the newest cursor row alone, so the view is cheap to
 * scan; published_at looks into the cursor's history and is computed only
 * when a query asks for it.
 */
CREATE VIEW outbox AS
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
			WHEN d.id IS NOT NULL AND d.holds_key THEN 'held'
			WHEN d.id IS NOT NULL THEN 'scheduled'
			WHEN pg_visible_in_snapshot(e.txid, c.lo)
				 OR (c.hi IS NOT NULL AND pg_visible_in_snapshot(e.txid, c.hi)
					 AND e.seq <= c.done_seq) THEN 'delivered'
			ELSE 'pending' END AS status,
	   d.due_at AS next_attempt_at
  FROM voutbox.events e
 CROSS JOIN (SELECT lo, hi, done_seq FROM voutbox.batches
			  ORDER BY batch_id DESC LIMIT 1) c
  LEFT JOIN voutbox.deferred d ON d.id = e.id
  LEFT JOIN outbox_dlq q ON q.id = e.id;
COMMENT ON VIEW outbox IS 'voutbox: every retained event with its delivery status';

CREATE FUNCTION outbox_save(tenant_id text,
							aggregate_type text,
							aggregate_id text,
							event_type text,
							payload jsonb,
							event_version integer DEFAULT NULL,
							metadata jsonb DEFAULT NULL,
							idempotency_key text DEFAULT NULL,
							correlation_id text DEFAULT NULL,
							trace_id text DEFAULT NULL,
							pii boolean DEFAULT false,
							pii_fields text[] DEFAULT NULL,
							consent jsonb DEFAULT NULL,
							producer text DEFAULT NULL,
							scheduled_for timestamptz DEFAULT NULL)
RETURNS uuid
AS 'MODULE_PATHNAME', 'voutbox_outbox_save'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION outbox_save(text, text, text, text, jsonb, integer, jsonb, text, text, text,
								boolean, text[], jsonb, text, timestamptz)
	IS 'voutbox: store an event that is published to Kafka when, and only if, the calling transaction commits';

/*
 * pg_dump keeps the dead-letter queue.  Pending events are not dumped: their
 * transaction ids mean nothing in another cluster (pg_upgrade keeps them).
 */
SELECT pg_catalog.pg_extension_config_dump('outbox_dlq', '');
