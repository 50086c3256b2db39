/*-------------------------------------------------------------------------
 *
 * worker.c
 *		The launcher and the delivery worker.
 *
 * The launcher is a static background worker, registered at preload.  It is
 * connected to no database.  For each database listed in voutbox.database
 * it claims a slot in shared memory, checks that the database exists
 * (waiting, and saying so in the log and in outbox_worker, while it does
 * not) and starts a delivery worker for it as a dynamic background worker,
 * restarting it with a growing delay whenever it exits.  On reload it
 * starts the workers of newly listed databases and stops those of
 * databases no longer listed; one database's trouble (missing, dropped,
 * without the extension) never holds up the others.
 *
 * The delivery worker runs the delivery stream (stream.c): it reads rounds
 * of committed events (storage.c), hands them to librdkafka (producer.c)
 * while earlier ones are in flight, and settles what Kafka acknowledged.  It
 * sleeps on its latch, which committing transactions that saved events set
 * (save.c), and on librdkafka's queue; voutbox.poll_interval only bounds the
 * sleep.  No librdkafka frame is ever unwound by a longjmp: callbacks never
 * raise errors, and no error is raised while librdkafka is on the stack.
 *
 * The session is pinned against database and role defaults before anything
 * else runs (session.c).
 *
 * Signals.  SIGTERM asks for a clean stop: outside a transaction (waiting
 * for Kafka), in-flight reports get a grace period and the round is
 * settled; inside one (a lock wait, a long query, a wait for a synchronous
 * standby), it also cancels the statement, so that nothing delays the stop;
 * a settle so cancelled is tried once more before the worker exits, so that
 * a stop does not make the next worker send the round again.  SIGHUP reloads
 * the configuration, and a changed broker list or librdkafka property
 * rebuilds the producer (what was in flight goes again, in order).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <librdkafka/rdkafka.h>

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "commands/dbcommands.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "voutbox.h"

/* Launcher: how long to wait before restarting a worker that exited. */
#define RESTART_DELAY_MIN_MS	1000
#define RESTART_DELAY_MAX_MS	60000
/* A worker that ran this long before exiting is restarted at once. */
#define RESTART_STABLE_MS		60000
/* How often to look again for a missing database or extension. */
#define RECHECK_MS				5000
/* Longest delay between tries of a failing settle, or producer. */
#define FAILING_DELAY_MAX_MS	60000
/* Longest delay between reads that a user's lock made time out. */
#define LOCK_RETRY_MAX_MS		10000

/* ---------------------------------------------------------------------
 * Common
 * ---------------------------------------------------------------------
 */

/* Whether this process is the delivery worker. */
bool		voutbox_is_worker = false;

/* What pg_stat_activity.query shows for this worker. */
void
voutbox_report_activity(const char *what)
{
	pgstat_report_activity(STATE_RUNNING, what);
}

static void
report_idle(const char *what)
{
	pgstat_report_activity(STATE_IDLE, what);
}

/*
 * SIGTERM: a stop at the next safe point, and the cancellation of the
 * statement the worker waits in, if it is in a transaction.
 */
static void
handle_sigterm(SIGNAL_ARGS)
{
	int			save_errno = errno;

	ShutdownRequestPending = true;
	if (voutbox_in_xact)
	{
		QueryCancelPending = true;
		InterruptPending = true;
	}
	SetLatch(MyLatch);
	errno = save_errno;
}

static void
setup_signals(bool delivery_worker)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, delivery_worker ? handle_sigterm : SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();
}

/* Sleep on the latch (and, if fd >= 0, on fd) for at most timeout_ms. */
static void
wait_for_work(long timeout_ms, int fd)
{
	int			events = WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH;

	if (fd >= 0)
		events |= WL_SOCKET_READABLE;
	(void) WaitLatchOrSocket(MyLatch, events, fd, Max(timeout_ms, 0), PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
	CHECK_FOR_INTERRUPTS();
}

/* ---------------------------------------------------------------------
 * Launcher
 * ---------------------------------------------------------------------
 */

/* What the launcher knows of a database it serves. */
typedef struct Served
{
	char		name[NAMEDATALEN];	/* "" when the entry is free */
	VoutboxWorkerSlot *slot;
	int			slotno;
	bool		listed;			/* still in voutbox.database */
	BackgroundWorkerHandle *handle;	/* its worker, if one was started */
	bool		stopping;		/* asked to stop */
	TimestampTz started_at;
	TimestampTz next_start;
	long		delay;
	bool		told_missing;
} Served;

/* What a delivery worker is told in bgw_extra. */
typedef struct WorkerArgs
{
	int			slotno;
	char		dbname[NAMEDATALEN];
} WorkerArgs;

/*
 * The OID of the database called name, or InvalidOid.  Connected to no
 * database, the launcher can read only shared catalogs, and only by heap
 * scans (as the autovacuum launcher's get_database_list() does).
 */
static Oid
lookup_database(const char *name)
{
	Oid			dboid = InvalidOid;
	MemoryContext cxt = CurrentMemoryContext;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;

	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);

		if (strcmp(NameStr(db->datname), name) == 0)
		{
			dboid = db->oid;
			break;
		}
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
	MemoryContextSwitchTo(cxt);
	return dboid;
}

static BackgroundWorkerHandle *
start_worker(Served *sv, Oid dboid)
{
	BackgroundWorker worker;
	BackgroundWorkerHandle *handle;
	WorkerArgs	args;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "voutbox");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "voutbox_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "voutbox worker for database %s", sv->name);
	snprintf(worker.bgw_type, BGW_MAXLEN, "voutbox worker");
	worker.bgw_main_arg = ObjectIdGetDatum(dboid);
	memset(&args, 0, sizeof(args));
	args.slotno = sv->slotno;
	strlcpy(args.dbname, sv->name, sizeof(args.dbname));
	StaticAssertStmt(sizeof(WorkerArgs) <= BGW_EXTRALEN, "WorkerArgs does not fit in bgw_extra");
	memcpy(worker.bgw_extra, &args, sizeof(args));
	worker.bgw_notify_pid = MyProcPid;
	if (!RegisterDynamicBackgroundWorker(&worker, &handle))
	{
		ereport(LOG,
				(errmsg("voutbox: could not start the delivery worker for database \"%s\"",
						sv->name),
				 errhint("Raise max_worker_processes: voutbox needs one for its launcher and one per database in voutbox.database.")));
		return NULL;
	}
	return handle;
}

/*
 * Claim a slot for a newly listed database: the one still named after it
 * (its worker outlived a launcher that failed), else a free one, whose
 * counters start from zero.
 */
static VoutboxWorkerSlot *
claim_slot(const char *name, int *slotno)
{
	VoutboxWorkerSlot *found = NULL;

	SpinLockAcquire(&voutbox_shared->mutex);
	for (int i = 0; i < voutbox_shared->nslots && found == NULL; i++)
	{
		if (strcmp(voutbox_shared->slots[i].dbname, name) == 0)
		{
			found = &voutbox_shared->slots[i];
			*slotno = i;
		}
	}
	for (int i = 0; i < voutbox_shared->nslots && found == NULL; i++)
	{
		VoutboxWorkerSlot *slot = &voutbox_shared->slots[i];

		if (slot->dbname[0] == '\0' && slot->pid == 0)
		{
			found = slot;
			*slotno = i;
			strlcpy(found->dbname, name, NAMEDATALEN);
			found->database = InvalidOid;
			found->pgprocno = -1;
			memset(found->state, 0, sizeof(VoutboxWorkerSlot) - offsetof(VoutboxWorkerSlot, state));
		}
	}
	SpinLockRelease(&voutbox_shared->mutex);
	return found;
}

static void
release_slot(VoutboxWorkerSlot *slot)
{
	SpinLockAcquire(&voutbox_shared->mutex);
	slot->dbname[0] = '\0';
	slot->database = InvalidOid;
	SpinLockRelease(&voutbox_shared->mutex);
}

static void
set_slot_database(VoutboxWorkerSlot *slot, Oid dboid)
{
	SpinLockAcquire(&voutbox_shared->mutex);
	slot->database = dboid;
	SpinLockRelease(&voutbox_shared->mutex);
}

/* Mark the served databases listed in voutbox.database; add new ones. */
static void
read_list(Served *served, int nserved)
{
	char	   *detail;
	List	   *names;
	ListCell   *lc;

	for (int i = 0; i < nserved; i++)
		served[i].listed = false;
	names = voutbox_database_list(voutbox_database, &detail);
	foreach(lc, names)
	{
		const char *name = lfirst(lc);
		Served	   *sv = NULL;
		Served	   *free_entry = NULL;

		for (int i = 0; i < nserved && sv == NULL; i++)
		{
			if (strcmp(served[i].name, name) == 0)
				sv = &served[i];
			else if (served[i].name[0] == '\0' && free_entry == NULL)
				free_entry = &served[i];
		}
		if (sv == NULL && free_entry != NULL)
		{
			memset(free_entry, 0, sizeof(*free_entry));
			free_entry->slot = claim_slot(name, &free_entry->slotno);
			if (free_entry->slot != NULL)
			{
				sv = free_entry;
				strlcpy(sv->name, name, NAMEDATALEN);
				sv->delay = RESTART_DELAY_MIN_MS;
				ereport(LOG, (errmsg("voutbox: serving database \"%s\"", name)));
			}
		}
		if (sv == NULL)
		{
			ereport(LOG,
					(errmsg("voutbox: database \"%s\" is not served: more databases are listed than max_worker_processes allows",
							name),
					 errhint("Raise max_worker_processes: voutbox needs one for its launcher and one per database in voutbox.database.")));
			continue;
		}
		sv->listed = true;
	}
}

/*
 * Supervise the worker of one served database; returns how long the
 * launcher may sleep before it needs to look at it again.
 */
static long
supervise(Served *sv)
{
	TimestampTz now = GetCurrentTimestamp();
	pid_t		pid;
	Oid			dboid;

	if (sv->handle != NULL &&
		GetBackgroundWorkerPid(sv->handle, &pid) == BGWH_STOPPED)
	{
		pfree(sv->handle);
		sv->handle = NULL;
		if (!sv->stopping)
		{
			sv->delay = TimestampDifferenceExceeds(sv->started_at, now, RESTART_STABLE_MS) ?
				RESTART_DELAY_MIN_MS : Min(sv->delay * 2, RESTART_DELAY_MAX_MS);
			sv->next_start = TimestampTzPlusMilliseconds(now, sv->delay);
			ereport(LOG,
					(errmsg("voutbox: the delivery worker for database \"%s\" exited; starting a new one in %ld ms",
							sv->name, sv->delay)));
		}
	}

	if (!sv->listed)
	{
		/* No longer listed: stop its worker, then forget it. */
		if (sv->handle != NULL)
		{
			if (!sv->stopping)
				TerminateBackgroundWorker(sv->handle);
			sv->stopping = true;
			return RECHECK_MS;	/* its exit sets the latch */
		}
		ereport(LOG, (errmsg("voutbox: no longer serving database \"%s\"", sv->name)));
		release_slot(sv->slot);
		sv->name[0] = '\0';
		return RECHECK_MS;
	}
	sv->stopping = false;
	if (sv->handle != NULL)
		return RECHECK_MS;
	if (now < sv->next_start)
		return (long) ((sv->next_start - now) / 1000) + 1;

	if (!OidIsValid(dboid = lookup_database(sv->name)))
	{
		if (!sv->told_missing)
			ereport(LOG,
					(errmsg("voutbox: database \"%s\" named by voutbox.database does not exist",
							sv->name),
					 errdetail("The launcher checks again every %d seconds.", RECHECK_MS / 1000)));
		sv->told_missing = true;
		set_slot_database(sv->slot, InvalidOid);
		voutbox_stats_slot_state(sv->slot, "waiting for database",
								 "the database does not exist");
		return RECHECK_MS;
	}
	sv->told_missing = false;
	sv->started_at = now;
	set_slot_database(sv->slot, dboid);
	sv->handle = start_worker(sv, dboid);
	if (sv->handle == NULL)
	{
		voutbox_stats_slot_state(sv->slot, "not started", "no background worker slot is free");
		sv->next_start = TimestampTzPlusMilliseconds(now, RECHECK_MS);
	}
	return RECHECK_MS;
}

void
voutbox_launcher_main(Datum arg pg_attribute_unused())
{
	MemoryContext loop_cxt;
	Served	   *served;
	int			nserved;

	setup_signals(false);
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_appname("voutbox launcher");
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "voutbox launcher loop",
									 ALLOCSET_SMALL_SIZES);
	nserved = voutbox_shared->nslots;
	served = MemoryContextAllocZero(TopMemoryContext, sizeof(Served) * nserved);

	/* Slots of a launcher that exited are free again (its workers were stopped). */
	SpinLockAcquire(&voutbox_shared->mutex);
	for (int i = 0; i < voutbox_shared->nslots; i++)
		if (voutbox_shared->slots[i].pid == 0)
			voutbox_shared->slots[i].dbname[0] = '\0';
	SpinLockRelease(&voutbox_shared->mutex);

	if (voutbox_database == NULL || voutbox_database[0] == '\0')
		ereport(LOG,
				(errmsg("voutbox: voutbox.database is not set, so no events are delivered"),
				 errhint("List the databases to serve in voutbox.database and reload the configuration.")));

	read_list(served, nserved);
	while (!ShutdownRequestPending)
	{
		long		timeout = -1;
		int			nrunning = 0;
		StringInfoData missing;

		CHECK_FOR_INTERRUPTS();
		MemoryContextReset(loop_cxt);
		MemoryContextSwitchTo(loop_cxt);
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			read_list(served, nserved);
		}

		initStringInfo(&missing);
		for (int i = 0; i < nserved; i++)
		{
			long		t;

			if (served[i].name[0] == '\0')
				continue;
			MemoryContextSwitchTo(TopMemoryContext);
			t = supervise(&served[i]);
			MemoryContextSwitchTo(loop_cxt);
			timeout = timeout < 0 ? t : Min(timeout, t);
			nrunning += served[i].handle != NULL;
			if (served[i].told_missing)
				appendStringInfo(&missing, "; waiting for database \"%s\" to exist", served[i].name);
		}
		report_idle(psprintf("supervising %d delivery worker%s%s", nrunning,
							 nrunning == 1 ? "" : "s", missing.data));

		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_EXIT_ON_PM_DEATH | (timeout >= 0 ? WL_TIMEOUT : 0),
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}

	/*
	 * The workers belong to this launcher: stop them, and wait, so that a
	 * restarted launcher never finds one still running.  Exit with 1 so that
	 * the postmaster restarts the launcher unless the server is shutting down.
	 */
	for (int i = 0; i < nserved; i++)
		if (served[i].handle != NULL)
			TerminateBackgroundWorker(served[i].handle);
	for (int i = 0; i < nserved; i++)
		if (served[i].handle != NULL)
			(void) WaitForBackgroundWorkerShutdown(served[i].handle);
	proc_exit(1);
}

/* ---------------------------------------------------------------------
 * Delivery worker
 * ---------------------------------------------------------------------
 */

static void
unpublish_worker(int code pg_attribute_unused(), Datum arg pg_attribute_unused())
{
	SpinLockAcquire(&voutbox_shared->mutex);
	if (voutbox_my_slot->pid == MyProcPid)
	{
		voutbox_my_slot->pgprocno = -1;
		voutbox_my_slot->pid = 0;
	}
	SpinLockRelease(&voutbox_shared->mutex);
}

/*
 * Make committing backends set this process's latch.  Only one worker may
 * deliver a database: if another one is published for it (it unpublishes
 * itself at exit, and a crash resets shared memory), wait for it to go
 * away.  A slot the launcher gave to another database since (it was
 * unlisted meanwhile) ends this worker.
 */
static void
publish_worker(int slotno)
{
	bool		told = false;

	if (slotno < 0 || slotno >= voutbox_shared->nslots)
		elog(FATAL, "voutbox: worker slot %d out of range", slotno);
	voutbox_my_slot = &voutbox_shared->slots[slotno];
	before_shmem_exit(unpublish_worker, (Datum) 0);
	for (;;)
	{
		pid_t		other = 0;
		bool		gone = false;

		SpinLockAcquire(&voutbox_shared->mutex);
		if (voutbox_my_slot->database != MyDatabaseId)
			gone = true;
		for (int i = 0; i < voutbox_shared->nslots && !gone && other == 0; i++)
		{
			VoutboxWorkerSlot *slot = &voutbox_shared->slots[i];

			if (slot->pid != 0 && slot->database == MyDatabaseId)
				other = slot->pid;
		}
		if (!gone && other == 0)
		{
			voutbox_my_slot->pgprocno = MyProc->pgprocno;
			voutbox_my_slot->pid = MyProcPid;
		}
		SpinLockRelease(&voutbox_shared->mutex);
		if (gone)
			proc_exit(0);
		if (other == 0)
			return;
		if (!told)
			ereport(LOG,
					(errmsg("voutbox: another delivery worker (PID %d) is running for database \"%s\"; waiting for it to exit",
							(int) other, voutbox_worker_dbname)));
		told = true;
		wait_for_work(1000, -1);
		if (ShutdownRequestPending)
			proc_exit(0);
	}
}

static void
check_librdkafka_version(void)
{
	int			runtime = rd_kafka_version();

	/* Same major version, and not older than the headers we were built with. */
	if ((runtime >> 24) != (RD_KAFKA_VERSION >> 24) ||
		runtime < (int) (RD_KAFKA_VERSION & 0xffff0000))
		ereport(WARNING,
				(errmsg("voutbox: built with librdkafka %x but running with %s",
						RD_KAFKA_VERSION, rd_kafka_version_str())));
}

void
voutbox_worker_main(Datum arg)
{
	WorkerArgs	args;

	memcpy(&args, MyBgworkerEntry->bgw_extra, sizeof(args));
	strlcpy(voutbox_worker_dbname, args.dbname, NAMEDATALEN);
	voutbox_is_worker = true;
	setup_signals(true);
	voutbox_session_remember();
	/* Its owner may close the database to connections: what it committed still goes out. */
	BackgroundWorkerInitializeConnectionByOid(DatumGetObjectId(arg), InvalidOid,
											  BGWORKER_BYPASS_ALLOWCONN);
	voutbox_session_pin();
	pgstat_report_appname("voutbox worker");
	publish_worker(args.slotno);
	voutbox_stats_worker_started();
	before_shmem_exit(voutbox_stats_worker_stopped, (Datum) 0);
	check_librdkafka_version();
	voutbox_producer_init();
	ereport(LOG, (errmsg("voutbox: delivery worker started for database \"%s\"",
						 voutbox_worker_dbname)));

	voutbox_stream_run();

	ereport(LOG, (errmsg("voutbox: delivery worker stopped for database \"%s\"",
						 voutbox_worker_dbname)));
	proc_exit(0);
}
