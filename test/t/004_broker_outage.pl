# The broker stopped (cleanly, then by kill -9) and restarted under load:
# nothing is lost, nothing phantom arrives, per-key order holds.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('outage');
kafka_create_topic($kafka, 'acme.counter.bumped.v1', 4);
my $node = voutbox_node('outage', $kafka, 'voutbox.batch_size' => '200');
my $script = counter_script($node, 30);

for my $mode ('term', 'kill')
{
	my $saved_before = $node->safe_psql('postgres', 'SELECT count(*) FROM outbox');
	my $bench = start_pgbench($node, $script, '-c', '4', '-j', '2', '-R', '400', '-t', '1000');

	# Some events get through, then the broker goes away mid-stream.
	wait_for_delivered($node, $saved_before + 300);
	kafka_stop($kafka, $mode);

	# The worker notices and waits; the application keeps saving.
	$node->poll_query_until('postgres',
		"SELECT query LIKE 'waiting for the broker%' FROM pg_stat_activity WHERE backend_type = 'voutbox worker'")
	  or die 'the worker did not wait for the broker';
	my $at_stop = $node->safe_psql('postgres', 'SELECT count(*) FROM outbox');
	$node->poll_query_until('postgres', "SELECT count(*) >= $at_stop + 500 FROM outbox")
	  or die 'saving stalled while the broker was down';
	pass("$mode: outbox_save goes on while the broker is down");

	$kafka = kafka_start('outage');
	ok(finish_pgbench($bench), "$mode: pgbench completed");

	my $total = $node->safe_psql('postgres', 'SELECT count(*) FROM outbox');
	is($total, $saved_before + 4000, "$mode: 4000 more events saved");
	wait_for_delivered($node, $total);
	pass("$mode: all delivered after the broker came back");
}

my @msgs = consume_all($kafka, 'acme.counter.bumped.v1');
check_same_events($node, \@msgs, 'true', 'outages');
check_key_order(\@msgs, 'n', 'per-key order holds through the outages');
is($node->safe_psql('postgres', 'SELECT count(*) FROM outbox_dlq'), '0', 'nothing dead-lettered');

$node->stop;
kafka_stop($kafka);
done_testing();
