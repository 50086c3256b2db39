# Exact commit order within a window: two transactions save an event of one
# key, the one that saved first commits last, and the worker reads both in
# one window.  Kafka gets them in commit order, not in save order.  (The
# worker is held off by voutbox.standby_names naming a standby that does
# not exist, so that both commits fall into one window.)  The retry queue
# keeps that order too: the second-committed event waits behind the first
# when the first fails.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('commit_order', 'auto.create.topics.enable=false');
my ($node, $m);

sub hold_windows
{
	my ($on) = @_;
	$node->safe_psql('postgres',
		"ALTER SYSTEM SET voutbox.standby_names = '" . ($on ? 'nobody' : '') . "'; SELECT pg_reload_conf()");
	return unless $on;
	# Once the worker has the setting, a round (of probe events, key "p")
	# waits for the standby that does not exist.
	$node->poll_query_until('postgres', qq{
		SELECT outbox_save('acme', 'order', 'p', 'order.placed.${m}v1', '{"w": "probe"}') IS NOT NULL
		   AND (SELECT state FROM outbox_worker) = 'waiting for standbys'})
	  or die 'the worker does not hold its rounds';
	return;
}

# The events of key "k" in a topic, once each, in their order.  In
# exactly_once, a read_committed consumer must see each once.
sub k_order
{
	my ($topic) = @_;
	my %seen;
	my @k = map { $_->{event}{payload}{w} }
	  grep { ($_->{key} // '') eq 'k' } consume_all($kafka, $topic);
	my $order = join(',', grep { !$seen{$_}++ } @k);
	is(scalar(@k), scalar(keys %seen), "exactly_once: no duplicate in $topic") if $m;
	return $order;
}

# Two writers of key "k": A saves first and commits last; B commits between.
# Returns their ids.
sub interleave
{
	my ($tag, $type) = @_;
	$type //= "order.placed.${m}v1";
	my $a = $node->background_psql('postgres');
	my $b = $node->background_psql('postgres');
	$_->query_safe('SET ROLE app') for $a, $b;
	$a->query_safe('BEGIN');
	my $id_a = $a->query_safe(
		"SELECT outbox_save('acme', 'order', 'k', '$type', '{\"w\": \"A$tag\"}')");
	$b->query_safe('BEGIN');
	my $id_b = $b->query_safe(
		"SELECT outbox_save('acme', 'order', 'k', '$type', '{\"w\": \"B$tag\"}')");
	$b->query_safe('COMMIT');
	$a->query_safe('COMMIT');
	$_->quit for $a, $b;
	return ($id_a, $id_b);
}

for my $mode (qw(at_least_once exactly_once))
{
	# The mode's own topics: acme.order.placed.v1, acme.order.placed.eos.v1, ...
	$m = $mode eq 'exactly_once' ? 'eos.' : '';
	$node = voutbox_node($mode eq 'exactly_once' ? 'commit_order_eos' : 'commit_order', $kafka,
		'voutbox.delivery' => $mode,
		'max_prepared_transactions' => '10',
		# A missing topic stays missing: its events fail and are retried.
		'voutbox.create_topics' => 'off',
		'voutbox.delivery_timeout' => '1s',
		'voutbox.backoff_base' => '1s',
		'voutbox.max_retries' => '1000');
	kafka_create_topic($kafka, "acme.order.placed.${m}v1", 1);
	$node->safe_psql('postgres', q{
		CREATE ROLE app;
		GRANT SELECT ON outbox TO app;
		SELECT outbox_tenant_grant('acme', 'app');
	});

	# --- one window: commit order
	$node->poll_query_until('postgres', "SELECT state = 'idle' FROM outbox_worker")
	  or die 'the worker did not come up';
	hold_windows(1);
	pass("$mode: the worker holds its rounds");
	my ($a1, $b1) = interleave(1);
	cmp_ok($node->safe_psql('postgres', "SELECT seq FROM voutbox.events WHERE id = '$a1'"),
		'<', $node->safe_psql('postgres', "SELECT seq FROM voutbox.events WHERE id = '$b1'"),
		"$mode: A saved first");
	hold_windows(0);
	$node->poll_query_until('postgres', "SELECT count(*) = 0 FROM outbox WHERE status <> 'delivered'")
	  or die 'not delivered';
	is(k_order("acme.order.placed.${m}v1"), 'B1,A1', "$mode, one window: B, which committed first, went before A, which saved first");
	is( $node->safe_psql('postgres',
			"SELECT count(DISTINCT voutbox.settling_batch(txid, seq)) FROM voutbox.events WHERE id IN ('$a1', '$b1')"),
		'1', "$mode: both were settled by one cursor row (one window)");

	# --- a transaction that rolls back records no position; one per committed transaction
	my $before = $node->safe_psql('postgres', 'SELECT count(*) FROM voutbox.commit_order');
	$node->safe_psql('postgres',
		"SET ROLE app; BEGIN; SELECT outbox_save('acme', 'order', 'x', 'order.placed.${m}v1', '{}'); ROLLBACK;");
	$node->safe_psql('postgres',
		"SET ROLE app; SELECT outbox_save('acme', 'order', 'x', 'order.placed.${m}v1', '{}'), outbox_save('acme', 'order', 'x', 'order.placed.${m}v1', '{}')");
	is($node->safe_psql('postgres', 'SELECT count(*) FROM voutbox.commit_order'),
		$before + 1, "$mode: one commit position per committed transaction that saved, none for a rollback");

	# --- the retry queue keeps commit order: the topic of both is missing, B's
	# event fails first and A's waits behind it in the key's queue.
	hold_windows(1);
	my ($a2, $b2) = interleave(2, "order.shipped.${m}v1");
	hold_windows(0);
	$node->poll_query_until('postgres',
		"SELECT count(*) = 2 FROM voutbox.deferred WHERE id IN ('$a2', '$b2') AND (attempts > 0 OR holds_key)")
	  or die 'the events did not reach the retry queue';
	is( $node->safe_psql('postgres',
			"SELECT string_agg(payload->>'w', ',' ORDER BY batch_id, commit_pos, seq) FROM voutbox.deferred "
			  . "WHERE id IN ('$a2', '$b2')"),
		'B2,A2', "$mode: the key's queue in the retry queue is in commit order");
	kafka_create_topic($kafka, "acme.order.shipped.${m}v1", 1);
	$node->poll_query_until('postgres', "SELECT count(*) = 0 FROM outbox WHERE status <> 'delivered'")
	  or die 'not delivered after the retries';
	is(k_order("acme.order.shipped.${m}v1"), 'B2,A2', "$mode: after retries, still commit order");
	ok(scalar(consume_all($kafka, checkpoint_topic($node))) > 0,
		'exactly_once: the events went in Kafka transactions (checkpoint records)')
	  if $mode eq 'exactly_once';
	$node->stop;
}

kafka_stop($kafka);
done_testing();
