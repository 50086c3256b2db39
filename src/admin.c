/*-------------------------------------------------------------------------
 *
 * admin.c
 *		DLQ administration: the SQL entry points.
 *
 * outbox_dlq_requeue(), outbox_dlq_discard() and their _where forms are
 * SECURITY INVOKER C functions, so that they know who calls them (EXECUTE is
 * granted by the extension's owner).  Each calls the internal SQL function
 * that does the work (voutbox.requeue, voutbox.discard, over the dead events
 * voutbox.dlq_own or voutbox.dlq_matching select) as the extension's owner,
 * passing the caller's role: only events of tenants the caller acts for
 * are affected.  An id of another tenant's event is treated as absent.
 * Everything runs in the caller's transaction.
 *
 * The trigger voutbox.dlq_check keeps what an operator changes in the DLQ
 * by hand to what the worker can send, and to the caller's tenants.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/rel.h"

#include "voutbox.h"

/*
 * Run sql as the extension's owner, with $1 the caller's role and $2... the
 * function's arguments (of the given types); returns its bigint result.
 */
static Datum
run_for_caller(FunctionCallInfo fcinfo, const char *sql, int nargs, const Oid *argtypes)
{
	Oid			caller = GetUserId();
	Oid			types[FUNC_MAX_ARGS];
	Datum		values[FUNC_MAX_ARGS];
	char		nulls[FUNC_MAX_ARGS];
	Oid			save_user;
	int			save_sec;
	bool		isnull;
	int64		result;

	types[0] = OIDOID;
	values[0] = ObjectIdGetDatum(caller);
	nulls[0] = ' ';
	for (int i = 0; i < nargs; i++)
	{
		types[i + 1] = argtypes[i];
		values[i + 1] = PG_ARGISNULL(i) ? (Datum) 0 : PG_GETARG_DATUM(i);
		nulls[i + 1] = PG_ARGISNULL(i) ? 'n' : ' ';
	}

	voutbox_become_owner(fcinfo, &save_user, &save_sec);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "voutbox: SPI_connect failed");
	if (SPI_execute_with_args(sql, nargs + 1, types, values, nulls, false, 1) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "voutbox: \"%s\" failed", sql);
	result = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	voutbox_restore_user(save_user, save_sec);
	PG_RETURN_INT64(isnull ? 0 : result);
}

/* The arguments of the _where functions: the filter. */
static const Oid filter_types[8] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID,
	TIMESTAMPTZOID, TIMESTAMPTZOID, TIMESTAMPTZOID, TIMESTAMPTZOID};

#define FILTER_PARAMS "$2, $3, $4, $5, $6, $7, $8, $9"

PG_FUNCTION_INFO_V1(voutbox_outbox_dlq_requeue);

Datum
voutbox_outbox_dlq_requeue(PG_FUNCTION_ARGS)
{
	Oid			type = UUIDOID;

	return run_for_caller(fcinfo,
						  "SELECT voutbox.requeue(voutbox.dlq_own($1, ARRAY[$2]))", 1, &type);
}

PG_FUNCTION_INFO_V1(voutbox_outbox_dlq_discard);

Datum
voutbox_outbox_dlq_discard(PG_FUNCTION_ARGS)
{
	Oid			type = UUIDOID;

	return run_for_caller(fcinfo,
						  "SELECT voutbox.discard(voutbox.dlq_own($1, ARRAY[$2]))", 1, &type);
}

PG_FUNCTION_INFO_V1(voutbox_outbox_dlq_requeue_where);

Datum
voutbox_outbox_dlq_requeue_where(PG_FUNCTION_ARGS)
{
	return run_for_caller(fcinfo,
						  "SELECT voutbox.requeue(voutbox.dlq_matching('outbox_dlq_requeue_where', $1, "
						  FILTER_PARAMS "))",
						  8, filter_types);
}

PG_FUNCTION_INFO_V1(voutbox_outbox_dlq_discard_where);

Datum
voutbox_outbox_dlq_discard_where(PG_FUNCTION_ARGS)
{
	return run_for_caller(fcinfo,
						  "SELECT voutbox.discard(voutbox.dlq_matching('outbox_dlq_discard_where', $1, "
						  FILTER_PARAMS "))",
						  8, filter_types);
}

/* ---------------------------------------------------------------------
 * Fixing dead events in place
 * ---------------------------------------------------------------------
 */

static bool
column_changed(TriggerData *trigdata, const char *name)
{
	return voutbox_column_changed(trigdata->tg_trigtuple, trigdata->tg_newtuple,
								  trigdata->tg_relation->rd_att, name);
}

/*
 * A dead event added by hand must not take the id of an event still
 * retained: when that one dies, the worker could not move it to the DLQ.
 * Looked up as the extension's owner (the caller cannot read the storage).
 */
static void
check_new_id(FunctionCallInfo fcinfo, TriggerData *trigdata, HeapTuple row)
{
	TupleDesc	desc = trigdata->tg_relation->rd_att;
	bool		isnull;
	Datum		id = heap_getattr(row, SPI_fnumber(desc, "id"), desc, &isnull);
	Oid			type = UUIDOID;
	Oid			save_user;
	int			save_sec;
	uint64		found;

	if (isnull)
		return;					/* the NOT NULL constraint says so */
	voutbox_become_owner(fcinfo, &save_user, &save_sec);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "voutbox: SPI_connect failed");
	if (SPI_execute_with_args("SELECT 1 FROM voutbox.events e WHERE e.id OPERATOR(pg_catalog.=) $1 "
							  "UNION ALL SELECT 1 FROM voutbox.deferred d "
							  "WHERE d.id OPERATOR(pg_catalog.=) $1 LIMIT 1",
							  1, &type, &id, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "voutbox: could not look up the id of the dead event");
	found = SPI_processed;
	SPI_finish();
	voutbox_restore_user(save_user, save_sec);
	if (found > 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNIQUE_VIOLATION),
				 errmsg("the id of a dead event added by hand is that of an event still retained"),
				 errhint("Give it an id of its own.")));
}

static void
refuse_routing_change(const char *what)
{
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("permission denied to %s", what),
			 errdetail("Tenant isolation is on, and role \"%s\" does not act for every tenant.",
					   GetUserNameFromId(GetUserId(), false)),
			 errhint("Members of voutbox_admin may change the tenant, idempotency key, topic and key of dead events, and add dead events.")));
}

PG_FUNCTION_INFO_V1(voutbox_dlq_check);

/*
 * BEFORE INSERT OR UPDATE row trigger on voutbox.dlq, for who fixes a dead
 * event in place, or adds one, through outbox_dlq.  The row must hold what
 * outbox_save() would have accepted (save.c): the worker builds the event's
 * envelope from it, and a value it could not send would stop it.  Its id
 * and seq are its identity for consumers and its place in its key's order:
 * they never change, and a new one may not take the id of a retained event.
 * Superusers are trusted (pg_restore restores the DLQ through this trigger);
 * in an updated row only the columns that change are checked.
 * With tenant isolation on, only who acts for every tenant may add an event
 * or change its tenant, idempotency key, topic or key: a tenant's role could
 * otherwise send its events to another tenant's topic.  A C function: it
 * asks for the current user, which a trigger runs as.  The worker's own
 * moves into the DLQ are not checked: they copy what outbox_save() stored.
 */
Datum
voutbox_dlq_check(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	static const char *const routing[] = {"tenant_id", "idempotency_key", "topic", "msg_key"};
	bool		insert;
	HeapTuple	row;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_FOR_ROW(trigdata->tg_event) ||
		!TRIGGER_FIRED_BEFORE(trigdata->tg_event))
		elog(ERROR, "voutbox_dlq_check: not called as a BEFORE row trigger");
	insert = TRIGGER_FIRED_BY_INSERT(trigdata->tg_event);
	row = insert ? trigdata->tg_trigtuple : trigdata->tg_newtuple;
	/* Superusers are trusted (pg_restore of the DLQ, too) */
	if (voutbox_is_worker || superuser())
		return PointerGetDatum(row);

	if (insert)
	{
		if (!voutbox_acts_for_all(GetUserId()))
			refuse_routing_change("add a dead event");
		check_new_id(fcinfo, trigdata, row);
	}
	else
	{
		if (column_changed(trigdata, "id") || column_changed(trigdata, "seq"))
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("the id and seq of a dead event cannot be changed"),
					 errhint("They are its identity for consumers and its place in its key's order.")));
		for (size_t i = 0; i < lengthof(routing); i++)
			if (column_changed(trigdata, routing[i]) && !voutbox_acts_for_all(GetUserId()))
				refuse_routing_change(psprintf("change %s of a dead event", routing[i]));
	}
	voutbox_check_event_row(row, insert ? NULL : trigdata->tg_trigtuple,
							trigdata->tg_relation->rd_att);
	return PointerGetDatum(row);
}
