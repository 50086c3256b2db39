/*-------------------------------------------------------------------------
 *
 * save.c
 *		outbox_save(): validate an event and append it to the outbox.
 *
 * The event is inserted, nothing else is written: the row carries the
 * saving transaction's id (pg_current_xact_id()) and a save-order number,
 * from which the worker later forms its batches (storage.c).  Topic and key
 * are rendered here so that bad routing input fails the caller's statement.
 *
 * Idempotency: a unique index cannot span the ring of event tables, so a
 * call with an idempotency key first takes a transaction-level lock on the
 * (tenant_id, key) pair and then looks the key up with the latest snapshot.
 * Two sessions saving the same key thus serialize, and the second one sees
 * the first one's event once it has committed, also in REPEATABLE READ.
 * Calls without a key skip all this: the key defaults to the fresh event id.
 *
 * Tenants: the function is SECURITY INVOKER, so that it knows its caller.
 * It checks that the caller acts for the tenant (privileges.c) before it
 * looks at anything stored, so that no role can save for, or probe the
 * idempotency keys of, a tenant it does not act for; then it stores the
 * event as the extension's owner.
 *
 * At commit, a transaction that saved events sets the worker's latch.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/time.h>

#include "access/xact.h"
#include "catalog/dependency.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/jsonb.h"
#include "catalog/namespace.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"
#include "utils/xid8.h"

#include "voutbox.h"

/* locktag_field4 of voutbox's advisory locks; user advisory locks use 1 and 2 */
#define VOUTBOX_LOCK_IDEMPOTENCY	0x766f

/* Arguments of outbox_save, in SQL order. */
enum
{
	ARG_TENANT_ID,
	ARG_AGGREGATE_TYPE,
	ARG_AGGREGATE_ID,
	ARG_EVENT_TYPE,
	ARG_PAYLOAD,
	ARG_EVENT_VERSION,
	ARG_METADATA,
	ARG_IDEMPOTENCY_KEY,
	ARG_CORRELATION_ID,
	ARG_TRACE_ID,
	ARG_PII,
	ARG_PII_FIELDS,
	ARG_CONSENT,
	ARG_PRODUCER,
	ARG_SCHEDULED_FOR
};

/* Columns of the INSERT, in the order of its parameters (the last three: a route's). */
#define INSERT_NPARAMS 24

typedef struct SaveRequest
{
	char	   *tenant_id;
	char	   *aggregate_type;
	char	   *aggregate_id;
	char	   *event_type;
	Jsonb	   *payload;
	int32		event_version;
	Jsonb	   *metadata;
	char	   *idempotency_key;
	char	   *correlation_id;
	char	   *trace_id;
	char	   *traceparent;
	bool		pii;
	Datum		pii_fields;
	bool		has_pii_fields;
	Jsonb	   *consent;
	char	   *producer;
	bool		has_scheduled_for;
	TimestampTz scheduled_for;
	char	   *topic;
	char	   *msg_key;
	/* the route that matched: its name (NULL if none), format and headers */
	char	   *route_name;
	char	   *route_format;
	Datum		route_headers;
} SaveRequest;

static SPIPlanPtr plan_current_slot = NULL;
static SPIPlanPtr plan_insert[VOUTBOX_RING_SLOTS];
static SPIPlanPtr plan_insert_routed[VOUTBOX_RING_SLOTS];
static SPIPlanPtr plan_find_key = NULL;

static bool xact_callback_registered = false;
/*
 * The ring slot of the transaction's newest event that is still to commit,
 * and the (sub)transaction that saved it: a rolled-back savepoint takes its
 * events, and the slot goes back to the one of the newest event saved
 * before it (SavedSlot entries in TopTransactionContext, newest last).  And
 * the role that owns the storage (commit order, below).
 */
typedef struct SavedSlot
{
	SubTransactionId subid;
	int			slot;
} SavedSlot;

static List *saved_slots = NIL;
static bool subxact_callback_registered = false;
static Oid	commit_owner = InvalidOid;
static SPIPlanPtr plan_commit_order[VOUTBOX_RING_SLOTS];
static bool saved_in_xact = false;
static bool requeued_in_xact = false;

PG_FUNCTION_INFO_V1(voutbox_outbox_save);

/* ---------------------------------------------------------------------
 * The arguments (their rules are in validate.c)
 * ---------------------------------------------------------------------
 */

static char *
required_text(FunctionCallInfo fcinfo, int argno, const char *name, int max_bytes)
{
	char	   *s;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", name)));
	s = text_to_cstring(PG_GETARG_TEXT_PP(argno));
	voutbox_check_text(s, name, max_bytes, NULL);
	return s;
}

/* NULL when the argument is NULL; an error when it is empty. */
static char *
optional_text(FunctionCallInfo fcinfo, int argno, const char *name, int max_bytes)
{
	char	   *s;

	if (PG_ARGISNULL(argno))
		return NULL;
	s = text_to_cstring(PG_GETARG_TEXT_PP(argno));
	voutbox_check_text(s, name, max_bytes, "Pass NULL to use the default.");
	return s;
}

/*
 * Trace context: an explicit trace_id wins; else the session's
 * voutbox.traceparent gives one.  The traceparent header sent with the
 * event names the session's span as parent when it belongs to the same
 * trace, else a random parent id.
 */
static void
resolve_trace(SaveRequest *req, FunctionCallInfo fcinfo)
{
	const char *session = voutbox_traceparent;
	bool		have_session = session != NULL && session[0] != '\0';

	req->trace_id = optional_text(fcinfo, ARG_TRACE_ID, "trace_id", VOUTBOX_MAX_NAME_BYTES);
	if (req->trace_id != NULL && !voutbox_is_trace_id(req->trace_id))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("trace_id \"%s\" is not a W3C trace id", req->trace_id),
				 errdetail("A trace id is 32 lowercase hexadecimal digits, not all zero.")));
	if (req->trace_id == NULL && have_session)
		req->trace_id = pnstrdup(session + 3, 32);
	if (req->trace_id == NULL)
		req->traceparent = NULL;
	else if (have_session && strncmp(session + 3, req->trace_id, 32) == 0)
		req->traceparent = pstrdup(session);
	else
	{
		uint8		span[8];
		char		hex[17];

		if (!pg_strong_random(span, sizeof(span)))
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("could not generate random values")));
		hex_encode((char *) span, sizeof(span), hex);
		hex[16] = '\0';
		req->traceparent = psprintf("00-%s-%s-01", req->trace_id, hex);
	}
}




/*
 * The event's topic and key, from the first route that matches it, or from
 * voutbox.topic_template and voutbox.key_template.  Every argument that the
 * topic template puts into the topic must itself be acceptable in a Kafka
 * topic name; the message names the first one that is not.  Then the whole
 * topic must be, and (with tenant isolation on) not be another tenant's.
 */
static void
render_routing(SaveRequest *req)
{
	VoutboxRouteFields f = {req->tenant_id, req->aggregate_type, req->aggregate_id,
	req->event_type, req->event_version};
	const char *args[][2] = {{"tenant_id", req->tenant_id},
	{"aggregate_type", req->aggregate_type},
	{"aggregate_id", req->aggregate_id},
	{"event_type", req->event_type}};
	const VoutboxRoute *route = voutbox_route_match(req->tenant_id, req->event_type);
	const char *topic_tmpl = voutbox_topic_template;
	const char *topic_route = NULL;		/* the route whose template it is */
	const char *key_tmpl = voutbox_key_template;
	const char *key_route = NULL;
	const char *detail;

	/* (Copied: the cached route may be read again before the INSERT.) */
	if (route != NULL)
	{
		req->route_name = pstrdup(route->name);
		req->route_format = route->format_name ? pstrdup(route->format_name) : NULL;
		req->route_headers = route->headers_jsonb ?
			datumCopy(route->headers_jsonb, false, -1) : (Datum) 0;
		if (route->topic_template != NULL)
		{
			topic_tmpl = pstrdup(route->topic_template);
			topic_route = req->route_name;
			voutbox_check_route_template(topic_route, topic_tmpl);
		}
		if (route->key_template != NULL)
		{
			key_tmpl = pstrdup(route->key_template);
			key_route = req->route_name;
		}
	}
	if (!voutbox_topic_template_separates_tenants(topic_tmpl, &detail))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("%s could make two tenants share a topic",
						voutbox_topic_template_desc(topic_route, topic_tmpl)),
				 errdetail("%s", detail),
				 errhint("Start the template with {tenant_id} and a separator, as in the default \"{tenant_id}.{event_type}\", or leave {tenant_id} out to share topics between tenants.")));
	for (size_t i = 0; i < lengthof(args); i++)
	{
		char		placeholder[32];

		snprintf(placeholder, sizeof(placeholder), "{%s}", args[i][0]);
		if (strstr(topic_tmpl, placeholder) != NULL &&
			strlen(args[i][1]) <= VOUTBOX_TOPIC_MAX_LEN &&
			!voutbox_topic_is_valid(args[i][1], &detail))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_NAME),
					 errmsg("%s \"%s\" cannot be part of a Kafka topic name", args[i][0], args[i][1]),
					 errdetail("%s puts %s into the topic. %s",
							   voutbox_topic_template_desc(topic_route, topic_tmpl), args[i][0], detail)));
	}
	voutbox_check_tenant_in_topic(req->tenant_id, topic_tmpl, topic_route);
	/* A route's template ends the tenant id as the setting's does, if it does. */
	if (topic_route != NULL && strstr(topic_tmpl, "{tenant_id}") != NULL)
		voutbox_check_tenant_in_topic(req->tenant_id, voutbox_topic_template, NULL);
	req->topic = voutbox_render_template(topic_tmpl, &f);
	if (!voutbox_topic_is_valid(req->topic, &detail))
	{
		const char *topic_from = topic_route ?
			psprintf("the topic template of route \"%s\"", topic_route) : "voutbox.topic_template";

		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("the topic \"%s\" rendered from %s is not a valid Kafka topic name",
						req->topic, topic_from),
				 errdetail("%s", detail),
				 errhint("Shorten the arguments the template uses, or change %s.", topic_from)));
	}
	voutbox_check_topic_namespace(req->tenant_id, req->topic);
	req->msg_key = voutbox_render_template(key_tmpl, &f);
	if (req->msg_key[0] == '\0')
		req->msg_key = NULL;
	else if (strlen(req->msg_key) > VOUTBOX_MAX_KEY_BYTES)
	{
		const char *key_from = key_route ?
			psprintf("the key template of route \"%s\"", key_route) : "voutbox.key_template";

		ereport(ERROR,
				(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
				 errmsg("the message key rendered from %s is longer than %d bytes",
						key_from, VOUTBOX_MAX_KEY_BYTES),
				 errdetail("It is %zu bytes long; %s is \"%s\".",
						   strlen(req->msg_key), key_from, key_tmpl),
				 errhint("Shorten the arguments the template uses, or change %s.", key_from)));
	}
}

static void
read_request(FunctionCallInfo fcinfo, SaveRequest *req)
{
	int32		type_version;
	VoutboxEventSize size = {0};

	memset(req, 0, sizeof(*req));
	req->tenant_id = required_text(fcinfo, ARG_TENANT_ID, "tenant_id", VOUTBOX_MAX_NAME_BYTES);
	req->aggregate_type = required_text(fcinfo, ARG_AGGREGATE_TYPE, "aggregate_type", VOUTBOX_MAX_NAME_BYTES);
	req->aggregate_id = required_text(fcinfo, ARG_AGGREGATE_ID, "aggregate_id", VOUTBOX_MAX_KEY_BYTES);
	req->event_type = required_text(fcinfo, ARG_EVENT_TYPE, "event_type", VOUTBOX_MAX_NAME_BYTES);
	type_version = voutbox_parse_event_type(req->event_type);
	req->event_version = PG_ARGISNULL(ARG_EVENT_VERSION) ? type_version :
		PG_GETARG_INT32(ARG_EVENT_VERSION);
	if (req->event_version != type_version)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("event_version %d does not match event_type \"%s\"",
						req->event_version, req->event_type),
				 errhint("Omit event_version; it defaults to the version in event_type.")));

	if (PG_ARGISNULL(ARG_PAYLOAD))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("payload must not be null"),
				 errhint("Pass '{}' or the JSON null value 'null' for an event without data.")));
	req->payload = PG_GETARG_JSONB_P(ARG_PAYLOAD);
	size.payload = voutbox_check_payload(JsonbPGetDatum(req->payload));

	if (!PG_ARGISNULL(ARG_METADATA))
	{
		req->metadata = PG_GETARG_JSONB_P(ARG_METADATA);
		if (!JB_ROOT_IS_OBJECT(req->metadata))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("metadata must be a JSON object")));
		size.metadata = voutbox_check_json(JsonbPGetDatum(req->metadata), "metadata");
	}
	req->idempotency_key = optional_text(fcinfo, ARG_IDEMPOTENCY_KEY, "idempotency_key", VOUTBOX_MAX_KEY_BYTES);
	req->correlation_id = optional_text(fcinfo, ARG_CORRELATION_ID, "correlation_id", VOUTBOX_MAX_KEY_BYTES);
	if (req->correlation_id == NULL)
		req->correlation_id = req->aggregate_id;
	resolve_trace(req, fcinfo);

	if (PG_ARGISNULL(ARG_PII))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("pii must not be null")));
	req->pii = PG_GETARG_BOOL(ARG_PII);
	if (!PG_ARGISNULL(ARG_PII_FIELDS))
	{
		size.pii_fields = voutbox_check_pii_fields(PG_GETARG_DATUM(ARG_PII_FIELDS));
		req->pii_fields = PG_GETARG_DATUM(ARG_PII_FIELDS);
		req->has_pii_fields = true;
	}
	if (!PG_ARGISNULL(ARG_CONSENT))
	{
		req->consent = PG_GETARG_JSONB_P(ARG_CONSENT);
		size.consent = voutbox_check_json(JsonbPGetDatum(req->consent), "consent");
	}
	voutbox_check_event_size(&size);
	req->producer = optional_text(fcinfo, ARG_PRODUCER, "producer", VOUTBOX_MAX_NAME_BYTES);
	if (req->producer == NULL && voutbox_producer != NULL && voutbox_producer[0] != '\0')
	{
		/* Checked like the argument (its check hook cannot know the database's encoding). */
		voutbox_check_text(voutbox_producer, "voutbox.producer", VOUTBOX_MAX_NAME_BYTES, NULL);
		req->producer = pstrdup(voutbox_producer);
	}

	if (!PG_ARGISNULL(ARG_SCHEDULED_FOR))
	{
		req->scheduled_for = PG_GETARG_TIMESTAMPTZ(ARG_SCHEDULED_FOR);
		req->has_scheduled_for = true;
		if (TIMESTAMP_NOT_FINITE(req->scheduled_for))
			ereport(ERROR,
					(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
					 errmsg("scheduled_for must be a finite timestamp")));
	}
}


/* ---------------------------------------------------------------------
 * Storage
 * ---------------------------------------------------------------------
 */

static SPIPlanPtr
prepare_plan(const char *sql, int nargs, Oid *argtypes)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

	if (plan == NULL)
		elog(ERROR, "voutbox: SPI_prepare failed for \"%s\": %s",
			 sql, SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "voutbox: SPI_keepplan failed");
	return plan;
}

/*
 * The INSERT of an event has a second form, with the columns of its route,
 * prepared once a route is used: the first does not name them, so that
 * saving works also while the SQL objects are those of 0.6.0 (between the
 * restart with this library and ALTER EXTENSION UPDATE).
 */
static void
prepare_plans(bool routed)
{
	if (plan_current_slot == NULL)
		plan_current_slot = prepare_plan("SELECT r.slot FROM " VOUTBOX_SCHEMA ".ring r WHERE r.state = 'current'",
										 0, NULL);
	for (int slot = 0; slot < VOUTBOX_RING_SLOTS; slot++)
	{
		Oid			types[INSERT_NPARAMS] = {UUIDOID, XID8OID, TEXTOID, TEXTOID, TEXTOID,
			TEXTOID, INT4OID, JSONBOID, JSONBOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID,
			TIMESTAMPTZOID, TIMESTAMPTZOID, BOOLOID, TEXTARRAYOID, JSONBOID, TEXTOID, TEXTOID, TEXTOID,
		TEXTOID, TEXTOID, JSONBOID};

		if (plan_insert[slot] != NULL && (!routed || plan_insert_routed[slot] != NULL))
			continue;
		for (int with_route = 0; with_route <= (routed ? 1 : 0); with_route++)
		{
			SPIPlanPtr *plan = with_route ? &plan_insert_routed[slot] : &plan_insert[slot];

			if (*plan != NULL)
				continue;
			*plan = prepare_plan(psprintf("INSERT INTO " VOUTBOX_SCHEMA ".events_%d (id, seq, txid, tenant_id, "
										  "aggregate_type, aggregate_id, event_type, event_version, payload, metadata, "
										  "idempotency_key, trace_id, traceparent, correlation_id, created_at, "
										  "scheduled_for, pii, pii_fields, consent, producer, topic, msg_key%s) "
										  "VALUES ($1, pg_catalog.nextval('" VOUTBOX_SCHEMA ".event_seq'), $2, $3, $4, $5, $6, "
										  "$7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21%s)",
										  slot,
										  with_route ? ", route, format, headers" : "",
										  with_route ? ", $22, $23, $24" : ""),
								 with_route ? INSERT_NPARAMS : INSERT_NPARAMS - 3, types);
		}
	}
}

/*
 * Take the transaction-level lock of (tenant_id, idempotency_key) and return
 * the id of the event already saved under that key, if any.
 */
static bool
find_saved_event(SaveRequest *req, Oid api_nsp, Datum *id)
{
	LOCKTAG		tag;
	uint64		h;
	Datum		values[2];
	char	   *key = psprintf("%s%c%s", req->tenant_id, '\0', req->idempotency_key);
	int			keylen = strlen(req->tenant_id) + 1 + strlen(req->idempotency_key);
	bool		isnull;

	/*
	 * Prepared only when a key is given: the plan locks the DLQ, which an
	 * operator may hold locked, and saves without a key need not wait.  The
	 * event may be in the ring, or only in the retry queue (requeued from
	 * the DLQ after its ring table was truncated), or in the DLQ: until
	 * ALTER EXTENSION UPDATE moves it to voutbox.dlq, the table outbox_dlq
	 * of 0.2.0 next to this function (the library is loaded at a restart,
	 * which comes first).
	 */
	if (plan_find_key == NULL)
	{
		Oid			types[2] = {TEXTOID, TEXTOID};
		char	   *dlq = OidIsValid(get_relname_relid("dlq", get_namespace_oid(VOUTBOX_SCHEMA, false))) ?
			VOUTBOX_SCHEMA ".dlq" :
			psprintf("%s.outbox_dlq", quote_identifier(get_namespace_name(api_nsp)));

		plan_find_key = prepare_plan(psprintf("SELECT e.id FROM " VOUTBOX_SCHEMA ".events e "
											  " WHERE e.tenant_id = $1 AND e.idempotency_key = $2 "
											  "UNION ALL "
											  "SELECT d.id FROM " VOUTBOX_SCHEMA ".deferred d "
											  " WHERE d.tenant_id = $1 AND d.idempotency_key = $2 "
											  "UNION ALL "
											  "SELECT q.id FROM %s q "
											  " WHERE q.tenant_id = $1 AND q.idempotency_key = $2 "
											  "LIMIT 1", dlq),
									 2, types);
	}
	h = DatumGetUInt64(hash_any_extended((unsigned char *) key, keylen, 0));
	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, (uint32) (h >> 32), (uint32) h,
						 VOUTBOX_LOCK_IDEMPOTENCY);
	(void) LockAcquire(&tag, ExclusiveLock, false, false);

	values[0] = CStringGetTextDatum(req->tenant_id);
	values[1] = CStringGetTextDatum(req->idempotency_key);
	if (SPI_execute_snapshot(plan_find_key, values, NULL, GetLatestSnapshot(),
							 InvalidSnapshot, true, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "voutbox: idempotency key lookup failed");
	if (SPI_processed == 0)
		return false;
	*id = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	*id = SPI_datumTransfer(*id, false, UUID_LEN);
	return true;
}

static int
current_slot(void)
{
	bool		isnull;
	Datum		d;

	if (SPI_execute_plan(plan_current_slot, NULL, NULL, true, 1) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "voutbox: the ring of event tables has no current table");
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return DatumGetInt32(d);
}

/*
 * A version 7 UUID (RFC 9562): 48 bits of Unix time in milliseconds, then a
 * 12-bit counter, so that the ids of one backend, and thus of one
 * transaction, increase in the order they were made.
 */
static void
generate_uuidv7(pg_uuid_t *uuid)
{
	static int64 last_ms = 0;
	static uint16 counter = 0;
	struct timeval tv;
	int64		ms;

	gettimeofday(&tv, NULL);
	ms = (int64) tv.tv_sec * 1000 + tv.tv_usec / 1000;
	if (ms <= last_ms)
	{
		ms = last_ms;
		if (++counter > 0xFFF)
		{
			ms++;
			counter = 0;
		}
	}
	else
		counter = 0;
	last_ms = ms;

	if (!pg_strong_random(uuid->data + 8, 8))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate random values")));
	for (int i = 0; i < 6; i++)
		uuid->data[i] = (uint8) (ms >> (40 - 8 * i));
	uuid->data[6] = 0x70 | (counter >> 8);
	uuid->data[7] = counter & 0xFF;
	uuid->data[8] = 0x80 | (uuid->data[8] & 0x3F);
}

static Datum
text_or_null(const char *s, char *null)
{
	*null = s ? ' ' : 'n';
	return s ? CStringGetTextDatum(s) : (Datum) 0;
}

static void
insert_event(SaveRequest *req, Datum id)
{
	Datum		v[INSERT_NPARAMS];
	char		n[INSERT_NPARAMS];
	int			slot;

	memset(n, ' ', sizeof(n));
	v[0] = id;
	v[1] = FullTransactionIdGetDatum(GetTopFullTransactionId());
	v[2] = CStringGetTextDatum(req->tenant_id);
	v[3] = CStringGetTextDatum(req->aggregate_type);
	v[4] = CStringGetTextDatum(req->aggregate_id);
	v[5] = CStringGetTextDatum(req->event_type);
	v[6] = Int32GetDatum(req->event_version);
	v[7] = JsonbPGetDatum(req->payload);
	v[8] = req->metadata ? JsonbPGetDatum(req->metadata) : (Datum) 0;
	n[8] = req->metadata ? ' ' : 'n';
	v[9] = text_or_null(req->idempotency_key, &n[9]);
	v[10] = text_or_null(req->trace_id, &n[10]);
	v[11] = text_or_null(req->traceparent, &n[11]);
	v[12] = CStringGetTextDatum(req->correlation_id);
	v[13] = TimestampTzGetDatum(GetCurrentStatementStartTimestamp());
	v[14] = TimestampTzGetDatum(req->scheduled_for);
	n[14] = req->has_scheduled_for ? ' ' : 'n';
	v[15] = BoolGetDatum(req->pii);
	v[16] = req->pii_fields;
	n[16] = req->has_pii_fields ? ' ' : 'n';
	v[17] = req->consent ? JsonbPGetDatum(req->consent) : (Datum) 0;
	n[17] = req->consent ? ' ' : 'n';
	v[18] = text_or_null(req->producer, &n[18]);
	v[19] = CStringGetTextDatum(req->topic);
	v[20] = text_or_null(req->msg_key, &n[20]);
	if (req->route_name != NULL)
	{
		v[21] = CStringGetTextDatum(req->route_name);
		v[22] = text_or_null(req->route_format, &n[22]);
		v[23] = req->route_headers;
		n[23] = req->route_headers ? ' ' : 'n';
	}

	slot = current_slot();
	if (SPI_execute_plan(req->route_name ? plan_insert_routed[slot] : plan_insert[slot],
						 v, n, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "voutbox: could not insert the event");
	/* (Runs as the storage's owner: see voutbox_outbox_save().) */
	{
		MemoryContext old = MemoryContextSwitchTo(TopTransactionContext);
		SavedSlot  *saved = palloc(sizeof(SavedSlot));

		saved->subid = GetCurrentSubTransactionId();
		saved->slot = slot;
		saved_slots = lappend(saved_slots, saved);
		MemoryContextSwitchTo(old);
	}
	commit_owner = GetUserId();
}

/*
 * A savepoint rolled back takes its events; one released hands them to its
 * parent.
 */
static void
voutbox_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						 SubTransactionId parentSubid, void *arg pg_attribute_unused())
{
	ListCell   *lc;

	if (event == SUBXACT_EVENT_ABORT_SUB)
	{
		foreach(lc, saved_slots)
		{
			if (((SavedSlot *) lfirst(lc))->subid == mySubid)
				saved_slots = foreach_delete_current(saved_slots, lc);
		}
	}
	else if (event == SUBXACT_EVENT_COMMIT_SUB)
	{
		foreach(lc, saved_slots)
		{
			if (((SavedSlot *) lfirst(lc))->subid == mySubid)
				((SavedSlot *) lfirst(lc))->subid = parentSubid;
		}
	}
}

/*
 * The transaction's commit position: as it commits (at pre-commit, after
 * deferred triggers), a transaction that saved events takes the next number
 * of voutbox.commit_seq and appends it to the commit_order table of its
 * newest event's ring slot.  A transaction whose commit completed before
 * another's began has the lower number; the worker sends a window's events
 * in this order (storage.c).  Transactions that commit at the same time get
 * numbers in the order they reached this point, which no client can tell
 * from their commit order.  Skipped while the SQL objects are older than the
 * library (0.6.1's have no commit_order: their events have position 0).
 */
static void
record_commit_position(void)
{
	int			slot = ((SavedSlot *) llast(saved_slots))->slot;
	Oid			nsp;
	Oid			relid;
	Oid			extension;
	Oid			save_user;
	int			save_sec;

	saved_slots = NIL;
	/*
	 * Only into the extension's own table, the extension locked: whoever
	 * could drop it in this transaction (after a savepoint released its
	 * locks) and create look-alikes must not have them run as the owner.
	 * (0.6.1's objects have no commit_order.)
	 */
	extension = voutbox_lock_extension();
	nsp = get_namespace_oid(VOUTBOX_SCHEMA, true);
	if (!OidIsValid(extension) || !OidIsValid(nsp))
		return;
	relid = get_relname_relid(psprintf("commit_order_%d", slot), nsp);
	if (!OidIsValid(relid) || getExtensionOfObject(RelationRelationId, relid) != extension)
		return;
	GetUserIdAndSecContext(&save_user, &save_sec);
	SetUserIdAndSecContext(commit_owner,
						   save_sec | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "voutbox: SPI_connect failed");
	if (plan_commit_order[slot] == NULL)
		plan_commit_order[slot] =
			prepare_plan(psprintf("INSERT INTO " VOUTBOX_SCHEMA ".commit_order_%d (txid, commit_seq) "
								  "VALUES (pg_catalog.pg_current_xact_id(), "
								  "        pg_catalog.nextval('" VOUTBOX_SCHEMA ".commit_seq'))", slot),
						 0, NULL);
	/* (Portals are closed by now: no snapshot is active.) */
	PushActiveSnapshot(GetTransactionSnapshot());
	if (SPI_execute_plan(plan_commit_order[slot], NULL, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "voutbox: could not record the commit position");
	PopActiveSnapshot();
	SPI_finish();
	SetUserIdAndSecContext(save_user, save_sec);
}

static void
voutbox_xact_callback(XactEvent event, void *arg pg_attribute_unused())
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
		case XACT_EVENT_PRE_PREPARE:
			/* (A prepared transaction's position is that of its PREPARE.) */
			if (saved_slots != NIL)
				record_commit_position();
			break;
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			/* (The worker looks at voutbox.deferred again: see stream.c.) */
			if (requeued_in_xact)
				voutbox_note_requeued();
			if (saved_in_xact || requeued_in_xact)
				voutbox_wake_worker();
			saved_in_xact = requeued_in_xact = false;
			saved_slots = NIL;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			/* COMMIT PREPARED fires no callback: the poll interval finds it. */
			saved_in_xact = requeued_in_xact = false;
			saved_slots = NIL;
			break;
		default:
			break;
	}
}

static void
wake_worker_at_commit(bool requeued)
{
	if (!xact_callback_registered)
	{
		RegisterXactCallback(voutbox_xact_callback, NULL);
		xact_callback_registered = true;
	}
	if (!subxact_callback_registered)
	{
		RegisterSubXactCallback(voutbox_subxact_callback, NULL);
		subxact_callback_registered = true;
	}
	if (requeued)
		requeued_in_xact = true;
	else
		saved_in_xact = true;
}

Datum
voutbox_outbox_save(PG_FUNCTION_ARGS)
{
	SaveRequest req;
	Datum		id;
	pg_uuid_t  *uuid;

	Oid			save_user;
	int			save_sec;
	bool		found;

	read_request(fcinfo, &req);
	voutbox_check_acts_for(req.tenant_id, "save events");
	/* (Routes are looked at only for a tenant the caller acts for.) */
	render_routing(&req);
	uuid = palloc(sizeof(pg_uuid_t));

	voutbox_become_owner(fcinfo, &save_user, &save_sec);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "voutbox: SPI_connect failed");
	prepare_plans(req.route_name != NULL);

	found = req.idempotency_key != NULL &&
		find_saved_event(&req, get_func_namespace(fcinfo->flinfo->fn_oid), &id);
	if (!found)
	{
		generate_uuidv7(uuid);
		id = UUIDPGetDatum(uuid);
		insert_event(&req, id);
	}
	SPI_finish();
	voutbox_restore_user(save_user, save_sec);

	if (!found)
		wake_worker_at_commit(false);
	PG_RETURN_DATUM(id);
}

/*
 * voutbox.wake_worker_at_commit(): events were made due by other means than
 * outbox_save() (outbox_dlq_requeue), so wake the worker when, and only if,
 * the transaction commits.
 */
PG_FUNCTION_INFO_V1(voutbox_wake_worker_at_commit);

Datum
voutbox_wake_worker_at_commit(PG_FUNCTION_ARGS pg_attribute_unused())
{
	wake_worker_at_commit(true);
	PG_RETURN_VOID();
}
