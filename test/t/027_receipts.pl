# Delivery receipts: every delivered event shows the partition and offset
# Kafka gave it, in the outbox view and through outbox_locate(), whether it
# went with its window or later from the retry queue; the storage stays
# insert-only (no UPDATE of an event, one cursor row per round); a role
# sees only its tenant's receipts.  Receipts in both delivery modes
# (at_least_once, exactly_once).
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('receipts');
my $node = voutbox_node('receipts', $kafka,
	'voutbox.batch_size' => 50, 'voutbox.backoff_base' => '100ms',
	'max_prepared_transactions' => '10');
kafka_create_topic($kafka, 'acme.receipt.v1', 3);
kafka_create_topic($kafka, 'acme.receipt.eos.v1', 3);
kafka_create_topic($kafka, 'umbrella.receipt.v1', 1);

# Applications save and look as roles that do not own the extension.
$node->safe_psql('postgres', q{
	CREATE ROLE app_acme;
	CREATE ROLE app_umbrella;
	GRANT SELECT ON outbox TO app_acme, app_umbrella;
	SELECT outbox_tenant_grant('acme', 'app_acme');
	SELECT outbox_tenant_grant('umbrella', 'app_umbrella');
});

my $n = 300;
my (%kafka, $other);

# 300 events over 30 keys in 3 partitions, in many transactions (several
# rounds), and one scheduled event: it goes from voutbox.deferred.  Each
# event's receipt must be where Kafka has it.
sub receipts_case
{
	my ($mode, $type) = @_;
	my $topic = "acme.$type";
	$node->safe_psql('postgres', "ALTER SYSTEM SET voutbox.delivery = '$mode'");
	$node->restart;
	is($node->safe_psql('postgres', 'SHOW voutbox.delivery'), $mode, "$mode: the server runs in that mode");
	my $batches = $node->safe_psql('postgres', 'SELECT coalesce(max(batch_id), 0) FROM voutbox.batches');
	$node->safe_psql('postgres', qq{
		SET ROLE app_acme;
		SELECT outbox_save('acme', 'order', (i % 30)::text, '$type', jsonb_build_object('i', i))
		  FROM generate_series(1, 100) i;
	});
	for my $chunk (1 .. 4)
	{
		$node->safe_psql('postgres', join('',
			"SET ROLE app_acme;",
			map { "SELECT outbox_save('acme', 'order', '" . ($_ % 30) . "', '$type', '{\"i\": $_}');" }
			  (100 + ($chunk - 1) * 50 + 1) .. (100 + $chunk * 50)));
	}
	my $scheduled = $node->safe_psql('postgres', qq{
		SET ROLE app_acme;
		SELECT outbox_save('acme', 'order', 'later', '$type', '{"i": 0}',
			scheduled_for => clock_timestamp() + interval '1 second')});
	$other //= $node->safe_psql('postgres', q{
		SET ROLE app_umbrella;
		SELECT outbox_save('umbrella', 'order', 'u1', 'receipt.v1', '{"i": 1}')});

	wait_for_delivered($node, $n + 1, "topic = '$topic'");
	wait_for_delivered($node, 1, "topic = 'umbrella.receipt.v1'");
	# (read_committed, librdkafka's default: in exactly_once, what a
	# consumer of the mode reads)
	my @msgs = consume_all($kafka, $topic);
	%kafka = map { $_->{event}{id} => "$_->{partition}/$_->{offset}" } @msgs;
	is(scalar(@msgs), $n + 1, "$mode: every event once in Kafka");

	my %receipt = map { my ($id, $p) = split /\|/; ($id => $p) } split /\n/,
	  $node->safe_psql('postgres',
		"SET ROLE app_acme; SELECT id || '|' || kafka_partition || '/' || kafka_offset FROM outbox WHERE topic = '$topic'");
	is(scalar(keys %receipt), $n + 1, "$mode: every acme event has a receipt");
	my @wrong = grep { ($receipt{$_} // '') ne $kafka{$_} } keys %kafka;
	is(scalar(@wrong), 0, "$mode: every receipt names the partition and offset the event has in Kafka")
	  or diag(join("\n", map { "$_: outbox " . ($receipt{$_} // 'none') . ", kafka $kafka{$_}" } @wrong[0 .. 4]));
	ok(defined $kafka{$scheduled} && ($receipt{$scheduled} // '') eq $kafka{$scheduled},
		"$mode: the scheduled event (from the retry queue) too");
	is( $node->safe_psql('postgres',
			"SELECT count(DISTINCT kafka_partition) FROM outbox WHERE topic = '$topic'"),
		'3', "$mode: receipts over the three partitions");

	# insert-only: no event row was updated, one cursor row per round (after
	# a clean restart, which writes out the worker's table statistics)
	$node->restart;
	is( $node->safe_psql('postgres',
			"SELECT sum(n_tup_upd + n_tup_hot_upd + n_tup_del) FROM pg_stat_user_tables "
			  . "WHERE schemaname = 'voutbox' AND relname ~ '^events_'"),
		'0', "$mode: no event row updated or deleted");
	my ($rows, $with) = split /\|/, $node->safe_psql('postgres',
		"SELECT count(*), count(*) FILTER (WHERE cardinality(receipt_seqs) > 0) FROM voutbox.batches "
		  . "WHERE batch_id > $batches");
	cmp_ok($rows, '<', $n / 5, "$mode: receipts in $rows cursor rows, not one row per event");
	cmp_ok($with, '>', 0, "$mode: cursor rows hold receipts");
	return;
}

receipts_case('at_least_once', 'receipt.v1');
receipts_case('exactly_once', 'receipt.eos.v1');
ok(scalar(consume_all($kafka, checkpoint_topic($node))) > 0,
	'exactly_once: the events went in Kafka transactions (checkpoint records)');

# --- "where is event X?", as the tenant's role
my $id = (sort keys %kafka)[17];
my ($p, $o) = split m{/}, $kafka{$id};
is( $node->safe_psql('postgres',
		"SET ROLE app_acme; SELECT status, topic, kafka_partition, kafka_offset, published_at IS NOT NULL "
		  . "FROM outbox_locate('$id')"),
	"delivered|acme.receipt.eos.v1|$p|$o|t",
	'outbox_locate() tells where the event is');
is($node->safe_psql('postgres', "SET ROLE app_umbrella; SELECT count(*) FROM outbox_locate('$id')"),
	'0', "another tenant's role does not see it");
is($node->safe_psql('postgres', "SET ROLE app_acme; SELECT count(*) FROM outbox_locate('$other')"),
	'0', 'nor the other way round');
is( $node->safe_psql('postgres',
		"SET ROLE app_umbrella; SELECT kafka_partition || '/' || kafka_offset FROM outbox_locate('$other')"),
	'0/0', "the other tenant's own event");
is($node->safe_psql('postgres', 'SELECT count(*) FROM outbox_locate(gen_random_uuid())'),
	'0', 'an unknown event: no row');

# --- an event not delivered yet has none
my $pending = $node->safe_psql('postgres', q{
	SET ROLE app_acme;
	SELECT outbox_save('acme', 'order', 'p', 'receipt.v1', '{}',
		scheduled_for => now() + interval '1 hour')});
like( $node->safe_psql('postgres',
		"SET ROLE app_acme; SELECT status || ':' || coalesce(kafka_partition::text, 'none') FROM outbox_locate('$pending')"),
	qr/^(pending|scheduled):none$/, 'an event not delivered yet has no receipt');

$node->stop;
kafka_stop($kafka);
done_testing();
