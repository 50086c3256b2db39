/*-------------------------------------------------------------------------
 *
 * routes.c
 *		Routes: which topic, key, format and headers an event gets, as data.
 *
 * A row of voutbox.routes matches events by tenant and event type, with
 * patterns in which "*" stands for any run of characters (and nothing else
 * is special), and says what they get: a topic template, a key template, an
 * envelope format, static headers, and the settings of the topics it makes
 * (used when the worker creates one, see topics.c).  What a route leaves
 * NULL comes from the settings (voutbox.topic_template, voutbox.key_template,
 * voutbox.format, voutbox.topic_*).  outbox_save() takes the first route
 * that matches, by priority and then by name (byte order), and stores the
 * route's name, format and headers with the event: changing a route never
 * changes events already saved.
 *
 * Routes are changed in ordinary transactions, through the view
 * outbox_routes.  A row trigger checks every new or changed row and who
 * changes it: a route whose topic would be invalid for every event it
 * matches is refused then, not when an event is saved.  Roles that act for
 * every tenant manage every route; a role bound to a tenant manages the
 * routes whose tenant_pattern is that tenant (no "*"), which must keep the
 * tenant's topics under its id ({tenant_id} first) and cannot set topic
 * settings, which size the cluster.
 *
 * Each backend caches the routes, like the tenant bindings (privileges.c):
 * a statement trigger sends a relcache invalidation of the table, so every
 * backend reads them again once a transaction that changed them commits,
 * and this one at its next command.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "catalog/namespace.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "voutbox.h"

/* Columns of voutbox.routes (attribute numbers). */
enum
{
	COL_NAME = 1,
	COL_PRIORITY,
	COL_TENANT_PATTERN,
	COL_EVENT_TYPE_PATTERN,
	COL_TOPIC_TEMPLATE,
	COL_KEY_TEMPLATE,
	COL_FORMAT,
	COL_HEADERS,
	COL_TOPIC_PARTITIONS,
	COL_TOPIC_REPLICATION_FACTOR,
	COL_TOPIC_CONFIG,
	COL_UPDATED_AT,
	NUM_COLS = COL_UPDATED_AT
};

#define ROUTE_NAME_BYTES		63
#define MAX_HEADERS				16
/* librdkafka's limit on a new topic's partitions */
#define MAX_PARTITIONS			100000
/* Routes a tenant's role may have for one tenant. */
#define MAX_TENANT_ROUTES		100
#define MAX_HEADER_VALUE_BYTES	1024
/* Headers that voutbox sets itself in one format or another. */
static const char *const reserved_headers[] = {
	"id", "idempotency_key", "event_type", "tenant_id", "correlation_id",
	"content-type", "traceparent", "tracestate",
	/* tracing, which consumers continue */
	"b3", "uber-trace-id", "baggage", "sw8", "elastic-apm-traceparent"
};

/* Prefixes of headers that consumers act on, or that voutbox sets. */
static const char *const reserved_prefixes[] = {
	"ce_", "ce-",				/* CloudEvents' Kafka and HTTP bindings */
	"__",						/* Spring Kafka's type headers (__TypeId__: the class) */
	"kafka_", "spring_",		/* Spring Kafka's reply topic, correlation, types */
	"x-b3-", "uberctx-"			/* tracing */
};

typedef struct CachedRoute
{
	VoutboxRoute route;
	int32		priority;
} CachedRoute;

static MemoryContext routes_cxt = NULL;
static CachedRoute *routes = NULL;
static int	nroutes = 0;
static bool routes_valid = false;
static uint64 routes_generation = 0;
static Oid	routes_relid = InvalidOid;
static bool callback_registered = false;
/*
 * Who writes routes through outbox_route_set() and outbox_route_drop(),
 * which do it as the extension's owner: the trigger checks this role.
 */
static Oid	route_writer = InvalidOid;

/* Make the routes read in cxt the cache's, freeing the old ones. */
static void
install_routes(MemoryContext cxt, CachedRoute *new_routes, int n, Oid relid)
{
	MemoryContextSetParent(cxt, CacheMemoryContext);
	if (routes_cxt != NULL)
		MemoryContextDelete(routes_cxt);
	routes_cxt = cxt;
	routes = new_routes;
	nroutes = n;
	routes_relid = relid;
}

static void
forget_routes(Datum arg pg_attribute_unused(), Oid relid)
{
	if (relid == InvalidOid || relid == routes_relid)
	{
		routes_valid = false;
		routes_generation++;
	}
}

static char *
text_attr(TupleTableSlot *slot, int att)
{
	bool		isnull;
	Datum		d = slot_getattr(slot, att, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

static int
route_cmp(const void *a, const void *b)
{
	const CachedRoute *x = a;
	const CachedRoute *y = b;

	if (x->priority != y->priority)
		return x->priority < y->priority ? -1 : 1;
	return strcmp(x->route.name, y->route.name);
}

/* A route's topic settings, or NULL if it sets none. */
static VoutboxTopicSettings *
read_topic_settings(TupleTableSlot *slot)
{
	VoutboxTopicSettings ts = {0};
	bool		isnull;
	Datum		d;

	d = slot_getattr(slot, COL_TOPIC_PARTITIONS, &isnull);
	if ((ts.has_partitions = !isnull))
		ts.partitions = DatumGetInt32(d);
	d = slot_getattr(slot, COL_TOPIC_REPLICATION_FACTOR, &isnull);
	if ((ts.has_replication_factor = !isnull))
		ts.replication_factor = DatumGetInt32(d);
	ts.config = text_attr(slot, COL_TOPIC_CONFIG);
	if (!ts.has_partitions && !ts.has_replication_factor && ts.config == NULL)
		return NULL;
	return memcpy(palloc(sizeof(ts)), &ts, sizeof(ts));
}

/*
 * Read voutbox.routes into the cache, if it is not valid.  While the table
 * does not exist (the SQL objects of 0.6.0), there are no routes, and the
 * table is looked for again the next time.  Saves wait for the table's
 * lock; the worker (wait false) does not: while another holds the table
 * locked, it keeps what it read last.
 */
static void
load_routes(bool wait)
{
	uint64		generation = routes_generation;
	Oid			nsp;
	Oid			relid;
	Relation	rel;
	Snapshot	snapshot;
	TableScanDesc scan;
	TupleTableSlot *slot;
	MemoryContext old;
	MemoryContext cxt;
	CachedRoute *new_routes;
	int			n;
	int			capacity = 8;

	if (routes_valid)
		return;
	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(forget_routes, (Datum) 0);
		callback_registered = true;
	}
	nsp = get_namespace_oid(VOUTBOX_SCHEMA, true);
	relid = OidIsValid(nsp) ? get_relname_relid("routes", nsp) : InvalidOid;
	if (OidIsValid(relid))
	{
		if (wait)
			LockRelationOid(relid, AccessShareLock);
		else if (!ConditionalLockRelationOid(relid, AccessShareLock))
			return;
		/* (Dropped meanwhile, with the extension.) */
		if (!SearchSysCacheExists1(RELOID, ObjectIdGetDatum(relid)))
		{
			UnlockRelationOid(relid, AccessShareLock);
			relid = InvalidOid;
		}
	}
	/*
	 * Built in a context of its own, which replaces the old one only once
	 * complete: an ERROR meanwhile leaves the old routes (and frees the new
	 * context with the transaction's).
	 */
	if (!OidIsValid(relid) && !OidIsValid(routes_relid) && nroutes == 0)
		return;
	cxt = AllocSetContextCreate(CurrentMemoryContext, "voutbox routes", ALLOCSET_SMALL_SIZES);
	new_routes = NULL;
	n = 0;
	if (!OidIsValid(relid))
	{
		install_routes(cxt, NULL, 0, InvalidOid);
		return;					/* (stays invalid: looked for again next time) */
	}

	rel = table_open(relid, NoLock);
	snapshot = RegisterSnapshot(GetCatalogSnapshot(relid));
	scan = table_beginscan(rel, snapshot, 0, NULL);
	slot = table_slot_create(rel, NULL);
	old = MemoryContextSwitchTo(cxt);
	new_routes = palloc(sizeof(CachedRoute) * capacity);
	while (table_scan_getnextslot(scan, ForwardScanDirection, slot))
	{
		CachedRoute *c;
		VoutboxRoute *r;
		bool		isnull;
		Datum		d;

		if (n == capacity)
		{
			capacity *= 2;
			new_routes = repalloc(new_routes, sizeof(CachedRoute) * capacity);
		}
		c = &new_routes[n];
		r = &c->route;
		memset(c, 0, sizeof(*c));
		c->priority = DatumGetInt32(slot_getattr(slot, COL_PRIORITY, &isnull));
		r->name = text_attr(slot, COL_NAME);
		r->tenant_pattern = text_attr(slot, COL_TENANT_PATTERN);
		r->event_type_pattern = text_attr(slot, COL_EVENT_TYPE_PATTERN);
		/* (NOT NULL columns; a row without them could not match.) */
		if (r->name == NULL || r->tenant_pattern == NULL || r->event_type_pattern == NULL)
			continue;
		r->topic_template = text_attr(slot, COL_TOPIC_TEMPLATE);
		r->key_template = text_attr(slot, COL_KEY_TEMPLATE);
		r->format_name = text_attr(slot, COL_FORMAT);
		d = slot_getattr(slot, COL_HEADERS, &isnull);
		if (!isnull)
		{
			Jsonb	   *jb = DatumGetJsonbPCopy(d);

			if (JB_ROOT_COUNT(jb) > 0)
				r->headers_jsonb = JsonbPGetDatum(jb);
		}
		r->topic_settings = read_topic_settings(slot);
		n++;
	}
	MemoryContextSwitchTo(old);
	ExecDropSingleTupleTableSlot(slot);
	table_endscan(scan);
	UnregisterSnapshot(snapshot);
	table_close(rel, NoLock);
	qsort(new_routes, n, sizeof(CachedRoute), route_cmp);
	install_routes(cxt, new_routes, n, relid);
	routes_valid = generation == routes_generation;
}

/* Whether s matches the pattern, in which "*" is any run of characters. */
static bool
pattern_matches(const char *pattern, const char *s)
{
	const char *star = NULL;
	const char *retry = NULL;

	while (*s)
	{
		if (*pattern == '*')
		{
			star = pattern++;
			retry = s;
		}
		else if (*pattern == *s)
		{
			pattern++;
			s++;
		}
		else if (star != NULL)
		{
			pattern = star + 1;
			s = ++retry;
		}
		else
			return false;
	}
	while (*pattern == '*')
		pattern++;
	return *pattern == '\0';
}

/* The first route that matches the event, or NULL. */
const VoutboxRoute *
voutbox_route_match(const char *tenant_id, const char *event_type)
{
	load_routes(true);
	for (int i = 0; i < nroutes; i++)
		if (pattern_matches(routes[i].route.tenant_pattern, tenant_id) &&
			pattern_matches(routes[i].route.event_type_pattern, event_type))
			return &routes[i].route;
	return NULL;
}

/* The route of that name, or NULL: for the worker, which does not wait for a lock. */
const VoutboxRoute *
voutbox_route_find(const char *name)
{
	load_routes(false);
	for (int i = 0; i < nroutes; i++)
		if (strcmp(routes[i].route.name, name) == 0)
			return &routes[i].route;
	return NULL;
}

/* ---------------------------------------------------------------------
 * Checking a route
 * ---------------------------------------------------------------------
 */

/*
 * ERROR unless a route's topic template that names the tenant starts like
 * voutbox.topic_template's tenant part: the same literal prefix, then
 * {tenant_id} and the same separator (or nothing).  Else two tenants could
 * render the same topic: tenant "a-b" with "{tenant_id}.x" and tenant "a"
 * with "{tenant_id}-b.x"; or, under "prod.{tenant_id}.{event_type}", tenant
 * "prod" with "{tenant_id}.{event_type}" and event type "acme.x".  Checked
 * when the route is written and when it is used (the setting may have
 * changed since).
 */
void
voutbox_check_route_template(const char *route, const char *tmpl)
{
	int			prefix_len;
	const char *prefix = voutbox_installation_prefix(&prefix_len);
	char		want = voutbox_installation_separator();
	char		sep;

	if (strstr(tmpl, "{tenant_id}") == NULL)
		return;
	if (strncmp(tmpl, prefix, prefix_len) != 0 ||
		strncmp(tmpl + prefix_len, "{tenant_id}", strlen("{tenant_id}")) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("%s could make two tenants share a topic", voutbox_topic_template_desc(route, tmpl)),
				 errdetail("A route's template that names the tenant starts as voutbox.topic_template does: \"%.*s{tenant_id}%c\".",
						   prefix_len, prefix, want),
				 errhint("Start the template with \"%.*s{tenant_id}%c\".", prefix_len, prefix, want)));
	sep = voutbox_tenant_separator(tmpl);
	if (sep != '\0' && sep != want)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("the topic template of route \"%s\" puts \"%c\" after {tenant_id}, but voutbox.topic_template puts \"%c\"",
						route, sep, want),
				 errdetail("Every topic template must end the tenant id with the same character; else two tenants could render the same topic."),
				 errhint("Use \"{tenant_id}%c\" in the route.", want)));
}

/*
 * Whether the role may manage routes of the tenant pattern.  Negative
 * priorities are for roles that act for every tenant: an operator's route
 * with one comes before any tenant's, and no tenant's role changes it.
 */
static bool
manages(Oid role, const char *tenant_pattern, int32 priority)
{
	if (voutbox_acts_for_all(role))
		return true;
	return priority >= 0 && strchr(tenant_pattern, '*') == NULL &&
		voutbox_acts_for(role, tenant_pattern);
}

/* The role a change of routes is checked for. */
static Oid
writer(void)
{
	return OidIsValid(route_writer) ? route_writer : GetUserId();
}

static void
check_manages(const char *name, const char *tenant_pattern, int32 priority)
{
	Oid			role = writer();

	if (!manages(role, tenant_pattern, priority))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to manage route \"%s\" for tenants \"%s\"", name, tenant_pattern),
				 priority < 0 ?
				 errdetail("Routes with a negative priority are managed by roles that act for every tenant.") :
				 errdetail("Role \"%s\" manages only the routes whose tenant_pattern is a tenant it acts for.",
						   GetUserNameFromId(role, false)),
				 strchr(tenant_pattern, '*') != NULL ?
				 errhint("Routes for several tenants (a pattern with \"*\") are managed by voutbox_admin.") : 0));
}

static bool
header_is_reserved(const char *key)
{
	for (size_t i = 0; i < lengthof(reserved_headers); i++)
		if (pg_strcasecmp(key, reserved_headers[i]) == 0)
			return true;
	for (size_t i = 0; i < lengthof(reserved_prefixes); i++)
		if (pg_strncasecmp(key, reserved_prefixes[i], strlen(reserved_prefixes[i])) == 0)
			return true;
	return false;
}

static void
check_headers(const char *name, Jsonb *headers)
{
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	int			n = 0;

	if (!JB_ROOT_IS_OBJECT(headers) || JB_ROOT_IS_SCALAR(headers))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the headers of route \"%s\" must be a JSON object", name),
				 errhint("Write them as {\"name\": \"value\", ...}.")));
	it = JsonbIteratorInit(&headers->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		char	   *key;

		if (tok != WJB_KEY)
			continue;
		key = pnstrdup(v.val.string.val, v.val.string.len);
		if (++n > MAX_HEADERS)
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("route \"%s\" has more than %d headers", name, MAX_HEADERS)));
		if (key[0] == '\0' || strlen(key) > VOUTBOX_MAX_NAME_BYTES)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("header names of route \"%s\" must be 1 to %d bytes long", name,
							VOUTBOX_MAX_NAME_BYTES)));
		voutbox_check_convertible(key, "a header name");
		if (header_is_reserved(key))
			ereport(ERROR,
					(errcode(ERRCODE_RESERVED_NAME),
					 errmsg("header \"%s\" of route \"%s\" is reserved", key, name),
					 errdetail("voutbox sets id, idempotency_key, event_type, tenant_id, correlation_id, content-type, traceparent and the ce_ headers itself, depending on the format; consumers act on tracing headers (tracestate, b3, x-b3-*, uber-trace-id, uberctx-*, baggage, sw8, elastic-apm-traceparent) and on Spring Kafka's (__*, kafka_*, spring_*)."),
					 errhint("Choose another name, for example one beginning with \"x-\".")));
		tok = JsonbIteratorNext(&it, &v, true);
		if (tok != WJB_VALUE || v.type != jbvString)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("header \"%s\" of route \"%s\" must have a string value", key, name)));
		if (v.val.string.len > MAX_HEADER_VALUE_BYTES)
			ereport(ERROR,
					(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
					 errmsg("header \"%s\" of route \"%s\" is longer than %d bytes", key, name,
							MAX_HEADER_VALUE_BYTES)));
		voutbox_check_convertible(pnstrdup(v.val.string.val, v.val.string.len), "a header value");
	}
}

/*
 * The topic template of a route: a valid template, whose literal parts and
 * the route's literal patterns make a valid topic, that keeps tenants apart
 * like voutbox.topic_template; a role that does not act for every tenant
 * must put the tenant's topics under its id.
 */
static void
check_topic_template(const char *name, const char *tmpl, const char *tenant_pattern,
					 const char *event_type_pattern, bool may_share)
{
	const char *detail;
	bool		literal_tenant = strchr(tenant_pattern, '*') == NULL;
	bool		literal_type = strchr(event_type_pattern, '*') == NULL;
	VoutboxRouteFields sample = {
		literal_tenant ? tenant_pattern : "t", "a", "i",
		literal_type ? event_type_pattern : "e", 1
	};
	char	   *topic;
	char	   *source = voutbox_topic_template_desc(name, tmpl);

	voutbox_check_text(tmpl, "topic_template", VOUTBOX_MAX_NAME_BYTES, "Use NULL for voutbox.topic_template.");
	if (!voutbox_template_is_valid(tmpl, &detail))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s is not a valid template", source),
				 errdetail("%s", detail)));
	if (strstr(tmpl, "{tenant_id}") == NULL)
	{
		int			prefix_len;
		const char *prefix = voutbox_installation_prefix(&prefix_len);

		if (!may_share)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("%s does not put the topics under the tenant id", source),
					 errdetail("A tenant's route must start its topics with {tenant_id}: topics without it can be any tenant's."),
					 errhint("Start the template with \"%.*s{tenant_id}%c\".", prefix_len, prefix,
							 voutbox_installation_separator())));
	}
	else if (!voutbox_topic_template_separates_tenants(tmpl, &detail))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("%s could make two tenants share a topic", source),
				 errdetail("%s", detail)));
	voutbox_check_route_template(name, tmpl);
	if (literal_tenant)
		voutbox_check_tenant_in_topic(tenant_pattern, tmpl, name);
	topic = voutbox_render_template(tmpl, &sample);
	if (!voutbox_topic_is_valid(topic, &detail))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("route \"%s\" renders the topic \"%s\", which is not a valid Kafka topic name", name, topic),
				 errdetail("%s", detail),
				 errhint("Placeholders the patterns leave open were rendered as one letter.")));
}

static void
check_topic_settings(const char *name, TupleTableSlot *slot, bool may_set)
{
	VoutboxTopicSettings *ts = read_topic_settings(slot);
	char	   *detail;

	if (ts == NULL)
		return;
	if (!may_set)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to set the topic settings of route \"%s\"", name),
				 errdetail("topic_partitions, topic_replication_factor and topic_config size the Kafka cluster and decide how long events stay in it; superusers set them, as they set voutbox.topic_config."),
				 errhint("Leave them NULL to use voutbox.topic_partitions, voutbox.topic_replication_factor and voutbox.topic_config.")));
	if (ts->has_partitions && (ts->partitions < 1 || ts->partitions > MAX_PARTITIONS))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("topic_partitions of route \"%s\" must be between 1 and %d", name, MAX_PARTITIONS),
				 errhint("Use NULL for voutbox.topic_partitions.")));
	if (ts->has_replication_factor &&
		(ts->replication_factor == 0 || ts->replication_factor < -1 || ts->replication_factor > PG_INT16_MAX))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("topic_replication_factor of route \"%s\" must be -1 (the broker's default) or between 1 and %d",
						name, PG_INT16_MAX)));
	if (ts->config != NULL && !voutbox_topic_config_is_valid(ts->config, &detail))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("topic_config of route \"%s\" is not valid", name),
				 errdetail("%s", detail),
				 errhint("Write name=value pairs separated by \";\", as in \"retention.ms=86400000; cleanup.policy=delete\".")));
}

/*
 * Whether a route is an operator's own: it has topic settings or a topic
 * template without {tenant_id} (a shared topic), which a tenant's role
 * cannot set, and so cannot change or drop either.
 */
static bool
operators_route(TupleTableSlot *slot)
{
	char	   *tmpl = text_attr(slot, COL_TOPIC_TEMPLATE);

	return read_topic_settings(slot) != NULL ||
		(tmpl != NULL && strstr(tmpl, "{tenant_id}") == NULL);
}

/*
 * How many other routes than "name" the tenant pattern has (committed, and
 * this transaction's before this statement).
 */
static int
tenant_routes(const char *tenant_pattern, const char *name)
{
	int			n = 0;

	load_routes(true);
	for (int i = 0; i < nroutes; i++)
		n += strcmp(routes[i].route.tenant_pattern, tenant_pattern) == 0 &&
			strcmp(routes[i].route.name, name) != 0;
	return n;
}

/*
 * A new or changed route (old is the row it replaces, or NULL), as the
 * current user writes it.  What only a role that acts for every tenant (or
 * a superuser) may set: a shared topic (a template without {tenant_id}),
 * topic settings.  (The trigger has refused a tenant's role a change of such
 * a route already.)
 */
static void
check_route(HeapTuple tup, HeapTuple old, TupleDesc desc)
{
	TupleTableSlot *slot = MakeSingleTupleTableSlot(desc, &TTSOpsHeapTuple);
	char	   *name;
	char	   *tenant_pattern;
	char	   *event_type_pattern;
	char	   *tmpl;
	char	   *format;
	bool		isnull;
	Datum		d;
	bool		admin = voutbox_acts_for_all(writer());

	/*
	 * What a route matches and where it sends are one: a change of either
	 * counts as a change of the template and of the topic settings.
	 */
	bool		template_changed = old == NULL ||
		voutbox_column_changed(old, tup, desc, "topic_template") ||
		voutbox_column_changed(old, tup, desc, "tenant_pattern") ||
		voutbox_column_changed(old, tup, desc, "event_type_pattern");
	bool		settings_changed = template_changed ||
		voutbox_column_changed(old, tup, desc, "topic_partitions") ||
		voutbox_column_changed(old, tup, desc, "topic_replication_factor") ||
		voutbox_column_changed(old, tup, desc, "topic_config");
	int32		priority;

	ExecStoreHeapTuple(tup, slot, false);
	if ((name = text_attr(slot, COL_NAME)) == NULL ||
		(tenant_pattern = text_attr(slot, COL_TENANT_PATTERN)) == NULL ||
		(event_type_pattern = text_attr(slot, COL_EVENT_TYPE_PATTERN)) == NULL)
	{
		ExecDropSingleTupleTableSlot(slot);
		return;					/* the NOT NULL constraints say it */
	}
	voutbox_check_text(name, "name", ROUTE_NAME_BYTES, NULL);
	voutbox_check_text(tenant_pattern, "tenant_pattern", VOUTBOX_MAX_NAME_BYTES,
					   "Use \"*\" for every tenant.");
	voutbox_check_text(event_type_pattern, "event_type_pattern", VOUTBOX_MAX_NAME_BYTES,
					   "Use \"*\" for every event type.");
	priority = DatumGetInt32(slot_getattr(slot, COL_PRIORITY, &isnull));
	check_manages(name, tenant_pattern, isnull ? 0 : priority);
	if (!admin && old == NULL && tenant_routes(tenant_pattern, name) >= MAX_TENANT_ROUTES)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("tenant \"%s\" has %d routes already", tenant_pattern, MAX_TENANT_ROUTES),
				 errdetail("Every session reads every route; a tenant's roles may keep at most %d.",
						   MAX_TENANT_ROUTES),
				 errhint("Match more event types with one route (\"*\" in event_type_pattern).")));
	if ((tmpl = text_attr(slot, COL_TOPIC_TEMPLATE)) != NULL)
		check_topic_template(name, tmpl, tenant_pattern, event_type_pattern,
							 admin || !template_changed);
	if ((tmpl = text_attr(slot, COL_KEY_TEMPLATE)) != NULL)
	{
		const char *detail;

		voutbox_check_length(tmpl, "key_template", VOUTBOX_MAX_KEY_BYTES);
		voutbox_check_convertible(tmpl, "key_template");
		if (!voutbox_template_is_valid(tmpl, &detail))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("the key template \"%s\" of route \"%s\" is not a valid template", tmpl, name),
					 errdetail("%s", detail),
					 errhint("An empty key_template sends events without a key.")));
	}
	if ((format = text_attr(slot, COL_FORMAT)) != NULL && voutbox_format_lookup(format) < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("route \"%s\" names an unknown format \"%s\"", name, format),
				 errhint("The formats are %s; NULL uses voutbox.format.", voutbox_format_names())));
	d = slot_getattr(slot, COL_HEADERS, &isnull);
	if (!isnull)
		check_headers(name, DatumGetJsonbP(d));
	check_topic_settings(name, slot, superuser_arg(writer()) || !settings_changed);
	ExecDropSingleTupleTableSlot(slot);
}

PG_FUNCTION_INFO_V1(voutbox_route_check);

/*
 * BEFORE INSERT OR UPDATE OR DELETE row trigger on voutbox.routes: the
 * current user must manage the route before and after the change, and the
 * new row must be a valid route; its updated_at is set.
 */
Datum
voutbox_route_check(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	TupleDesc	desc;
	HeapTuple	tup;
	Datum		now;
	bool		isnull = false;
	int			col = COL_UPDATED_AT;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_FOR_ROW(td->tg_event) ||
		!TRIGGER_FIRED_BEFORE(td->tg_event) ||
		strcmp(RelationGetRelationName(td->tg_relation), "routes") != 0 ||
		strcmp(get_namespace_name(RelationGetNamespace(td->tg_relation)), VOUTBOX_SCHEMA) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("voutbox_route_check() is a BEFORE row trigger of voutbox.routes only")));
	desc = RelationGetDescr(td->tg_relation);
	if (desc->natts != NUM_COLS)
		elog(ERROR, "voutbox_route_check: voutbox.routes has %d columns, not %d", desc->natts, NUM_COLS);
	if (!TRIGGER_FIRED_BY_INSERT(td->tg_event))
	{
		TupleTableSlot *slot = MakeSingleTupleTableSlot(desc, &TTSOpsHeapTuple);
		bool		isnull;
		Datum		priority;
		char	   *name;

		ExecStoreHeapTuple(td->tg_trigtuple, slot, false);
		priority = slot_getattr(slot, COL_PRIORITY, &isnull);
		name = text_attr(slot, COL_NAME);
		check_manages(name, text_attr(slot, COL_TENANT_PATTERN), isnull ? 0 : DatumGetInt32(priority));
		if (operators_route(slot) && !voutbox_acts_for_all(writer()))
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("permission denied to change route \"%s\"", name),
					 errdetail("It has topic settings or a shared topic (a topic template without {tenant_id}): roles that act for every tenant change it.")));
		ExecDropSingleTupleTableSlot(slot);
		if (TRIGGER_FIRED_BY_DELETE(td->tg_event))
			return PointerGetDatum(td->tg_trigtuple);
	}
	tup = TRIGGER_FIRED_BY_UPDATE(td->tg_event) ? td->tg_newtuple : td->tg_trigtuple;
	check_route(tup, TRIGGER_FIRED_BY_UPDATE(td->tg_event) ? td->tg_trigtuple : NULL, desc);
	now = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	return PointerGetDatum(heap_modify_tuple_by_cols(tup, desc, 1, &col, &now, &isnull));
}

PG_FUNCTION_INFO_V1(voutbox_sql_manages_routes);

/* voutbox.manages_routes(tenant_pattern text): for the current user. */
Datum
voutbox_sql_manages_routes(PG_FUNCTION_ARGS)
{
	char	   *tenant_pattern = text_to_cstring(PG_GETARG_TEXT_PP(0));

	PG_RETURN_BOOL(manages(GetUserId(), tenant_pattern, 0));
}

/* ---------------------------------------------------------------------
 * outbox_route_set(), outbox_route_drop(): routes for roles that should
 * not hold more than SELECT on outbox_routes (any other privilege on a
 * view lets its holder LOCK it, and the table under it with it, which would
 * stall every save that reads the routes).
 * ---------------------------------------------------------------------
 */

/* Run sql as the extension's owner, checked by the trigger for the caller. */
static uint64
write_routes(FunctionCallInfo fcinfo, const char *sql, int nargs, Oid *types, Datum *values,
			 char *nulls, int expected)
{
	Oid			save_user;
	int			save_sec;
	Oid			prev_writer = route_writer;
	uint64		n;

	voutbox_become_owner(fcinfo, &save_user, &save_sec);
	route_writer = save_user;
	PG_TRY();
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "voutbox: SPI_connect failed");
		if (SPI_execute_with_args(sql, nargs, types, values, nulls, false, 0) != expected)
			elog(ERROR, "voutbox: \"%s\" failed", sql);
		n = SPI_processed;
		SPI_finish();
	}
	PG_FINALLY();
	{
		route_writer = prev_writer;
	}
	PG_END_TRY();
	voutbox_restore_user(save_user, save_sec);
	return n;
}

PG_FUNCTION_INFO_V1(voutbox_outbox_route_set);

/*
 * outbox_route_set(name, tenant_pattern, event_type_pattern, topic_template,
 * key_template, format, headers, priority): adds the route or replaces
 * these columns of it; its topic settings stay as they are.
 */
Datum
voutbox_outbox_route_set(PG_FUNCTION_ARGS)
{
	Oid			types[8] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, JSONBOID, INT4OID};
	Datum		values[8];
	char		nulls[8];

	for (int i = 0; i < 8; i++)
	{
		values[i] = PG_ARGISNULL(i) ? (Datum) 0 : PG_GETARG_DATUM(i);
		nulls[i] = PG_ARGISNULL(i) ? 'n' : ' ';
	}
	(void) write_routes(fcinfo,
						"INSERT INTO " VOUTBOX_SCHEMA ".routes AS r (name, tenant_pattern, "
						"  event_type_pattern, topic_template, key_template, format, headers, priority) "
						"VALUES ($1, $2, coalesce($3, '*'), $4, $5, $6, "
						"        coalesce($7, '{}'::pg_catalog.jsonb), coalesce($8, 100)) "
						"ON CONFLICT (name) DO UPDATE SET tenant_pattern = excluded.tenant_pattern, "
						"  event_type_pattern = excluded.event_type_pattern, "
						"  topic_template = excluded.topic_template, key_template = excluded.key_template, "
						"  format = excluded.format, headers = excluded.headers, priority = excluded.priority",
						8, types, values, nulls, SPI_OK_INSERT);
	PG_RETURN_VOID();
}

PG_FUNCTION_INFO_V1(voutbox_outbox_route_drop);

/* outbox_route_drop(name): whether there was such a route. */
Datum
voutbox_outbox_route_drop(PG_FUNCTION_ARGS)
{
	Oid			type = TEXTOID;
	Datum		value = PG_GETARG_DATUM(0);

	PG_RETURN_BOOL(write_routes(fcinfo, "DELETE FROM " VOUTBOX_SCHEMA ".routes "
								"WHERE name OPERATOR(pg_catalog.=) $1",
								1, &type, &value, NULL, SPI_OK_DELETE) > 0);
}
