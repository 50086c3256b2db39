/*-------------------------------------------------------------------------
 *
 * storage.c
 *		Batches of committed events, read and settled by the worker.
 *
 * Batches are defined by transaction visibility, not by ids (PgQ's ticker
 * technique).  The cursor is a snapshot "lo": every event whose saving
 * transaction is visible in lo is settled.  To go on, the worker takes a new
 * snapshot "hi"; the window is the events whose transaction is visible in hi
 * but not in lo.  A transaction that got its id early and commits late is
 * simply in a later window; one that is still open is in no window yet, and
 * does not hold back the others.  Not visible in lo means "txid >= xmax(lo)
 * or txid in xip(lo)", so a window is found by two index scans however old
 * the oldest open transaction is.
 *
 * Within a window, events go in save order (seq).  A window is read through a
 * holdable cursor: its rows are sorted once, kept by PostgreSQL in a
 * tuplestore (spilling to disk), and fetched batch_size at a time in short
 * transactions.  No transaction or snapshot stays open while the worker
 * waits for Kafka.
 *
 * Settling appends one row to voutbox.batches (lo, hi, done_seq): the
 * window is settled up to done_seq, or wholly once the cursor is exhausted.
 * Nothing is updated or deleted in the ring of event tables.
 *
 * Events that cannot be sent now are copied to voutbox.deferred: failed ones
 * wait for a retry with backoff, later events of their key wait behind them
 * (so a key's order holds), and scheduled ones wait for their time.  What
 * becomes of each event of a round is settle.c's part of the settling.
 *
 * All functions here run their own short transactions in the worker.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "pgstat.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "voutbox.h"

#define PORTAL_NAME "voutbox_window"

/* What the worker reads of an event; see read_event(). */
#define EVENT_SELECT_LIST \
	"e.id::text, e.seq, e.tenant_id, e.aggregate_type, e.aggregate_id, " \
	"e.event_type, e.event_version, e.payload::text, e.metadata::text, " \
	"coalesce(e.idempotency_key, e.id::text), e.trace_id, e.traceparent, " \
	"e.correlation_id, e.created_at, e.scheduled_for, e.pii, e.pii_fields, " \
	"e.consent::text, e.producer, e.topic, e.msg_key"


/* Quoted schema of the user-facing relations (outbox_dlq). */
static char *api_schema = NULL;

/* ---------------------------------------------------------------------
 * Transactions and SPI
 * ---------------------------------------------------------------------
 */

/* The caller's memory context: CommitTransactionCommand leaves TopMemoryContext. */
static MemoryContext xact_caller_cxt = NULL;

void
voutbox_xact_begin(const char *activity)
{
	xact_caller_cxt = CurrentMemoryContext;
	voutbox_report_activity(activity);
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "voutbox: SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
}

void
voutbox_xact_end(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(xact_caller_cxt);
	pgstat_report_stat(false);
}

/* Run sql with text/other parameters; returns SPI_processed. */
uint64
voutbox_spi(const char *sql, int nargs, Oid *types, Datum *values,
			const char *nulls, int expected)
{
	int			rc = SPI_execute_with_args(sql, nargs, types, values, nulls, false, 0);

	if (rc != expected)
		elog(ERROR, "voutbox: SPI_execute_with_args returned %s for \"%s\"",
			 SPI_result_code_string(rc), sql);
	return SPI_processed;
}

/* A text[] datum of the given strings (NULL entries are SQL NULLs). */
Datum
voutbox_text_array(char **values, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *nulls = palloc(sizeof(bool) * Max(n, 1));
	int			dims[1] = {n};
	int			lbs[1] = {1};

	for (int i = 0; i < n; i++)
	{
		nulls[i] = values[i] == NULL;
		d[i] = nulls[i] ? (Datum) 0 : CStringGetTextDatum(values[i]);
	}
	return PointerGetDatum(construct_md_array(d, nulls, 1, dims, lbs,
											  TEXTOID, -1, false, TYPALIGN_INT));
}

Datum
voutbox_scalar_array(Datum *values, int n, Oid type, int len, bool byval, char align)
{
	return PointerGetDatum(construct_array(values, n, type, len, byval, align));
}

static char *
col_text(HeapTuple tup, TupleDesc td, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, td, col, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/* Copy row "tup" (of EVENT_SELECT_LIST) into ev, in CurrentMemoryContext. */
static void
read_event(HeapTuple tup, TupleDesc td, VoutboxEvent *ev)
{
	bool		isnull;
	Datum		d;

	memset(ev, 0, sizeof(*ev));
	ev->id = col_text(tup, td, 1);
	ev->seq = DatumGetInt64(SPI_getbinval(tup, td, 2, &isnull));
	ev->tenant_id = col_text(tup, td, 3);
	ev->aggregate_type = col_text(tup, td, 4);
	ev->aggregate_id = col_text(tup, td, 5);
	ev->event_type = col_text(tup, td, 6);
	ev->event_version = DatumGetInt32(SPI_getbinval(tup, td, 7, &isnull));
	ev->payload = col_text(tup, td, 8);
	ev->metadata = col_text(tup, td, 9);
	ev->idempotency_key = col_text(tup, td, 10);
	ev->trace_id = col_text(tup, td, 11);
	ev->traceparent = col_text(tup, td, 12);
	ev->correlation_id = col_text(tup, td, 13);
	ev->created_at = DatumGetTimestampTz(SPI_getbinval(tup, td, 14, &isnull));
	d = SPI_getbinval(tup, td, 15, &ev->has_scheduled_for);
	ev->has_scheduled_for = !ev->has_scheduled_for;
	if (ev->has_scheduled_for)
		ev->scheduled_for = DatumGetTimestampTz(d);
	ev->pii = DatumGetBool(SPI_getbinval(tup, td, 16, &isnull));
	d = SPI_getbinval(tup, td, 17, &isnull);
	if (!isnull)
	{
		Datum	   *elems;

		deconstruct_array(DatumGetArrayTypeP(d), TEXTOID, -1, false, TYPALIGN_INT,
						  &elems, NULL, &ev->n_pii_fields);
		ev->pii_fields = palloc(sizeof(char *) * Max(ev->n_pii_fields, 1));
		for (int i = 0; i < ev->n_pii_fields; i++)
			ev->pii_fields[i] = TextDatumGetCString(elems[i]);
	}
	ev->consent = col_text(tup, td, 18);
	ev->producer = col_text(tup, td, 19);
	ev->topic = col_text(tup, td, 20);
	ev->msg_key = col_text(tup, td, 21);
}

/* ---------------------------------------------------------------------
 * Keys that are held: an event of theirs waits in voutbox.deferred
 * ---------------------------------------------------------------------
 */

uint64
voutbox_key_hash(const char *topic, const char *key)
{
	uint64		h = DatumGetUInt64(hash_any_extended((const unsigned char *) topic,
													 strlen(topic), 0));

	return DatumGetUInt64(hash_any_extended((const unsigned char *) key,
											strlen(key), h));
}

HTAB *
voutbox_key_set_new(const char *name)
{
	HASHCTL		ctl;

	ctl.keysize = sizeof(uint64);
	ctl.entrysize = sizeof(uint64);
	ctl.hcxt = CurrentMemoryContext;
	return hash_create(name, 64, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
}

/*
 * The keys held in voutbox.deferred.  A hash collision only makes an
 * unrelated event wait one round behind a key that is not its own.
 */
static HTAB *
load_held_keys(MemoryContext cxt)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);
	HTAB	   *held = voutbox_key_set_new("voutbox held keys");

	MemoryContextSwitchTo(old);
	voutbox_spi("SELECT DISTINCT topic, msg_key FROM " VOUTBOX_SCHEMA ".deferred "
				"WHERE delivered_at IS NULL AND holds_key",
				0, NULL, NULL, NULL, SPI_OK_SELECT);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		char	   *topic = SPI_getvalue(tup, SPI_tuptable->tupdesc, 1);
		char	   *key = SPI_getvalue(tup, SPI_tuptable->tupdesc, 2);
		uint64		h = voutbox_key_hash(topic, key);

		(void) hash_search(held, &h, HASH_ENTER, NULL);
	}
	return held;
}

/* ---------------------------------------------------------------------
 * Reading a round
 * ---------------------------------------------------------------------
 */

/*
 * Look the extension up; remember the schema of its user-facing relations.
 * Sets *recreated when it is not the installation seen last time.  An
 * installation whose SQL objects are of another version than this library
 * is not used: its tables may lack columns the worker writes.
 */
static VoutboxStorageStatus
find_extension(bool *recreated, char **version)
{
	static Oid	ext_oid = InvalidOid;
	bool		isnull;
	Oid			oid;
	char	   *nsp;

	voutbox_spi("SELECT oid, extnamespace::regnamespace::text, extversion FROM pg_catalog.pg_extension "
				"WHERE extname = '" VOUTBOX_EXTENSION "'", 0, NULL, NULL, NULL, SPI_OK_SELECT);
	if (SPI_processed == 0)
		return VOUTBOX_STORAGE_MISSING;
	*version = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3);
	if (strcmp(*version, VOUTBOX_SQL_VERSION) != 0)
		return VOUTBOX_STORAGE_OTHER_VERSION;
	oid = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	nsp = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
	*recreated = OidIsValid(ext_oid) && oid != ext_oid;
	ext_oid = oid;
	if (api_schema == NULL || strcmp(api_schema, nsp) != 0)
	{
		if (api_schema != NULL)
			pfree(api_schema);
		api_schema = MemoryContextStrdup(TopMemoryContext, nsp);
	}
	return VOUTBOX_STORAGE_READY;
}

const char *
voutbox_api_schema(void)
{
	return api_schema;
}

static void
set_snapshot(char **field, const char *value, MemoryContext cxt)
{
	if (*field != NULL)
		pfree(*field);
	*field = value ? MemoryContextStrdup(cxt, value) : NULL;
}

static void
load_cursor(VoutboxCursor *c)
{
	MemoryContext cxt = c->cxt;
	HeapTuple	tup;
	bool		isnull;
	Datum		d;

	voutbox_spi("SELECT lo::text, hi::text, done_seq FROM " VOUTBOX_SCHEMA ".batches "
				"ORDER BY batch_id DESC LIMIT 1", 0, NULL, NULL, NULL, SPI_OK_SELECT);
	if (SPI_processed != 1)
		elog(ERROR, "voutbox: the table " VOUTBOX_SCHEMA ".batches is empty");
	tup = SPI_tuptable->vals[0];
	set_snapshot(&c->lo, SPI_getvalue(tup, SPI_tuptable->tupdesc, 1), cxt);
	set_snapshot(&c->hi, SPI_getvalue(tup, SPI_tuptable->tupdesc, 2), cxt);
	d = SPI_getbinval(tup, SPI_tuptable->tupdesc, 3, &isnull);
	c->done_seq = isnull ? PG_INT64_MIN : DatumGetInt64(d);
}

/*
 * Open the holdable cursor over the window (lo, hi], rows after done_seq.
 * Without an open window, take the current snapshot as the new hi; when it
 * is the same as lo, nothing committed since and no window is opened.
 */
static void
open_window(VoutboxCursor *c)
{
	MemoryContext cxt = c->cxt;
	Oid			types[3] = {TEXTOID, TEXTOID, INT8OID};
	Datum		values[3];

	if (c->hi == NULL)
	{
		voutbox_spi("SELECT pg_current_snapshot()::text", 0, NULL, NULL, NULL, SPI_OK_SELECT);
		set_snapshot(&c->hi, SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1), cxt);
		c->done_seq = PG_INT64_MIN;
		if (strcmp(c->hi, c->lo) == 0)
		{
			set_snapshot(&c->hi, NULL, cxt);
			return;
		}
	}
	values[0] = CStringGetTextDatum(c->lo);
	values[1] = CStringGetTextDatum(c->hi);
	values[2] = Int64GetDatum(c->done_seq);
	voutbox_spi("DECLARE " PORTAL_NAME " NO SCROLL CURSOR WITH HOLD FOR "
				"SELECT " EVENT_SELECT_LIST " FROM " VOUTBOX_SCHEMA ".events e "
				"WHERE ((e.txid >= pg_snapshot_xmax($1::pg_snapshot) "
				"        AND e.txid < pg_snapshot_xmax($2::pg_snapshot)) "
				"       OR e.txid = ANY (ARRAY(SELECT pg_snapshot_xip($1::pg_snapshot)))) "
				"  AND pg_visible_in_snapshot(e.txid, $2::pg_snapshot) "
				"  AND e.seq > $3 "
				"ORDER BY e.seq",
				3, types, values, NULL, SPI_OK_UTILITY);
	c->portal_open = true;
}

static void
close_window(VoutboxCursor *c)
{
	Portal		portal = SPI_cursor_find(PORTAL_NAME);

	if (portal != NULL)
		SPI_cursor_close(portal);
	c->portal_open = false;
}

/* Forget the cursor: it belongs to an installation that is gone. */
static void
forget_cursor(VoutboxCursor *c)
{
	if (c->portal_open)
		close_window(c);
	set_snapshot(&c->lo, NULL, NULL);
	set_snapshot(&c->hi, NULL, NULL);
}

/*
 * Room for "capacity" events in the round: the deferred ones that are due,
 * and a chunk of the window after them.  Actions start as VOUTBOX_SEND.
 */
static void
round_alloc(VoutboxRound *r, int capacity, MemoryContext round_cxt)
{
	r->events = MemoryContextAlloc(round_cxt, sizeof(VoutboxEvent) * capacity);
	r->actions = MemoryContextAllocZero(round_cxt, sizeof(VoutboxAction) * capacity);
	r->errs = MemoryContextAlloc(round_cxt, sizeof(int) * capacity);
}

/* Copy the rows of a query over voutbox.deferred into the round. */
static void
load_deferred_rows(VoutboxRound *r, MemoryContext round_cxt)
{
	MemoryContext old;

	round_alloc(r, SPI_processed + voutbox_batch_size, round_cxt);
	old = MemoryContextSwitchTo(round_cxt);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		bool		isnull;

		read_event(tup, SPI_tuptable->tupdesc, &r->events[i]);
		r->events[i].holds_key = DatumGetBool(SPI_getbinval(tup, SPI_tuptable->tupdesc, 22, &isnull));
		r->events[i].attempts = DatumGetInt32(SPI_getbinval(tup, SPI_tuptable->tupdesc, 23, &isnull));
	}
	r->ndeferred = r->nevents = SPI_processed;
	MemoryContextSwitchTo(old);
}

/*
 * An event that must go alone (a permanent error hit it in a shared batch)
 * and is due makes a round of its own.  Returns whether there is one.
 */
static bool
read_alone_deferred(VoutboxRound *r, MemoryContext round_cxt)
{
	voutbox_spi("SELECT " EVENT_SELECT_LIST ", e.holds_key, e.attempts "
				"  FROM " VOUTBOX_SCHEMA ".deferred e "
				" WHERE e.delivered_at IS NULL AND e.alone AND e.due_at <= now() "
				"   AND NOT (e.holds_key AND EXISTS ("
				"        SELECT 1 FROM " VOUTBOX_SCHEMA ".deferred h "
				"         WHERE h.delivered_at IS NULL AND h.holds_key "
				"           AND h.topic = e.topic AND h.msg_key = e.msg_key AND h.seq < e.seq)) "
				" ORDER BY e.seq LIMIT 1",
				0, NULL, NULL, NULL, SPI_OK_SELECT);
	if (SPI_processed == 0)
		return false;
	load_deferred_rows(r, round_cxt);
	r->alone = true;
	return true;
}

/* Events of voutbox.deferred whose time has come, and the next due time. */
static void
read_due_deferred(VoutboxRound *r, MemoryContext round_cxt)
{
	Datum		limit = Int32GetDatum(voutbox_batch_size);
	Oid			type = INT4OID;

	/*
	 * A held key's events are due when its head (lowest seq) is.  A head that
	 * failed before goes alone: were it to fail again, events sent behind it
	 * could get through and overtake it.  A head never tried (held, or
	 * unsent at a shutdown) takes its key's queue along.  Events that hold
	 * no key are due on their own.
	 */
	voutbox_spi("WITH heads AS ("
				"  SELECT DISTINCT ON (topic, msg_key) topic, msg_key, seq, due_at, attempts "
				"    FROM " VOUTBOX_SCHEMA ".deferred "
				"   WHERE delivered_at IS NULL AND holds_key ORDER BY topic, msg_key, seq) "
				"SELECT " EVENT_SELECT_LIST ", e.holds_key, e.attempts "
				"  FROM " VOUTBOX_SCHEMA ".deferred e LEFT JOIN heads h "
				"       ON e.holds_key AND h.topic = e.topic AND h.msg_key = e.msg_key "
				" WHERE e.delivered_at IS NULL AND NOT e.alone "
				"   AND CASE WHEN e.holds_key "
				"            THEN h.due_at <= now() AND (e.seq = h.seq OR h.attempts = 0) "
				"            ELSE e.due_at <= now() END "
				" ORDER BY e.seq LIMIT $1",
				1, &type, &limit, NULL, SPI_OK_SELECT);
	load_deferred_rows(r, round_cxt);
	r->next_due = voutbox_next_due();
}

/*
 * The earliest time a deferred event not yet due becomes due: a held key's
 * head, or an event that holds no key.  0 when none waits.
 */
TimestampTz
voutbox_next_due(void)
{
	bool		isnull;
	Datum		d;

	voutbox_spi("SELECT min(d.due_at) FROM " VOUTBOX_SCHEMA ".deferred d "
				" WHERE d.delivered_at IS NULL AND d.due_at > now() "
				"   AND NOT (d.holds_key AND EXISTS ("
				"        SELECT 1 FROM " VOUTBOX_SCHEMA ".deferred h "
				"         WHERE h.delivered_at IS NULL AND h.holds_key "
				"           AND h.topic = d.topic AND h.msg_key = d.msg_key AND h.seq < d.seq))",
				0, NULL, NULL, NULL, SPI_OK_SELECT);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? 0 : DatumGetTimestampTz(d);
}

static bool
deferred_waiting(void)
{
	voutbox_spi("SELECT 1 FROM " VOUTBOX_SCHEMA ".deferred WHERE delivered_at IS NULL LIMIT 1",
				0, NULL, NULL, NULL, SPI_OK_SELECT);
	return SPI_processed > 0;
}

/* Fetch the next chunk of the window into the round; decide each event's action. */
static void
read_chunk(VoutboxCursor *c, VoutboxRound *r, HTAB *held, MemoryContext round_cxt)
{
	Portal		portal = SPI_cursor_find(PORTAL_NAME);
	TimestampTz now = GetCurrentTimestamp();
	MemoryContext old;
	int			first = r->nevents;

	if (portal == NULL)
		elog(ERROR, "voutbox: the cursor over the current window is gone");
	SPI_cursor_fetch(portal, true, voutbox_batch_size);
	r->window_done = SPI_processed < (uint64) voutbox_batch_size;

	old = MemoryContextSwitchTo(round_cxt);
	for (uint64 i = 0; i < SPI_processed; i++)
		read_event(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, &r->events[first + i]);
	r->nevents += SPI_processed;
	MemoryContextSwitchTo(old);

	for (int i = first; i < r->nevents; i++)
	{
		VoutboxEvent *ev = &r->events[i];
		uint64		h;

		if (ev->has_scheduled_for && ev->scheduled_for > now)
			r->actions[i] = VOUTBOX_SCHEDULE;
		else if (held != NULL && ev->msg_key != NULL &&
				 (h = voutbox_key_hash(ev->topic, ev->msg_key),
				  hash_search(held, &h, HASH_FIND, NULL) != NULL))
			r->actions[i] = VOUTBOX_HOLD;
		else if ((ev->wait_until = voutbox_topic_stalled_until(ev->topic, now)) != 0)
			r->actions[i] = VOUTBOX_WAIT_TOPIC;
		else
			r->actions[i] = VOUTBOX_SEND;
	}

	/* An empty fetch ends the window, and there is nothing to settle. */
	if (SPI_processed == 0)
	{
		close_window(c);
		set_snapshot(&c->lo, c->hi, c->cxt);
		set_snapshot(&c->hi, NULL, NULL);
	}
}

/*
 * Read the next round in one short transaction.  Returns whether the
 * extension is installed, in this library's version, in the worker's
 * database; if another version is, *version is set to it.
 */
VoutboxStorageStatus
voutbox_storage_read_round(VoutboxCursor *c, VoutboxRound *r, char **version)
{
	MemoryContext round_cxt = CurrentMemoryContext;
	HTAB	   *held = NULL;
	bool		recreated;
	VoutboxStorageStatus status;

	memset(r, 0, sizeof(*r));
	voutbox_xact_begin("reading the next batch");
	if ((status = find_extension(&recreated, version)) != VOUTBOX_STORAGE_READY)
	{
		if (*version != NULL)
			*version = MemoryContextStrdup(round_cxt, *version);
		forget_cursor(c);
		voutbox_xact_end();
		return status;
	}
	if (recreated)
		forget_cursor(c);
	if (c->lo == NULL)
		load_cursor(c);
	if (deferred_waiting())
	{
		if (read_alone_deferred(r, round_cxt))
		{
			voutbox_xact_end();
			r->errs[0] = VOUTBOX_DELIVERY_PENDING;
			return VOUTBOX_STORAGE_READY;
		}
		read_due_deferred(r, round_cxt);
		held = load_held_keys(round_cxt);
	}
	if (!c->portal_open)
		open_window(c);
	if (c->portal_open)
	{
		if (r->events == NULL)
			round_alloc(r, voutbox_batch_size, round_cxt);
		read_chunk(c, r, held, round_cxt);
	}
	voutbox_xact_end();

	for (int i = 0; i < r->nevents; i++)
		r->errs[i] = r->actions[i] == VOUTBOX_SEND ?
			VOUTBOX_DELIVERY_PENDING : VOUTBOX_DELIVERY_SKIPPED;
	return VOUTBOX_STORAGE_READY;
}

/* ---------------------------------------------------------------------
 * Settling a round
 * ---------------------------------------------------------------------
 */

/* Append the cursor row of the chunk just settled. */
static void
append_batch_row(VoutboxCursor *c, VoutboxRound *r)
{
	Oid			types[4] = {TEXTOID, TEXTOID, INT8OID, INT4OID};
	Datum		values[4];
	char		nulls[4] = {' ', ' ', ' ', ' '};

	if (r->window_done)
	{
		values[0] = CStringGetTextDatum(c->hi);
		nulls[1] = nulls[2] = 'n';
	}
	else
	{
		values[0] = CStringGetTextDatum(c->lo);
		values[1] = CStringGetTextDatum(c->hi);
		values[2] = Int64GetDatum(r->events[r->nevents - 1].seq);
	}
	values[3] = Int32GetDatum(r->nevents - r->ndeferred);
	voutbox_spi("INSERT INTO " VOUTBOX_SCHEMA ".batches (lo, hi, done_seq, reach, events) "
				"VALUES ($1::pg_snapshot, $2::pg_snapshot, $3, "
				"        pg_snapshot_xmax(coalesce($2, $1)::pg_snapshot), $4)",
				4, types, values, nulls, SPI_OK_INSERT);
}

/*
 * Record the outcome of a round in one transaction (settle.c judges the
 * events), advance the cursor in it, then in memory.  If anything fails, the
 * worker exits and reads the round again.
 */
void
voutbox_storage_settle_round(VoutboxCursor *c, VoutboxRound *r)
{
	bool		chunk = r->nevents > r->ndeferred;
	bool		deferred;
	VoutboxSettlement *settlement = voutbox_settle_begin(r);

	voutbox_xact_begin("settling a batch");
	deferred = voutbox_settle_events(settlement, r);
	if (chunk)
	{
		append_batch_row(c, r);
		if (r->window_done)
			close_window(c);
	}
	if (deferred || r->ndeferred > 0)
		r->next_due = voutbox_next_due();
	voutbox_xact_end();
	voutbox_settle_end(settlement);

	if (chunk && r->window_done)
	{
		set_snapshot(&c->lo, c->hi, c->cxt);
		set_snapshot(&c->hi, NULL, NULL);
	}
	else if (chunk)
		c->done_seq = r->events[r->nevents - 1].seq;
}
