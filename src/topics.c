/*-------------------------------------------------------------------------
 *
 * topics.c
 *		Topic provisioning: a topic exists before its first event is produced.
 *
 * With voutbox.create_topics on, the delivery worker makes sure that a topic
 * exists before it hands the topic's first event to librdkafka: it asks the
 * cluster for the topic's metadata and, if the topic is missing, creates it
 * with librdkafka's admin API (CreateTopics), with voutbox.topic_partitions,
 * voutbox.topic_replication_factor and the topic-level settings of
 * voutbox.topic_config.  A topic found or created is remembered for as long
 * as the producer lives (a new producer may speak to another cluster).
 *
 * This works whether or not the broker creates topics by itself, and it
 * spares the first event the wait for an auto-created topic's metadata.
 * The producer is built with allow.auto.create.topics=false then, so that
 * the metadata request never creates a topic with the broker's defaults.
 *
 * A topic the cluster refuses to create (an ACL, a configuration it
 * refuses) is not an event's fault: its events are not sent and wait,
 * without an attempt charged, until the topic is tried again after a delay
 * that doubles from voutbox.backoff_base up to voutbox.backoff_max
 * (settle.c stalls the topic meanwhile).  The reason is logged and shown in
 * outbox_stats.last_error and outbox.last_error_code.  A cluster that does
 * not answer cannot refuse: the events then go unchecked (see
 * voutbox_topic_ensure()).
 *
 * The admin requests are synchronous, bounded by PROVISION_TIMEOUT_MS: the
 * worker waits for them once per topic (and once per retry of a topic that
 * cannot be created), not per event.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <librdkafka/rdkafka.h>

#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/interrupt.h"
#include "storage/latch.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "voutbox.h"

/* Longest wait for one admin request (metadata, CreateTopics). */
#define PROVISION_TIMEOUT_MS	5000

typedef struct TopicState
{
	char		name[VOUTBOX_TOPIC_MAX_LEN + 1];	/* hash key */
	bool		ready;			/* found or created */
	bool		unknown;		/* the cluster did not answer: sent unchecked */
	int			failures;		/* tries that failed in a row */
	TimestampTz retry_at;		/* when to try again */
	char		code[64];		/* why the last try failed */
	char		error[VOUTBOX_ERROR_LEN];
} TopicState;

static HTAB *topic_states = NULL;
/* The broker list the states were learnt from. */
static char *states_brokers = NULL;

/* ---------------------------------------------------------------------
 * voutbox.topic_config
 * ---------------------------------------------------------------------
 */

/*
 * Parse "name=value;name=value" into a List of (name, value) string pairs
 * (two consecutive cells each).  Names are Kafka topic settings
 * (lower-case letters, digits, dots, dashes, underscores); the broker says
 * whether it knows them.  NIL with *detail set if malformed.
 */
static List *
parse_topic_config(const char *value, char **detail)
{
	List	   *pairs = NIL;
	char	   *copy = pstrdup(value ? value : "");
	char	   *item;
	char	   *save = NULL;

	*detail = NULL;
	for (item = strtok_r(copy, ";", &save); item != NULL; item = strtok_r(NULL, ";", &save))
	{
		char	   *eq;
		char	   *name = item;
		char	   *val;

		while (*name == ' ' || *name == '\t')
			name++;
		if (*name == '\0')
			continue;
		eq = strchr(name, '=');
		if (eq == NULL)
		{
			*detail = psprintf("\"%s\" is not of the form name=value.", name);
			return NIL;
		}
		val = eq + 1;
		while (eq > name && (eq[-1] == ' ' || eq[-1] == '\t'))
			eq--;
		*eq = '\0';
		while (*val == ' ' || *val == '\t')
			val++;
		for (char *e = val + strlen(val); e > val && (e[-1] == ' ' || e[-1] == '\t');)
			*--e = '\0';
		if (*name == '\0' || strspn(name, "abcdefghijklmnopqrstuvwxyz0123456789._-") != strlen(name))
		{
			*detail = psprintf("\"%s\" is not a topic setting name (lower-case letters, digits, \".\", \"-\", \"_\").",
							   name);
			return NIL;
		}
		if (*val == '\0')
		{
			*detail = psprintf("Topic setting \"%s\" has no value.", name);
			return NIL;
		}
		pairs = lappend(lappend(pairs, pstrdup(name)), pstrdup(val));
	}
	return pairs;
}

bool
voutbox_topic_config_is_valid(const char *value, char **detail)
{
	(void) parse_topic_config(value, detail);
	return *detail == NULL;
}

/* ---------------------------------------------------------------------
 * Provisioning
 * ---------------------------------------------------------------------
 */

/* Forget what was learnt about topics (another cluster, maybe). */
static void
topics_forget(void)
{
	if (topic_states != NULL)
		hash_destroy(topic_states);
	topic_states = NULL;
	if (states_brokers != NULL)
		pfree(states_brokers);
	states_brokers = NULL;
}

static TopicState *
topic_state(const char *topic, bool create)
{
	bool		found;
	TopicState *t;

	if (topic_states == NULL)
	{
		HASHCTL		ctl;

		if (!create)
			return NULL;
		ctl.keysize = VOUTBOX_TOPIC_MAX_LEN + 1;
		ctl.entrysize = sizeof(TopicState);
		ctl.hcxt = TopMemoryContext;
		topic_states = hash_create("voutbox topics", 64, &ctl,
								   HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	}
	if (strlen(topic) > VOUTBOX_TOPIC_MAX_LEN)
		return NULL;			/* (outbox_save() refuses such names) */
	t = hash_search(topic_states, topic, create ? HASH_ENTER : HASH_FIND, &found);
	if (create && !found)
	{
		t->ready = t->unknown = false;
		t->failures = 0;
		t->retry_at = 0;
		t->code[0] = t->error[0] = '\0';
	}
	return t;
}

static void
failed(TopicState *t, rd_kafka_resp_err_t err, const char *message)
{
	strlcpy(t->code, rd_kafka_err2name(err), sizeof(t->code));
	snprintf(t->error, sizeof(t->error), "%s: %s", rd_kafka_err2name(err),
			 message != NULL && message[0] != '\0' ? message : rd_kafka_err2str(err));
}

/*
 * What the cluster's metadata says of the topic: NO_ERROR if it exists,
 * UNKNOWN_TOPIC_OR_PART if not, else why it could not be told.
 */
static rd_kafka_resp_err_t
describe(rd_kafka_t *rk, const char *topic, int *npartitions)
{
	rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
	const struct rd_kafka_metadata *md = NULL;
	rd_kafka_resp_err_t err;

	if (rkt == NULL)
		return rd_kafka_last_error();
	err = rd_kafka_metadata(rk, 0, rkt, &md, PROVISION_TIMEOUT_MS);
	rd_kafka_topic_destroy(rkt);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		return err;
	err = RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART;
	for (int i = 0; i < md->topic_cnt; i++)
	{
		if (strcmp(md->topics[i].topic, topic) != 0)
			continue;
		err = md->topics[i].err;
		if (npartitions != NULL)
			*npartitions = md->topics[i].partition_cnt;
		for (int j = 0; err == RD_KAFKA_RESP_ERR_NO_ERROR && j < md->topics[i].partition_cnt; j++)
			if (md->topics[i].partitions[j].leader < 0)
				err = RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE;
	}
	rd_kafka_metadata_destroy(md);
	return err;
}

/*
 * Between two tries of provisioning: a short wait that a shutdown request
 * or the postmaster's death cuts short (false: give up).  The latch is left
 * alone, for the main loop.
 */
static bool
provision_pause(void)
{
	(void) WaitLatch(MyLatch, WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 20, PG_WAIT_EXTENSION);
	CHECK_FOR_INTERRUPTS();
	return !ShutdownRequestPending;
}

/*
 * A topic just created, known to the metadata: wait (within the provisioning
 * timeout counted from start) until each partition's leader has made the
 * partition, which a leader that lists the partition's offsets has; the
 * metadata names a leader before that.  Writing to a partition not made yet
 * is what most often makes librdkafka acknowledge an event without an offset
 * (see producer.c): the event goes again, behind later ones of its key.
 */
static void
wait_for_partition_leaders(rd_kafka_t *rk, const char *topic, int npartitions, TimestampTz start)
{
	rd_kafka_topic_partition_list_t *parts;

	if (npartitions <= 0)
		return;
	parts = rd_kafka_topic_partition_list_new(npartitions);
	for (int i = 0; i < npartitions; i++)
		rd_kafka_topic_partition_list_add(parts, topic, i);
	for (;;)
	{
		long		left = PROVISION_TIMEOUT_MS -
			TimestampDifferenceMilliseconds(start, GetCurrentTimestamp());

		if (left <= 0)
			break;
		/*
		 * The "offset" is the time asked for, -1 (RD_KAFKA_OFFSET_END) for the
		 * latest; the answer overwrites it.  A partition's error is the
		 * call's.  (Asked a quarter second at a time, so that a shutdown
		 * waits no longer.)
		 */
		for (int i = 0; i < parts->cnt; i++)
			parts->elems[i].offset = RD_KAFKA_OFFSET_END;
		if (rd_kafka_offsets_for_times(rk, parts, (int) Min(left, 250)) == RD_KAFKA_RESP_ERR_NO_ERROR ||
			!provision_pause())
			break;
	}
	rd_kafka_topic_partition_list_destroy(parts);
}

/*
 * A topic just created: wait until the cluster's metadata shows it, which
 * also tells librdkafka's cache (a producer that looked the topic up before
 * would otherwise take it for missing until its next refresh).
 */
static bool
wait_until_known(rd_kafka_t *rk, TopicState *t)
{
	TimestampTz start = GetCurrentTimestamp();
	rd_kafka_resp_err_t err;
	int			npartitions = 0;

	while (((err = describe(rk, t->name, &npartitions)) == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART ||
			err == RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE) &&
		   !TimestampDifferenceExceeds(start, GetCurrentTimestamp(), PROVISION_TIMEOUT_MS) &&
		   provision_pause())
	{
		/* ask again */
	}
	if (ShutdownRequestPending)
	{
		failed(t, RD_KAFKA_RESP_ERR__DESTROY, "the worker is stopping");
		return false;
	}
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
		wait_for_partition_leaders(rk, t->name, npartitions, start);
	/* (Without a leader yet, it exists: the producer waits for one.) */
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR || err == RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE)
		return true;
	failed(t, err, "the topic was created but its metadata does not show it");
	return false;
}

/* Create the topic; true if it exists now.  On failure, say why in t. */
static bool
create(rd_kafka_t *rk, TopicState *t, const VoutboxTopicSettings *ts)
{
	char		errstr[512];
	rd_kafka_NewTopic_t *nt;
	rd_kafka_AdminOptions_t *opts;
	rd_kafka_queue_t *q;
	rd_kafka_event_t *ev;
	char	   *detail;
	List	   *config = parse_topic_config(ts && ts->config ? ts->config : voutbox_topic_config,
											&detail);
	bool		ok = false;

	nt = rd_kafka_NewTopic_new(t->name,
							   ts && ts->has_partitions ? ts->partitions : voutbox_topic_partitions,
							   ts && ts->has_replication_factor ? ts->replication_factor :
							   voutbox_topic_replication_factor,
							   errstr, sizeof(errstr));
	if (nt == NULL)
	{
		failed(t, RD_KAFKA_RESP_ERR__INVALID_ARG, errstr);
		return false;
	}
	for (int i = 0; i + 1 < list_length(config); i += 2)
	{
		rd_kafka_resp_err_t err = rd_kafka_NewTopic_set_config(nt, list_nth(config, i),
															   list_nth(config, i + 1));

		if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			failed(t, err, psprintf("topic setting \"%s\"", (char *) list_nth(config, i)));
			rd_kafka_NewTopic_destroy(nt);
			return false;
		}
	}
	opts = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_CREATETOPICS);
	(void) rd_kafka_AdminOptions_set_request_timeout(opts, PROVISION_TIMEOUT_MS, errstr, sizeof(errstr));
	/* Wait until the topic is created, not just accepted. */
	(void) rd_kafka_AdminOptions_set_operation_timeout(opts, PROVISION_TIMEOUT_MS, errstr, sizeof(errstr));
	q = rd_kafka_queue_new(rk);
	rd_kafka_CreateTopics(rk, &nt, 1, opts, q);
	ev = rd_kafka_queue_poll(q, PROVISION_TIMEOUT_MS + 1000);
	if (ev == NULL)
		failed(t, RD_KAFKA_RESP_ERR__TIMED_OUT, "no answer from the cluster");
	else if (rd_kafka_event_error(ev) != RD_KAFKA_RESP_ERR_NO_ERROR)
		failed(t, rd_kafka_event_error(ev), rd_kafka_event_error_string(ev));
	else
	{
		const rd_kafka_CreateTopics_result_t *res = rd_kafka_event_CreateTopics_result(ev);
		size_t		n = 0;
		const rd_kafka_topic_result_t **results = res ? rd_kafka_CreateTopics_result_topics(res, &n) : NULL;
		rd_kafka_resp_err_t err = n == 1 ? rd_kafka_topic_result_error(results[0]) :
			RD_KAFKA_RESP_ERR__BAD_MSG;

		if (err == RD_KAFKA_RESP_ERR_NO_ERROR || err == RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS)
			ok = wait_until_known(rk, t);
		else
			failed(t, err, n == 1 ? rd_kafka_topic_result_error_string(results[0]) : NULL);
	}
	if (ev != NULL)
		rd_kafka_event_destroy(ev);
	rd_kafka_queue_destroy(q);
	rd_kafka_AdminOptions_destroy(opts);
	rd_kafka_NewTopic_destroy(nt);
	return ok;
}

/*
 * Whether the topic's events may be sent: it exists (or provisioning is
 * off), making sure of it the first time with the producer's librdkafka
 * instance rk.  False: the cluster refused to create it, and its events
 * wait until voutbox_topic_retry_at().
 *
 * When the cluster does not answer (a local error: no broker reachable, a
 * timeout), nothing can be told: the events are sent unchecked, to wait in
 * librdkafka as in any outage, and the topic is checked again after the
 * backoff, so that an outage does not cost a timeout per event.  While no
 * broker can be reached at all (reachable false), the cluster is not asked.
 */
bool
voutbox_topic_ensure(rd_kafka_t *rk, rd_kafka_t *producer, const char *topic,
					 const VoutboxTopicSettings *settings, bool reachable)
{
	TopicState *t;
	TimestampTz now;
	rd_kafka_resp_err_t err;
	int64		delay;
	bool		refused;

	if (!voutbox_create_topics)
		return true;
	if (states_brokers == NULL || strcmp(states_brokers, voutbox_brokers) != 0)
	{
		topics_forget();
		states_brokers = MemoryContextStrdup(TopMemoryContext, voutbox_brokers);
	}
	t = topic_state(topic, true);
	if (t == NULL || t->ready)
		return true;
	now = GetCurrentTimestamp();
	if (t->retry_at > now)
		return t->unknown;

	if (!reachable && t->failures > 0 && !t->unknown)
		;						/* refused before: stays refused meanwhile */
	else if (!reachable)
		failed(t, RD_KAFKA_RESP_ERR__TRANSPORT, "no broker can be reached");
	else
	{
		voutbox_report_activity(psprintf("making sure topic \"%s\" exists", topic));
		err = describe(rk, topic, NULL);
		/* (A topic without a leader yet exists: the producer waits for one.) */
		if (err == RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE)
			err = RD_KAFKA_RESP_ERR_NO_ERROR;
		if (err == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART && create(rk, t, settings))
		{
			/*
			 * Tell the producer about the topic now that it exists: else its
			 * first event waits for the producer's next metadata refresh.
			 */
			(void) describe(producer, topic, NULL);
			err = RD_KAFKA_RESP_ERR_NO_ERROR;
		}
		if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			t->ready = true;
			if (t->failures > 0 && !t->unknown)
				ereport(LOG,
						(errmsg("voutbox: topic \"%s\" exists now; its events go", topic)));
			t->failures = 0;
			t->unknown = false;
			return true;
		}
		if (err != RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
			failed(t, err, NULL);
	}

	/* backoff_base, doubled per failure in a row, up to backoff_max */
	delay = voutbox_backoff_base;
	for (int i = 0; i < t->failures && delay < voutbox_backoff_max; i++)
		delay *= 2;
	delay = Min(delay, (int64) voutbox_backoff_max);
	t->failures++;
	t->retry_at = TimestampTzPlusMilliseconds(now, delay);
	/*
	 * librdkafka's own errors are negative, the broker's positive; of
	 * librdkafka's, a setting it refuses or a broker too old for it are
	 * refusals too.
	 */
	refused = strncmp(t->code, "_", 1) != 0 || strcmp(t->code, "_INVALID_ARG") == 0 ||
		strcmp(t->code, "_UNSUPPORTED_FEATURE") == 0;
	t->unknown = !refused;
	if (refused)
		ereport(LOG,
				(errmsg("voutbox: could not create topic \"%s\": %s", topic, t->error),
				 errdetail("Its events wait, without using up retries; the topic is tried again in %ld ms.",
						   (long) delay),
				 strstr(t->code, "AUTHORIZATION") ?
				 errhint("Grant the producer's principal CREATE on the topic (or the cluster), or create the topic beforehand.") : 0));
	return !refused;
}

/* Why the topic's last provisioning failed, and its code (for settle.c). */
const char *
voutbox_topic_error(const char *topic, const char **code)
{
	TopicState *t = topic_state(topic, false);

	*code = t != NULL && t->code[0] ? t->code : "VOUTBOX_TOPIC_NOT_CREATED";
	return t != NULL && t->error[0] ? psprintf("could not create topic: %s", t->error) :
		"could not create topic";
}

/* When the topic's provisioning is tried again, or 0. */
TimestampTz
voutbox_topic_retry_at(const char *topic)
{
	TopicState *t = topic_state(topic, false);

	return t != NULL && !t->ready ? t->retry_at : 0;
}

/*
 * The topic was refused for not existing (deleted since it was made sure
 * of): check it again before its next event.
 */
void
voutbox_topic_missing(const char *topic)
{
	TopicState *t = topic_state(topic, false);

	if (t != NULL)
		t->ready = false;
}

/*
 * The exactly_once worker's checkpoint topic (eos.c): made sure of with the
 * producer's instance rk, created if missing with one partition and log
 * compaction (only the last record of each key is needed; small segments
 * keep what recovery reads short).  Returns NULL once it exists, else why
 * not.  Asked once per producer: a new producer asks again.
 */
char *
voutbox_checkpoint_topic_ensure(rd_kafka_t *rk, const char *topic)
{
	TopicState	t;
	VoutboxTopicSettings ts;
	rd_kafka_resp_err_t err;

	memset(&t, 0, sizeof(t));
	strlcpy(t.name, topic, sizeof(t.name));
	err = describe(rk, topic, NULL);
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR || err == RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE)
		return NULL;
	if (err != RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
		return psprintf("%s: %s", rd_kafka_err2name(err), rd_kafka_err2str(err));
	memset(&ts, 0, sizeof(ts));
	ts.has_partitions = true;
	ts.partitions = 1;
	ts.config = "cleanup.policy=compact;segment.bytes=1048576;min.cleanable.dirty.ratio=0.1";
	if (create(rk, &t, &ts))
		return NULL;
	return pstrdup(t.error);
}
