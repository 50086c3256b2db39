# Crashes lose nothing: kill -9 of the worker in the middle of a backlog, an
# immediate stop of the whole server under load, and kill -9 of the worker
# between the broker's acknowledgement and the settle.  Events re-sent after a
# crash carry the same id.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('crash');
kafka_create_topic($kafka, 'acme.counter.bumped.v1', 4);
my $node = voutbox_node('crash', $kafka, 'voutbox.batch_size' => '500');
my $script = counter_script($node, 30);

# --- kill -9 of the worker while it drains a backlog of 50000 events
$node->safe_psql('postgres',
	"SELECT count(outbox_save('acme', 'counter', 'bulk', 'counter.bumped.v1', jsonb_build_object('n', g))) "
	  . 'FROM generate_series(1, 50000) g');
my $pid = worker_pid($node);
# (The worker's cursor rows count what it settled, cheaply: the outbox view
# over 50000 events costs as much as a good part of the drain.)
my $settled = "SELECT coalesce(sum(events), 0) FROM voutbox.batches";
$node->poll_query_until('postgres', "SELECT ($settled) >= 1000")
  or die 'the backlog did not start';
my $delivered = $node->safe_psql('postgres', $settled);
kill 'KILL', $pid;
ok($delivered < 50000, "killing the worker mid-stream ($delivered of 50000 delivered)");

# The postmaster resets the cluster; the launcher starts a new worker.
$node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'voutbox worker' AND pid <> $pid")
  or die 'no new worker';
wait_for_delivered($node, 50000);
pass('the backlog is delivered after the kill');

# --- immediate stop of the server under load
my $bench = start_pgbench($node, $script, '-c', '4', '-j', '2', '-R', '400', '-T', '60');
my $base = $node->safe_psql('postgres', "SELECT count(*) FROM outbox WHERE status = 'delivered'");
wait_for_delivered($node, $base + 500);
$node->stop('immediate');
$bench->{h}->finish;    # pgbench fails: its connections died with the server
$node->start;
my $total = $node->safe_psql('postgres', 'SELECT count(*) FROM outbox');
ok($total > 50500, "events committed before the stop survived ($total)");
wait_for_delivered($node, $total);
pass('everything committed before the stop is delivered after it');

# --- kill -9 of the worker between the broker's acknowledgement and the
# settle.  A session locks the cursor table, so the worker's settling
# transaction waits after Kafka acknowledged the round; the worker is killed
# there.  The new worker sends the round again: duplicates, with the same id.
my $locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN');
$locker->query_safe('LOCK TABLE voutbox.batches IN EXCLUSIVE MODE');
$node->safe_psql('postgres',
	"SELECT count(outbox_save('acme', 'counter', 'acked', 'counter.bumped.v1', jsonb_build_object('n', g))) "
	  . 'FROM generate_series(1, 100) g');
$node->poll_query_until('postgres',
	"SELECT wait_event_type = 'Lock' AND query = 'settling a batch' "
	  . "FROM pg_stat_activity WHERE backend_type = 'voutbox worker'")
  or die 'the worker did not reach the settle';
my @acked = grep { $_->{key} eq 'acked' } consume_all($kafka, 'acme.counter.bumped.v1');
is(scalar(@acked), 100, 'Kafka acknowledged the round before the settle');
$pid = worker_pid($node);
kill 'KILL', $pid;
eval { $locker->quit };
$node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'voutbox worker' AND pid <> $pid")
  or die 'no new worker';
wait_for_delivered($node, 100, "aggregate_id = 'acked'");
@acked = grep { $_->{key} eq 'acked' } consume_all($kafka, 'acme.counter.bumped.v1');
my %copies;
$copies{ $_->{event}{id} }++ for @acked;
is(scalar(keys %copies), 100, 'the 100 events are in Kafka');
is(scalar(grep { $copies{$_} == 2 } keys %copies), 100, 'each of them twice: sent again after the crash');
my %keys_of;
$keys_of{ $_->{event}{id} }{ $_->{headers}{idempotency_key} } = 1 for @acked;
is(scalar(grep { keys %{ $keys_of{$_} } != 1 } keys %keys_of), 0,
	'both copies carry the same id and idempotency key');

my @msgs = consume_all($kafka, 'acme.counter.bumped.v1');
check_same_events($node, \@msgs, 'true', 'crashes');
check_key_order([ grep { $_->{key} ne 'bulk' && $_->{key} ne 'acked' } @msgs ], 'n',
	'per-key order holds across crashes');
check_key_order([ grep { $_->{key} eq 'acked' } @msgs ], 'n',
	'the re-sent round arrives in order (first copies)');
check_key_order([ grep { $_->{key} eq 'bulk' } @msgs ], 'n', 'the backlog arrives in order');

$node->stop;
kafka_stop($kafka);
done_testing();
