/*-------------------------------------------------------------------------
 *
 * envelope.c
 *		The JSON envelope of an event, built with json-c.
 *
 * The envelope is the one place that knows the field names consumers read
 * (README, "What lands in Kafka").  JSON values the application saved
 * (payload, metadata, consent) are embedded as PostgreSQL printed them, not
 * parsed and re-printed: json-c would turn numbers such as 0.1 or 2^70 into
 * doubles and print them back differently.  A json-c object with a custom
 * serializer writes such a value verbatim.
 *
 * The other formats (voutbox.format) are built here too: CloudEvents 1.0 in
 * structured mode (the event in the JSON event format) and, for the binary
 * mode and Debezium's, the payload alone as the value (producer.c adds
 * their headers).
 *
 * Called on the worker's own thread only; json-c allocates with malloc, and
 * the caller releases the tree with json_object_put().
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <json-c/json.h>

#include "lib/stringinfo.h"
#include "utils/datetime.h"
#include "utils/timestamp.h"

#include "voutbox.h"

static int
raw_json_serialize(struct json_object *jso, struct printbuf *pb,
				   int level pg_attribute_unused(), int flags pg_attribute_unused())
{
	const char *text = json_object_get_userdata(jso);

	return printbuf_memappend(pb, text, strlen(text));
}

static void
raw_json_free(struct json_object *jso pg_attribute_unused(), void *userdata)
{
	free(userdata);
}

/* A json-c value that serializes as the given JSON text; NULL gives null. */
static struct json_object *
json_raw(const char *text)
{
	struct json_object *jso;
	char	   *copy;

	if (text == NULL)
		return NULL;
	copy = strdup(text);
	if (copy == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	jso = json_object_new_object();
	json_object_set_serializer(jso, raw_json_serialize, copy, raw_json_free);
	return jso;
}

/* A JSON string, or null for a NULL pointer. */
static struct json_object *
json_string_or_null(const char *s)
{
	return s ? json_object_new_string(s) : NULL;
}

/*
 * RFC 3339 in UTC with microseconds: 2026-11-28T10:16:36.123456Z.  (Events
 * are saved with finite timestamps; should one not be, it is written as
 * PostgreSQL would, rather than stop the worker with an ERROR.)
 */
void
voutbox_format_timestamp(TimestampTz ts, char *buf, size_t len)
{
	struct pg_tm tm;
	fsec_t		fsec;

	if (TIMESTAMP_NOT_FINITE(ts) || timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) != 0)
	{
		strlcpy(buf, TIMESTAMP_IS_NOBEGIN(ts) ? "-infinity" : "infinity", len);
		return;
	}
	snprintf(buf, len, "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ",
			 tm.tm_year, tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
			 (int) fsec);
}

static struct json_object *
privacy_new(const VoutboxEvent *ev)
{
	struct json_object *privacy = json_object_new_object();
	struct json_object *fields = json_object_new_array();

	for (int i = 0; i < ev->n_pii_fields; i++)
		json_object_array_add(fields, json_object_new_string(ev->pii_fields[i]));
	json_object_object_add(privacy, "pii", json_object_new_boolean(ev->pii));
	json_object_object_add(privacy, "fields", fields);
	json_object_object_add(privacy, "consent", json_raw(ev->consent));
	return privacy;
}

struct json_object *
voutbox_envelope_new(const VoutboxEvent *ev)
{
	struct json_object *env = json_object_new_object();
	char		occurred_at[64];

	voutbox_format_timestamp(ev->created_at, occurred_at, sizeof(occurred_at));

	json_object_object_add(env, "id", json_object_new_string(ev->id));
	json_object_object_add(env, "event", json_object_new_string(ev->event_type));
	json_object_object_add(env, "schema_version", json_object_new_int(ev->event_version));
	json_object_object_add(env, "idempotency_key", json_object_new_string(ev->idempotency_key));
	json_object_object_add(env, "trace_id", json_string_or_null(ev->trace_id));
	json_object_object_add(env, "correlation_id", json_object_new_string(ev->correlation_id));
	json_object_object_add(env, "tenant_id", json_object_new_string(ev->tenant_id_utf8));
	json_object_object_add(env, "aggregate_type", json_object_new_string(ev->aggregate_type));
	json_object_object_add(env, "aggregate_id", json_object_new_string(ev->aggregate_id));
	json_object_object_add(env, "occurred_at", json_object_new_string(occurred_at));
	json_object_object_add(env, "producer", json_string_or_null(ev->producer));
	json_object_object_add(env, "privacy", privacy_new(ev));
	json_object_object_add(env, "payload", json_raw(ev->payload));
	json_object_object_add(env, "metadata", json_raw(ev->metadata));
	return env;
}

/*
 * The CloudEvents "source": a URI-reference naming the context in which the
 * event happened, /voutbox/<tenant>/<aggregate type>, each segment
 * percent-encoded (RFC 3986: only unreserved characters stay).  With the
 * event id, it is unique per event, as the specification requires.
 */
char *
voutbox_ce_source(const VoutboxEvent *ev)
{
	StringInfoData buf;
	const char *segments[2] = {ev->tenant_id_utf8, ev->aggregate_type};

	initStringInfo(&buf);
	appendStringInfoString(&buf, "/voutbox");
	for (int i = 0; i < 2; i++)
	{
		appendStringInfoChar(&buf, '/');
		for (const unsigned char *c = (const unsigned char *) segments[i]; *c; c++)
		{
			if ((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
				*c == '-' || *c == '.' || *c == '_' || *c == '~')
				appendStringInfoChar(&buf, (char) *c);
			else
				appendStringInfo(&buf, "%%%02X", *c);
		}
	}
	return buf.data;
}

/*
 * A CloudEvent in the JSON event format (structured mode): the required
 * attributes, the optional ones voutbox knows (subject: the aggregate id;
 * time: when the event was saved), the extensions traceparent (Distributed
 * Tracing), partitionkey (Partitioning: the message key) and voutbox's own
 * (tenantid, correlationid, idempotencykey), and the payload as "data".
 */
static struct json_object *
cloudevent_new(const VoutboxEvent *ev)
{
	struct json_object *ce = json_object_new_object();
	char		time[64];

	voutbox_format_timestamp(ev->created_at, time, sizeof(time));
	json_object_object_add(ce, "specversion", json_object_new_string("1.0"));
	json_object_object_add(ce, "id", json_object_new_string(ev->id));
	json_object_object_add(ce, "source", json_object_new_string(voutbox_ce_source(ev)));
	json_object_object_add(ce, "type", json_object_new_string(ev->event_type));
	json_object_object_add(ce, "subject", json_object_new_string(ev->aggregate_id));
	json_object_object_add(ce, "time", json_object_new_string(time));
	json_object_object_add(ce, "datacontenttype", json_object_new_string("application/json"));
	if (ev->traceparent != NULL)
		json_object_object_add(ce, "traceparent", json_object_new_string(ev->traceparent));
	if (ev->msg_key_utf8 != NULL && ev->msg_key_utf8[0] != '\0')
		json_object_object_add(ce, "partitionkey", json_object_new_string(ev->msg_key_utf8));
	json_object_object_add(ce, "tenantid", json_object_new_string(ev->tenant_id_utf8));
	json_object_object_add(ce, "correlationid", json_object_new_string(ev->correlation_id));
	json_object_object_add(ce, "idempotencykey", json_object_new_string(ev->idempotency_key));
	json_object_object_add(ce, "data", json_raw(ev->payload));
	return ce;
}

/* The message value of an event in the given format. */
struct json_object *
voutbox_value_new(const VoutboxEvent *ev, VoutboxFormat format)
{
	switch (format)
	{
		case VOUTBOX_FORMAT_CLOUDEVENTS:
			return cloudevent_new(ev);
		case VOUTBOX_FORMAT_CLOUDEVENTS_BINARY:
		case VOUTBOX_FORMAT_DEBEZIUM:
			/* the payload as saved (outbox_save() requires one) */
			return json_raw(ev->payload ? ev->payload : "null");
		case VOUTBOX_FORMAT_VOUTBOX:
			break;
	}
	return voutbox_envelope_new(ev);
}

/* ---------------------------------------------------------------------
 * exactly_once's checkpoint records (eos.c)
 * ---------------------------------------------------------------------
 */

/* The checkpoint record of a settle, JSON. */
char *
voutbox_checkpoint_value(const char *gid, int nevents)
{
	struct json_object *o = json_object_new_object();
	char		ts[64];
	char	   *value;

	voutbox_format_timestamp(GetCurrentTimestamp(), ts, sizeof(ts));
	json_object_object_add(o, "gid", json_object_new_string(gid));
	json_object_object_add(o, "database", json_object_new_string(voutbox_worker_dbname));
	json_object_object_add(o, "events", json_object_new_int(nevents));
	json_object_object_add(o, "committed_at", json_object_new_string(ts));
	value = pstrdup(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN));
	json_object_put(o);
	return value;
}

/* The gid a checkpoint record names, or NULL. */
char *
voutbox_checkpoint_gid(const char *value)
{
	struct json_object *o = json_tokener_parse(value);
	struct json_object *gid;
	char	   *result = NULL;

	if (o == NULL)
		return NULL;
	if (json_object_object_get_ex(o, "gid", &gid) && json_object_is_type(gid, json_type_string))
		result = pstrdup(json_object_get_string(gid));
	json_object_put(o);
	return result;
}
