/*
 * vkafka: the small librdkafka client that voutbox's tests and demo use.
 *
 *   vkafka consume -b BROKERS -t TOPIC[,TOPIC...] [-n COUNT] [-e] [-T SECONDS] [-g GROUP] [-c name=value ...]
 *       Read the topics from the beginning with a new consumer group until
 *       COUNT messages arrived or SECONDS passed (default 60); with -e, go on
 *       until the end of every partition of the topics, which must exist: their
 *       partitions are then assigned, without a group unless -g names one.  A
 *       read_committed consumer (the default) is at the end only once nothing
 *       lies beyond its position (no transaction left unmarked).  Prints one
 *       JSON object per message: topic, partition, offset, key, headers, value.
 *       Exits 0 when COUNT messages arrived (or, without -n, at the deadline
 *       or the end), 2 when fewer arrived in time or the end was not reached.
 *   vkafka produce -b BROKERS -t TOPIC -n COUNT -s BYTES [-k KEYS] [-r RATE] [-l LINGER_MS]
 *       Benchmark baseline: a plain librdkafka producer with voutbox's settings
 *       (idempotent, acks=all, murmur2_random) sends COUNT messages of BYTES
 *       bytes over KEYS keys.  Without -r, as fast as possible, and prints
 *       the rate; with -r, one message at a time at RATE per second, and
 *       prints the produce-to-acknowledgement latency percentiles.
 *   vkafka create-topic -b BROKERS -t TOPIC [-p PARTITIONS] [-c name=value ...]
 *       (replication factor: the broker's default.replication.factor)
 *   vkafka alter-topic -b BROKERS -t TOPIC -c name=value [-c name=value ...]
 *   vkafka describe-topic -b BROKERS -t TOPIC
 *       Print the topic as JSON: {"partitions": N, "replication_factor": R,
 *       "config": {name: value}} with the settings not at their default;
 *       exits 2 if the topic does not exist.
 *   vkafka acl add|delete -b BROKERS -t RESOURCE -c name=value ...
 *       Add or delete one ACL binding: resource=topic|cluster,
 *       pattern=literal|prefixed, operation=create|all|..., permission=allow|deny,
 *       principal (User:ANONYMOUS), host (*).  RESOURCE is the resource name
 *       (kafka-cluster for the cluster).
 *       Topic and ACL administration through librdkafka's admin API.
 *   vkafka mock [-n BROKERS] [-c name=value ...]
 *       Run a librdkafka mock cluster of BROKERS brokers (default 1, ids 1..N;
 *       -c sets properties of its handle, e.g. debug=mock).  Prints the
 *       bootstrap servers as the first line, then reads commands from stdin,
 *       one a line, and answers each with one line, "ok" or "error: ...":
 *         create-topic TOPIC PARTITIONS
 *         push-errors APIKEY ERR [ERR ...]        one error per next request
 *         broker-errors BROKER APIKEY ERR:RTT_MS [ERR:RTT_MS ...]
 *         clear-errors APIKEY                     push-errors' ones only
 *         wait-errors BROKER APIKEY N             until BROKER has at most N of
 *                                                 broker-errors' left (10 s)
 *         down BROKER | up BROKER                 BROKER -1: all of them
 *         rtt BROKER MS
 *         leader TOPIC PARTITION BROKER           BROKER -1: leaderless
 *         quit
 *       APIKEY is a Kafka request type number (Produce 0, Metadata 3,
 *       InitProducerId 22), ERR an error name without RD_KAFKA_RESP_ERR_
 *       (NOT_ENOUGH_REPLICAS, _TRANSPORT, ...) or number.  Exits 0 at quit
 *       or the end of its input.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#define MAX_CONFIGS 16

static const char *brokers = NULL;
static char *topics = NULL;
static long count = -1;
static int	to_end = 0;
static int timeout_s = 60;
static int partitions = 1;
static int size = 500;
static int nkeys = 1000;
static int rate = 0;
static const char *linger = NULL;	/* produce: linger.ms, else librdkafka's default */
static const char *group = NULL;
static char *configs[MAX_CONFIGS];
static int nconfigs = 0;

static void
die(const char *fmt, const char *arg)
{
	fprintf(stderr, "vkafka: ");
	fprintf(stderr, fmt, arg);
	fprintf(stderr, "\n");
	exit(1);
}

static void
set(rd_kafka_conf_t *conf, const char *name, const char *value)
{
	char		errstr[512];

	if (rd_kafka_conf_set(conf, name, value, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
		die("%s", errstr);
}

static double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static json_object *
bytes_or_null(const void *p, size_t len)
{
	return p ? json_object_new_string_len(p, (int) len) : NULL;
}

/*
 * Offsets already printed, per topic-partition: a rebalance restarts an
 * uncommitted partition from the beginning, and a message must print once.
 */
#define MAX_PARTITIONS 256
static struct
{
	char		topic[256];
	int			partition;
	int64_t		next;
}			seen[MAX_PARTITIONS];
static int	nseen = 0;

static int	at_end[MAX_PARTITIONS];

/* The index of m's topic-partition in seen[], registering it if new. */
static int
partition_slot(rd_kafka_message_t *m)
{
	const char *topic = rd_kafka_topic_name(m->rkt);
	int			i;

	for (i = 0; i < nseen; i++)
		if (seen[i].partition == m->partition && strcmp(seen[i].topic, topic) == 0)
			return i;
	if (nseen == MAX_PARTITIONS)
		die("%s", "too many partitions");
	snprintf(seen[i].topic, sizeof(seen[i].topic), "%s", topic);
	seen[i].partition = m->partition;
	seen[i].next = 0;
	at_end[i] = 0;
	return nseen++;
}

static int
first_time(rd_kafka_message_t *m)
{
	int			i = partition_slot(m);

	at_end[i] = 0;
	if (m->offset < seen[i].next)
		return 0;
	seen[i].next = m->offset + 1;
	return 1;
}

/* Partitions to read to the end (-e), and which of them are at the end. */
static int	npartitions_total = 0;

static int
all_at_end(void)
{
	int			n = 0;

	for (int i = 0; i < nseen; i++)
		n += at_end[i];
	return npartitions_total > 0 && n >= npartitions_total;
}

/* Add every partition of the (existing) topics to parts, to be read from the beginning. */
static void
list_partitions(rd_kafka_t *rk, const char *topic_list, rd_kafka_topic_partition_list_t *parts)
{
	char	   *copy = strdup(topic_list);

	for (char *t = strtok(copy, ","); t; t = strtok(NULL, ","))
	{
		rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, t, NULL);
		const struct rd_kafka_metadata *md;
		double		deadline = now_s() + 15;

		/* A topic just created may have no leader yet: ask again. */
		for (;;)
		{
			rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 0, rkt, &md, 10000);

			if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
				die("could not read the metadata of %s", t);
			err = md->topic_cnt == 1 ? md->topics[0].err : RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART;
			if (err == RD_KAFKA_RESP_ERR_NO_ERROR && md->topics[0].partition_cnt > 0)
				break;
			rd_kafka_metadata_destroy(md);
			if (now_s() > deadline)
				die("topic %s does not exist, has no leader or no partitions", t);
			usleep(200 * 1000);
		}
		for (int i = 0; i < md->topics[0].partition_cnt; i++)
			rd_kafka_topic_partition_list_add(parts, t, md->topics[0].partitions[i].id)->offset =
				RD_KAFKA_OFFSET_BEGINNING;
		rd_kafka_metadata_destroy(md);
		rd_kafka_topic_destroy(rkt);
	}
	free(copy);
}

static void
print_message(rd_kafka_message_t *m)
{
	json_object *o = json_object_new_object();
	json_object *headers = json_object_new_object();
	rd_kafka_headers_t *hdrs = NULL;

	json_object_object_add(o, "topic", json_object_new_string(rd_kafka_topic_name(m->rkt)));
	json_object_object_add(o, "partition", json_object_new_int(m->partition));
	json_object_object_add(o, "offset", json_object_new_int64(m->offset));
	json_object_object_add(o, "key", bytes_or_null(m->key, m->key_len));
	{
		rd_kafka_timestamp_type_t tstype;
		int64_t		ts = rd_kafka_message_timestamp(m, &tstype);

		json_object_object_add(o, "timestamp", json_object_new_int64(ts));
		json_object_object_add(o, "timestamp_type",
							   json_object_new_string(tstype == RD_KAFKA_TIMESTAMP_LOG_APPEND_TIME ?
													  "LogAppendTime" : "CreateTime"));
	}
	if (rd_kafka_message_headers(m, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		const char *name;
		const void *value;
		size_t		size;

		for (size_t i = 0; rd_kafka_header_get_all(hdrs, i, &name, &value, &size) == RD_KAFKA_RESP_ERR_NO_ERROR; i++)
			json_object_object_add(headers, name, bytes_or_null(value, size));
	}
	json_object_object_add(o, "headers", headers);
	json_object_object_add(o, "value", bytes_or_null(m->payload, m->len));
	printf("%s\n", json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN));
	fflush(stdout);
	json_object_put(o);
}

static int
consume(void)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	rd_kafka_topic_partition_list_t *subs = rd_kafka_topic_partition_list_new(4);
	rd_kafka_topic_partition_list_t *parts = rd_kafka_topic_partition_list_new(4);
	int			named_group = group != NULL;
	char		errstr[512];
	char		group_id[64];
	rd_kafka_t *rk;
	long		got = 0;
	double		deadline = now_s() + timeout_s;

	if (group == NULL)
	{
		snprintf(group_id, sizeof(group_id), "vkafka-%d-%ld", (int) getpid(), (long) time(NULL));
		group = group_id;
	}
	set(conf, "bootstrap.servers", brokers);
	set(conf, "group.id", group);
	set(conf, "auto.offset.reset", "earliest");
	set(conf, "enable.auto.commit", "false");
	set(conf, "topic.metadata.refresh.interval.ms", "500");
	set(conf, "allow.auto.create.topics", "true");
	set(conf, "session.timeout.ms", "6000");
	set(conf, "heartbeat.interval.ms", "500");
	set(conf, "log_level", "3");
	if (to_end)
		set(conf, "enable.partition.eof", "true");
	/* (-c name=value: isolation.level=read_uncommitted, for one) */
	for (int i = 0; i < nconfigs; i++)
	{
		char	   *name = strdup(configs[i]);
		char	   *eq = strchr(name, '=');

		if (eq == NULL)
			die("-c %s: name=value expected", configs[i]);
		*eq = '\0';
		set(conf, name, eq + 1);
		free(name);
	}
	rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof(errstr));
	if (rk == NULL)
		die("%s", errstr);
	rd_kafka_poll_set_consumer(rk);

	/*
	 * Existing topics read to the end (-e) without a group: their partitions
	 * are assigned, so that no group coordinator (nor its rebalance delay)
	 * stands between the test and the log.  Else subscribe, which waits for
	 * topics yet to be created.
	 */
	if (to_end)
	{
		list_partitions(rk, topics, parts);
		npartitions_total = parts->cnt;
	}
	if (to_end && !named_group)
	{
		if (rd_kafka_assign(rk, parts) != RD_KAFKA_RESP_ERR_NO_ERROR)
			die("%s", "could not assign the partitions");
	}
	else
	{
		for (char *t = strtok(topics, ","); t; t = strtok(NULL, ","))
			rd_kafka_topic_partition_list_add(subs, t, RD_KAFKA_PARTITION_UA);
		if (rd_kafka_subscribe(rk, subs) != RD_KAFKA_RESP_ERR_NO_ERROR)
			die("%s", "could not subscribe");
	}
	rd_kafka_topic_partition_list_destroy(subs);
	rd_kafka_topic_partition_list_destroy(parts);

	while (now_s() < deadline)
	{
		if (to_end ? all_at_end() && (count < 0 || got >= count) : count >= 0 && got >= count)
			break;
		rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 200);

		if (m == NULL)
			continue;
		if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR && first_time(m))
		{
			print_message(m);
			got++;
		}
		else if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF)
		{
			int64_t		lo,
						hi;

			/*
			 * A read_committed consumer stops at the last stable offset: a
			 * transaction whose commit Kafka has acknowledged may not be
			 * marked in the partition yet.  The end is the high watermark.
			 */
			if (rd_kafka_get_watermark_offsets(rk, rd_kafka_topic_name(m->rkt), m->partition,
											   &lo, &hi) != RD_KAFKA_RESP_ERR_NO_ERROR ||
				m->offset >= hi)
				at_end[partition_slot(m)] = 1;
		}
		else if (m->err != RD_KAFKA_RESP_ERR_NO_ERROR &&
				 m->err != RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
			fprintf(stderr, "vkafka: %s\n", rd_kafka_message_errstr(m));
		rd_kafka_message_destroy(m);
	}
	rd_kafka_consumer_close(rk);
	rd_kafka_destroy(rk);
	if (count >= 0 && got < count)
		return 2;
	return to_end && !all_at_end() ? 2 : 0;
}

static long delivered = 0;
static long failed = 0;

static void
on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
	(void) rk;
	(void) opaque;
	if (m->err)
		failed++;
	else
		delivered++;
}

static int
cmp_double(const void *a, const void *b)
{
	double		x = *(const double *) a,
				y = *(const double *) b;

	return x < y ? -1 : x > y;
}

static int
produce(void)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	char		errstr[512];
	char	   *value = malloc(size);
	double	   *lat = calloc(count > 0 ? count : 1, sizeof(double));
	rd_kafka_t *rk;
	double		start;

	set(conf, "bootstrap.servers", brokers);
	set(conf, "enable.idempotence", "true");
	set(conf, "acks", "all");
	set(conf, "partitioner", "murmur2_random");
	set(conf, "queue.buffering.max.messages", "1000000");
	if (linger != NULL)
		set(conf, "linger.ms", linger);
	rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
	rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	if (rk == NULL)
		die("%s", errstr);
	memset(value, 'x', size);

	/* Connect and learn the topic first, so that only producing is timed. */
	rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(topics), RD_KAFKA_V_VALUE(value, size),
					  RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
	rd_kafka_flush(rk, 30000);
	delivered = failed = 0;

	start = now_s();
	for (long i = 0; i < count; i++)
	{
		char		key[32];
		double		t0 = now_s();
		rd_kafka_resp_err_t err;

		snprintf(key, sizeof(key), "k%ld", i % nkeys);
		while ((err = rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(topics),
										RD_KAFKA_V_KEY(key, strlen(key)),
										RD_KAFKA_V_VALUE(value, size),
										RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
										RD_KAFKA_V_END)) == RD_KAFKA_RESP_ERR__QUEUE_FULL)
			rd_kafka_poll(rk, 10);
		if (err)
			die("%s", rd_kafka_err2str(err));
		if (rate > 0)
		{
			long		target = delivered + failed + 1;

			while (delivered + failed < target)
				rd_kafka_poll(rk, 1);
			lat[i] = (now_s() - t0) * 1000;
			while (now_s() < start + (double) (i + 1) / rate)
				usleep(200);
		}
		else
			rd_kafka_poll(rk, 0);
	}
	rd_kafka_flush(rk, 60000);
	if (rate > 0)
	{
		qsort(lat, count, sizeof(double), cmp_double);
		printf("{\"messages\": %ld, \"failed\": %ld, \"p50_ms\": %.2f, \"p95_ms\": %.2f, \"p99_ms\": %.2f}\n",
			   delivered, failed, lat[count / 2], lat[count * 95 / 100], lat[count * 99 / 100]);
	}
	else
		printf("{\"messages\": %ld, \"failed\": %ld, \"seconds\": %.3f, \"per_second\": %.0f}\n",
			   delivered, failed, now_s() - start, delivered / (now_s() - start));
	rd_kafka_destroy(rk);
	return failed ? 1 : 0;
}

static rd_kafka_t *
admin_client(void)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	char		errstr[512];
	rd_kafka_t *rk;

	set(conf, "bootstrap.servers", brokers);
	rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	if (rk == NULL)
		die("%s", errstr);
	return rk;
}

/* Wait for the admin result event of type "type" on queue q. */
static rd_kafka_event_t *
admin_wait(rd_kafka_queue_t *q, rd_kafka_event_type_t type)
{
	rd_kafka_event_t *ev = rd_kafka_queue_poll(q, timeout_s * 1000);

	if (ev == NULL)
		die("%s", "admin request timed out");
	if (rd_kafka_event_type(ev) != type)
		die("unexpected admin event %s", rd_kafka_event_name(ev));
	if (rd_kafka_event_error(ev))
		die("%s", rd_kafka_event_error_string(ev));
	return ev;
}

static void
split_config(char *kv, char **name, char **value)
{
	char	   *eq = strchr(kv, '=');

	if (eq == NULL)
		die("-c takes name=value, not %s", kv);
	*eq = '\0';
	*name = kv;
	*value = eq + 1;
}

static int
create_topic(void)
{
	rd_kafka_t *rk = admin_client();
	rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
	char		errstr[512];
	rd_kafka_NewTopic_t *nt = rd_kafka_NewTopic_new(topics, partitions, -1, errstr, sizeof(errstr));
	const rd_kafka_topic_result_t **res;
	size_t		n;
	rd_kafka_event_t *ev;

	if (nt == NULL)
		die("%s", errstr);
	for (int i = 0; i < nconfigs; i++)
	{
		char	   *name, *value;

		split_config(configs[i], &name, &value);
		rd_kafka_NewTopic_set_config(nt, name, value);
	}
	rd_kafka_CreateTopics(rk, &nt, 1, NULL, q);
	ev = admin_wait(q, RD_KAFKA_EVENT_CREATETOPICS_RESULT);
	res = rd_kafka_CreateTopics_result_topics(rd_kafka_event_CreateTopics_result(ev), &n);
	if (n != 1 || rd_kafka_topic_result_error(res[0]))
		die("%s", n == 1 ? rd_kafka_topic_result_error_string(res[0]) : "no result");
	rd_kafka_event_destroy(ev);
	rd_kafka_NewTopic_destroy(nt);
	rd_kafka_queue_destroy(q);
	rd_kafka_destroy(rk);
	return 0;
}

static int
alter_topic(void)
{
	rd_kafka_t *rk = admin_client();
	rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
	rd_kafka_ConfigResource_t *cr = rd_kafka_ConfigResource_new(RD_KAFKA_RESOURCE_TOPIC, topics);
	const rd_kafka_ConfigResource_t **res;
	size_t		n;
	rd_kafka_event_t *ev;

	for (int i = 0; i < nconfigs; i++)
	{
		char	   *name, *value;

		split_config(configs[i], &name, &value);
		if (rd_kafka_ConfigResource_set_config(cr, name, value) != RD_KAFKA_RESP_ERR_NO_ERROR)
			die("could not set %s", name);
	}
	rd_kafka_AlterConfigs(rk, &cr, 1, NULL, q);
	ev = admin_wait(q, RD_KAFKA_EVENT_ALTERCONFIGS_RESULT);
	res = rd_kafka_AlterConfigs_result_resources(rd_kafka_event_AlterConfigs_result(ev), &n);
	if (n != 1 || rd_kafka_ConfigResource_error(res[0]))
		die("%s", n == 1 ? rd_kafka_ConfigResource_error_string(res[0]) : "no result");
	rd_kafka_event_destroy(ev);
	rd_kafka_ConfigResource_destroy(cr);
	rd_kafka_queue_destroy(q);
	rd_kafka_destroy(rk);
	return 0;
}

static int
describe_topic(void)
{
	rd_kafka_t *rk = admin_client();
	rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topics, NULL);
	const struct rd_kafka_metadata *md;
	rd_kafka_resp_err_t err;
	rd_kafka_queue_t *q;
	rd_kafka_ConfigResource_t *cr;
	const rd_kafka_ConfigResource_t **res;
	const rd_kafka_ConfigEntry_t **entries;
	size_t		n, nentries;
	rd_kafka_event_t *ev;
	json_object *out = json_object_new_object();
	json_object *config = json_object_new_object();

	err = rd_kafka_metadata(rk, 0, rkt, &md, timeout_s * 1000);
	if (err)
		die("metadata: %s", rd_kafka_err2str(err));
	if (md->topic_cnt != 1 || md->topics[0].err)
	{
		fprintf(stderr, "vkafka: %s\n", md->topic_cnt == 1 ? rd_kafka_err2str(md->topics[0].err) : "no topic");
		return 2;
	}
	json_object_object_add(out, "partitions", json_object_new_int(md->topics[0].partition_cnt));
	json_object_object_add(out, "replication_factor",
						   json_object_new_int(md->topics[0].partition_cnt > 0 ?
											   md->topics[0].partitions[0].replica_cnt : 0));
	rd_kafka_metadata_destroy(md);
	rd_kafka_topic_destroy(rkt);

	q = rd_kafka_queue_new(rk);
	cr = rd_kafka_ConfigResource_new(RD_KAFKA_RESOURCE_TOPIC, topics);
	rd_kafka_DescribeConfigs(rk, &cr, 1, NULL, q);
	ev = admin_wait(q, RD_KAFKA_EVENT_DESCRIBECONFIGS_RESULT);
	res = rd_kafka_DescribeConfigs_result_resources(rd_kafka_event_DescribeConfigs_result(ev), &n);
	if (n != 1 || rd_kafka_ConfigResource_error(res[0]))
		die("%s", n == 1 ? rd_kafka_ConfigResource_error_string(res[0]) : "no result");
	entries = rd_kafka_ConfigResource_configs(res[0], &nentries);
	for (size_t i = 0; i < nentries; i++)
		if (!rd_kafka_ConfigEntry_is_default(entries[i]) && rd_kafka_ConfigEntry_value(entries[i]))
			json_object_object_add(config, rd_kafka_ConfigEntry_name(entries[i]),
								   json_object_new_string(rd_kafka_ConfigEntry_value(entries[i])));
	json_object_object_add(out, "config", config);
	printf("%s\n", json_object_to_json_string_ext(out, JSON_C_TO_STRING_PLAIN));
	json_object_put(out);
	rd_kafka_event_destroy(ev);
	rd_kafka_ConfigResource_destroy(cr);
	rd_kafka_queue_destroy(q);
	rd_kafka_destroy(rk);
	return 0;
}

/* The value of -c NAME=..., or def. */
static const char *
config_value(const char *name, const char *def)
{
	size_t		len = strlen(name);

	for (int i = 0; i < nconfigs; i++)
		if (strncmp(configs[i], name, len) == 0 && configs[i][len] == '=')
			return configs[i] + len + 1;
	return def;
}

static int
acl(const char *what)
{
	rd_kafka_t *rk = admin_client();
	rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
	const char *resource = config_value("resource", "topic");
	const char *pattern = config_value("pattern", "literal");
	const char *operation = config_value("operation", "all");
	const char *permission = config_value("permission", "allow");
	const char *principal = config_value("principal", "User:ANONYMOUS");
	const char *host = config_value("host", "*");
	static const struct
	{
		const char *name;
		rd_kafka_AclOperation_t op;
	}			ops[] = {
		{"all", RD_KAFKA_ACL_OPERATION_ALL}, {"read", RD_KAFKA_ACL_OPERATION_READ},
		{"write", RD_KAFKA_ACL_OPERATION_WRITE}, {"create", RD_KAFKA_ACL_OPERATION_CREATE},
		{"delete", RD_KAFKA_ACL_OPERATION_DELETE}, {"alter", RD_KAFKA_ACL_OPERATION_ALTER},
		{"describe", RD_KAFKA_ACL_OPERATION_DESCRIBE},
		{"cluster_action", RD_KAFKA_ACL_OPERATION_CLUSTER_ACTION},
		{"idempotent_write", RD_KAFKA_ACL_OPERATION_IDEMPOTENT_WRITE},
	};
	rd_kafka_AclOperation_t op = RD_KAFKA_ACL_OPERATION_UNKNOWN;
	rd_kafka_ResourceType_t rtype = strcmp(resource, "cluster") == 0 ?
		RD_KAFKA_RESOURCE_BROKER : RD_KAFKA_RESOURCE_TOPIC;
	rd_kafka_ResourcePatternType_t ptype = strcmp(pattern, "prefixed") == 0 ?
		RD_KAFKA_RESOURCE_PATTERN_PREFIXED : RD_KAFKA_RESOURCE_PATTERN_LITERAL;
	rd_kafka_AclPermissionType_t perm = strcmp(permission, "deny") == 0 ?
		RD_KAFKA_ACL_PERMISSION_TYPE_DENY : RD_KAFKA_ACL_PERMISSION_TYPE_ALLOW;
	char		errstr[512];
	rd_kafka_event_t *ev;

	for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++)
		if (strcmp(ops[i].name, operation) == 0)
			op = ops[i].op;
	if (op == RD_KAFKA_ACL_OPERATION_UNKNOWN)
		die("unknown operation %s", operation);
	if (strcmp(what, "add") == 0)
	{
		rd_kafka_AclBinding_t *b = rd_kafka_AclBinding_new(rtype, topics, ptype, principal, host,
															op, perm, errstr, sizeof(errstr));
		const rd_kafka_acl_result_t **res;
		size_t		n;

		if (b == NULL)
			die("%s", errstr);
		rd_kafka_CreateAcls(rk, &b, 1, NULL, q);
		ev = admin_wait(q, RD_KAFKA_EVENT_CREATEACLS_RESULT);
		res = rd_kafka_CreateAcls_result_acls(rd_kafka_event_CreateAcls_result(ev), &n);
		if (n != 1 || rd_kafka_acl_result_error(res[0]))
			die("%s", n == 1 ? rd_kafka_error_string(rd_kafka_acl_result_error(res[0])) : "no result");
		rd_kafka_AclBinding_destroy(b);
	}
	else if (strcmp(what, "delete") == 0)
	{
		rd_kafka_AclBindingFilter_t *f = rd_kafka_AclBindingFilter_new(rtype, topics, ptype, principal,
																		host, op, perm, errstr,
																		sizeof(errstr));
		const rd_kafka_DeleteAcls_result_response_t **res;
		size_t		n;

		if (f == NULL)
			die("%s", errstr);
		rd_kafka_DeleteAcls(rk, &f, 1, NULL, q);
		ev = admin_wait(q, RD_KAFKA_EVENT_DELETEACLS_RESULT);
		res = rd_kafka_DeleteAcls_result_responses(rd_kafka_event_DeleteAcls_result(ev), &n);
		if (n != 1 || rd_kafka_DeleteAcls_result_response_error(res[0]))
			die("%s", n == 1 ? rd_kafka_error_string(rd_kafka_DeleteAcls_result_response_error(res[0])) : "no result");
		rd_kafka_AclBinding_destroy(f);
	}
	else
		die("%s", "usage: vkafka acl add|delete ...");
	rd_kafka_event_destroy(ev);
	rd_kafka_queue_destroy(q);
	rd_kafka_destroy(rk);
	return 0;
}

/* Parse a whole string as an integer; 0 if it is not one. */
static int
parse_int(const char *s, long *v)
{
	char	   *end;

	if (s == NULL || *s == '\0')
		return 0;
	*v = strtol(s, &end, 10);
	return *end == '\0';
}

/* An error code by librdkafka name (with or without RD_KAFKA_RESP_ERR_) or number. */
static int
parse_err(const char *s, rd_kafka_resp_err_t *err)
{
	const struct rd_kafka_err_desc *descs;
	size_t		n;
	long		v;

	if (strncasecmp(s, "RD_KAFKA_RESP_ERR_", 18) == 0)
		s += 18;
	if (parse_int(s, &v))
	{
		*err = (rd_kafka_resp_err_t) v;
		return 1;
	}
	rd_kafka_get_err_descs(&descs, &n);
	for (size_t i = 0; i < n; i++)
	{
		if (descs[i].name && strcasecmp(descs[i].name, s) == 0)
		{
			*err = descs[i].code;
			return 1;
		}
	}
	return 0;
}

/*
 * Apply fn (set_down, set_up) to one broker, or with -1 to all: through
 * librdkafka's own -1 if it takes it, else broker by broker.
 */
static rd_kafka_resp_err_t
for_brokers(rd_kafka_mock_cluster_t *mc, int nbrokers, long broker,
			rd_kafka_resp_err_t (*fn) (rd_kafka_mock_cluster_t *, int32_t))
{
	rd_kafka_resp_err_t err = fn(mc, (int32_t) broker);

	if (err && broker == -1)
	{
		err = RD_KAFKA_RESP_ERR_NO_ERROR;
		for (int32_t id = 1; id <= nbrokers && !err; id++)
			err = fn(mc, id);
	}
	return err;
}

#define MOCK_MAX_ARGS 64

/*
 * Run one mock command (argv[0] is its name).  Returns NULL when done, or an
 * error message (in errbuf or static).
 */
static const char *
mock_command(rd_kafka_mock_cluster_t *mc, int nbrokers, int argc, char **argv,
			 char *errbuf, size_t errsize)
{
	const char *cmd = argv[0];
	rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;
	long		a, b, c;

	if (strcmp(cmd, "create-topic") == 0)
	{
		if (argc != 3 || !parse_int(argv[2], &a) || a < 1)
			return "usage: create-topic TOPIC PARTITIONS";
		err = rd_kafka_mock_topic_create(mc, argv[1], (int) a, 1);
	}
	else if (strcmp(cmd, "push-errors") == 0)
	{
		rd_kafka_resp_err_t errs[MOCK_MAX_ARGS];

		if (argc < 3 || !parse_int(argv[1], &a))
			return "usage: push-errors APIKEY ERR [ERR ...]";
		for (int i = 2; i < argc; i++)
		{
			if (!parse_err(argv[i], &errs[i - 2]))
			{
				snprintf(errbuf, errsize, "unknown error code %s", argv[i]);
				return errbuf;
			}
		}
		rd_kafka_mock_push_request_errors_array(mc, (int16_t) a, argc - 2, errs);
	}
	else if (strcmp(cmd, "broker-errors") == 0)
	{
		rd_kafka_resp_err_t errs[MOCK_MAX_ARGS];
		int			rtts[MOCK_MAX_ARGS];

		if (argc < 4 || !parse_int(argv[1], &a) || !parse_int(argv[2], &b))
			return "usage: broker-errors BROKER APIKEY ERR:RTT_MS [ERR:RTT_MS ...]";
		for (int i = 3; i < argc; i++)
		{
			char	   *colon = strchr(argv[i], ':');

			if (colon == NULL || !parse_int(colon + 1, &c) || c < 0)
			{
				snprintf(errbuf, errsize, "expected ERR:RTT_MS, not %s", argv[i]);
				return errbuf;
			}
			*colon = '\0';
			if (!parse_err(argv[i], &errs[i - 3]))
			{
				snprintf(errbuf, errsize, "unknown error code %s", argv[i]);
				return errbuf;
			}
			rtts[i - 3] = (int) c;
		}

		/*
		 * Only a variadic form exists: push one tuple at a time (each is
		 * appended to the broker's stack, so the order is kept).
		 */
		for (int i = 0; i < argc - 3 && !err; i++)
			err = rd_kafka_mock_broker_push_request_error_rtts(mc, (int32_t) a, (int16_t) b, 1,
															   errs[i], rtts[i]);
	}
	else if (strcmp(cmd, "clear-errors") == 0)
	{
		if (argc != 2 || !parse_int(argv[1], &a))
			return "usage: clear-errors APIKEY";
		rd_kafka_mock_clear_request_errors(mc, (int16_t) a);
	}
	else if (strcmp(cmd, "wait-errors") == 0)
	{
		size_t		left = 0;
		double		deadline = now_s() + 10;

		if (argc != 4 || !parse_int(argv[1], &a) || !parse_int(argv[2], &b) || !parse_int(argv[3], &c))
			return "usage: wait-errors BROKER APIKEY N";
		/* (The broker took a request off its stack when it received it.) */
		while ((err = rd_kafka_mock_broker_error_stack_cnt(mc, (int32_t) a, (int16_t) b, &left)) ==
			   RD_KAFKA_RESP_ERR_NO_ERROR && (long) left > c && now_s() < deadline)
			usleep(5 * 1000);
		if (!err && (long) left > c)
		{
			snprintf(errbuf, errsize, "broker %ld still has %zu errors for API %ld", a, left, b);
			return errbuf;
		}
	}
	else if (strcmp(cmd, "down") == 0 || strcmp(cmd, "up") == 0)
	{
		if (argc != 2 || !parse_int(argv[1], &a))
			return "usage: down|up BROKER";
		err = for_brokers(mc, nbrokers, a, strcmp(cmd, "down") == 0 ?
						  rd_kafka_mock_broker_set_down : rd_kafka_mock_broker_set_up);
	}
	else if (strcmp(cmd, "rtt") == 0)
	{
		if (argc != 3 || !parse_int(argv[1], &a) || !parse_int(argv[2], &b) || b < 0)
			return "usage: rtt BROKER MS";
		err = rd_kafka_mock_broker_set_rtt(mc, (int32_t) a, (int) b);
		for (int32_t id = 1; err && a == -1 && id <= nbrokers; id++)
			err = rd_kafka_mock_broker_set_rtt(mc, id, (int) b);
	}
	else if (strcmp(cmd, "leader") == 0)
	{
		if (argc != 4 || !parse_int(argv[2], &a) || !parse_int(argv[3], &b))
			return "usage: leader TOPIC PARTITION BROKER";
		err = rd_kafka_mock_partition_set_leader(mc, argv[1], (int32_t) a, (int32_t) b);
	}
	else
	{
		snprintf(errbuf, errsize, "unknown command %s", cmd);
		return errbuf;
	}
	if (err)
	{
		snprintf(errbuf, errsize, "%s: %s", rd_kafka_err2name(err), rd_kafka_err2str(err));
		return errbuf;
	}
	return NULL;
}

static int
mock(void)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	char		errstr[512];
	char		line[4096];
	int			nbrokers = count > 0 ? (int) count : 1;
	rd_kafka_t *rk;
	rd_kafka_mock_cluster_t *mc;

	/* The handle only owns the cluster: it never connects anywhere. */
	set(conf, "log_level", "4");
	for (int i = 0; i < nconfigs; i++)
	{
		char	   *name, *value;

		split_config(configs[i], &name, &value);
		set(conf, name, value);
	}
	rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	if (rk == NULL)
		die("%s", errstr);
	mc = rd_kafka_mock_cluster_new(rk, nbrokers);
	if (mc == NULL)
		die("%s", "could not create the mock cluster");
	printf("%s\n", rd_kafka_mock_cluster_bootstraps(mc));
	fflush(stdout);

	while (fgets(line, sizeof(line), stdin) != NULL)
	{
		char	   *argv[MOCK_MAX_ARGS + 4];
		int			argc = 0;
		const char *error;

		for (char *w = strtok(line, " \t\r\n"); w; w = strtok(NULL, " \t\r\n"))
		{
			if (argc == MOCK_MAX_ARGS + 3)
				break;
			argv[argc++] = w;
		}
		if (argc == 0)
			error = "empty command";
		else if (argc > MOCK_MAX_ARGS + 2)
			error = "too many arguments";
		else if (strcmp(argv[0], "quit") == 0)
		{
			printf("ok\n");
			fflush(stdout);
			break;
		}
		else
			error = mock_command(mc, nbrokers, argc, argv, errstr, sizeof(errstr));
		if (error)
			printf("error: %s\n", error);
		else
			printf("ok\n");
		fflush(stdout);
	}
	rd_kafka_mock_cluster_destroy(mc);
	rd_kafka_destroy(rk);
	return 0;
}

int
main(int argc, char **argv)
{
	const char *cmd;
	int			opt;

	if (argc < 2)
		die("%s", "usage: vkafka consume|produce|create-topic|alter-topic -b BROKERS -t TOPIC ... | mock [-n BROKERS]");
	cmd = argv[1];
	optind = 2;
	while ((opt = getopt(argc, argv, "b:t:n:eT:p:c:g:s:k:r:l:")) != -1)
	{
		switch (opt)
		{
			case 'b':
				brokers = optarg;
				break;
			case 't':
				topics = optarg;
				break;
			case 'n':
				count = atol(optarg);
				break;
			case 'e':
				to_end = 1;
				break;
			case 'T':
				timeout_s = atoi(optarg);
				break;
			case 'p':
				partitions = atoi(optarg);
				break;
			case 'g':
				group = optarg;
				break;
			case 's':
				size = atoi(optarg);
				break;
			case 'k':
				nkeys = atoi(optarg);
				break;
			case 'r':
				rate = atoi(optarg);
				break;
			case 'l':
				linger = optarg;
				break;
			case 'c':
				if (nconfigs == MAX_CONFIGS)
					die("%s", "too many -c");
				configs[nconfigs++] = optarg;
				break;
			default:
				exit(1);
		}
	}
	if (strcmp(cmd, "mock") == 0)
		return mock();
	if (strcmp(cmd, "acl") == 0)
	{
		if (optind >= argc)
			die("%s", "usage: vkafka acl add|delete -b BROKERS -t RESOURCE -c name=value ...");
		if (brokers == NULL || topics == NULL)
			die("%s", "-b and -t are required");
		return acl(argv[optind]);
	}
	if (brokers == NULL || topics == NULL)
		die("%s", "-b and -t are required");
	if (strcmp(cmd, "consume") == 0)
		return consume();
	if (strcmp(cmd, "produce") == 0)
		return produce();
	if (strcmp(cmd, "create-topic") == 0)
		return create_topic();
	if (strcmp(cmd, "alter-topic") == 0)
		return alter_topic();
	if (strcmp(cmd, "describe-topic") == 0)
		return describe_topic();
	die("unknown command %s", cmd);
	return 1;
}
