-- Routes as data (voutbox.routes, managed through outbox_routes): what
-- outbox_save() takes from them, how a change is checked, who may change
-- which route.  Tried as roles that are neither superusers nor the
-- extension's owner.  No worker runs here; t/026_formats sends routed events
-- to a real broker.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS voutbox;	-- (the earlier tests leave it)
RESET client_min_messages;
CREATE EXTENSION voutbox;
\set VERBOSITY default
\set SHOW_CONTEXT never

CREATE ROLE regress_acme;            -- the application of tenant acme
CREATE ROLE regress_globex;          -- the application of tenant globex
CREATE ROLE regress_ops IN ROLE voutbox_admin;       -- an operator
GRANT SELECT ON outbox_routes TO regress_acme, regress_globex;
GRANT EXECUTE ON FUNCTION outbox_route_set(text, text, text, text, text, text, jsonb, integer),
	  outbox_route_drop(text) TO regress_acme, regress_globex;
GRANT SELECT ON outbox TO regress_acme, regress_globex, regress_ops;
SELECT outbox_tenant_grant('acme', 'regress_acme'), outbox_tenant_grant('globex', 'regress_globex');

-- What a saved event got: its topic, key and what it stores of its route.
CREATE FUNCTION routed(p_id uuid) RETURNS TABLE (topic text, msg_key text, route text,
												 format text, headers jsonb)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
	SELECT topic, msg_key, route, format, headers FROM voutbox.events WHERE id = p_id
$$;

-- ---- Without routes, the settings route every event.
SET ROLE regress_acme;
SELECT * FROM routed(outbox_save('acme', 'order', 'o-1', 'order.paid.v1', '{}'));
RESET ROLE;

-- ---- An operator adds routes; the first that matches wins, by priority then name.
SET ROLE regress_ops;
INSERT INTO outbox_routes (name, tenant_pattern, event_type_pattern, topic_template,
						   key_template, format, headers)
VALUES ('acme-orders', 'acme', 'order.*', '{tenant_id}.orders', '{aggregate_type}:{aggregate_id}',
		'cloudevents', '{"x-team": "payments", "x-schema": "orders/v1"}');
INSERT INTO outbox_routes (name, priority, event_type_pattern, format)
VALUES ('refunds-first', 10, '*.refunded.*', 'debezium'),
	   ('b-same-priority', 50, 'lead.*', 'cloudevents_binary'),
	   ('a-same-priority', 50, 'lead.*', 'debezium');
SELECT name, priority, tenant_pattern, event_type_pattern, topic_template, format, headers
  FROM outbox_routes ORDER BY priority, name;
RESET ROLE;

SET ROLE regress_acme;
SELECT * FROM routed(outbox_save('acme', 'order', 'o-2', 'order.paid.v1', '{}'));
SELECT * FROM routed(outbox_save('acme', 'order', 'o-3', 'order.refunded.v1', '{}'));
SELECT * FROM routed(outbox_save('acme', 'lead', 'l-1', 'lead.created.v2', '{}'));
SELECT * FROM routed(outbox_save('acme', 'invoice', 'i-1', 'invoice.sent.v1', '{}'));
RESET ROLE;
SET ROLE regress_globex;
-- acme's route is acme's only.
SELECT * FROM routed(outbox_save('globex', 'order', 'o-4', 'order.paid.v1', '{}'));
RESET ROLE;

-- A route that leaves the key empty sends events without a key.
UPDATE voutbox.routes SET key_template = '' WHERE name = 'acme-orders';
SELECT * FROM routed(outbox_save('acme', 'order', 'o-5', 'order.paid.v1', '{}'));
UPDATE voutbox.routes SET key_template = '{aggregate_type}:{aggregate_id}' WHERE name = 'acme-orders';

-- ---- Changes are transactional, and the session sees its own at once.
BEGIN;
UPDATE voutbox.routes SET topic_template = '{tenant_id}.orders-v2' WHERE name = 'acme-orders';
SELECT (routed(outbox_save('acme', 'order', 'o-6', 'order.paid.v1', '{}'))).topic;
ROLLBACK;
SELECT (routed(outbox_save('acme', 'order', 'o-7', 'order.paid.v1', '{}'))).topic;
BEGIN;
DELETE FROM voutbox.routes WHERE name = 'acme-orders';
SAVEPOINT s;
INSERT INTO voutbox.routes (name, tenant_pattern, event_type_pattern, topic_template)
VALUES ('acme-all', 'acme', '*', '{tenant_id}.everything');
SELECT (routed(outbox_save('acme', 'order', 'o-8', 'order.paid.v1', '{}'))).topic;
ROLLBACK TO SAVEPOINT s;
SELECT (routed(outbox_save('acme', 'order', 'o-9', 'order.paid.v1', '{}'))).topic;
ROLLBACK;
SELECT (routed(outbox_save('acme', 'order', 'o-10', 'order.paid.v1', '{}'))).topic;

-- ---- A route is checked when it is written.
SET ROLE regress_ops;
INSERT INTO outbox_routes (name, topic_template) VALUES ('bad', '{tenant}.x');
INSERT INTO outbox_routes (name, topic_template) VALUES ('bad', '{tenant_id}.or ders');
INSERT INTO outbox_routes (name, event_type_pattern, topic_template) VALUES ('bad', 'a:b', '{tenant_id}.{event_type}');
INSERT INTO outbox_routes (name, topic_template) VALUES ('bad', 'x.{tenant_id}');
INSERT INTO outbox_routes (name, topic_template) VALUES ('bad', '{tenant_id}{event_type}');
INSERT INTO outbox_routes (name, topic_template) VALUES ('bad', '{tenant_id}-{event_type}');
INSERT INTO outbox_routes (name, topic_template) VALUES ('bad', '{tenant_id}.' || repeat('x', 250));
INSERT INTO outbox_routes (name, tenant_pattern, topic_template) VALUES ('bad', 'a.b', '{tenant_id}.x');
INSERT INTO outbox_routes (name, topic_template) VALUES ('bad', '');
INSERT INTO outbox_routes (name, key_template) VALUES ('bad', '{id}');
INSERT INTO outbox_routes (name, format) VALUES ('bad', 'avro');
INSERT INTO outbox_routes (name, headers) VALUES ('bad', '["x"]');
INSERT INTO outbox_routes (name, headers) VALUES ('bad', '{"x-n": 1}');
INSERT INTO outbox_routes (name, headers) VALUES ('bad', '{"ce_id": "spoofed"}');
INSERT INTO outbox_routes (name, headers) VALUES ('bad', '{"Tenant_ID": "globex"}');
INSERT INTO outbox_routes (name, headers) VALUES ('bad', '{"": "v"}');
INSERT INTO outbox_routes (name, headers) VALUES ('bad', '{"__TypeId__": "com.evil.Gadget"}');
-- (Topic settings: a superuser's.)
RESET ROLE;
INSERT INTO outbox_routes (name, topic_partitions) VALUES ('bad', 100001);
INSERT INTO outbox_routes (name, topic_partitions) VALUES ('bad', 0);
INSERT INTO outbox_routes (name, topic_replication_factor) VALUES ('bad', 0);
INSERT INTO outbox_routes (name, topic_config) VALUES ('bad', 'retention.ms');
SET ROLE regress_ops;
INSERT INTO outbox_routes (name, tenant_pattern) VALUES ('bad', '');
INSERT INTO outbox_routes (name) VALUES ('');
INSERT INTO outbox_routes (name) VALUES (repeat('n', 64));
UPDATE outbox_routes SET format = 'avro' WHERE name = 'acme-orders';
INSERT INTO outbox_routes (name, headers) VALUES ('bad', '{"kafka_replyTopic": "globex.orders"}');
INSERT INTO outbox_routes (name, headers) VALUES ('bad', '{"X-B3-TraceId": "1"}');
-- A shared topic (no {tenant_id}) is an operator's to set; topic settings,
-- which decide how long events stay in Kafka, a superuser's.
INSERT INTO outbox_routes (name, event_type_pattern, topic_template, topic_partitions,
						   topic_replication_factor, topic_config)
VALUES ('audit', 'audit.*', 'shared-audit', 3, 1, 'retention.ms=86400000');
INSERT INTO outbox_routes (name, event_type_pattern, topic_template)
VALUES ('audit', 'audit.*', 'shared-audit');
RESET ROLE;
UPDATE outbox_routes SET topic_partitions = 3, topic_replication_factor = 1,
	   topic_config = 'retention.ms=86400000' WHERE name = 'audit';
SELECT name, topic_template, topic_partitions, topic_replication_factor, topic_config
  FROM outbox_routes WHERE name = 'audit';

-- ---- A tenant's role manages its own routes, and only what stays its own,
-- with outbox_route_set() and outbox_route_drop() (SELECT on the view only:
-- more would let it LOCK the view, and the routes with it).
SET ROLE regress_acme;
SELECT name FROM outbox_routes ORDER BY name;
-- (Its priority puts it before the operator's routes for leads.)
SELECT outbox_route_set('acme-leads', 'acme', 'lead.*', '{tenant_id}.leads',
						headers => '{"x-owner": "acme"}', priority => 40);
SELECT * FROM routed(outbox_save('acme', 'lead', 'l-2', 'lead.created.v1', '{}'));
SELECT outbox_route_set('steal', 'globex', topic_template => '{tenant_id}.x');
SELECT outbox_route_set('steal', '*', topic_template => '{tenant_id}.x');
SELECT outbox_route_set('steal', 'acm*', topic_template => '{tenant_id}.x');
SELECT outbox_route_set('steal', 'acme', topic_template => 'globex.orders');
SELECT outbox_route_set('acme-leads', 'globex', 'lead.*', '{tenant_id}.leads');
-- Another tenant's route, by its name.
SELECT outbox_route_set('refunds-first', 'acme');
SELECT outbox_route_drop('refunds-first');
SELECT outbox_route_drop('no-such-route');
-- Not through the view.
INSERT INTO outbox_routes (name, tenant_pattern) VALUES ('via-view', 'acme');
SELECT outbox_route_set('acme-orders', 'acme', 'order.*', '{tenant_id}.orders',
						'{aggregate_type}:{aggregate_id}', 'cloudevents', '{"x-team": "orders"}');
-- A route of acme's that a superuser gave topic settings is no longer acme's to change.
RESET ROLE;
UPDATE voutbox.routes SET topic_partitions = 6 WHERE name = 'acme-orders';
SET ROLE regress_acme;
SELECT outbox_route_set('acme-orders', 'acme', 'order.*', '{tenant_id}.orders',
						'{aggregate_type}:{aggregate_id}', 'cloudevents', '{"x-team": "mine"}');
SELECT outbox_route_drop('acme-orders');
SELECT name, headers, topic_partitions FROM outbox_routes WHERE name = 'acme-orders';
RESET ROLE;
SET ROLE regress_globex;
SELECT name FROM outbox_routes ORDER BY name;
RESET ROLE;
-- Through the table, the trigger holds for a role that may write it (the
-- view's owner may; here a role granted it for the test).
GRANT USAGE ON SCHEMA voutbox TO regress_globex;
GRANT SELECT, INSERT, UPDATE, DELETE ON voutbox.routes TO regress_globex;
SET ROLE regress_globex;
UPDATE voutbox.routes SET topic_template = '{tenant_id}.mine' WHERE name = 'acme-leads';
DELETE FROM voutbox.routes WHERE name = 'acme-leads';
INSERT INTO voutbox.routes (name, tenant_pattern, topic_partitions) VALUES ('g', 'globex', 100);
RESET ROLE;
REVOKE SELECT, INSERT, UPDATE, DELETE ON voutbox.routes FROM regress_globex;
REVOKE USAGE ON SCHEMA voutbox FROM regress_globex;
-- A role granted UPDATE on the view is checked the same way.
GRANT UPDATE ON outbox_routes TO regress_acme;
SET ROLE regress_acme;
UPDATE outbox_routes SET tenant_pattern = 'globex' WHERE name = 'acme-leads';
UPDATE outbox_routes SET topic_partitions = 60 WHERE name = 'acme-orders';
-- Other tenants' and shared routes are not seen, so not changed.
UPDATE outbox_routes SET format = 'voutbox' WHERE name IN ('refunds-first', 'audit');
RESET ROLE;
REVOKE UPDATE ON outbox_routes FROM regress_acme;
SELECT name, tenant_pattern, format, topic_partitions FROM voutbox.routes ORDER BY name;
SET ROLE regress_acme;
SELECT outbox_route_drop('acme-leads');
SELECT name FROM outbox_routes ORDER BY name;
RESET ROLE;

-- ---- An operator's route with a negative priority comes first, and stays.
SET ROLE regress_ops;
INSERT INTO outbox_routes (name, priority, tenant_pattern, event_type_pattern, format)
VALUES ('acme-pii', -10, 'acme', 'person.*', 'voutbox');
RESET ROLE;
SET ROLE regress_acme;
SELECT name, priority FROM outbox_routes ORDER BY priority, name;
SELECT outbox_route_drop('acme-pii');
SELECT outbox_route_set('acme-pii', 'acme', 'person.*', format => 'debezium');
SELECT outbox_route_set('acme-first', 'acme', 'person.*', priority => -11);
-- Nor what such a route matches.
SELECT outbox_route_set('acme-orders', 'acme', '*', '{tenant_id}.orders',
						'{aggregate_type}:{aggregate_id}', 'cloudevents', '{"x-team": "orders"}');
-- At most 100 routes per tenant for a tenant's roles.
DO $$
BEGIN
	FOR i IN 1 .. 101 LOOP
		PERFORM outbox_route_set('acme-many-' || i, 'acme', 'many' || i || '.*');
	END LOOP;
END $$;
SELECT count(*) FROM outbox_routes WHERE name LIKE 'acme-many-%';
RESET ROLE;
DELETE FROM voutbox.routes WHERE name = 'acme-pii';

-- ---- The functions ignore the caller's search_path: a look-alike "=" is
-- never called (as the extension's owner, it would run as a superuser).
CREATE SCHEMA regress_evil AUTHORIZATION regress_acme;
SET ROLE regress_acme;
CREATE FUNCTION regress_evil.hijack(text, text) RETURNS boolean LANGUAGE plpgsql AS
$$ BEGIN RAISE EXCEPTION 'hijacked as %', current_user; END $$;
CREATE OPERATOR regress_evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = regress_evil.hijack);
SET search_path = regress_evil, pg_catalog, public;
SELECT outbox_route_set('acme-evil', 'acme', 'evil.*');
SELECT outbox_route_drop('acme-evil');
RESET search_path;
RESET ROLE;
DROP SCHEMA regress_evil CASCADE;

-- ---- Checked again when used: every template must end the tenant id alike.
SET voutbox.topic_template = '{tenant_id}-{event_type}';
SELECT outbox_save('acme', 'order', 'o-11', 'order.paid.v1', '{}');
RESET voutbox.topic_template;
-- The route's separator is refused in tenant ids it routes.
INSERT INTO voutbox.routes (name, event_type_pattern, topic_template)
VALUES ('by-type', 'thing.*', '{tenant_id}.things');
SELECT outbox_save('a.b', 'thing', 't-1', 'thing.made.v1', '{}');
SELECT * FROM routed(outbox_save('ab', 'thing', 't-2', 'thing.made.v1', '{}'));

-- ---- With tenant isolation on, no template puts an event among another
-- tenant's topics: the setting shares topics here ({event_type} only).
SET voutbox.topic_template = '{event_type}';
SET ROLE regress_globex;
SELECT outbox_save('globex', 'x', 'x-1', 'acme.orders.v1', '{}');
SELECT outbox_save('globex', 'x', 'x-2', 'acme_orders.v1', '{}');
SELECT (routed(outbox_save('globex', 'x', 'x-3', 'globex.orders.v1', '{}'))).topic;
SELECT (routed(outbox_save('globex', 'x', 'x-4', 'shared.orders.v1', '{}'))).topic;
RESET ROLE;
-- A tenant bound to a role that does not exist (yet, or any more) owns its topics too.
INSERT INTO voutbox.tenant_roles (tenant_id, role_name) VALUES ('initech', 'regress_no_such_role');
SET ROLE regress_globex;
SELECT outbox_save('globex', 'x', 'x-6', 'initech.orders.v1', '{}');
RESET ROLE;
DELETE FROM voutbox.tenant_roles WHERE tenant_id = 'initech';
-- A prefix before {tenant_id} in the setting: routes must start with it too.
SET voutbox.topic_template = 'prod.{tenant_id}.{event_type}';
SELECT outbox_save('acme', 'order', 'o-12', 'order.paid.v1', '{}');
INSERT INTO voutbox.routes (name, tenant_pattern, event_type_pattern, topic_template)
VALUES ('prod-x', 'acme', 'x.*', '{tenant_id}.{event_type}');
INSERT INTO voutbox.routes (name, tenant_pattern, event_type_pattern, topic_template)
VALUES ('prod-x', 'acme', 'x.*', 'prod.{tenant_id}.x');
SELECT (routed(outbox_save('acme', 'x', 'x-5', 'x.made.v1', '{}'))).topic;
DELETE FROM voutbox.routes WHERE name = 'prod-x';
RESET voutbox.topic_template;

-- ---- Requeued dead events keep what they stored of their route.
INSERT INTO voutbox.dlq (id, tenant_id, aggregate_type, aggregate_id, event_type, event_version,
						 payload, idempotency_key, correlation_id, created_at, pii, topic, msg_key,
						 route, format, headers, seq, retry_count, last_error, reason)
SELECT id, tenant_id, aggregate_type, aggregate_id, event_type, event_version, payload,
	   id::text, correlation_id, created_at, pii, topic, msg_key, route, format, headers, seq,
	   3, 'simulated', 'max_retries_exceeded'
  FROM voutbox.events WHERE aggregate_id = 'o-2';
SELECT outbox_dlq_requeue(id) FROM voutbox.dlq WHERE aggregate_id = 'o-2';
SELECT topic, msg_key, route, format, headers FROM voutbox.deferred WHERE aggregate_id = 'o-2';

-- pg_dump keeps the routes (configuration, not the extension's own data).
SELECT c.relname FROM pg_extension e, unnest(e.extconfig) r(oid)
  JOIN pg_class c ON c.oid = r.oid
 WHERE e.extname = 'voutbox' AND c.relname = 'routes';

DROP FUNCTION routed(uuid);

-- ---- Between the new library's start and ALTER EXTENSION UPDATE (SQL
-- objects of 0.6.0), saves work without routes; a session that saved then
-- takes the routes once the update made them.
DROP EXTENSION voutbox;
CREATE EXTENSION voutbox VERSION '0.6.0';
SELECT outbox_save('acme', 'order', 'u-1', 'order.paid.v1', '{}') AS u1 \gset
SELECT topic FROM voutbox.events WHERE id = :'u1';
ALTER EXTENSION voutbox UPDATE;
INSERT INTO outbox_routes (name, event_type_pattern, topic_template)
VALUES ('after-update', 'order.*', '{tenant_id}.orders');
SELECT outbox_save('acme', 'order', 'u-2', 'order.paid.v1', '{}') AS u2 \gset
SELECT topic, route FROM voutbox.events WHERE id = :'u2';
DROP EXTENSION voutbox;
DROP ROLE regress_acme, regress_globex, regress_ops;
