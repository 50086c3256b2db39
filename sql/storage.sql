-- The storage: insert-only on the hot path.
CREATE EXTENSION voutbox;

SELECT slot, state FROM voutbox.ring ORDER BY slot;
SELECT lo, hi, done_seq, reach, events FROM voutbox.batches;

SELECT count(outbox_save('acme', 'lead', g::text, 'lead.created.v1', jsonb_build_object('g', g)))
  FROM generate_series(1, 100) g;

-- Saving only inserts: no row of the event storage or the cursor is updated
-- or deleted, so no dead tuples appear however long a snapshot is held.
SELECT pg_stat_force_next_flush();
SELECT relname, n_tup_ins, n_tup_upd, n_tup_del, n_tup_hot_upd
  FROM pg_stat_user_tables WHERE schemaname = 'voutbox' ORDER BY relname;

-- Events go to the current table of the ring.
SELECT tableoid::regclass, count(*) FROM voutbox.events GROUP BY 1;

-- Everything is pending: no worker runs in this instance.
SELECT status, count(*) FROM outbox GROUP BY status;

-- The user-facing relations live in the extension's schema; storage in "voutbox".
SELECT c.relname, n.nspname, c.relkind
  FROM pg_depend d JOIN pg_class c ON c.oid = d.objid JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'voutbox')
   AND d.classid = 'pg_class'::regclass
 ORDER BY n.nspname, c.relname;

-- DROP EXTENSION removes it all.
DROP EXTENSION voutbox;
SELECT count(*) AS voutbox_schemas FROM pg_namespace WHERE nspname = 'voutbox';

-- Commit positions: one per committed transaction that saved an event; a
-- savepoint rolled back takes its events' position with it.
CREATE EXTENSION voutbox;
BEGIN;
SAVEPOINT s;
SELECT outbox_save('acme', 'lead', 'sp', 'lead.created.v1', '{}') IS NOT NULL AS saved;
ROLLBACK TO s;
COMMIT;
SELECT count(*) AS positions FROM voutbox.commit_order;
BEGIN;
SELECT outbox_save('acme', 'lead', 'sp', 'lead.created.v1', '{}') IS NOT NULL AS saved;
SAVEPOINT s;
SELECT outbox_save('acme', 'lead', 'sp', 'lead.created.v1', '{}') IS NOT NULL AS saved;
ROLLBACK TO s;
COMMIT;
SELECT count(*) AS positions, count(*) FILTER (WHERE e.txid IS NOT NULL) AS of_saved_events
  FROM voutbox.commit_order c
  LEFT JOIN LATERAL (SELECT e.txid FROM voutbox.events e WHERE e.txid = c.txid LIMIT 1) e ON true;

-- The position is written as the extension's owner, into the extension's
-- own table only: look-alikes made in the same transaction after a DROP
-- EXTENSION are never written to (their trigger would say so).
BEGIN;
SELECT outbox_save('acme', 'lead', 'x', 'lead.created.v1', '{}') IS NOT NULL AS saved;
DROP EXTENSION voutbox;
CREATE SCHEMA voutbox;
CREATE TABLE voutbox.commit_order_0 (txid xid8, commit_seq bigint);
CREATE TABLE voutbox.commit_order_1 (txid xid8, commit_seq bigint);
CREATE TABLE voutbox.commit_order_2 (txid xid8, commit_seq bigint);
CREATE SEQUENCE voutbox.commit_seq;
CREATE FUNCTION voutbox.hijacked() RETURNS trigger LANGUAGE plpgsql
	AS $$ BEGIN RAISE NOTICE 'look-alike written to as %', current_user; RETURN NEW; END $$;
CREATE TRIGGER t BEFORE INSERT ON voutbox.commit_order_0 FOR EACH ROW EXECUTE FUNCTION voutbox.hijacked();
CREATE TRIGGER t BEFORE INSERT ON voutbox.commit_order_1 FOR EACH ROW EXECUTE FUNCTION voutbox.hijacked();
CREATE TRIGGER t BEFORE INSERT ON voutbox.commit_order_2 FOR EACH ROW EXECUTE FUNCTION voutbox.hijacked();
COMMIT;
SELECT (SELECT count(*) FROM voutbox.commit_order_0) + (SELECT count(*) FROM voutbox.commit_order_1)
	   + (SELECT count(*) FROM voutbox.commit_order_2) AS look_alike_rows;
DROP SCHEMA voutbox CASCADE;
