-- voutbox.database lists the databases whose outbox is delivered: its
-- syntax is checked when it is set, and outbox_worker shows this database
-- as "disabled" when it is not listed (as here: no worker runs in this
-- temporary instance).
CREATE EXTENSION IF NOT EXISTS voutbox;

SELECT database = current_database() AS this_database, pid, state, rounds FROM outbox_worker;
SELECT worker_state FROM outbox_stats;

-- Well-formed lists: names as they are (no case folding), quoted when they
-- hold commas, blanks or quotes.
ALTER SYSTEM SET voutbox.database = 'app';
ALTER SYSTEM SET voutbox.database = 'app, Billing ,  "with, comma", "say ""hi"""';
ALTER SYSTEM SET voutbox.database = '';

-- Malformed ones are refused, and say why.
\set VERBOSITY default
ALTER SYSTEM SET voutbox.database = 'app,,billing';
ALTER SYSTEM SET voutbox.database = 'app,';
ALTER SYSTEM SET voutbox.database = 'app, billing, app';
ALTER SYSTEM SET voutbox.database = '"app';
ALTER SYSTEM SET voutbox.database = '"app" billing';
ALTER SYSTEM SET voutbox.database = 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa';
ALTER SYSTEM RESET voutbox.database;
\set VERBOSITY terse

-- Between the new library's start and ALTER EXTENSION UPDATE, the 0.4.0 SQL
-- objects still work with it (their one-row worker_status()).
DROP EXTENSION voutbox CASCADE;
CREATE EXTENSION voutbox VERSION '0.4.0';
SELECT pid, state, rounds FROM outbox_worker;
SELECT count(*) FROM outbox_stats;
ALTER EXTENSION voutbox UPDATE;
SELECT database = current_database() AS this_database, state FROM outbox_worker;
