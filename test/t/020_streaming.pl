# Streaming delivery: the worker reads and sends the next rounds while
# earlier ones are in flight, rather than waiting for every report of a
# round before reading the next.  With 400 ms of round-trip latency on the
# broker (librdkafka's mock cluster) and events committed every 20 ms, a
# lock-step worker never has more than one round in flight; this one must
# have several (pg_stat_activity says how many).  Then the broker stops
# answering while rounds are in flight: their events time out together, are
# settled together, and go again (retried with backoff) in order, while
# events of other keys flow.  Every case: no loss, no phantom, per-key
# order.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $mock = mock_start(brokers => 1);
mock_cmd($mock, "create-topic acme.counter.bumped.v1 4");
my $node = voutbox_node('stream', $mock,
	# rounds of at most 10 events (a quarter of batch_size)
	'voutbox.batch_size' => '40',
	'voutbox.delivery_timeout' => '1s',
	'voutbox.backoff_base' => '100ms',
	'voutbox.max_retries' => '1000',
	'voutbox.kafka_properties' => 'socket.connection.setup.timeout.ms=5000; reconnect.backoff.max.ms=1000');
$node->safe_psql('postgres', save_sql('acme', 'counter.bumped.v1', 'warmup', { n => 0 }));
wait_for_delivered($node, 1);
my $script = counter_script($node, 3);

# The most rounds the worker had in flight, as it says in pg_stat_activity.
sub in_flight
{
	return $node->safe_psql('postgres',
		"SELECT coalesce((regexp_match(query, '(\\d+) rounds in flight'))[1]::int, 0) "
		  . "FROM pg_stat_activity WHERE backend_type = 'voutbox worker'") || 0;
}

# --- Several rounds in flight.
mock_cmd($mock, 'rtt -1 400');
my $run = start_pgbench($node, $script, '-c', '1', '-R', '50', '-t', '150');
my $most = 0;
my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
while (time < $deadline && $most < 3)
{
	my $n = in_flight();
	$most = $n if $n > $most;
}
ok($most >= 3, "several rounds in flight at once (saw $most)");
finish_pgbench($run);
mock_cmd($mock, 'rtt -1 0');
wait_for_delivered($node, 151);

# --- The broker stops answering while rounds are in flight: the events of
# all of them time out together, and go again, in order.  Over 200 keys, so
# that after the timeouts, rounds carry both events sent (of keys that did
# not fail) and events held behind a retry (of keys that did): a retry
# settled before such a round must not release its key to the rounds read
# after it.
my $many = counter_script($node, 200);
mock_cmd($mock, 'rtt -1 300');
$run = start_pgbench($node, $many, '-c', '2', '-R', '100', '-t', '150');
$deadline = time + $PostgreSQL::Test::Utils::timeout_default;
my $n = 0;
$n = in_flight() while time < $deadline && $n < 2;
mock_cmd($mock, 'rtt -1 3000');
$node->poll_query_until('postgres', "SELECT count(*) > 0 FROM outbox WHERE status = 'retrying'")
  or die 'no event timed out';
# The retries go while events flow, still slowly.
mock_cmd($mock, 'rtt -1 300');
finish_pgbench($run);
mock_cmd($mock, 'rtt -1 0');
wait_for_delivered($node, 451);
ok($node->log_contains(qr/voutbox: no delivery report for 1000 ms; \d+ events time out/),
	'events in flight timed out');

# (Re-sent events are in Kafka twice: read everything.)
my @msgs = grep { $_->{event}{aggregate_id} ne 'warmup' } consume_all($mock, 'acme.counter.bumped.v1');
check_same_events($node, \@msgs, "topic = 'acme.counter.bumped.v1' AND aggregate_id <> 'warmup'",
	'streaming');
check_key_order(\@msgs, 'n', 'streaming: per-key order holds');
is($node->safe_psql('postgres', "SELECT count(*) FROM outbox WHERE status <> 'delivered'"),
	'0', 'nothing waits or died');
is($node->safe_psql('postgres', "SELECT count(*) FROM outbox_dlq"), '0', 'nothing in the DLQ');

$node->stop;
mock_stop($mock);
done_testing();
