/*-------------------------------------------------------------------------
 *
 * spi.c
 *		The worker's short transactions, and SPI helpers.
 *
 * The worker does its database work in short transactions of its own and
 * never holds one open while it waits for Kafka.  voutbox_in_xact tells its
 * SIGTERM handler (worker.c) whether a transaction is open: a stop request
 * then cancels the statement, so that a wait for a lock or a long query
 * never delays a stop.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/twophase.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/guc.h"
#include "utils/snapmgr.h"

#include "voutbox.h"

volatile sig_atomic_t voutbox_in_xact = false;

/* The caller's memory context: CommitTransactionCommand leaves TopMemoryContext. */
static MemoryContext xact_caller_cxt = NULL;
/* The transaction is a block (to be prepared). */
static bool xact_in_block = false;

/*
 * Start a transaction with SPI connected and a snapshot; in a transaction
 * block if it is to be prepared (PREPARE TRANSACTION needs a block).
 */
static void
xact_start(const char *activity, bool block)
{
	xact_caller_cxt = CurrentMemoryContext;
	voutbox_report_activity(activity);
	SetCurrentStatementStartTimestamp();
	voutbox_in_xact = true;
	xact_in_block = block;
	StartTransactionCommand();
	if (block)
	{
		BeginTransactionBlock();
		CommitTransactionCommand();
		StartTransactionCommand();
	}
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "voutbox: SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
}

/*
 * End the transaction xact_start() began: commit it, or (gid given) prepare
 * it.  *done (if given) is set the moment that is done: a prepared
 * transaction is then out of this process, in the server's care, until
 * voutbox_xact_finish_prepared().
 */
static void
xact_finish(const char *gid, bool *done)
{
	SPI_finish();
	PopActiveSnapshot();
	if (gid != NULL)
	{
		/*
		 * Not a wait without end for a synchronous standby: the worker waits
		 * for the standbys itself, within the transaction's time (stream.c).
		 */
		(void) set_config_option("synchronous_commit", "local", PGC_SUSET, PGC_S_SESSION,
								 GUC_ACTION_LOCAL, true, 0, false);
		if (!PrepareTransactionBlock(gid))
			elog(ERROR, "voutbox: could not prepare the transaction");
	}
	CommitTransactionCommand();
	if (done != NULL)
		*done = true;
	voutbox_in_xact = false;
	xact_in_block = false;
	/* A stop request meant to cancel this transaction has nothing left to cancel. */
	QueryCancelPending = false;
	MemoryContextSwitchTo(xact_caller_cxt);
	xact_caller_cxt = NULL;
	pgstat_report_stat(false);
}

void
voutbox_xact_begin(const char *activity)
{
	xact_start(activity, false);
}

/* Begin a transaction block, for voutbox_xact_prepare(). */
void
voutbox_xact_begin_block(const char *activity)
{
	xact_start(activity, true);
}

/* PREPARE TRANSACTION gid, and set *prepared (if given) the moment it is done. */
void
voutbox_xact_prepare(const char *gid, bool *prepared)
{
	xact_finish(gid, prepared);
}

/* COMMIT PREPARED or ROLLBACK PREPARED gid. */
void
voutbox_xact_finish_prepared(const char *gid, bool commit)
{
	MemoryContext cxt = CurrentMemoryContext;

	voutbox_report_activity(commit ? "committing a prepared settle" : "rolling back a prepared settle");
	SetCurrentStatementStartTimestamp();
	/* (A stop may cancel its wait for a synchronous standby: it is done all the same.) */
	voutbox_in_xact = true;
	StartTransactionCommand();
	FinishPreparedTransaction(gid, commit);
	CommitTransactionCommand();
	voutbox_in_xact = false;
	QueryCancelPending = false;
	MemoryContextSwitchTo(cxt);
	pgstat_report_stat(false);
}

void
voutbox_xact_end(void)
{
	xact_finish(NULL, NULL);
}

/* Commit, and set *committed (if given) the moment the commit is done. */
void
voutbox_xact_commit(bool *committed)
{
	xact_finish(NULL, committed);
}

/*
 * After an ERROR caught in a transaction of the worker: abort it and go back
 * to the caller's memory context.  The caller holds interrupts.
 */
void
voutbox_xact_abort(void)
{
	/* (A transaction block is left at once: no ROLLBACK is coming.) */
	if (xact_in_block)
		AbortOutOfAnyTransaction();
	else
		AbortCurrentTransaction();
	xact_in_block = false;
	voutbox_in_xact = false;
	QueryCancelPending = false;
	if (xact_caller_cxt != NULL)
		MemoryContextSwitchTo(xact_caller_cxt);
	xact_caller_cxt = NULL;
}

/*
 * Plans of the worker's statements, parsed once and kept (SPI_keepplan), so
 * that a round costs no parsing or planning: the statements are string
 * constants, found by their address (and their text, lest a string built at
 * run time reuse an address).  PostgreSQL's plan cache replans a kept plan
 * when a relation it uses changes (a DROP and CREATE EXTENSION), with the
 * search_path it was made with, the worker's pinned one.
 */
typedef struct KeptPlan
{
	const char *sql;			/* hash key: the address */
	char	   *text;
	SPIPlanPtr	plan;
} KeptPlan;

static HTAB *kept_plans = NULL;

SPIPlanPtr
voutbox_plan(const char *sql, int nargs, Oid *types)
{
	KeptPlan   *kp;
	bool		found;
	SPIPlanPtr	plan;

	if (kept_plans == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(const char *);
		ctl.entrysize = sizeof(KeptPlan);
		ctl.hcxt = TopMemoryContext;
		kept_plans = hash_create("voutbox kept plans", 64, &ctl,
								 HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	kp = hash_search(kept_plans, &sql, HASH_FIND, NULL);
	if (kp != NULL && strcmp(kp->text, sql) == 0)
		return kp->plan;

	/*
	 * Generic plans: planned once, not at every execution (a custom plan's
	 * estimates win against a generic one's for the window query, and
	 * planning would then cost more than running it).  Prepared before it is
	 * entered: preparing may fail (a lock timeout, a cancel), and leaves no
	 * entry behind then.
	 */
	plan = SPI_prepare_cursor(sql, nargs, types, CURSOR_OPT_GENERIC_PLAN);
	if (plan == NULL)
		elog(ERROR, "voutbox: SPI_prepare returned %s for \"%s\"",
			 SPI_result_code_string(SPI_result), sql);
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "voutbox: SPI_keepplan failed");
	kp = hash_search(kept_plans, &sql, HASH_ENTER, &found);
	if (found)
	{
		SPI_freeplan(kp->plan);
		pfree(kp->text);
	}
	kp->plan = plan;
	kp->text = MemoryContextStrdup(TopMemoryContext, sql);
	return plan;
}

/* Run sql (a kept plan of it) with parameters; returns SPI_processed. */
uint64
voutbox_spi(const char *sql, int nargs, Oid *types, Datum *values,
			const char *nulls, int expected)
{
	int			rc = SPI_execute_plan(voutbox_plan(sql, nargs, types), values, nulls, false, 0);

	if (rc != expected)
		elog(ERROR, "voutbox: SPI_execute_plan returned %s for \"%s\"",
			 SPI_result_code_string(rc), sql);
	return SPI_processed;
}

/* Run sql built at run time, planned for this one call. */
uint64
voutbox_spi_once(const char *sql, int nargs, Oid *types, Datum *values,
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
