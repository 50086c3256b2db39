/* voutbox 0.6.0 -> 0.6.1: routes as SQL data. */
\echo Use "ALTER EXTENSION voutbox UPDATE TO '0.6.1'" to load this file. \quit

/* Every name below is qualified; this path serves built-in types and operators only. */
SET LOCAL search_path = pg_catalog, pg_temp;

/* ---------------------------------------------------------------------
 * Routes: which topic, key, format and headers an event gets, as data
 * (routes.c).  outbox_save() takes the first route that matches the event
 * (by priority, then name); without one, the GUC templates and
 * voutbox.format apply.  The event stores the route's name, format and
 * headers; the worker reads the route's topic settings when it creates the
 * topic.
 * ---------------------------------------------------------------------
 */
CREATE TABLE voutbox.routes (
	name					text		PRIMARY KEY
		CHECK (pg_catalog.octet_length(name) BETWEEN 1 AND 63),
	priority				integer		NOT NULL DEFAULT 100,
	tenant_pattern			text		NOT NULL DEFAULT '*',
	event_type_pattern		text		NOT NULL DEFAULT '*',
	topic_template			text,		/* NULL: voutbox.topic_template */
	key_template			text,		/* NULL: voutbox.key_template */
	format					text,		/* NULL: voutbox.format */
	headers					jsonb		NOT NULL DEFAULT '{}',
	topic_partitions		integer,	/* NULL: voutbox.topic_partitions */
	topic_replication_factor integer,	/* NULL: voutbox.topic_replication_factor */
	topic_config			text,		/* NULL: voutbox.topic_config */
	updated_at				timestamptz	NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE voutbox.routes IS
	'voutbox: routes of events to topics, keys, formats and headers; change them through outbox_routes';
SELECT pg_catalog.pg_extension_config_dump('voutbox.routes', '');

CREATE FUNCTION voutbox.route_check() RETURNS trigger
AS 'MODULE_PATHNAME', 'voutbox_route_check'
LANGUAGE C;
CREATE TRIGGER route_check
	BEFORE INSERT OR UPDATE OR DELETE ON voutbox.routes
	FOR EACH ROW EXECUTE FUNCTION voutbox.route_check();

/* (The C function that serves voutbox.tenant_roles' trigger too.) */
CREATE FUNCTION voutbox.routes_changed() RETURNS trigger
AS 'MODULE_PATHNAME', 'voutbox_tenant_roles_changed'
LANGUAGE C;
CREATE TRIGGER routes_changed
	AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON voutbox.routes
	FOR EACH STATEMENT EXECUTE FUNCTION voutbox.routes_changed();
/* Also for changes that logical replication applies: the caches must go. */
ALTER TABLE voutbox.routes ENABLE ALWAYS TRIGGER routes_changed;

/* Whether the current user may manage routes of the tenant pattern. */
CREATE FUNCTION voutbox.manages_routes(tenant_pattern text) RETURNS boolean
AS 'MODULE_PATHNAME', 'voutbox_sql_manages_routes'
LANGUAGE C STABLE STRICT;

CREATE VIEW @extschema@.outbox_routes WITH (security_barrier) AS
SELECT name, priority, tenant_pattern, event_type_pattern, topic_template, key_template,
	   format, headers, topic_partitions, topic_replication_factor, topic_config, updated_at
  FROM voutbox.routes
 WHERE voutbox.manages_routes(tenant_pattern)
  WITH CASCADED CHECK OPTION;
ALTER VIEW @extschema@.outbox_routes ALTER COLUMN priority SET DEFAULT 100;
ALTER VIEW @extschema@.outbox_routes ALTER COLUMN tenant_pattern SET DEFAULT '*';
ALTER VIEW @extschema@.outbox_routes ALTER COLUMN event_type_pattern SET DEFAULT '*';
ALTER VIEW @extschema@.outbox_routes ALTER COLUMN headers SET DEFAULT '{}';
ALTER VIEW @extschema@.outbox_routes ALTER COLUMN updated_at SET DEFAULT pg_catalog.now();
COMMENT ON VIEW @extschema@.outbox_routes IS
	'voutbox: the routes the current user manages (every route for voutbox_admin, a tenant''s own for its roles); insert, update and delete here';
GRANT SELECT, INSERT, UPDATE, DELETE ON @extschema@.outbox_routes TO voutbox_admin;

/* What an event stores of its route. */
ALTER TABLE voutbox.events ADD COLUMN route text, ADD COLUMN format text, ADD COLUMN headers jsonb;
ALTER TABLE voutbox.deferred ADD COLUMN route text, ADD COLUMN format text, ADD COLUMN headers jsonb;
ALTER TABLE voutbox.dlq ADD COLUMN route text, ADD COLUMN format text, ADD COLUMN headers jsonb;

/* Requeued events keep their route, format and headers. */
CREATE OR REPLACE FUNCTION voutbox.requeue(p_ids uuid[])
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n bigint;
BEGIN
	WITH moved AS (
		DELETE FROM voutbox.dlq q WHERE q.id = ANY (p_ids) RETURNING q.*)
	INSERT INTO voutbox.deferred (id, seq, txid, tenant_id, aggregate_type, aggregate_id,
								  event_type, event_version, payload, metadata, idempotency_key,
								  trace_id, traceparent, correlation_id, created_at, scheduled_for,
								  pii, pii_fields, consent, producer, topic, msg_key,
								  route, format, headers,
								  holds_key, attempts, due_at, batch_id)
	SELECT m.id, m.seq, pg_current_xact_id(), m.tenant_id, m.aggregate_type, m.aggregate_id,
		   m.event_type, m.event_version, m.payload, m.metadata, m.idempotency_key,
		   m.trace_id, m.traceparent, m.correlation_id, m.created_at, m.scheduled_for,
		   m.pii, m.pii_fields, m.consent, m.producer, m.topic, m.msg_key,
		   m.route, m.format, m.headers,
		   m.msg_key IS NOT NULL, 0, now(), 0
	  FROM moved m;
	GET DIAGNOSTICS n = ROW_COUNT;
	IF n > 0 THEN
		PERFORM voutbox.wake_worker_at_commit();
	END IF;
	RETURN n;
END
$$;

/*
 * Routes for tenants' roles: grant them SELECT on outbox_routes and EXECUTE
 * on these, not more on the view (any other privilege on a view lets its
 * holder LOCK it, and voutbox.routes with it, which would stall saves).
 */
CREATE FUNCTION @extschema@.outbox_route_set(name text, tenant_pattern text,
											 event_type_pattern text DEFAULT '*',
											 topic_template text DEFAULT NULL,
											 key_template text DEFAULT NULL,
											 format text DEFAULT NULL,
											 headers jsonb DEFAULT '{}',
											 priority integer DEFAULT 100)
RETURNS void
AS 'MODULE_PATHNAME', 'voutbox_outbox_route_set'
LANGUAGE C VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.outbox_route_set(text, text, text, text, text, text, jsonb, integer) IS
	'voutbox: add a route, or replace it (its topic settings stay)';
CREATE FUNCTION @extschema@.outbox_route_drop(name text) RETURNS boolean
AS 'MODULE_PATHNAME', 'voutbox_outbox_route_drop'
LANGUAGE C VOLATILE STRICT SECURITY INVOKER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.outbox_route_drop(text) IS 'voutbox: drop a route';
REVOKE ALL ON FUNCTION @extschema@.outbox_route_set(text, text, text, text, text, text, jsonb, integer),
	@extschema@.outbox_route_drop(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.outbox_route_set(text, text, text, text, text, text, jsonb, integer),
	@extschema@.outbox_route_drop(text) TO voutbox_admin;
