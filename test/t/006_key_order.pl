# Per-key order with 8 concurrent writers: events of one key reach Kafka in
# the commit order of the transactions that saved them.  Writers bump a
# per-key counter under a row lock and save it, so commit order per key is
# the counter's order; several events in one transaction keep their order.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('order');
kafka_create_topic($kafka, 'acme.counter.bumped.v1', 8);
my $node = voutbox_node('order', $kafka, 'voutbox.batch_size' => '500');

$node->safe_psql('postgres',
	'CREATE TABLE counters (k int PRIMARY KEY, n int NOT NULL DEFAULT 0); '
	  . 'INSERT INTO counters (k) SELECT generate_series(1, 20)');

my $script = "$PostgreSQL::Test::Utils::tmp_check/bump.sql";
PostgreSQL::Test::Utils::append_to_file($script, <<'SQL');
\set k random(1, 20)
BEGIN;
SELECT pg_current_xact_id() \gset
UPDATE counters SET n = n + 2 WHERE k = :k RETURNING n \gset
SELECT outbox_save('acme', 'counter', :k::text, 'counter.bumped.v1', jsonb_build_object('n', :n - 1));
SELECT outbox_save('acme', 'counter', :k::text, 'counter.bumped.v1', jsonb_build_object('n', :n));
COMMIT;
SQL

# The writers take their transaction id before waiting for the row lock, so
# ids (and save order across keys) do not follow commit order.
$node->command_ok(
	[ 'pgbench', '-n', '-c', '8', '-j', '4', '-t', '250', '-f', $script,
	  '-h', $node->host, '-p', $node->port, 'postgres' ],
	'8 writers, 2000 transactions');

my $total = $node->safe_psql('postgres', 'SELECT sum(n) FROM counters');
is($total, 4000, '4000 events saved');
wait_for_delivered($node, $total);

my @msgs = consume_events($kafka, 'acme.counter.bumped.v1', $total);
check_key_order(\@msgs, 'n', 'per-key order holds');

# Each key's counter values arrive exactly once, none missing.
my $keys = by_key(@msgs);
my $complete = 1;
for my $k (keys %$keys)
{
	my @n = map { $_->{event}{payload}{n} } @{ $keys->{$k} };
	my $max = $node->safe_psql('postgres', "SELECT n FROM counters WHERE k = $k");
	$complete &&= "@n" eq join(' ', 1 .. $max);
}
ok($complete, 'every key received 1..n exactly once');

$node->stop;
kafka_stop($kafka);
done_testing();
