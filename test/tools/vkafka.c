/*
 * vkafka: the small librdkafka client that voutbox's tests and demo use.
 *
 *   vkafka consume -b BROKERS -t TOPIC[,TOPIC...] [-n COUNT] [-e] [-T SECONDS] [-g GROUP]
 *       Read the topics from the beginning with a new consumer group until
 *       COUNT messages arrived or SECONDS passed (default 60); with -e, go on
 *       until the end of every partition of the (existing) topics.  Prints one
 *       JSON object per message: topic, partition, offset, key, headers, value.
 *       Exits 0 when COUNT messages arrived (or, without -n, at the deadline
 *       or the end), 2 when fewer arrived in time or the end was not reached.
 *   vkafka produce -b BROKERS -t TOPIC -n COUNT -s BYTES [-k KEYS] [-r RATE]
 *       Benchmark baseline: a plain librdkafka producer with voutbox's settings
 *       (idempotent, acks=all, murmur2_random) sends COUNT messages of BYTES
 *       bytes over KEYS keys.  Without -r, as fast as possible, and prints
 *       the rate; with -r, one message at a time at RATE per second, and
 *       prints the produce-to-acknowledgement latency percentiles.
 *   vkafka create-topic -b BROKERS -t TOPIC [-p PARTITIONS] [-c name=value ...]
 *   vkafka alter-topic -b BROKERS -t TOPIC -c name=value [-c name=value ...]
 *       Topic administration through librdkafka's admin API.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>
#include <librdkafka/rdkafka.h>

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

static void
count_partitions(rd_kafka_t *rk, const char *topic_list)
{
	char	   *copy = strdup(topic_list);

	for (char *t = strtok(copy, ","); t; t = strtok(NULL, ","))
	{
		rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, t, NULL);
		const struct rd_kafka_metadata *md;

		if (rd_kafka_metadata(rk, 0, rkt, &md, 10000) != RD_KAFKA_RESP_ERR_NO_ERROR)
			die("could not read the metadata of %s", t);
		if (md->topic_cnt == 1 && md->topics[0].err == RD_KAFKA_RESP_ERR_NO_ERROR)
			npartitions_total += md->topics[0].partition_cnt;
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
	rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof(errstr));
	if (rk == NULL)
		die("%s", errstr);
	rd_kafka_poll_set_consumer(rk);
	if (to_end)
		count_partitions(rk, topics);
	for (char *t = strtok(topics, ","); t; t = strtok(NULL, ","))
		rd_kafka_topic_partition_list_add(subs, t, RD_KAFKA_PARTITION_UA);
	if (rd_kafka_subscribe(rk, subs) != RD_KAFKA_RESP_ERR_NO_ERROR)
		die("%s", "could not subscribe");
	rd_kafka_topic_partition_list_destroy(subs);

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
	rd_kafka_NewTopic_t *nt = rd_kafka_NewTopic_new(topics, partitions, 1, errstr, sizeof(errstr));
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

int
main(int argc, char **argv)
{
	const char *cmd;
	int			opt;

	if (argc < 2)
		die("%s", "usage: vkafka consume|produce|create-topic|alter-topic -b BROKERS -t TOPIC ...");
	cmd = argv[1];
	optind = 2;
	while ((opt = getopt(argc, argv, "b:t:n:eT:p:c:g:s:k:r:")) != -1)
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
			case 'c':
				if (nconfigs == MAX_CONFIGS)
					die("%s", "too many -c");
				configs[nconfigs++] = optarg;
				break;
			default:
				exit(1);
		}
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
	die("unknown command %s", cmd);
	return 1;
}
