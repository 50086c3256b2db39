/* voutbox--0.2.0--0.3.0.sql: trust, tenant isolation, order in the retry queue */

\echo Use "ALTER EXTENSION voutbox UPDATE TO '0.3.0'" to load this file. \quit

/*
 * Nothing of this script may resolve to an object of a schema that others
 * can create objects in (the schema of the API may be owned by the
 * database's owner): every name below is qualified, and this path only
 * serves what is not (built-in types, operators, aggregates).  PostgreSQL
 * restores the search_path after the script.
 */
SET LOCAL search_path = pg_catalog, pg_temp;

/*
 * The trust model (README, "Security").  The worker writes only to tables in
 * the schema "voutbox", which the extension owns and nobody else can change.
 * The dead-letter queue therefore moves there (voutbox.dlq); outbox_dlq
 * becomes a view over it.  Roles are bound to the tenants they act for in
 * voutbox.tenant_roles; every view and function of the API filters by that
 * binding through voutbox.acts_for(), which also says whether isolation is
 * on at all (it is once any binding exists).
 */

/* ---------------------------------------------------------------------
 * The administrator role: acts for every tenant.  Roles are global to the
 * cluster, so it may exist already (voutbox in another database).
 * ---------------------------------------------------------------------
 */
DO $$
DECLARE
	members text;
	owner_name name;
	owner_super boolean;
BEGIN
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'voutbox_admin') THEN
		CREATE ROLE voutbox_admin NOLOGIN;
	ELSE
		SELECT string_agg(quote_ident(m.rolname), ', ' ORDER BY m.rolname) INTO members
		  FROM pg_catalog.pg_auth_members a
		  JOIN pg_catalog.pg_roles m ON m.oid = a.member
		 WHERE a.roleid = 'voutbox_admin'::pg_catalog.regrole;
		RAISE NOTICE 'the role voutbox_admin exists already; its members act for every tenant of voutbox in every database: %',
			coalesce(members, '(none)')
			USING HINT = 'Check that it is the role you meant; voutbox adopts it as its administrator role.';
	END IF;
	SELECT r.rolname, r.rolsuper INTO owner_name, owner_super
	  FROM pg_catalog.pg_namespace n JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner
	 WHERE n.nspname = '@extschema@';
	IF owner_name = 'pg_database_owner' THEN
		SELECT r.rolsuper INTO owner_super
		  FROM pg_catalog.pg_database d JOIN pg_catalog.pg_roles r ON r.oid = d.datdba
		 WHERE d.datname = pg_catalog.current_database();
	END IF;
	IF NOT owner_super THEN
		RAISE NOTICE 'voutbox''s functions and views are in schema @extschema@, which a role that is not a superuser owns'
			USING HINT = 'That role can create look-alikes of outbox_save() there. If it is not trusted by every application, install voutbox in a schema of its own (README, "Security").';
	END IF;
END
$$;

/* ---------------------------------------------------------------------
 * Tenant bindings
 * ---------------------------------------------------------------------
 */
/*
 * Roles by name, as pg_dump restores them: a binding to a role that does not
 * exist (dropped, or not in the cluster a dump is restored into) grants
 * nothing, and never another role that got its OID.
 */
CREATE TABLE voutbox.tenant_roles (
	tenant_id	text		NOT NULL CHECK (octet_length(tenant_id) BETWEEN 1 AND 255),
	role_name	name		NOT NULL,
	granted_at	timestamptz	NOT NULL DEFAULT now(),
	PRIMARY KEY (tenant_id, role_name)
);
COMMENT ON TABLE voutbox.tenant_roles IS
	'voutbox: the roles that act for each tenant; isolation is on as soon as it has a row';
SELECT pg_catalog.pg_extension_config_dump('voutbox.tenant_roles', '');

/* Whether the current user acts for the tenant (see privileges.c). */
CREATE FUNCTION voutbox.acts_for(tenant_id text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'voutbox_sql_acts_for'
LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;

/* Whether the current user acts for every tenant. */
CREATE FUNCTION voutbox.acts_for_all()
RETURNS boolean
AS 'MODULE_PATHNAME', 'voutbox_sql_acts_for_all'
LANGUAGE C STABLE PARALLEL RESTRICTED;

/* Whether the given role acts for the tenant: for the owner's own use. */
CREATE FUNCTION voutbox.role_acts_for(role_id oid, tenant_id text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'voutbox_sql_role_acts_for'
LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
REVOKE ALL ON FUNCTION voutbox.role_acts_for(oid, text) FROM PUBLIC;

/* Every backend forgets the bindings it cached when they change. */
CREATE FUNCTION voutbox.tenant_roles_changed()
RETURNS trigger
AS 'MODULE_PATHNAME', 'voutbox_tenant_roles_changed'
LANGUAGE C;
CREATE TRIGGER tenant_roles_changed
	AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON voutbox.tenant_roles
	FOR EACH STATEMENT EXECUTE FUNCTION voutbox.tenant_roles_changed();

CREATE FUNCTION @extschema@.outbox_tenant_grant(tenant_id text, role regrole)
RETURNS boolean
LANGUAGE sql VOLATILE STRICT SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
	WITH added AS (
		INSERT INTO voutbox.tenant_roles (tenant_id, role_name)
		SELECT $1, r.rolname FROM pg_catalog.pg_roles r WHERE r.oid OPERATOR(pg_catalog.=) $2
		ON CONFLICT DO NOTHING RETURNING 1)
	SELECT count(*) > 0 FROM added
$$;
COMMENT ON FUNCTION @extschema@.outbox_tenant_grant(text, regrole) IS
	'voutbox: let a role (and the roles that have its privileges) act for a tenant; true if it did not yet';

/* By name: the binding of a role that was dropped can be revoked too. */
CREATE FUNCTION @extschema@.outbox_tenant_revoke(tenant_id text, role name DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	gone bigint;
BEGIN
	DELETE FROM voutbox.tenant_roles t
	 WHERE t.tenant_id = $1 AND ($2 IS NULL OR t.role_name = $2);
	GET DIAGNOSTICS gone = ROW_COUNT;
	IF gone > 0 AND NOT EXISTS (SELECT FROM voutbox.tenant_roles) THEN
		RAISE WARNING 'no role is bound to a tenant any more: tenant isolation is off'
			USING DETAIL = 'Every role that may call outbox_save() now saves for, and sees, every tenant.',
				  HINT = 'Bind a role to a tenant with outbox_tenant_grant() to turn it on again.';
	END IF;
	RETURN gone;
END
$$;
COMMENT ON FUNCTION @extschema@.outbox_tenant_revoke(text, name) IS
	'voutbox: remove a binding of a tenant (all of them without a role); returns how many';

REVOKE ALL ON FUNCTION @extschema@.outbox_tenant_grant(text, regrole) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.outbox_tenant_revoke(text, name) FROM PUBLIC;

CREATE VIEW @extschema@.outbox_tenants WITH (security_barrier) AS
SELECT t.tenant_id, t.role_name AS role, t.granted_at
  FROM voutbox.tenant_roles t
 WHERE voutbox.acts_for(t.tenant_id);
COMMENT ON VIEW @extschema@.outbox_tenants IS
	'voutbox: which roles act for which tenants (the tenants the current user acts for)';

/* ---------------------------------------------------------------------
 * The dead-letter queue moves into the storage schema; outbox_dlq becomes
 * a view over it that shows the caller's tenants.  Privileges granted on
 * the table move to the view.
 * ---------------------------------------------------------------------
 */
/*
 * A trigger or foreign key another role put on the table (with a TRIGGER or
 * REFERENCES grant) would come along into the storage schema, where the
 * worker, a superuser, writes: the update stops on them.
 */
DO $$
DECLARE
	dlq pg_catalog.oid;
	found text;
BEGIN
	SELECT c.oid INTO dlq
	  FROM pg_catalog.pg_class c
	  JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
	 WHERE n.nspname OPERATOR(pg_catalog.=) '@extschema@'
	   AND c.relname OPERATOR(pg_catalog.=) 'outbox_dlq';
	SELECT pg_catalog.string_agg(o.what, ', ' ORDER BY o.what) INTO found
	  FROM (SELECT pg_catalog.format('trigger %I', t.tgname) AS what
			  FROM pg_catalog.pg_trigger t
			 WHERE t.tgrelid OPERATOR(pg_catalog.=) dlq AND NOT t.tgisinternal
			UNION ALL
			SELECT pg_catalog.format('foreign key %I of table %s', k.conname,
									 k.conrelid::pg_catalog.regclass)
			  FROM pg_catalog.pg_constraint k
			 WHERE k.confrelid OPERATOR(pg_catalog.=) dlq) o;
	IF found IS NOT NULL THEN
		RAISE EXCEPTION 'outbox_dlq has objects voutbox did not create: %', found
			USING ERRCODE = 'object_not_in_prerequisite_state',
				  DETAIL = 'voutbox 0.3.0 moves the table into the schema voutbox, where its worker, a '
						   'superuser, writes it: a trigger on it would run with the worker''s rights.',
				  HINT = 'Drop them, then run ALTER EXTENSION voutbox UPDATE again.';
	END IF;
END
$$;

ALTER TABLE @extschema@.outbox_dlq SET SCHEMA voutbox;
ALTER TABLE voutbox.outbox_dlq RENAME TO dlq;
ALTER INDEX voutbox.outbox_dlq_pkey RENAME TO dlq_pkey;
ALTER INDEX voutbox.outbox_dlq_idempotency RENAME TO dlq_idempotency;
ALTER INDEX voutbox.outbox_dlq_moved_at RENAME TO dlq_moved_at;
ALTER INDEX voutbox.outbox_dlq_tenant_type RENAME TO dlq_tenant_type;
ALTER TABLE voutbox.dlq RENAME CONSTRAINT outbox_dlq_reason TO dlq_reason;
COMMENT ON TABLE voutbox.dlq IS 'voutbox: events that gave up; query the outbox_dlq view instead';

CREATE VIEW @extschema@.outbox_dlq WITH (security_barrier) AS
SELECT q.id, q.tenant_id, q.aggregate_type, q.aggregate_id, q.event_type, q.event_version,
	   q.payload, q.metadata, q.idempotency_key, q.trace_id, q.traceparent, q.correlation_id,
	   q.created_at, q.scheduled_for, q.pii, q.pii_fields, q.consent, q.producer, q.topic,
	   q.msg_key, q.seq, q.retry_count, q.last_error, q.reason, q.moved_at, q.error_code
  FROM voutbox.dlq q
 WHERE voutbox.acts_for(q.tenant_id)
  WITH CASCADED CHECK OPTION;
ALTER VIEW @extschema@.outbox_dlq ALTER COLUMN moved_at SET DEFAULT now();
COMMENT ON VIEW @extschema@.outbox_dlq IS
	'voutbox: events that gave up (a permanent error, or voutbox.max_retries used up)';

/*
 * Privileges granted on the table: revoked (nobody but the owner may reach
 * the storage), and printed as the GRANTs to run on the view.  Not granted
 * here: a grant made by an extension script counts as one of its initial
 * privileges, which pg_dump leaves out, so it would be lost at a restore.
 * INSERT and DELETE are not offered: dead events are removed with
 * outbox_dlq_discard(), which leaves a tombstone, and only who acts for every
 * tenant may insert one (voutbox.dlq_check).
 */
DO $$
DECLARE
	g record;
	grants text := '';
BEGIN
	FOR g IN
		SELECT a.privilege_type AS priv,
			   CASE WHEN a.grantee OPERATOR(pg_catalog.=) 0::pg_catalog.oid THEN 'PUBLIC'
					ELSE pg_catalog.quote_ident(r.rolname) END AS grantee
		  FROM pg_catalog.pg_class c
		 CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
		  LEFT JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) a.grantee
		 WHERE c.oid OPERATOR(pg_catalog.=) 'voutbox.dlq'::pg_catalog.regclass::pg_catalog.oid
		   AND a.grantee OPERATOR(pg_catalog.<>) c.relowner
	LOOP
		IF g.priv IN ('SELECT', 'UPDATE') THEN
			grants := grants || pg_catalog.format('GRANT %s ON %I.outbox_dlq TO %s; ',
												  g.priv, '@extschema@', g.grantee);
		END IF;
		EXECUTE pg_catalog.format('REVOKE %s ON voutbox.dlq FROM %s CASCADE', g.priv, g.grantee);
	END LOOP;
	FOR g IN
		SELECT a.privilege_type AS priv, att.attname AS col,
			   CASE WHEN a.grantee OPERATOR(pg_catalog.=) 0::pg_catalog.oid THEN 'PUBLIC'
					ELSE pg_catalog.quote_ident(r.rolname) END AS grantee
		  FROM pg_catalog.pg_attribute att
		 CROSS JOIN LATERAL pg_catalog.aclexplode(att.attacl) a
		  LEFT JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) a.grantee
		 WHERE att.attrelid OPERATOR(pg_catalog.=) 'voutbox.dlq'::pg_catalog.regclass::pg_catalog.oid
		   AND att.attacl IS NOT NULL
	LOOP
		IF g.priv IN ('SELECT', 'UPDATE') THEN
			grants := grants || pg_catalog.format('GRANT %s (%I) ON %I.outbox_dlq TO %s; ',
												  g.priv, g.col, '@extschema@', g.grantee);
		END IF;
		EXECUTE pg_catalog.format('REVOKE %s (%I) ON voutbox.dlq FROM %s CASCADE', g.priv, g.col, g.grantee);
	END LOOP;
	IF grants <> '' THEN
		RAISE WARNING 'outbox_dlq is now a view; the privileges granted on it are revoked'
			USING HINT = 'Grant them again: ' || grants;
	END IF;
END
$$;

/*
 * Fixing a dead event in place, or adding one, through outbox_dlq: the row
 * must be an event outbox_save() would accept; id and seq never change; with
 * tenant isolation on, only who acts for every tenant may add one or change
 * its tenant, idempotency key, topic or key (admin.c).  The worker's own
 * moves insert rows it read from the storage as they are.
 */
CREATE FUNCTION voutbox.dlq_check()
RETURNS trigger
AS 'MODULE_PATHNAME', 'voutbox_dlq_check'
LANGUAGE C
SET search_path = pg_catalog, pg_temp;
CREATE TRIGGER dlq_check BEFORE INSERT OR UPDATE ON voutbox.dlq
	FOR EACH ROW EXECUTE FUNCTION voutbox.dlq_check();

/* ---------------------------------------------------------------------
 * The retry queue in commit order.  A key's events wait in the order the
 * worker met them: by the batch whose settling deferred them (batch_id,
 * which grows with the windows, themselves in commit order), then by seq.
 * A requeued dead event has batch_id 0: it heads its key.  Events marked
 * dead wait in voutbox.deferred only while the DLQ is locked by someone.
 * ---------------------------------------------------------------------
 */
ALTER TABLE voutbox.deferred ADD COLUMN batch_id bigint NOT NULL DEFAULT 0;
DROP INDEX voutbox.deferred_key;
CREATE INDEX deferred_key ON voutbox.deferred (topic, msg_key, batch_id, seq)
	WHERE delivered_at IS NULL AND holds_key AND dead_reason IS NULL;
/* Idempotency keys of requeued events whose ring table is gone. */
CREATE INDEX deferred_idempotency ON voutbox.deferred (tenant_id, idempotency_key);

/* ---------------------------------------------------------------------
 * DLQ administration: the public functions are C wrappers that act as the
 * extension's owner for the caller's tenants (admin.c); these do the work.
 * ---------------------------------------------------------------------
 */
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
								  holds_key, attempts, due_at, batch_id)
	SELECT m.id, m.seq, pg_current_xact_id(), m.tenant_id, m.aggregate_type, m.aggregate_id,
		   m.event_type, m.event_version, m.payload, m.metadata, m.idempotency_key,
		   m.trace_id, m.traceparent, m.correlation_id, m.created_at, m.scheduled_for,
		   m.pii, m.pii_fields, m.consent, m.producer, m.topic, m.msg_key,
		   m.msg_key IS NOT NULL, 0, now(), 0
	  FROM moved m;
	GET DIAGNOSTICS n = ROW_COUNT;
	IF n > 0 THEN
		PERFORM voutbox.wake_worker_at_commit();
	END IF;
	RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION voutbox.discard(p_ids uuid[])
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
	WITH gone AS (DELETE FROM voutbox.dlq q WHERE q.id = ANY (p_ids) RETURNING q.id),
	tomb AS (INSERT INTO voutbox.discarded (id) SELECT id FROM gone ON CONFLICT DO NOTHING)
	SELECT count(*) FROM gone
$$;

/* The dead events of a filter that the given role acts for, locked. */
DROP FUNCTION voutbox.dlq_matching(text, text, text, text, text, timestamptz, timestamptz,
								   timestamptz, timestamptz);
CREATE FUNCTION voutbox.dlq_matching(p_caller text, p_role oid, p_tenant_id text, p_event_type text,
									 p_error_code text, p_reason text,
									 p_created_after timestamptz, p_created_before timestamptz,
									 p_moved_after timestamptz, p_moved_before timestamptz)
RETURNS uuid[]
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF num_nonnulls(p_tenant_id, p_event_type, p_error_code, p_reason, p_created_after,
					p_created_before, p_moved_after, p_moved_before) = 0 THEN
		RAISE EXCEPTION '%: no filter given', p_caller
			USING ERRCODE = 'invalid_parameter_value',
				  DETAIL = 'Without a filter the call would affect every event in outbox_dlq.',
				  HINT = 'Pass at least one of tenant_id, event_type, error_code, reason, created_after, created_before, moved_after, moved_before; to match every row, pass moved_before => now().';
	END IF;
	IF p_reason IS NOT NULL AND p_reason NOT IN ('max_retries_exceeded', 'permanent_error') THEN
		RAISE EXCEPTION '%: unknown reason "%"', p_caller, p_reason
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'The reasons are max_retries_exceeded and permanent_error.';
	END IF;
	IF p_tenant_id IS NOT NULL AND NOT voutbox.role_acts_for(p_role, p_tenant_id) THEN
		RAISE EXCEPTION '%: permission denied for tenant "%"', p_caller, p_tenant_id
			USING ERRCODE = 'insufficient_privilege',
				  DETAIL = 'The current role does not act for that tenant.',
				  HINT = 'An administrator binds roles to tenants with outbox_tenant_grant().';
	END IF;
	RETURN ARRAY(
		SELECT q.id FROM voutbox.dlq q
		 WHERE (p_tenant_id IS NULL OR q.tenant_id = p_tenant_id)
		   AND (p_event_type IS NULL OR q.event_type = p_event_type)
		   AND (p_error_code IS NULL OR q.error_code = p_error_code)
		   AND (p_reason IS NULL OR q.reason = p_reason)
		   AND (p_created_after IS NULL OR q.created_at >= p_created_after)
		   AND (p_created_before IS NULL OR q.created_at < p_created_before)
		   AND (p_moved_after IS NULL OR q.moved_at >= p_moved_after)
		   AND (p_moved_before IS NULL OR q.moved_at < p_moved_before)
		   AND voutbox.role_acts_for(p_role, q.tenant_id)
		 ORDER BY q.seq
		   FOR UPDATE);
END
$$;

/* The ids among the given ones that the role acts for, locked. */
CREATE FUNCTION voutbox.dlq_own(p_role oid, p_ids uuid[])
RETURNS uuid[]
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT ARRAY(SELECT q.id FROM voutbox.dlq q
				  WHERE q.id = ANY (p_ids) AND voutbox.role_acts_for(p_role, q.tenant_id)
				  ORDER BY q.seq FOR UPDATE)
$$;

REVOKE ALL ON FUNCTION voutbox.requeue(uuid[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION voutbox.discard(uuid[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION voutbox.dlq_matching(text, oid, text, text, text, text, timestamptz,
											timestamptz, timestamptz, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION voutbox.dlq_own(oid, uuid[]) FROM PUBLIC;

CREATE OR REPLACE FUNCTION @extschema@.outbox_dlq_requeue(id uuid)
RETURNS bigint
AS 'MODULE_PATHNAME', 'voutbox_outbox_dlq_requeue'
LANGUAGE C VOLATILE STRICT SECURITY INVOKER
SET search_path = pg_catalog, pg_temp;

CREATE OR REPLACE FUNCTION @extschema@.outbox_dlq_requeue_where(tenant_id text DEFAULT NULL,
																event_type text DEFAULT NULL,
																error_code text DEFAULT NULL,
																reason text DEFAULT NULL,
																created_after timestamptz DEFAULT NULL,
																created_before timestamptz DEFAULT NULL,
																moved_after timestamptz DEFAULT NULL,
																moved_before timestamptz DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'voutbox_outbox_dlq_requeue_where'
LANGUAGE C VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp;

CREATE OR REPLACE FUNCTION @extschema@.outbox_dlq_discard(id uuid)
RETURNS bigint
AS 'MODULE_PATHNAME', 'voutbox_outbox_dlq_discard'
LANGUAGE C VOLATILE STRICT SECURITY INVOKER
SET search_path = pg_catalog, pg_temp;

CREATE OR REPLACE FUNCTION @extschema@.outbox_dlq_discard_where(tenant_id text DEFAULT NULL,
																event_type text DEFAULT NULL,
																error_code text DEFAULT NULL,
																reason text DEFAULT NULL,
																created_after timestamptz DEFAULT NULL,
																created_before timestamptz DEFAULT NULL,
																moved_after timestamptz DEFAULT NULL,
																moved_before timestamptz DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'voutbox_outbox_dlq_discard_where'
LANGUAGE C VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp;

/* ---------------------------------------------------------------------
 * outbox_save acts as the extension's owner itself, after it has checked
 * the caller's tenant (save.c): it must know who calls it.
 * ---------------------------------------------------------------------
 */
CREATE OR REPLACE FUNCTION @extschema@.outbox_save(tenant_id text,
												   aggregate_type text,
												   aggregate_id text,
												   event_type text,
												   payload jsonb,
												   event_version integer DEFAULT NULL,
												   metadata jsonb DEFAULT NULL,
												   idempotency_key text DEFAULT NULL,
												   correlation_id text DEFAULT NULL,
												   trace_id text DEFAULT NULL,
												   pii boolean DEFAULT false,
												   pii_fields text[] DEFAULT NULL,
												   consent jsonb DEFAULT NULL,
												   producer text DEFAULT NULL,
												   scheduled_for timestamptz DEFAULT NULL)
RETURNS uuid
AS 'MODULE_PATHNAME', 'voutbox_outbox_save'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp;

/*
 * published_at() reads the cursor's history for the outbox view: as the
 * owner, since the view's readers have no access to the storage.
 */
ALTER FUNCTION voutbox.published_at(xid8, bigint) SECURITY DEFINER;

/* ---------------------------------------------------------------------
 * Views.  Each shows the rows of the tenants the caller acts for; they are
 * security barriers, so that no function of the caller's sees other rows.
 * ---------------------------------------------------------------------
 */

/*
 * Every retained event: those of the ring, and those only still in the
 * retry queue or the DLQ after their ring table was truncated (a dead
 * event requeued or kept past voutbox.retention).
 */
CREATE VIEW voutbox.retained_events AS
SELECT e.id, e.seq, e.txid, e.tenant_id, e.aggregate_type, e.aggregate_id, e.event_type,
	   e.event_version, e.payload, e.metadata, e.idempotency_key, e.trace_id, e.traceparent,
	   e.correlation_id, e.created_at, e.scheduled_for, e.pii, e.pii_fields, e.consent,
	   e.producer, e.topic, e.msg_key
  FROM voutbox.events e
UNION ALL
SELECT d.id, d.seq, d.txid, d.tenant_id, d.aggregate_type, d.aggregate_id, d.event_type,
	   d.event_version, d.payload, d.metadata, d.idempotency_key, d.trace_id, d.traceparent,
	   d.correlation_id, d.created_at, d.scheduled_for, d.pii, d.pii_fields, d.consent,
	   d.producer, d.topic, d.msg_key
  FROM voutbox.deferred d
 WHERE NOT EXISTS (SELECT 1 FROM voutbox.events o WHERE o.id = d.id)
UNION ALL
SELECT q.id, q.seq, NULL, q.tenant_id, q.aggregate_type, q.aggregate_id, q.event_type,
	   q.event_version, q.payload, q.metadata, q.idempotency_key, q.trace_id, q.traceparent,
	   q.correlation_id, q.created_at, q.scheduled_for, q.pii, q.pii_fields, q.consent,
	   q.producer, q.topic, q.msg_key
  FROM voutbox.dlq q
 WHERE NOT EXISTS (SELECT 1 FROM voutbox.events o WHERE o.id = q.id)
   AND NOT EXISTS (SELECT 1 FROM voutbox.deferred o WHERE o.id = q.id);

CREATE OR REPLACE VIEW @extschema@.outbox WITH (security_barrier) AS
SELECT e.id,
	   e.tenant_id,
	   e.aggregate_id,
	   e.aggregate_type,
	   e.event_type,
	   e.event_version,
	   e.payload,
	   e.metadata,
	   coalesce(e.idempotency_key, e.id::text) AS idempotency_key,
	   e.trace_id,
	   e.correlation_id,
	   e.created_at,
	   CASE WHEN q.id IS NOT NULL THEN NULL
			WHEN d.id IS NOT NULL THEN d.delivered_at
			WHEN x.id IS NOT NULL THEN NULL
			ELSE voutbox.published_at(e.txid, e.seq) END AS published_at,
	   coalesce(q.retry_count, d.attempts, 0) AS retry_count,
	   coalesce(q.last_error, d.last_error) AS last_error,
	   e.scheduled_for,
	   e.pii,
	   e.pii_fields,
	   e.consent,
	   e.producer,
	   e.topic,
	   e.msg_key AS key,
	   CASE WHEN q.id IS NOT NULL THEN 'dead'
			WHEN d.id IS NOT NULL AND d.dead_reason IS NOT NULL THEN 'dead'
			WHEN d.id IS NOT NULL AND d.delivered_at IS NOT NULL THEN 'delivered'
			WHEN d.id IS NOT NULL AND d.attempts > 0 THEN 'retrying'
			WHEN d.id IS NULL AND x.id IS NOT NULL THEN 'discarded'
			WHEN d.id IS NOT NULL AND d.holds_key
				 AND EXISTS (SELECT 1 FROM voutbox.deferred h
							  WHERE h.delivered_at IS NULL AND h.holds_key AND h.dead_reason IS NULL
								AND h.topic = d.topic AND h.msg_key = d.msg_key
								AND (h.batch_id, h.seq) < (d.batch_id, d.seq)) THEN 'held'
			WHEN d.id IS NOT NULL AND d.due_at > now() AND d.scheduled_for > now() THEN 'scheduled'
			WHEN d.id IS NOT NULL AND d.due_at > now() THEN 'held'
			WHEN d.id IS NOT NULL THEN 'pending'
			WHEN pg_visible_in_snapshot(e.txid, c.lo)
				 OR (c.hi IS NOT NULL AND pg_visible_in_snapshot(e.txid, c.hi)
					 AND e.seq <= c.done_seq) THEN 'delivered'
			ELSE 'pending' END AS status,
	   CASE WHEN q.id IS NULL AND d.delivered_at IS NULL AND d.dead_reason IS NULL
				 AND d.due_at > '-infinity'
			THEN d.due_at END AS next_attempt_at,
	   coalesce(q.error_code, d.last_error_code) AS last_error_code,
	   coalesce(q.moved_at, d.last_error_at) AS last_error_at
  FROM voutbox.retained_events e
 CROSS JOIN (SELECT lo, hi, done_seq FROM voutbox.batches
			  ORDER BY batch_id DESC LIMIT 1) c
  LEFT JOIN voutbox.deferred d ON d.id = e.id
  LEFT JOIN voutbox.dlq q ON q.id = e.id
  LEFT JOIN voutbox.discarded x ON x.id = e.id
 WHERE voutbox.acts_for(e.tenant_id);

CREATE OR REPLACE VIEW @extschema@.outbox_dlq_summary WITH (security_barrier) AS
SELECT tenant_id, event_type, topic, reason, error_code,
	   count(*) AS events,
	   min(moved_at) AS first_moved_at,
	   max(moved_at) AS last_moved_at,
	   (array_agg(last_error ORDER BY moved_at DESC))[1] AS last_error
  FROM voutbox.dlq
 WHERE voutbox.acts_for(tenant_id)
 GROUP BY tenant_id, event_type, topic, reason, error_code;

CREATE OR REPLACE VIEW @extschema@.outbox_stats WITH (security_barrier) AS
WITH cursor AS (
	SELECT lo, hi, done_seq FROM voutbox.batches ORDER BY batch_id DESC LIMIT 1
), waiting AS (
	SELECT e.tenant_id, e.topic, e.created_at, e.scheduled_for, 'pending' AS state
	  FROM voutbox.events e, cursor c
	 WHERE (e.txid >= pg_snapshot_xmax(c.lo)
			OR e.txid = ANY (ARRAY(SELECT pg_snapshot_xip(c.lo))))
	   AND NOT (c.hi IS NOT NULL AND pg_visible_in_snapshot(e.txid, c.hi)
				AND e.seq <= c.done_seq)
	   AND voutbox.acts_for(e.tenant_id)
	UNION ALL
	SELECT d.tenant_id, d.topic, d.created_at, d.scheduled_for,
		   CASE WHEN d.attempts > 0 THEN 'retrying'
				WHEN d.holds_key
					 AND EXISTS (SELECT 1 FROM voutbox.deferred h
								  WHERE h.delivered_at IS NULL AND h.holds_key AND h.dead_reason IS NULL
									AND h.topic = d.topic AND h.msg_key = d.msg_key
									AND (h.batch_id, h.seq) < (d.batch_id, d.seq)) THEN 'held'
				WHEN d.due_at > now() AND (d.scheduled_for IS NULL OR d.scheduled_for <= now())
				THEN 'held'
				ELSE 'pending' END
	  FROM voutbox.deferred d
	 WHERE d.delivered_at IS NULL AND d.dead_reason IS NULL
	   AND voutbox.acts_for(d.tenant_id)
), w AS (
	SELECT tenant_id, topic,
		   count(*) AS pending,
		   min(created_at) FILTER (WHERE scheduled_for IS NULL OR scheduled_for <= now()) AS oldest,
		   count(*) FILTER (WHERE state = 'retrying') AS retrying,
		   count(*) FILTER (WHERE state = 'held') AS held,
		   count(*) FILTER (WHERE scheduled_for > now()) AS scheduled
	  FROM waiting GROUP BY tenant_id, topic
), q AS (
	SELECT tenant_id, topic, count(*) AS dead,
		   max(moved_at) AS last_moved_at,
		   (array_agg(last_error ORDER BY moved_at DESC))[1] AS last_dead_error
	  FROM voutbox.dlq
	 WHERE voutbox.acts_for(tenant_id)
	 GROUP BY tenant_id, topic
), k AS (
	SELECT * FROM voutbox.topic_counters() t
	 WHERE CASE WHEN t.tenant_id IS NULL THEN voutbox.acts_for_all()
				ELSE voutbox.acts_for(t.tenant_id) END
)
SELECT tenant_id,
	   topic,
	   coalesce(w.pending, 0) AS pending,
	   now() - w.oldest AS oldest_pending_age,
	   coalesce(w.retrying, 0) AS waiting_for_retry,
	   coalesce(w.held, 0) AS held,
	   coalesce(w.scheduled, 0) AS scheduled,
	   coalesce(q.dead, 0) AS in_dlq,
	   coalesce(k.delivered, 0) AS delivered_since_start,
	   coalesce(k.failed_attempts, 0) AS failed_attempts_since_start,
	   coalesce(k.dead, 0) AS dead_since_start,
	   coalesce(k.last_error, q.last_dead_error) AS last_error,
	   CASE WHEN k.last_error IS NOT NULL THEN k.last_error_at
			ELSE q.last_moved_at END AS last_error_at,
	   (SELECT s.state FROM voutbox.worker_status() s) AS worker_state
  FROM w
  FULL JOIN q USING (tenant_id, topic)
  FULL JOIN k USING (tenant_id, topic);

/* ---------------------------------------------------------------------
 * What the administrator role may do; everything else is granted by the
 * extension's owner as needed (README, "Security").
 * ---------------------------------------------------------------------
 */
GRANT SELECT ON @extschema@.outbox, @extschema@.outbox_dlq, @extschema@.outbox_dlq_summary,
	@extschema@.outbox_stats, @extschema@.outbox_worker, @extschema@.outbox_tenants TO voutbox_admin;
GRANT UPDATE ON @extschema@.outbox_dlq TO voutbox_admin;
GRANT EXECUTE ON FUNCTION @extschema@.outbox_dlq_requeue(uuid),
	@extschema@.outbox_dlq_requeue_where(text, text, text, text, timestamptz, timestamptz,
										 timestamptz, timestamptz),
	@extschema@.outbox_dlq_discard(uuid),
	@extschema@.outbox_dlq_discard_where(text, text, text, text, timestamptz, timestamptz,
										 timestamptz, timestamptz),
	@extschema@.outbox_tenant_grant(text, regrole),
	@extschema@.outbox_tenant_revoke(text, name) TO voutbox_admin;
