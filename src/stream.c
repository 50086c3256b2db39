/*-------------------------------------------------------------------------
 *
 * stream.c
 *		The delivery worker's loop: read, send, acknowledge and settle,
 *		overlapping.
 *
 * Rounds of events (storage.c) are read and handed to librdkafka while
 * earlier ones are in flight: up to STREAM_ROUNDS rounds, voutbox.batch_size
 * events and voutbox.batch_bytes of them.  Delivery reports come back
 * through a callback that only records them, by ticket, in their round.  As
 * soon as the oldest rounds have every report, they are settled together in
 * one short transaction, while the later ones fly on.  Rounds are settled in
 * the order they were read, which keeps the cursor rows, the retry queue
 * and the keys' order what a lock-step worker would have written.
 *
 * A failure changes the pace: once an event of the rounds in flight has
 * failed, nothing more is read, and when every round in flight has its
 * reports, they are all settled as one (settle.c: only the first failure of
 * a key among them is the key's, the rest of the key waits behind it).
 * Events of a key sent in several rounds in flight keep their order as the
 * events of one batch do: the idempotent producer sends them in order, and
 * with enable.gapless.guarantee a failed batch stops the producer rather
 * than let later ones of its partition through.  Events that wait (held
 * behind their key, or for their topic) hold their key from the moment they
 * are read, not only once settled into voutbox.deferred: later rounds do not
 * send that key's events meanwhile.  Deferred events (retries, held keys,
 * scheduled events) that are due go with the next round, even while others
 * are in flight: reading one marks it in flight (storage.c), so that no
 * deferred row is read twice; one that must go alone waits for an empty
 * stream.
 *
 * A steady trickle costs little: a window that fits in a round is read by
 * one kept plan, with no cursor (storage.c), and while a round is in flight,
 * wake-ups are coalesced: the next round is read at most every
 * READ_COALESCE_MS, unless the last read left events behind.
 *
 * Errors are those of worker.c: an ERROR while reading ends the worker
 * (what it did not settle is sent again by the next one), but a lock waited
 * for too long only delays reading; an ERROR while settling keeps the
 * rounds and tries again with a growing delay, sending nothing meanwhile.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <librdkafka/rdkafka.h>

#include "access/twophase.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/pmsignal.h"
#include "storage/latch.h"
#include "storage/spin.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "voutbox.h"

/*
 * Rounds waiting for reports at once, and the share of the budget one round
 * takes; and the most rounds read and not settled (acknowledged rounds wait
 * behind an older one that is not).
 */
#define STREAM_ROUNDS			16
#define ROUND_SHARE				4
#define STREAM_MAX_ROUNDS		4096
/*
 * How long a round waits for a report before events of it that were sent
 * before an acknowledged one count as stragglers, in ms.
 */
#define STRAGGLER_MS			1000
/*
 * How long acknowledged rounds may wait to be settled together, in ms:
 * settling is the worker's bookkeeping, not delivery, and one settle (and
 * one WAL flush) for many rounds costs little more than for one.
 */
#define SETTLE_DELAY_MS			10
/*
 * exactly_once: how long a Kafka transaction takes new rounds, in ms, while
 * a backlog is read (it is committed as soon as nothing more waits).
 */
#define EOS_TXN_MS				100
/* Least time between two reads while a round is in flight, in ms. */
#define READ_COALESCE_MS		1
/* How often deferred events are looked for while rounds are in flight. */
#define DUE_CHECK_MS			1000
/*
 * Least time between two reads of deferred events that fall due, in ms:
 * retries due one after the other (their backoff is jittered) are read
 * together, not each in a read of its own.
 */
#define DUE_COALESCE_MS			50
/* How often to look again for a missing extension, or a producer. */
#define RECHECK_MS				5000
/* Longest delay between tries of a failing settle, or producer. */
#define FAILING_DELAY_MAX_MS	60000
/*
 * How often to look whether the standbys of voutbox.standby_names caught
 * up: at first, and at the longest (the delay doubles meanwhile), in ms.
 */
#define STANDBY_POLL_MIN_MS		1
#define STANDBY_POLL_MAX_MS		100
/* Longest delay between reads that a user's lock made time out. */
#define LOCK_RETRY_MAX_MS		10000

typedef struct Stream
{
	/* the producer */
	VoutboxProducer *producer;
	char	   *producer_error;		/* why the last build failed, or NULL */
	TimestampTz producer_built_at;	/* last attempt to build it */
	int			producer_failures;	/* producers in a row that failed before delivering */
	TimestampTz producer_retry_at;	/* no new producer before then */
	/* reading */
	VoutboxCursor cursor;
	VoutboxStorageStatus told_status;	/* what the log said last */
	bool		more;			/* events may wait: read */
	TimestampTz last_read;
	TimestampTz last_due_check;
	bool		due_waiting;	/* deferred events are due: read them with the next round */
	bool		alone_waiting;	/* one that goes alone is due: read after the stream empties */
	/*
	 * The last look for due deferred events found none: an empty stream
	 * does not look again (each look reads the heads of the keys held
	 * there, which a silent topic makes many) until a settle, the SQL
	 * (outbox_dlq_requeue) or the clock (next_due) may have made some due,
	 * or the check every DUE_CHECK_MS finds some.
	 */
	bool		deferred_dry;
	TimestampTz next_due;		/* when a deferred event is due, or 0 */
	/*
	 * A round read and not sent: it waits for the standbys to flush the WAL
	 * up to standby_lsn (standbys.c).
	 */
	struct VoutboxRound *held_round;
	bool		held_stale;		/* rounds were settled since it was read */
	XLogRecPtr	standby_lsn;
	char		standby_behind[2 * NAMEDATALEN];
	int			standby_poll_ms;
	TimestampTz standby_check_at;
	TimestampTz last_deferred_read;
	int			lock_failures;	/* reads that timed out on a lock in a row */
	TimestampTz lock_retry_at;
	TimestampTz lock_told_at;
	bool		reading;
	MemoryContext reading_cxt;	/* the round being read */
	/* in flight, oldest first */
	MemoryContext cxt;
	VoutboxRound *head;
	VoutboxRound *tail;
	int			nrounds;
	int			nevents;
	int64		bytes;
	uint64		next_ticket;
	bool		failing;		/* an event in flight failed */
	/*
	 * Keys that events of rounds in flight hold though they are not in
	 * voutbox.deferred yet (held or waiting for their topic: they go there
	 * when their round is settled), with how many such events each.
	 */
	HTAB	   *held;
	uint64		last_acked;		/* the latest ticket acknowledged */
	/*
	 * Rounds settled with events still in flight (stragglers, settle.c),
	 * oldest first: what is left of them is settled when their reports come.
	 */
	VoutboxRound *late_head;
	VoutboxRound *late_tail;
	int			nlate;			/* their events waiting for a report */
	int			late_events;	/* all their events */
	HTAB	   *late_keys;		/* keys of stragglers waiting, with how many each */
	TimestampTz late_reported_at;	/* first report of theirs not settled, or 0 */
	bool		late_given_up;	/* the producer was purged for their deadline */
	/* an ERROR while reading: stop once the rounds in flight are settled */
	bool		stop_after_drain;
	/* exactly_once (eos.c) */
	bool		eos;			/* the producer is transactional */
	bool		recovered;		/* no settle left prepared by a dead worker */
	TimestampTz recover_at;		/* next try of the recovery */
	int			eos_failures;	/* transactions in a row that could not commit */
	TimestampTz eos_retry_at;	/* nothing is sent before then */
	char	   *recover_error;	/* why the last one failed */
	/* settling */
	bool		unsettled;		/* a settle failed: try again, read nothing */
	int			settle_failures;
	TimestampTz settle_retry_at;
	char	   *settled_lo;		/* every event it sees is settled */
	TimestampTz next_cleanup;
	/* what it sleeps on: its latch, and the producer's queue */
	WaitEventSet *waits;
	int			waits_socket;
} Stream;

static int	late_index(VoutboxRound *r, uint64 ticket);

/* The delivery worker's state for outbox_worker, and pg_stat_activity's. */
static void
worker_state(const char *state, const char *what, bool running)
{
	pgstat_report_activity(running ? STATE_RUNNING : STATE_IDLE, what);
	voutbox_stats_set_state(state, what);
}

/* 1 s, doubling with every failure in a row, at most a minute. */
static long
failing_delay_ms(int failures)
{
	long		delay = 1000;

	for (int i = 1; i < failures && delay < FAILING_DELAY_MAX_MS; i++)
		delay *= 2;
	return Min(delay, FAILING_DELAY_MAX_MS);
}

/* ---------------------------------------------------------------------
 * The producer
 * ---------------------------------------------------------------------
 */

/*
 * What a straggler gets when the producer is purged: a timeout, if it
 * out-waited its deadline (the purge was for it); else the purge's error.
 */
static int
late_outcome(Stream *s, VoutboxRound *r, int err)
{
	/*
	 * (No timeout reaches a straggler from librdkafka, message.timeout.ms
	 * being 0: one that does came from a purge for the others' sake.)
	 */
	if (err == RD_KAFKA_RESP_ERR__PURGE_QUEUE || err == RD_KAFKA_RESP_ERR__PURGE_INFLIGHT ||
		err == RD_KAFKA_RESP_ERR__MSG_TIMED_OUT)
		return s->late_given_up && r->charge_due ?
			RD_KAFKA_RESP_ERR__MSG_TIMED_OUT : RD_KAFKA_RESP_ERR__PURGE_QUEUE;
	return err;
}

/* A report for an event of a round settled without it. */
static void
record_late_report(Stream *s, VoutboxRound *r, int i, int err, int32 partition, int64 offset)
{
	r->errs[i] = late_outcome(s, r, err);
	r->receipts[i].partition = partition;
	r->receipts[i].offset = offset;
	r->pending--;
	s->nlate--;
	if (s->late_reported_at == 0)
		s->late_reported_at = GetCurrentTimestamp();
}

/*
 * A delivery report, inside librdkafka: record it in its round.  A report
 * for no round in flight (one given up on) is dropped.
 */
static void
record_report(void *arg, uint64 ticket, int err, int32 partition, int64 offset)
{
	Stream	   *s = arg;

	if (err == 0 && ticket > s->last_acked)
		s->last_acked = ticket;
	for (VoutboxRound *r = s->late_head; r != NULL; r = r->next)
	{
		int			i = late_index(r, ticket);

		if (i < 0)
			continue;
		if (r->errs[i] == VOUTBOX_DELIVERY_PENDING)
			record_late_report(s, r, i, err, partition, offset);
		return;
	}
	for (VoutboxRound *r = s->head; r != NULL; r = r->next)
	{
		if (ticket < r->first_ticket || ticket >= r->first_ticket + r->nevents)
			continue;
		if (r->errs[ticket - r->first_ticket] == VOUTBOX_DELIVERY_PENDING)
		{
			r->errs[ticket - r->first_ticket] = err;
			r->receipts[ticket - r->first_ticket].partition = partition;
			r->receipts[ticket - r->first_ticket].offset = offset;
			r->pending--;
			if (err != 0)
				r->failed = s->failing = true;
		}
		return;
	}
}

/*
 * Reports that did not come after a purge: the events count as purged, or
 * as timed out if the purge was for want of reports.
 */
static void
give_up_reports(Stream *s)
{
	int			err = s->producer != NULL && voutbox_producer_timed_out(s->producer) ?
		RD_KAFKA_RESP_ERR__MSG_TIMED_OUT : RD_KAFKA_RESP_ERR__PURGE_QUEUE;

	for (VoutboxRound *r = s->head; r != NULL; r = r->next)
	{
		if (r->pending == 0)
			continue;
		for (int i = 0; i < r->nevents && r->pending > 0; i++)
			if (r->errs[i] == VOUTBOX_DELIVERY_PENDING)
			{
				r->errs[i] = err;
				r->pending--;
			}
		r->pending = 0;
		r->failed = s->failing = true;
	}
	for (VoutboxRound *r = s->late_head; r != NULL && s->nlate > 0; r = r->next)
		for (int i = 0; i < r->nevents && r->pending > 0; i++)
			if (r->errs[i] == VOUTBOX_DELIVERY_PENDING)
				record_late_report(s, r, i, err, -1, -1);
}

/*
 * Stragglers out-wait voutbox.delivery_timeout.  librdkafka keeps trying
 * to deliver them (its own retries, with its own backoff, cost nothing
 * here), and the worker keeps the books: every delivery_timeout without a
 * report is charged as a failed attempt (settle.c), with the event still
 * in flight, and its topic stays stalled.  Only when a straggler has no
 * retry left is the producer purged (librdkafka cannot drop one message):
 * the stragglers whose time is up time out (to the DLQ if they have no
 * retry left), the other events in flight go again, in order, and a new
 * producer is built at once.
 */
static void
expire_late(Stream *s)
{
	TimestampTz now = GetCurrentTimestamp();
	int			expired = 0;
	bool		last_try = false;

	if (s->late_given_up || s->nlate == 0)
		return;
	for (VoutboxRound *r = s->late_head; r != NULL; r = r->next)
	{
		if (r->pending == 0 || r->charge_due)
			continue;
		/* An outage uses up no retry: the deadline counts from its end. */
		if (voutbox_producer_outage(s->producer))
		{
			r->read_at = now;
			continue;
		}
		/* (read_at: when it straggled, or was last charged) */
		if (!TimestampDifferenceExceeds(r->read_at, now, voutbox_delivery_timeout))
			continue;
		expired += r->pending;
		for (int i = 0; i < r->nevents; i++)
			if (r->errs[i] == VOUTBOX_DELIVERY_PENDING && r->events[i].attempts >= voutbox_max_retries)
				last_try = true;
	}
	if (expired == 0)
		return;
	/* The last try of one: give up on the producer; or try again later. */
	if (last_try && !voutbox_producer_give_up(s->producer))
		return;
	for (VoutboxRound *r = s->late_head; r != NULL; r = r->next)
		if (r->pending > 0 && !r->charge_due &&
			TimestampDifferenceExceeds(r->read_at, now, voutbox_delivery_timeout))
			r->charge_due = true;
	if (!last_try)
	{
		if (s->late_reported_at == 0)
			s->late_reported_at = now;
		return;
	}
	s->late_given_up = true;
	ereport(LOG,
			(errmsg("voutbox: stragglers have had no delivery report for %d ms, and some have no retry left; %d events in flight are given up",
					voutbox_delivery_timeout, voutbox_producer_pending(s->producer)),
			 errdetail("The stragglers time out; the other events go again, in order, with a new producer.")));
}

/*
 * exactly_once: another producer of the transactional.id took over (a
 * second server with this database's system identifier, after a failover).
 * Nothing more is delivered until the configuration is reloaded: taking the
 * transactional.id back would fence the other in turn (eos.c).  The slot
 * keeps it across restarts of the worker.
 */
static void
fence(Stream *s)
{
	SpinLockAcquire(&voutbox_shared->mutex);
	voutbox_my_slot->fenced = true;
	SpinLockRelease(&voutbox_shared->mutex);
	ereport(LOG,
			(errmsg("voutbox: another Kafka producer with transactional.id \"%s\" took over; this worker delivers nothing more",
					voutbox_transactional_id()),
			 errdetail("Another server with this database's system identifier (a failed-over primary, or a copy) delivers its outbox."),
			 errhint("Stop the other server's worker, then reload this server's configuration (pg_reload_conf()) to deliver from here again.")));
	s->recovered = false;
}

/* A reload ends the fence (see fence()). */
static void
unfence(Stream *s)
{
	bool		was;

	SpinLockAcquire(&voutbox_shared->mutex);
	was = voutbox_my_slot->fenced;
	voutbox_my_slot->fenced = false;
	SpinLockRelease(&voutbox_shared->mutex);
	if (was)
	{
		s->recovered = false;
		s->recover_at = 0;
		ereport(LOG,
				(errmsg("voutbox: the configuration was reloaded: the worker takes the transactional.id \"%s\" back",
						voutbox_transactional_id())));
	}
}

/*
 * Remember error (NULL: none) in *last; returns whether it is new, i.e.
 * worth a log line: an error that persists is logged once.
 */
static bool
new_error(char **last, const char *error)
{
	bool		is_new = error != NULL &&
		(*last == NULL || strcmp(*last, error) != 0);

	if (*last != NULL)
		pfree(*last);
	*last = error != NULL ? MemoryContextStrdup(TopMemoryContext, error) : NULL;
	return is_new;
}

/*
 * Before anything is read: not fenced, and no settle left prepared by a
 * dead worker (eos.c).  Returns whether the worker may read.
 */
static bool
eos_ready(Stream *s, long *wait_ms)
{
	char	   *error = NULL;
	bool		fenced;
	TimestampTz now = GetCurrentTimestamp();

	SpinLockAcquire(&voutbox_shared->mutex);
	fenced = voutbox_my_slot->fenced;
	SpinLockRelease(&voutbox_shared->mutex);
	if (fenced)
	{
		worker_state("fenced",
					 "another producer took the transactional.id over; reload the configuration to take it back",
					 false);
		return false;
	}
	if (s->recovered)
		return true;
	if (now < s->recover_at)
	{
		if (wait_ms != NULL)
			*wait_ms = Min(*wait_ms, (s->recover_at - now) / 1000 + 1);
		return false;
	}
	if (voutbox_eos_recover(&error))
	{
		s->recovered = true;
		(void) new_error(&s->recover_error, NULL);
		return true;
	}
	if (new_error(&s->recover_error, error))
		ereport(LOG,
				(errmsg("voutbox: recovery: could not tell whether Kafka committed the settle a worker left prepared: %s",
						error),
				 errdetail("Nothing is read until it can; the worker tries again every %d ms.", RECHECK_MS)));
	worker_state("recovering", "waiting for Kafka to tell whether a prepared settle was committed", false);
	s->recover_at = TimestampTzPlusMilliseconds(now, RECHECK_MS);
	if (wait_ms != NULL)
		*wait_ms = Min(*wait_ms, RECHECK_MS);
	return false;
}

/*
 * Destroy a producer that broke or whose settings changed.  One that failed
 * fatally before it delivered anything counts as a failure in a row: the
 * next is built after a growing delay, so that a producer that cannot work
 * (an ACL the cluster lacks, a broker that refuses idempotence) does not
 * make the worker send the same events again every second.
 */
static void
retire_producer(Stream *s)
{
	TimestampTz now = GetCurrentTimestamp();
	bool		failed = voutbox_producer_failed(s->producer) &&
		!voutbox_producer_delivered_any(s->producer);

	if (voutbox_producer_fenced(s->producer))
		fence(s);
	voutbox_producer_destroy(s->producer);
	s->producer = NULL;
	/* Purged for stragglers: the next one is built at once. */
	if (s->late_given_up)
	{
		s->late_given_up = false;
		s->producer_built_at = 0;
	}
	/* Its pipe is closed: the next wait builds its set again. */
	if (s->waits != NULL)
	{
		FreeWaitEventSet(s->waits);
		s->waits = NULL;
	}
	if (!failed)
	{
		s->producer_failures = 0;
		return;
	}
	s->producer_failures++;
	s->producer_retry_at = TimestampTzPlusMilliseconds(now, failing_delay_ms(s->producer_failures));
	ereport(LOG,
			(errmsg("voutbox: the Kafka producer failed %d time%s in a row before it delivered anything; the next one is built in %ld ms",
					s->producer_failures, s->producer_failures == 1 ? "" : "s",
					failing_delay_ms(s->producer_failures)),
			 errhint("See the error above; nothing is lost meanwhile.")));
}

/*
 * Build the producer if there is none.  Returns false if it cannot be built
 * (now); the error is logged once per configuration.
 */
static bool
ensure_producer(Stream *s)
{
	char	   *error = NULL;
	TimestampTz now = GetCurrentTimestamp();

	if (s->producer != NULL)
		return true;
	if (!eos_ready(s, NULL))
		return false;
	if (now < s->producer_retry_at)
	{
		worker_state("producer failing",
					 psprintf("the Kafka producer failed %d times in a row; next try in %ld ms",
							  s->producer_failures, (long) ((s->producer_retry_at - now) / 1000)),
					 false);
		return false;
	}

	/*
	 * Build at most once a second, and retry a configuration that failed
	 * only every few seconds: a producer that keeps failing must not spin.
	 */
	if (!TimestampDifferenceExceeds(s->producer_built_at, now,
									s->producer_error ? RECHECK_MS : 1000))
		return false;
	s->producer_built_at = now;
	if (voutbox_delivery == VOUTBOX_EXACTLY_ONCE && max_prepared_xacts == 0)
		error = pstrdup("voutbox.delivery = exactly_once needs max_prepared_transactions > 0");
	else
		s->producer = voutbox_producer_create(voutbox_delivery == VOUTBOX_EXACTLY_ONCE, &error);
	if (s->producer != NULL)
	{
		s->eos = voutbox_delivery == VOUTBOX_EXACTLY_ONCE;
		voutbox_producer_set_reporter(s->producer, record_report, s);
		(void) new_error(&s->producer_error, NULL);
		return true;
	}
	if (new_error(&s->producer_error, error))
		ereport(LOG,
				(errmsg("voutbox: could not create the Kafka producer: %s", error),
				 errhint("Fix voutbox.brokers, voutbox.kafka_properties, voutbox.kafka_secrets_file or voutbox.delivery and reload the configuration.")));
	worker_state("no kafka configuration", "waiting for a valid Kafka configuration", false);
	return false;
}

/*
 * Serve librdkafka and watch its deadlines; a producer that broke (or whose
 * settings changed) goes once it has nothing in flight.
 */
static void
serve_producer(Stream *s)
{
	VoutboxProducer *p = s->producer;

	if (p != NULL)
	{
		voutbox_producer_serve(p);
		voutbox_producer_set_stragglers(p, s->nlate);
		expire_late(s);
		if (voutbox_producer_watch(p))
			give_up_reports(s);
		else if (voutbox_producer_pending(p) > 0)
			return;
	}

	/*
	 * Nothing is outstanding in librdkafka, so no report will come for an
	 * event a round still waits for: it counts as not sent (and goes again).
	 * Should never happen; say so if it does.
	 */
	for (VoutboxRound *r = s->head; r != NULL || s->nlate > 0; r = r->next)
		if (r == NULL || r->pending > 0)
		{
			ereport(LOG,
					(errmsg("voutbox: events in flight wait for delivery reports that cannot come; they go again")));
			give_up_reports(s);
			break;
		}
	if (p != NULL && (voutbox_producer_is_broken(p) || voutbox_producer_config_changed(p)))
		retire_producer(s);
}

/* ---------------------------------------------------------------------
 * Reading and sending
 * ---------------------------------------------------------------------
 */

typedef struct HeldKey
{
	uint64		hash;
	int			events;
} HeldKey;

/*
 * Whether librdkafka refused a window event of the round for its topic
 * (send_round() counts its key held from then on).
 */
static inline bool
refused_by_topic(VoutboxRound *r, int i)
{
	return i >= r->ndeferred && r->actions[i] == VOUTBOX_SEND &&
		voutbox_topic_refusal(r->errs[i]);
}

/*
 * Count (delta +1) or uncount (-1) the keys the round's unsent events hold:
 * until the round is settled and they are in voutbox.deferred, later events
 * of their keys must wait as if they were.
 */
static void
count_held_keys(Stream *s, VoutboxRound *r, int delta)
{
	for (int i = r->ndeferred; i < r->nevents; i++)
	{
		VoutboxEvent *ev = &r->events[i];
		uint64		h;
		HeldKey    *k;
		bool		found;

		if (ev->msg_key == NULL ||
			(r->actions[i] != VOUTBOX_HOLD && r->actions[i] != VOUTBOX_WAIT_TOPIC &&
			 !refused_by_topic(r, i)))
			continue;
		h = voutbox_key_hash(ev->topic, ev->msg_key);
		k = hash_search(s->held, &h, delta > 0 ? HASH_ENTER : HASH_FIND, &found);
		if (k == NULL)
			continue;
		k->events = (found ? k->events : 0) + delta;
		if (k->events <= 0)
			(void) hash_search(s->held, &h, HASH_REMOVE, NULL);
	}
}

/* Log why the worker does not deliver, once per reason. */
static void
tell_not_ready(Stream *s, VoutboxStorageStatus status, const char *version)
{
	if (s->told_status == status)
		return;
	s->told_status = status;
	if (status == VOUTBOX_STORAGE_MISSING)
		ereport(LOG,
				(errmsg("voutbox: extension \"voutbox\" is not installed in database \"%s\"",
						voutbox_worker_dbname),
				 errhint("Run CREATE EXTENSION voutbox in that database.")));
	else if (status == VOUTBOX_STORAGE_OTHER_VERSION)
		ereport(LOG,
				(errmsg("voutbox: extension \"voutbox\" in database \"%s\" is version %s, but the library is version %s",
						voutbox_worker_dbname, version, VOUTBOX_SQL_VERSION),
				 errdetail("No event is delivered until the versions agree; nothing is lost."),
				 errhint("Run ALTER EXTENSION voutbox UPDATE in that database.")));
	else
		ereport(LOG,
				(errmsg("voutbox: database \"%s\" has the encoding SQL_ASCII; no event is delivered",
						voutbox_worker_dbname),
				 errdetail("The envelope is UTF-8 JSON, and SQL_ASCII does not say what the stored bytes mean, so they cannot be converted."),
				 errhint("Keep the outbox in a database with a real encoding (UTF8 is best); events stay pending meanwhile.")));
}

static void count_key(HTAB *keys, const VoutboxEvent *ev, int delta);

/*
 * A key refused for its topic in a round, with the error: its later events
 * of the round get it too.  (Any other failure stops the round.)
 */
typedef struct RefusedKey
{
	uint64		hash;
	int			err;
} RefusedKey;

/*
 * Hand the round's events to the producer.  An event librdkafka refuses at
 * once keeps its key's later events of the round from going (they get its
 * error, unsent: they wait behind it); a failure stops reading until the
 * stream is settled, unless it is its topic's.  A topic librdkafka knows to
 * be missing refuses each of its events at once, and only them: the other
 * topics go on; the refused events wait for a retry, their topic stalled
 * (settle.c), and until their round is settled their keys are held here,
 * so that no later round sends an event of those keys ahead of them.
 */
static void
send_round(Stream *s, VoutboxRound *r)
{
	HTAB	   *refused = NULL;

	r->first_ticket = s->next_ticket;
	s->next_ticket += Max(r->nevents, 1);
	for (int i = 0; i < r->nevents; i++)
	{
		VoutboxEvent *ev = &r->events[i];
		uint64		h = 0;
		RefusedKey *k = NULL;
		int			err;

		if (ev->msg_key != NULL)
			h = voutbox_key_hash(ev->topic, ev->msg_key);
		if (r->errs[i] == VOUTBOX_DELIVERY_SKIPPED)
			continue;
		if (refused != NULL && ev->msg_key != NULL)
			k = hash_search(refused, &h, HASH_FIND, NULL);
		/* (A report served while librdkafka's queue was full may say a failure.) */
		if (r->errs[i] == VOUTBOX_DELIVERY_PENDING && !s->failing && k == NULL)
		{
			err = voutbox_producer_send(s->producer, ev, r->first_ticket + i);
			if (err == 0)
			{
				r->pending++;
				continue;
			}
			r->errs[i] = err;
		}
		else if (r->errs[i] == VOUTBOX_DELIVERY_PENDING)
			r->errs[i] = k != NULL ? k->err : RD_KAFKA_RESP_ERR__PURGE_QUEUE;
		r->failed = true;
		/* Failed before it was sent: nothing more of the round is sent. */
		if (!voutbox_topic_refusal(r->errs[i]))
		{
			s->failing = true;
			continue;
		}
		/* Refused for its topic: its key waits behind it. */
		if (refused_by_topic(r, i))
			count_key(s->held, ev, 1);
		if (ev->msg_key != NULL && k == NULL)
		{
			if (refused == NULL)
			{
				HASHCTL		ctl;

				ctl.keysize = sizeof(uint64);
				ctl.entrysize = sizeof(RefusedKey);
				ctl.hcxt = CurrentMemoryContext;
				refused = hash_create("voutbox refused keys", 16, &ctl,
									  HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
			}
			k = hash_search(refused, &h, HASH_ENTER, NULL);
			k->err = r->errs[i];
		}
	}
	if (refused != NULL)
		hash_destroy(refused);
}

/*
 * Whether the stream has no room for another round: STREAM_ROUNDS wait for
 * reports (not counting those overtaken, which wait for stragglers), or the
 * rounds read and not settled reach a bound, or stragglers do.
 */
static bool
stream_full(Stream *s)
{
	int			waiting = 0;

	if (s->nrounds >= STREAM_MAX_ROUNDS || s->nevents >= voutbox_batch_size ||
		s->bytes >= voutbox_batch_bytes || s->late_events >= voutbox_batch_size)
		return true;
	/* (A round overtaken by acknowledged ones waits only for its stragglers.) */
	for (VoutboxRound *r = s->head; r != NULL && waiting < STREAM_ROUNDS; r = r->next)
		waiting += r->pending > 0 && r->overtaken_at == 0;
	return waiting >= STREAM_ROUNDS;
}

/* Look again whether the standbys have the open window, after a growing delay. */
static void
standby_poll_later(Stream *s, TimestampTz now, long *wait_ms)
{
	s->standby_poll_ms = Min(Max(s->standby_poll_ms * 2, STANDBY_POLL_MIN_MS), STANDBY_POLL_MAX_MS);
	s->standby_check_at = TimestampTzPlusMilliseconds(now, s->standby_poll_ms);
	*wait_ms = Min(*wait_ms, s->standby_poll_ms);
	s->more = true;
	if (s->head == NULL)
		worker_state("waiting for standbys",
					 psprintf("waiting for %s to flush the WAL up to %X/%X",
							  s->standby_behind, LSN_FORMAT_ARGS(s->standby_lsn)),
					 false);
}

static void launch_round(Stream *s, VoutboxRound *r);

/*
 * Send the round that waits for the standbys once they have what it read,
 * looking after a growing delay.  Returns whether it still waits.
 */
static bool
release_held(Stream *s, long *wait_ms)
{
	TimestampTz now = GetCurrentTimestamp();
	const char *behind;
	VoutboxRound *r;

	if (s->held_round == NULL)
		return false;
	/* A stop: it is dropped, as a round read when a stop comes is. */
	if (ShutdownRequestPending || s->stop_after_drain)
	{
		MemoryContextDelete(s->held_round->cxt);
		s->held_round = NULL;
		s->standby_lsn = InvalidXLogRecPtr;
		return false;
	}
	if (now < s->standby_check_at)
	{
		long		secs;
		int			usecs;

		TimestampDifference(now, s->standby_check_at, &secs, &usecs);
		*wait_ms = Min(*wait_ms, secs * 1000 + (usecs + 999) / 1000);
		return true;
	}
	if (!voutbox_standbys_confirmed(s->standby_lsn, &behind))
	{
		strlcpy(s->standby_behind, behind, sizeof(s->standby_behind));
		standby_poll_later(s, now, wait_ms);
		return true;
	}
	/*
	 * Not while rounds in flight fail or their outcome is not recorded: it
	 * goes after them, as a round read after them would.
	 */
	if (s->failing || s->unsettled || s->late_reported_at != 0)
	{
		*wait_ms = Min(*wait_ms, STANDBY_POLL_MAX_MS);
		s->standby_check_at = TimestampTzPlusMilliseconds(now, STANDBY_POLL_MIN_MS);
		return true;
	}
	/*
	 * (A producer retired meanwhile: a new one once the stream is empty, as
	 * for a read, or wait for it.  Not while transactions that could not
	 * commit hold sending back.)
	 */
	if (s->producer == NULL && (s->head != NULL || now < s->eos_retry_at || !ensure_producer(s)))
	{
		s->standby_check_at = Max(s->producer_retry_at,
								  TimestampTzPlusMilliseconds(now, STANDBY_POLL_MAX_MS));
		*wait_ms = Min(*wait_ms, STANDBY_POLL_MAX_MS);
		return true;
	}
	if (voutbox_producer_is_broken(s->producer))
	{
		s->standby_check_at = TimestampTzPlusMilliseconds(now, STANDBY_POLL_MAX_MS);
		*wait_ms = Min(*wait_ms, STANDBY_POLL_MAX_MS);
		return true;
	}
	r = s->held_round;
	/*
	 * Rounds settled since it was read may have deferred events whose keys
	 * it sends: it looks at the keys held again, as a round read now would.
	 */
	if (s->held_stale)
		voutbox_storage_recheck_round(r, hash_get_num_entries(s->held) > 0 ? s->held : NULL);
	s->held_stale = false;
	s->held_round = NULL;
	s->standby_lsn = InvalidXLogRecPtr;
	s->standby_poll_ms = 0;
	launch_round(s, r);
	return false;
}

/* Whether the worker may read another round now; sets *wait_ms if it will soon. */
static bool
may_read(Stream *s, TimestampTz now, long *wait_ms)
{
	if (ShutdownRequestPending || s->unsettled || s->failing || s->stop_after_drain || !s->more)
		return false;
	if (now < s->lock_retry_at)
		return false;
	/* exactly_once: transactions that could not commit, in a row. */
	if (now < s->eos_retry_at)
	{
		*wait_ms = Min(*wait_ms, (s->eos_retry_at - now) / 1000 + 1);
		return false;
	}
	/* (One round at a time waits for the standbys.) */
	if (s->held_round != NULL)
		return false;
	if (s->head == NULL)
		return true;
	/* An event that goes alone goes alone. */
	if (s->tail->alone)
		return false;
	/*
	 * (After a failed read, the window is read again from its settled
	 * start; an event that goes alone waits for an empty stream.)
	 */
	if (s->cursor.stale || s->alone_waiting)
		return false;
	if (stream_full(s))
		return false;
	/* exactly_once: the transaction is closed, to be committed with what it holds. */
	if (s->eos && TimestampDifferenceExceeds(s->head->read_at, now, EOS_TXN_MS))
		return false;
	if (!TimestampDifferenceExceeds(s->last_read, now, READ_COALESCE_MS))
	{
		*wait_ms = Min(*wait_ms, READ_COALESCE_MS);
		return false;
	}
	return true;
}

/* The soonest the next read of deferred events may be: see DUE_COALESCE_MS. */
static TimestampTz
deferred_read_at(Stream *s)
{
	return TimestampTzPlusMilliseconds(s->last_deferred_read, DUE_COALESCE_MS);
}

/* When the deferred event due next is to be read. */
static TimestampTz
next_due_read(Stream *s)
{
	return Max(s->next_due, deferred_read_at(s));
}

/*
 * Read a round and send it.  Returns whether it read any event.  A stop
 * request before anything went out drops the round: the next worker reads
 * it again.
 */
static bool
read_round(Stream *s)
{
	MemoryContext cxt = AllocSetContextCreate(s->cxt, "voutbox round", ALLOCSET_START_SMALL_SIZES);
	MemoryContext old;
	VoutboxRound *r;
	int			share = Max(voutbox_batch_size / ROUND_SHARE, 1);
	VoutboxReadOptions opt;
	VoutboxStorageStatus status;
	char	   *version = NULL;
	const char *behind;

	opt.limit = Min(share, voutbox_batch_size - s->nevents);
	opt.budget = Max(voutbox_batch_bytes / ROUND_SHARE, 1);
	opt.budget = Min(opt.budget, voutbox_batch_bytes - s->bytes);
	/* Due deferred events go with the next round; one that goes alone, alone. */
	opt.alone = s->head == NULL;
	if (pg_atomic_read_u32(&voutbox_my_slot->requeued) != 0 &&
		pg_atomic_exchange_u32(&voutbox_my_slot->requeued, 0) != 0)
		s->deferred_dry = false;
	opt.deferred = (s->head == NULL && !s->deferred_dry &&
					deferred_read_at(s) <= GetCurrentTimestamp()) || s->due_waiting ||
		(s->next_due != 0 && next_due_read(s) <= GetCurrentTimestamp());
	opt.check_due = !opt.deferred &&
		TimestampDifferenceExceeds(s->last_due_check, GetCurrentTimestamp(), DUE_CHECK_MS);
	opt.due_waiting = &s->due_waiting;
	opt.alone_waiting = &s->alone_waiting;
	opt.held_in_flight = hash_get_num_entries(s->held) > 0 ? s->held : NULL;
	if (opt.check_due)
		s->last_due_check = GetCurrentTimestamp();
	s->reading = true;
	s->reading_cxt = cxt;
	old = MemoryContextSwitchTo(cxt);
	r = palloc0(sizeof(VoutboxRound));
	status = voutbox_storage_read_round(&s->cursor, r, &opt, &version);
	MemoryContextSwitchTo(old);
	s->reading = false;
	s->reading_cxt = NULL;
	s->last_read = GetCurrentTimestamp();
	s->more = false;
	if (status != VOUTBOX_STORAGE_READY)
	{
		tell_not_ready(s, status, version);
		MemoryContextDelete(cxt);
		s->next_due = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), RECHECK_MS);
		if (status == VOUTBOX_STORAGE_MISSING)
			worker_state("not installed", "waiting for CREATE EXTENSION voutbox", false);
		else if (status == VOUTBOX_STORAGE_OTHER_VERSION)
			worker_state("needs update", "waiting for ALTER EXTENSION voutbox UPDATE", false);
		else
			worker_state("unsupported encoding", "the database's encoding is SQL_ASCII", false);
		return false;
	}
	s->told_status = VOUTBOX_STORAGE_READY;
	s->lock_failures = 0;
	if (opt.deferred)
	{
		s->last_deferred_read = s->last_read;
		s->next_due = r->next_due;
		s->due_waiting = false;
		if (opt.alone)
			s->alone_waiting = false;
		/* (Only an empty stream's read takes one that goes alone.) */
		if (opt.alone)
			s->deferred_dry = r->ndeferred == 0;
	}
	else if (opt.check_due && s->due_waiting)
		s->deferred_dry = false;
	/* The window goes on, or deferred events are or may be due: read again. */
	s->more = (r->nevents > r->ndeferred && !r->window_done) || r->ndeferred > 0 ||
		(opt.check_due && s->due_waiting);
	if (r->nevents == 0 || ShutdownRequestPending)
	{
		MemoryContextDelete(cxt);
		return false;
	}

	r->cxt = cxt;
	r->read_at = s->last_read;
	/*
	 * Nothing goes before the standbys a failover may promote have every
	 * commit the read could see: else it could be published and then lost
	 * with the primary.  The round waits, read but not sent, and nothing
	 * more is read meanwhile.
	 */
	if (voutbox_standbys_gate() && !voutbox_standbys_confirmed(r->wal_end, &behind))
	{
		long		wait_ms = STANDBY_POLL_MAX_MS;

		s->held_round = r;
		s->held_stale = false;
		s->standby_lsn = r->wal_end;
		s->standby_poll_ms = 0;
		strlcpy(s->standby_behind, behind, sizeof(s->standby_behind));
		standby_poll_later(s, s->last_read, &wait_ms);
		return true;
	}
	launch_round(s, r);
	return true;
}

/* Put a round read into the stream, and send it. */
static void
launch_round(Stream *s, VoutboxRound *r)
{
	int			nsend = 0;

	/* (A worker whose postmaster died sends nothing more.) */
	if (!PostmasterIsAlive())
		proc_exit(1);
	if (s->tail != NULL)
		s->tail->next = r;
	else
		s->head = r;
	s->tail = r;
	s->nrounds++;
	s->nevents += r->nevents;
	s->bytes += r->bytes;
	count_held_keys(s, r, 1);
	for (int i = 0; i < r->nevents; i++)
		nsend += r->errs[i] == VOUTBOX_DELIVERY_PENDING;
	worker_state("delivering",
				 psprintf("delivering %d events%s; %d rounds in flight%s", nsend,
						  r->alone ? " (one failed event alone)" : "", s->nrounds,
						  s->nlate > 0 ? psprintf("; %d stragglers wait for their report", s->nlate) : ""),
				 true);
	voutbox_producer_set_stragglers(s->producer, s->nlate);
	send_round(s, r);
}

/* ---------------------------------------------------------------------
 * Settling
 * ---------------------------------------------------------------------
 */

/* Count (+1) or uncount (-1) a key in a map of HeldKeys. */
static void
count_key(HTAB *keys, const VoutboxEvent *ev, int delta)
{
	uint64		h;
	HeldKey    *k;
	bool		found;

	if (ev->msg_key == NULL)
		return;
	h = voutbox_key_hash(ev->topic, ev->msg_key);
	k = hash_search(keys, &h, delta > 0 ? HASH_ENTER : HASH_FIND, &found);
	if (k == NULL)
		return;
	k->events = (found ? k->events : 0) + delta;
	if (k->events <= 0)
		(void) hash_search(keys, &h, HASH_REMOVE, NULL);
}

/*
 * A round settled with stragglers in flight: keep what settling their
 * reports needs (ids, topics, keys, tenants, attempts, tickets) in a round
 * of their own, with deadlines from now (expire_late()); the round goes.
 */
static void
keep_late(Stream *s, VoutboxRound *r)
{
	MemoryContext cxt = AllocSetContextCreate(s->cxt, "voutbox stragglers", ALLOCSET_SMALL_SIZES);
	VoutboxRound *late = MemoryContextAllocZero(cxt, sizeof(VoutboxRound));
	int			n = 0;

	late->cxt = cxt;
	late->extension = r->extension;
	late->events = MemoryContextAllocZero(cxt, sizeof(VoutboxEvent) * r->pending);
	late->errs = MemoryContextAlloc(cxt, sizeof(int) * r->pending);
	late->receipts = MemoryContextAlloc(cxt, sizeof(VoutboxReceipt) * r->pending);
	late->tickets = MemoryContextAlloc(cxt, sizeof(uint64) * r->pending);
	for (int i = 0; i < r->nevents && n < r->pending; i++)
	{
		VoutboxEvent *from = &r->events[i];
		VoutboxEvent *ev = &late->events[n];

		if (r->errs[i] != VOUTBOX_DELIVERY_PENDING)
			continue;
		ev->id = MemoryContextStrdup(cxt, from->id);
		ev->seq = from->seq;
		ev->tenant_id = MemoryContextStrdup(cxt, from->tenant_id);
		ev->topic = MemoryContextStrdup(cxt, from->topic);
		ev->msg_key = from->msg_key ? MemoryContextStrdup(cxt, from->msg_key) : NULL;
		ev->attempts = from->attempts;
		ev->unconfirmed = from->unconfirmed;
		late->errs[n] = VOUTBOX_DELIVERY_PENDING;
		late->tickets[n] = r->first_ticket + i;
		count_key(s->late_keys, ev, 1);
		n++;
	}
	late->nevents = late->ndeferred = late->capacity = late->pending = n;
	late->first_ticket = late->tickets[0];
	late->read_at = GetCurrentTimestamp();
	if (s->late_tail != NULL)
		s->late_tail->next = late;
	else
		s->late_head = late;
	s->late_tail = late;
	s->nlate += n;
	s->late_events += n;
}

/* The index of the straggler sent with the ticket in a late round, or -1. */
static int
late_index(VoutboxRound *r, uint64 ticket)
{
	int			lo = 0;
	int			hi = r->nevents - 1;

	if (ticket < r->tickets[0] || ticket > r->tickets[hi])
		return -1;
	while (lo <= hi)
	{
		int			mid = (lo + hi) / 2;

		if (r->tickets[mid] == ticket)
			return mid;
		if (r->tickets[mid] < ticket)
			lo = mid + 1;
		else
			hi = mid - 1;
	}
	return -1;
}

/*
 * Whether a straggler has news to settle: a report, or (still in flight) a
 * timeout to charge, unless the producer was given up on: its report comes.
 */
static inline bool
late_news(Stream *s, VoutboxRound *r, int i)
{
	if (r->errs[i] == VOUTBOX_DELIVERY_PENDING)
		return r->charge_due && !s->late_given_up;
	return r->errs[i] != VOUTBOX_DELIVERY_SKIPPED;
}

/*
 * The stragglers that have news, as one round (r->late) to settle before
 * the stream's rounds: those were all read after them.  NULL if none has,
 * or the first news is younger than SETTLE_DELAY_MS (unless the worker
 * stops).  Only stragglers of one installation of the extension go
 * together.  (Its events are the rounds' own: late_settled() uses them.)
 */
static VoutboxRound *
late_round(Stream *s)
{
	VoutboxRound *late;
	Oid			extension = InvalidOid;
	int			n = 0;

	if (s->late_reported_at == 0 ||
		(!ShutdownRequestPending && !s->stop_after_drain && !s->failing &&
		 !TimestampDifferenceExceeds(s->late_reported_at, GetCurrentTimestamp(), SETTLE_DELAY_MS)))
		return NULL;
	for (VoutboxRound *r = s->late_head; r != NULL; r = r->next)
		for (int i = 0; i < r->nevents; i++)
			if (late_news(s, r, i) && (n == 0 || r->extension == extension))
			{
				extension = r->extension;
				n++;
			}
	if (n == 0)
	{
		s->late_reported_at = 0;
		return NULL;
	}
	late = palloc0(sizeof(VoutboxRound));
	late->late = true;
	late->extension = extension;
	late->events = palloc(sizeof(VoutboxEvent) * n);
	late->errs = palloc(sizeof(int) * n);
	late->receipts = palloc(sizeof(VoutboxReceipt) * n);
	late->actions = palloc0(sizeof(VoutboxAction) * n);
	for (VoutboxRound *r = s->late_head; r != NULL; r = r->next)
		for (int i = 0; i < r->nevents && r->extension == extension; i++)
			if (late_news(s, r, i))
			{
				late->events[late->nevents] = r->events[i];
				late->errs[late->nevents] = r->errs[i];
				late->receipts[late->nevents] = r->receipts[i];
				late->actions[late->nevents] = VOUTBOX_SEND;
				late->nevents++;
			}
	late->ndeferred = late->capacity = late->nevents;
	late->read_at = GetCurrentTimestamp();
	return late;
}

/*
 * The late round is settled: forget the stragglers it settled, count the
 * timeout charged to those still in flight, and drop the rounds left with
 * nothing to wait for.
 */
static void
late_settled(Stream *s, VoutboxRound *late)
{
	VoutboxRound *prev = NULL;
	VoutboxRound *r = s->late_head;
	bool		more = false;
	HTAB	   *charged = NULL;

	while (r != NULL)
	{
		VoutboxRound *next = r->next;
		bool		keep = r->pending > 0;

		if (r->extension == late->extension)
		{
			for (int i = 0; i < r->nevents; i++)
			{
				if (!late_news(s, r, i))
					continue;
				if (r->errs[i] == VOUTBOX_DELIVERY_PENDING)
				{
					bool		found = false;

					/* (settle.c charges only the first of a key) */
					if (charged == NULL)
						charged = voutbox_key_set_new("voutbox charged keys");
					if (r->events[i].msg_key != NULL)
					{
						uint64		h = voutbox_key_hash(r->events[i].topic, r->events[i].msg_key);

						(void) hash_search(charged, &h, HASH_ENTER, &found);
					}
					if (!found)
					{
						r->events[i].attempts++;
						/* (its row's last error is a timeout now) */
						r->events[i].unconfirmed = false;
					}
				}
				else
				{
					r->errs[i] = VOUTBOX_DELIVERY_SKIPPED;
					count_key(s->late_keys, &r->events[i], -1);
				}
			}
			if (r->charge_due && !s->late_given_up)
			{
				r->charge_due = false;
				r->read_at = GetCurrentTimestamp();
			}
		}
		else
		{
			for (int i = 0; i < r->nevents && !keep; i++)
				keep = late_news(s, r, i);
			more |= keep;
		}
		if (keep)
		{
			prev = r;
			r = next;
			continue;
		}
		if (prev != NULL)
			prev->next = next;
		else
			s->late_head = next;
		if (s->late_tail == r)
			s->late_tail = prev;
		s->late_events -= r->nevents;
		MemoryContextDelete(r->cxt);
		r = next;
	}
	s->late_reported_at = more ? GetCurrentTimestamp() : 0;
	if (charged != NULL)
		hash_destroy(charged);
}

/* Take the first n rounds off the stream. */
static void
drop_rounds(Stream *s, int n)
{
	for (int i = 0; i < n; i++)
	{
		VoutboxRound *r = s->head;

		if (r->nevents > r->ndeferred && r->hi != NULL)
		{
			if (s->settled_lo != NULL)
				pfree(s->settled_lo);
			s->settled_lo = MemoryContextStrdup(TopMemoryContext,
												r->window_done ? r->hi : r->lo);
		}
		count_held_keys(s, r, -1);
		s->head = r->next;
		s->nrounds--;
		s->nevents -= r->nevents;
		s->bytes -= r->bytes;
		if (r->pending > 0)
			keep_late(s, r);
		MemoryContextDelete(r->cxt);
	}
	if (s->head == NULL)
	{
		s->tail = NULL;
		s->failing = false;
	}
}

/*
 * When a round may be settled with events still in flight (0: not yet
 * known): STRAGGLER_MS after it was seen that every one of them was sent
 * before an event that has been acknowledged (so that a burst of reports,
 * after an outage for instance, does not make stragglers of events about
 * to report).  They are most likely of a topic that does not
 * answer (no leader, not enough replicas, not created yet), and must not
 * hold up the others.  An event that goes alone is waited for.
 */
static TimestampTz
straggles_at(Stream *s, VoutboxRound *r, TimestampTz now)
{
	/* (exactly_once: a transaction commits only when every event is acknowledged.) */
	if (r->alone || s->eos)
		return 0;
	if (r->overtaken_at == 0)
	{
		for (int i = r->nevents - 1; i >= 0; i--)
			if (r->errs[i] == VOUTBOX_DELIVERY_PENDING)
			{
				if (r->first_ticket + i >= s->last_acked)
					return 0;
				break;
			}
		r->overtaken_at = now;
	}
	return TimestampTzPlusMilliseconds(r->overtaken_at, STRAGGLER_MS);
}

static bool
straggles(Stream *s, VoutboxRound *r, TimestampTz now)
{
	TimestampTz at = straggles_at(s, r, now);

	return at != 0 && at <= now;
}

/*
 * The rounds to settle now: the oldest ones that have every report (but
 * for stragglers), once the oldest has waited SETTLE_DELAY_MS or room is
 * needed; but once an event failed, all of them, when they all have.
 * Returns how many.
 */
static int
rounds_to_settle(Stream *s, VoutboxRound **rounds)
{
	int			n = 0;
	TimestampTz now = GetCurrentTimestamp();

	/*
	 * exactly_once: the rounds of a Kafka transaction are settled together,
	 * once all have their reports, and once the transaction is closed to new
	 * rounds (may_read()).
	 */
	if (s->eos)
	{
		for (VoutboxRound *r = s->head; r != NULL; r = r->next)
		{
			if (r->pending > 0)
				return 0;
			rounds[n++] = r;
		}
		if (n > 0 && (s->failing || s->unsettled || ShutdownRequestPending || stream_full(s) ||
					  s->stop_after_drain || !s->more || s->held_round != NULL ||
					  TimestampDifferenceExceeds(s->head->read_at, now, EOS_TXN_MS)))
			return n;
		return 0;
	}
	/* Every round overtaken starts its wait now, not once those before it settled. */
	if (s->last_acked > 0)
		for (VoutboxRound *r = s->head; r != NULL; r = r->next)
			if (r->pending > 0 && r->overtaken_at == 0)
				(void) straggles_at(s, r, now);
	for (VoutboxRound *r = s->head; r != NULL; r = r->next)
	{
		if (r->pending > 0 && !straggles(s, r, now))
		{
			if (s->failing)
				return 0;
			break;
		}
		rounds[n++] = r;
	}
	if (n == 0 || s->failing || s->unsettled || ShutdownRequestPending || stream_full(s))
		return n;
	if (!TimestampDifferenceExceeds(s->head->read_at, GetCurrentTimestamp(), SETTLE_DELAY_MS))
		return 0;
	return n;
}

/*
 * exactly_once: the Kafka transaction of the rounds was aborted (or never
 * committed): what was acknowledged in it goes again, in order, uncharged,
 * as after a purge.
 */
static void
undeliver(VoutboxRound **rounds, int n)
{
	/*
	 * (A late round's stragglers were sent by a producer of at_least_once,
	 * before a switch of mode: acknowledged is delivered.)
	 */
	for (int k = 0; k < n; k++)
		for (int i = 0; i < rounds[k]->nevents && !rounds[k]->late; i++)
			if (rounds[k]->errs[i] == 0)
			{
				rounds[k]->errs[i] = RD_KAFKA_RESP_ERR__PURGE_QUEUE;
				rounds[k]->receipts[i].partition = -1;
				rounds[k]->receipts[i].offset = -1;
				rounds[k]->failed = true;
			}
}

/*
 * exactly_once: the Kafka transaction of the settle prepared as gid is
 * aborted (if it was not already): the settle is rolled back, and what was
 * acknowledged in it goes again.  Returns false, for the caller to return.
 */
static bool
roll_back_settle(Stream *s, VoutboxRound **rounds, int n, const char *gid)
{
	voutbox_producer_abort(s->producer);
	voutbox_xact_finish_prepared(gid, false);
	/* (What the rolled-back settle taught about silent topics may be wrong.) */
	voutbox_forget_stalled_topics();
	undeliver(rounds, n);
	return false;
}

/*
 * exactly_once: the settle of the rounds is prepared as gid; commit the
 * Kafka transaction with its checkpoint, then the settle (eos.c).  Returns
 * whether the settle is committed; if not, the rounds are to be settled
 * again as not delivered.  When whether Kafka committed is not known, the
 * worker exits: the next one's recovery finds out.
 */
static bool
commit_prepared_settle(Stream *s, VoutboxRound **rounds, int n, const char *gid, int nevents)
{
	VoutboxTxnResult result;

	voutbox_fault_point("after_prepare");
	/*
	 * The standbys a failover may promote must have the prepared settle
	 * before Kafka commits: a promoted standby without it would send the
	 * events again.  (Synchronous standbys had it before PREPARE returned,
	 * unless the wait was cut short.)  A standby that does not catch up
	 * within delivery_timeout costs the transaction: it is aborted, and the
	 * events go again.
	 */
	if (voutbox_standbys_gate())
	{
		XLogRecPtr	lsn = GetXLogInsertRecPtr();
		TimestampTz start = GetCurrentTimestamp();
		const char *behind;

		while (!voutbox_standbys_confirmed(lsn, &behind))
		{
			if (TimestampDifferenceExceeds(start, GetCurrentTimestamp(),
										   voutbox_producer_txn_wait_ms(s->producer)))
			{
				ereport(LOG,
						(errmsg("voutbox: %s did not flush a prepared settle in time; its Kafka transaction is aborted",
								behind)));
				return roll_back_settle(s, rounds, n, gid);
			}
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 STANDBY_POLL_MAX_MS / 10, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
			CHECK_FOR_INTERRUPTS();
		}
	}
	/* (Tests: a transaction aborted here, as for the reasons above.) */
	if (voutbox_fault_hit("abort_after_prepare"))
		return roll_back_settle(s, rounds, n, gid);

	/*
	 * What is left of transaction.timeout.ms must cover the commit: a
	 * transaction the coordinator timed out would be reported as fencing.
	 */
	if (voutbox_producer_txn_late(s->producer))
	{
		ereport(LOG,
				(errmsg("voutbox: a Kafka transaction of %d events is too old to commit; it is aborted",
						nevents)));
		return roll_back_settle(s, rounds, n, gid);
	}
	result = voutbox_producer_commit(s->producer, voutbox_transactional_id(),
									 voutbox_checkpoint_value(gid, nevents));
	if (result == VOUTBOX_TXN_COMMITTED)
	{
		voutbox_fault_point("after_kafka_commit");
		voutbox_xact_finish_prepared(gid, true);
		voutbox_fault_point("after_commit_prepared");
		return true;
	}
	if (result == VOUTBOX_TXN_ABORTED)
		return roll_back_settle(s, rounds, n, gid);
	if (result == VOUTBOX_TXN_FENCED)
		fence(s);
	ereport(LOG,
			(errmsg("voutbox: whether Kafka committed the transaction of %d events is not known; the worker restarts to find out",
					nevents),
			 errdetail("The settle \"%s\" stays prepared until the next worker reads the checkpoint topic.", gid)));
	proc_exit(1);
	return false;				/* keep the compiler quiet */
}

/*
 * exactly_once: a transaction could not commit (its checkpoint refused, the
 * settle not prepared, a standby too slow).  Sending again at once would
 * fail the same way in a loop: the next one waits, longer each time in a
 * row.
 */
static void
eos_failed(Stream *s)
{
	long		delay = failing_delay_ms(++s->eos_failures);

	s->eos_retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), delay);
	if (s->eos_failures > 1)
		ereport(LOG,
				(errmsg("voutbox: %d Kafka transactions in a row could not commit; the next is sent in %ld ms",
						s->eos_failures, delay)));
}

/*
 * Settle the rounds ready for it; on an ERROR, keep them for another try
 * after a growing delay.  Returns whether it settled any.
 */
static bool
settle_ready(Stream *s)
{
	VoutboxRound **rounds;
	VoutboxRound *volatile late;
	int			n;
	volatile int nevents = 0;
	volatile bool released = false;
	volatile bool committed = false;
	MemoryContext cxt = CurrentMemoryContext;
	ErrorData  *volatile edata = NULL;
	volatile TimestampTz next_due = 0;
	volatile bool due_now = false;
	char	   *volatile gid = NULL;
	VoutboxSettlement *volatile prepared = NULL;

	if (s->unsettled && GetCurrentTimestamp() < s->settle_retry_at)
		return false;
	rounds = palloc(sizeof(VoutboxRound *) * (s->nrounds + 1));
	late = late_round(s);
	if (late != NULL)
		rounds[0] = late;
	n = rounds_to_settle(s, rounds + (late != NULL));
	if (n == 0 && late == NULL)
		return false;
	for (int i = 0; i < n + (late != NULL); i++)
	{
		nevents += rounds[i]->nevents;
		released |= rounds[i]->failed || rounds[i]->ndeferred > 0;
	}

	/*
	 * exactly_once: a transaction whose events were all acknowledged is
	 * committed with its settle; any other is aborted, and what was
	 * acknowledged in it was not delivered.
	 */
	if (s->eos && s->producer != NULL && voutbox_producer_in_transaction(s->producer) &&
		!s->failing && !s->unsettled && !voutbox_producer_is_broken(s->producer) &&
		!voutbox_producer_txn_expiring(s->producer) &&
		voutbox_producer_checkpoint_ready(s->producer))
	{
		voutbox_fault_point("before_prepare");
		gid = voutbox_eos_new_gid();
	}
	else if (s->eos)
	{
		if (s->producer != NULL)
			voutbox_producer_abort(s->producer);
		undeliver(rounds, n + (late != NULL));
	}

	voutbox_settle_keys_in_flight(s->late_keys);
	PG_TRY();
	{
		next_due = voutbox_storage_settle(rounds, n + (late != NULL), (bool *) &committed,
										  (bool *) &due_now, gid, (VoutboxSettlement **) &prepared);
	}
	PG_CATCH();
	{
		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		if (!committed)
			voutbox_xact_abort();
		/* What the failed settle taught about silent topics may be wrong. */
		if (!committed)
			voutbox_forget_stalled_topics();
		RESUME_INTERRUPTS();
	}
	PG_END_TRY();

	/* exactly_once: the settle failed before it was prepared: abort the transaction. */
	if (gid != NULL && !committed)
	{
		voutbox_producer_abort(s->producer);
		undeliver(rounds, n + (late != NULL));
		gid = NULL;
		eos_failed(s);
	}
	/* Prepared: now Kafka's commit, then the settle's. */
	if (gid != NULL && !commit_prepared_settle(s, rounds, n + (late != NULL), gid, nevents))
	{
		if (edata != NULL)
			FreeErrorData(edata);
		/* Settled again at once, as not delivered; sent again after a delay. */
		eos_failed(s);
		s->failing = true;
		s->unsettled = true;
		s->settle_retry_at = 0;
		return false;
	}
	if (gid != NULL)
	{
		s->eos_failures = 0;
		/* Committed: now, and not before, the statistics count it. */
		if (prepared != NULL && edata == NULL)
		{
			PG_TRY();
			{
				voutbox_settle_end(prepared);
			}
			PG_CATCH();
			{
				HOLD_INTERRUPTS();
				MemoryContextSwitchTo(cxt);
				edata = CopyErrorData();
				FlushErrorState();
				RESUME_INTERRUPTS();
			}
			PG_END_TRY();
		}
	}
	/* An ERROR after the commit (the statistics, the log): the outcome is recorded. */
	if (edata != NULL && committed)
	{
		ereport(LOG,
				(errmsg("voutbox: after recording the outcome of %d events: %s",
						nevents, edata->message)));
		FreeErrorData(edata);
		edata = NULL;
	}
	if (edata == NULL)
	{
		if (s->settle_failures > 0)
			ereport(LOG,
					(errmsg("voutbox: recorded the outcome of %d events after %d failed tries",
							nevents, s->settle_failures)));
		s->unsettled = false;
		s->settle_failures = 0;
		if (late != NULL)
			late_settled(s, late);
		drop_rounds(s, n);
		if (next_due != 0 && (s->next_due == 0 || next_due < s->next_due))
			s->next_due = next_due;
		/* (Read them even if nothing else is to be read.) */
		if (due_now)
		{
			s->deferred_dry = false;
			s->more = true;
		}
		/* Failed and deferred events may have released keys: look again. */
		if (released)
			s->more = true;
		return true;
	}
	s->unsettled = true;
	s->settle_failures++;
	s->settle_retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													 failing_delay_ms(s->settle_failures));
	ereport(LOG,
			(errmsg("voutbox: could not record the outcome of %d delivered events (try %d): %s",
					nevents, s->settle_failures, edata->message),
			 errdetail("The worker tries again in %ld ms without sending them again; nothing new is sent meanwhile.",
					   failing_delay_ms(s->settle_failures)),
			 edata->detail ? errhint("%s", edata->detail) : 0));
	worker_state("settle failing",
				 psprintf("could not record %d delivered events (try %d): %s",
						  nevents, s->settle_failures, edata->message),
				 false);
	voutbox_stats_set_error(psprintf("settle: %s", edata->message));
	FreeErrorData(edata);
	return false;
}

/* ---------------------------------------------------------------------
 * The loop
 * ---------------------------------------------------------------------
 */

/*
 * A lock waited for too long: try again after a growing delay, and say so
 * (once a minute).  The round read so far is dropped: nothing of it was sent.
 */
static void
lock_timed_out(Stream *s, const char *message)
{
	TimestampTz now = GetCurrentTimestamp();
	long		delay;

	/* In retention: it waits for the next cleanup; delivery goes on. */
	if (!s->reading)
	{
		s->next_cleanup = TimestampTzPlusMilliseconds(now, voutbox_cleanup_interval);
		if (TimestampDifferenceExceeds(s->lock_told_at, now, 60000))
		{
			s->lock_told_at = now;
			ereport(LOG,
					(errmsg("voutbox: retention: %s; it goes on at the next cleanup", message)));
		}
		return;
	}
	s->reading = false;
	delay = Min(failing_delay_ms(++s->lock_failures), LOCK_RETRY_MAX_MS);
	s->lock_retry_at = TimestampTzPlusMilliseconds(now, delay);
	s->cursor.stale = true;
	s->more = true;
	if (TimestampDifferenceExceeds(s->lock_told_at, now, 60000))
	{
		s->lock_told_at = now;
		ereport(LOG,
				(errmsg("voutbox: %s; trying again in %ld ms", message, delay),
				 errdetail("A session holds a lock on the storage that the worker would wait for (see pg_locks); nothing is lost meanwhile.")));
	}
	worker_state("waiting for a lock", psprintf("%s; trying again in %ld ms", message, delay), false);
}

/* What retention may take as settled: NULL while it is not known. */
static const char *
cleanup_lo(Stream *s)
{
	if (s->unsettled)
		return NULL;
	/* (The cursor has moved past the round that waits for the standbys.) */
	if (s->held_round != NULL)
		return s->settled_lo;
	return s->head == NULL && !s->cursor.stale ? s->cursor.lo : s->settled_lo;
}

/* Run retention when it is due (and what it sees as settled is known). */
static void
maybe_cleanup(Stream *s)
{
	const char *lo = cleanup_lo(s);

	if (GetCurrentTimestamp() < s->next_cleanup || lo == NULL)
		return;
	voutbox_retention_run(lo);
	s->next_cleanup = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), voutbox_cleanup_interval);
}

/*
 * Read (if it may) and clean up (if due).  An ERROR that a stop request
 * caused (it cancels the statement the worker waits in) ends the worker
 * cleanly, and a lock it waited for too long only delays it; any other
 * ERROR ends it as an ERROR does.  Returns whether it read events.
 */
static bool
read_or_clean(Stream *s, long *wait_ms)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool busy = false;

	PG_TRY();
	{
		if (release_held(s, wait_ms))
			busy = false;
		else if (may_read(s, GetCurrentTimestamp(), wait_ms) && eos_ready(s, wait_ms) &&
			(s->producer != NULL ? !voutbox_producer_is_broken(s->producer) :
			 s->head == NULL && ensure_producer(s)))
			busy = read_round(s);
		if (s->producer != NULL && !ShutdownRequestPending)
			maybe_cleanup(s);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		/* With nothing in flight, an ERROR ends the worker as ERRORs do. */
		if (!ShutdownRequestPending && edata->sqlerrcode != ERRCODE_LOCK_NOT_AVAILABLE &&
			s->head == NULL)
		{
			RESUME_INTERRUPTS();
			PG_RE_THROW();
		}
		FlushErrorState();
		voutbox_xact_abort();
		MemoryContextSwitchTo(cxt);
		RESUME_INTERRUPTS();
		if (s->reading_cxt != NULL)
			MemoryContextDelete(s->reading_cxt);
		s->reading_cxt = NULL;
		if (!ShutdownRequestPending && edata->sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE)
			lock_timed_out(s, edata->message);
		else if (!ShutdownRequestPending)
		{
			/*
			 * Rather than send the rounds in flight again, the next worker
			 * starts after they are settled.
			 */
			ereport(LOG,
					(errmsg("voutbox: %s", edata->message),
					 errdetail("The delivery worker stops once the %d events in flight are settled.",
							   s->nevents)));
			s->stop_after_drain = true;
			s->cursor.stale = true;
		}
		s->reading = false;
		FreeErrorData(edata);
		busy = false;
	}
	PG_END_TRY();
	return busy;
}

/* How long to sleep: until the poll interval, or the first thing due. */
static long
sleep_ms(Stream *s, long wait_ms)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz until = TimestampTzPlusMilliseconds(now, Min(voutbox_poll_interval, wait_ms));

	/*
	 * A deferred event falls due: wake for it (once due, the next read takes
	 * it; with nothing in flight and a producer, that read is now).
	 */
	if (s->next_due != 0 && next_due_read(s) < until &&
		(next_due_read(s) > now ||
		 (s->head == NULL && s->producer != NULL && !s->unsettled && now >= s->lock_retry_at)))
		until = next_due_read(s);
	/* An empty stream whose deferred events may be due looks at them. */
	if (s->head == NULL && !s->deferred_dry && s->more && deferred_read_at(s) > now &&
		deferred_read_at(s) < until)
		until = deferred_read_at(s);
	if (s->unsettled && s->settle_retry_at < until)
		until = s->settle_retry_at;
	if (s->lock_retry_at > now && s->lock_retry_at < until)
		until = s->lock_retry_at;
	/* A window that waits for a standby: look again. */
	if (!XLogRecPtrIsInvalid(s->standby_lsn) && s->standby_check_at < until)
		until = Max(s->standby_check_at, now);
	if (s->producer_retry_at > now && s->producer_retry_at < until)
		until = s->producer_retry_at;
	if (s->producer != NULL && cleanup_lo(s) != NULL && s->next_cleanup < until)
		until = s->next_cleanup;
	/* Deadlines of events in flight are watched every second. */
	if (s->head != NULL || s->nlate > 0)
		until = Min(until, TimestampTzPlusMilliseconds(now, 1000));
	/* The oldest round may leave its stragglers behind. */
	if (s->head != NULL && s->head->pending > 0 && !s->unsettled)
	{
		TimestampTz at = straggles_at(s, s->head, now);

		if (at > now)
			until = Min(until, at);
	}
	/* Stragglers' reports are settled after a while. */
	if (s->late_reported_at != 0 && !s->unsettled)
		until = Min(until, TimestampTzPlusMilliseconds(s->late_reported_at, SETTLE_DELAY_MS));
	/* Acknowledged rounds are settled after a while (failing: when all are). */
	if (s->head != NULL && s->head->pending == 0 && !s->failing && !s->unsettled)
		until = Min(until, TimestampTzPlusMilliseconds(s->head->read_at, SETTLE_DELAY_MS));
	/* exactly_once: the transaction closes after a while. */
	if (s->eos && s->head != NULL && !s->unsettled)
		until = Min(until, TimestampTzPlusMilliseconds(s->head->read_at, EOS_TXN_MS));
	return until <= now ? 0 : (long) ((until - now + 999) / 1000);
}

/*
 * Sleep on the latch and the producer's queue for at most timeout_ms; returns
 * what woke it (WL_LATCH_SET, WL_SOCKET_READABLE or WL_TIMEOUT).  The set of
 * events to wait for is kept (building one costs system calls), and built
 * again for a new producer.
 */
static int
wait_for_work(Stream *s, long timeout_ms)
{
	int			socket = s->producer ? voutbox_producer_socket(s->producer) : PGINVALID_SOCKET;
	WaitEvent	event;
	int			rc = WL_TIMEOUT;

	if (s->waits != NULL && s->waits_socket != socket)
	{
		FreeWaitEventSet(s->waits);
		s->waits = NULL;
	}
	if (s->waits == NULL)
	{
		s->waits = CreateWaitEventSet(TopMemoryContext, 3);
		AddWaitEventToSet(s->waits, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
		AddWaitEventToSet(s->waits, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
		if (socket != PGINVALID_SOCKET)
			AddWaitEventToSet(s->waits, WL_SOCKET_READABLE, socket, NULL, NULL);
		s->waits_socket = socket;
	}
	if (WaitEventSetWait(s->waits, timeout_ms, &event, 1, PG_WAIT_EXTENSION) > 0)
		rc = event.events;
	if (rc & WL_LATCH_SET)
		ResetLatch(MyLatch);
	CHECK_FOR_INTERRUPTS();
	return rc;
}

/*
 * Deliver until a stop is requested and nothing is in flight any more (the
 * producer gives in-flight events a grace period, then purges them).
 */
void
voutbox_stream_run(void)
{
	Stream		s;
	MemoryContext loop_cxt;

	memset(&s, 0, sizeof(s));
	s.more = true;
	s.cursor.cxt = AllocSetContextCreate(TopMemoryContext, "voutbox cursor",
										 ALLOCSET_SMALL_SIZES);
	s.cxt = AllocSetContextCreate(TopMemoryContext, "voutbox rounds",
								  ALLOCSET_SMALL_SIZES);
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(uint64);
		ctl.entrysize = sizeof(HeldKey);
		ctl.hcxt = TopMemoryContext;
		s.held = hash_create("voutbox keys held in flight", 64, &ctl,
							 HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
		s.late_keys = hash_create("voutbox keys of stragglers", 64, &ctl,
								  HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "voutbox worker loop",
									 ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		long		wait_ms = voutbox_poll_interval;
		bool		busy;
		int			rc;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			voutbox_reload_config();
			unfence(&s);
		}
		MemoryContextSwitchTo(loop_cxt);
		MemoryContextReset(loop_cxt);

		serve_producer(&s);
		busy = settle_ready(&s);
		if (busy && s.held_round != NULL)
			s.held_stale = true;
		if ((ShutdownRequestPending || s.stop_after_drain) && (s.head == NULL || s.unsettled))
			break;
		busy |= read_or_clean(&s, &wait_ms);
		if ((ShutdownRequestPending || s.stop_after_drain) && (s.head == NULL || s.unsettled))
			break;
		if (busy)
			continue;
		if (s.head == NULL && s.producer != NULL && s.cursor.lo != NULL && !s.unsettled &&
			s.lock_failures == 0 && XLogRecPtrIsInvalid(s.standby_lsn))
			worker_state("idle", "waiting for events", false);
		rc = wait_for_work(&s, sleep_ms(&s, wait_ms));
		if (rc & (WL_LATCH_SET | WL_TIMEOUT))
			s.more = true;
	}

	worker_state("stopping", "shutting down", false);
	/* A settle the stop request cancelled: once more, lest the rounds go twice. */
	if (s.unsettled)
	{
		s.settle_retry_at = 0;
		(void) settle_ready(&s);
	}
	if (s.producer != NULL)
		voutbox_producer_destroy(s.producer);
	if (s.waits != NULL)
		FreeWaitEventSet(s.waits);
}
