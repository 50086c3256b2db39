/*-------------------------------------------------------------------------
 *
 * storage.c
 *		Rounds of committed events, read and settled by the worker.
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
 * Within a window, events go in save order (seq), in rounds of at most the
 * number of events and bytes the caller has room for (at least one).  A
 * window that fits in the round is read by one query (a kept plan asking for
 * one row more than there is room for), the common case of a steady flow.  A
 * larger one is read through a holdable scrollable cursor: its rows are
 * sorted once, kept by PostgreSQL in a tuplestore (spilling to disk), and
 * fetched in short transactions; a DestReceiver copies each row once,
 * straight into the round, and rows fetched past the budget are not copied
 * but given back to the cursor (MOVE ABSOLUTE).  The reader moves on as it
 * reads; the cursor's table moves on only when the rounds are settled, in
 * the order they were read (stream.c).  No transaction or snapshot stays
 * open while the worker waits for Kafka.
 *
 * Only committed work that is durable is delivered: at the end of a read,
 * the WAL is flushed up to where it was written, which covers the commit
 * record of every transaction the read could see (a commit becomes visible
 * only after its record is written, but with synchronous_commit = off it may
 * be visible before the record is flushed).
 *
 * Settling appends one row per round to voutbox.batches (lo, hi, done_seq):
 * the window is settled up to done_seq, or wholly once it was read to its
 * end.
 * Nothing is updated or deleted in the ring of event tables.
 *
 * Events that cannot be sent now are copied to voutbox.deferred: failed ones
 * wait for a retry with backoff, later events of their key wait behind them,
 * and scheduled ones wait for their time.  A key's events wait in the order
 * the worker met them, which is commit order: by the batch whose settling
 * deferred them, then by seq (KEY_EARLIER).  What becomes of each event of
 * a round is settle.c's part of the settling.
 *
 * Every transaction here first takes a lock on the extension and checks that
 * it still exists: a DROP EXTENSION waits for it, and no statement of the
 * worker ever meets a schema "voutbox" that is not the extension's.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/detoast.h"
#include "access/xlog.h"
#include "access/xlog_internal.h"
#include "catalog/namespace.h"
#include "catalog/pg_extension.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "common/hashfn.h"
#include "common/string.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/params.h"
#include "storage/lmgr.h"
#include "tcop/pquery.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/portal.h"
#include "utils/timestamp.h"

#include <librdkafka/rdkafka.h>

#include "utils/snapmgr.h"

#include "voutbox.h"

#define PORTAL_NAME "voutbox_window"

/* What the worker reads of an event; see read_event(). */
#define EVENT_SELECT_LIST \
	"e.id::text, e.seq, e.tenant_id, e.aggregate_type, e.aggregate_id, " \
	"e.event_type, e.event_version, e.payload::text, e.metadata::text, " \
	"coalesce(e.idempotency_key, e.id::text), e.trace_id, e.traceparent, " \
	"e.correlation_id, e.created_at, e.scheduled_for, e.pii, e.pii_fields, " \
	"e.consent::text, e.producer, e.topic, e.msg_key, e.route, e.format, " \
	"e.headers::text"
#define EVENT_SELECT_COLUMNS	24

/* A deferred event that still waits (not delivered, not dead). */
#define WAITING(a)		a ".delivered_at IS NULL AND " a ".dead_reason IS NULL"

/* A deferred event whose last attempt was acknowledged without an offset. */
#define UNCONFIRMED(a)	"(" a ".last_error_code IS NOT DISTINCT FROM '" VOUTBOX_UNCONFIRMED_CODE "')"
/* Event h is before event e in their key's queue. */
#define KEY_EARLIER(h, e) \
	"(" h ".batch_id, " h ".commit_pos, " h ".seq) < (" e ".batch_id, " e ".commit_pos, " e ".seq)"
/*
 * An earlier event of deferred event e's key holds the key.  (Here and
 * below, OFFSET 0 keeps the EXISTS a probe of deferred_key for each row: as
 * an anti-join, its kept plan hashed every held key first.)
 */
#define HELD_BEHIND_EARLIER(e) \
	"EXISTS (SELECT 1 FROM " VOUTBOX_SCHEMA ".deferred h " \
	"         WHERE " WAITING("h") " AND h.holds_key " \
	"           AND h.topic = " e ".topic AND h.msg_key = " e ".msg_key " \
	"           AND " KEY_EARLIER("h", e) " OFFSET 0)"

/* Whether this worker made due the events its predecessor left in flight. */
static bool in_flight_reset = false;

/*
 * An earlier event of deferred event e's key is in flight (a requeued event
 * may head the key's queue while it is: its followers wait all the same).
 */
#define IN_FLIGHT_BEFORE(e) \
	"EXISTS (SELECT 1 FROM " VOUTBOX_SCHEMA ".deferred f " \
	"         WHERE " WAITING("f") " AND f.holds_key AND f.due_at = 'infinity' " \
	"           AND f.topic = " e ".topic AND f.msg_key = " e ".msg_key " \
	"           AND " KEY_EARLIER("f", e) " OFFSET 0)"

/* Rows fetched at once while the size of the window's events is unknown. */
#define FIRST_FETCH_ROWS	32

/* ---------------------------------------------------------------------
 * The extension
 * ---------------------------------------------------------------------
 */

/*
 * Lock the extension against DROP EXTENSION for the rest of the transaction
 * and return its OID, or InvalidOid if it is not installed.
 */
Oid
voutbox_lock_extension(void)
{
	static Oid	last = InvalidOid;
	Oid			oid;

	/*
	 * Lock the installation seen last before looking it up: one look-up
	 * then tells that it is (still) the one, the usual case.
	 */
	if (OidIsValid(last))
		LockDatabaseObject(ExtensionRelationId, last, 0, AccessShareLock);
	oid = get_extension_oid(VOUTBOX_EXTENSION, true);
	if (oid == last)
		return oid;
	if (OidIsValid(last))
		UnlockDatabaseObject(ExtensionRelationId, last, 0, AccessShareLock);
	last = InvalidOid;
	if (!OidIsValid(oid))
		return InvalidOid;
	LockDatabaseObject(ExtensionRelationId, oid, 0, AccessShareLock);
	/* It may have been dropped while we waited for the lock. */
	if (get_extension_oid(VOUTBOX_EXTENSION, true) != oid)
		return InvalidOid;
	last = oid;
	return oid;
}

/*
 * Look the extension up and lock it.  Sets *recreated when it is not the
 * installation seen last time.  An installation whose SQL objects are of
 * another version than this library is not used: its tables may lack
 * columns the worker writes.
 */
static VoutboxStorageStatus
find_extension(bool *recreated, char **version, Oid *extension)
{
	static Oid	ext_oid = InvalidOid;	/* ready, as checked at checked_at */
	static Oid	last_oid = InvalidOid;	/* the installation read last */
	static TimestampTz checked_at = 0;
	Oid			oid = voutbox_lock_extension();
	Oid			type = OIDOID;
	Datum		value = ObjectIdGetDatum(oid);
	TimestampTz now = GetCurrentTimestamp();

	if (!OidIsValid(oid))
		return VOUTBOX_STORAGE_MISSING;
	/* Its version is looked up again once a second, and when it is another. */
	if (oid == ext_oid && !TimestampDifferenceExceeds(checked_at, now, 1000))
	{
		*extension = oid;
		return VOUTBOX_STORAGE_READY;
	}
	ext_oid = InvalidOid;
	voutbox_spi("SELECT extversion FROM pg_catalog.pg_extension WHERE oid = $1",
				1, &type, &value, NULL, SPI_OK_SELECT);
	if (SPI_processed == 0)
		return VOUTBOX_STORAGE_MISSING;
	*version = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	if (strcmp(*version, VOUTBOX_SQL_VERSION) != 0)
		return VOUTBOX_STORAGE_OTHER_VERSION;
	*recreated = OidIsValid(last_oid) && oid != last_oid;
	ext_oid = last_oid = *extension = oid;
	checked_at = now;
	return VOUTBOX_STORAGE_READY;
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
 * Past this many events with a key in a window, all the held keys are read
 * at once (their number spread over the window's events) rather than looked
 * up one by one.
 */
#define HELD_LOOKUP_KEYS 256

/*
 * The keys held in voutbox.deferred among those of the window's events read
 * into the round (NULL when none has a key).  A hash collision only makes an
 * unrelated event wait one round behind a key that is not its own.  The
 * window's keys are looked up one by one (by their text: a key that comes
 * twice is looked up twice) when they are few: the cost of a small round
 * does not grow with the events that wait in voutbox.deferred (a topic that
 * does not answer can hold thousands of keys).
 */
static HTAB *
load_held_keys(MemoryContext cxt, VoutboxRound *r)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);
	HTAB	   *held = voutbox_key_set_new("voutbox held keys");
	char	  **topics = palloc(sizeof(char *) * Max(r->nevents - r->ndeferred, 1));
	char	  **keys = palloc(sizeof(char *) * Max(r->nevents - r->ndeferred, 1));
	int			n = 0;

	MemoryContextSwitchTo(old);
	for (int i = r->ndeferred; i < r->nevents; i++)
	{
		VoutboxEvent *ev = &r->events[i];

		if (ev->msg_key == NULL)
			continue;
		topics[n] = ev->topic;
		keys[n++] = ev->msg_key;
	}
	if (n == 0)
		return NULL;
	if (n <= HELD_LOOKUP_KEYS)
	{
		Oid			types[2] = {TEXTARRAYOID, TEXTARRAYOID};
		Datum		values[2];

		values[0] = voutbox_text_array(topics, n);
		values[1] = voutbox_text_array(keys, n);
		/* (LIMIT keeps each look-up a probe of deferred_key, whatever the plan.) */
		voutbox_spi("SELECT k.topic, k.msg_key "
					"  FROM unnest($1::pg_catalog.text[], $2::pg_catalog.text[]) AS k(topic, msg_key), "
					"       LATERAL (SELECT 1 FROM " VOUTBOX_SCHEMA ".deferred d "
					"                 WHERE " WAITING("d") " AND d.holds_key "
					"                   AND d.topic = k.topic AND d.msg_key = k.msg_key "
					"                 LIMIT 1) h",
					2, types, values, NULL, SPI_OK_SELECT);
	}
	else
		voutbox_spi("SELECT DISTINCT d.topic, d.msg_key FROM " VOUTBOX_SCHEMA ".deferred d "
					"WHERE " WAITING("d") " AND d.holds_key",
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
 * Copying events into a round
 * ---------------------------------------------------------------------
 */

/* Room for at least n events in the round; actions start as VOUTBOX_SEND. */
static void
round_reserve(VoutboxRound *r, int n)
{
	int			cap = Max(r->capacity, 64);

	if (n <= r->capacity)
		return;
	while (cap < n)
		cap *= 2;
	if (r->events == NULL)
	{
		r->events = MemoryContextAlloc(r->cxt, sizeof(VoutboxEvent) * cap);
		r->actions = MemoryContextAlloc(r->cxt, sizeof(VoutboxAction) * cap);
		r->errs = MemoryContextAlloc(r->cxt, sizeof(int) * cap);
		r->receipts = MemoryContextAlloc(r->cxt, sizeof(VoutboxReceipt) * cap);
	}
	else
	{
		r->events = repalloc(r->events, sizeof(VoutboxEvent) * cap);
		r->actions = repalloc(r->actions, sizeof(VoutboxAction) * cap);
		r->errs = repalloc(r->errs, sizeof(int) * cap);
		r->receipts = repalloc(r->receipts, sizeof(VoutboxReceipt) * cap);
	}
	r->capacity = cap;
}

/* A text column as a C string, or NULL. */
static char *
text_col(TupleTableSlot *slot, int col)
{
	bool		isnull;
	Datum		d = slot_getattr(slot, col, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/*
 * s in UTF-8, the envelope's encoding: s itself in a UTF-8 database or if it
 * is ASCII, else a converted copy.  A character without an equivalent in
 * UTF-8 (outbox_save() refuses them, but an older version did not) raises no
 * ERROR, which would stop every delivery: the event is marked, and goes to
 * the dead-letter queue.  In a transaction (the conversion is a function of
 * the catalogs).
 */
static char *
to_utf8(char *s, VoutboxEvent *ev)
{
	static Oid	proc = InvalidOid;
	int			enc = GetDatabaseEncoding();
	size_t		len;
	size_t		dstlen;
	char	   *dst;

	if (s == NULL || enc == PG_UTF8 || pg_is_ascii(s))
		return s;
	if (!OidIsValid(proc))
		proc = FindDefaultConversionProc(enc, PG_UTF8);
	len = strlen(s);
	dstlen = len * MAX_CONVERSION_GROWTH + 1;
	/* Beyond what outbox_save() accepts, even in a worst case: not sent. */
	if (!OidIsValid(proc) || dstlen > MaxAllocSize)
	{
		ev->unconvertible = true;
		return s;
	}
	dst = palloc(dstlen);
	if (pg_do_encoding_conversion_buf(proc, enc, PG_UTF8, (unsigned char *) s, len,
									  (unsigned char *) dst, dstlen, true) < (int) len)
	{
		pfree(dst);
		ev->unconvertible = true;
		return s;
	}
	return dst;
}

/* A text column that only goes to Kafka: one copy, in UTF-8. */
static char *
utf8_col(TupleTableSlot *slot, int col, VoutboxEvent *ev)
{
	char	   *s = text_col(slot, col);
	char	   *u = to_utf8(s, ev);

	if (u != s)
		pfree(s);
	return u;
}

/* Bytes the text columns of a row take, before they are copied. */
static int64
row_bytes(TupleTableSlot *slot)
{
	int64		bytes = sizeof(VoutboxEvent);

	slot_getallattrs(slot);
	for (int i = 0; i < slot->tts_tupleDescriptor->natts; i++)
		if (!slot->tts_isnull[i] &&
			TupleDescAttr(slot->tts_tupleDescriptor, i)->attlen == -1)
			bytes += toast_raw_datum_size(slot->tts_values[i]);
	return bytes;
}

/* Copy a row of EVENT_SELECT_LIST into ev, in CurrentMemoryContext. */
static void
read_event(TupleTableSlot *slot, VoutboxEvent *ev)
{
	bool		isnull;
	Datum		d;
	char	   *format;
	const VoutboxRoute *route;

	memset(ev, 0, sizeof(*ev));
	ev->id = text_col(slot, 1);
	ev->seq = DatumGetInt64(slot_getattr(slot, 2, &isnull));
	ev->tenant_id = text_col(slot, 3);
	ev->tenant_id_utf8 = to_utf8(ev->tenant_id, ev);
	ev->aggregate_type = utf8_col(slot, 4, ev);
	ev->aggregate_id = utf8_col(slot, 5, ev);
	ev->event_type = utf8_col(slot, 6, ev);
	ev->event_version = DatumGetInt32(slot_getattr(slot, 7, &isnull));
	ev->payload = utf8_col(slot, 8, ev);
	ev->metadata = utf8_col(slot, 9, ev);
	ev->idempotency_key = utf8_col(slot, 10, ev);
	ev->trace_id = utf8_col(slot, 11, ev);
	ev->traceparent = utf8_col(slot, 12, ev);
	ev->correlation_id = utf8_col(slot, 13, ev);
	ev->created_at = DatumGetTimestampTz(slot_getattr(slot, 14, &isnull));
	d = slot_getattr(slot, 15, &isnull);
	ev->has_scheduled_for = !isnull;
	if (ev->has_scheduled_for)
		ev->scheduled_for = DatumGetTimestampTz(d);
	ev->pii = DatumGetBool(slot_getattr(slot, 16, &isnull));
	d = slot_getattr(slot, 17, &isnull);
	if (!isnull)
	{
		Datum	   *elems;
		bool	   *nulls;
		int			n;

		/* (NULL elements were refused when saved; none goes out.) */
		deconstruct_array(DatumGetArrayTypeP(d), TEXTOID, -1, false, TYPALIGN_INT,
						  &elems, &nulls, &n);
		ev->pii_fields = palloc(sizeof(char *) * Max(n, 1));
		for (int i = 0; i < n; i++)
			if (!nulls[i])
				ev->pii_fields[ev->n_pii_fields++] = to_utf8(TextDatumGetCString(elems[i]), ev);
	}
	ev->consent = utf8_col(slot, 18, ev);
	ev->producer = utf8_col(slot, 19, ev);
	ev->topic = text_col(slot, 20);
	ev->msg_key = text_col(slot, 21);
	ev->msg_key_utf8 = to_utf8(ev->msg_key, ev);
	ev->route = text_col(slot, 22);
	format = text_col(slot, 23);
	ev->format = format != NULL ? voutbox_format_lookup(format) : -1;
	ev->headers = utf8_col(slot, 24, ev);
	/* Its route's topic settings, for when its topic is created (topics.c). */
	if (ev->route != NULL && (route = voutbox_route_find(ev->route)) != NULL &&
		route->topic_settings != NULL)
	{
		VoutboxTopicSettings *ts = palloc(sizeof(VoutboxTopicSettings));

		*ts = *route->topic_settings;
		ts->config = ts->config ? pstrdup(ts->config) : NULL;
		ev->topic_settings = ts;
	}
	/* a window's rows add the commit position */
	ev->commit_pos = 0;
	if (slot->tts_tupleDescriptor->natts == EVENT_SELECT_COLUMNS + 1)
		ev->commit_pos = DatumGetInt64(slot_getattr(slot, EVENT_SELECT_COLUMNS + 1, &isnull));
	/* voutbox.deferred rows add holds_key, attempts and whether unconfirmed */
	else if (slot->tts_tupleDescriptor->natts > EVENT_SELECT_COLUMNS)
	{
		ev->holds_key = DatumGetBool(slot_getattr(slot, EVENT_SELECT_COLUMNS + 1, &isnull));
		ev->attempts = DatumGetInt32(slot_getattr(slot, EVENT_SELECT_COLUMNS + 2, &isnull));
		ev->unconfirmed = DatumGetBool(slot_getattr(slot, EVENT_SELECT_COLUMNS + 3, &isnull));
	}
}

/*
 * A DestReceiver that copies rows into the round while it has room, counted
 * in events (limit) and in bytes (budget; the first event always fits).  A
 * row past either is not copied: the receiver counts it as "over" and, if
 * stop_early, stops the query.
 */
typedef struct RoundReceiver
{
	DestReceiver pub;
	VoutboxRound *round;
	int			limit;
	int64		budget;
	bool		stop_early;
	uint64		over;
} RoundReceiver;

static bool
receive_event(TupleTableSlot *slot, DestReceiver *self)
{
	RoundReceiver *rr = (RoundReceiver *) self;
	VoutboxRound *r = rr->round;
	int64		bytes;
	MemoryContext old;

	if (rr->over > 0 || r->nevents >= rr->limit)
	{
		rr->over++;
		return !rr->stop_early;
	}
	bytes = row_bytes(slot);
	if (r->nevents > 0 && r->bytes + bytes > rr->budget)
	{
		rr->over++;
		return !rr->stop_early;
	}
	round_reserve(r, r->nevents + 1);
	old = MemoryContextSwitchTo(r->cxt);
	read_event(slot, &r->events[r->nevents]);
	MemoryContextSwitchTo(old);
	r->actions[r->nevents] = VOUTBOX_SEND;
	r->nevents++;
	r->bytes += bytes;
	return true;
}

static void
receiver_startup(DestReceiver *self pg_attribute_unused(), int operation pg_attribute_unused(),
				 TupleDesc typeinfo pg_attribute_unused())
{
}

static void
receiver_noop(DestReceiver *self pg_attribute_unused())
{
}

static void
receiver_init(RoundReceiver *rr, VoutboxRound *r, int limit, int64 budget, bool stop_early)
{
	memset(rr, 0, sizeof(*rr));
	rr->pub.receiveSlot = receive_event;
	rr->pub.rStartup = receiver_startup;
	rr->pub.rShutdown = receiver_noop;
	rr->pub.rDestroy = receiver_noop;
	rr->pub.mydest = DestNone;
	rr->round = r;
	rr->limit = limit;
	rr->budget = budget;
	rr->stop_early = stop_early;
}

/*
 * Run a kept plan of sql into the round, within its limit and budget (rows
 * past them stop the query); returns how many rows did not fit.  read_only
 * runs it in the transaction's current snapshot, else in a new one.
 */
static uint64
read_rows(VoutboxRound *r, const char *sql, int nargs, Oid *types, Datum *values,
		  int limit, int64 budget, bool read_only)
{
	RoundReceiver rr;
	SPIExecuteOptions options;
	ParamListInfo params = makeParamList(nargs);
	int			rc;

	for (int i = 0; i < nargs; i++)
	{
		params->params[i].value = values[i];
		params->params[i].isnull = false;
		params->params[i].pflags = PARAM_FLAG_CONST;
		params->params[i].ptype = types[i];
	}
	receiver_init(&rr, r, limit, budget, true);
	memset(&options, 0, sizeof(options));
	options.params = params;
	options.read_only = read_only;
	options.dest = (DestReceiver *) &rr;
	rc = SPI_execute_plan_extended(voutbox_plan(sql, nargs, types), &options);
	/* (SPI says SPI_OK_UTILITY for a SELECT into a receiver of type DestNone.) */
	if (rc != SPI_OK_SELECT && rc != SPI_OK_UTILITY)
		elog(ERROR, "voutbox: SPI_execute_plan_extended returned %s for \"%s\"",
			 SPI_result_code_string(rc), sql);
	return rr.over;
}

/* ---------------------------------------------------------------------
 * The cursor over a window
 * ---------------------------------------------------------------------
 */

static void
set_snapshot(char **field, const char *value, MemoryContext cxt)
{
	if (*field != NULL)
		pfree(*field);
	*field = value ? MemoryContextStrdup(cxt, value) : NULL;
}

/*
 * The end of the WAL written so far.  (At the very start of a page,
 * GetXLogInsertRecPtr() points past the page's header, which holds nothing
 * yet and which XLogFlush() refuses to wait for, and which no standby
 * receives before more is written: the end of what was written is the
 * page's start.)
 */
static XLogRecPtr
written_wal_end(void)
{
	XLogRecPtr	upto = GetXLogInsertRecPtr();

	if (XLogSegmentOffset(upto, wal_segment_size) == SizeOfXLogLongPHD)
		upto -= SizeOfXLogLongPHD;
	else if (upto % XLOG_BLCKSZ == SizeOfXLogShortPHD)
		upto -= SizeOfXLogShortPHD;
	return upto;
}

static void
load_cursor(VoutboxCursor *c)
{
	MemoryContext cxt = c->cxt;
	HeapTuple	tup;
	bool		isnull;
	Datum		d;

	voutbox_spi("SELECT b.lo::text, b.hi::text, b.done_seq, b.done_commit FROM " VOUTBOX_SCHEMA ".batches b "
				"ORDER BY b.batch_id DESC LIMIT 1", 0, NULL, NULL, NULL, SPI_OK_SELECT);
	if (SPI_processed != 1)
		elog(ERROR, "voutbox: the table " VOUTBOX_SCHEMA ".batches is empty");
	tup = SPI_tuptable->vals[0];
	set_snapshot(&c->lo, SPI_getvalue(tup, SPI_tuptable->tupdesc, 1), cxt);
	c->params_valid = false;
	set_snapshot(&c->hi, SPI_getvalue(tup, SPI_tuptable->tupdesc, 2), cxt);
	c->params_valid = false;
	d = SPI_getbinval(tup, SPI_tuptable->tupdesc, 3, &isnull);
	c->read_seq = isnull ? PG_INT64_MIN : DatumGetInt64(d);
	/* (Rows of 0.6.1 and before: save order, position 0.) */
	d = SPI_getbinval(tup, SPI_tuptable->tupdesc, 4, &isnull);
	c->read_pos = isnull ? 0 : DatumGetInt64(d);
	if (c->read_seq == PG_INT64_MIN)
		c->read_pos = PG_INT64_MIN;
}

/*
 * The events of the window (lo, hi] after position ($6, $5), in the order of
 * their transactions' commits (voutbox.commit_order, 0 for none), then of
 * seq: $1 is xmax(lo), $2 xmax(hi), $3 xip(lo), $4 hi (window_params()).
 * Typed parameters, so that a kept (generic) plan scans the txid indexes and
 * converts no snapshot per row.  Each event's commit position is probed by
 * its txid in commit_order's indexes (a LATERAL subquery that cannot be
 * pulled up): linear whatever the plan.  A join of the window's positions
 * (a CTE) read 100,000 events of one transaction faster (149-236 ms against
 * 309-343 ms, 76-85 ms without positions), but a generic plan made while
 * commit_order looked empty could rescan the CTE for each event.
 */
#define WINDOW_QUERY \
	"SELECT " EVENT_SELECT_LIST ", o.pos FROM " VOUTBOX_SCHEMA ".events e " \
	"  CROSS JOIN LATERAL (SELECT " VOUTBOX_COMMIT_POS("e.txid") " AS pos OFFSET 0) o " \
	"WHERE ((e.txid >= $1 AND e.txid < $2) OR e.txid = ANY ($3)) " \
	"  AND pg_catalog.pg_visible_in_snapshot(e.txid, $4) " \
	"  AND (o.pos, e.seq) > ($6, $5) " \
	"ORDER BY o.pos, e.seq"
#define WINDOW_NPARAMS	6

/*
 * Keep xmax(lo), xmax(hi), xip(lo) and hi, columns first..first+3 of the
 * row just read, as the cursor's window parameters.
 */
static void
keep_window_params(VoutboxCursor *c, HeapTuple tup, TupleDesc desc, int first)
{
	MemoryContext old = MemoryContextSwitchTo(c->cxt);
	bool		isnull;

	for (int i = 0; i < 4; i++)
	{
		Datum		d = SPI_getbinval(tup, desc, first + i, &isnull);

		if (c->params[i] != (Datum) 0 && i >= 2)
			pfree(DatumGetPointer(c->params[i]));
		c->params[i] = i < 2 ? d : PointerGetDatum(PG_DETOAST_DATUM_COPY(d));
	}
	MemoryContextSwitchTo(old);
	c->params_valid = true;
}

/*
 * The parameters of WINDOW_QUERY for the cursor's window, computed once per
 * window, into values[0..4] (types[0..4]).
 */
static void
window_params(VoutboxCursor *c, Datum *values, Oid *types)
{
	static const Oid param_types[WINDOW_NPARAMS] = {XID8OID, XID8OID, XID8ARRAYOID, PG_SNAPSHOTOID, INT8OID, INT8OID};

	if (!c->params_valid)
	{
		Oid			t[2] = {TEXTOID, TEXTOID};
		Datum		v[2] = {CStringGetTextDatum(c->lo), CStringGetTextDatum(c->hi)};

		voutbox_spi("SELECT pg_catalog.pg_snapshot_xmax($1::pg_catalog.pg_snapshot), "
					"       pg_catalog.pg_snapshot_xmax($2::pg_catalog.pg_snapshot), "
					"       ARRAY(SELECT pg_catalog.pg_snapshot_xip($1::pg_catalog.pg_snapshot)), "
					"       $2::pg_catalog.pg_snapshot",
					2, t, v, NULL, SPI_OK_SELECT);
		keep_window_params(c, SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	}
	for (int i = 0; i < 4; i++)
		values[i] = c->params[i];
	values[4] = Int64GetDatum(c->read_seq);
	values[5] = Int64GetDatum(c->read_pos);
	memcpy(types, param_types, sizeof(param_types));
}

static bool deferred_waiting(void);

/*
 * The one query that starts a read: without an open window, the current
 * snapshot as the new hi, with the parameters of the window it opens (none
 * when it equals lo: nothing committed since); and, if asked, whether
 * deferred events wait.  Returns the latter.
 */
static bool
look(VoutboxCursor *c, bool want_deferred)
{
	Oid			types[2] = {TEXTOID, BOOLOID};
	Datum		values[2];
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	bool		deferred;
	char	   *hi;

	if (c->hi != NULL)
		return want_deferred && deferred_waiting();
	values[0] = CStringGetTextDatum(c->lo);
	values[1] = BoolGetDatum(want_deferred);
	voutbox_spi("SELECT s::pg_catalog.text, "
				"       $2 AND EXISTS (SELECT 1 FROM " VOUTBOX_SCHEMA ".deferred e WHERE " WAITING("e") "), "
				"       pg_catalog.pg_snapshot_xmax($1::pg_catalog.pg_snapshot), "
				"       pg_catalog.pg_snapshot_xmax(s), "
				"       ARRAY(SELECT pg_catalog.pg_snapshot_xip($1::pg_catalog.pg_snapshot)), s "
				"  FROM pg_catalog.pg_current_snapshot() s",
				2, types, values, NULL, SPI_OK_SELECT);
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	deferred = DatumGetBool(SPI_getbinval(tup, desc, 2, &isnull));
	hi = SPI_getvalue(tup, desc, 1);
	if (strcmp(hi, c->lo) == 0)
		return deferred;
	set_snapshot(&c->hi, hi, c->cxt);
	c->read_seq = PG_INT64_MIN;
	c->read_pos = PG_INT64_MIN;
	c->fresh = true;
	keep_window_params(c, tup, desc, 3);
	return deferred;
}

/*
 * A window small enough for the room left in the round is read by one
 * query, with no cursor: the common case of a steady flow.  Asks for one
 * row more than there is room for; when that row comes (or the bytes run
 * out), the rest of the window is read through a cursor.  Returns whether
 * the query read the whole window.
 */
static bool
read_small_window(VoutboxCursor *c, VoutboxRound *r, int limit, int64 budget)
{
	Oid			types[WINDOW_NPARAMS + 1];
	Datum		values[WINDOW_NPARAMS + 1];
	uint64		over;

	window_params(c, values, types);
	types[WINDOW_NPARAMS] = INT8OID;
	values[WINDOW_NPARAMS] = Int64GetDatum((int64) (limit - r->nevents) + 1);

	/*
	 * Not read-only: SPI then takes a new snapshot for the query, which sees
	 * every transaction that hi sees (the transaction's first snapshot was
	 * taken before hi, and may not).
	 */
	over = read_rows(r, WINDOW_QUERY " LIMIT $7", WINDOW_NPARAMS + 1, types, values,
					 limit, budget, false);
	c->consumed = 0;
	return over == 0;
}

/* Open the holdable cursor over the rest of the window, rows after read_seq. */
static void
open_window(VoutboxCursor *c)
{
	Oid			types[WINDOW_NPARAMS];
	Datum		values[WINDOW_NPARAMS];

	window_params(c, values, types);
	c->consumed = 0;
	voutbox_spi_once("DECLARE " PORTAL_NAME " SCROLL CURSOR WITH HOLD FOR " WINDOW_QUERY,
					 WINDOW_NPARAMS, types, values, NULL, SPI_OK_UTILITY);
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

/* Forget the cursor: it belongs to an installation that is gone, or failed. */
void
voutbox_forget_cursor(VoutboxCursor *c)
{
	Portal		portal = GetPortalByName(PORTAL_NAME);

	if (PortalIsValid(portal))
		PortalDrop(portal, false);
	c->portal_open = false;
	c->stale = false;
	set_snapshot(&c->lo, NULL, NULL);
	c->params_valid = false;
	set_snapshot(&c->hi, NULL, NULL);
	c->params_valid = false;
}

/* ---------------------------------------------------------------------
 * Reading a round
 * ---------------------------------------------------------------------
 */

/*
 * An event that must go alone (a permanent error hit it in a shared batch)
 * and is due makes a round of its own.  Returns whether there is one.
 */
static bool
read_alone_deferred(VoutboxRound *r, int64 budget)
{
	read_rows(r,
					   "SELECT " EVENT_SELECT_LIST ", e.holds_key, e.attempts, " UNCONFIRMED("e") " "
					   "  FROM " VOUTBOX_SCHEMA ".deferred e "
					   " WHERE " WAITING("e") " AND e.alone AND e.due_at <= pg_catalog.now() "
					   "   AND NOT (e.holds_key AND " HELD_BEHIND_EARLIER("e") ") "
					   " ORDER BY e.batch_id, e.commit_pos, e.seq LIMIT 1",
					   0, NULL, NULL, 1, budget, true);
	r->ndeferred = r->nevents;
	if (r->nevents == 0)
		return false;
	r->alone = true;
	return true;
}

/*
 * The deferred events read into the round are in flight until the round is
 * settled (settle.c), or a new worker starts: due at 'infinity', so that no
 * later read takes them again.
 */
static void
mark_in_flight(VoutboxRound *r)
{
	char	  **ids;
	Oid			type = TEXTARRAYOID;
	Datum		value;

	if (r->ndeferred == 0)
		return;
	ids = palloc(sizeof(char *) * r->ndeferred);
	for (int i = 0; i < r->ndeferred; i++)
		ids[i] = r->events[i].id;
	value = voutbox_text_array(ids, r->ndeferred);
	voutbox_spi("UPDATE " VOUTBOX_SCHEMA ".deferred d SET due_at = 'infinity' "
				" WHERE d.id = ANY ($1::pg_catalog.uuid[])",
				1, &type, &value, NULL, SPI_OK_UPDATE);
	pfree(ids);
}

/* Events of voutbox.deferred whose time has come, and the next due time. */
static void
read_due_deferred(VoutboxRound *r, int max_events, int64 budget)
{
	Datum		limit = Int32GetDatum(max_events);
	Oid			type = INT4OID;

	/*
	 * A held key's events are due when its head (first in the key's queue)
	 * is.  A head that failed before goes alone: were it to fail again,
	 * events sent behind it could get through and overtake it.  A head
	 * never tried (held, or unsent at a shutdown) takes its key's queue
	 * along.  Events that hold no key are due on their own.  The query
	 * starts from the events due now (deferred_due: the subquery that
	 * cannot be pulled up keeps the plan from scanning every held key
	 * instead), the heads among them, and looks up each head's queue by its
	 * key (deferred_key): its cost follows what is due, not all that waits
	 * (a topic that does not answer keeps thousands waiting, their heads in
	 * flight or due later).
	 */
	read_rows(r,
			  "WITH heads AS MATERIALIZED ("
			  "  SELECT c.topic, c.msg_key, c.batch_id, c.commit_pos, c.seq, c.attempts "
			  "    FROM (SELECT * FROM " VOUTBOX_SCHEMA ".deferred d "
			  "           WHERE " WAITING("d") " AND d.due_at <= pg_catalog.now() OFFSET 0) c "
			  "   WHERE c.holds_key AND NOT " HELD_BEHIND_EARLIER("c") ") "
			  "SELECT " EVENT_SELECT_LIST ", e.holds_key, e.attempts, " UNCONFIRMED("e") ", "
			  "       e.batch_id, e.commit_pos "
			  "  FROM " VOUTBOX_SCHEMA ".deferred e "
			  " WHERE " WAITING("e") " AND NOT e.holds_key AND NOT e.alone "
			  "   AND e.due_at <= pg_catalog.now() "
			  "UNION ALL "
			  "SELECT " EVENT_SELECT_LIST ", e.holds_key, e.attempts, " UNCONFIRMED("e") ", "
			  "       e.batch_id, e.commit_pos "
			  "  FROM heads h, "
			  "       LATERAL (SELECT * FROM " VOUTBOX_SCHEMA ".deferred q "
			  "                 WHERE " WAITING("q") " AND q.holds_key "
			  "                   AND q.topic = h.topic AND q.msg_key = h.msg_key "
			  "                   AND ((q.batch_id, q.commit_pos, q.seq) = (h.batch_id, h.commit_pos, h.seq) "
			  "                        OR (h.attempts = 0 "
			  "                            AND (q.batch_id, q.commit_pos, q.seq) > (h.batch_id, h.commit_pos, h.seq))) "
			  "                OFFSET 0) e "
			  " WHERE NOT e.alone AND e.due_at < 'infinity' "
			  "   AND NOT " IN_FLIGHT_BEFORE("e") " "
			  " ORDER BY batch_id, commit_pos, seq LIMIT $1",
			  1, &type, &limit, max_events, budget, true);
	r->ndeferred = r->nevents;
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

	voutbox_spi("SELECT pg_catalog.min(e.due_at) FROM " VOUTBOX_SCHEMA ".deferred e "
				" WHERE " WAITING("e") " AND e.due_at > pg_catalog.now() AND e.due_at < 'infinity' "
				"   AND NOT (e.holds_key AND " HELD_BEHIND_EARLIER("e") ")",
				0, NULL, NULL, NULL, SPI_OK_SELECT);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? 0 : DatumGetTimestampTz(d);
}

static bool
deferred_waiting(void)
{
	voutbox_spi("SELECT 1 FROM " VOUTBOX_SCHEMA ".deferred e WHERE " WAITING("e") " LIMIT 1",
				0, NULL, NULL, NULL, SPI_OK_SELECT);
	return SPI_processed > 0;
}

/* Whether a deferred event is due now (a key's head, or one that holds no key). */
static bool
deferred_due(void)
{
	voutbox_spi("SELECT 1 FROM " VOUTBOX_SCHEMA ".deferred e "
				" WHERE " WAITING("e") " AND e.due_at <= pg_catalog.now() "
				"   AND NOT (e.holds_key AND " HELD_BEHIND_EARLIER("e") ") LIMIT 1",
				0, NULL, NULL, NULL, SPI_OK_SELECT);
	return SPI_processed > 0;
}

/* Whether an event that must go alone is due (it waits for an empty stream). */
static bool
alone_due(void)
{
	voutbox_spi("SELECT 1 FROM " VOUTBOX_SCHEMA ".deferred e "
				" WHERE " WAITING("e") " AND e.alone AND e.due_at <= pg_catalog.now() "
				"   AND NOT (e.holds_key AND " HELD_BEHIND_EARLIER("e") ") LIMIT 1",
				0, NULL, NULL, NULL, SPI_OK_SELECT);
	return SPI_processed > 0;
}

/*
 * Fetch rows of the window into the round until it is full (events or
 * bytes) or the window ends.  Rows fetched past the budget go back to the
 * cursor.  How many rows to fetch at once follows the size of the events
 * read so far, so that few are fetched in vain.
 */
static void
fetch_window(VoutboxCursor *c, VoutboxRound *r, int limit, int64 budget)
{
	Portal		portal = SPI_cursor_find(PORTAL_NAME);
	RoundReceiver rr;

	if (portal == NULL)
		elog(ERROR, "voutbox: the cursor over the current window is gone");
	receiver_init(&rr, r, limit, budget, false);
	r->window_done = false;
	while (r->nevents < limit)
	{
		int			first = r->nevents;
		int64		want = limit - r->nevents;
		uint64		fetched;

		if (first - r->ndeferred > 0)
		{
			int64		avg = Max((r->bytes / Max(r->nevents, 1)), 1);

			want = Min(want, Max((rr.budget - r->bytes) / avg + 1, 1));
		}
		else
			want = Min(want, FIRST_FETCH_ROWS);
		fetched = PortalRunFetch(portal, FETCH_FORWARD, want, (DestReceiver *) &rr);
		c->consumed += r->nevents - first;
		CHECK_FOR_INTERRUPTS();
		if (rr.over > 0)
		{
			/*
			 * Back to the last row taken.  (Absolute: a fetch that ran off
			 * the end leaves the cursor after the last row, not on it.)
			 */
			SPI_scroll_cursor_move(portal, FETCH_ABSOLUTE, (long) c->consumed);
			break;
		}
		if (fetched < (uint64) want)
		{
			r->window_done = true;
			break;
		}
	}
}

/*
 * Read the next chunk of the window into the round, and move the reader
 * on: to the next window when this one is read to its end (its cursor row
 * is written only when the round is settled), else past the last event
 * read.  The round keeps the window it was read from.
 */
static void
read_window(VoutboxCursor *c, VoutboxRound *r, int limit, int64 budget)
{
	int			first = r->nevents;

	if (c->hi == NULL)
		return;
	r->lo = MemoryContextStrdup(r->cxt, c->lo);
	r->hi = MemoryContextStrdup(r->cxt, c->hi);
	if (c->fresh && !c->portal_open && !c->large_windows)
		r->window_done = read_small_window(c, r, limit, budget);
	else
	{
		if (!c->portal_open)
			open_window(c);
		fetch_window(c, r, limit, budget);
	}
	/* A window too large for one query makes the next one use the cursor at once. */
	if (c->fresh)
		c->large_windows = !r->window_done;
	c->fresh = false;
	if (r->window_done)
	{
		if (c->portal_open)
			close_window(c);
		set_snapshot(&c->lo, c->hi, c->cxt);
		c->params_valid = false;
		set_snapshot(&c->hi, NULL, NULL);
		c->params_valid = false;
		c->read_seq = PG_INT64_MIN;
		c->read_pos = PG_INT64_MIN;
	}
	else if (r->nevents > first)
	{
		c->read_seq = r->events[r->nevents - 1].seq;
		c->read_pos = r->events[r->nevents - 1].commit_pos;
	}
}

/* Decide what to do with each event of the window read into the round. */
static void
choose_actions(VoutboxRound *r, HTAB *held, HTAB *held_in_flight)
{
	TimestampTz now = GetCurrentTimestamp();

	for (int i = r->ndeferred; i < r->nevents; i++)
	{
		VoutboxEvent *ev = &r->events[i];
		uint64		h = ev->msg_key ? voutbox_key_hash(ev->topic, ev->msg_key) : 0;

		if (ev->has_scheduled_for && ev->scheduled_for > now)
			r->actions[i] = VOUTBOX_SCHEDULE;
		else if (ev->msg_key != NULL &&
				 ((held != NULL && hash_search(held, &h, HASH_FIND, NULL) != NULL) ||
				  (held_in_flight != NULL &&
				   hash_search(held_in_flight, &h, HASH_FIND, NULL) != NULL)))
			r->actions[i] = VOUTBOX_HOLD;
		else if ((ev->wait_until = voutbox_topic_stalled_until(ev->topic, now)) != 0)
			r->actions[i] = VOUTBOX_WAIT_TOPIC;
		else
			r->actions[i] = VOUTBOX_SEND;
	}
}

/*
 * Flush the WAL up to where it has been written.  Every commit visible to a
 * snapshot taken before had its commit record written before: this makes it
 * durable.
 */
static XLogRecPtr
flush_written_wal(void)
{
	XLogRecPtr	upto = written_wal_end();

	XLogFlush(upto);
	return upto;
}

/*
 * The outcome each event of the round from "from" on starts with: awaited
 * if it is sent, none if not.  Text without an equivalent in UTF-8 is not
 * sent: a permanent error, for the dead-letter queue (said in the log if
 * "tell").
 */
static void
set_outcomes(VoutboxRound *r, int from, bool tell)
{
	for (int i = from; i < r->nevents; i++)
	{
		r->errs[i] = r->actions[i] == VOUTBOX_SEND ?
			VOUTBOX_DELIVERY_PENDING : VOUTBOX_DELIVERY_SKIPPED;
		if (r->events[i].unconvertible && r->actions[i] == VOUTBOX_SEND)
		{
			r->errs[i] = RD_KAFKA_RESP_ERR__BAD_MSG;
			if (tell)
				ereport(LOG,
						(errmsg("voutbox: event %s holds text that cannot be converted from %s to UTF-8; it is not sent",
								r->events[i].id, GetDatabaseEncodingName())));
		}
	}
}

/*
 * Read the next round in one short transaction, in CurrentMemoryContext: at
 * most "limit" events and "budget" bytes of them (at least one).  With
 * "deferred", the deferred events that are due come first (the caller has
 * none in flight), or an event that must go alone makes the round by itself
 * (the caller has nothing in flight); without, *due_waiting says (if
 * check_due) whether deferred events are due.  Returns whether the
 * extension is installed, in this library's version, in the worker's
 * database, and the database's encoding is one the envelope can be
 * converted from; if another version is installed, *version is set to it.
 */
VoutboxStorageStatus
voutbox_storage_read_round(VoutboxCursor *c, VoutboxRound *r, const VoutboxReadOptions *opt,
						   char **version)
{
	MemoryContext round_cxt = CurrentMemoryContext;
	HTAB	   *held = NULL;
	bool		recreated = false;
	bool		deferred_wait;
	VoutboxStorageStatus status;
	memset(r, 0, sizeof(*r));
	r->cxt = round_cxt;
	if (GetDatabaseEncoding() == PG_SQL_ASCII)
		return VOUTBOX_STORAGE_BAD_ENCODING;

	voutbox_xact_begin("reading the next batch");
	if ((status = find_extension(&recreated, version, &r->extension)) != VOUTBOX_STORAGE_READY)
	{
		if (*version != NULL)
			*version = MemoryContextStrdup(round_cxt, *version);
		voutbox_forget_cursor(c);
		voutbox_xact_end();
		return status;
	}
	/* After a failed read the window's cursor may have moved past unsettled rows. */
	if (recreated || c->stale)
		voutbox_forget_cursor(c);
	if (c->lo == NULL)
		load_cursor(c);
	/*
	 * Events a worker before this one left in flight (settle.c) had their
	 * chance: they are due at once.
	 */
	if (!in_flight_reset)
	{
		voutbox_spi("UPDATE " VOUTBOX_SCHEMA ".deferred d SET due_at = '-infinity' "
					" WHERE d.due_at = 'infinity' AND d.delivered_at IS NULL",
					0, NULL, NULL, NULL, SPI_OK_UPDATE);
		/* (The reads below use the transaction's snapshot: let them see it.) */
		CommandCounterIncrement();
		UpdateActiveSnapshotCommandId();
	}
	/*
	 * While deferred events wait, their keys are held: later events of those
	 * keys wait behind them, whether or not deferred ones are read now.
	 */
	if ((deferred_wait = look(c, true)))
	{
		if (!opt->deferred)
		{
			if (opt->check_due)
			{
				*opt->due_waiting = deferred_due();
				*opt->alone_waiting = *opt->due_waiting && alone_due();
			}
		}
		else
		{
			if (!(opt->alone && read_alone_deferred(r, opt->budget)))
				read_due_deferred(r, opt->limit, opt->budget);
			mark_in_flight(r);
		}
	}
	if (!r->alone)
	{
		if (r->nevents < opt->limit && r->bytes < opt->budget)
			read_window(c, r, opt->limit, opt->budget);
		/* (Keys are held only while deferred events wait.) */
		if (deferred_wait)
			held = load_held_keys(round_cxt, r);
		choose_actions(r, held, opt->held_in_flight);
	}

	/*
	 * Deliver nothing whose commit a crash could still erase: every commit
	 * the reads could see was written before now.  The standbys get it once
	 * it is flushed here; the round waits for them (stream.c).
	 */
	if (r->nevents > 0)
		r->wal_end = flush_written_wal();
	voutbox_xact_end();
	in_flight_reset = true;

	set_outcomes(r, 0, true);
	return VOUTBOX_STORAGE_READY;
}

/*
 * Choose again what becomes of the window events of a round read earlier
 * and not sent yet (it waited for the standbys, stream.c): rounds settled
 * meanwhile may have deferred events of their keys, which then hold them.
 */
void
voutbox_storage_recheck_round(VoutboxRound *r, HTAB *held_in_flight)
{
	HTAB	   *held = NULL;
	MemoryContext old = MemoryContextSwitchTo(r->cxt);

	voutbox_xact_begin("checking a round that waited");
	if (voutbox_lock_extension() == r->extension)
	{
		if (deferred_waiting())
			held = load_held_keys(r->cxt, r);
		choose_actions(r, held, held_in_flight);
	}
	voutbox_xact_end();
	MemoryContextSwitchTo(old);
	/* (The log told of unconvertible ones when the round was read.) */
	set_outcomes(r, r->ndeferred, false);
}

/* ---------------------------------------------------------------------
 * Settling a round
 * ---------------------------------------------------------------------
 */

/*
 * Append the cursor row of the round's chunk of a window; returns its
 * batch_id.  The row also holds the receipts of the chunk's events that
 * were delivered: their seqs, partitions and offsets, in three arrays of
 * one order (voutbox.receipt() looks an event up there).  One row per round,
 * not one per event: the storage stays insert-only.
 */
static int64
append_batch_row(VoutboxRound *r)
{
	Oid			types[8] = {TEXTOID, TEXTOID, INT8OID, INT4OID, INT8ARRAYOID, INT4ARRAYOID, INT8ARRAYOID,
	INT8OID};
	Datum		values[8];
	char		nulls[8] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};
	bool		isnull;
	int			n = 0;
	Datum	   *seqs = palloc(sizeof(Datum) * (r->nevents - r->ndeferred + 1));
	Datum	   *partitions = palloc(sizeof(Datum) * (r->nevents - r->ndeferred + 1));
	Datum	   *offsets = palloc(sizeof(Datum) * (r->nevents - r->ndeferred + 1));

	for (int i = r->ndeferred; i < r->nevents; i++)
		if (r->errs[i] == 0)
		{
			seqs[n] = Int64GetDatum(r->events[i].seq);
			partitions[n] = Int32GetDatum(r->receipts[i].partition);
			offsets[n] = Int64GetDatum(r->receipts[i].offset);
			n++;
		}
	values[4] = voutbox_scalar_array(seqs, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE);
	values[5] = voutbox_scalar_array(partitions, n, INT4OID, 4, true, TYPALIGN_INT);
	values[6] = voutbox_scalar_array(offsets, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE);

	if (r->window_done)
	{
		values[0] = CStringGetTextDatum(r->hi);
		nulls[1] = nulls[2] = nulls[7] = 'n';
	}
	else
	{
		values[0] = CStringGetTextDatum(r->lo);
		values[1] = CStringGetTextDatum(r->hi);
		values[2] = Int64GetDatum(r->events[r->nevents - 1].seq);
		values[7] = Int64GetDatum(r->events[r->nevents - 1].commit_pos);
	}
	values[3] = Int32GetDatum(r->nevents - r->ndeferred);
	voutbox_spi("INSERT INTO " VOUTBOX_SCHEMA ".batches (lo, hi, done_seq, reach, events, "
				"       receipt_seqs, receipt_partitions, receipt_offsets, done_commit) "
				"VALUES ($1::pg_catalog.pg_snapshot, $2::pg_catalog.pg_snapshot, $3, "
				"        pg_catalog.pg_snapshot_xmax(coalesce($2, $1)::pg_catalog.pg_snapshot), $4, "
				"        $5, $6, $7, $8) "
				"RETURNING batch_id",
				8, types, values, nulls, SPI_OK_INSERT_RETURNING);
	return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * Record the outcome of rounds read one after the other (settle.c judges
 * the events) in one transaction, with the cursor row of each; with a gid,
 * prepare it, and hand the settlement back in *prepared.  Returns the
 * next time a deferred event is due, or 0; *due_now says whether some may
 * be due at once.  An ERROR leaves the rounds as
 * they were, for the caller to settle again; rounds read from an
 * installation that is gone record nothing.
 */
TimestampTz
voutbox_storage_settle(VoutboxRound **rounds, int n, bool *committed, bool *due_now,
					   const char *gid, VoutboxSettlement **prepared)
{
	bool		deferred = false;
	TimestampTz next_due = 0;
	VoutboxSettlement *settlement = voutbox_settle_begin();
	Oid			extension;

	for (int i = 0; i < n; i++)
		voutbox_settle_count(settlement, rounds[i]);
	if (gid != NULL)
		voutbox_xact_begin_block("settling a batch");
	else
		voutbox_xact_begin("settling a batch");
	extension = voutbox_lock_extension();
	for (int i = 0; i < n; i++)
	{
		VoutboxRound *r = rounds[i];
		int64		batch_id = 0;

		/* Dropped (and perhaps created again) since the round was read. */
		if (r->extension != extension)
		{
			ereport(LOG,
					(errmsg("voutbox: %d events were read from an installation of voutbox that is gone; their outcome is not recorded",
							r->nevents)));
			continue;
		}
		if (r->nevents > r->ndeferred)
			batch_id = append_batch_row(r);
		deferred |= voutbox_settle_events(settlement, r, batch_id);
		deferred |= r->ndeferred > 0;
	}
	if (deferred)
		next_due = voutbox_next_due();
	*due_now = voutbox_settle_made_due(settlement);
	/*
	 * exactly_once: prepared, and committed once Kafka's transaction is
	 * (eos.c); the caller ends the settlement then (its statistics count
	 * only a settle that is committed).
	 */
	if (gid != NULL)
	{
		*prepared = settlement;
		voutbox_xact_prepare(gid, committed);
		return next_due;
	}
	voutbox_xact_commit(committed);
	voutbox_settle_end(settlement);
	return next_due;
}
