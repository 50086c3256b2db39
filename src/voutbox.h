/*-------------------------------------------------------------------------
 *
 * voutbox.h
 *		Declarations shared by the files of the voutbox extension.
 *
 * voutbox stores events with outbox_save() inside the caller's transaction
 * (save.c) and a background worker (worker.c) delivers the committed ones to
 * Apache Kafka (producer.c, envelope.c), reading them in batches defined by
 * transaction visibility (storage.c) and settling them (settle.c,
 * retention.c).  voutbox.c holds the GUCs, the shared memory and the worker
 * registration; routing.c the topic and key templates; validate.c the rules
 * an event follows; privileges.c who acts for which tenant; admin.c the DLQ
 * administration functions; session.c the worker's pinned settings; spi.c
 * its transactions.
 *
 * Everything not declared here is static to its file.
 *
 *-------------------------------------------------------------------------
 */
#ifndef VOUTBOX_H
#define VOUTBOX_H

#include <limits.h>
#include <signal.h>

#include "access/xlogdefs.h"
#include "datatype/timestamp.h"
#include "nodes/pg_list.h"
#include "port/atomics.h"
#include "utils/palloc.h"
#include "storage/lwlock.h"
#include "storage/spin.h"

/* Names of the storage; the install script is the other place they appear. */
#define VOUTBOX_EXTENSION		"voutbox"
#define VOUTBOX_SCHEMA			"voutbox"
/*
 * SQL: the commit position of the transaction whose txid is the expression
 * "txid" (voutbox.commit_order, save.c), 0 if it has none.
 */
#define VOUTBOX_COMMIT_POS(txid) \
	"coalesce((SELECT c.commit_seq FROM " VOUTBOX_SCHEMA ".commit_order c " \
	"          WHERE c.txid = " txid " LIMIT 1), 0)"
#define VOUTBOX_RING_SLOTS		3
/* The role that acts for every tenant (README, "Security"). */
#define VOUTBOX_ADMIN_ROLE		"voutbox_admin"
/*
 * Longest text arguments, in bytes.  Names (tenant, types) and keys (the
 * aggregate id, which makes the message key by default, the idempotency key)
 * are indexed, and an index row must stay well below PostgreSQL's limit of
 * about 2.7 kB; the correlation id and producer become Kafka headers.
 */
#define VOUTBOX_MAX_NAME_BYTES	255
#define VOUTBOX_MAX_KEY_BYTES	1024
/* Kafka's limit on topic names (Topic.MAX_NAME_LENGTH). */
#define VOUTBOX_TOPIC_MAX_LEN	249

/* The columns of voutbox.events, which voutbox.deferred repeats. */
#define VOUTBOX_EVENT_COLUMNS \
	"id, seq, txid, tenant_id, aggregate_type, aggregate_id, event_type, " \
	"event_version, payload, metadata, idempotency_key, trace_id, traceparent, " \
	"correlation_id, created_at, scheduled_for, pii, pii_fields, consent, " \
	"producer, topic, msg_key, route, format, headers"

/* GUCs (voutbox.c) */
extern char *voutbox_database;
extern char *voutbox_standby_names;
extern char *voutbox_brokers;
extern char *voutbox_topic_template;
extern char *voutbox_key_template;
extern int	voutbox_batch_size;
extern int	voutbox_batch_bytes;
extern int	voutbox_poll_interval;		/* ms */
extern int	voutbox_max_retries;
extern int	voutbox_backoff_base;		/* ms */
extern int	voutbox_backoff_max;		/* ms */
extern int	voutbox_retention;			/* s */
extern int	voutbox_dlq_retention;		/* s */
extern int	voutbox_cleanup_interval;	/* ms */
extern char *voutbox_producer;
extern int	voutbox_max_payload_bytes;
extern char *voutbox_traceparent;
extern char *voutbox_kafka_properties;
extern char *voutbox_kafka_secrets_file;
extern int	voutbox_delivery_timeout;	/* ms */
extern int	voutbox_stats_max_topics;
extern bool voutbox_create_topics;
extern int	voutbox_format;
extern int	voutbox_delivery;	/* VoutboxDelivery */
extern char *voutbox_checkpoint_topic_prefix;
extern bool voutbox_fault_injection;

typedef enum VoutboxDelivery
{
	VOUTBOX_AT_LEAST_ONCE,
	VOUTBOX_EXACTLY_ONCE
} VoutboxDelivery;
extern int	voutbox_topic_partitions;
extern int	voutbox_topic_replication_factor;
extern char *voutbox_topic_config;

/* How long the worker waits for a lock before it tries again later. */
#define VOUTBOX_LOCK_TIMEOUT	"2s"

/* The version of the SQL objects this library works with. */
#define VOUTBOX_SQL_VERSION		"0.7.0"

/*
 * Shared memory: one slot per database the launcher serves (at most
 * max_worker_processes of them), and what the slots share.
 *
 * The launcher claims a slot for each database listed in voutbox.database
 * (its name; the database's OID once it exists) and frees it when the
 * database is no longer listed and its worker has stopped.  The worker
 * publishes itself in its slot (pid, pgprocno) at start and clears itself
 * at exit, and keeps its state and counters there.  "mutex" protects every
 * slot's fields except "requeued", an atomic flag, and except that
 * committing backends read database and pgprocno without it, to set the
 * worker's latch: a stale read only costs a spurious or a missed wake-up of
 * a worker that reads everything when it starts.
 */
#define VOUTBOX_STATE_LEN		32
#define VOUTBOX_DETAIL_LEN		128
#define VOUTBOX_ERROR_LEN		256

typedef struct VoutboxWorkerSlot
{
	char		dbname[NAMEDATALEN];	/* "" when the slot is free */
	Oid			database;		/* InvalidOid while it does not exist */
	int			pgprocno;		/* -1 when no worker runs */
	pid_t		pid;
	pg_atomic_uint32 requeued;	/* events were made due by SQL (outbox_dlq_requeue) */
	/* what the worker does, and its counters since the slot was claimed */
	char		state[VOUTBOX_STATE_LEN];
	bool		fenced;			/* exactly_once: another producer took over (eos.c) */
	TimestampTz state_since;
	char		detail[VOUTBOX_DETAIL_LEN];
	TimestampTz started_at;
	uint64		rounds;
	uint64		delivered;
	uint64		failed_attempts;
	uint64		dead;
	uint64		producers_built;
	char		last_error[VOUTBOX_ERROR_LEN];
	TimestampTz last_error_at;
} VoutboxWorkerSlot;

typedef struct VoutboxShared
{
	slock_t		mutex;
	/* counters per database, tenant and topic (stats.c) */
	LWLock	   *topics_lock;
	int			nslots;
	VoutboxWorkerSlot slots[FLEXIBLE_ARRAY_MEMBER];
} VoutboxShared;

extern VoutboxShared *voutbox_shared;
/* The delivery worker's own slot, and the name of its database. */
extern VoutboxWorkerSlot *voutbox_my_slot;
extern char voutbox_worker_dbname[NAMEDATALEN];

extern void voutbox_wake_worker(void);
extern void voutbox_note_requeued(void);
extern List *voutbox_database_list(const char *value, char **detail);
extern int	voutbox_format_lookup(const char *name);
extern char *voutbox_format_names(void);

/* Background workers (worker.c) */
extern PGDLLEXPORT void voutbox_launcher_main(Datum arg) pg_attribute_noreturn();
extern PGDLLEXPORT void voutbox_worker_main(Datum arg) pg_attribute_noreturn();

/*
 * One event as the worker reads it from storage.  Strings are NUL-terminated;
 * absent optional values are NULL.  JSON values are kept as the text that
 * PostgreSQL prints for the stored jsonb.  What goes to Kafka is in UTF-8;
 * tenant_id, topic and msg_key stay in the server's encoding for the worker's
 * own use (they name keys and counters), with UTF-8 copies for Kafka (the
 * same strings in a UTF-8 database).
 */
typedef struct VoutboxEvent
{
	char	   *id;
	int64		seq;
	int64		commit_pos;		/* its transaction's commit position; 0 if none */
	char	   *tenant_id;
	char	   *tenant_id_utf8;
	char	   *aggregate_type;
	char	   *aggregate_id;
	char	   *event_type;
	int32		event_version;
	char	   *payload;
	char	   *metadata;
	char	   *idempotency_key;	/* effective key: the event id if none */
	char	   *trace_id;
	char	   *traceparent;
	char	   *correlation_id;
	TimestampTz created_at;
	bool		has_scheduled_for;
	TimestampTz scheduled_for;
	bool		pii;
	int			n_pii_fields;
	char	  **pii_fields;
	char	   *consent;
	char	   *producer;
	char	   *topic;
	char	   *msg_key;
	char	   *msg_key_utf8;
	bool		unconvertible;	/* text without an equivalent in UTF-8 */
	/* only for events read back from voutbox.deferred */
	bool		holds_key;
	int32		attempts;
	bool		unconfirmed;	/* its last attempt was acknowledged without an offset */
	/* for VOUTBOX_WAIT_TOPIC: when its topic is tried again */
	TimestampTz wait_until;
	/* what its route chose: NULL or -1 for the settings (voutbox.format) */
	char	   *route;
	int			format;
	char	   *headers;		/* JSON object of the static headers, UTF-8 */
	const struct VoutboxTopicSettings *topic_settings;	/* its route's */
} VoutboxEvent;

/* Routing (routing.c) */
typedef struct VoutboxRouteFields
{
	const char *tenant_id;
	const char *aggregate_type;
	const char *aggregate_id;
	const char *event_type;
	int32		event_version;
} VoutboxRouteFields;

extern bool voutbox_template_is_valid(const char *tmpl, const char **detail);
extern char *voutbox_render_template(const char *tmpl, const VoutboxRouteFields *fields);
extern bool voutbox_topic_is_valid(const char *topic, const char **detail);
extern char voutbox_tenant_separator(const char *tmpl);
extern bool voutbox_topic_template_separates_tenants(const char *tmpl, const char **detail);
extern char voutbox_installation_separator(void);
extern char *voutbox_topic_template_desc(const char *route, const char *tmpl);
extern const char *voutbox_installation_prefix(int *len);

/*
 * Routes (routes.c): rows of voutbox.routes, in the order they are tried
 * (priority, then name).  NULL fields defer to the
 * settings: voutbox.topic_template, voutbox.key_template, voutbox.format.
 */
typedef struct VoutboxTopicSettings
{
	bool		has_partitions;
	int			partitions;
	bool		has_replication_factor;
	int			replication_factor;
	char	   *config;			/* NULL: voutbox.topic_config */
} VoutboxTopicSettings;

typedef struct VoutboxRoute
{
	char	   *name;
	char	   *tenant_pattern;
	char	   *event_type_pattern;
	char	   *topic_template;
	char	   *key_template;
	char	   *format_name;
	Datum		headers_jsonb;	/* a jsonb object; 0 when there are none */
	VoutboxTopicSettings *topic_settings;	/* NULL when it sets none */
} VoutboxRoute;

extern const VoutboxRoute *voutbox_route_match(const char *tenant_id, const char *event_type);
extern const VoutboxRoute *voutbox_route_find(const char *name);
extern void voutbox_check_route_template(const char *route, const char *tmpl);
extern void voutbox_check_topic_namespace(const char *tenant_id, const char *topic);

/* Tenants and roles (privileges.c) */
struct FunctionCallInfoBaseData;
extern bool voutbox_acts_for(Oid role, const char *tenant_id);
extern bool voutbox_acts_for_all(Oid role);
extern bool voutbox_tenant_isolation(void);
extern void voutbox_check_acts_for(const char *tenant_id, const char *what);
extern void voutbox_become_owner(struct FunctionCallInfoBaseData *fcinfo, Oid *save_user,
								 int *save_sec);
extern void voutbox_restore_user(Oid save_user, int save_sec);

/* The worker's session (session.c) */
extern void voutbox_session_remember(void);
extern void voutbox_session_pin(void);

/*
 * Envelope formats (envelope.c): what a message's value and headers are.
 * VOUTBOX: voutbox's own envelope; CLOUDEVENTS: CloudEvents 1.0, Kafka
 * protocol binding, structured mode (the event as JSON) or binary mode (the
 * data as the value, attributes as ce_ headers); DEBEZIUM: what Debezium's
 * outbox EventRouter emits (the payload as the value, header "id").
 */
typedef enum VoutboxFormat
{
	VOUTBOX_FORMAT_VOUTBOX,
	VOUTBOX_FORMAT_CLOUDEVENTS,
	VOUTBOX_FORMAT_CLOUDEVENTS_BINARY,
	VOUTBOX_FORMAT_DEBEZIUM
} VoutboxFormat;

/* Envelope (envelope.c) */
struct json_object;
extern struct json_object *voutbox_envelope_new(const VoutboxEvent *ev);
extern struct json_object *voutbox_value_new(const VoutboxEvent *ev, VoutboxFormat format);
extern char *voutbox_ce_source(const VoutboxEvent *ev);
extern void voutbox_format_timestamp(TimestampTz ts, char *buf, size_t len);

/* The rules an event must follow (validate.c) */
extern void voutbox_check_length(const char *s, const char *name, int max_bytes);
extern void voutbox_check_convertible(const char *s, const char *name);
extern void voutbox_check_text(const char *s, const char *name, int max_bytes,
							   const char *hint_if_empty);
extern int32 voutbox_parse_event_type(const char *event_type);
extern bool voutbox_is_trace_id(const char *s);
extern bool voutbox_traceparent_is_valid(const char *value);
/* Lengths of an event's data as JSON text, bounded together. */
typedef struct VoutboxEventSize
{
	size_t		payload;
	size_t		metadata;
	size_t		consent;
	size_t		pii_fields;
} VoutboxEventSize;

extern size_t voutbox_check_payload(Datum jsonb);
extern size_t voutbox_check_json(Datum jsonb, const char *name);
extern size_t voutbox_check_pii_fields(Datum array);
extern void voutbox_check_event_size(const VoutboxEventSize *size);
extern void voutbox_check_tenant_in_topic(const char *tenant_id, const char *tmpl,
										  const char *route);
struct HeapTupleData;
struct TupleDescData;
extern bool voutbox_column_changed(struct HeapTupleData *old, struct HeapTupleData *new,
								   struct TupleDescData *desc, const char *name);
extern void voutbox_check_event_row(struct HeapTupleData *tup, struct HeapTupleData *old,
									struct TupleDescData *desc);

/*
 * The Kafka producer (producer.c).  A delivery outcome is 0 for an event the
 * broker acknowledged, else a librdkafka error code; these two values mark
 * events still waiting for their report and events not to be sent at all.
 */
#define VOUTBOX_DELIVERY_PENDING	INT_MIN
#define VOUTBOX_DELIVERY_SKIPPED	(INT_MIN + 1)
/* Not sent: its topic could not be created (topics.c); it waits, uncharged. */
#define VOUTBOX_DELIVERY_NO_TOPIC	(INT_MIN + 2)
/* Acknowledged without an offset: no proof that it was written (producer.c). */
#define VOUTBOX_DELIVERY_UNCONFIRMED	(INT_MIN + 3)
#define VOUTBOX_UNCONFIRMED_CODE	"VOUTBOX_UNCONFIRMED"

typedef struct VoutboxProducer VoutboxProducer;

/*
 * Where delivery reports go; called inside librdkafka: record only.  The
 * partition and offset are Kafka's receipt for an acknowledged event (-1
 * when unknown).
 */
typedef void (*VoutboxReportFn) (void *arg, uint64 ticket, int err, int32 partition, int64 offset);

extern bool voutbox_kafka_properties_are_valid(const char *props, char **detail, char **hint);
extern void voutbox_producer_init(void);
extern void voutbox_reload_config(void);
extern VoutboxProducer *voutbox_producer_create(bool transactional, char **error);

/* How a Kafka transaction ended (exactly_once). */
typedef enum VoutboxTxnResult
{
	VOUTBOX_TXN_COMMITTED,
	VOUTBOX_TXN_ABORTED,		/* nothing of it is visible to read_committed consumers */
	VOUTBOX_TXN_IN_DOUBT,		/* not known: recovery reads the checkpoint */
	VOUTBOX_TXN_FENCED			/* another producer of the transactional.id took over: not known either */
} VoutboxTxnResult;

extern bool voutbox_producer_in_transaction(VoutboxProducer *p);
extern bool voutbox_producer_fenced(VoutboxProducer *p);
extern bool voutbox_producer_abort(VoutboxProducer *p);
extern bool voutbox_producer_txn_expiring(VoutboxProducer *p);
extern int	voutbox_producer_txn_wait_ms(VoutboxProducer *p);
extern bool voutbox_producer_txn_late(VoutboxProducer *p);
extern bool voutbox_producer_checkpoint_ready(VoutboxProducer *p);
extern VoutboxTxnResult voutbox_producer_commit(VoutboxProducer *p, const char *key, const char *value);
extern bool voutbox_checkpoint_gids(const char *key, List **gids, char **error);

/* Exactly-once delivery (eos.c) */
extern const char *voutbox_transactional_id(void);
extern char *voutbox_checkpoint_topic(void);
extern bool voutbox_is_checkpoint_topic(const char *topic);
extern char *voutbox_eos_new_gid(void);
extern char *voutbox_checkpoint_value(const char *gid, int nevents);
extern char *voutbox_checkpoint_gid(const char *value);
extern bool voutbox_eos_recover(char **error);
extern void voutbox_fault_point(const char *point);
extern bool voutbox_fault_hit(const char *point);
extern void voutbox_producer_destroy(VoutboxProducer *p);
extern bool voutbox_producer_is_broken(VoutboxProducer *p);
extern bool voutbox_producer_give_up(VoutboxProducer *p);
extern void voutbox_producer_set_stragglers(VoutboxProducer *p, int n);
extern bool voutbox_producer_outage(VoutboxProducer *p);
extern bool voutbox_producer_failed(VoutboxProducer *p);
extern bool voutbox_producer_delivered_any(VoutboxProducer *p);
extern bool voutbox_producer_config_changed(VoutboxProducer *p);
extern int	voutbox_producer_socket(VoutboxProducer *p);
extern void voutbox_producer_serve(VoutboxProducer *p);
extern void voutbox_producer_set_reporter(VoutboxProducer *p, VoutboxReportFn report, void *arg);
extern int	voutbox_producer_send(VoutboxProducer *p, VoutboxEvent *ev, uint64 ticket);
extern bool voutbox_producer_watch(VoutboxProducer *p);
extern int	voutbox_producer_pending(VoutboxProducer *p);
extern bool voutbox_producer_timed_out(VoutboxProducer *p);
extern const char *voutbox_delivery_error_text(int err);
extern const char *voutbox_delivery_error_name(int err);

/*
 * What a failed delivery means for the event (see the table in producer.c):
 * the producer's own trouble (send it again, in order, no retry used up), a
 * retriable error (retry with backoff), or a permanent one (the event can
 * never be delivered as it is: dead-letter queue).
 */
typedef enum VoutboxErrorClass
{
	VOUTBOX_ERROR_PRODUCER,
	VOUTBOX_ERROR_RETRIABLE,
	VOUTBOX_ERROR_PERMANENT
} VoutboxErrorClass;

extern VoutboxErrorClass voutbox_delivery_error_class(int err);
extern bool voutbox_topic_refusal(int err);

/*
 * Batches (storage.c).  A round is what the worker sends at once: the
 * deferred events whose time has come, then the next chunk of the current
 * window of committed events.  Events of the chunk whose key is held, or
 * that are scheduled for later, are not sent but moved to voutbox.deferred.
 */
typedef enum VoutboxAction
{
	VOUTBOX_SEND,
	VOUTBOX_HOLD,				/* an earlier event of its key waits */
	VOUTBOX_SCHEDULE,			/* scheduled_for is in the future */
	VOUTBOX_WAIT_TOPIC			/* its topic's events time out just now */
} VoutboxAction;

typedef struct VoutboxCursor
{
	MemoryContext cxt;			/* holds lo and hi */
	char	   *lo;				/* pg_snapshot: read all that it sees */
	char	   *hi;				/* pg_snapshot of the open window, or NULL */
	int64		read_seq;		/* window read up to (read_pos, read_seq) */
	int64		read_pos;		/* (commit position, seq: see WINDOW_QUERY) */
	bool		fresh;			/* nothing of the window read yet */
	bool		large_windows;	/* the last window needed the cursor */
	bool		portal_open;	/* the window's holdable cursor exists */
	int64		consumed;		/* rows of the cursor taken so far */
	bool		stale;			/* a read failed: load it again from the table */
	bool		params_valid;	/* params are those of (lo, hi] */
	Datum		params[4];		/* xmax(lo), xmax(hi), xip(lo), hi (storage.c) */
} VoutboxCursor;

/*
 * A round: the events read at once (the deferred ones that are due, then a
 * chunk of the window), sent, and settled together or with the rounds in
 * flight with it.
 */
/* Where Kafka put an acknowledged event: its delivery receipt. */
typedef struct VoutboxReceipt
{
	int32		partition;
	int64		offset;
} VoutboxReceipt;

typedef struct VoutboxRound
{
	MemoryContext cxt;			/* holds the round and its events */
	struct VoutboxRound *next;	/* the next round in flight */
	Oid			extension;		/* the installation it was read from */
	char	   *lo;				/* the window it read from, if any */
	char	   *hi;
	int			ndeferred;		/* events[0..ndeferred-1] are deferred ones */
	int			nevents;
	int			capacity;
	VoutboxEvent *events;
	VoutboxAction *actions;
	int		   *errs;			/* delivery outcome per event */
	VoutboxReceipt *receipts;	/* where an acknowledged event landed */
	int64		bytes;			/* what the events took as read */
	bool		window_done;	/* the chunk ends the window */
	bool		alone;			/* one deferred event that goes alone */
	bool		late;			/* events left in flight by rounds settled before (settle.c) */
	TimestampTz next_due;		/* when the next deferred event is due, or 0 */
	/* the WAL written when it was read: the standbys must have it (standbys.c) */
	XLogRecPtr	wal_end;
	/* in flight (stream.c) */
	TimestampTz read_at;
	uint64		first_ticket;	/* events[i] is sent with ticket first_ticket + i */
	int			pending;		/* events sent whose report has not come */
	bool		failed;			/* an event failed */
	TimestampTz overtaken_at;	/* later events were acknowledged, its own not all */
	/* stragglers of rounds settled before (stream.c) */
	uint64	   *tickets;		/* events[i] was sent with tickets[i] */
	bool		charge_due;		/* another delivery_timeout passed: charge it */
} VoutboxRound;

/* What to read (voutbox_storage_read_round). */
typedef struct VoutboxReadOptions
{
	int			limit;			/* most events */
	int64		budget;			/* most bytes */
	bool		deferred;		/* read the deferred events that are due */
	bool		alone;			/* or one that goes alone (nothing is in flight) */
	bool		check_due;		/* else, say whether some are */
	bool	   *due_waiting;
	bool	   *alone_waiting;	/* (set with due_waiting) */
	/* keys held by events of rounds in flight, not yet in voutbox.deferred */
	struct HTAB *held_in_flight;
} VoutboxReadOptions;

typedef enum VoutboxStorageStatus
{
	VOUTBOX_STORAGE_READY,
	VOUTBOX_STORAGE_MISSING,		/* CREATE EXTENSION has not run */
	VOUTBOX_STORAGE_OTHER_VERSION,	/* ALTER EXTENSION UPDATE has not run */
	VOUTBOX_STORAGE_BAD_ENCODING	/* SQL_ASCII: no conversion to UTF-8 */
} VoutboxStorageStatus;

extern Oid	voutbox_lock_extension(void);
extern void voutbox_storage_recheck_round(VoutboxRound *r, struct HTAB *held_in_flight);
extern VoutboxStorageStatus voutbox_storage_read_round(VoutboxCursor *cursor, VoutboxRound *round,
													   const VoutboxReadOptions *opt,
													   char **version);
typedef struct VoutboxSettlement VoutboxSettlement;
extern TimestampTz voutbox_storage_settle(VoutboxRound **rounds, int n, bool *committed,
										  bool *due_now, const char *gid,
										  VoutboxSettlement **prepared);
extern void voutbox_forget_cursor(VoutboxCursor *cursor);
extern TimestampTz voutbox_next_due(void);
extern uint64 voutbox_key_hash(const char *topic, const char *key);
extern struct HTAB *voutbox_key_set_new(const char *name);

/* Short worker transactions with SPI (spi.c) */
extern volatile sig_atomic_t voutbox_in_xact;
extern void voutbox_xact_begin(const char *activity);
extern void voutbox_xact_end(void);
extern void voutbox_xact_commit(bool *committed);
extern void voutbox_xact_abort(void);
extern void voutbox_xact_begin_block(const char *activity);
extern void voutbox_xact_prepare(const char *gid, bool *prepared);
extern void voutbox_xact_finish_prepared(const char *gid, bool commit);
struct _SPI_plan;
extern struct _SPI_plan *voutbox_plan(const char *sql, int nargs, Oid *types);
extern uint64 voutbox_spi(const char *sql, int nargs, Oid *types, Datum *values,
						  const char *nulls, int expected);
extern uint64 voutbox_spi_once(const char *sql, int nargs, Oid *types, Datum *values,
							   const char *nulls, int expected);
extern Datum voutbox_text_array(char **values, int n);
extern Datum voutbox_scalar_array(Datum *values, int n, Oid type, int len, bool byval, char align);

/* What becomes of the events of a round (settle.c) */
extern VoutboxSettlement *voutbox_settle_begin(void);
extern void voutbox_settle_count(VoutboxSettlement *settlement, const VoutboxRound *round);
extern bool voutbox_settle_events(VoutboxSettlement *settlement, VoutboxRound *round,
								  int64 batch_id);
extern bool voutbox_settle_made_due(VoutboxSettlement *settlement);
extern void voutbox_settle_end(VoutboxSettlement *settlement);
extern void voutbox_settle_keys_in_flight(struct HTAB *keys);
extern TimestampTz voutbox_topic_stalled_until(const char *topic, TimestampTz now);
extern void voutbox_forget_stalled_topics(void);
extern bool voutbox_dead_events_wait(void);

/* Topic provisioning with the admin API (topics.c) */
struct rd_kafka_s;
extern bool voutbox_topic_config_is_valid(const char *value, char **detail);
extern bool voutbox_topic_ensure(struct rd_kafka_s *rk, struct rd_kafka_s *producer, const char *topic,
								 const VoutboxTopicSettings *settings, bool reachable);
extern const char *voutbox_topic_error(const char *topic, const char **code);
extern TimestampTz voutbox_topic_retry_at(const char *topic);
extern void voutbox_topic_missing(const char *topic);
extern char *voutbox_checkpoint_topic_ensure(struct rd_kafka_s *rk, const char *topic);

/* Retention (retention.c) */
extern void voutbox_retention_run(const char *settled_lo);

/* The delivery loop (stream.c) */
extern void voutbox_stream_run(void);

/* Worker status (worker.c) */
extern bool voutbox_is_worker;

/* Standbys that must confirm what is delivered (standbys.c) */
extern bool voutbox_standbys_gate(void);
extern bool voutbox_standbys_confirmed(XLogRecPtr lsn, const char **behind);
extern void voutbox_report_activity(const char *what);

/* Statistics in shared memory (stats.c) */
extern Size voutbox_stats_shmem_size(void);
extern void voutbox_stats_shmem_init(void);
extern void voutbox_stats_worker_started(void);
extern void voutbox_stats_worker_stopped(int code, Datum arg);
extern void voutbox_stats_set_state(const char *state, const char *detail);
extern void voutbox_stats_producer_built(void);
extern void voutbox_stats_set_error(const char *error);
extern void voutbox_stats_slot_state(VoutboxWorkerSlot *slot, const char *state, const char *detail);

typedef struct VoutboxStatsBatch VoutboxStatsBatch;

extern VoutboxStatsBatch *voutbox_stats_batch_new(bool round);
extern void voutbox_stats_batch_add(VoutboxStatsBatch *b, const char *tenant_id, const char *topic,
									int delivered, int failed, int dead, const char *error);
extern void voutbox_stats_batch_flush(VoutboxStatsBatch *b);

/* Dead events to the DLQ, unless it is locked (settle.c) */
extern uint64 voutbox_move_dead_events(VoutboxStatsBatch *stats);

#endif							/* VOUTBOX_H */
