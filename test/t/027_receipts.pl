# Delivery receipts: every delivered event shows the partition and offset
# Kafka gave it, in the outbox view and through outbox_locate(), whether it
# went with its window or later from the retry queue; the storage stays
# insert-only (no UPDATE of an event, one cursor row per round); a role
# sees only its tenant's receipts.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('receipts');
my $node = voutbox_node('receipts', $kafka,
	'voutbox.batch_size' => 50, 'voutbox.backoff_base' => '100ms');
kafka_create_topic($kafka, 'acme.receipt.v1', 3);
kafka_create_topic($kafka, 'umbrella.receipt.v1', 1);

# Applications save and look as roles that do not own the extension.
$node->safe_psql('postgres', q{
	CREATE ROLE app_acme;
	CREATE ROLE app_umbrella;
	GRANT SELECT ON outbox TO app_acme, app_umbrella;
	SELECT outbox_tenant_grant('acme', 'app_acme');
	SELECT outbox_tenant_grant('umbrella', 'app_umbrella');
});

# 300 events over 30 keys in 3 partitions, in many transactions (several
# rounds), and one scheduled event: it goes from voutbox.deferred.
my $n = 300;
$node->safe_psql('postgres', qq{
	SET ROLE app_acme;
	SELECT outbox_save('acme', 'order', (i % 30)::text, 'receipt.v1', jsonb_build_object('i', i))
	  FROM generate_series(1, 100) i;
});
for my $chunk (1 .. 4)
{
	$node->safe_psql('postgres', join('',
		"SET ROLE app_acme;",
		map { "SELECT outbox_save('acme', 'order', '" . ($_ % 30) . "', 'receipt.v1', '{\"i\": $_}');" }
		  (100 + ($chunk - 1) * 50 + 1) .. (100 + $chunk * 50)));
}
my $scheduled = $node->safe_psql('postgres', q{
	SET ROLE app_acme;
	SELECT outbox_save('acme', 'order', 'later', 'receipt.v1', '{"i": 0}',
		scheduled_for => clock_timestamp() + interval '1 second')});
my $other = $node->safe_psql('postgres', q{
	SET ROLE app_umbrella;
	SELECT outbox_save('umbrella', 'order', 'u1', 'receipt.v1', '{"i": 1}')});

wait_for_delivered($node, $n + 2);
my @msgs = consume_events($kafka, 'acme.receipt.v1', $n + 1);
my %kafka = map { $_->{event}{id} => "$_->{partition}/$_->{offset}" } @msgs;

# --- each event's receipt is where Kafka has it
my %receipt = map { my ($id, $p) = split /\|/; ($id => $p) } split /\n/,
  $node->safe_psql('postgres',
	"SET ROLE app_acme; SELECT id || '|' || kafka_partition || '/' || kafka_offset FROM outbox");
is(scalar(keys %receipt), $n + 1, 'every acme event has a receipt');
my @wrong = grep { ($receipt{$_} // '') ne $kafka{$_} } keys %kafka;
is(scalar(@wrong), 0, 'every receipt names the partition and offset the event has in Kafka')
  or diag(join("\n", map { "$_: outbox $receipt{$_}, kafka $kafka{$_}" } @wrong[0 .. 4]));
ok(defined $kafka{$scheduled} && ($receipt{$scheduled} // '') eq $kafka{$scheduled},
	'the scheduled event (from the retry queue) too');
is( $node->safe_psql('postgres',
		"SELECT count(DISTINCT kafka_partition) FROM outbox WHERE tenant_id = 'acme'"),
	'3', 'receipts over the three partitions');

# --- "where is event X?", as the tenant's role
my $id = (sort keys %kafka)[17];
my ($p, $o) = split m{/}, $kafka{$id};
is( $node->safe_psql('postgres',
		"SET ROLE app_acme; SELECT status, topic, kafka_partition, kafka_offset, published_at IS NOT NULL "
		  . "FROM outbox_locate('$id')"),
	"delivered|acme.receipt.v1|$p|$o|t",
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

# --- insert-only: no event row was updated, one cursor row per round
is( $node->safe_psql('postgres',
		"SELECT sum(n_tup_upd + n_tup_hot_upd + n_tup_del) FROM pg_stat_user_tables "
		  . "WHERE schemaname = 'voutbox' AND relname ~ '^events_'"),
	'0', 'no event row updated or deleted');
my ($rows, $with) = split /\|/, $node->safe_psql('postgres',
	"SELECT count(*), count(*) FILTER (WHERE cardinality(receipt_seqs) > 0) FROM voutbox.batches WHERE batch_id > 0");
cmp_ok($rows, '<', $n / 5, "receipts in $rows cursor rows, not one row per event");
cmp_ok($with, '>', 0, 'cursor rows hold receipts');

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
