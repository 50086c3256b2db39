/*-------------------------------------------------------------------------
 *
 * stats.c
 *		What the worker does and what it delivered, in shared memory.
 *
 * Each worker's state and its counters since the server started live in
 * its slot of VoutboxShared (under its spinlock).  Counters per database,
 * tenant and topic live in a shared hash table of at most
 * voutbox.stats_max_topics entries for all databases together (under an
 * LWLock); when it is full, further pairs are counted in one entry per
 * database with an empty tenant and topic "(other)".  Tenant ids and topics longer than
 * VOUTBOX_STATS_NAME_LEN - 1 bytes are cut.
 *
 * The worker adds up a round in local memory and takes the lock once per
 * round.  SQL reads it all through voutbox.worker_status() and
 * voutbox.topic_counters(), which the outbox_worker and outbox_stats views
 * show.  A database sees its own topics' counters; outbox_worker shows its
 * own worker, and those of the other databases to members of
 * pg_read_all_stats (as pg_stat_activity shows other roles' sessions).  Counters live in shared memory only, so they start from zero when
 * the server starts; waiting and dead events are counted from the tables.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_authid.h"
#include "commands/dbcommands.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/timestamp.h"

#include "voutbox.h"

#define VOUTBOX_STATS_NAME_LEN	256
#define OTHER_TOPIC				"(other)"

typedef struct TopicKey
{
	Oid			database;
	char		tenant_id[VOUTBOX_STATS_NAME_LEN];
	char		topic[VOUTBOX_STATS_NAME_LEN];
} TopicKey;

typedef struct TopicCounters
{
	TopicKey	key;
	uint64		delivered;
	uint64		failed_attempts;
	uint64		dead;
	char		last_error[VOUTBOX_ERROR_LEN];
	TimestampTz last_error_at;
} TopicCounters;

static HTAB *topics = NULL;

/* ---------------------------------------------------------------------
 * Shared memory
 * ---------------------------------------------------------------------
 */

Size
voutbox_stats_shmem_size(void)
{
	/* one more entry for "(other)" */
	return hash_estimate_size(voutbox_stats_max_topics + 1, sizeof(TopicCounters));
}

/* Called from the shmem startup hook, under AddinShmemInitLock. */
void
voutbox_stats_shmem_init(void)
{
	HASHCTL		info;

	info.keysize = sizeof(TopicKey);
	info.entrysize = sizeof(TopicCounters);
	topics = ShmemInitHash("voutbox topic counters",
						   voutbox_stats_max_topics + 1, voutbox_stats_max_topics + 1,
						   &info, HASH_ELEM | HASH_BLOBS);
}

/* ---------------------------------------------------------------------
 * The worker's state
 * ---------------------------------------------------------------------
 */

void
voutbox_stats_worker_started(void)
{
	TimestampTz now = GetCurrentTimestamp();

	SpinLockAcquire(&voutbox_shared->mutex);
	strlcpy(voutbox_my_slot->state, "starting", VOUTBOX_STATE_LEN);
	voutbox_my_slot->state_since = now;
	voutbox_my_slot->detail[0] = '\0';
	voutbox_my_slot->started_at = now;
	SpinLockRelease(&voutbox_shared->mutex);
}

/* before_shmem_exit callback of the worker. */
void
voutbox_stats_worker_stopped(int code pg_attribute_unused(), Datum arg pg_attribute_unused())
{
	voutbox_stats_slot_state(voutbox_my_slot, "stopped", NULL);
}

/* Set a slot's state (a short word) and what exactly its worker does. */
void
voutbox_stats_slot_state(VoutboxWorkerSlot *slot, const char *state, const char *detail)
{
	TimestampTz now = GetCurrentTimestamp();

	SpinLockAcquire(&voutbox_shared->mutex);
	if (strcmp(slot->state, state) != 0)
	{
		strlcpy(slot->state, state, VOUTBOX_STATE_LEN);
		slot->state_since = now;
	}
	strlcpy(slot->detail, detail ? detail : "", VOUTBOX_DETAIL_LEN);
	SpinLockRelease(&voutbox_shared->mutex);
}

/* Set the worker's state. */
void
voutbox_stats_set_state(const char *state, const char *detail)
{
	voutbox_stats_slot_state(voutbox_my_slot, state, detail);
}

/* An error of the worker's own (not of an event's delivery). */
void
voutbox_stats_set_error(const char *error)
{
	TimestampTz now = GetCurrentTimestamp();

	SpinLockAcquire(&voutbox_shared->mutex);
	strlcpy(voutbox_my_slot->last_error, error, VOUTBOX_ERROR_LEN);
	voutbox_my_slot->last_error_at = now;
	SpinLockRelease(&voutbox_shared->mutex);
}

void
voutbox_stats_producer_built(void)
{
	SpinLockAcquire(&voutbox_shared->mutex);
	voutbox_my_slot->producers_built++;
	SpinLockRelease(&voutbox_shared->mutex);
}

/* ---------------------------------------------------------------------
 * Counting a round
 * ---------------------------------------------------------------------
 */

struct VoutboxStatsBatch
{
	HTAB	   *local;			/* TopicCounters by TopicKey */
	TopicCounters *last;		/* the entry of the previous call */
	const char *last_tenant;
	const char *last_topic;
	bool		round;			/* counts as a round of the worker */
};

VoutboxStatsBatch *
voutbox_stats_batch_new(bool round)
{
	VoutboxStatsBatch *b = palloc0(sizeof(VoutboxStatsBatch));
	HASHCTL		ctl;

	ctl.keysize = sizeof(TopicKey);
	ctl.entrysize = sizeof(TopicCounters);
	ctl.hcxt = CurrentMemoryContext;
	b->local = hash_create("voutbox round counters", 16, &ctl,
						   HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	b->round = round;
	return b;
}

static void
make_key(TopicKey *key, const char *tenant_id, const char *topic)
{
	memset(key, 0, sizeof(*key));
	key->database = MyDatabaseId;
	strlcpy(key->tenant_id, tenant_id, sizeof(key->tenant_id));
	strlcpy(key->topic, topic, sizeof(key->topic));
}

/* Count events of one tenant and topic; error, if given, is the latest one. */
void
voutbox_stats_batch_add(VoutboxStatsBatch *b, const char *tenant_id, const char *topic,
						int delivered, int failed, int dead, const char *error)
{
	TopicCounters *c;

	/* Events of a round mostly share their topic: skip the hashing then. */
	if (b->last != NULL && strcmp(b->last_tenant, tenant_id) == 0 &&
		strcmp(b->last_topic, topic) == 0)
		c = b->last;
	else
	{
		TopicKey	key;
		bool		found;

		make_key(&key, tenant_id, topic);
		c = hash_search(b->local, &key, HASH_ENTER, &found);
		if (!found)
		{
			c->delivered = c->failed_attempts = c->dead = 0;
			c->last_error[0] = '\0';
			c->last_error_at = 0;
		}
		b->last = c;
		b->last_tenant = tenant_id;
		b->last_topic = topic;
	}
	c->delivered += delivered;
	c->failed_attempts += failed;
	c->dead += dead;
	if (error != NULL)
	{
		strlcpy(c->last_error, error, sizeof(c->last_error));
		c->last_error_at = GetCurrentTimestamp();
	}
}

static void
merge(TopicCounters *to, const TopicCounters *from)
{
	to->delivered += from->delivered;
	to->failed_attempts += from->failed_attempts;
	to->dead += from->dead;
	if (from->last_error_at != 0)
	{
		strlcpy(to->last_error, from->last_error, sizeof(to->last_error));
		to->last_error_at = from->last_error_at;
	}
}

/* Add the round's counts to shared memory. */
void
voutbox_stats_batch_flush(VoutboxStatsBatch *b)
{
	HASH_SEQ_STATUS seq;
	TopicCounters *c;
	TopicCounters total;

	memset(&total, 0, sizeof(total));
	hash_seq_init(&seq, b->local);
	while ((c = hash_seq_search(&seq)) != NULL)
		merge(&total, c);

	SpinLockAcquire(&voutbox_shared->mutex);
	if (b->round)
		voutbox_my_slot->rounds++;
	voutbox_my_slot->delivered += total.delivered;
	voutbox_my_slot->failed_attempts += total.failed_attempts;
	voutbox_my_slot->dead += total.dead;
	if (total.last_error_at != 0)
	{
		strlcpy(voutbox_my_slot->last_error, total.last_error, VOUTBOX_ERROR_LEN);
		voutbox_my_slot->last_error_at = total.last_error_at;
	}
	SpinLockRelease(&voutbox_shared->mutex);

	if (topics == NULL || hash_get_num_entries(b->local) == 0)
		return;

	LWLockAcquire(voutbox_shared->topics_lock, LW_EXCLUSIVE);
	hash_seq_init(&seq, b->local);
	while ((c = hash_seq_search(&seq)) != NULL)
	{
		TopicCounters *s;
		bool		found;

		s = hash_search(topics, &c->key, HASH_FIND, NULL);
		if (s == NULL && hash_get_num_entries(topics) < voutbox_stats_max_topics)
			s = hash_search(topics, &c->key, HASH_ENTER_NULL, &found);
		if (s == NULL)
		{
			TopicKey	other;

			make_key(&other, "", OTHER_TOPIC);
			s = hash_search(topics, &other, HASH_ENTER_NULL, &found);
			if (s == NULL)
				continue;
		}
		else
			found = true;
		if (!found)
		{
			s->delivered = s->failed_attempts = s->dead = 0;
			s->last_error[0] = '\0';
			s->last_error_at = 0;
		}
		merge(s, c);
	}
	LWLockRelease(voutbox_shared->topics_lock);
}

/* ---------------------------------------------------------------------
 * SQL functions
 * ---------------------------------------------------------------------
 */

static void
require_preloaded(void)
{
	if (voutbox_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("voutbox is not loaded through shared_preload_libraries"),
				 errhint("Add voutbox to shared_preload_libraries and restart the server.")));
}

static Datum
timestamp_or_null(TimestampTz ts, bool *isnull)
{
	*isnull = ts == 0;
	return TimestampTzGetDatum(ts);
}

static Datum
text_or_null(const char *s, bool *isnull)
{
	*isnull = s[0] == '\0';
	return *isnull ? (Datum) 0 : CStringGetTextDatum(s);
}

PG_FUNCTION_INFO_V1(voutbox_topic_counters);

Datum
voutbox_topic_counters(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	HASH_SEQ_STATUS seq;
	TopicCounters *c;

	require_preloaded();
	InitMaterializedSRF(fcinfo, 0);

	LWLockAcquire(voutbox_shared->topics_lock, LW_SHARED);
	hash_seq_init(&seq, topics);
	while ((c = hash_seq_search(&seq)) != NULL)
	{
		Datum		values[7];
		bool		nulls[7] = {false};

		if (c->key.database != MyDatabaseId)
			continue;

		values[0] = text_or_null(c->key.tenant_id, &nulls[0]);
		values[1] = CStringGetTextDatum(c->key.topic);
		values[2] = Int64GetDatum((int64) c->delivered);
		values[3] = Int64GetDatum((int64) c->failed_attempts);
		values[4] = Int64GetDatum((int64) c->dead);
		values[5] = text_or_null(c->last_error, &nulls[5]);
		values[6] = timestamp_or_null(c->last_error_at, &nulls[6]);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	LWLockRelease(voutbox_shared->topics_lock);
	return (Datum) 0;
}

/* The worker columns of a slot: pid, state, ..., last_error_at (12). */
static void
slot_values(const VoutboxWorkerSlot *s, Datum *values, bool *nulls)
{
	values[0] = Int32GetDatum(s->pid);
	nulls[0] = s->pid == 0;
	values[1] = CStringGetTextDatum(s->state[0] ? s->state : "not started");
	values[2] = timestamp_or_null(s->state_since, &nulls[2]);
	values[3] = text_or_null(s->detail, &nulls[3]);
	values[4] = timestamp_or_null(s->started_at, &nulls[4]);
	values[5] = Int64GetDatum((int64) s->rounds);
	values[6] = Int64GetDatum((int64) s->delivered);
	values[7] = Int64GetDatum((int64) s->failed_attempts);
	values[8] = Int64GetDatum((int64) s->dead);
	values[9] = Int64GetDatum((int64) s->producers_built);
	values[10] = text_or_null(s->last_error, &nulls[10]);
	values[11] = timestamp_or_null(s->last_error_at, &nulls[11]);
}

/* A row of voutbox.workers(): the database, then the worker columns. */
static void
put_slot(ReturnSetInfo *rsinfo, const VoutboxWorkerSlot *s)
{
	Datum		values[13];
	bool		nulls[13] = {false};

	values[0] = CStringGetTextDatum(s->dbname);
	slot_values(s, values + 1, nulls + 1);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

PG_FUNCTION_INFO_V1(voutbox_workers);

/*
 * voutbox.workers(): a row per database listed in voutbox.database: this
 * database's, and the others' to members of pg_read_all_stats.  If this
 * database is not listed, a row for it says "disabled".
 */
Datum
voutbox_workers(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	bool		all = has_privs_of_role(GetUserId(), ROLE_PG_READ_ALL_STATS);
	char	   *mydb = get_database_name(MyDatabaseId);
	bool		mine = false;

	require_preloaded();
	InitMaterializedSRF(fcinfo, 0);

	for (int i = 0; i < voutbox_shared->nslots; i++)
	{
		VoutboxWorkerSlot s;
		bool		is_mine;

		SpinLockAcquire(&voutbox_shared->mutex);
		memcpy(&s, &voutbox_shared->slots[i], sizeof(s));
		SpinLockRelease(&voutbox_shared->mutex);
		if (s.dbname[0] == '\0')
			continue;
		is_mine = s.database == MyDatabaseId ||
			(mydb != NULL && strcmp(s.dbname, mydb) == 0);
		mine |= is_mine;
		if (is_mine || all)
			put_slot(rsinfo, &s);
	}
	if (!mine && mydb != NULL)
	{
		VoutboxWorkerSlot s;

		memset(&s, 0, sizeof(s));
		strlcpy(s.dbname, mydb, sizeof(s.dbname));
		strlcpy(s.state, "disabled", sizeof(s.state));
		put_slot(rsinfo, &s);
	}
	return (Datum) 0;
}

PG_FUNCTION_INFO_V1(voutbox_worker_status);

/*
 * voutbox.worker_status() of the SQL objects before 0.6.0 (one row, without
 * the database), which this library still serves until ALTER EXTENSION
 * UPDATE has run: this database's worker.
 */
Datum
voutbox_worker_status(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	VoutboxWorkerSlot s;
	Datum		values[12];
	bool		nulls[12] = {false};
	bool		found = false;

	require_preloaded();
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE || tupdesc->natts != 12)
		elog(ERROR, "voutbox.worker_status() must return a row of 12 columns");
	for (int i = 0; i < voutbox_shared->nslots && !found; i++)
	{
		SpinLockAcquire(&voutbox_shared->mutex);
		memcpy(&s, &voutbox_shared->slots[i], sizeof(s));
		SpinLockRelease(&voutbox_shared->mutex);
		found = s.dbname[0] != '\0' && s.database == MyDatabaseId;
	}
	if (!found)
	{
		memset(&s, 0, sizeof(s));
		strlcpy(s.state, "disabled", sizeof(s.state));
	}
	slot_values(&s, values, nulls);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
}
