/*-------------------------------------------------------------------------
 *
 * retention.c
 *		Retention, run by the worker every voutbox.cleanup_interval.
 *
 * Delivered events are removed a whole table at a time.  outbox_save()
 * appends to the current table of a ring of three; every half retention
 * period the worker retires the current table and makes the next (empty)
 * one current.  A retired table is truncated once it has been retired for
 * voutbox.retention and every event in it is settled, so an event is kept
 * between retention and 1.5 x retention after it was saved.
 *
 * TRUNCATE needs an ACCESS EXCLUSIVE lock.  The worker only ever asks for it
 * conditionally: if anybody holds any lock on the table (a transaction that
 * still inserts into it, a query reading the outbox view), it tries again at
 * the next cleanup.  So no lock queue forms behind it, and outbox_save(),
 * which only inserts into the current table anyway, never waits for it.
 *
 * The small side tables (the cursor's history, delivered deferred events,
 * the dead-letter queue after voutbox.dlq_retention, the tombstones of
 * discarded dead events) are trimmed with DELETE in bounded steps, which
 * skip rows somebody has locked (an operator editing outbox_dlq) and a
 * table somebody has locked against them: they are trimmed next time.
 * Dead events that could not move to the DLQ while it was locked move here.
 *
 * Each step is a transaction of its own that first locks the extension
 * (storage.c): it never touches a schema "voutbox" that is not the
 * extension's.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "storage/lmgr.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"

#include "voutbox.h"

static bool begin_step(void);

/* Rows a single trimming statement deletes at most. */
#define TRIM_STEP_ROWS	5000
/* Trimming statements per table and cleanup run. */
#define TRIM_MAX_STEPS	20

/*
 * Whether every event in table "relname" is settled: its transaction is
 * visible in the cursor's lo snapshot, and no copy of it waits in
 * voutbox.deferred.
 */
static bool
all_settled(const char *relname, const char *lo)
{
	Oid			type = TEXTOID;
	Datum		value = CStringGetTextDatum(lo);

	voutbox_spi_once(psprintf("SELECT 1 FROM " VOUTBOX_SCHEMA ".%s e "
						 "WHERE e.txid >= pg_catalog.pg_snapshot_xmax($1::pg_catalog.pg_snapshot) "
						 "   OR e.txid = ANY (ARRAY(SELECT pg_catalog.pg_snapshot_xip($1::pg_catalog.pg_snapshot))) "
						 "LIMIT 1", relname),
				1, &type, &value, NULL, SPI_OK_SELECT);
	if (SPI_processed > 0)
		return false;
	voutbox_spi_once(psprintf("SELECT 1 FROM " VOUTBOX_SCHEMA ".deferred d "
						 "JOIN " VOUTBOX_SCHEMA ".%s e ON e.id = d.id "
						 "WHERE d.delivered_at IS NULL LIMIT 1", relname),
				0, NULL, NULL, NULL, SPI_OK_SELECT);
	return SPI_processed == 0;
}

/*
 * A retired, expired table that somebody holds a lock on (an open
 * transaction that read the outbox, or saved with an idempotency key) is not
 * truncated, and the ring cannot turn until it is.  Say so, once an hour,
 * once it has waited for voutbox.retention.
 */
static TimestampTz locked_since[VOUTBOX_RING_SLOTS];
static TimestampTz locked_told[VOUTBOX_RING_SLOTS];

static void
tell_locked(int slot, const char *relname)
{
	TimestampTz now = GetCurrentTimestamp();

	if (locked_since[slot] == 0)
		locked_since[slot] = now;
	if (TimestampDifferenceExceeds(locked_since[slot], now, voutbox_retention * INT64CONST(1000) > INT_MAX ?
								   INT_MAX : voutbox_retention * 1000) &&
		TimestampDifferenceExceeds(locked_told[slot], now, 3600 * 1000))
	{
		locked_told[slot] = now;
		ereport(LOG,
				(errmsg("voutbox: " VOUTBOX_SCHEMA ".%s is due for truncation, but sessions hold locks on it",
						relname),
				 errdetail("Retention cannot go on until they end: look for long transactions in pg_stat_activity and for the table in pg_locks.")));
	}
}

/* Truncate ring slot "slot" if it is retired, expired and settled. */
static void
truncate_slot(int slot, const char *lo)
{
	char	   *relname = psprintf("events_%d", slot);
	Oid			types[2] = {INT4OID, INT4OID};
	Datum		values[2] = {Int32GetDatum(slot), Int32GetDatum(voutbox_retention)};
	Oid			relid;

	if (!begin_step())
		return;
	voutbox_spi("SELECT 1 FROM " VOUTBOX_SCHEMA ".ring r WHERE r.slot = $1 AND r.state = 'retired' "
				"AND r.since <= pg_catalog.now() - pg_catalog.make_interval(secs => $2)",
				2, types, values, NULL, SPI_OK_SELECT);
	relid = get_relname_relid(relname, get_namespace_oid(VOUTBOX_SCHEMA, false));
	if (SPI_processed == 1 && OidIsValid(relid) &&
		!ConditionalLockRelationOid(relid, AccessExclusiveLock))
		tell_locked(slot, relname);
	else if (SPI_processed == 1 && OidIsValid(relid))
	{
		locked_since[slot] = 0;
		if (all_settled(relname, lo))
		{
			/*
			 * The commit positions recorded with this table's events go
			 * with them (save.c puts a transaction's in the table of its
			 * newest event: none of its events is in a later table).
			 * (0.6.1's objects have no commit_order.)
			 */
			bool		positions = OidIsValid(get_relname_relid(psprintf("commit_order_%d", slot),
																 get_namespace_oid(VOUTBOX_SCHEMA, false)));

			voutbox_spi_once(psprintf("TRUNCATE " VOUTBOX_SCHEMA ".%s%s", relname,
									  positions ? psprintf(", " VOUTBOX_SCHEMA ".commit_order_%d", slot) : ""),
						0, NULL, NULL, NULL, SPI_OK_UTILITY);
			voutbox_spi("UPDATE " VOUTBOX_SCHEMA ".ring r SET state = 'empty', since = pg_catalog.now(), "
						"opened_at = NULL WHERE r.slot = $1",
						1, types, values, NULL, SPI_OK_UPDATE);
			ereport(DEBUG1, (errmsg("voutbox: truncated " VOUTBOX_SCHEMA ".%s", relname)));
		}
	}
	voutbox_xact_end();
}

/*
 * Make the next table current once the current one has been current for
 * half the retention period, if the next one is empty.
 */
static void
rotate_ring(void)
{
	Oid			type = INT4OID;
	Datum		half = Int32GetDatum(voutbox_retention / 2);

	if (!begin_step())
		return;
	voutbox_spi("WITH cur AS ("
				"  SELECT c.slot FROM " VOUTBOX_SCHEMA ".ring c "
				"   WHERE c.state = 'current' "
				"     AND c.opened_at <= pg_catalog.now() - pg_catalog.make_interval(secs => $1)), "
				"nxt AS ("
				"  SELECT r.slot FROM " VOUTBOX_SCHEMA ".ring r, cur "
				"   WHERE r.slot = (cur.slot + 1) % 3 AND r.state = 'empty') "
				"UPDATE " VOUTBOX_SCHEMA ".ring u SET state = 'retired', since = pg_catalog.now() "
				" WHERE u.slot IN (SELECT slot FROM cur) AND EXISTS (SELECT 1 FROM nxt) "
				"RETURNING (u.slot + 1) % 3",
				1, &type, &half, NULL, SPI_OK_UPDATE_RETURNING);
	if (SPI_processed == 1)
	{
		bool		isnull;
		Datum		next = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		voutbox_spi("UPDATE " VOUTBOX_SCHEMA ".ring r SET state = 'current', since = pg_catalog.now(), "
					"opened_at = pg_catalog.now() WHERE r.slot = $1",
					1, &type, &next, NULL, SPI_OK_UPDATE);
		ereport(DEBUG1, (errmsg("voutbox: events now go to " VOUTBOX_SCHEMA ".events_%d",
								DatumGetInt32(next))));
	}
	voutbox_xact_end();
}

/*
 * Start a step of retention: a transaction with the extension locked.
 * Returns false (and ends the transaction) if the extension is gone.
 */
static bool
begin_step(void)
{
	voutbox_xact_begin("applying retention");
	if (OidIsValid(voutbox_lock_extension()))
		return true;
	voutbox_xact_end();
	return false;
}

/*
 * Run a bounded DELETE on voutbox.<table> until it deletes less than a full
 * step; the statement skips locked rows.  If somebody holds a lock on the
 * table that a DELETE would wait for, try again next time.
 */
static void
trim(const char *table, const char *sql, int seconds)
{
	Oid			types[2] = {INT4OID, INT4OID};
	Datum		values[2] = {Int32GetDatum(seconds), Int32GetDatum(TRIM_STEP_ROWS)};

	for (int step = 0; step < TRIM_MAX_STEPS; step++)
	{
		uint64		n = 0;
		Oid			relid;
		bool		locked;

		if (!begin_step())
			return;
		relid = get_relname_relid(table, get_namespace_oid(VOUTBOX_SCHEMA, false));
		locked = OidIsValid(relid) && ConditionalLockRelationOid(relid, RowExclusiveLock);
		if (locked)
			n = voutbox_spi(sql, 2, types, values, NULL, SPI_OK_DELETE);
		voutbox_xact_end();
		if (!locked || n < TRIM_STEP_ROWS)
			break;
	}
}

/* Move the dead events that wait for the DLQ, if any (see settle.c). */
static void
move_dead_events(void)
{
	/* In the caller's context: SPI's goes at the end of the transaction. */
	VoutboxStatsBatch *stats = voutbox_stats_batch_new(false);

	if (!begin_step())
		return;
	voutbox_spi("SELECT 1 FROM " VOUTBOX_SCHEMA ".deferred d WHERE d.dead_reason IS NOT NULL LIMIT 1",
				0, NULL, NULL, NULL, SPI_OK_SELECT);
	if (SPI_processed == 0)
	{
		voutbox_xact_end();
		return;
	}
	(void) voutbox_move_dead_events(stats);
	voutbox_xact_end();
	voutbox_stats_batch_flush(stats);
}

void
voutbox_retention_run(const char *settled_lo)
{
	if (settled_lo == NULL)
		return;
	for (int slot = 0; slot < VOUTBOX_RING_SLOTS; slot++)
		truncate_slot(slot, settled_lo);
	rotate_ring();
	move_dead_events();

	/*
	 * A cursor row is needed to tell when an event still in the ring was
	 * published: keep those newer than the oldest table in use, and the
	 * newest row always.
	 */
	trim("batches",
		 "DELETE FROM " VOUTBOX_SCHEMA ".batches b WHERE b.batch_id IN ("
		 "  SELECT o.batch_id FROM " VOUTBOX_SCHEMA ".batches o "
		 "   WHERE o.settled_at < (SELECT pg_catalog.min(r.opened_at) FROM " VOUTBOX_SCHEMA ".ring r) "
		 "     AND o.settled_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1) "
		 "     AND o.batch_id < (SELECT pg_catalog.max(m.batch_id) FROM " VOUTBOX_SCHEMA ".batches m) "
		 "   ORDER BY o.batch_id LIMIT $2 FOR UPDATE SKIP LOCKED)",
		 voutbox_retention);
	trim("deferred",
		 "DELETE FROM " VOUTBOX_SCHEMA ".deferred d WHERE d.id IN ("
		 "  SELECT o.id FROM " VOUTBOX_SCHEMA ".deferred o "
		 "   WHERE o.delivered_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1) "
		 /* (It holds the event's receipt: kept while the event is.) */
		 "     AND NOT EXISTS (SELECT 1 FROM " VOUTBOX_SCHEMA ".events e WHERE e.id = o.id) "
		 "   LIMIT $2 FOR UPDATE SKIP LOCKED)",
		 voutbox_retention);
	/* An event is kept at most 1.5 x retention; so is its tombstone. */
	trim("discarded",
		 "DELETE FROM " VOUTBOX_SCHEMA ".discarded x WHERE x.id IN ("
		 "  SELECT o.id FROM " VOUTBOX_SCHEMA ".discarded o "
		 "   WHERE o.discarded_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1) "
		 "   LIMIT $2 FOR UPDATE SKIP LOCKED)",
		 (int) Min((int64) voutbox_retention * 3 / 2, (int64) INT_MAX));
	trim("dlq",
		 "DELETE FROM " VOUTBOX_SCHEMA ".dlq q WHERE q.id IN ("
		 "  SELECT o.id FROM " VOUTBOX_SCHEMA ".dlq o "
		 "   WHERE o.moved_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1) "
		 "   LIMIT $2 FOR UPDATE SKIP LOCKED)",
		 voutbox_dlq_retention);
}
