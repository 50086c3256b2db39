/*-------------------------------------------------------------------------
 *
 * validate.c
 *		The rules an event must follow, for outbox_save() and the DLQ.
 *
 * outbox_save() applies them to its arguments (save.c); the trigger on the
 * dead-letter queue applies them to a row that someone fixes in place or
 * adds by hand (admin.c), because the worker builds the event's envelope
 * from that row and a value it could not send would stop it.  Each error
 * names the argument (or column) and has the SQLSTATE the README lists.
 *
 * In a database whose encoding is not UTF-8, every text must also convert to
 * UTF-8, the envelope's encoding: a character without an equivalent is the
 * caller's error (22P05) rather than an event the worker cannot send.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "common/string.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "voutbox.h"

/* ---------------------------------------------------------------------
 * Texts
 * ---------------------------------------------------------------------
 */

void
voutbox_check_length(const char *s, const char *name, int max_bytes)
{
	size_t		len = strlen(s);

	if (len > (size_t) max_bytes)
		ereport(ERROR,
				(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
				 errmsg("%s is longer than %d bytes", name, max_bytes),
				 errdetail("It is %zu bytes long.", len)));
}

static void
conversion_context(void *arg)
{
	errcontext("argument %s of outbox_save", (const char *) arg);
}

/*
 * In a database whose encoding is not UTF-8, s must convert to UTF-8; else
 * the conversion raises 22P05 (untranslatable_character) naming the
 * argument.  (In SQL_ASCII nothing converts: the worker refuses to deliver.)
 */
void
voutbox_check_convertible(const char *s, const char *name)
{
	int			enc = GetDatabaseEncoding();
	ErrorContextCallback callback;
	char	   *converted;

	if (s == NULL || enc == PG_UTF8 || enc == PG_SQL_ASCII || pg_is_ascii(s))
		return;
	callback.callback = conversion_context;
	callback.arg = (void *) name;
	callback.previous = error_context_stack;
	error_context_stack = &callback;
	converted = pg_server_to_any(s, strlen(s), PG_UTF8);
	error_context_stack = callback.previous;
	if (converted != s)
		pfree(converted);
}

/*
 * event_type must read "name.vN": dot-separated segments of letters, digits,
 * "_" and "-", the last one "v" and a positive version.  Returns N.
 */
int32
voutbox_parse_event_type(const char *event_type)
{
	const char *dot = strrchr(event_type, '.');
	const char *p;
	int64		version = 0;
	bool		ok = dot != NULL && dot != event_type && dot[1] == 'v' &&
		dot[2] >= '1' && dot[2] <= '9';

	for (p = dot ? dot + 2 : event_type; ok && *p; p++)
	{
		ok = *p >= '0' && *p <= '9';
		version = version * 10 + (*p - '0');
		ok = ok && version <= PG_INT32_MAX;
	}
	for (p = event_type; ok && p < dot; p++)
	{
		bool		sep = *p == '.';

		ok = sep ? (p != event_type && p[-1] != '.') :
			((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
			 (*p >= '0' && *p <= '9') || *p == '_' || *p == '-');
	}
	ok = ok && dot[-1] != '.';
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("event_type \"%s\" is not of the form name.vN", event_type),
				 errdetail("An event type is dot-separated words of letters, digits, \"_\" and \"-\", ending in \".v\" and a version number from 1, such as \"lead.created.v1\".")));
	return (int32) version;
}

/* len lowercase hex digits; when nonzero, not all of them "0" */
static bool
is_lower_hex(const char *s, int len, bool nonzero)
{
	bool		seen_nonzero = false;

	for (int i = 0; i < len; i++)
	{
		if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
			return false;
		seen_nonzero = seen_nonzero || s[i] != '0';
	}
	return seen_nonzero || !nonzero;
}

bool
voutbox_is_trace_id(const char *s)
{
	return strlen(s) == 32 && is_lower_hex(s, 32, true);
}

bool
voutbox_traceparent_is_valid(const char *v)
{
	return strlen(v) == 55 && strncmp(v, "00-", 3) == 0 &&
		is_lower_hex(v + 3, 32, true) && v[35] == '-' &&
		is_lower_hex(v + 36, 16, true) && v[52] == '-' &&
		is_lower_hex(v + 53, 2, false);
}

/* The length of a JSON value as text, as the envelope carries it. */
static size_t
json_text_size(Datum jsonb, const char *convertible_name)
{
	Jsonb	   *value = DatumGetJsonbP(jsonb);
	char	   *text = JsonbToCString(NULL, &value->root, VARSIZE(value));
	size_t		len = strlen(text);

	if (convertible_name != NULL)
		voutbox_check_convertible(text, convertible_name);
	pfree(text);
	return len;
}

/* pii_fields as the envelope carries it: a JSON array of strings. */
static size_t
pii_fields_text_size(Datum array)
{
	Datum		json = DirectFunctionCall1(array_to_json, array);

	return VARSIZE_ANY_EXHDR(DatumGetPointer(json));
}

/* Checks a payload; returns its length as JSON text. */
size_t
voutbox_check_payload(Datum jsonb)
{
	size_t		len = json_text_size(jsonb, "payload");

	if (len > (size_t) voutbox_max_payload_bytes)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("payload is too large"),
				 errdetail("The payload is %zu bytes as JSON text; voutbox.max_payload_bytes is %d.",
						   len, voutbox_max_payload_bytes),
				 errhint("Store large data elsewhere and put a reference in the event.")));
	return len;
}

/*
 * Checks the metadata or consent of an event: its text must convert to UTF-8
 * (see voutbox_check_convertible).  Returns its length as JSON text.
 */
size_t
voutbox_check_json(Datum jsonb, const char *name)
{
	return json_text_size(jsonb, name);
}

/* Checks pii_fields; returns its length as a JSON array. */
size_t
voutbox_check_pii_fields(Datum array)
{
	ArrayType  *arr = DatumGetArrayTypeP(array);
	Datum	   *elems;
	int			n;

	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("pii_fields must be a one-dimensional array")));
	if (array_contains_nulls(arr))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("pii_fields must not contain nulls")));
	if (GetDatabaseEncoding() != PG_UTF8)
	{
		deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, NULL, &n);
		for (int i = 0; i < n; i++)
			voutbox_check_convertible(TextDatumGetCString(elems[i]), "pii_fields");
	}
	return pii_fields_text_size(PointerGetDatum(arr));
}

/*
 * The event's data, which the envelope carries whole, is bounded like its
 * payload: otherwise metadata of a gigabyte would make every round that reads
 * it fail (or exhaust the worker's memory), and stop delivery for everyone.
 */
void
voutbox_check_event_size(const VoutboxEventSize *size)
{
	size_t		total = size->payload + size->metadata + size->consent + size->pii_fields;

	if (total > (size_t) voutbox_max_payload_bytes)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("payload, metadata, consent and pii_fields are too large together"),
				 errdetail("They are %zu bytes as JSON text (%zu, %zu, %zu and %zu); "
						   "voutbox.max_payload_bytes is %d.",
						   total, size->payload, size->metadata, size->consent, size->pii_fields,
						   voutbox_max_payload_bytes),
				 errhint("Store large data elsewhere and put a reference in the event.")));
}

/*
 * A tenant id must not contain the character that follows {tenant_id} in the
 * topic template: with it, two tenants could render the same topic.  With
 * tenant isolation on, it must contain neither "." nor "_" either, whatever
 * the template: Kafka refuses a topic whose name differs from another's only
 * in those two, so a tenant could claim the name of another's topic.
 */
void
voutbox_check_tenant_in_topic(const char *tenant_id, const char *tmpl, const char *route)
{
	char		sep = voutbox_tenant_separator(tmpl);
	const char *bad;

	if (tmpl == NULL || strstr(tmpl, "{tenant_id}") == NULL ||
		strlen(tenant_id) > VOUTBOX_TOPIC_MAX_LEN)
		return;
	if (sep != '\0' && strchr(tenant_id, sep) != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("tenant_id \"%s\" must not contain \"%c\"", tenant_id, sep),
				 errdetail("%s puts \"%c\" after the tenant id: with it, two tenants could share a topic.",
						   voutbox_topic_template_desc(route, tmpl), sep)));
	if ((bad = strpbrk(tenant_id, "._")) != NULL && voutbox_tenant_isolation())
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("tenant_id \"%s\" must not contain \"%c\"", tenant_id, *bad),
				 errdetail("Kafka takes \".\" and \"_\" for the same in topic names: with tenant isolation on, two tenants could claim each other's topics.")));
}

/* A non-empty text of at most max_bytes, convertible to UTF-8. */
void
voutbox_check_text(const char *s, const char *name, int max_bytes, const char *hint_if_empty)
{
	if (s[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", name),
				 hint_if_empty ? errhint("%s", hint_if_empty) : 0));
	voutbox_check_length(s, name, max_bytes);
	voutbox_check_convertible(s, name);
}

/* ---------------------------------------------------------------------
 * A stored event
 * ---------------------------------------------------------------------
 */


/* A row being checked; old is the row it replaces (an UPDATE), or NULL. */
typedef struct RowCheck
{
	HeapTuple	tup;
	HeapTuple	old;
	TupleDesc	desc;
} RowCheck;

/* Column "name" of the row, or (Datum) 0 with *isnull. */
static Datum
row_value(const RowCheck *rc, const char *name, bool *isnull)
{
	int			att = SPI_fnumber(rc->desc, name);

	if (att <= 0)
		elog(ERROR, "voutbox: column \"%s\" is missing", name);
	return heap_getattr(rc->tup, att, rc->desc, isnull);
}

/* Whether column "name" differs between two versions of a row. */
bool
voutbox_column_changed(HeapTuple old, HeapTuple new, TupleDesc desc, const char *name)
{
	int			att = SPI_fnumber(desc, name);
	Form_pg_attribute attr;
	bool		old_null;
	bool		new_null;
	Datum		old_value;
	Datum		new_value;

	if (att <= 0)
		elog(ERROR, "voutbox: column \"%s\" is missing", name);
	attr = TupleDescAttr(desc, att - 1);
	old_value = heap_getattr(old, att, desc, &old_null);
	new_value = heap_getattr(new, att, desc, &new_null);
	if (old_null || new_null)
		return old_null != new_null;
	return !datum_image_eq(old_value, new_value, attr->attbyval, attr->attlen);
}

/*
 * Whether to check column "name": always in a new row; in an updated one,
 * if it changed (so that fixing one column of a row that an older version
 * stored is not refused for another).
 */
static bool
to_check(const RowCheck *rc, const char *name)
{
	return rc->old == NULL || voutbox_column_changed(rc->old, rc->tup, rc->desc, name);
}

/* A text column to check: NULL if SQL NULL; else checked as outbox_save() checks it. */
static char *
row_text(const RowCheck *rc, const char *name, int max_bytes)
{
	bool		isnull;
	Datum		d;
	char	   *s;

	if (!to_check(rc, name))
		return NULL;
	d = row_value(rc, name, &isnull);
	if (isnull)
		return NULL;
	s = TextDatumGetCString(d);
	voutbox_check_text(s, name, max_bytes, NULL);
	return s;
}

static void
row_timestamp(const RowCheck *rc, const char *name)
{
	bool		isnull;
	Datum		d;

	if (!to_check(rc, name))
		return;
	d = row_value(rc, name, &isnull);
	if (!isnull && TIMESTAMP_NOT_FINITE(DatumGetTimestampTz(d)))
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("%s must be a finite timestamp", name)));
}

/* A JSON column to check, or (Datum) 0. */
static Datum
row_json(const RowCheck *rc, const char *name)
{
	bool		isnull;
	Datum		d;

	if (!to_check(rc, name))
		return (Datum) 0;
	d = row_value(rc, name, &isnull);
	return isnull ? (Datum) 0 : d;
}

/*
 * The data of a row, bounded as a whole: with any of it changed, the sizes of
 * the rest (not checked otherwise) are added to what the checks measured.
 */
static void
check_row_size(const RowCheck *rc, VoutboxEventSize *size)
{
	RowCheck	all = {rc->tup, NULL, rc->desc};
	Datum		d;

	if (!to_check(rc, "payload") && !to_check(rc, "metadata") &&
		!to_check(rc, "consent") && !to_check(rc, "pii_fields"))
		return;
	if (!to_check(rc, "payload") && (d = row_json(&all, "payload")) != (Datum) 0)
		size->payload = json_text_size(d, NULL);
	if (!to_check(rc, "metadata") && (d = row_json(&all, "metadata")) != (Datum) 0)
		size->metadata = json_text_size(d, NULL);
	if (!to_check(rc, "consent") && (d = row_json(&all, "consent")) != (Datum) 0)
		size->consent = json_text_size(d, NULL);
	if (!to_check(rc, "pii_fields") && (d = row_json(&all, "pii_fields")) != (Datum) 0)
		size->pii_fields = pii_fields_text_size(d);
	voutbox_check_event_size(size);
}

/*
 * The row of a dead event must hold what outbox_save() would have accepted
 * and stored: the worker builds its envelope from it.  In an updated row
 * (old is the one it replaces) only the columns that change are checked.
 * (NOT NULL columns are left to the table's constraints.)
 */
void
voutbox_check_event_row(HeapTuple tup, HeapTuple old, TupleDesc desc)
{
	RowCheck	rc = {tup, old, desc};
	bool		isnull;
	Datum		d;
	char	   *trace_id;
	char	   *traceparent;
	char	   *topic;
	const char *detail;
	VoutboxEventSize size = {0};

	(void) row_text(&rc, "tenant_id", VOUTBOX_MAX_NAME_BYTES);
	(void) row_text(&rc, "aggregate_type", VOUTBOX_MAX_NAME_BYTES);
	(void) row_text(&rc, "aggregate_id", VOUTBOX_MAX_KEY_BYTES);
	if (to_check(&rc, "event_type") || to_check(&rc, "event_version"))
	{
		RowCheck	all = {tup, NULL, desc};
		char	   *event_type = row_text(&all, "event_type", VOUTBOX_MAX_NAME_BYTES);

		d = row_value(&rc, "event_version", &isnull);
		if (event_type != NULL && !isnull &&
			voutbox_parse_event_type(event_type) != DatumGetInt32(d))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("event_version %d does not match event_type \"%s\"",
							DatumGetInt32(d), event_type)));
	}
	if ((d = row_json(&rc, "payload")) != (Datum) 0)
		size.payload = voutbox_check_payload(d);
	if ((d = row_json(&rc, "metadata")) != (Datum) 0)
	{
		if (!JB_ROOT_IS_OBJECT(DatumGetJsonbP(d)))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("metadata must be a JSON object")));
		size.metadata = voutbox_check_json(d, "metadata");
	}
	if ((d = row_json(&rc, "consent")) != (Datum) 0)
		size.consent = voutbox_check_json(d, "consent");
	(void) row_text(&rc, "idempotency_key", VOUTBOX_MAX_KEY_BYTES);
	(void) row_text(&rc, "correlation_id", VOUTBOX_MAX_KEY_BYTES);
	(void) row_text(&rc, "producer", VOUTBOX_MAX_NAME_BYTES);
	trace_id = row_text(&rc, "trace_id", VOUTBOX_MAX_NAME_BYTES);
	if (trace_id != NULL && !voutbox_is_trace_id(trace_id))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("trace_id \"%s\" is not a W3C trace id", trace_id)));
	traceparent = row_text(&rc, "traceparent", VOUTBOX_MAX_NAME_BYTES);
	if (traceparent != NULL && !voutbox_traceparent_is_valid(traceparent))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("traceparent \"%s\" is not a W3C traceparent", traceparent)));
	if ((d = row_json(&rc, "pii_fields")) != (Datum) 0)
		size.pii_fields = voutbox_check_pii_fields(d);
	check_row_size(&rc, &size);
	row_timestamp(&rc, "created_at");
	row_timestamp(&rc, "scheduled_for");
	topic = row_text(&rc, "topic", VOUTBOX_TOPIC_MAX_LEN + 1);
	if (topic != NULL && !voutbox_topic_is_valid(topic, &detail))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("topic \"%s\" is not a valid Kafka topic name", topic),
				 errdetail("%s", detail)));
	(void) row_text(&rc, "msg_key", VOUTBOX_MAX_KEY_BYTES);
}
