# Crashes lose nothing: kill -9 of the worker in the middle of a backlog, and
# an immediate stop of the whole server under load.  Events re-sent after a
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
wait_for_delivered($node, 1000);
my $pid = worker_pid($node);
my $delivered = $node->safe_psql('postgres', "SELECT count(*) FROM outbox WHERE status = 'delivered'");
ok($delivered < 50000, "killing the worker mid-stream ($delivered of 50000 delivered)");
kill 'KILL', $pid;

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

my @msgs = consume_all($kafka, 'acme.counter.bumped.v1');
check_same_events($node, \@msgs, 'true', 'crashes');
check_key_order([ grep { $_->{key} ne 'bulk' } @msgs ], 'n', 'per-key order holds across crashes');
check_key_order([ grep { $_->{key} eq 'bulk' } @msgs ], 'n', 'the backlog arrives in order');

$node->stop;
kafka_stop($kafka);
done_testing();
