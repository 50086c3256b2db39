/*-------------------------------------------------------------------------
 *
 * worker.c
 *		The launcher and the delivery worker.
 *
 * The launcher is a static background worker, registered at preload.  It is
 * connected to no database: it checks that voutbox.database exists (waiting,
 * and saying so in the log, while it does not) and starts the delivery
 * worker for it as a dynamic background worker, restarting it with a
 * growing delay whenever it exits.
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

/* The delivery worker's state for outbox_worker, and pg_stat_activity's. */
static void
worker_state(const char *state, const char *what, bool running)
{
	pgstat_report_activity(running ? STATE_RUNNING : STATE_IDLE, what);
	voutbox_stats_set_state(state, what);
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

/*
 * The OID of voutbox.database, or InvalidOid.  Connected to no database, the
 * launcher can read only shared catalogs, and only by heap scans (as the
 * autovacuum launcher's get_database_list() does).
 */
static Oid
lookup_database(void)
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

		if (strcmp(NameStr(db->datname), voutbox_database) == 0)
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
start_worker(Oid dboid)
{
	BackgroundWorker worker;
	BackgroundWorkerHandle *handle;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "voutbox");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "voutbox_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "voutbox worker for database %s", voutbox_database);
	snprintf(worker.bgw_type, BGW_MAXLEN, "voutbox worker");
	worker.bgw_main_arg = ObjectIdGetDatum(dboid);
	worker.bgw_notify_pid = MyProcPid;
	if (!RegisterDynamicBackgroundWorker(&worker, &handle))
	{
		ereport(LOG,
				(errmsg("voutbox: could not start the delivery worker"),
				 errhint("Raise max_worker_processes.")));
		return NULL;
	}
	return handle;
}

void
voutbox_launcher_main(Datum arg pg_attribute_unused())
{
	BackgroundWorkerHandle *handle = NULL;
	TimestampTz started_at = 0;
	TimestampTz next_start = 0;
	long		delay = RESTART_DELAY_MIN_MS;
	bool		told_missing = false;

	MemoryContext loop_cxt;

	setup_signals(false);
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_appname("voutbox launcher");
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "voutbox launcher loop",
									 ALLOCSET_SMALL_SIZES);

	if (voutbox_database == NULL || voutbox_database[0] == '\0')
		ereport(LOG,
				(errmsg("voutbox: voutbox.database is not set, so no events are delivered"),
				 errhint("Set voutbox.database in postgresql.conf and restart the server.")));

	while (!ShutdownRequestPending)
	{
		long		timeout = RECHECK_MS;

		CHECK_FOR_INTERRUPTS();
		MemoryContextReset(loop_cxt);
		MemoryContextSwitchTo(loop_cxt);
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		if (handle != NULL)
		{
			pid_t		pid;

			if (GetBackgroundWorkerPid(handle, &pid) == BGWH_STOPPED)
			{
				TimestampTz now = GetCurrentTimestamp();

				pfree(handle);
				handle = NULL;
				delay = TimestampDifferenceExceeds(started_at, now, RESTART_STABLE_MS) ?
					RESTART_DELAY_MIN_MS : Min(delay * 2, RESTART_DELAY_MAX_MS);
				next_start = TimestampTzPlusMilliseconds(now, delay);
				ereport(LOG,
						(errmsg("voutbox: the delivery worker exited; starting a new one in %ld ms",
								delay)));
			}
		}
		else if (voutbox_database != NULL && voutbox_database[0] != '\0')
		{
			TimestampTz now = GetCurrentTimestamp();
			Oid			dboid;

			if (now < next_start)
				timeout = Min(timeout, (long) ((next_start - now) / 1000) + 1);
			else if (!OidIsValid(dboid = lookup_database()))
			{
				if (!told_missing)
					ereport(LOG,
							(errmsg("voutbox: database \"%s\" named by voutbox.database does not exist",
									voutbox_database),
							 errdetail("The launcher checks again every %d seconds.", RECHECK_MS / 1000)));
				told_missing = true;
				report_idle(psprintf("waiting for database \"%s\" to exist", voutbox_database));
			}
			else
			{
				told_missing = false;
				started_at = now;
				MemoryContextSwitchTo(TopMemoryContext);
				handle = start_worker(dboid);
				MemoryContextSwitchTo(loop_cxt);
				report_idle(handle ? "supervising the delivery worker" : "could not start the worker");
			}
		}
		else
			timeout = -1;

		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_EXIT_ON_PM_DEATH | (timeout >= 0 ? WL_TIMEOUT : 0),
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}

	/*
	 * The worker belongs to this launcher: stop it, and wait, so that a
	 * restarted launcher never finds it still running.  Exit with 1 so that
	 * the postmaster restarts the launcher unless the server is shutting down.
	 */
	if (handle != NULL)
	{
		TerminateBackgroundWorker(handle);
		(void) WaitForBackgroundWorkerShutdown(handle);
	}
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
	if (voutbox_shared->worker_pid == MyProcPid)
	{
		voutbox_shared->worker_pgprocno = -1;
		voutbox_shared->worker_pid = 0;
		voutbox_shared->worker_database = InvalidOid;
	}
	SpinLockRelease(&voutbox_shared->mutex);
}

/*
 * Make committing backends set this process's latch.  Only one worker may
 * deliver: if another one is published (it unpublishes itself at exit, and a
 * crash resets shared memory), wait for it to go away.
 */
static void
publish_worker(void)
{
	bool		told = false;

	before_shmem_exit(unpublish_worker, (Datum) 0);
	for (;;)
	{
		pid_t		other;

		SpinLockAcquire(&voutbox_shared->mutex);
		other = voutbox_shared->worker_pid;
		if (other == 0)
		{
			voutbox_shared->worker_pgprocno = MyProc->pgprocno;
			voutbox_shared->worker_pid = MyProcPid;
			voutbox_shared->worker_database = MyDatabaseId;
		}
		SpinLockRelease(&voutbox_shared->mutex);
		if (other == 0)
			return;
		if (!told)
			ereport(LOG,
					(errmsg("voutbox: another delivery worker (PID %d) is running; waiting for it to exit",
							(int) other)));
		told = true;
		worker_state("waiting for other worker", "waiting for the other voutbox worker to exit", false);
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
	voutbox_is_worker = true;
	setup_signals(true);
	voutbox_session_remember();
	/* Its owner may close the database to connections: what it committed still goes out. */
	BackgroundWorkerInitializeConnectionByOid(DatumGetObjectId(arg), InvalidOid,
											  BGWORKER_BYPASS_ALLOWCONN);
	voutbox_session_pin();
	pgstat_report_appname("voutbox worker");
	publish_worker();
	voutbox_stats_worker_started();
	before_shmem_exit(voutbox_stats_worker_stopped, (Datum) 0);
	check_librdkafka_version();
	voutbox_producer_init();
	ereport(LOG, (errmsg("voutbox: delivery worker started for database \"%s\"",
						 voutbox_database)));

	voutbox_stream_run();

	ereport(LOG, (errmsg("voutbox: delivery worker stopped")));
	proc_exit(0);
}
