# A hostile application role that owns its database (CREATE DATABASE app
# OWNER app, as PostgreSQL 15 makes it easy) tries every way it has to get
# code of its choosing run by the worker: look-alike functions and operators
# in public and in a schema it puts first on the database's search_path,
# database defaults (search_path, role, read-only transactions, timeouts,
# the meaning of SQL), triggers and rules on what the worker writes, a
# renamed schema.  Meanwhile it saves events, a failure sends one to the
# DLQ, it administers the DLQ, retention runs, it reads the views.  It must
# gain nothing: it is no superuser at the end, and each of its traps ran
# only as itself (every trap logs who ran it, whatever the transaction
# does); delivery goes on throughout.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('hostile', 'auto.create.topics.enable=false');
kafka_create_topic($kafka, 'acme.lead.created.v1', 2);
my $node = PostgreSQL::Test::Cluster->new('hostile');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf('postgresql.conf', <<"EOC");
shared_preload_libraries = 'voutbox'
voutbox.database = 'app'
# (its missing topic stays missing: voutbox does not create it)
voutbox.create_topics = off
voutbox.brokers = '$kafka->{brokers}'
voutbox.delivery_timeout = '1s'
voutbox.backoff_base = '100ms'
voutbox.max_retries = 1
voutbox.retention = '2s'
voutbox.cleanup_interval = '200ms'
EOC
$node->start;

# The test's own superuser sessions must not fall into the traps either:
# every connection it makes overrides the database's defaults.
$ENV{PGOPTIONS} = join(' ', map { "-c $_" } 'role=none', 'search_path=pg_catalog',
	'default_transaction_read_only=off', 'statement_timeout=0', 'lock_timeout=0',
	'idle_in_transaction_session_timeout=0', 'transform_null_equals=off',
	'default_transaction_isolation=read\ committed');
$node->safe_psql('postgres', 'CREATE ROLE app LOGIN');
$node->safe_psql('postgres', 'CREATE DATABASE app OWNER app');

# As the application role, with its database's defaults (but for those
# that would stop it from working at all).
sub as_app
{
	my ($sql, %opts) = @_;
	local $ENV{PGOPTIONS} = join(' ', map { "-c $_" } 'default_transaction_read_only=off',
		'statement_timeout=0', 'lock_timeout=0', 'idle_in_transaction_session_timeout=0');
	return $node->psql('app', $sql, extra_params => [ '-U', 'app' ], %opts);
}

sub as_app_ok
{
	my ($sql) = @_;
	my ($rc, $out, $err) = as_app($sql);
	die "as app: $sql: $err" if $rc != 0;
	return $out;
}

# --- The traps.  Each logs who runs it, and makes app a superuser if it
# can.  They delegate to the real thing, so that nothing else changes.
as_app_ok(q{
CREATE TABLE public.trap_log (who name, session_who name, trap text);
GRANT INSERT ON public.trap_log TO PUBLIC;
CREATE FUNCTION public.trap(t text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
	RAISE LOG 'TRAP % ran as %', t, current_user;
	BEGIN
		INSERT INTO public.trap_log VALUES (current_user, session_user, t);
		IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
			EXECUTE 'ALTER ROLE app SUPERUSER';
		END IF;
	EXCEPTION WHEN OTHERS THEN
		RAISE LOG 'TRAP % could not act: %', t, SQLERRM;
	END;
END $$;
CREATE SCHEMA evil;
});

# --- Traps for the extension's own scripts, before a superuser installs it
# (an exact match in public beats a built-in that needs a cast, or a
# polymorphic one): operators the update script could use, and an aggregate
# its views could bind to.
as_app_ok(q{
CREATE FUNCTION public.trap_oid_eq(a oid, b integer) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN PERFORM public.trap('public.= on oid, integer'); RETURN a OPERATOR(pg_catalog.=) b::oid; END $$;
CREATE OPERATOR public.= (LEFTARG = oid, RIGHTARG = integer, FUNCTION = public.trap_oid_eq);
CREATE FUNCTION public.trap_oid_regclass(a oid, b regclass) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN PERFORM public.trap('public.= on oid, regclass'); RETURN a OPERATOR(pg_catalog.=) b::oid; END $$;
CREATE OPERATOR public.= (LEFTARG = oid, RIGHTARG = regclass, FUNCTION = public.trap_oid_regclass);
CREATE FUNCTION public.trap_agg(s text[], v text) RETURNS text[]
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN PERFORM public.trap('public.array_agg(text)'); RETURN array_append(s, v); END $$;
CREATE AGGREGATE public.array_agg(text) (SFUNC = public.trap_agg, STYPE = text[]);
});

# A superuser installs voutbox with the default search_path, grants what an
# application that also administers its DLQ would get, and looks at the
# statistics.
{
	local $ENV{PGOPTIONS} = '';
	$node->safe_psql('app', 'CREATE EXTENSION voutbox');
}
$node->safe_psql('app', q{
	GRANT SELECT ON public.outbox, public.outbox_dlq, public.outbox_stats, public.outbox_worker TO app;
	GRANT UPDATE ON public.outbox_dlq TO app;
	GRANT EXECUTE ON FUNCTION public.outbox_dlq_requeue(uuid), public.outbox_dlq_discard(uuid) TO app});
$node->safe_psql('app', 'SELECT * FROM public.outbox_stats; SELECT * FROM public.outbox_dlq_summary');
is($node->safe_psql('postgres', "SELECT rolsuper FROM pg_roles WHERE rolname = 'app'"), 'f',
	'installing the extension ran none of the traps planted before');

my @lookalikes = (
	[ 'now()', 'timestamptz', 'pg_catalog.now()' ],
	[ 'make_interval(secs int)', 'interval', 'pg_catalog.make_interval(secs => secs)' ],
	[ 'pg_current_snapshot()', 'pg_snapshot', 'pg_catalog.pg_current_snapshot()' ],
	[ 'pg_snapshot_xmax(s pg_snapshot)', 'xid8', 'pg_catalog.pg_snapshot_xmax(s)' ],
	[ 'pg_visible_in_snapshot(x xid8, s pg_snapshot)', 'boolean', 'pg_catalog.pg_visible_in_snapshot(x, s)' ],
	[ 'clock_timestamp()', 'timestamptz', 'pg_catalog.clock_timestamp()' ],
	[ 'nextval(r regclass)', 'bigint', 'pg_catalog.nextval(r)' ],
	[ 'pg_current_xact_id()', 'xid8', 'pg_catalog.pg_current_xact_id()' ]);
for my $schema ('public', 'evil')
{
	for my $f (@lookalikes)
	{
		my ($sig, $ret, $real) = @$f;
		my ($name) = $sig =~ /^(\w+)/;
		as_app_ok("CREATE FUNCTION $schema.$sig RETURNS $ret LANGUAGE plpgsql "
			  . "SET search_path = pg_catalog AS \$\$ BEGIN PERFORM public.trap('$schema.$name'); "
			  . "RETURN $real; END \$\$");
	}
	as_app_ok(qq{
		CREATE FUNCTION $schema.pg_snapshot_xip(s pg_snapshot) RETURNS SETOF xid8
		LANGUAGE plpgsql SET search_path = pg_catalog AS \$\$
		BEGIN PERFORM public.trap('$schema.pg_snapshot_xip'); RETURN QUERY SELECT pg_catalog.pg_snapshot_xip(s); END \$\$;
		CREATE FUNCTION $schema.trap_ge(a xid8, b xid8) RETURNS boolean
		LANGUAGE plpgsql SET search_path = pg_catalog AS \$\$
		BEGIN PERFORM public.trap('$schema.>= on xid8'); RETURN a OPERATOR(pg_catalog.>=) b; END \$\$;
		CREATE OPERATOR $schema.>= (LEFTARG = xid8, RIGHTARG = xid8, FUNCTION = $schema.trap_ge);
	});
	for my $type ('uuid', 'text', 'integer', 'bigint', 'name')
	{
		as_app_ok(qq{
			CREATE FUNCTION $schema.trap_eq(a $type, b $type) RETURNS boolean
			LANGUAGE plpgsql SET search_path = pg_catalog AS \$\$
			BEGIN PERFORM public.trap('$schema.= on $type'); RETURN a OPERATOR(pg_catalog.=) b; END \$\$;
			CREATE OPERATOR $schema.= (LEFTARG = $type, RIGHTARG = $type, FUNCTION = $schema.trap_eq);
		});
	}
}
pass('look-alike functions and operators planted in public and in evil');

# --- Database defaults, in two steps: first its own schemas before
# pg_catalog (the worker would run its look-alikes), later the settings that
# would make the worker act as app or fail (read-only transactions, timeouts,
# other meanings of SQL).
as_app_ok("ALTER DATABASE app SET search_path = evil, public, pg_catalog");
my @defaults = (
	"role = app", 'default_transaction_read_only = on',
	"statement_timeout = '10ms'", "lock_timeout = '1ms'", "idle_in_transaction_session_timeout = '10ms'",
	'default_transaction_isolation = serializable', 'transform_null_equals = on',
	'standard_conforming_strings = off', "TimeZone = 'Pacific/Chatham'", "DateStyle = 'SQL, DMY'",
	'IntervalStyle = sql_standard', "work_mem = '64kB'", 'synchronous_commit = off');

# What it may not do at all.
my %refused = (
	'a setting of the worker' => [ "ALTER DATABASE app SET voutbox.topic_template = 'x'", qr/permission denied/ ],
	'a superuser setting' => [ 'ALTER DATABASE app SET session_replication_role = replica', qr/permission denied/ ],
	'a temp file limit' => [ 'ALTER DATABASE app SET temp_file_limit = 0', qr/permission denied/ ],
	'a trigger on the DLQ view' => [
		'CREATE FUNCTION public.t() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM public.trap(\'trigger\'); RETURN NEW; END $$; '
		  . 'CREATE TRIGGER t INSTEAD OF INSERT ON public.outbox_dlq FOR EACH ROW EXECUTE FUNCTION public.t()',
		qr/must be owner|permission denied/ ],
	'a trigger on the storage' => [
		'CREATE TRIGGER t BEFORE INSERT ON voutbox.dlq FOR EACH ROW EXECUTE FUNCTION public.t()',
		qr/permission denied for schema voutbox/ ],
	'a rule on the storage' => [
		'CREATE RULE r AS ON INSERT TO voutbox.deferred DO ALSO SELECT public.trap(\'rule\')',
		qr/permission denied for schema voutbox/ ],
	'an object in the storage schema' => [
		'CREATE FUNCTION voutbox.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT pg_catalog.now() $$',
		qr/permission denied for schema voutbox/ ],
	'an event trigger' => [
		'CREATE EVENT TRIGGER e ON ddl_command_start EXECUTE FUNCTION public.t()',
		qr/permission denied|must be superuser/ ],
	'dropping the storage' => [ 'DROP TABLE voutbox.batches', qr/permission denied|must be owner/ ],
	'the bindings' => [ "SELECT public.outbox_tenant_grant('acme', 'app')", qr/permission denied for function/ ]);
for my $what (sort keys %refused)
{
	my ($rc, $out, $err) = as_app($refused{$what}[0]);
	like($err, $refused{$what}[1], "refused: $what");
}

# The worker reconnects and meets the defaults of the database.
sub new_worker
{
	my $old_pid = $node->safe_psql('app', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'voutbox worker'");
	$node->safe_psql('app', "SELECT pg_terminate_backend($old_pid)") if $old_pid;
	$node->poll_query_until('app',
		"SELECT state = 'idle' AND pid <> " . ($old_pid || 0) . " FROM public.outbox_worker")
	  or die 'the worker did not come back';
	return;
}
new_worker();
ok($node->log_contains(qr/voutbox: the delivery worker ignores 1 setting of database "app"/),
	'the worker says it ignores the search_path of the database');

# --- The application saves, with the defaults of its database.
sub save
{
	my ($agg, $type) = @_;
	as_app_ok("SET default_transaction_read_only = off; SET statement_timeout = 0; "
		  . "SELECT outbox_save('acme', 'lead', '$agg', '$type', '{\"n\": 1}')");
}
save("l$_", 'lead.created.v1') for 1 .. 5;
save('m1', 'lead.missing.v1');    # a topic that does not exist: retried, then dead
$node->poll_query_until('app', "SELECT count(*) = 5 FROM public.outbox WHERE status = 'delivered'")
  or die 'not delivered';
pass('events saved by the hostile role are delivered');
$node->poll_query_until('app', "SELECT count(*) = 1 FROM public.outbox_dlq")
  or die 'the failing event did not reach the DLQ';
pass('a failing event is retried and moved to the DLQ');
# A superuser looks at the statistics: their aggregates are the built-in ones.
$node->safe_psql('app', 'SELECT * FROM public.outbox_stats; SELECT * FROM public.outbox_dlq_summary');
# (All of the topic: a timeout of delivery_timeout's 1 s may have sent some twice.)
my @msgs = consume_all($kafka, 'acme.lead.created.v1');
is(scalar(keys %{ { map { $_->{event}{id} => 1 } @msgs } }), 5, 'the five events are in Kafka');

# --- The rest of the defaults: the worker would act as app, in read-only
# transactions, with timeouts; it ignores them all and goes on.
as_app_ok("ALTER DATABASE app SET $_") for @defaults;
new_worker();
ok($node->log_contains(qr/voutbox: the delivery worker ignores @{[ scalar(@defaults) + 1 ]} settings of database "app"/),
	'the worker says it ignores every default of the database: ' . (scalar(@defaults) + 1));

# --- It administers the DLQ and reads the views, as itself.
my $dead = $node->safe_psql('app', 'SELECT id FROM public.outbox_dlq');
as_app_ok("UPDATE public.outbox_dlq SET payload = '{\"n\": 2}'");
kafka_create_topic($kafka, 'acme.lead.missing.v1', 1);
is(as_app_ok("SELECT public.outbox_dlq_requeue('$dead')"), '1', 'the DLQ is administered');
$node->poll_query_until('app', "SELECT status = 'delivered' FROM public.outbox WHERE id = '$dead'")
  or die 'the requeued event was not delivered';
pass('the requeued event is delivered');
like(as_app_ok('SELECT count(*) FROM public.outbox; SELECT count(*) FROM public.outbox_stats; '
	  . 'SELECT count(*) FROM public.outbox_dlq; SELECT state FROM public.outbox_worker'),
	qr/idle|delivering/, 'it reads the views');

# --- Retention runs (tables truncated, history trimmed) meanwhile.
$node->poll_query_until('app', "SELECT count(*) = 0 FROM voutbox.events WHERE aggregate_id LIKE 'l%'")
  or die 'retention did not run';
pass('retention truncated the delivered events');

# --- Last, it renames the schema of the API and puts a fake one in its
# place, with a trigger on a fake outbox_dlq; more events, one more failure.
as_app_ok(q{
	SET default_transaction_read_only = off;
	ALTER SCHEMA public RENAME TO public_old;
	CREATE SCHEMA public;
	CREATE TABLE public.outbox_dlq AS SELECT * FROM public_old.outbox_dlq WITH NO DATA;
	CREATE FUNCTION public.t() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN PERFORM public_old.trap('fake outbox_dlq'); RETURN NEW; END $$;
	CREATE TRIGGER t BEFORE INSERT OR DELETE ON public.outbox_dlq FOR EACH ROW EXECUTE FUNCTION public.t();
	CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql SET search_path = pg_catalog AS $$
		BEGIN PERFORM public_old.trap('new public.now'); RETURN pg_catalog.now(); END $$;
});
as_app_ok("SET default_transaction_read_only = off; SET statement_timeout = 0; "
	  . "SELECT public_old.outbox_save('acme', 'lead', 'l6', 'lead.created.v1', '{}'), "
	  . "public_old.outbox_save('acme', 'lead', 'x1', 'lead.nowhere.v1', '{}')");
# (l6 first: delivered at once, it is truncated with its table 2 s later,
# while x1 is still being retried.)
$node->poll_query_until('app', "SELECT status = 'delivered' FROM public_old.outbox WHERE aggregate_id = 'l6'")
  or die 'not delivered after the schema was renamed';
$node->poll_query_until('app', "SELECT count(*) = 1 FROM public_old.outbox_dlq WHERE aggregate_id = 'x1'")
  or die 'the last failing event did not reach the DLQ';
pass('delivery and the DLQ work after the schema of the API was renamed');

# --- It closes its database to connections (as its owner may): the worker
# still connects, and delivers what was committed (an event scheduled for
# after the restart, so that the new worker is the one that sends it).
kafka_create_topic($kafka, 'acme.lead.closed.v1', 1);
my $later = $node->safe_psql('postgres', "SELECT now() + interval '8 seconds'");
as_app_ok("SET default_transaction_read_only = off; SET statement_timeout = 0; "
	  . "SELECT public_old.outbox_save('acme', 'lead', 'c1', 'lead.closed.v1', '{}', "
	  . "scheduled_for => '$later')");
my $old_worker = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'voutbox worker'");
# (From another database, as PostgreSQL requires.)
$node->safe_psql('postgres', 'SET ROLE app; ALTER DATABASE app ALLOW_CONNECTIONS false');
$node->safe_psql('postgres', "SELECT pg_terminate_backend($old_worker)");
$node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'voutbox worker' "
	  . "AND datname = 'app' AND pid <> $old_worker")
  or die 'the worker did not connect to the closed database';
pass('the worker connects to a database closed to connections');
my @closed = consume_events($kafka, 'acme.lead.closed.v1', 1);
is($closed[0]{event}{aggregate_id}, 'c1', 'it delivers what was committed there');
$node->safe_psql('postgres', 'ALTER DATABASE app ALLOW_CONNECTIONS true');

# --- It gained nothing.
is($node->safe_psql('postgres', "SELECT rolsuper FROM pg_roles WHERE rolname = 'app'"), 'f',
	'the hostile role is not a superuser');
my $ran = $node->safe_psql('app',
	"SELECT coalesce(string_agg(DISTINCT who || ' ' || trap, ', '), '') FROM public_old.trap_log WHERE who <> 'app'");
is($ran, '', 'no trap ran as anyone but the hostile role');
my @foreign = slurp_file($node->logfile) =~ /TRAP (.*) ran as (?!app\b)(\w+)/g;
is(scalar(@foreign), 0, 'the server log shows no trap run as another role')
  or diag("traps: @foreign");
my $own = $node->safe_psql('app', 'SELECT count(*) FROM public_old.trap_log');
note("traps the hostile role fell into itself: $own");
ok($node->log_contains('voutbox: delivery worker started for database "app"'), 'the worker runs');
unlike(slurp_file($node->logfile), qr/voutbox worker.*exited with exit code [1-9]|terminated by signal/,
	'the worker never failed');

$node->stop;
kafka_stop($kafka);
done_testing();
