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
 * (save.c); voutbox.poll_interval only bounds the sleep.
 *
 * Errors.  An ERROR while reading or in retention ends the worker:
 * PostgreSQL aborts its transaction, nothing it did not settle is lost, and
 * the launcher starts a new one that reads the cursor again.  But a lock it
 * waited for too long (lock_timeout, pinned in session.c: a user may hold a
 * lock on the storage) only makes it try again after a growing delay, with
 * its cursor read again from the table.  An ERROR while settling is
 * caught: the events of the round were acknowledged by Kafka,
 * and a new worker would send them all again, at every restart, for as long
 * as the settle fails (a trigger or constraint someone added).  So the
 * worker keeps the round, says so in outbox_worker and the log, and tries
 * the settle again with a growing delay, sending nothing meanwhile.  No
 * librdkafka frame is ever unwound by a longjmp: callbacks never raise
 * errors, and no error is raised while librdkafka is on the stack.  A
 * producer that fails fatally before it delivered anything is rebuilt with
 * a growing delay too.
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
 * rebuilds the producer between rounds.
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

/* 1 s, doubling with every failure in a row, at most a minute. */
static long
failing_delay_ms(int failures)
{
	long		delay = 1000;

	for (int i = 1; i < failures && delay < FAILING_DELAY_MAX_MS; i++)
		delay *= 2;
	return Min(delay, FAILING_DELAY_MAX_MS);
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

typedef struct WorkerState
{
	VoutboxProducer *producer;
	char	   *producer_error;		/* why the last build failed, or NULL */
	TimestampTz producer_built_at;	/* last attempt to build it */
	int			producer_failures;	/* producers in a row that failed before delivering */
	TimestampTz producer_retry_at;	/* no new producer before then */
	char	   *producer_failure;	/* why the last one failed */
	VoutboxCursor cursor;
	TimestampTz next_cleanup;
	VoutboxStorageStatus told_status;	/* what the log said last */
	MemoryContext round_cxt;	/* the round being delivered */
	bool		unsettled;		/* round: delivered, its settle failed */
	VoutboxRound round;
	int			settle_failures;
	TimestampTz settle_retry_at;
	int			lock_failures;	/* reads that timed out on a lock in a row */
	TimestampTz lock_retry_at;
	TimestampTz lock_told_at;
	bool		reading;		/* in voutbox_storage_read_round() */
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
 * Destroy a producer that broke or whose settings changed.  One that failed
 * fatally before it delivered anything counts as a failure in a row: the
 * next is built after a growing delay, so that a producer that cannot work
 * (an ACL the cluster lacks, a broker that refuses idempotence) does not
 * make the worker send the same events again every second.
 */
static void
retire_producer(WorkerState *st)
{
	TimestampTz now = GetCurrentTimestamp();
	bool		failed = voutbox_producer_failed(st->producer) &&
		!voutbox_producer_delivered_any(st->producer);

	voutbox_producer_destroy(st->producer);
	st->producer = NULL;
	if (!failed)
	{
		st->producer_failures = 0;
		return;
	}
	st->producer_failures++;
	st->producer_retry_at = TimestampTzPlusMilliseconds(now, failing_delay_ms(st->producer_failures));
	ereport(LOG,
			(errmsg("voutbox: the Kafka producer failed %d time%s in a row before it delivered anything; the next one is built in %ld ms",
					st->producer_failures, st->producer_failures == 1 ? "" : "s",
					failing_delay_ms(st->producer_failures)),
			 errhint("See the error above; nothing is lost meanwhile.")));
}

/*
 * Build the producer if there is none, or rebuild it if it broke or its
 * settings changed.  Returns false if it cannot be built (now); the error is
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
		retire_producer(st);
	if (st->producer != NULL)
		return true;

	if (now < st->producer_retry_at)
	{
		worker_state("producer failing",
					 psprintf("the Kafka producer failed %d times in a row; next try in %ld ms",
							  st->producer_failures, (long) ((st->producer_retry_at - now) / 1000)),
					 false);
		return false;
	}

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
	worker_state("no kafka configuration", "waiting for a valid Kafka configuration", false);
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

	if (now < st->next_cleanup || st->cursor.lo == NULL || st->unsettled)
		return;
	voutbox_retention_run(&st->cursor);
	st->next_cleanup = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), voutbox_cleanup_interval);
}

/*
 * How long to sleep: until the poll interval, a deferred event, a retry of
 * a failed settle, or cleanup (when cleanup can run at all: with a producer
 * and the extension installed).
 */
static long
sleep_ms(WorkerState *st, TimestampTz next_due)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz until = TimestampTzPlusMilliseconds(now, voutbox_poll_interval);

	if (next_due != 0 && next_due < until)
		until = next_due;
	if (st->unsettled && st->settle_retry_at < until)
		until = st->settle_retry_at;
	if (st->lock_retry_at > now && st->lock_retry_at < until)
		until = st->lock_retry_at;
	if (st->producer_retry_at > now && st->producer_retry_at < until)
		until = st->producer_retry_at;
	if (st->producer != NULL && st->cursor.lo != NULL && st->next_cleanup < until)
		until = st->next_cleanup;
	return until <= now ? 0 : (long) ((until - now + 999) / 1000);
}

/* Log why the worker does not deliver, once per reason. */
static void
tell_not_ready(WorkerState *st, VoutboxStorageStatus status, const char *version)
{
	if (st->told_status == status)
		return;
	st->told_status = status;
	if (status == VOUTBOX_STORAGE_MISSING)
		ereport(LOG,
				(errmsg("voutbox: extension \"voutbox\" is not installed in database \"%s\"",
						voutbox_database),
				 errhint("Run CREATE EXTENSION voutbox in that database.")));
	else if (status == VOUTBOX_STORAGE_OTHER_VERSION)
		ereport(LOG,
				(errmsg("voutbox: extension \"voutbox\" in database \"%s\" is version %s, but the library is version %s",
						voutbox_database, version, VOUTBOX_SQL_VERSION),
				 errdetail("No event is delivered until the versions agree; nothing is lost."),
				 errhint("Run ALTER EXTENSION voutbox UPDATE in that database.")));
	else
		ereport(LOG,
				(errmsg("voutbox: database \"%s\" has the encoding SQL_ASCII; no event is delivered",
						voutbox_database),
				 errdetail("The envelope is UTF-8 JSON, and SQL_ASCII does not say what the stored bytes mean, so they cannot be converted."),
				 errhint("Keep the outbox in a database with a real encoding (UTF8 is best); events stay pending meanwhile.")));
}

/*
 * Settle the round in memory; on an ERROR, keep it for another try after a
 * growing delay.  Returns whether it is settled.  (The caller holds no
 * transaction; the round's events need not be sent again.)
 */
static bool
try_settle(WorkerState *st)
{
	MemoryContext cxt = CurrentMemoryContext;
	ErrorData  *volatile edata = NULL;

	PG_TRY();
	{
		voutbox_storage_settle_round(&st->cursor, &st->round);
	}
	PG_CATCH();
	{
		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		voutbox_xact_abort();
		/* What the failed settle taught about silent topics may be wrong. */
		voutbox_forget_stalled_topics();
		RESUME_INTERRUPTS();
	}
	PG_END_TRY();

	/*
	 * An ERROR after the commit (the statistics, the cursor in memory): the
	 * outcome is recorded; the cursor is read again from the table.
	 */
	if (edata != NULL && st->round.settled)
	{
		ereport(LOG,
				(errmsg("voutbox: after recording the outcome of %d events: %s",
						st->round.nevents, edata->message)));
		st->cursor.stale = true;
		FreeErrorData(edata);
		edata = NULL;
	}
	if (edata == NULL)
	{
		if (st->settle_failures > 0)
			ereport(LOG,
					(errmsg("voutbox: recorded the outcome of %d events after %d failed tries",
							st->round.nevents, st->settle_failures)));
		st->unsettled = false;
		st->settle_failures = 0;
		return true;
	}
	st->unsettled = true;
	st->settle_failures++;
	st->settle_retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													  failing_delay_ms(st->settle_failures));
	ereport(LOG,
			(errmsg("voutbox: could not record the outcome of %d delivered events (try %d): %s",
					st->round.nevents, st->settle_failures, edata->message),
			 errdetail("The worker tries again in %ld ms without sending them again; nothing new is sent meanwhile.",
					   failing_delay_ms(st->settle_failures)),
			 edata->detail ? errhint("%s", edata->detail) : 0));
	worker_state("settle failing",
				 psprintf("could not record %d delivered events (try %d): %s",
						  st->round.nevents, st->settle_failures, edata->message),
				 false);
	voutbox_stats_set_error(psprintf("settle: %s", edata->message));
	FreeErrorData(edata);
	return false;
}

/*
 * One round: read, send, settle (or settle again the round whose settle
 * failed).  Returns true if it did work, so that the caller goes on at
 * once; sets *next_due.
 */
static bool
deliver_round(WorkerState *st, TimestampTz *next_due)
{
	VoutboxRound *round = &st->round;
	int			nsend = 0;
	char	   *version = NULL;
	VoutboxStorageStatus status;
	MemoryContext caller_cxt;

	if (st->unsettled)
	{
		if (GetCurrentTimestamp() < st->settle_retry_at)
			return false;
		return try_settle(st);
	}
	if (GetCurrentTimestamp() < st->lock_retry_at)
		return false;

	MemoryContextReset(st->round_cxt);
	caller_cxt = MemoryContextSwitchTo(st->round_cxt);
	st->reading = true;
	status = voutbox_storage_read_round(&st->cursor, round, &version);
	st->reading = false;
	MemoryContextSwitchTo(caller_cxt);
	if (status != VOUTBOX_STORAGE_READY)
	{
		tell_not_ready(st, status, version);
		*next_due = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), RECHECK_MS);
		if (status == VOUTBOX_STORAGE_MISSING)
			worker_state("not installed", "waiting for CREATE EXTENSION voutbox", false);
		else if (status == VOUTBOX_STORAGE_OTHER_VERSION)
			worker_state("needs update", "waiting for ALTER EXTENSION voutbox UPDATE", false);
		else
			worker_state("unsupported encoding", "the database's encoding is SQL_ASCII", false);
		return false;
	}
	st->told_status = VOUTBOX_STORAGE_READY;
	st->lock_failures = 0;
	*next_due = round->next_due;
	if (round->nevents == 0)
		return false;

	for (int i = 0; i < round->nevents; i++)
		nsend += round->errs[i] == VOUTBOX_DELIVERY_PENDING;
	/*
	 * A stop before anything went out: nothing to settle (the next worker
	 * reads the same events).
	 */
	if (ShutdownRequestPending)
		return false;
	worker_state("delivering", psprintf("delivering %d events%s", nsend,
										round->alone ? " (one failed event alone)" : ""), true);
	if (nsend > 0 &&
		voutbox_producer_deliver(st->producer, round->events, round->nevents, round->errs) == 0 &&
		ShutdownRequestPending)
		return false;
	(void) try_settle(st);
	if (!st->unsettled && round->next_due != 0)
		*next_due = round->next_due;
	return !st->unsettled;
}

/*
 * A lock waited for too long: try again after a growing delay, and say so
 * (once a minute).  The round read so far is dropped: nothing of it was sent.
 */
static void
lock_timed_out(WorkerState *st, const char *message)
{
	TimestampTz now = GetCurrentTimestamp();
	long		delay;

	/* In retention: it waits for the next cleanup; delivery goes on. */
	if (!st->reading)
	{
		st->next_cleanup = TimestampTzPlusMilliseconds(now, voutbox_cleanup_interval);
		if (TimestampDifferenceExceeds(st->lock_told_at, now, 60000))
		{
			st->lock_told_at = now;
			ereport(LOG,
					(errmsg("voutbox: retention: %s; it goes on at the next cleanup", message)));
		}
		return;
	}
	st->reading = false;
	delay = Min(failing_delay_ms(++st->lock_failures), LOCK_RETRY_MAX_MS);

	st->lock_retry_at = TimestampTzPlusMilliseconds(now, delay);
	st->cursor.stale = true;
	if (TimestampDifferenceExceeds(st->lock_told_at, now, 60000))
	{
		st->lock_told_at = now;
		ereport(LOG,
				(errmsg("voutbox: %s; trying again in %ld ms", message, delay),
				 errdetail("A session holds a lock on the storage that the worker would wait for (see pg_locks); nothing is lost meanwhile.")));
	}
	worker_state("waiting for a lock", psprintf("%s; trying again in %ld ms", message, delay), false);
}

/*
 * An ERROR that a stop request caused (it cancels the statement the worker
 * waits in) ends the worker cleanly, and a lock it waited for too long only
 * delays it; any other ERROR ends it as an ERROR does.
 */
static bool
deliver_or_stop(WorkerState *st, TimestampTz *next_due)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool busy = false;

	PG_TRY();
	{
		busy = deliver_round(st, next_due);
		if (!st->unsettled)
			maybe_cleanup(st);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		if (!ShutdownRequestPending && edata->sqlerrcode != ERRCODE_LOCK_NOT_AVAILABLE)
		{
			RESUME_INTERRUPTS();
			PG_RE_THROW();
		}
		FlushErrorState();
		voutbox_xact_abort();
		RESUME_INTERRUPTS();
		if (!ShutdownRequestPending)
			lock_timed_out(st, edata->message);
		FreeErrorData(edata);
		busy = false;
	}
	PG_END_TRY();
	return busy;
}

void
voutbox_worker_main(Datum arg)
{
	WorkerState st;
	MemoryContext loop_cxt;

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

	memset(&st, 0, sizeof(st));
	st.cursor.cxt = AllocSetContextCreate(TopMemoryContext, "voutbox cursor",
										  ALLOCSET_SMALL_SIZES);
	st.round_cxt = AllocSetContextCreate(TopMemoryContext, "voutbox round",
										 ALLOCSET_DEFAULT_SIZES);
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "voutbox worker loop",
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
		MemoryContextSwitchTo(loop_cxt);
		MemoryContextReset(loop_cxt);

		/* (A round waiting for its settle needs no producer.) */
		if (st.unsettled || ensure_producer(&st))
			busy = deliver_or_stop(&st, &next_due);

		if (st.producer != NULL)
			voutbox_producer_serve(st.producer);
		if (!busy && !ShutdownRequestPending)
		{
			if (st.producer != NULL && st.cursor.lo != NULL && !st.unsettled &&
				st.lock_failures == 0)
				worker_state("idle", "waiting for events", false);
			wait_for_work(sleep_ms(&st, next_due),
						  st.producer ? voutbox_producer_socket(st.producer) : -1);
		}
	}

	worker_state("stopping", "shutting down", false);
	/* A settle the stop request cancelled: once more, lest the round go twice. */
	if (st.unsettled)
		(void) try_settle(&st);
	if (st.producer != NULL)
		voutbox_producer_destroy(st.producer);
	ereport(LOG, (errmsg("voutbox: delivery worker stopped")));
	proc_exit(0);
}
