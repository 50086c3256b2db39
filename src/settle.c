/*-------------------------------------------------------------------------
 *
 * settle.c
 *		What becomes of the events of a round once their delivery reports are
 *		in: delivered, retried with backoff, held behind their key or their
 *		topic, or moved to the dead-letter queue.
 *
 * The error class of each failure (producer.c) decides: the producer's own
 * trouble costs the event nothing and it goes again in order; a retriable
 * error costs an attempt and a backoff delay, and after voutbox.max_retries
 * the event is dead; a permanent error kills an event sent alone, and sends
 * an event that shared its round once more, alone.  Only the first failure
 * of a key in a round is the key's; its later events wait behind it.
 *
 * Everything here but the topic memory and the final log and statistics runs
 * in the worker's settling transaction (storage.c), which also advances the
 * cursor: the outcome of a round is recorded all at once or not at all.
 *
 * Events that die move to voutbox.dlq (shown by outbox_dlq) in the same
 * transaction, unless someone holds a lock on it that conflicts with the
 * move (an operator's LOCK TABLE outbox_dlq): the worker never waits for
 * it.  They then stay in voutbox.deferred, marked dead, sent no more and
 * holding their key no more, and move at a later settle or cleanup.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <librdkafka/rdkafka.h>

#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "common/pg_prng.h"
#include "catalog/namespace.h"
#include "executor/spi.h"
#include "storage/lmgr.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "voutbox.h"

/* ---------------------------------------------------------------------
 * Topics that do not answer
 *
 * When events of a topic time out (the broker is up, but does not
 * acknowledge them: a topic that does not exist yet, a partition without a
 * leader), every round that sent one more event of that topic would wait
 * voutbox.delivery_timeout, and the other topics with it.  So until the
 * topic's next retry has had its chance, new events of that topic are not
 * sent: they wait in voutbox.deferred (in key order, like held events) and
 * are released as soon as an event of the topic is acknowledged.  This
 * memory is the worker's only; a new worker learns it again, at the cost of
 * one timeout.
 * ---------------------------------------------------------------------
 */

typedef struct StalledTopic
{
	uint64		hash;
	TimestampTz until;
} StalledTopic;

static HTAB *stalled_topics = NULL;

static uint64
topic_hash(const char *topic)
{
	return DatumGetUInt64(hash_any_extended((const unsigned char *) topic, strlen(topic), 0));
}

/* Forget what was learnt: a settle that failed may have taught it wrongly. */
void
voutbox_forget_stalled_topics(void)
{
	if (stalled_topics != NULL)
		hash_destroy(stalled_topics);
	stalled_topics = NULL;
}

/* When the topic is tried again, if its events wait; else 0. */
TimestampTz
voutbox_topic_stalled_until(const char *topic, TimestampTz now)
{
	uint64		h;
	StalledTopic *t;

	if (stalled_topics == NULL || hash_get_num_entries(stalled_topics) == 0)
		return 0;
	h = topic_hash(topic);
	t = hash_search(stalled_topics, &h, HASH_FIND, NULL);
	return t != NULL && t->until > now ? t->until : 0;
}

static void
topic_stalls(const char *topic, TimestampTz until)
{
	uint64		h = topic_hash(topic);
	StalledTopic *t;
	bool		found;

	if (stalled_topics == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(uint64);
		ctl.entrysize = sizeof(StalledTopic);
		ctl.hcxt = TopMemoryContext;
		stalled_topics = hash_create("voutbox stalled topics", 16, &ctl,
									 HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	t = hash_search(stalled_topics, &h, HASH_ENTER, &found);
	/*
	 * Several events of a topic time out (or straggle) in one settlement:
	 * one UPDATE will do, and a second more or less makes no difference.
	 */
	if (found && t->until >= until - USECS_PER_SEC)
		return;
	t->until = until;

	/* Events already waiting for the topic wait for this retry too. */
	{
		Oid			types[2] = {TEXTOID, TIMESTAMPTZOID};
		Datum		values[2] = {CStringGetTextDatum(topic), TimestampTzGetDatum(until)};

		voutbox_spi("UPDATE " VOUTBOX_SCHEMA ".deferred d SET due_at = $2 "
					" WHERE d.delivered_at IS NULL AND d.dead_reason IS NULL AND d.attempts = 0 "
					"   AND d.topic = $1 AND d.due_at > '-infinity' AND d.due_at < $2 "
					"   AND (d.scheduled_for IS NULL OR d.scheduled_for <= pg_catalog.now())",
					2, types, values, NULL, SPI_OK_UPDATE);
	}
}

/*
 * An event of the topic was acknowledged: the topic answers again, and the
 * events that wait for it are due now (returns whether some do).  Like
 * topic_stalls(), called in the settling transaction.
 */
static bool
topic_flows(const char *topic)
{
	uint64		h;
	Oid			type = TEXTOID;
	Datum		value;

	if (stalled_topics == NULL || hash_get_num_entries(stalled_topics) == 0)
		return false;
	h = topic_hash(topic);
	if (hash_search(stalled_topics, &h, HASH_REMOVE, NULL) == NULL)
		return false;
	value = CStringGetTextDatum(topic);
	/* (Not the events still in flight, due at 'infinity': see below.) */
	voutbox_spi("UPDATE " VOUTBOX_SCHEMA ".deferred d SET due_at = '-infinity' "
				" WHERE d.delivered_at IS NULL AND d.dead_reason IS NULL AND d.attempts = 0 "
				"   AND d.topic = $1 AND d.due_at > pg_catalog.now() AND d.due_at < 'infinity' "
				"   AND (d.scheduled_for IS NULL OR d.scheduled_for <= pg_catalog.now())",
				1, &type, &value, NULL, SPI_OK_UPDATE);
	return SPI_processed > 0;
}

/* ---------------------------------------------------------------------
 * What becomes of the events of a round
 *
 * An event may still be in flight when its round is settled: a straggler,
 * whose report has not come while events sent after it were acknowledged
 * (stream.c), typically of a topic that does not answer.  It does not hold
 * up its round: it is recorded in voutbox.deferred as in flight, due at
 * 'infinity' so that nothing reads it again meanwhile, holding its key, and
 * its topic stalls as after a timeout (new events of it wait).  When its
 * report comes, the worker settles it in a "late" round: delivered,
 * charged, or due again at once.  A worker that starts has no report to
 * wait for: it makes such rows due at once (storage.c).
 * ---------------------------------------------------------------------
 */

/* When a topic whose event straggles is tried again, at the latest. */
static void
topic_straggles(const char *topic)
{
	topic_stalls(topic, TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													(int64) voutbox_delivery_timeout + 1000));
}

/* Delay before attempt n+1 after n failures: exponential, with equal jitter. */
static TimestampTz
retry_due(int attempts)
{
	double		delay = voutbox_backoff_base;

	for (int i = 1; i < attempts && delay < voutbox_backoff_max; i++)
		delay *= 2;
	delay = Min(delay, (double) voutbox_backoff_max);
	delay = delay / 2 + pg_prng_double(&pg_global_prng_state) * delay / 2;
	return TimestampTzPlusMilliseconds(GetCurrentTimestamp(), (int64) delay);
}

/*
 * Only the first failure of a key in a round is the key's: later events of
 * the key were sent behind it and stay behind it.  Returns true the first
 * time a key is seen; events without a key are always first.
 */
static bool
first_failure_of_key(HTAB *failed, const VoutboxEvent *ev)
{
	uint64		h;
	bool		found;

	if (ev->msg_key == NULL)
		return true;
	h = voutbox_key_hash(ev->topic, ev->msg_key);
	(void) hash_search(failed, &h, HASH_ENTER, &found);
	return !found;
}

static bool
key_failed(HTAB *failed, const VoutboxEvent *ev)
{
	uint64		h;

	if (ev->msg_key == NULL)
		return false;
	h = voutbox_key_hash(ev->topic, ev->msg_key);
	return hash_search(failed, &h, HASH_FIND, NULL) != NULL;
}

/* Rows to insert into, or update in, voutbox.deferred, as column arrays. */
typedef struct DeferredRows
{
	int			n;
	char	  **ids;
	Datum	   *holds;
	Datum	   *attempts;
	Datum	   *due;
	char	  **errors;
	char	  **codes;
	Datum	   *alone;
	char	  **dead;			/* reason to move it to the DLQ, or NULL */
	bool		due_now;		/* one is due at once, or releases its key */
} DeferredRows;

static void
deferred_rows_init(DeferredRows *rows, int capacity)
{
	capacity = Max(capacity, 1);
	rows->n = 0;
	rows->due_now = false;
	rows->ids = palloc(sizeof(char *) * capacity);
	rows->holds = palloc(sizeof(Datum) * capacity);
	rows->attempts = palloc(sizeof(Datum) * capacity);
	rows->due = palloc(sizeof(Datum) * capacity);
	rows->errors = palloc(sizeof(char *) * capacity);
	rows->codes = palloc(sizeof(char *) * capacity);
	rows->alone = palloc(sizeof(Datum) * capacity);
	rows->dead = palloc(sizeof(char *) * capacity);
}

/* err 0: no error to record. */
static void
deferred_rows_add(DeferredRows *rows, const VoutboxEvent *ev, bool holds, int attempts,
				  TimestampTz due, int err, bool alone, const char *dead)
{
	int			i = rows->n++;

	rows->ids[i] = ev->id;
	rows->holds[i] = BoolGetDatum(holds);
	rows->attempts[i] = Int32GetDatum(attempts);
	rows->due[i] = TimestampTzGetDatum(due);
	rows->errors[i] = err ? (char *) voutbox_delivery_error_text(err) : NULL;
	rows->codes[i] = err ? (char *) voutbox_delivery_error_name(err) : NULL;
	rows->alone[i] = BoolGetDatum(alone);
	rows->dead[i] = (char *) dead;
	rows->due_now |= due == DT_NOBEGIN || dead != NULL;
}

/* What settling a round found, for the log and the statistics. */
typedef struct SettleState
{
	HTAB	   *failed;			/* keys that failed in this round */
	int			nsent;			/* events handed to the producer */
	int			charged;		/* failures that used up an attempt */
	int			alone;			/* of them, sent again alone */
	int			dead;			/* of them, to the DLQ */
	int			overtaken;		/* acknowledged behind a failed event of their key */
	int			stragglers;		/* still in flight */
	const char *straggler_topic;	/* the first one's topic, for the log */
	int			timed_out_in_flight;	/* stragglers charged a timeout */
	int			unconfirmed;	/* acknowledged without an offset: not delivered */
	const VoutboxEvent *unconfirmed_first;
	bool		seeded;			/* the keys of stragglers in flight are in "failed" */
	bool		due_now;		/* deferred events may be due at once: see below */
	const VoutboxEvent *in_flight_first;
	const VoutboxEvent *first;	/* the first charged event, for the log */
	int			first_err;
	TimestampTz first_due;
	VoutboxStatsBatch *stats;
} SettleState;

/*
 * An event whose topic could not be created (topics.c) was not sent: not
 * its fault, so no attempt is charged.  It waits, holding its key, until
 * the topic is tried again, and so do its topic's other events.
 */
static void
wait_for_topic(SettleState *st, DeferredRows *rows, const VoutboxEvent *ev)
{
	TimestampTz due = voutbox_topic_retry_at(ev->topic);
	const char *code;
	const char *error = voutbox_topic_error(ev->topic, &code);

	deferred_rows_add(rows, ev, ev->msg_key != NULL, ev->attempts, due ? due : DT_NOBEGIN,
					  VOUTBOX_DELIVERY_NO_TOPIC, false, NULL);
	rows->errors[rows->n - 1] = pstrdup(error);
	rows->codes[rows->n - 1] = pstrdup(code);
	if (due != 0)
		topic_stalls(ev->topic, due);
	voutbox_stats_batch_add(st->stats, ev->tenant_id, ev->topic, 0, 0, 0, error);
}

/*
 * A sent event failed, first of its key in the round, with an error that is
 * the event's (not the producer's).  A permanent error kills the event when
 * it was sent alone; in a round shared with others the fault may be theirs
 * (a batch too large for the topic fails all of it), so it goes again at
 * once, alone.  A retriable error waits with backoff, and after
 * max_retries failed attempts the event goes to the DLQ.
 */
static void
charge_failure(SettleState *st, DeferredRows *rows, const VoutboxEvent *ev, int err, bool late)
{
	int			attempts = ev->attempts + 1;
	const char *dead = NULL;
	bool		alone = false;
	TimestampTz due = DT_NOBEGIN;

	if (err == VOUTBOX_DELIVERY_NO_TOPIC)
	{
		wait_for_topic(st, rows, ev);
		return;
	}

	if (voutbox_delivery_error_class(err) == VOUTBOX_ERROR_PERMANENT)
	{
		/* (A straggler was sent with others: it goes again alone.) */
		if (st->nsent == 1 && !late)
			dead = "permanent_error";
		else
			alone = true;
	}
	else if (attempts > voutbox_max_retries)
		dead = "max_retries_exceeded";
	else
		due = retry_due(attempts);
	deferred_rows_add(rows, ev, ev->msg_key != NULL, attempts, due, err, alone, dead);

	if (st->charged++ == 0)
	{
		st->first = ev;
		st->first_err = err;
		st->first_due = due;
	}
	st->alone += alone;
	st->dead += dead != NULL;
	if (err == RD_KAFKA_RESP_ERR__MSG_TIMED_OUT && dead == NULL)
		/*
		 * The retry may start up to a second late (the worker builds a new
		 * producer at most once a second) and then waits delivery_timeout.
		 */
		topic_stalls(ev->topic, TimestampTzPlusMilliseconds(due, (int64) voutbox_delivery_timeout + 1000));
	else if (voutbox_topic_refusal(err) && dead == NULL)
		/* librdkafka knows the topic to be missing: its events wait for the retry. */
		topic_stalls(ev->topic, due);
	if (voutbox_topic_refusal(err))
		voutbox_topic_missing(ev->topic);
	voutbox_stats_batch_add(st->stats, ev->tenant_id, ev->topic, 0, 1, 0,
							rows->errors[rows->n - 1]);
}

/* An event acknowledged by the broker. */
static void
count_delivered(SettleState *st, const VoutboxEvent *ev)
{
	/*
	 * Behind a failed event of its key, an acknowledged event means that the
	 * broker let a later batch through after a failed one (a real broker
	 * refuses it: its sequence has a gap).  Nothing can undo it; say so.
	 */
	if (key_failed(st->failed, ev))
		st->overtaken++;
	st->due_now |= topic_flows(ev->topic);
	voutbox_stats_batch_add(st->stats, ev->tenant_id, ev->topic, 1, 0, 0, NULL);
}

/* An event still in flight when its round is settled. */
static void
count_straggler(SettleState *st, const VoutboxEvent *ev)
{
	if (st->stragglers++ == 0)
		st->straggler_topic = ev->topic;
	topic_straggles(ev->topic);
	/* Its key's later events that failed wait behind it, uncharged. */
	(void) first_failure_of_key(st->failed, ev);
}

/*
 * Whether a failed event (its key's first failure) uses up an attempt: not
 * for the producer's trouble.  An event acknowledged without an offset
 * (producer.c) goes again uncharged the first time, with the reason
 * recorded; if its last recorded error is that already, it is charged, so
 * that a broker that never confirms a write cannot keep it going round.
 */
static bool
is_charged(const VoutboxEvent *ev, int err)
{
	if (err == VOUTBOX_DELIVERY_UNCONFIRMED)
		return ev->unconfirmed;
	return voutbox_delivery_error_class(err) != VOUTBOX_ERROR_PRODUCER;
}

/* The error recorded for an event that goes again uncharged: that one only. */
static int
recorded(int err)
{
	return err == VOUTBOX_DELIVERY_UNCONFIRMED ? err : 0;
}

static void
count_unconfirmed(SettleState *st, const VoutboxEvent *ev, int err)
{
	if (err == VOUTBOX_DELIVERY_UNCONFIRMED && st->unconfirmed++ == 0)
		st->unconfirmed_first = ev;
}

/*
 * A straggler out-waited delivery_timeout, still in flight: librdkafka
 * keeps trying, and the attempt counts as failed; its topic stays stalled.
 */
static void
charge_in_flight(SettleState *st, const VoutboxEvent *ev)
{
	if (st->timed_out_in_flight++ == 0)
		st->in_flight_first = ev;
	topic_straggles(ev->topic);
	voutbox_stats_batch_add(st->stats, ev->tenant_id, ev->topic, 0, 1, 0,
							voutbox_delivery_error_text(RD_KAFKA_RESP_ERR__MSG_TIMED_OUT));
}

static HTAB *keys_in_flight = NULL;

/*
 * Run an UPDATE of voutbox.deferred over the rows of the given ids ($1);
 * with an error err (else 0), its text and name are $2 and $3.
 */
static void
update_deferred(const char *sql, char **ids, int n, int err)
{
	Oid			types[3] = {TEXTARRAYOID, TEXTOID, TEXTOID};
	Datum		values[3];

	if (n == 0)
		return;
	values[0] = voutbox_text_array(ids, n);
	if (err != 0)
	{
		values[1] = CStringGetTextDatum(voutbox_delivery_error_text(err));
		values[2] = CStringGetTextDatum(voutbox_delivery_error_name(err));
	}
	voutbox_spi(sql, err != 0 ? 3 : 1, types, values, NULL, SPI_OK_UPDATE);
}

/*
 * Settle the deferred events that were sent again in this round, or (a late
 * round) the events that were still in flight when their round was settled.
 */
static void
settle_deferred(VoutboxRound *r, SettleState *st)
{
	DeferredRows charged;
	char	  **delivered = palloc(sizeof(char *) * Max(r->ndeferred, 1));
	Datum	   *partitions = palloc(sizeof(Datum) * Max(r->ndeferred, 1));
	Datum	   *offsets = palloc(sizeof(Datum) * Max(r->ndeferred, 1));
	char	  **in_flight = palloc(sizeof(char *) * Max(r->ndeferred, 1));
	char	  **again = palloc(sizeof(char *) * Max(r->ndeferred, 1));
	char	  **unconfirmed = palloc(sizeof(char *) * Max(r->ndeferred, 1));
	int			nunconfirmed = 0;
	char	  **charged_in_flight = palloc(sizeof(char *) * Max(r->ndeferred, 1));
	int			ncharged_in_flight = 0;
	int			ndelivered = 0;
	int			nin_flight = 0;
	int			nagain = 0;

	deferred_rows_init(&charged, r->ndeferred);
	for (int i = 0; i < r->ndeferred; i++)
	{
		VoutboxEvent *ev = &r->events[i];
		int			err = r->errs[i];

		count_unconfirmed(st, ev, err);
		if (err == VOUTBOX_DELIVERY_PENDING && r->late)
		{
			/*
			 * Still in flight after delivery_timeout: an attempt failed
			 * (only the key's first: the rest of the key waits behind it).
			 */
			if (first_failure_of_key(st->failed, ev))
			{
				charged_in_flight[ncharged_in_flight++] = ev->id;
				charge_in_flight(st, ev);
			}
		}
		else if (err == VOUTBOX_DELIVERY_PENDING)
		{
			in_flight[nin_flight++] = ev->id;
			count_straggler(st, ev);
		}
		else if (err == 0)
		{
			partitions[ndelivered] = Int32GetDatum(r->receipts[i].partition);
			offsets[ndelivered] = Int64GetDatum(r->receipts[i].offset);
			delivered[ndelivered++] = ev->id;
			count_delivered(st, ev);
		}
		else if (first_failure_of_key(st->failed, ev) && is_charged(ev, err))
			charge_failure(st, &charged, ev, err, r->late);
		else if (err == VOUTBOX_DELIVERY_UNCONFIRMED)
			unconfirmed[nunconfirmed++] = ev->id;
		else
			again[nagain++] = ev->id;
	}
	/* (The receipt goes with the row: a deferred row is updated anyway.) */
	if (ndelivered > 0)
	{
		Oid			types[3] = {TEXTARRAYOID, INT4ARRAYOID, INT8ARRAYOID};
		Datum		values[3];

		values[0] = voutbox_text_array(delivered, ndelivered);
		values[1] = voutbox_scalar_array(partitions, ndelivered, INT4OID, 4, true, TYPALIGN_INT);
		values[2] = voutbox_scalar_array(offsets, ndelivered, INT8OID, 8, FLOAT8PASSBYVAL,
										 TYPALIGN_DOUBLE);
		voutbox_spi("UPDATE " VOUTBOX_SCHEMA ".deferred d "
					"SET delivered_at = pg_catalog.now(), holds_key = false, alone = false, "
					"    kafka_partition = CASE WHEN x.kafka_offset >= 0 THEN x.kafka_partition END, "
					"    kafka_offset = CASE WHEN x.kafka_offset >= 0 THEN x.kafka_offset END "
					"FROM unnest($1::pg_catalog.uuid[], $2, $3) AS x(id, kafka_partition, kafka_offset) "
					"WHERE d.id = x.id", 3, types, values, NULL, SPI_OK_UPDATE);
	}
	/* (Their keys' next events, and the ones sent again, are due now.) */
	st->due_now |= ndelivered > 0 || nagain > 0 || nunconfirmed > 0 || charged.due_now;
	/* (In flight, it holds its key, as a straggler of the window does.) */
	update_deferred("UPDATE " VOUTBOX_SCHEMA ".deferred d SET due_at = 'infinity', "
					"  holds_key = d.holds_key OR d.msg_key IS NOT NULL "
					"WHERE d.id = ANY ($1::pg_catalog.uuid[])", in_flight, nin_flight, 0);
	update_deferred("UPDATE " VOUTBOX_SCHEMA ".deferred d "
					"SET attempts = d.attempts + 1, last_error = $2, last_error_code = $3, "
					"    last_error_at = pg_catalog.now() "
					"WHERE d.id = ANY ($1::pg_catalog.uuid[]) AND d.due_at = 'infinity' "
					"  AND d.delivered_at IS NULL AND d.dead_reason IS NULL",
					charged_in_flight, ncharged_in_flight, RD_KAFKA_RESP_ERR__MSG_TIMED_OUT);
	/*
	 * Not its key's first failure, or the producer's trouble: in order, at
	 * once (it was marked in flight when read).
	 */
	update_deferred("UPDATE " VOUTBOX_SCHEMA ".deferred d SET due_at = '-infinity' "
					"WHERE d.id = ANY ($1::pg_catalog.uuid[]) AND d.due_at = 'infinity'",
					again, nagain, 0);
	/* (The same, saying why: the next time, it is charged.) */
	update_deferred("UPDATE " VOUTBOX_SCHEMA ".deferred d SET due_at = '-infinity', "
					"  last_error = $2, last_error_code = $3, last_error_at = pg_catalog.now() "
					"WHERE d.id = ANY ($1::pg_catalog.uuid[]) AND d.due_at = 'infinity'",
					unconfirmed, nunconfirmed, VOUTBOX_DELIVERY_UNCONFIRMED);
	if (charged.n > 0)
	{
		Oid			types[8] = {TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID, INT4ARRAYOID,
		TIMESTAMPTZARRAYOID, BOOLARRAYOID, TEXTARRAYOID, BOOLARRAYOID};
		Datum		values[8];

		values[0] = voutbox_text_array(charged.ids, charged.n);
		values[1] = voutbox_text_array(charged.errors, charged.n);
		values[2] = voutbox_text_array(charged.codes, charged.n);
		values[3] = voutbox_scalar_array(charged.attempts, charged.n, INT4OID, 4, true, TYPALIGN_INT);
		values[4] = voutbox_scalar_array(charged.due, charged.n, TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE);
		values[5] = voutbox_scalar_array(charged.alone, charged.n, BOOLOID, 1, true, TYPALIGN_CHAR);
		values[6] = voutbox_text_array(charged.dead, charged.n);
		values[7] = voutbox_scalar_array(charged.holds, charged.n, BOOLOID, 1, true, TYPALIGN_CHAR);
		/*
		 * A failed event with a key now holds it (a scheduled one did not):
		 * its key's later events wait behind it.  (unnest() of several
		 * arrays in FROM is syntax and cannot be qualified; the worker's
		 * search_path is pg_catalog's alone, see session.c.)
		 */
		voutbox_spi("UPDATE " VOUTBOX_SCHEMA ".deferred d "
					"SET attempts = x.attempts, last_error = x.error, last_error_code = x.code, "
					"    last_error_at = pg_catalog.now(), due_at = x.due, alone = x.alone, "
					"    dead_reason = x.dead, holds_key = d.holds_key OR x.holds "
					"FROM unnest($1::pg_catalog.uuid[], $2, $3, $4, $5, $6, $7, $8) "
					"     AS x(id, error, code, attempts, due, alone, dead, holds) "
					"WHERE d.id = x.id", 8, types, values, NULL, SPI_OK_UPDATE);
	}
}

/*
 * Copy the chunk's events that were not delivered into voutbox.deferred:
 * held and scheduled ones, failed ones, and the later events of a failed
 * one's key.  Returns whether it copied any.
 */
static bool
defer_chunk_events(VoutboxRound *r, SettleState *st, int64 batch_id)
{
	DeferredRows rows;
	Oid			types[9] = {TEXTARRAYOID, BOOLARRAYOID, INT4ARRAYOID, TIMESTAMPTZARRAYOID,
	TEXTARRAYOID, TEXTARRAYOID, BOOLARRAYOID, TEXTARRAYOID, INT8OID};
	Datum		values[9];

	deferred_rows_init(&rows, r->nevents - r->ndeferred);
	for (int i = r->ndeferred; i < r->nevents; i++)
	{
		VoutboxEvent *ev = &r->events[i];
		int			err = r->errs[i];

		count_unconfirmed(st, ev, err);
		if (r->actions[i] == VOUTBOX_HOLD)
			deferred_rows_add(&rows, ev, true, 0, DT_NOBEGIN, 0, false, NULL);
		else if (r->actions[i] == VOUTBOX_SCHEDULE)
			deferred_rows_add(&rows, ev, false, 0, ev->scheduled_for, 0, false, NULL);
		else if (r->actions[i] == VOUTBOX_WAIT_TOPIC)
		{
			/*
			 * Ask again: this round may have shown the topic answering (its
			 * waiting events are then due now) or not (they wait longer).
			 */
			TimestampTz until = voutbox_topic_stalled_until(ev->topic, GetCurrentTimestamp());

			deferred_rows_add(&rows, ev, ev->msg_key != NULL, 0, until ? until : DT_NOBEGIN,
							  0, false, NULL);
		}
		else if (err == VOUTBOX_DELIVERY_PENDING)
		{
			deferred_rows_add(&rows, ev, ev->msg_key != NULL, 0, DT_NOEND, 0, false, NULL);
			count_straggler(st, ev);
		}
		else if (err == 0)
			count_delivered(st, ev);
		else if (!first_failure_of_key(st->failed, ev))
			deferred_rows_add(&rows, ev, true, 0, DT_NOBEGIN, recorded(err), false, NULL);
		else if (!is_charged(ev, err))
			deferred_rows_add(&rows, ev, ev->msg_key != NULL, 0, DT_NOBEGIN, recorded(err), false, NULL);
		else
			charge_failure(st, &rows, ev, err, false);
	}
	if (rows.n == 0)
		return false;
	st->due_now |= rows.due_now;

	values[0] = voutbox_text_array(rows.ids, rows.n);
	values[1] = voutbox_scalar_array(rows.holds, rows.n, BOOLOID, 1, true, TYPALIGN_CHAR);
	values[2] = voutbox_scalar_array(rows.attempts, rows.n, INT4OID, 4, true, TYPALIGN_INT);
	values[3] = voutbox_scalar_array(rows.due, rows.n, TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE);
	values[4] = voutbox_text_array(rows.errors, rows.n);
	values[5] = voutbox_text_array(rows.codes, rows.n);
	values[6] = voutbox_scalar_array(rows.alone, rows.n, BOOLOID, 1, true, TYPALIGN_CHAR);
	values[7] = voutbox_text_array(rows.dead, rows.n);
	values[8] = Int64GetDatum(batch_id);
	/*
	 * Each event is looked up by its id (a LATERAL subquery that cannot be
	 * pulled up): a join the planner were free to choose became, in the kept
	 * generic plan, a merge join over the whole ring, paid by every round
	 * that defers an event.
	 */
	voutbox_spi("INSERT INTO " VOUTBOX_SCHEMA ".deferred (" VOUTBOX_EVENT_COLUMNS ", "
				"  holds_key, attempts, due_at, last_error, last_error_code, last_error_at, "
				"  alone, dead_reason, batch_id, commit_pos) "
				"SELECT " VOUTBOX_EVENT_COLUMNS ", x.holds, x.attempts, x.due, x.error, x.code, "
				"       CASE WHEN x.error IS NULL THEN NULL ELSE pg_catalog.now() END, x.alone, "
				"       x.dead, $9, " VOUTBOX_COMMIT_POS("e.txid") " "
				"  FROM unnest($1::pg_catalog.uuid[], $2, $3, $4, $5, $6, $7, $8) "
				"       AS x(xid, holds, attempts, due, error, code, alone, dead), "
				"       LATERAL (SELECT * FROM " VOUTBOX_SCHEMA ".events e "
				"                 WHERE e.id = x.xid OFFSET 0) e",
				9, types, values, NULL, SPI_OK_INSERT);
	if (SPI_processed != (uint64) rows.n)
		elog(ERROR, "voutbox: deferred %d events but found " UINT64_FORMAT " of them",
			 rows.n, SPI_processed);
	return true;
}

/*
 * Move the events marked dead to the dead-letter queue.  Deleting the
 * deferred row and inserting the DLQ row is one statement: an event is never
 * in both places, nor in neither.  Only if nobody holds a conflicting lock on
 * voutbox.dlq: else they wait for a later try, and this says so (once a
 * minute in the log).  Returns how many moved; in a transaction of the
 * worker.
 */
static TimestampTz dlq_locked_since = 0;
static TimestampTz dlq_locked_told = 0;

uint64
voutbox_move_dead_events(VoutboxStatsBatch *stats)
{
	Oid			relid = get_relname_relid("dlq", get_namespace_oid(VOUTBOX_SCHEMA, false));
	TimestampTz now = GetCurrentTimestamp();
	uint64		moved;

	if (!OidIsValid(relid))
		elog(ERROR, "voutbox: the table " VOUTBOX_SCHEMA ".dlq does not exist");
	if (!ConditionalLockRelationOid(relid, RowExclusiveLock))
	{
		if (dlq_locked_since == 0)
			dlq_locked_since = now;
		if (TimestampDifferenceExceeds(dlq_locked_told, now, 60000))
		{
			dlq_locked_told = now;
			ereport(LOG,
					(errmsg("voutbox: outbox_dlq is locked; dead events wait to be moved there"),
					 errdetail("They are not sent again, and their keys go on; they move once the lock is released.")));
		}
		return 0;
	}
	dlq_locked_since = dlq_locked_told = 0;
	voutbox_spi("WITH moved AS ("
				"  DELETE FROM " VOUTBOX_SCHEMA ".deferred d "
				"   WHERE d.dead_reason IS NOT NULL RETURNING d.*) "
				"INSERT INTO " VOUTBOX_SCHEMA ".dlq (id, tenant_id, aggregate_type, aggregate_id, "
				"  event_type, event_version, payload, metadata, idempotency_key, trace_id, "
				"  traceparent, correlation_id, created_at, scheduled_for, pii, pii_fields, "
				"  consent, producer, topic, msg_key, route, format, headers, seq, "
				"  retry_count, last_error, error_code, reason) "
				"SELECT m.id, m.tenant_id, m.aggregate_type, m.aggregate_id, m.event_type, "
				"  m.event_version, m.payload, m.metadata, coalesce(m.idempotency_key, m.id::text), "
				"  m.trace_id, m.traceparent, m.correlation_id, m.created_at, m.scheduled_for, "
				"  m.pii, m.pii_fields, m.consent, m.producer, m.topic, m.msg_key, "
				"  m.route, m.format, m.headers, m.seq, "
				"  m.attempts, m.last_error, m.last_error_code, m.dead_reason "
				"  FROM moved m "
				"RETURNING tenant_id, topic",
				0, NULL, NULL, NULL, SPI_OK_INSERT_RETURNING);
	moved = SPI_processed;
	for (uint64 i = 0; i < moved && stats != NULL; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];

		voutbox_stats_batch_add(stats, SPI_getvalue(tup, SPI_tuptable->tupdesc, 1),
								SPI_getvalue(tup, SPI_tuptable->tupdesc, 2), 0, 0, 1, NULL);
	}
	return moved;
}

/* Whether dead events wait for the DLQ's lock. */
bool
voutbox_dead_events_wait(void)
{
	return dlq_locked_since != 0;
}

static void
log_failures(const SettleState *st)
{
	if (st->stragglers > 0)
		ereport(LOG,
				(errmsg("voutbox: %d events (first of topic \"%s\") have no delivery report while events sent after them were acknowledged; their rounds are settled without them",
						st->stragglers, st->straggler_topic),
				 errdetail("They wait for their report out of the stream, holding their keys, and their topic's new events wait; librdkafka keeps trying, and every voutbox.delivery_timeout without a report counts as a failed attempt.")));
	if (st->timed_out_in_flight > 0)
		ereport(LOG,
				(errmsg("voutbox: %d stragglers have had no delivery report for another %d ms; a failed attempt is counted, and librdkafka keeps trying",
						st->timed_out_in_flight, voutbox_delivery_timeout),
				 errdetail("First: event %s (topic \"%s\", attempt %d). After voutbox.max_retries failed attempts they go to the dead-letter queue.",
						   st->in_flight_first->id, st->in_flight_first->topic,
						   st->in_flight_first->attempts + 1)));
	if (st->charged > 0)
	{
		long		delay = 0;

		if (st->first_due != DT_NOBEGIN)
			delay = (long) ((st->first_due - GetCurrentTimestamp()) / 1000);
		ereport(LOG,
				(errmsg("voutbox: %d of %d events sent failed: %d wait for a retry, %d go again alone, %d moved to the dead-letter queue",
						st->charged, st->nsent, st->charged - st->alone - st->dead,
						st->alone, st->dead),
				 errdetail("First: event %s (topic \"%s\", attempt %d): %s; next attempt in %ld ms.",
						   st->first->id, st->first->topic, st->first->attempts + 1,
						   voutbox_delivery_error_text(st->first_err), Max(delay, 0))));
	}
	if (st->unconfirmed > 0)
		ereport(LOG,
				(errmsg_plural("voutbox: %d event was acknowledged without an offset; it is not counted delivered",
							   "voutbox: %d events were acknowledged without an offset; they are not counted delivered",
							   st->unconfirmed, st->unconfirmed),
				 errdetail("First: event %s (topic \"%s\"). Such an acknowledgement does not prove that the event was written: it goes again, and may reach Kafka twice, never not at all. The second time an event is acknowledged so, it is charged a retry.",
						   st->unconfirmed_first->id, st->unconfirmed_first->topic)));
	if (st->overtaken > 0)
		ereport(WARNING,
				(errmsg("voutbox: the broker acknowledged %d events behind a failed event of their key",
						st->overtaken),
				 errdetail("The order of those keys may be broken; a Kafka broker refuses such batches of an idempotent producer.")));
}


/* ---------------------------------------------------------------------
 * Entry points (storage.c)
 * ---------------------------------------------------------------------
 */

/*
 * Before the settling transaction: a settlement of rounds that were in
 * flight together, judged as one (only the first failure of a key among
 * them is the key's; an event sent alone is one that nothing else was in
 * flight with).
 */
VoutboxSettlement *
voutbox_settle_begin(void)
{
	SettleState *st = palloc0(sizeof(SettleState));

	st->failed = voutbox_key_set_new("voutbox failed keys");
	st->stats = voutbox_stats_batch_new(true);
	return (VoutboxSettlement *) st;
}

/*
 * Count a round of the settlement, before it is settled (not stragglers:
 * "sent alone" is about the rounds sent together).
 */
void
voutbox_settle_count(VoutboxSettlement *s, const VoutboxRound *r)
{
	SettleState *st = (SettleState *) s;

	if (r->late)
		return;
	for (int i = 0; i < r->nevents; i++)
		st->nsent += r->errs[i] != VOUTBOX_DELIVERY_SKIPPED;
}

/*
 * In the settling transaction: record the outcome of every event of the
 * round; batch_id is that of the cursor row of its chunk.  Returns whether
 * events of the chunk were copied to voutbox.deferred.
 */
bool
voutbox_settle_events(VoutboxSettlement *s, VoutboxRound *r, int64 batch_id)
{
	SettleState *st = (SettleState *) s;
	bool		deferred = false;

	/*
	 * After the stragglers' own news (a late round comes first): a key with
	 * a straggler in flight failed first there; its later events that fail
	 * wait behind it, uncharged.
	 */
	if (!r->late && !st->seeded)
	{
		st->seeded = true;
		if (keys_in_flight != NULL)
		{
			HASH_SEQ_STATUS seq;
			uint64	   *h;

			hash_seq_init(&seq, keys_in_flight);
			while ((h = hash_seq_search(&seq)) != NULL)
				(void) hash_search(st->failed, h, HASH_ENTER, NULL);
		}
	}

	settle_deferred(r, st);
	if (r->nevents > r->ndeferred)
		deferred = defer_chunk_events(r, st, batch_id);
	if (st->dead > 0 || voutbox_dead_events_wait())
		(void) voutbox_move_dead_events(st->stats);
	return deferred;
}

/*
 * Whether the settlement may have made deferred events due at once: sent
 * again now, or waiting behind a key or a topic that it released (an event
 * delivered, or marked dead).  (Events due later are found by
 * voutbox_next_due().)
 */
bool
voutbox_settle_made_due(VoutboxSettlement *s)
{
	return ((SettleState *) s)->due_now;
}

/*
 * The keys of stragglers in flight (stream.c), for the next settlement: a
 * map whose entries start with the key's hash.
 */
void
voutbox_settle_keys_in_flight(HTAB *keys)
{
	keys_in_flight = keys;
}

/* After the commit: the statistics and the log. */
void
voutbox_settle_end(VoutboxSettlement *s)
{
	SettleState *st = (SettleState *) s;

	voutbox_stats_batch_flush(st->stats);
	log_failures(st);
}
