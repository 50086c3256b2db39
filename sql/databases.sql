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
