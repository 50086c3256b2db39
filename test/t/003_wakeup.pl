# The commit of a transaction that saved events wakes the worker: delivery
# does not wait for voutbox.poll_interval, set here to ten minutes.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use VoutboxTest;

my $kafka = kafka_start('wakeup');
my $node = voutbox_node('wakeup', $kafka, 'voutbox.poll_interval' => '10min');

# Warm up: the topic exists and the worker sleeps.
$node->safe_psql('postgres', save_sql('acme', 'ping.sent.v1', 'warmup', { n => 0 }));
wait_for_delivered($node, 1);
$node->poll_query_until('postgres',
	"SELECT query = 'waiting for events' FROM pg_stat_activity WHERE backend_type = 'voutbox worker'")
  or die 'worker not idle';

for my $i (1 .. 3)
{
	my $start = time;
	$node->safe_psql('postgres', save_sql('acme', 'ping.sent.v1', "p$i", { n => $i }));
	# Poll quickly, with a deadline far below the poll interval.
	my $delivered = 0;
	while (time - $start < 60)
	{
		$delivered = $node->safe_psql('postgres',
			"SELECT count(*) FROM outbox WHERE aggregate_id = 'p$i' AND status = 'delivered'");
		last if $delivered;
	}
	ok($delivered, "event $i delivered without waiting for the poll interval");
	note(sprintf('commit to settled: %.0f ms', (time - $start) * 1000));
}

# A transaction that saved nothing does not wake the worker needlessly, and
# one that rolled back neither; the worker stays asleep.
my $before = $node->safe_psql('postgres', 'SELECT count(*) FROM voutbox.batches');
$node->safe_psql('postgres', 'CREATE TABLE t (x int); INSERT INTO t VALUES (1)');
$node->safe_psql('postgres', 'BEGIN; ' . save_sql('acme', 'ping.sent.v1', 'rb', {}) . '; ROLLBACK');
is($node->safe_psql('postgres', 'SELECT count(*) FROM voutbox.batches'), $before,
	'no batch for transactions without committed events');

my @msgs = consume_events($kafka, 'acme.ping.sent.v1', 4);
is(scalar(@msgs), 4, 'all pings in Kafka');

$node->stop;
kafka_stop($kafka);
done_testing();
