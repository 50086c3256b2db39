/*-------------------------------------------------------------------------
 *
 * producer.c
 *		The worker's Kafka producer, a thin layer over librdkafka.
 *
 * The producer is idempotent with acks=all, and librdkafka retries every
 * retriable error itself without a deadline of its own
 * (message.timeout.ms=0): an idempotent producer keeps a partition's
 * messages in order across its own retries, whereas a message that times
 * out inside librdkafka leaves a gap that later messages of the same key
 * would fill out of order.  enable.gapless.guarantee makes a permanent error
 * on one batch stop the producer instead of letting the batches behind it
 * through.
 *
 * The deadline is the worker's: when no delivery report arrives for
 * voutbox.delivery_timeout while events are outstanding, the producer is
 * purged and rebuilt, and its unacknowledged events come back as timed out
 * (a retriable error: storage.c retries them with backoff, each key's later
 * events behind them).  Purging in-flight messages leaves no gap either: the
 * broker accepts a partition's batches of one producer only in sequence,
 * once it has the producer's state for the partition (before that, see
 * on_delivery).
 * While no broker can be reached at all, the worker waits without giving up:
 * an outage is nobody's event's fault and must not use up retries.
 *
 * After a purge (a timeout, a fatal error, a new configuration, a stop), the
 * purged events' reports are waited for at most PURGE_GRACE_MS; whatever
 * has not reported by then counts as purged too, so that every deadline and
 * the shutdown grace hold whatever librdkafka does.
 *
 * Secrets: voutbox.kafka_properties refuses secret-bearing properties
 * (passwords, keys), which belong in voutbox.kafka_secrets_file; no message
 * about either shows a value of a secret.  librdkafka's file descriptors
 * (sockets, wake-up pipes) are reserved with PostgreSQL's fd.c, so that
 * neither runs the other out of descriptors.
 *
 * Threads: librdkafka calls back only from rd_kafka_poll() on the worker's
 * thread (log.queue is on and logs go to the main queue).  The callbacks only
 * record results into plain memory; logging happens after poll returns.
 * The worker waits in WaitLatchOrSocket() on a pipe that librdkafka writes to
 * when its main queue becomes non-empty, never inside librdkafka.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <unistd.h>
#include <librdkafka/rdkafka.h>
#include <json-c/json.h>

#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/interrupt.h"
#include "storage/latch.h"
#include "lib/stringinfo.h"
#include "storage/fd.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "voutbox.h"

/* exactly_once: how long init_transactions(), commit and abort may take at one call. */
#define TXN_CALL_TIMEOUT_MS	10000
/* The ticket of the checkpoint record (stream.c's tickets count from 0). */
#define CHECKPOINT_TICKET	((void *) UINTPTR_MAX)

/* How long a shutdown waits for outstanding delivery reports. */
#define SHUTDOWN_GRACE_MS	5000
/* How long purged events' reports are waited for. */
#define PURGE_GRACE_MS		5000
/* How often a wait for the broker says so in the server log. */
#define STALL_NOTICE_MS		60000
#define MAX_PENDING_LOGS	32
/* librdkafka's linger.ms unless voutbox.kafka_properties sets it. */
#define VOUTBOX_DEFAULT_LINGER_MS	"1"

struct VoutboxProducer
{
	rd_kafka_t *rk;
	/*
	 * A second client for topic provisioning (topics.c), built when first
	 * needed from admin_conf: the producer itself never looks up a topic
	 * that does not exist yet.  (With the producer's own instance, the first
	 * events of a topic it had seen missing and then created went astray in
	 * a sanitizer run: acknowledged, not in the log.)
	 */
	rd_kafka_t *admin;
	rd_kafka_conf_t *admin_conf;
	char	   *config;			/* the settings it was built from */
	int			config_checked;	/* config_generation when compared last */
	bool		config_changed;	/* what the comparison said */
	int			pipe_r;
	int			pipe_w;
	/* where delivery reports go: called from the report callback */
	VoutboxReportFn report;
	void	   *report_arg;
	int			pending;		/* events handed over, not reported yet */
	TimestampTz last_notice;	/* when the log last said we wait */
	TimestampTz shutdown_at;	/* when a shutdown request was seen */
	TimestampTz last_progress;	/* last delivery report, or the first send since none was pending */
	int			stragglers;		/* of the pending events, stragglers (stream.c): they have deadlines of their own */
	bool		progress;		/* a report arrived since the last check */
	bool		brokers_down;	/* no broker reachable since the last report */
	bool		down_sign;		/* a connection failed since the last serve */
	TimestampTz last_down_sign; /* when a connection last failed */
	bool		timed_out;		/* purged for want of reports: they time out */
	bool		fatal;
	bool		purged;
	TimestampTz purged_at;
	bool		delivered_any;	/* the broker acknowledged an event */
	/* exactly_once (eos.c): a transactional producer */
	bool		transactional;
	bool		in_txn;			/* a Kafka transaction is open */
	TimestampTz txn_started_at;
	int			txn_timeout_ms;	/* transaction.timeout.ms */
	bool		fenced;			/* another producer of its transactional.id took over */
	bool		checkpoint_ready;	/* the checkpoint topic exists */
	int			reserved_fds;	/* reserved with ReserveExternalFD() */
	/* librdkafka log lines and errors, written by callbacks, logged later */
	int			nlogs;
	int			dropped_logs;
	char		logs[MAX_PENDING_LOGS][512];
};

/*
 * The contents of voutbox.kafka_secrets_file, read when the configuration is
 * (re)loaded, or why it could not be read.  Both in TopMemoryContext.
 */
static char *secrets = NULL;
static char *secrets_error = NULL;

/* Counts reloads of the configuration. */
static int	config_generation = 0;

/* Properties voutbox sets itself: overriding them would break a guarantee. */
static const char *const reserved_properties[] = {
	"bootstrap.servers", "metadata.broker.list", "enable.idempotence", "acks",
	"request.required.acks", "partitioner", "message.timeout.ms",
	"delivery.timeout.ms", "transactional.id", "log.queue",
	"enable.gapless.guarantee", "sasl.kerberos.min.time.before.relogin",
};

/*
 * Properties whose values are secrets: refused in voutbox.kafka_properties,
 * which any reload writes to the log and which pg_settings shows to the
 * members of pg_read_all_settings.  The names librdkafka itself treats as
 * sensitive, and any name that speaks of a password or a secret.
 */
static const char *const secret_properties[] = {
	"sasl.password", "ssl.key.password", "ssl.keystore.password", "ssl.key.pem",
	"ssl_key", "sasl.oauthbearer.client.secret", "sasl.oauthbearer.config",
	"sasl.oauthbearer.extensions",
};

static bool
is_secret_property(const char *name)
{
	static const char *const words[] = {"password", "secret", "passphrase", "private", "credential"};

	for (size_t i = 0; i < lengthof(secret_properties); i++)
		if (pg_strcasecmp(name, secret_properties[i]) == 0)
			return true;
	for (size_t i = 0; i < lengthof(words); i++)
		if (strstr(name, words[i]) != NULL)
			return true;
	return false;
}

/*
 * Properties that make librdkafka load a library or run a program: whoever
 * may set them (ALTER SYSTEM can be granted on a parameter) would run code
 * of its choosing in the worker.  Refused everywhere.  librdkafka's own
 * kinit command (for Kerberos) is a shell command that interpolates other
 * properties, such as the principal: voutbox turns it off
 * (sasl.kerberos.min.time.before.relogin=0), so that it never runs.
 */
static const char *const code_properties[] = {
	"plugin.library.paths", "sasl.kerberos.kinit.cmd", "ssl.engine.location",
	"ssl.engine.id", "ssl.providers",
};

/*
 * Apply "name=value; name=value" (or one per line; "#" starts a comment
 * line) to conf.  On failure returns false with a palloc'd explanation in
 * *detail, which for secret properties never shows a value.
 */
static bool
apply_properties(rd_kafka_conf_t *conf, const char *props, bool secret, char **detail,
				 char **hint)
{
	char	   *copy = pstrdup(props ? props : "");
	char	   *save = NULL;

	for (char *item = strtok_r(copy, ";\n", &save); item; item = strtok_r(NULL, ";\n", &save))
	{
		char	   *eq = strchr(item, '=');
		char	   *name = item;
		char	   *value;
		char		errstr[512];

		while (*name == ' ' || *name == '\t' || *name == '\r')
			name++;
		if (*name == '\0' || *name == '#')
			continue;
		if (eq == NULL)
		{
			*detail = secret ? pstrdup("voutbox.kafka_secrets_file has a line not of the form name=value.") :
				psprintf("\"%s\" is not of the form name=value.", name);
			return false;
		}
		*eq = '\0';
		value = eq + 1;
		for (char *end = eq - 1; end >= name && (*end == ' ' || *end == '\t'); end--)
			*end = '\0';
		while (*value == ' ' || *value == '\t')
			value++;
		for (char *end = value + strlen(value) - 1; end >= value && (*end == ' ' || *end == '\t' || *end == '\r'); end--)
			*end = '\0';
		for (size_t i = 0; i < lengthof(code_properties); i++)
			if (strcmp(name, code_properties[i]) == 0)
			{
				*detail = psprintf("\"%s\" would make librdkafka load a library or run a program in the server; voutbox does not allow it.",
								   name);
				return false;
			}
		if (!secret && is_secret_property(name))
		{
			*detail = psprintf("The librdkafka property \"%s\" holds a secret.", name);
			if (hint)
				*hint = pstrdup("Put it in the file named by voutbox.kafka_secrets_file, which only the server reads; settings can reach the log and pg_settings.");
			pfree(copy);
			return false;
		}
		for (size_t i = 0; i < lengthof(reserved_properties); i++)
			if (strcmp(name, reserved_properties[i]) == 0)
			{
				*detail = psprintf("voutbox sets \"%s\" itself%s.", name,
								   strcmp(name, "bootstrap.servers") == 0 ||
								   strcmp(name, "metadata.broker.list") == 0 ?
								   "; use voutbox.brokers" : "");
				return false;
			}
		if (rd_kafka_conf_set(conf, name, value, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
		{
			*detail = secret ?
				psprintf("librdkafka refused the value of \"%s\" in voutbox.kafka_secrets_file.", name) :
				psprintf("librdkafka: %s", errstr);
			return false;
		}
	}
	pfree(copy);
	return true;
}

/*
 * The user's settings, on top of voutbox's: voutbox.kafka_properties, then
 * the secrets file's.  Returns false, with *error set, if one is refused or
 * the secrets file could not be read.
 */
static bool
apply_user_properties(rd_kafka_conf_t *conf, char **error)
{
	if (secrets_error != NULL)
	{
		*error = pstrdup(secrets_error);
		return false;
	}
	return apply_properties(conf, voutbox_kafka_properties, false, error, NULL) &&
		apply_properties(conf, secrets, true, error, NULL);
}

bool
voutbox_kafka_properties_are_valid(const char *props, char **detail, char **hint)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	bool		ok = apply_properties(conf, props, false, detail, hint);

	rd_kafka_conf_destroy(conf);
	return ok;
}

/* ---------------------------------------------------------------------
 * Callbacks: run inside rd_kafka_poll() on the worker's thread; they only
 * record what happened.
 * ---------------------------------------------------------------------
 */

static bool outage(VoutboxProducer *p);

static void
on_delivery(rd_kafka_t *rk pg_attribute_unused(), const rd_kafka_message_t *msg, void *opaque)
{
	VoutboxProducer *p = opaque;
	int			err = msg->err;

	/*
	 * (A broker answered; not a local error, such as a message that timed
	 * out inside librdkafka during an outage, which must not end it.)
	 */
	if (err >= 0)
		p->progress = true;
	p->pending--;
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
		p->delivered_any = true;
	/* Purged for want of a report: what the event gets is a timeout. */
	if (p->timed_out && (err == RD_KAFKA_RESP_ERR__PURGE_QUEUE ||
						 err == RD_KAFKA_RESP_ERR__PURGE_INFLIGHT))
		err = RD_KAFKA_RESP_ERR__MSG_TIMED_OUT;
	if (msg->_private == CHECKPOINT_TICKET)
		return;

	/*
	 * A write the broker confirmed has its offset (acks=all).  librdkafka
	 * acknowledges without one the events of a failed request when a later
	 * request for the partition succeeds (its implicit acknowledgement), and
	 * of a batch the broker calls a duplicate.  The first is no proof: a
	 * broker without state for the producer on the partition (a partition
	 * just created, or this producer's first write to it) accepts the later
	 * request over the gap (KAFKA-15591), and the failed one was never
	 * written.  So such an event goes again (settle.c): a duplicate at
	 * worst, never a loss.
	 */
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR && msg->offset < 0)
		err = VOUTBOX_DELIVERY_UNCONFIRMED;
	/*
	 * exactly_once: librdkafka times messages out itself (message.timeout.ms);
	 * one that timed out around an outage costs no retry, as the worker's own
	 * deadline does not count an outage either.
	 */
	if (p->transactional && err == RD_KAFKA_RESP_ERR__MSG_TIMED_OUT && outage(p))
		err = RD_KAFKA_RESP_ERR__PURGE_QUEUE;
	if (p->report != NULL)
		p->report(p->report_arg, (uint64) (uintptr_t) msg->_private, err,
				  msg->partition, msg->offset);
}

static void
on_error(rd_kafka_t *rk pg_attribute_unused(), int err, const char *reason, void *opaque)
{
	VoutboxProducer *p = opaque;

	if (err == RD_KAFKA_RESP_ERR__FATAL)
		p->fatal = true;
	/* (Reports served before it in the same poll do not end it: see serve.) */
	if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN)
	{
		p->brokers_down = true;
		p->progress = false;
	}
	if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN || err == RD_KAFKA_RESP_ERR__TRANSPORT)
		p->down_sign = true;
	if (p->nlogs < MAX_PENDING_LOGS)
		snprintf(p->logs[p->nlogs++], sizeof(p->logs[0]), "error %s: %s",
				 rd_kafka_err2name(err), reason);
	else
		p->dropped_logs++;
}

static void
on_log(const rd_kafka_t *rk, int level pg_attribute_unused(), const char *fac, const char *buf)
{
	VoutboxProducer *p = rd_kafka_opaque(rk);

	/* Said at every start, and the README explains why it is set. */
	if (strcmp(fac, "CONFWARN") == 0 && strstr(buf, "enable.gapless.guarantee") != NULL)
		return;
	if (p->nlogs < MAX_PENDING_LOGS)
		snprintf(p->logs[p->nlogs++], sizeof(p->logs[0]), "%s: %s", fac, buf);
	else
		p->dropped_logs++;
}

/* Log what the callbacks recorded; outside librdkafka, so ereport is safe. */
static void
emit_logs(VoutboxProducer *p)
{
	for (int i = 0; i < p->nlogs; i++)
		ereport(LOG, (errmsg("voutbox: librdkafka %s", p->logs[i])));
	if (p->dropped_logs > 0)
		ereport(LOG, (errmsg("voutbox: %d more librdkafka messages not logged", p->dropped_logs)));
	p->nlogs = 0;
	p->dropped_logs = 0;
}

/* ---------------------------------------------------------------------
 * Life cycle
 * ---------------------------------------------------------------------
 */

static void
conf_set(rd_kafka_conf_t *conf, const char *name, const char *value)
{
	char		errstr[512];

	if (rd_kafka_conf_set(conf, name, value, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
		elog(ERROR, "voutbox: could not set librdkafka property %s: %s", name, errstr);
}

/*
 * Read voutbox.kafka_secrets_file (relative paths are relative to the data
 * directory).  Its contents go only to librdkafka, never to the log.
 */
static void
load_secrets(void)
{
	const char *path = voutbox_kafka_secrets_file;
	FILE	   *f;
	StringInfoData buf;
	char		chunk[1024];
	size_t		n;

	if (secrets != NULL)
		pfree(secrets);
	if (secrets_error != NULL)
		pfree(secrets_error);
	secrets = secrets_error = NULL;
	if (path == NULL || path[0] == '\0')
		return;
	if ((f = AllocateFile(path, "r")) == NULL)
	{
		secrets_error = MemoryContextStrdup(TopMemoryContext,
											psprintf("could not read voutbox.kafka_secrets_file \"%s\": %m", path));
		return;
	}
	initStringInfo(&buf);
	while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0)
		appendBinaryStringInfo(&buf, chunk, n);
	FreeFile(f);
	secrets = MemoryContextStrdup(TopMemoryContext, buf.data);
	explicit_bzero(buf.data, buf.len);
	pfree(buf.data);
}

/* Reload the configuration file, and the secrets file with it. */
void
voutbox_reload_config(void)
{
	ConfigReloadPending = false;
	ProcessConfigFile(PGC_SIGHUP);
	load_secrets();
	config_generation++;
}

/* The first load, when the worker starts. */
void
voutbox_producer_init(void)
{
	load_secrets();
}

/* The settings a producer is built from, as one comparable string. */
static char *
current_config(void)
{
	return psprintf("%s\n%s\n%s\n%s\n%d\n%d\n%d\n%s\n%d", voutbox_brokers, voutbox_kafka_properties,
					secrets ? secrets : "", secrets_error ? secrets_error : "",
					voutbox_batch_size, (int) voutbox_create_topics, voutbox_delivery,
					voutbox_checkpoint_topic_prefix, voutbox_delivery_timeout);
}

/* Whether the settings changed since the producer was built. */
bool
voutbox_producer_config_changed(VoutboxProducer *p)
{
	if (p->config_checked != config_generation)
	{
		p->config_checked = config_generation;
		p->config_changed = strcmp(p->config, current_config()) != 0;
	}
	return p->config_changed;
}

/*
 * The topic provisioning client (topics.c), built with the producer when
 * voutbox.create_topics is on, so that the first event of a new topic does
 * not wait for it to connect; else when the setting is turned on.
 */
static void
build_admin(VoutboxProducer *p)
{
	char		errstr[512];
	rd_kafka_conf_t *conf = rd_kafka_conf_dup(p->admin_conf);

	p->admin = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	if (p->admin == NULL)
	{
		rd_kafka_conf_destroy(conf);
		ereport(LOG,
				(errmsg("voutbox: could not build the topic provisioning client: %s", errstr)));
	}
}

/*
 * Tell fd.c about the descriptors the producer holds, so that PostgreSQL
 * keeps that many fewer files open itself.  librdkafka takes a socket and a
 * wake-up pipe per broker it knows (the bootstrap servers, and the brokers
 * they name: counted as many again), a pipe for its internal broker, and
 * the producer has its own pipe to the worker's latch.  An estimate: it
 * cannot be known in advance how many brokers the cluster names.
 */
static void
reserve_fds(VoutboxProducer *p)
{
	int			brokers = 1;

	for (const char *c = voutbox_brokers; c && *c; c++)
		brokers += *c == ',';
	/* (and as many again for the provisioning client) */
	p->reserved_fds = 2 + 2 + 3 * 2 * brokers + 1 + 3 * 2 * brokers;
	for (int i = 0; i < p->reserved_fds; i++)
		ReserveExternalFD();
}

/*
 * exactly_once: transaction.timeout.ms.  A transaction lasts until its events
 * are acknowledged or time out (message.timeout.ms = delivery_timeout), then
 * the standbys may be waited for (delivery_timeout at most) and the commit
 * retried (see voutbox_producer_commit()); one that the coordinator times
 * out first is aborted with a new producer epoch, which librdkafka reports
 * as fencing.  So four times the delivery timeout, at least a minute, and
 * at most the broker's default transaction.max.timeout.ms (15 min).
 */
static int
txn_timeout_ms(void)
{
	return (int) Min(Max(4 * (int64) voutbox_delivery_timeout, 60000), 900000);
}

VoutboxProducer *
voutbox_producer_create(bool transactional, char **error)
{
	VoutboxProducer *p = MemoryContextAllocZero(TopMemoryContext, sizeof(VoutboxProducer));
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	char		errstr[512];
	char		queue_len[32];
	int			fds[2];
	rd_kafka_queue_t *mainq;

	conf_set(conf, "bootstrap.servers", voutbox_brokers);
	conf_set(conf, "client.id", "voutbox");
	conf_set(conf, "enable.idempotence", "true");
	conf_set(conf, "acks", "all");
	conf_set(conf, "partitioner", "murmur2_random");
	if (transactional)
	{
		/*
		 * exactly_once (eos.c): a failed message fails its transaction, which
		 * is aborted and sent again; librdkafka's own deadline is then the
		 * delivery timeout (a transaction must end within
		 * transaction.timeout.ms, at most the broker's 15 min by default).
		 */
		int			txn_ms = txn_timeout_ms();
		char		buf[32];

		snprintf(buf, sizeof(buf), "%d", txn_ms);
		conf_set(conf, "transaction.timeout.ms", buf);
		snprintf(buf, sizeof(buf), "%d", Min(voutbox_delivery_timeout, txn_ms / 4));
		conf_set(conf, "message.timeout.ms", buf);
	}
	else
	{
		conf_set(conf, "message.timeout.ms", "0");
		conf_set(conf, "enable.gapless.guarantee", "true");
	}
	conf_set(conf, "log.queue", "true");
	conf_set(conf, "sasl.kerberos.min.time.before.relogin", "0");
	/*
	 * Latency first: the worker hands over whole rounds at once, so batches
	 * fill without waiting under load; a trickle need not wait librdkafka's
	 * default 5 ms.  voutbox.kafka_properties may set it otherwise.
	 */
	conf_set(conf, "linger.ms", VOUTBOX_DEFAULT_LINGER_MS);
	/*
	 * voutbox creates topics itself (topics.c): a metadata request must not
	 * create one with the broker's defaults.
	 */
	if (voutbox_create_topics)
		conf_set(conf, "allow.auto.create.topics", "false");
	snprintf(queue_len, sizeof(queue_len), "%d", Max(100000, 2 * voutbox_batch_size));
	conf_set(conf, "queue.buffering.max.messages", queue_len);
	if (!apply_user_properties(conf, error))
	{
		rd_kafka_conf_destroy(conf);
		pfree(p);
		return NULL;
	}
	p->admin_conf = rd_kafka_conf_dup(conf);
	/* (Its metadata requests create no topic with the broker's defaults.) */
	conf_set(p->admin_conf, "allow.auto.create.topics", "false");
	conf_set(p->admin_conf, "enable.gapless.guarantee", "false");
	conf_set(p->admin_conf, "enable.idempotence", "false");
	conf_set(p->admin_conf, "log.queue", "false");
	conf_set(p->admin_conf, "log_level", "3");
	conf_set(p->admin_conf, "client.id", "voutbox-admin");
	/* (Not the provisioning client's: it must not fence the producer.) */
	if (transactional)
		conf_set(conf, "transactional.id", voutbox_transactional_id());
	rd_kafka_conf_set_opaque(conf, p);
	rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
	rd_kafka_conf_set_error_cb(conf, on_error);
	rd_kafka_conf_set_log_cb(conf, on_log);

	/* Before librdkafka opens them. */
	reserve_fds(p);
	p->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	if (p->rk == NULL)
	{
		rd_kafka_conf_destroy(conf);
		rd_kafka_conf_destroy(p->admin_conf);
		*error = pstrdup(errstr);
		for (int i = 0; i < p->reserved_fds; i++)
			ReleaseExternalFD();
		pfree(p);
		return NULL;
	}
	rd_kafka_set_log_queue(p->rk, NULL);
	p->transactional = transactional;
	p->txn_timeout_ms = txn_timeout_ms();
	if (transactional)
	{
		/*
		 * Fences any older producer of this transactional.id (a worker that
		 * died, or a server that was failed over), and ends the transaction
		 * it left open: committed if it had asked to commit, else aborted.
		 */
		rd_kafka_error_t *txn_error = rd_kafka_init_transactions(p->rk, TXN_CALL_TIMEOUT_MS);

		if (txn_error != NULL)
		{
			*error = psprintf("could not initialize Kafka transactions for transactional.id \"%s\": %s",
							  voutbox_transactional_id(), rd_kafka_error_string(txn_error));
			rd_kafka_error_destroy(txn_error);
			rd_kafka_destroy(p->rk);
			rd_kafka_conf_destroy(p->admin_conf);
			emit_logs(p);
			for (int i = 0; i < p->reserved_fds; i++)
				ReleaseExternalFD();
			pfree(p);
			return NULL;
		}
	}
	if (voutbox_create_topics)
		build_admin(p);
	p->config = MemoryContextStrdup(TopMemoryContext, current_config());
	p->config_checked = config_generation;

	if (pipe(fds) != 0 ||
		fcntl(fds[0], F_SETFL, O_NONBLOCK) != 0 || fcntl(fds[1], F_SETFL, O_NONBLOCK) != 0 ||
		fcntl(fds[0], F_SETFD, FD_CLOEXEC) != 0 || fcntl(fds[1], F_SETFD, FD_CLOEXEC) != 0)
		elog(ERROR, "voutbox: could not create a pipe: %m");
	p->pipe_r = fds[0];
	p->pipe_w = fds[1];
	mainq = rd_kafka_queue_get_main(p->rk);
	rd_kafka_queue_io_event_enable(mainq, p->pipe_w, "1", 1);
	rd_kafka_queue_destroy(mainq);
	voutbox_stats_producer_built();
	return p;
}

/*
 * Destroy the producer.  Messages still queued are purged: they are not
 * settled, so the worker sends them again.
 */
void
voutbox_producer_destroy(VoutboxProducer *p)
{
	p->report = NULL;
	/*
	 * An open transaction is aborted: a producer of at_least_once built
	 * next would never end it, and its partitions' last stable offset would
	 * hold read_committed consumers back until it times out.  (One that
	 * cannot be aborted now is, by the next init_transactions(), or the
	 * coordinator's timeout.)
	 */
	if (p->transactional && p->in_txn && !p->fatal)
		(void) voutbox_producer_abort(p);
	rd_kafka_purge(p->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
	rd_kafka_flush(p->rk, 1000);
	rd_kafka_destroy(p->rk);
	if (p->admin != NULL)
		rd_kafka_destroy(p->admin);
	rd_kafka_conf_destroy(p->admin_conf);
	emit_logs(p);
	close(p->pipe_r);
	close(p->pipe_w);
	for (int i = 0; i < p->reserved_fds; i++)
		ReleaseExternalFD();
	pfree(p->config);
	pfree(p);
}

bool
voutbox_producer_is_broken(VoutboxProducer *p)
{
	return p->fatal || p->purged;
}

/* Whether librdkafka declared the producer failed (a fatal error). */
bool
voutbox_producer_failed(VoutboxProducer *p)
{
	return p->fatal;
}

/* Whether the broker acknowledged any event of this producer. */
bool
voutbox_producer_delivered_any(VoutboxProducer *p)
{
	return p->delivered_any;
}

int
voutbox_producer_socket(VoutboxProducer *p)
{
	return p->pipe_r;
}

/*
 * Purge everything queued and in flight: the events come back with a purge
 * error (or, if timed_out is set, as timed out), or give up waiting for them
 * after PURGE_GRACE_MS.  The producer is then broken and is rebuilt.
 */
static void
purge(VoutboxProducer *p)
{
	rd_kafka_purge(p->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
	p->purged = true;
	p->purged_at = GetCurrentTimestamp();
}

/* Whether a fatal error says another producer of the transactional.id took over. */
static bool
is_fencing(rd_kafka_resp_err_t err)
{
	return err == RD_KAFKA_RESP_ERR__FENCED || err == RD_KAFKA_RESP_ERR_PRODUCER_FENCED ||
		err == RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH;
}

/* Serve librdkafka's main queue: delivery reports, errors, logs. */
void
voutbox_producer_serve(VoutboxProducer *p)
{
	char		buf[256];

	while (read(p->pipe_r, buf, sizeof(buf)) > 0)
		;
	while (rd_kafka_poll(p->rk, 0) > 0)
		;
	if (p->progress)
	{
		p->progress = false;
		p->brokers_down = false;
		p->last_progress = GetCurrentTimestamp();
	}
	if (p->down_sign)
	{
		p->down_sign = false;
		p->last_down_sign = GetCurrentTimestamp();
	}
	emit_logs(p);
	if (p->fatal && !p->purged)
	{
		char		reason[512];
		rd_kafka_resp_err_t err = rd_kafka_fatal_error(p->rk, reason, sizeof(reason));

		if (p->transactional && is_fencing(err))
			p->fenced = true;
		ereport(LOG,
				(errmsg("voutbox: the Kafka producer failed: %s: %s",
						rd_kafka_err2name(err), reason),
				 errdetail("Unsettled events are sent again by a new producer.")));
		purge(p);
	}
}

/* ---------------------------------------------------------------------
 * Delivering a batch
 * ---------------------------------------------------------------------
 */

static rd_kafka_headers_t *
headers_new(const VoutboxEvent *ev, VoutboxFormat format)
{
	rd_kafka_headers_t *h = rd_kafka_headers_new(12);
	char		time[64];

	switch (format)
	{
		case VOUTBOX_FORMAT_CLOUDEVENTS:
			/* Structured mode: the event is the value. */
			rd_kafka_header_add(h, "content-type", -1, "application/cloudevents+json; charset=UTF-8", -1);
			if (ev->traceparent != NULL)
				rd_kafka_header_add(h, "traceparent", -1, ev->traceparent, -1);
			return h;
		case VOUTBOX_FORMAT_CLOUDEVENTS_BINARY:
			/* Binary mode: the attributes as ce_ headers, datacontenttype as content-type. */
			voutbox_format_timestamp(ev->created_at, time, sizeof(time));
			rd_kafka_header_add(h, "ce_specversion", -1, "1.0", -1);
			rd_kafka_header_add(h, "ce_id", -1, ev->id, -1);
			rd_kafka_header_add(h, "ce_source", -1, voutbox_ce_source(ev), -1);
			rd_kafka_header_add(h, "ce_type", -1, ev->event_type, -1);
			rd_kafka_header_add(h, "ce_subject", -1, ev->aggregate_id, -1);
			rd_kafka_header_add(h, "ce_time", -1, time, -1);
			rd_kafka_header_add(h, "content-type", -1, "application/json", -1);
			if (ev->traceparent != NULL)
			{
				rd_kafka_header_add(h, "ce_traceparent", -1, ev->traceparent, -1);
				rd_kafka_header_add(h, "traceparent", -1, ev->traceparent, -1);
			}
			if (ev->msg_key_utf8 != NULL && ev->msg_key_utf8[0] != '\0')
				rd_kafka_header_add(h, "ce_partitionkey", -1, ev->msg_key_utf8, -1);
			rd_kafka_header_add(h, "ce_tenantid", -1, ev->tenant_id_utf8, -1);
			rd_kafka_header_add(h, "ce_correlationid", -1, ev->correlation_id, -1);
			rd_kafka_header_add(h, "ce_idempotencykey", -1, ev->idempotency_key, -1);
			return h;
		case VOUTBOX_FORMAT_DEBEZIUM:
			/* Debezium's EventRouter: the event id in header "id". */
			rd_kafka_header_add(h, "id", -1, ev->id, -1);
			if (ev->traceparent != NULL)
				rd_kafka_header_add(h, "traceparent", -1, ev->traceparent, -1);
			return h;
		case VOUTBOX_FORMAT_VOUTBOX:
			break;
	}

	rd_kafka_header_add(h, "idempotency_key", -1, ev->idempotency_key, -1);
	rd_kafka_header_add(h, "event_type", -1, ev->event_type, -1);
	rd_kafka_header_add(h, "tenant_id", -1, ev->tenant_id_utf8, -1);
	rd_kafka_header_add(h, "correlation_id", -1, ev->correlation_id, -1);
	rd_kafka_header_add(h, "content-type", -1, "application/json", -1);
	if (ev->traceparent != NULL)
		rd_kafka_header_add(h, "traceparent", -1, ev->traceparent, -1);
	return h;
}

/*
 * The static headers of the event's route (a JSON object of strings, as
 * routes.c checked it), after voutbox's own.
 */
static void
add_route_headers(rd_kafka_headers_t *h, const VoutboxEvent *ev)
{
	struct json_object *obj;

	if (ev->headers == NULL)
		return;
	if ((obj = json_tokener_parse(ev->headers)) == NULL)
	{
		ereport(LOG,
				(errmsg("voutbox: the headers of event %s are not JSON; it goes without them", ev->id)));
		return;
	}
	if (json_object_is_type(obj, json_type_object))
	{
		json_object_object_foreach(obj, name, value)
		{
			if (json_object_is_type(value, json_type_string))
				rd_kafka_header_add(h, name, -1, json_object_get_string(value),
									json_object_get_string_len(value));
		}
	}
	json_object_put(obj);
}

static rd_kafka_resp_err_t
produce_one(VoutboxProducer *p, const VoutboxEvent *ev, uint64 ticket)
{
	VoutboxFormat format = (VoutboxFormat) (ev->format >= 0 ? ev->format : voutbox_format);
	struct json_object *env = voutbox_value_new(ev, format);
	size_t		len;
	const char *value = json_object_to_json_string_length(env, JSON_C_TO_STRING_PLAIN |
														  JSON_C_TO_STRING_NOSLASHESCAPE, &len);
	rd_kafka_headers_t *hdrs = headers_new(ev, format);
	rd_kafka_resp_err_t err;
	/* Kafka record time: when the event was saved, in ms since the epoch */
	int64		ts_ms = ev->created_at / 1000 +
		(int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY * 1000;

	add_route_headers(hdrs, ev);

	err = rd_kafka_producev(p->rk,
							RD_KAFKA_V_TOPIC(ev->topic),
							RD_KAFKA_V_KEY(ev->msg_key_utf8, ev->msg_key_utf8 ? strlen(ev->msg_key_utf8) : 0),
							RD_KAFKA_V_VALUE((void *) value, len),
							RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
							RD_KAFKA_V_HEADERS(hdrs),
							RD_KAFKA_V_TIMESTAMP(ts_ms),
							RD_KAFKA_V_OPAQUE((void *) (uintptr_t) ticket),
							RD_KAFKA_V_END);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		rd_kafka_headers_destroy(hdrs);
	json_object_put(env);
	return err;
}

/*
 * Whether no broker can be reached: librdkafka said all brokers are down and
 * no report came since.  It does not say when a broker comes back, but while
 * they are down its reconnection attempts keep failing: an outage ends, for
 * the worker, a minute (or delivery_timeout, if longer) after the last
 * failed connection.
 */
static bool
outage(VoutboxProducer *p)
{
	return p->brokers_down &&
		!TimestampDifferenceExceeds(p->last_down_sign, GetCurrentTimestamp(),
									Max(voutbox_delivery_timeout, 60000));
}

/*
 * Watch the deadlines of the events handed over; call after serving, as
 * often as the caller wakes up (at least once a second while events are
 * pending).  A new configuration, a stop request (after a grace period) or
 * delivery_timeout without a report purges the producer, whose events then
 * report at once.  Returns true when purged events did not report within
 * PURGE_GRACE_MS: the caller then counts them as not sent, and destroys the
 * producer (whose later reports nobody hears).
 */
bool
voutbox_producer_watch(VoutboxProducer *p)
{
	TimestampTz now = GetCurrentTimestamp();

	if (p->pending == 0)
		return false;
	/*
	 * A new broker list or librdkafka setting needs a new producer: give up
	 * on this one, its events come back unsent and go out again.
	 */
	if (ConfigReloadPending)
		voutbox_reload_config();
	if (!p->purged && voutbox_producer_config_changed(p))
	{
		ereport(LOG, (errmsg("voutbox: Kafka settings changed; rebuilding the producer")));
		purge(p);
	}
	if (ShutdownRequestPending && !p->purged)
	{
		if (p->shutdown_at == 0)
			p->shutdown_at = now;
		else if (TimestampDifferenceExceeds(p->shutdown_at, now, SHUTDOWN_GRACE_MS))
			purge(p);
	}
	/*
	 * No report for delivery_timeout while some broker answers: give up on
	 * the outstanding events, which time out and are retried.
	 */
	if (!p->purged && !outage(p) && p->pending > p->stragglers &&
		TimestampDifferenceExceeds(p->last_progress, now, voutbox_delivery_timeout))
	{
		ereport(LOG,
				(errmsg("voutbox: no delivery report for %d ms; %d events time out",
						voutbox_delivery_timeout, p->pending),
				 errdetail("They are retried with backoff by a new producer, each key's later events behind them.")));
		p->timed_out = true;
		purge(p);
	}
	if (p->purged)
	{
		/* Purged events report at once, as a rule. */
		voutbox_producer_serve(p);
		if (p->pending == 0)
			return false;
		/* Should some not, they count as purged after a grace period. */
		if (TimestampDifferenceExceeds(p->purged_at, GetCurrentTimestamp(), PURGE_GRACE_MS))
		{
			ereport(LOG,
					(errmsg("voutbox: %d purged events did not report within %d ms; they count as not sent",
							p->pending, PURGE_GRACE_MS)));
			return true;
		}
		return false;
	}
	/* Only stragglers wait: the stream says so. */
	if (p->pending <= p->stragglers)
		return false;
	if (TimestampDifferenceExceeds(p->last_notice, now, STALL_NOTICE_MS))
	{
		p->last_notice = now;
		ereport(LOG,
				(errmsg("voutbox: still waiting for the broker to acknowledge %d events",
						p->pending),
				 errdetail("Kafka brokers: %s. %s", voutbox_brokers,
						   outage(p) ?
						   "No broker can be reached; delivery resumes, in order, when one answers. Waiting uses up no retry." :
						   "Nothing is lost.")));
	}
	/* Said only when the wait is long enough to be seen. */
	if (TimestampDifferenceExceeds(p->last_progress, now, 1000))
	{
		voutbox_report_activity(psprintf("waiting for the broker: %d events unacknowledged",
										 p->pending));
		voutbox_stats_set_state(outage(p) ? "broker unreachable" : "waiting for broker",
								psprintf("%d events unacknowledged", p->pending));
	}
	return false;
}

/*
 * Give up on the events in flight because some of them out-waited their
 * deadline while others were acknowledged (stream.c): purge them all, and
 * the producer is rebuilt.  The caller tells the events past their deadline
 * (timed out) from the others (purged: they go again).  Not while no broker
 * can be reached: an outage uses up no retry.  Returns whether it purged.
 */
bool
voutbox_producer_give_up(VoutboxProducer *p)
{
	if (p->purged || outage(p))
		return false;
	purge(p);
	return true;
}

/* Whether no broker can be reached (see outage()). */
bool
voutbox_producer_outage(VoutboxProducer *p)
{
	return outage(p);
}

/*
 * How many of the events in flight are stragglers: the watch's deadline
 * (no report for delivery_timeout) is for the others.
 */
void
voutbox_producer_set_stragglers(VoutboxProducer *p, int n)
{
	p->stragglers = n;
}

/* Events handed over whose report has not come. */
int
voutbox_producer_pending(VoutboxProducer *p)
{
	return p->pending;
}

/* Whether the producer was purged for want of reports. */
bool
voutbox_producer_timed_out(VoutboxProducer *p)
{
	return p->timed_out;
}

void
voutbox_producer_set_reporter(VoutboxProducer *p, VoutboxReportFn report, void *arg)
{
	p->report = report;
	p->report_arg = arg;
}

/*
 * librdkafka has its copy of the event: the round keeps no second one of its
 * JSON values (settling needs none of them).
 */
static void
release_values(VoutboxEvent *ev)
{
	if (ev->payload)
		pfree(ev->payload);
	if (ev->metadata)
		pfree(ev->metadata);
	if (ev->consent)
		pfree(ev->consent);
	ev->payload = ev->metadata = ev->consent = NULL;
}

/* ---------------------------------------------------------------------
 * Kafka transactions (exactly_once, eos.c)
 *
 * The events of the rounds settled together go in one Kafka transaction,
 * begun when the first of them is handed over.  It ends with a commit that
 * also carries the checkpoint record (voutbox_producer_commit()), or an
 * abort.  An error of a transactional call that is neither retriable nor
 * abortable breaks the producer (it is rebuilt; its successor's
 * init_transactions() ends what it left open).
 * ---------------------------------------------------------------------
 */

/* A transactional call failed beyond repair: the producer is rebuilt. */
static void
txn_broke(VoutboxProducer *p, const char *what, rd_kafka_error_t *error)
{
	rd_kafka_resp_err_t err = rd_kafka_error_code(error);
	char		reason[256];

	if (rd_kafka_error_is_fatal(error))
		err = rd_kafka_fatal_error(p->rk, reason, sizeof(reason));
	if (is_fencing(err) || is_fencing(rd_kafka_error_code(error)))
		p->fenced = true;
	ereport(LOG,
			(errmsg("voutbox: could not %s the Kafka transaction: %s", what,
					rd_kafka_error_string(error)),
			 p->fenced ?
			 errdetail("Another producer with transactional.id \"%s\" has taken over.",
					   voutbox_transactional_id()) : 0));
	p->fatal = true;
	p->in_txn = false;
	if (!p->purged)
		purge(p);
}

static bool
begin_transaction(VoutboxProducer *p)
{
	rd_kafka_error_t *error = rd_kafka_begin_transaction(p->rk);

	if (error == NULL)
	{
		p->in_txn = true;
		p->txn_started_at = GetCurrentTimestamp();
		return true;
	}
	txn_broke(p, "begin", error);
	rd_kafka_error_destroy(error);
	return false;
}

/* Whether the producer is transactional, and has a transaction open. */
bool
voutbox_producer_in_transaction(VoutboxProducer *p)
{
	return p->transactional && p->in_txn;
}

/* Whether the open transaction is older than fifths/5 of transaction.timeout.ms. */
static bool
txn_older_than_fifths(VoutboxProducer *p, int fifths)
{
	return p->transactional && p->in_txn &&
		TimestampDifferenceExceeds(p->txn_started_at, GetCurrentTimestamp(), fifths * (p->txn_timeout_ms / 5));
}

/*
 * Whether the open transaction is too old to be committed safely: older than
 * two fifths of transaction.timeout.ms, the rest being what the standbys'
 * wait and the commit's retries may take (a fifth each, and one call).  It
 * is then aborted rather than risk the coordinator's timeout (see
 * txn_timeout_ms()).
 */
bool
voutbox_producer_txn_expiring(VoutboxProducer *p)
{
	return txn_older_than_fifths(p, 2);
}

/* Whether the open transaction is too old to begin its commit (three fifths of its timeout). */
bool
voutbox_producer_txn_late(VoutboxProducer *p)
{
	return txn_older_than_fifths(p, 3);
}

/*
 * Make sure of the checkpoint topic before a settle is prepared: recovery
 * takes a checkpoint topic that does not exist for an error, not for one
 * that holds nothing.  Returns false (the transaction is then aborted) if
 * it cannot be made sure of.
 */
bool
voutbox_producer_checkpoint_ready(VoutboxProducer *p)
{
	char	   *why;

	if (p->checkpoint_ready)
		return true;
	if (p->admin == NULL)
		build_admin(p);
	why = voutbox_checkpoint_topic_ensure(p->admin != NULL ? p->admin : p->rk,
										  voutbox_checkpoint_topic());
	if (why != NULL)
	{
		ereport(LOG,
				(errmsg("voutbox: could not make sure of the checkpoint topic \"%s\": %s",
						voutbox_checkpoint_topic(), why),
				 errdetail("The transaction is aborted; its events go again.")));
		return false;
	}
	p->checkpoint_ready = true;
	return true;
}

/* How long the standbys may be waited for before a commit, in ms. */
int
voutbox_producer_txn_wait_ms(VoutboxProducer *p)
{
	return Min(voutbox_delivery_timeout, p->txn_timeout_ms / 5);
}

/* Whether another producer of the transactional.id fenced this one. */
bool
voutbox_producer_fenced(VoutboxProducer *p)
{
	return p->fenced;
}

/*
 * Abort the open transaction, if any: nothing of it is ever seen by a
 * read_committed consumer.  If the abort itself fails, the producer is
 * broken, and its successor's init_transactions() ends the transaction;
 * returns false then (after a commit that failed, the commit may have gone
 * through: see voutbox_producer_commit()).
 */
bool
voutbox_producer_abort(VoutboxProducer *p)
{
	TimestampTz start = GetCurrentTimestamp();
	bool		ok = true;

	if (!p->transactional || !p->in_txn)
		return true;
	for (;;)
	{
		rd_kafka_error_t *error = rd_kafka_abort_transaction(p->rk, TXN_CALL_TIMEOUT_MS);

		if (error == NULL)
		{
			p->in_txn = false;
			break;
		}
		if (rd_kafka_error_is_retriable(error) &&
			!TimestampDifferenceExceeds(start, GetCurrentTimestamp(), 3 * TXN_CALL_TIMEOUT_MS))
		{
			rd_kafka_error_destroy(error);
			continue;
		}
		txn_broke(p, "abort", error);
		rd_kafka_error_destroy(error);
		ok = false;
		break;
	}
	emit_logs(p);
	return ok;
}

/*
 * Commit the open transaction with the checkpoint record (key, value) added
 * to partition 0 of the checkpoint topic.  Every event of the transaction
 * has been acknowledged (the caller waited for their reports).
 */
VoutboxTxnResult
voutbox_producer_commit(VoutboxProducer *p, const char *key, const char *value)
{
	rd_kafka_resp_err_t err;
	TimestampTz start = GetCurrentTimestamp();

	Assert(p->transactional && p->in_txn);
	if (!voutbox_producer_checkpoint_ready(p))
	{
		voutbox_producer_abort(p);
		return VOUTBOX_TXN_ABORTED;
	}
	err = rd_kafka_producev(p->rk,
							RD_KAFKA_V_TOPIC(voutbox_checkpoint_topic()),
							RD_KAFKA_V_PARTITION(0),
							RD_KAFKA_V_KEY(key, strlen(key)),
							RD_KAFKA_V_VALUE(unconstify(char *, value), strlen(value)),
							RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
							RD_KAFKA_V_OPAQUE(CHECKPOINT_TICKET),
							RD_KAFKA_V_END);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		ereport(LOG,
				(errmsg("voutbox: could not produce the checkpoint record: %s", rd_kafka_err2str(err)),
				 errdetail("The transaction is aborted; its events go again.")));
		voutbox_producer_abort(p);
		return p->fenced ? VOUTBOX_TXN_FENCED : VOUTBOX_TXN_ABORTED;
	}
	p->pending++;
	for (;;)
	{
		rd_kafka_error_t *error = rd_kafka_commit_transaction(p->rk, TXN_CALL_TIMEOUT_MS);

		emit_logs(p);
		if (error == NULL)
		{
			p->in_txn = false;
			p->delivered_any = true;
			/* (The coordinator answered.) */
			p->brokers_down = false;
			return VOUTBOX_TXN_COMMITTED;
		}
		if (rd_kafka_error_is_retriable(error) &&
			!TimestampDifferenceExceeds(start, GetCurrentTimestamp(),
										p->txn_timeout_ms / 5 - TXN_CALL_TIMEOUT_MS))
		{
			rd_kafka_error_destroy(error);
			continue;
		}
		if (rd_kafka_error_txn_requires_abort(error))
		{
			ereport(LOG,
					(errmsg("voutbox: could not commit the Kafka transaction: %s",
							rd_kafka_error_string(error)),
					 errdetail("The transaction is aborted; its events go again.")));
			rd_kafka_error_destroy(error);
			/*
			 * (The commit may have gone through all the same, its answer
			 * lost: then the abort fails, and only the checkpoint can tell.)
			 */
			if (!voutbox_producer_abort(p))
				return p->fenced ? VOUTBOX_TXN_FENCED : VOUTBOX_TXN_IN_DOUBT;
			return VOUTBOX_TXN_ABORTED;
		}
		/* Fatal, or retriable for too long: whether it committed is not known here. */
		txn_broke(p, "commit", error);
		rd_kafka_error_destroy(error);
		return p->fenced ? VOUTBOX_TXN_FENCED : VOUTBOX_TXN_IN_DOUBT;
	}
}

/*
 * The gids of the settles whose checkpoint records, of key, Kafka holds
 * committed: a read_committed consumer reads the checkpoint topic's one
 * partition to its end (the last stable offset).  Called by recovery after
 * init_transactions(), so that the transaction a dead worker left is
 * either committed or aborted by then.  Returns false, with *error, if the
 * topic could not be read; a topic that does not exist holds nothing.
 */
bool
voutbox_checkpoint_gids(const char *key, List **gids, char **error)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	rd_kafka_t *rk;
	rd_kafka_topic_t *rkt = NULL;
	char		errstr[512];
	int64_t		lo,
				hi;
	rd_kafka_resp_err_t err;
	TimestampTz last_news = GetCurrentTimestamp();
	bool		ok = false;
	char	   *topic = voutbox_checkpoint_topic();

	*gids = NIL;
	conf_set(conf, "bootstrap.servers", voutbox_brokers);
	conf_set(conf, "client.id", "voutbox-recovery");
	conf_set(conf, "log_level", "3");
	/* (The producer's properties: security settings are needed here too.) */
	if (!apply_user_properties(conf, error))
	{
		rd_kafka_conf_destroy(conf);
		return false;
	}
	conf_set(conf, "isolation.level", "read_committed");
	conf_set(conf, "allow.auto.create.topics", "false");
	conf_set(conf, "enable.partition.eof", "true");
	conf_set(conf, "enable.auto.commit", "false");
	conf_set(conf, "enable.auto.offset.store", "false");
	/* (Compaction may move the log's start while it is read: from the start again.) */
	conf_set(conf, "auto.offset.reset", "smallest");
	rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof(errstr));
	if (rk == NULL)
	{
		rd_kafka_conf_destroy(conf);
		*error = pstrdup(errstr);
		return false;
	}
	for (int i = 0; i < 8; i++)
		ReserveExternalFD();
	err = rd_kafka_query_watermark_offsets(rk, topic, 0, &lo, &hi,
										   TXN_CALL_TIMEOUT_MS);
	/*
	 * (A settle is prepared only once the topic exists: one that is missing
	 * was deleted, or the settings name another.  Only an operator can tell.)
	 */
	if (err == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART || err == RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION ||
		err == RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC)
		*error = psprintf("the checkpoint topic \"%s\" does not exist on %s", topic, voutbox_brokers);
	else if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		*error = psprintf("could not read the offsets of topic \"%s\": %s", topic,
						  rd_kafka_err2str(err));
	else if (hi <= lo)
		ok = true;
	else
	{
		rkt = rd_kafka_topic_new(rk, topic, NULL);
		if (rd_kafka_consume_start(rkt, 0, RD_KAFKA_OFFSET_BEGINNING) != 0)
			*error = psprintf("could not read topic \"%s\": %s", topic,
							  rd_kafka_err2str(rd_kafka_last_error()));
		else
		{
			for (;;)
			{
				rd_kafka_message_t *m = rd_kafka_consume(rkt, 0, 1000);

				CHECK_FOR_INTERRUPTS();
				if (m == NULL)
				{
					if (TimestampDifferenceExceeds(last_news, GetCurrentTimestamp(), 3 * TXN_CALL_TIMEOUT_MS))
					{
						*error = psprintf("reading topic \"%s\" timed out", topic);
						break;
					}
					continue;
				}
				last_news = GetCurrentTimestamp();
				if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF)
				{
					rd_kafka_message_destroy(m);
					ok = true;
					break;
				}
				if (m->err != RD_KAFKA_RESP_ERR_NO_ERROR)
				{
					*error = psprintf("could not read topic \"%s\": %s", topic,
									  rd_kafka_message_errstr(m));
					rd_kafka_message_destroy(m);
					break;
				}
				if (m->key_len == strlen(key) && memcmp(m->key, key, m->key_len) == 0 && m->len > 0)
				{
					char	   *gid = voutbox_checkpoint_gid(pnstrdup(m->payload, m->len));

					if (gid != NULL)
						*gids = lappend(*gids, gid);
				}
				rd_kafka_message_destroy(m);
			}
			rd_kafka_consume_stop(rkt, 0);
		}
		rd_kafka_topic_destroy(rkt);
	}
	rd_kafka_destroy(rk);
	for (int i = 0; i < 8; i++)
		ReleaseExternalFD();
	return ok;
}

/*
 * Hand an event to librdkafka; its report will carry the ticket.  Returns 0,
 * or the error that made librdkafka refuse it at once (a broken producer or a
 * stop request: _PURGE_QUEUE, the producer's trouble).  A full local queue
 * is waited out.  The JSON values of an event handed over are released.
 */
int
voutbox_producer_send(VoutboxProducer *p, VoutboxEvent *ev, uint64 ticket)
{
	rd_kafka_resp_err_t err;

	if (p->purged || p->fatal || ShutdownRequestPending)
		return RD_KAFKA_RESP_ERR__PURGE_QUEUE;
	/* (A route may name any topic: not a worker's checkpoint topic.) */
	if (voutbox_is_checkpoint_topic(ev->topic))
		return RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED;
	if (voutbox_create_topics && p->admin == NULL)
		build_admin(p);
	if (p->admin != NULL &&
		!voutbox_topic_ensure(p->admin, p->rk, ev->topic, ev->topic_settings, !outage(p)))
		return VOUTBOX_DELIVERY_NO_TOPIC;
	if (p->transactional && !p->in_txn && !begin_transaction(p))
		return RD_KAFKA_RESP_ERR__PURGE_QUEUE;
	for (;;)
	{
		if (p->purged || p->fatal || ShutdownRequestPending)
			return RD_KAFKA_RESP_ERR__PURGE_QUEUE;
		err = produce_one(p, ev, ticket);
		if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL)
			break;
		voutbox_producer_serve(p);
		(void) voutbox_producer_watch(p);
		(void) WaitLatchOrSocket(MyLatch,
								 WL_LATCH_SET | WL_SOCKET_READABLE | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
								 p->pipe_r, 100, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
	/*
	 * (A transactional producer refuses new messages once its transaction
	 * failed: the producer's trouble, not the event's.)
	 */
	if (p->transactional &&
		(err == RD_KAFKA_RESP_ERR__STATE || err == RD_KAFKA_RESP_ERR__FATAL ||
		 err == RD_KAFKA_RESP_ERR__FENCED))
		return RD_KAFKA_RESP_ERR__PURGE_QUEUE;
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		return err;
	if (p->pending++ <= p->stragglers)
	{
		p->last_progress = p->last_notice = GetCurrentTimestamp();
		p->shutdown_at = 0;
	}
	release_values(ev);
	return 0;
}

const char *
voutbox_delivery_error_text(int err)
{
	if (err == VOUTBOX_DELIVERY_NO_TOPIC)
		return "could not create topic";
	if (err == VOUTBOX_DELIVERY_UNCONFIRMED)
		return "acknowledged without an offset, after a failed request: not proven written";
	return psprintf("%s: %s", rd_kafka_err2name(err), rd_kafka_err2str(err));
}

const char *
voutbox_delivery_error_name(int err)
{
	if (err == VOUTBOX_DELIVERY_NO_TOPIC)
		return "VOUTBOX_TOPIC_NOT_CREATED";
	if (err == VOUTBOX_DELIVERY_UNCONFIRMED)
		return VOUTBOX_UNCONFIRMED_CODE;
	return rd_kafka_err2name(err);
}

/*
 * Whether an event failed because of its topic alone: one that does not
 * exist (librdkafka refuses its events at once after
 * topic.metadata.propagation.max.ms, and fails those it queued with the
 * broker's error), or a partition it lacks.  Retriable: the topic may be
 * created.
 */
bool
voutbox_topic_refusal(int err)
{
	return err == RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC || err == RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION ||
		err == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART || err == VOUTBOX_DELIVERY_NO_TOPIC;
}

/*
 * The error classes.  Retriable errors that librdkafka retries itself
 * (transport, request timeouts, leader or replica not available, not enough
 * replicas, throttling) reach the worker only as a timeout of
 * voutbox.delivery_timeout; any error not listed here is retriable too, so
 * that an unknown error costs retries, never an event.
 */
VoutboxErrorClass
voutbox_delivery_error_class(int err)
{
	switch (err)
	{
			/*
			 * The producer's trouble, not the event's: a purge (shutdown, a
			 * new configuration, a fatal error), a full local queue, or the
			 * idempotent producer losing its sequence or acknowledging what it
			 * cannot prove written.  Sent again, in order.
			 */
		case VOUTBOX_DELIVERY_UNCONFIRMED:
		case RD_KAFKA_RESP_ERR__PURGE_QUEUE:
		case RD_KAFKA_RESP_ERR__PURGE_INFLIGHT:
		case RD_KAFKA_RESP_ERR__QUEUE_FULL:
		case RD_KAFKA_RESP_ERR__FATAL:
		case RD_KAFKA_RESP_ERR__GAPLESS_GUARANTEE:
		case RD_KAFKA_RESP_ERR__FENCED:
		case RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER:
		case RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH:
		case RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID:
		case RD_KAFKA_RESP_ERR_PRODUCER_FENCED:
			return VOUTBOX_ERROR_PRODUCER;

			/* The event can never be delivered as it is, or not to this topic. */
		case RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE:
		case RD_KAFKA_RESP_ERR_INVALID_MSG_SIZE:
		case RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE:
		case RD_KAFKA_RESP_ERR_INVALID_RECORD:
		case RD_KAFKA_RESP_ERR_TOPIC_EXCEPTION:
		case RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED:
		case RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED:
		case RD_KAFKA_RESP_ERR_UNSUPPORTED_FOR_MESSAGE_FORMAT:
		case RD_KAFKA_RESP_ERR_POLICY_VIOLATION:
		case RD_KAFKA_RESP_ERR_INVALID_REQUIRED_ACKS:
		case RD_KAFKA_RESP_ERR_UNSUPPORTED_COMPRESSION_TYPE:
		case RD_KAFKA_RESP_ERR__INVALID_ARG:
		case RD_KAFKA_RESP_ERR__BAD_MSG:
			return VOUTBOX_ERROR_PERMANENT;

		default:
			return VOUTBOX_ERROR_RETRIABLE;
	}
}
