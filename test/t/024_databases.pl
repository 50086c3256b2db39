# Several databases: voutbox.database lists them, the launcher runs a
# delivery worker for each, starts and stops them on reload, and one
# database's trouble (missing, without the extension, dropped) never holds
# up the others.  Each worker is woken by its own database's commits, counts
# in its own row of outbox_worker, and delivers only its own events.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('databases');
# A long poll interval: delivery within the deadline needs the wake-up of
# the right worker.  "Billing" is quoted: names are taken as they are.
my $node = voutbox_node('databases', $kafka,
	'voutbox.database' => 'postgres, "Billing", plain, ghost',
	'voutbox.poll_interval' => '10min');
$node->safe_psql('postgres', 'CREATE DATABASE "Billing"; CREATE DATABASE plain');
$node->safe_psql('Billing', 'CREATE EXTENSION voutbox');

sub workers
{
	return $node->safe_psql('postgres',
		"SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_stat_activity WHERE backend_type = 'voutbox worker'");
}

sub state_of
{
	my ($db) = @_;
	return $node->safe_psql('postgres', "SELECT state FROM outbox_worker WHERE database = '$db'");
}

# The databases created after the server started are found within the
# launcher's recheck; the missing one is waited for.
$node->poll_query_until('postgres',
	"SELECT string_agg(datname, ',' ORDER BY datname) = 'Billing,plain,postgres' FROM pg_stat_activity WHERE backend_type = 'voutbox worker'")
  or die 'not one worker per existing database: ' . workers();
pass('one worker per listed database that exists');
$node->poll_query_until('postgres', "SELECT state = 'not installed' FROM outbox_worker WHERE database = 'plain'")
  or die 'plain: ' . state_of('plain');
pass('a database without the extension waits for it');
is(state_of('ghost'), 'waiting for database', 'a missing database is waited for');

# Both databases deliver, each its own events, woken by its own commits.
$node->safe_psql('postgres', save_sql('acme', 'order.paid.v1', 'p1', { db => 'postgres' }));
$node->safe_psql('Billing', save_sql('bill', 'invoice.sent.v1', 'b1', { db => 'Billing' }));
$node->safe_psql('Billing', save_sql('bill', 'invoice.sent.v1', 'b2', { db => 'Billing' }));
my @p = consume_events($kafka, 'acme.order.paid.v1', 1);
my @b = consume_events($kafka, 'bill.invoice.sent.v1', 2);
is_deeply([ sort map { $_->{event}{aggregate_id} } @b ], [ 'b1', 'b2' ], 'Billing delivered its events');
is($p[0]{event}{payload}{db}, 'postgres', 'postgres delivered its event');
$node->poll_query_until('Billing', "SELECT count(*) = 2 FROM outbox WHERE status = 'delivered'")
  or die 'Billing events not settled';
wait_for_delivered($node, 1);

# Counters per database: each worker's row, each database's topics.
is($node->safe_psql('postgres', "SELECT delivered FROM outbox_worker WHERE database = 'postgres'"), '1',
	'postgres worker counted its event');
is($node->safe_psql('postgres', "SELECT delivered FROM outbox_worker WHERE database = 'Billing'"), '2',
	'Billing worker counted its two');
is($node->safe_psql('Billing', 'SELECT string_agg(topic, \',\') FROM outbox_stats'), 'bill.invoice.sent.v1',
	"Billing's outbox_stats shows its own topics only");
is($node->safe_psql('Billing', 'SELECT worker_state FROM outbox_stats'), 'idle',
	"outbox_stats shows its own database's worker");

# A role that may read the stats sees every database's worker; one that
# administers the outbox but not the server sees its own database's only.
$node->safe_psql('Billing',
	'CREATE ROLE ops LOGIN IN ROLE voutbox_admin; CREATE ROLE mon LOGIN IN ROLE voutbox_admin, pg_read_all_stats');
is($node->safe_psql('Billing', 'SET ROLE ops; SELECT string_agg(database, \',\') FROM outbox_worker'),
	'Billing', 'without pg_read_all_stats: its own database only');
is($node->safe_psql('Billing', 'SET ROLE mon; SELECT string_agg(database, \',\' ORDER BY database) FROM outbox_worker'),
	'Billing,ghost,plain,postgres', 'with pg_read_all_stats: every listed database');

# Reload without Billing: its worker stops, the others go on; its events
# wait, and go once it is listed again.
$node->append_conf('postgresql.conf', "voutbox.database = 'postgres, plain, ghost'");
$node->reload;
$node->poll_query_until('postgres',
	"SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE backend_type = 'voutbox worker' AND datname = 'Billing')")
  or die 'Billing worker still runs: ' . workers();
pass('unlisted on reload: its worker stops');
$node->poll_query_until('postgres', "SELECT NOT EXISTS (SELECT FROM outbox_worker WHERE database = 'Billing')")
  or die 'Billing still in outbox_worker';
pass('and it leaves outbox_worker');
is($node->safe_psql('Billing', "SELECT state FROM outbox_worker WHERE database = 'Billing'"), 'disabled', 'Billing says it is not served');
$node->safe_psql('Billing', save_sql('bill', 'invoice.sent.v1', 'b3', {}));
$node->safe_psql('postgres', save_sql('acme', 'order.paid.v1', 'p2', {}));
wait_for_delivered($node, 2);
pass('postgres delivers meanwhile');
is($node->safe_psql('Billing', "SELECT status FROM outbox WHERE aggregate_id = 'b3'"), 'pending',
	"Billing's new event waits");

$node->append_conf('postgresql.conf', "voutbox.database = 'postgres, \"Billing\", plain, ghost'");
$node->reload;
$node->poll_query_until('Billing', "SELECT status = 'delivered' FROM outbox WHERE aggregate_id = 'b3'")
  or die 'b3 not delivered after Billing was listed again';
pass('listed again: its worker starts and delivers what waited');

# The missing database appears: its worker starts by itself.
$node->safe_psql('postgres', 'CREATE DATABASE ghost');
$node->safe_psql('ghost', 'CREATE EXTENSION voutbox');
$node->safe_psql('ghost', save_sql('ghost', 'boo.said.v1', 'g1', {}));
$node->poll_query_until('ghost', "SELECT status = 'delivered' FROM outbox WHERE aggregate_id = 'g1'")
  or die 'ghost event not delivered';
pass('a database created later is served');

# Dropped under its worker (FORCE ends the worker's session): the others
# go on, and it is waited for again.
$node->safe_psql('postgres', 'DROP DATABASE ghost WITH (FORCE)');
$node->poll_query_until('postgres', "SELECT state = 'waiting for database' FROM outbox_worker WHERE database = 'ghost'")
  or die 'ghost: ' . state_of('ghost');
pass('a dropped database is waited for again');
$node->safe_psql('postgres', save_sql('acme', 'order.paid.v1', 'p3', {}));
$node->safe_psql('Billing', save_sql('bill', 'invoice.sent.v1', 'b4', {}));
wait_for_delivered($node, 3);
$node->poll_query_until('Billing', "SELECT count(*) = 4 FROM outbox WHERE status = 'delivered'")
  or die 'Billing stopped delivering';
pass('the other databases deliver after the drop');

# Exactly what each database committed, once each (no crash here).
my @all = consume_all($kafka, 'acme.order.paid.v1,bill.invoice.sent.v1,ghost.boo.said.v1');
my %ids;
$ids{ $_->{event}{id} }++ for @all;
my %db;
for my $d ('postgres', 'Billing')
{
	$db{$_}++ for split /\n/, $node->safe_psql($d, 'SELECT id FROM outbox');
}
is(scalar(@all), 3 + 4 + 1, 'every event once');
is(scalar(grep { !$ids{$_} } keys %db), 0, 'no committed event lost');

$node->stop;
kafka_stop($kafka);
done_testing();
