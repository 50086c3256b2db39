/*-------------------------------------------------------------------------
 *
 * eos.c
 *		Exactly-once delivery (voutbox.delivery = exactly_once): the settle
 *		of a Kafka transaction is prepared in PostgreSQL, and committed
 *		there only once Kafka committed the transaction.
 *
 * The producer is transactional, with a transactional.id of the database
 * (voutbox_transactional_id()).  The rounds settled together go in one
 * Kafka transaction (stream.c), and their settle, which advances the
 * cursor and records the retry queue and the DLQ (settle.c, storage.c), is
 * one PostgreSQL transaction.  The two are tied together so:
 *
 *	1. every event of the Kafka transaction has been acknowledged;
 *	2. the settle is prepared: PREPARE TRANSACTION 'voutbox:<db oid>:<random>';
 *	3. a checkpoint record, keyed by the transactional.id and naming that
 *	   gid, goes to voutbox.checkpoint_topic in the Kafka transaction, and
 *	   Kafka commits it;
 *	4. COMMIT PREPARED.
 *
 * A transaction that fails (an event not acknowledged, the checkpoint not
 * written, an abortable error at commit) is aborted: nothing of it is seen
 * by a read_committed consumer; the settle prepared, if any, is rolled back;
 * and the events are recorded as not delivered, to go again in order
 * (stream.c).
 *
 * A worker that dies (kill -9, an immediate stop, a crash of the server)
 * between 2 and 4 leaves the settle prepared, and whether step 3 happened
 * is not known to PostgreSQL.  The next worker, before it reads anything,
 * calls init_transactions() with the same transactional.id (which fences
 * the dead one's producer and ends its transaction: committed if it had
 * asked to commit, aborted otherwise), then reads the checkpoint topic to
 * its end with a read_committed consumer.  If a committed checkpoint names
 * the gid, the settle is committed; otherwise rolled back, and its events
 * go again.  Either way, the cursor then agrees with what Kafka committed.
 *
 * Fencing: a second worker with the same transactional.id (the old primary
 * of a failover still running, with the same system identifier and
 * database OID) fences the first at its next produce or commit.  A fenced
 * worker delivers nothing until the configuration is reloaded: it does not
 * take the transactional.id back, which would fence the other in turn.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>
#include <unistd.h>

#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "storage/spin.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "voutbox.h"

/* The file that voutbox.fault_injection reads, in the data directory. */
#define FAULT_FILE	"voutbox.fault"

/*
 * The transactional.id of this database's worker: the same for the
 * database on a promoted standby (same system identifier, same OID), so
 * that a failover fences the old primary's worker.
 */
const char *
voutbox_transactional_id(void)
{
	static char *id = NULL;

	if (id == NULL)
		id = MemoryContextStrdup(TopMemoryContext,
								 psprintf("voutbox-" UINT64_FORMAT "-%u",
										  GetSystemIdentifier(), MyDatabaseId));
	return id;
}

/*
 * This worker's checkpoint topic: <voutbox.checkpoint_topic_prefix>.<system
 * identifier>.<database OID>.  Its own, so that no other producer's open
 * transaction holds back what a read_committed consumer of it sees (its
 * last stable offset) once init_transactions() has ended this one's.
 */
char *
voutbox_checkpoint_topic(void)
{
	return psprintf("%s." UINT64_FORMAT ".%u", voutbox_checkpoint_topic_prefix,
					GetSystemIdentifier(), MyDatabaseId);
}

/* Whether an event's topic is a checkpoint topic: no event may go there. */
bool
voutbox_is_checkpoint_topic(const char *topic)
{
	size_t		n = strlen(voutbox_checkpoint_topic_prefix);

	return strncmp(topic, voutbox_checkpoint_topic_prefix, n) == 0 && topic[n] == '.';
}

/* A gid for a settle: unique, and telling its database. */
char *
voutbox_eos_new_gid(void)
{
	uint64		r[2];

	if (!pg_strong_random(r, sizeof(r)))
		elog(ERROR, "voutbox: could not generate a random number");
	return psprintf("voutbox:%u:%016" INT64_MODIFIER "x%016" INT64_MODIFIER "x",
					MyDatabaseId, r[0], r[1]);
}

/* The settles of this database that a worker left prepared. */
static List *
prepared_settles(void)
{
	List	   *gids = NIL;
	MemoryContext cxt = CurrentMemoryContext;
	Oid			type = TEXTOID;
	Datum		prefix = CStringGetTextDatum(psprintf("voutbox:%u:", MyDatabaseId));

	voutbox_xact_begin("looking for prepared settles");
	/*
	 * (Only the worker's own: any role can prepare a transaction of any
	 * name, in any database.)
	 */
	voutbox_spi("SELECT p.gid FROM pg_catalog.pg_prepared_xacts p "
				" WHERE pg_catalog.starts_with(p.gid, $1) "
				"   AND p.database = pg_catalog.current_database() "
				"   AND p.owner = CURRENT_USER "
				" ORDER BY p.prepared",
				1, &type, &prefix, NULL, SPI_OK_SELECT);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		MemoryContext old = MemoryContextSwitchTo(cxt);

		gids = lappend(gids, SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1));
		MemoryContextSwitchTo(old);
	}
	voutbox_xact_end();
	return gids;
}

/*
 * Resolve the settles a dead worker left prepared, before anything is
 * read: see the file's comment.  Returns true once none is left; false,
 * with *error, if Kafka could not tell (the caller tries again later).
 */
bool
voutbox_eos_recover(char **error)
{
	List	   *prepared = prepared_settles();
	List	   *committed = NIL;
	VoutboxProducer *p;
	ListCell   *lc;

	if (prepared == NIL)
		return true;
	/* Fence the dead worker's producer, and end its transaction. */
	p = voutbox_producer_create(true, error);
	if (p == NULL)
		return false;
	voutbox_producer_destroy(p);
	if (!voutbox_checkpoint_gids(voutbox_transactional_id(), &committed, error))
		return false;
	foreach(lc, prepared)
	{
		const char *gid = lfirst(lc);
		bool		commit = false;
		ListCell   *c;

		foreach(c, committed)
			if (strcmp(lfirst(c), gid) == 0)
				commit = true;
		voutbox_xact_finish_prepared(gid, commit);
		ereport(LOG,
				(errmsg("voutbox: recovery: %s the settle \"%s\" that a worker left prepared",
						commit ? "committed" : "rolled back", gid),
				 errdetail(commit ?
						   "Kafka committed its transaction: its events were delivered." :
						   "Kafka did not commit its transaction: its events go again.")));
	}
	return true;
}

/*
 * Tests only (voutbox.fault_injection): whether the file voutbox.fault in
 * the data directory names this step; it is then removed (a fault fires
 * once).
 */
bool
voutbox_fault_hit(const char *point)
{
	FILE	   *f;
	char		buf[64];

	if (!voutbox_fault_injection)
		return false;
	f = AllocateFile(FAULT_FILE, "r");
	if (f == NULL)
		return false;
	if (fgets(buf, sizeof(buf), f) == NULL)
		buf[0] = '\0';
	FreeFile(f);
	buf[strcspn(buf, "\r\n")] = '\0';
	if (strcmp(buf, point) != 0)
		return false;
	(void) unlink(FAULT_FILE);
	ereport(LOG,
			(errmsg("voutbox: fault injection at \"%s\"", point)));
	return true;
}

/*
 * Tests only: at a step voutbox.fault names, die of SIGKILL, as a kill -9
 * would kill the worker (the postmaster then restarts the server).
 */
void
voutbox_fault_point(const char *point)
{
	if (!voutbox_fault_hit(point))
		return;
	ereport(LOG,
			(errmsg("voutbox: fault injection: the worker kills itself at \"%s\"", point)));
	kill(MyProcPid, SIGKILL);
	pg_usleep(10 * 1000 * 1000L);
}
