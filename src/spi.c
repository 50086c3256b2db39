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

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "voutbox.h"

volatile sig_atomic_t voutbox_in_xact = false;

/* The caller's memory context: CommitTransactionCommand leaves TopMemoryContext. */
static MemoryContext xact_caller_cxt = NULL;

void
voutbox_xact_begin(const char *activity)
{
	xact_caller_cxt = CurrentMemoryContext;
	voutbox_report_activity(activity);
	SetCurrentStatementStartTimestamp();
	voutbox_in_xact = true;
	StartTransactionCommand();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "voutbox: SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
}

void
voutbox_xact_end(void)
{
	voutbox_xact_commit(NULL);
}

/* Commit, and set *committed (if given) the moment the commit is done. */
void
voutbox_xact_commit(bool *committed)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	if (committed != NULL)
		*committed = true;
	voutbox_in_xact = false;
	/* A stop request meant to cancel this transaction has nothing left to cancel. */
	QueryCancelPending = false;
	MemoryContextSwitchTo(xact_caller_cxt);
	pgstat_report_stat(false);
}

/*
 * After an ERROR caught in a transaction of the worker: abort it and go back
 * to the caller's memory context.  The caller holds interrupts.
 */
void
voutbox_xact_abort(void)
{
	AbortCurrentTransaction();
	voutbox_in_xact = false;
	QueryCancelPending = false;
	if (xact_caller_cxt != NULL)
		MemoryContextSwitchTo(xact_caller_cxt);
}

/* Run sql with parameters; returns SPI_processed. */
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
