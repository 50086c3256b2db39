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
 * discarded dead events) are trimmed with DELETE in bounded steps.
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

	voutbox_spi(psprintf("SELECT 1 FROM " VOUTBOX_SCHEMA ".%s e "
						 "WHERE e.txid >= pg_snapshot_xmax($1::pg_snapshot) "
						 "   OR e.txid = ANY (ARRAY(SELECT pg_snapshot_xip($1::pg_snapshot))) "
						 "LIMIT 1", relname),
				1, &type, &value, NULL, SPI_OK_SELECT);
	if (SPI_processed > 0)
		return false;
	voutbox_spi(psprintf("SELECT 1 FROM " VOUTBOX_SCHEMA ".deferred d "
						 "JOIN " VOUTBOX_SCHEMA ".%s e ON e.id = d.id "
						 "WHERE d.delivered_at IS NULL LIMIT 1", relname),
				0, NULL, NULL, NULL, SPI_OK_SELECT);
	return SPI_processed == 0;
}

/* Truncate ring slot "slot" if it is retired, expired and settled. */
static void
truncate_slot(int slot, const char *lo)
{
	char	   *relname = psprintf("events_%d", slot);
	Oid			types[2] = {INT4OID, INT4OID};
	Datum		values[2] = {Int32GetDatum(slot), Int32GetDatum(voutbox_retention)};
	Oid			relid;

	voutbox_xact_begin("applying retention");
	voutbox_spi("SELECT 1 FROM " VOUTBOX_SCHEMA ".ring WHERE slot = $1 AND state = 'retired' "
				"AND since <= now() - make_interval(secs => $2)",
				2, types, values, NULL, SPI_OK_SELECT);
	relid = get_relname_relid(relname, get_namespace_oid(VOUTBOX_SCHEMA, false));
	if (SPI_processed == 1 && OidIsValid(relid) &&
		ConditionalLockRelationOid(relid, AccessExclusiveLock))
	{
		if (all_settled(relname, lo))
		{
			voutbox_spi(psprintf("TRUNCATE " VOUTBOX_SCHEMA ".%s", relname),
						0, NULL, NULL, NULL, SPI_OK_UTILITY);
			voutbox_spi("UPDATE " VOUTBOX_SCHEMA ".ring SET state = 'empty', since = now(), "
						"opened_at = NULL WHERE slot = $1",
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

	voutbox_xact_begin("applying retention");
	voutbox_spi("WITH cur AS ("
				"  SELECT slot FROM " VOUTBOX_SCHEMA ".ring "
				"   WHERE state = 'current' AND opened_at <= now() - make_interval(secs => $1)), "
				"nxt AS ("
				"  SELECT r.slot FROM " VOUTBOX_SCHEMA ".ring r, cur "
				"   WHERE r.slot = (cur.slot + 1) % 3 AND r.state = 'empty') "
				"UPDATE " VOUTBOX_SCHEMA ".ring SET state = 'retired', since = now() "
				" WHERE slot IN (SELECT slot FROM cur) AND EXISTS (SELECT 1 FROM nxt) "
				"RETURNING (slot + 1) % 3",
				1, &type, &half, NULL, SPI_OK_UPDATE_RETURNING);
	if (SPI_processed == 1)
	{
		bool		isnull;
		Datum		next = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		voutbox_spi("UPDATE " VOUTBOX_SCHEMA ".ring SET state = 'current', since = now(), "
					"opened_at = now() WHERE slot = $1",
					1, &type, &next, NULL, SPI_OK_UPDATE);
		ereport(DEBUG1, (errmsg("voutbox: events now go to " VOUTBOX_SCHEMA ".events_%d",
								DatumGetInt32(next))));
	}
	voutbox_xact_end();
}

/* Run a bounded DELETE until it deletes less than a full step. */
static void
trim(const char *sql, int seconds)
{
	Oid			types[2] = {INT4OID, INT4OID};
	Datum		values[2] = {Int32GetDatum(seconds), Int32GetDatum(TRIM_STEP_ROWS)};

	for (int step = 0; step < TRIM_MAX_STEPS; step++)
	{
		uint64		n;

		voutbox_xact_begin("applying retention");
		n = voutbox_spi(sql, 2, types, values, NULL, SPI_OK_DELETE);
		voutbox_xact_end();
		if (n < TRIM_STEP_ROWS)
			break;
	}
}

void
voutbox_retention_run(const VoutboxCursor *cursor)
{
	char	   *dlq_sql;

	if (cursor->lo == NULL)
		return;
	for (int slot = 0; slot < VOUTBOX_RING_SLOTS; slot++)
		truncate_slot(slot, cursor->lo);
	rotate_ring();

	/*
	 * A cursor row is needed to tell when an event still in the ring was
	 * published: keep those newer than the oldest table in use, and the
	 * newest row always.
	 */
	trim("DELETE FROM " VOUTBOX_SCHEMA ".batches WHERE batch_id IN ("
		 "  SELECT batch_id FROM " VOUTBOX_SCHEMA ".batches "
		 "   WHERE settled_at < (SELECT min(opened_at) FROM " VOUTBOX_SCHEMA ".ring) "
		 "     AND settled_at < now() - make_interval(secs => $1) "
		 "     AND batch_id < (SELECT max(batch_id) FROM " VOUTBOX_SCHEMA ".batches) "
		 "   ORDER BY batch_id LIMIT $2)",
		 voutbox_retention);
	trim("DELETE FROM " VOUTBOX_SCHEMA ".deferred WHERE id IN ("
		 "  SELECT id FROM " VOUTBOX_SCHEMA ".deferred "
		 "   WHERE delivered_at < now() - make_interval(secs => $1) LIMIT $2)",
		 voutbox_retention);
	/* An event is kept at most 1.5 x retention; so is its tombstone. */
	trim("DELETE FROM " VOUTBOX_SCHEMA ".discarded WHERE id IN ("
		 "  SELECT id FROM " VOUTBOX_SCHEMA ".discarded "
		 "   WHERE discarded_at < now() - make_interval(secs => $1) LIMIT $2)",
		 (int) Min((int64) voutbox_retention * 3 / 2, (int64) INT_MAX));
	dlq_sql = psprintf("DELETE FROM %s.outbox_dlq WHERE id IN ("
					   "  SELECT id FROM %s.outbox_dlq "
					   "   WHERE moved_at < now() - make_interval(secs => $1) LIMIT $2)",
					   voutbox_api_schema(), voutbox_api_schema());
	trim(dlq_sql, voutbox_dlq_retention);
}
