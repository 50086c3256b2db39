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
