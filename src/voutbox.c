/*-------------------------------------------------------------------------
 *
 * voutbox.c
 *		Module entry point: GUCs, shared memory, worker registration.
 *
 * When loaded through shared_preload_libraries, _PG_init defines the
 * postmaster-level GUCs, requests a little shared memory and registers the
 * launcher, a static background worker that starts a delivery worker for
 * each database listed in voutbox.database (worker.c).  When loaded by a backend that merely calls
 * outbox_save(), only the GUCs are defined: events are still stored, and the
 * worker of a preloading server picks them up.
 *
 * Shared state (VoutboxShared, a slot per served database) is protected by
 * its spinlock; see voutbox.h.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "lib/stringinfo.h"
#include "utils/guc.h"
#include "utils/memutils.h"

#include "utils/varlena.h"

#include "voutbox.h"

PG_MODULE_MAGIC;

char	   *voutbox_database = NULL;
char	   *voutbox_standby_names = NULL;
char	   *voutbox_brokers = NULL;
char	   *voutbox_topic_template = NULL;
char	   *voutbox_key_template = NULL;
int			voutbox_batch_size = 10000;
int			voutbox_batch_bytes = 8 * 1024 * 1024;
int			voutbox_poll_interval = 1000;
int			voutbox_max_retries = 10;
int			voutbox_backoff_base = 1000;
int			voutbox_backoff_max = 300000;
int			voutbox_retention = 7 * 24 * 3600;
int			voutbox_dlq_retention = 30 * 24 * 3600;
int			voutbox_cleanup_interval = 60000;
char	   *voutbox_producer = NULL;
int			voutbox_max_payload_bytes = 512 * 1024;
char	   *voutbox_traceparent = NULL;
char	   *voutbox_kafka_properties = NULL;
char	   *voutbox_kafka_secrets_file = NULL;
int			voutbox_delivery_timeout = 60000;
int			voutbox_stats_max_topics = 1000;
bool		voutbox_create_topics = false;
int			voutbox_format = VOUTBOX_FORMAT_VOUTBOX;
int			voutbox_delivery = VOUTBOX_AT_LEAST_ONCE;
char	   *voutbox_checkpoint_topic_prefix = NULL;
bool		voutbox_fault_injection = false;

static const struct config_enum_entry delivery_options[] = {
	{"at_least_once", VOUTBOX_AT_LEAST_ONCE, false},
	{"exactly_once", VOUTBOX_EXACTLY_ONCE, false},
	{NULL, 0, false}
};

static const struct config_enum_entry format_options[] = {
	{"voutbox", VOUTBOX_FORMAT_VOUTBOX, false},
	{"cloudevents", VOUTBOX_FORMAT_CLOUDEVENTS, false},
	{"cloudevents_binary", VOUTBOX_FORMAT_CLOUDEVENTS_BINARY, false},
	{"debezium", VOUTBOX_FORMAT_DEBEZIUM, false},
	{NULL, 0, false}
};

/* The format of that name (routes name formats like the setting), or -1. */
int
voutbox_format_lookup(const char *name)
{
	for (int i = 0; format_options[i].name != NULL; i++)
		if (strcmp(format_options[i].name, name) == 0)
			return format_options[i].val;
	return -1;
}

/* The names of the formats, for messages. */
char *
voutbox_format_names(void)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (int i = 0; format_options[i].name != NULL; i++)
		appendStringInfo(&buf, "%s%s", i > 0 ? ", " : "", format_options[i].name);
	return buf.data;
}

int			voutbox_topic_partitions = -1;
int			voutbox_topic_replication_factor = -1;
char	   *voutbox_topic_config = NULL;

VoutboxShared *voutbox_shared = NULL;
VoutboxWorkerSlot *voutbox_my_slot = NULL;
char		voutbox_worker_dbname[NAMEDATALEN];

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

void		_PG_init(void);

static bool
check_template(char **newval, void **extra pg_attribute_unused(), GucSource source pg_attribute_unused())
{
	const char *detail;

	if (!voutbox_template_is_valid(*newval, &detail))
	{
		GUC_check_errdetail("%s", detail);
		return false;
	}
	return true;
}

static bool
check_traceparent(char **newval, void **extra pg_attribute_unused(), GucSource source pg_attribute_unused())
{
	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	if (!voutbox_traceparent_is_valid(*newval))
	{
		GUC_check_errdetail("A W3C traceparent has the form 00-<32 hex digits>-<16 hex digits>-<2 hex digits>, with a trace id and a parent id that are not all zeros.");
		return false;
	}
	return true;
}

/* Like outbox_save()'s producer argument; its encoding is checked at save. */
static bool
check_producer(char **newval, void **extra pg_attribute_unused(), GucSource source pg_attribute_unused())
{
	if (*newval != NULL && strlen(*newval) > VOUTBOX_MAX_NAME_BYTES)
	{
		GUC_check_errdetail("voutbox.producer must not be longer than %d bytes.", VOUTBOX_MAX_NAME_BYTES);
		return false;
	}
	return true;
}

/*
 * The message names the property at fault, never the setting's value:
 * PostgreSQL's own would quote it whole, and a secret may be in it.
 */
static bool
check_kafka_properties(char **newval, void **extra pg_attribute_unused(), GucSource source pg_attribute_unused())
{
	char	   *detail = NULL;
	char	   *hint = NULL;

	if (voutbox_kafka_properties_are_valid(*newval, &detail, &hint))
		return true;
	GUC_check_errmsg("invalid value for parameter \"voutbox.kafka_properties\"");
	GUC_check_errdetail("%s", detail);
	if (hint)
		GUC_check_errhint("%s", hint);
	return false;
}

/*
 * The database names of a voutbox.database value, as a List of palloc'd
 * strings: names separated by commas, blanks around them ignored, a name
 * with commas, blanks or double quotes written in double quotes (a double
 * quote doubled inside).  Names are taken as they are, without folding to
 * lower case, as a single name always was.  NIL with *detail set if the
 * value is malformed.
 */
List *
voutbox_database_list(const char *value, char **detail)
{
	List	   *names = NIL;
	const char *p = value ? value : "";

	*detail = NULL;
	for (;;)
	{
		StringInfoData name;
		ListCell   *lc;

		while (*p == ' ' || *p == '\t')
			p++;
		if (*p == '\0' && names == NIL)
			return NIL;			/* empty: no database */
		initStringInfo(&name);
		if (*p == '"')
		{
			for (p++;; p++)
			{
				if (*p == '\0')
				{
					*detail = psprintf("A quoted database name is not closed.");
					return NIL;
				}
				if (*p == '"')
				{
					if (p[1] != '"')
						break;
					p++;
				}
				appendStringInfoChar(&name, *p);
			}
			p++;
			while (*p == ' ' || *p == '\t')
				p++;
		}
		else
		{
			while (*p != '\0' && *p != ',' && *p != '"')
				appendStringInfoChar(&name, *p++);
			while (name.len > 0 && (name.data[name.len - 1] == ' ' || name.data[name.len - 1] == '\t'))
				name.data[--name.len] = '\0';
		}
		if (name.len == 0)
		{
			*detail = psprintf("The list has an empty database name.");
			return NIL;
		}
		if (name.len >= NAMEDATALEN)
		{
			*detail = psprintf("Database names are at most %d bytes long.", NAMEDATALEN - 1);
			return NIL;
		}
		foreach(lc, names)
		{
			if (strcmp(lfirst(lc), name.data) == 0)
			{
				*detail = psprintf("Database \"%s\" is listed twice.", name.data);
				return NIL;
			}
		}
		names = lappend(names, name.data);
		if (*p == '\0')
			return names;
		if (*p != ',')
		{
			*detail = psprintf("Database names are separated by commas.");
			return NIL;
		}
		p++;
	}
}

static bool
check_database(char **newval, void **extra pg_attribute_unused(), GucSource source pg_attribute_unused())
{
	MemoryContext cxt;
	MemoryContext old;
	char	   *detail;
	bool		ok;

	cxt = AllocSetContextCreate(CurrentMemoryContext, "voutbox.database check",
								ALLOCSET_SMALL_SIZES);
	old = MemoryContextSwitchTo(cxt);
	(void) voutbox_database_list(*newval, &detail);
	ok = detail == NULL;
	if (!ok)
		GUC_check_errdetail("%s", detail);
	MemoryContextSwitchTo(old);
	MemoryContextDelete(cxt);
	return ok;
}

/* A list of names, as synchronous_standby_names' list of standbys. */
static bool
check_standby_names(char **newval, void **extra pg_attribute_unused(), GucSource source pg_attribute_unused())
{
	char	   *copy = pstrdup(*newval);
	List	   *names = NIL;
	bool		ok = SplitIdentifierString(copy, ',', &names);

	if (!ok)
		GUC_check_errdetail("List syntax is invalid: give application_name values of standbys, separated by commas.");
	else
	{
		ListCell   *lc;

		foreach(lc, names)
			if (strcmp((char *) lfirst(lc), "*") == 0)
			{
				GUC_check_errdetail("\"*\" is not a standby's name: name each standby a failover may promote.");
				ok = false;
			}
	}
	list_free(names);
	pfree(copy);
	return ok;
}

static bool
check_topic_config(char **newval, void **extra pg_attribute_unused(), GucSource source pg_attribute_unused())
{
	char	   *detail;

	if (voutbox_topic_config_is_valid(*newval, &detail))
		return true;
	GUC_check_errdetail("%s", detail);
	return false;
}

/* Partitions, replication factor: -1 (the broker's default) or at least 1. */
static bool
check_topic_count(int *newval, void **extra pg_attribute_unused(), GucSource source pg_attribute_unused())
{
	if (*newval != 0)
		return true;
	GUC_check_errdetail("A topic has at least one; -1 takes the broker's default.");
	return false;
}

/* The checkpoint topic: a valid Kafka topic name. */
static bool
check_checkpoint_topic(char **newval, void **extra pg_attribute_unused(), GucSource source pg_attribute_unused())
{
	const char *detail;

	if (*newval != NULL && strlen(*newval) <= VOUTBOX_TOPIC_MAX_LEN - 40 &&
		voutbox_topic_is_valid(*newval, &detail))
		return true;
	GUC_check_errdetail("%s", *newval == NULL ? "A topic name is needed." :
						strlen(*newval) > VOUTBOX_TOPIC_MAX_LEN - 40 ?
						"The prefix leaves no room for \".<system identifier>.<database OID>\"." : detail);
	return false;
}

static void
define_gucs(void)
{
	/* PostgreSQL allows postmaster-level custom GUCs only while preloading. */
	if (process_shared_preload_libraries_in_progress)
	{
		DefineCustomIntVariable("voutbox.stats_max_topics",
								"How many tenant and topic pairs the statistics count separately.",
								"Further pairs are counted together under the topic \"(other)\".",
								&voutbox_stats_max_topics, 1000, 1, 1000000,
								PGC_POSTMASTER, 0, NULL, NULL, NULL);
	}
	DefineCustomStringVariable("voutbox.database",
							   "Databases whose outbox voutbox delivers: one worker each (comma-separated names).",
							   "Empty: no worker runs.",
							   &voutbox_database, "",
							   PGC_SIGHUP, 0, check_database, NULL, NULL);
	DefineCustomStringVariable("voutbox.standby_names",
							   "Standbys (application_name, comma-separated) that must have flushed a commit before its events are delivered.",
							   "Empty: a commit's events go once it is flushed locally.  For asynchronous standbys; synchronous replication needs none.",
							   &voutbox_standby_names, "",
							   PGC_SIGHUP, GUC_LIST_INPUT, check_standby_names, NULL, NULL);
	DefineCustomStringVariable("voutbox.brokers",
							   "Kafka bootstrap servers (host:port, comma-separated).",
							   NULL,
							   &voutbox_brokers, "localhost:9092",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("voutbox.topic_template",
							   "Topic of an event; placeholders {tenant_id}, {aggregate_type}, {aggregate_id}, {event_type}, {event_version}.",
							   NULL,
							   &voutbox_topic_template, "{tenant_id}.{event_type}",
							   PGC_SUSET, 0, check_template, NULL, NULL);
	DefineCustomStringVariable("voutbox.key_template",
							   "Message key of an event (same placeholders as voutbox.topic_template); empty: no key.",
							   NULL,
							   &voutbox_key_template, "{aggregate_id}",
							   PGC_SUSET, 0, check_template, NULL, NULL);
	DefineCustomIntVariable("voutbox.batch_size",
							"Most events the worker reads, sends and settles at once.",
							NULL,
							&voutbox_batch_size, 10000, 1, 1000000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("voutbox.batch_bytes",
							"Most bytes of events the worker holds in a round (at least one event).",
							"Counts the events' text as read from storage: payloads, metadata and the other columns.",
							&voutbox_batch_bytes, 8 * 1024 * 1024, 1024, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_BYTE, NULL, NULL, NULL);
	DefineCustomIntVariable("voutbox.poll_interval",
							"Longest the idle worker sleeps; commits wake it at once.",
							NULL,
							&voutbox_poll_interval, 1000, 10, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("voutbox.max_retries",
							"Failed delivery attempts after the first before an event moves to the dead-letter queue.",
							NULL,
							&voutbox_max_retries, 10, 0, 1000000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("voutbox.backoff_base",
							"Delay before the first retry of a failed delivery; doubles with every attempt.",
							NULL,
							&voutbox_backoff_base, 1000, 1, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("voutbox.backoff_max",
							"Longest delay between retries of a failed delivery.",
							NULL,
							&voutbox_backoff_max, 300000, 1, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("voutbox.retention",
							"How long delivered events are kept.",
							NULL,
							&voutbox_retention, 7 * 24 * 3600, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("voutbox.dlq_retention",
							"How long dead-lettered events are kept.",
							NULL,
							&voutbox_dlq_retention, 30 * 24 * 3600, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("voutbox.delivery_timeout",
							"How long the worker waits without any delivery report before it gives up on the unacknowledged events of a batch.",
							"They are retried with backoff. While no broker can be reached at all, the worker waits without using up retries.",
							&voutbox_delivery_timeout, 60000, 100, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("voutbox.cleanup_interval",
							"How often the worker applies retention.",
							NULL,
							&voutbox_cleanup_interval, 60000, 10, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomStringVariable("voutbox.producer",
							   "Default producer name written into the envelope.",
							   NULL,
							   &voutbox_producer, "",
							   PGC_USERSET, 0, check_producer, NULL, NULL);
	DefineCustomIntVariable("voutbox.max_payload_bytes",
							"Largest payload outbox_save() accepts, as JSON text.",
							NULL,
							&voutbox_max_payload_bytes, 512 * 1024, 1, 64 * 1024 * 1024,
							PGC_SUSET, GUC_UNIT_BYTE, NULL, NULL, NULL);
	DefineCustomStringVariable("voutbox.traceparent",
							   "W3C traceparent of the session's current span; outbox_save() takes its trace id.",
							   NULL,
							   &voutbox_traceparent, "",
							   PGC_USERSET, 0, check_traceparent, NULL, NULL);
	DefineCustomStringVariable("voutbox.kafka_properties",
							   "Extra librdkafka properties for the producer, as name=value pairs separated by semicolons.",
							   NULL,
							   &voutbox_kafka_properties, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, check_kafka_properties, NULL, NULL);
	DefineCustomEnumVariable("voutbox.format",
							 "What the messages look like: voutbox, cloudevents (structured), cloudevents_binary or debezium.",
							 "Applies to the events the worker sends from then on.",
							 &voutbox_format, VOUTBOX_FORMAT_VOUTBOX, format_options,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomEnumVariable("voutbox.delivery",
							 "Delivery guarantee: at_least_once, or exactly_once (Kafka transactions).",
							 "exactly_once needs max_prepared_transactions > 0; consumers must read with isolation.level=read_committed.",
							 &voutbox_delivery, VOUTBOX_AT_LEAST_ONCE, delivery_options,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("voutbox.checkpoint_topic_prefix",
							   "Prefix of the compacted topics where exactly_once workers record their progress, in the transactions of the events.",
							   "Each worker has its own: <prefix>.<system identifier>.<database OID>.",
							   &voutbox_checkpoint_topic_prefix, "voutbox.checkpoints",
							   PGC_SIGHUP, 0, check_checkpoint_topic, NULL, NULL);
	DefineCustomBoolVariable("voutbox.fault_injection",
							 "Tests only: let the file voutbox.fault in the data directory kill the worker at the step it names.",
							 NULL,
							 &voutbox_fault_injection, false,
							 PGC_SIGHUP, GUC_NOT_IN_SAMPLE | GUC_NO_SHOW_ALL, NULL, NULL, NULL);
	DefineCustomBoolVariable("voutbox.create_topics",
							 "Create a topic with Kafka's admin API before its first event is produced.",
							 "Off: topics must exist, or the broker must create them.",
							 &voutbox_create_topics, false,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("voutbox.topic_partitions",
							"Partitions of the topics voutbox creates; -1: the broker's default (num.partitions).",
							NULL,
							&voutbox_topic_partitions, -1, -1, 1000000,
							PGC_SIGHUP, 0, check_topic_count, NULL, NULL);
	DefineCustomIntVariable("voutbox.topic_replication_factor",
							"Replication factor of the topics voutbox creates; -1: the broker's default (default.replication.factor).",
							NULL,
							&voutbox_topic_replication_factor, -1, -1, 32767,
							PGC_SIGHUP, 0, check_topic_count, NULL, NULL);
	DefineCustomStringVariable("voutbox.topic_config",
							   "Topic-level settings of the topics voutbox creates, as name=value pairs separated by semicolons.",
							   "For example retention.ms=604800000;cleanup.policy=compact,delete.",
							   &voutbox_topic_config, "",
							   PGC_SIGHUP, 0, check_topic_config, NULL, NULL);
	DefineCustomStringVariable("voutbox.kafka_secrets_file",
							   "File of librdkafka properties holding secrets (passwords, keys), name=value per line; read by the worker.",
							   "Relative paths are relative to the data directory. Only superusers can see the setting.",
							   &voutbox_kafka_secrets_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	MarkGUCPrefixReserved("voutbox");
}

static Size
shared_size(void)
{
	return add_size(offsetof(VoutboxShared, slots),
					mul_size(max_worker_processes, sizeof(VoutboxWorkerSlot)));
}

static void
voutbox_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(add_size(MAXALIGN(shared_size()), voutbox_stats_shmem_size()));
	RequestNamedLWLockTranche("voutbox", 1);
}

static void
voutbox_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	voutbox_shared = ShmemInitStruct("voutbox", shared_size(), &found);
	if (!found)
	{
		memset(voutbox_shared, 0, shared_size());
		SpinLockInit(&voutbox_shared->mutex);
		voutbox_shared->topics_lock = &(GetNamedLWLockTranche("voutbox"))->lock;
		voutbox_shared->nslots = max_worker_processes;
		for (int i = 0; i < voutbox_shared->nslots; i++)
		{
			voutbox_shared->slots[i].database = InvalidOid;
			voutbox_shared->slots[i].pgprocno = -1;
			pg_atomic_init_u32(&voutbox_shared->slots[i].requeued, 0);
		}
	}
	voutbox_stats_shmem_init();
	LWLockRelease(AddinShmemInitLock);
}

/*
 * The slot of the worker serving this backend's database, or NULL.  Read
 * without the lock (see voutbox.h): the caller must accept a stale answer.
 */
static volatile VoutboxWorkerSlot *
my_database_slot(void)
{
	volatile VoutboxWorkerSlot *found = NULL;

	if (voutbox_shared == NULL || !OidIsValid(MyDatabaseId))
		return NULL;
	/* (The slot whose worker runs, if two name this database.) */
	for (int i = 0; i < voutbox_shared->nslots; i++)
	{
		volatile VoutboxWorkerSlot *slot = &voutbox_shared->slots[i];

		if (slot->database == MyDatabaseId && (found == NULL || slot->pgprocno >= 0))
			found = slot;
	}
	return found;
}

/*
 * Set the latch of the worker serving this database, if one runs.  Called
 * at commit of a transaction that saved events, so it must not fail:
 * SetLatch on a latch whose owner has gone only causes a spurious wakeup of
 * whoever owns that PGPROC next.
 */
void
voutbox_wake_worker(void)
{
	volatile VoutboxWorkerSlot *slot = my_database_slot();
	int			procno;

	if (slot == NULL)
		return;
	procno = slot->pgprocno;
	if (procno >= 0 && procno < (int) ProcGlobal->allProcCount)
		SetLatch(&ProcGlobal->allProcs[procno].procLatch);
}

/* Tell this database's worker that SQL made deferred events due. */
void
voutbox_note_requeued(void)
{
	volatile VoutboxWorkerSlot *slot = my_database_slot();

	if (slot != NULL)
		pg_atomic_write_u32((pg_atomic_uint32 *) &slot->requeued, 1);
}

static void
register_launcher(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "voutbox");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "voutbox_launcher_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "voutbox launcher");
	snprintf(worker.bgw_type, BGW_MAXLEN, "voutbox launcher");
	RegisterBackgroundWorker(&worker);
}

void
_PG_init(void)
{
	define_gucs();

	if (!process_shared_preload_libraries_in_progress)
		return;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = voutbox_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = voutbox_shmem_startup;

	/* pg_upgrade starts the server with our library; deliver nothing then. */
	if (!IsBinaryUpgrade)
		register_launcher();
}
