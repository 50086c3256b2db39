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
 * The delivery worker loops: read a round (storage.c), send it (producer.c),
 * wait for every delivery report, settle the round in one transaction.  It
 * sleeps on its latch, which committing transactions that saved events set
 * (save.c); voutbox.poll_interval only bounds the sleep.  Any ERROR ends the
 * worker: PostgreSQL aborts its transaction, nothing it did not settle is
 * lost, and the launcher starts a new one that reads the cursor again.  So
 * "catch and continue" is not needed, and no librdkafka frame is ever
 * unwound by a longjmp (callbacks never raise errors).
 *
 * SIGTERM asks for a clean stop at the next safe point; SIGHUP reloads the
 * configuration, and a changed broker list or librdkafka property rebuilds
 * the producer between rounds.
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

/* ---------------------------------------------------------------------
 * Common
 * ---------------------------------------------------------------------
 */

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

static void
setup_signals(void)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
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

	setup_signals();
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

typedef struct WorkerState
{
	VoutboxProducer *producer;
	char	   *producer_error;		/* why the last build failed, or NULL */
	TimestampTz producer_built_at;	/* last attempt to build it */
	VoutboxCursor cursor;
	TimestampTz next_cleanup;
	VoutboxStorageStatus told_not_installed;	/* what the log said last */
} WorkerState;

static void
unpublish_worker(int code pg_attribute_unused(), Datum arg pg_attribute_unused())
{
	SpinLockAcquire(&voutbox_shared->mutex);
	if (voutbox_shared->worker_pid == MyProcPid)
	{
		voutbox_shared->worker_pgprocno = -1;
		voutbox_shared->worker_pid = 0;
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

/*
 * Build the producer if there is none, or rebuild it if it broke or its
 * settings changed.  Returns false if it cannot be built; the error is
 * logged once per configuration.
 */
static bool
ensure_producer(WorkerState *st)
{
	char	   *error = NULL;
	TimestampTz now = GetCurrentTimestamp();

	if (st->producer != NULL &&
		(voutbox_producer_is_broken(st->producer) ||
		 voutbox_producer_config_changed(st->producer)))
	{
		voutbox_producer_destroy(st->producer);
		st->producer = NULL;
	}
	if (st->producer != NULL)
		return true;

	/*
	 * Build at most once a second, and retry a configuration that failed
	 * only every few seconds: a producer that keeps failing must not spin.
	 */
	if (!TimestampDifferenceExceeds(st->producer_built_at, now,
									st->producer_error ? RECHECK_MS : 1000))
		return false;
	st->producer_built_at = now;
	st->producer = voutbox_producer_create(&error);
	if (st->producer != NULL)
	{
		if (st->producer_error != NULL)
			pfree(st->producer_error);
		st->producer_error = NULL;
		return true;
	}
	if (st->producer_error == NULL || strcmp(st->producer_error, error) != 0)
		ereport(LOG,
				(errmsg("voutbox: could not create the Kafka producer: %s", error),
				 errhint("Fix voutbox.brokers, voutbox.kafka_properties or voutbox.kafka_secrets_file and reload the configuration.")));
	if (st->producer_error != NULL)
		pfree(st->producer_error);
	st->producer_error = MemoryContextStrdup(TopMemoryContext, error);
	return false;
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

/* Run retention when it is due. */
static void
maybe_cleanup(WorkerState *st)
{
	TimestampTz now = GetCurrentTimestamp();

	if (now < st->next_cleanup)
		return;
	voutbox_retention_run(&st->cursor);
	st->next_cleanup = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), voutbox_cleanup_interval);
}

/*
 * How long to sleep: until the poll interval, a deferred event, or cleanup
 * (when cleanup can run at all: with a producer and the extension installed).
 */
static long
sleep_ms(WorkerState *st, TimestampTz next_due)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz until = TimestampTzPlusMilliseconds(now, voutbox_poll_interval);

	if (next_due != 0 && next_due < until)
		until = next_due;
	if (st->producer != NULL && st->cursor.lo != NULL && st->next_cleanup < until)
		until = st->next_cleanup;
	return until <= now ? 0 : (long) ((until - now + 999) / 1000);
}

/*
 * One round: read, send, settle.  Returns true if it did work, so that the
 * caller goes on at once; sets *next_due.
 */
static bool
deliver_round(WorkerState *st, TimestampTz *next_due)
{
	VoutboxRound round;
	int			nsend = 0;
	char	   *version = NULL;
	VoutboxStorageStatus status;

	status = voutbox_storage_read_round(&st->cursor, &round, &version);
	if (status != VOUTBOX_STORAGE_READY)
	{
		if (st->told_not_installed != status)
		{
			if (status == VOUTBOX_STORAGE_MISSING)
				ereport(LOG,
						(errmsg("voutbox: extension \"voutbox\" is not installed in database \"%s\"",
								voutbox_database),
						 errhint("Run CREATE EXTENSION voutbox in that database.")));
			else
				ereport(LOG,
						(errmsg("voutbox: extension \"voutbox\" in database \"%s\" is version %s, but the library is version %s",
								voutbox_database, version, VOUTBOX_SQL_VERSION),
						 errdetail("No event is delivered until the versions agree; nothing is lost."),
						 errhint("Run ALTER EXTENSION voutbox UPDATE in that database.")));
		}
		st->told_not_installed = status;
		*next_due = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), RECHECK_MS);
		if (status == VOUTBOX_STORAGE_MISSING)
			worker_state("not installed", "waiting for CREATE EXTENSION voutbox", false);
		else
			worker_state("needs update", "waiting for ALTER EXTENSION voutbox UPDATE", false);
		return false;
	}
	st->told_not_installed = VOUTBOX_STORAGE_READY;
	*next_due = round.next_due;
	if (round.nevents == 0)
		return false;

	for (int i = 0; i < round.nevents; i++)
		nsend += round.errs[i] == VOUTBOX_DELIVERY_PENDING;
	worker_state("delivering", psprintf("delivering %d events%s", nsend,
										round.alone ? " (one failed event alone)" : ""), true);
	if (nsend > 0)
		voutbox_producer_deliver(st->producer, round.events, round.nevents, round.errs);
	voutbox_storage_settle_round(&st->cursor, &round);
	if (round.next_due != 0)
		*next_due = round.next_due;
	return true;
}

void
voutbox_worker_main(Datum arg)
{
	WorkerState st;
	MemoryContext round_cxt;

	setup_signals();
	BackgroundWorkerInitializeConnectionByOid(DatumGetObjectId(arg), InvalidOid, 0);
	pgstat_report_appname("voutbox worker");
	publish_worker();
	voutbox_stats_worker_started();
	before_shmem_exit(voutbox_stats_worker_stopped, (Datum) 0);
	check_librdkafka_version();
	voutbox_producer_init();

	/* The window logic wants READ COMMITTED; no server default may interfere. */
	SetConfigOption("default_transaction_isolation", "read committed", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("statement_timeout", "0", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("lock_timeout", "0", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("idle_in_transaction_session_timeout", "0", PGC_SUSET, PGC_S_OVERRIDE);

	memset(&st, 0, sizeof(st));
	st.cursor.cxt = AllocSetContextCreate(TopMemoryContext, "voutbox cursor",
										  ALLOCSET_SMALL_SIZES);
	round_cxt = AllocSetContextCreate(TopMemoryContext, "voutbox round",
									  ALLOCSET_DEFAULT_SIZES);
	ereport(LOG, (errmsg("voutbox: delivery worker started for database \"%s\"",
						 voutbox_database)));

	while (!ShutdownRequestPending)
	{
		TimestampTz next_due = 0;
		bool		busy = false;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
			voutbox_reload_config();
		MemoryContextReset(round_cxt);
		MemoryContextSwitchTo(round_cxt);

		if (ensure_producer(&st))
		{
			busy = deliver_round(&st, &next_due);
			if (st.cursor.lo != NULL)
				maybe_cleanup(&st);
		}
		else
			worker_state("no kafka configuration", "waiting for a valid Kafka configuration", false);

		if (st.producer != NULL)
			voutbox_producer_serve(st.producer);
		if (!busy)
		{
			if (st.producer != NULL && st.cursor.lo != NULL)
				worker_state("idle", "waiting for events", false);
			wait_for_work(sleep_ms(&st, next_due),
						  st.producer ? voutbox_producer_socket(st.producer) : -1);
		}
	}

	worker_state("stopping", "shutting down", false);
	if (st.producer != NULL)
		voutbox_producer_destroy(st.producer);
	ereport(LOG, (errmsg("voutbox: delivery worker stopped")));
	proc_exit(0);
}
