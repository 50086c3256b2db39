# A replicated Kafka cluster under steady load: three KRaft nodes on
# loopback (replication factor 3, min.insync.replicas 2).  The leader of a
# busy partition is killed; the active controller is killed; two of the
# three nodes are stopped (producing stops, nothing is lost, and it resumes
# by itself when one comes back).  At the end Kafka holds every committed
# event, nothing else, per key in order.  Both delivery modes at once: a
# second server delivers with voutbox.delivery = exactly_once, to topics of
# its own, through the same failures; its read_committed consumer sees no
# duplicate.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use VoutboxTest;

plan skip_all => 'not in the sanitizer pass' if $ENV{VOUTBOX_SANITIZE_PRELOAD};

my %topic = (alo => 'acme.counter.bumped.v1', eos => 'eos.acme.counter.bumped.v1');
# (A dead broker is fenced after 3 s rather than 9: the test waits less.)
my $cluster = kafka_cluster_start('cluster', 3,
	'broker.session.timeout.ms=3000', 'broker.heartbeat.interval.ms=500');
# Outages are waited out, not given up on.
my %node = (
	alo => voutbox_node('cluster', $cluster,
		'voutbox.max_retries' => 1000, 'voutbox.backoff_max' => '1s'),
	eos => voutbox_node('cluster_eos', $cluster,
		'voutbox.max_retries' => 1000, 'voutbox.backoff_max' => '1s',
		'voutbox.delivery' => 'exactly_once', max_prepared_transactions => '2',
		'voutbox.topic_template' => 'eos.{tenant_id}.{event_type}'));
my %load;
for my $mode (qw(alo eos))
{
	kafka_create_topic($cluster, $topic{$mode}, 4);
	my $script = counter_script($node{$mode}, 40);
	$load{$mode} = start_pgbench($node{$mode}, $script, '-c', '2', '-T', '600', '-R', '100');
}

sub count_where
{
	my ($mode, $where) = @_;
	return $node{$mode}->safe_psql('postgres', "SELECT count(*) FROM outbox WHERE $where");
}

# Wait until $n more events were delivered by each server; returns how long
# it took (the slower of the two).
sub progress
{
	my ($n, $what) = @_;
	my $t0 = time;
	my %from = map { $_ => count_where($_, "status = 'delivered'") } qw(alo eos);
	for my $mode (qw(alo eos))
	{
		$node{$mode}->poll_query_until('postgres',
			"SELECT count(*) >= $from{$mode} + $n FROM outbox WHERE status = 'delivered'")
		  or die "$mode: no progress after $what";
	}
	return time - $t0;
}

# Every partition of the topic has its three replicas in sync again.
sub wait_in_sync
{
	my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
	while (time < $deadline)
	{
		my $md = eval { JSON::PP::decode_json(scalar `kcat -b '$cluster->{brokers}' -L -t '$topic{alo}' -J -m 10`) };
		my @parts = $md ? @{ $md->{topics}[0]{partitions} } : ();
		return if @parts == 4 && !grep { @{ $_->{isrs} } < 3 } @parts;
		Time::HiRes::sleep(0.2);
	}
	die 'the replicas did not get back in sync';
}

wait_for_delivered($node{$_}, 100) for qw(alo eos);

# --- the leader of a busy partition is killed
my $leader = kafka_partition_leader($cluster, $topic{alo}, 0);
kafka_node_stop($cluster, $leader, 'kill');
my $took = progress(200, "killing the leader of partition 0 (node $leader)");
pass("delivery goes on after the leader of partition 0 (node $leader) was killed");
note(sprintf('leader killed: 200 more events delivered by each server in %.1f s', $took));
kafka_node_start($cluster, $leader);
wait_in_sync();

# --- the active controller is killed
my $controller = kafka_active_controller($cluster);
kafka_node_stop($cluster, $controller, 'kill');
$took = progress(200, "killing the active controller (node $controller)");
pass("delivery goes on after the active controller (node $controller) was killed");
note(sprintf('controller killed: 200 more events delivered by each server in %.1f s', $took));
my $new_controller = $controller;
my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
while ($new_controller == $controller && time < $deadline)
{
	Time::HiRes::sleep(0.2);
	$new_controller = kafka_active_controller($cluster);
}
isnt($new_controller, $controller, "another node ($new_controller) became the active controller");
kafka_node_start($cluster, $controller);
wait_in_sync();

# --- two of three stopped: producing stops, saving does not
my @down = grep { $_ != $new_controller } 1 .. 3;
kafka_node_stop($cluster, $_) for @down;
for my $mode (qw(alo eos))
{
	my $delivered_at_stop = count_where($mode, "status = 'delivered'");
	ok( $node{$mode}->poll_query_until('postgres',
			"SELECT count(*) >= 150 FROM outbox WHERE status <> 'delivered'"),
		"$mode: with one node of three, events wait (min.insync.replicas = 2)");
	my $delivered_meanwhile = count_where($mode, "status = 'delivered'") - $delivered_at_stop;
	cmp_ok($delivered_meanwhile, '<', 150, "$mode: few delivered while two nodes were down ($delivered_meanwhile)");
	is(count_where($mode, "status = 'dead'"), '0', "$mode: none given up");
}

# One comes back: delivery resumes by itself and catches up.
my $t0 = time;
kafka_node_start($cluster, $down[0]);
for my $mode (qw(alo eos))
{
	$node{$mode}->poll_query_until('postgres',
		"SELECT count(*) < 50 FROM outbox WHERE status <> 'delivered'")
	  or die "$mode: delivery did not resume with two nodes of three";
}
pass('delivery resumed once a second node was back');
note(sprintf('two of three down: caught up %.1f s after one came back', time - $t0));
kafka_node_start($cluster, $down[1]);

# --- the load ends; Kafka has exactly the committed events
for my $mode (qw(alo eos))
{
	my $node = $node{$mode};
	$load{$mode}->{h}->kill_kill;
	$node->poll_query_until('postgres',
		"SELECT count(*) FILTER (WHERE status <> 'delivered') = 0 FROM outbox")
	  or die "$mode: not everything was delivered";
	my @msgs = consume_all($cluster, $topic{$mode});
	my $dups = check_same_events($node, \@msgs, 'true', "$mode cluster");
	check_key_order(\@msgs, 'n', "$mode cluster: per key, the counter's order");
	is($dups, 0, 'eos cluster: a read_committed consumer sees no duplicate') if $mode eq 'eos';
	note(sprintf('%s cluster: %d events, %d messages, %d duplicates',
			$mode, count_where($mode, 'true'), scalar(@msgs), $dups));
	$node->stop;
}

kafka_cluster_stop($cluster);
done_testing();
