# Retention by whole tables: the ring rotates every half retention period and
# a retired table is truncated once its events are settled and expired.  A
# reader holding a lock on a retired table delays its truncation, but never
# makes outbox_save() or the drain wait: the worker only takes the lock when
# it is free.  The dead-letter queue is trimmed after voutbox.dlq_retention.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('retention');
my $node = voutbox_node('retention', $kafka,
	'voutbox.retention' => '2s',
	'voutbox.cleanup_interval' => '100ms',
	'voutbox.dlq_retention' => '1s');

sub save_some
{
	my ($tag, $n) = @_;
	$node->safe_psql('postgres',
		"SELECT count(outbox_save('acme', 'test', '$tag-' || g, 'item.kept.v1', jsonb_build_object('n', g))) "
		  . "FROM generate_series(1, $n) g");
	return;
}

# --- events are kept for the retention period, then their table is
# truncated (the ring turns every second here, so watch the events).
save_some('a', 100);
my $saved_at = $node->safe_psql('postgres', 'SELECT extract(epoch FROM now())');
wait_for_delivered($node, 100);
# b in a later table than a (the ring turns every second): a's truncation
# must not take b's events with it before the test sees them delivered.
my $slot_a = $node->safe_psql('postgres',
	"SELECT substr(e.tableoid::regclass::text, length('voutbox.events_') + 1) FROM voutbox.events e "
	  . "WHERE e.aggregate_id = 'a-1'");
$node->poll_query_until('postgres', "SELECT slot <> $slot_a FROM voutbox.ring WHERE state = 'current'")
  or die 'the ring does not turn';
save_some('b', 100);
$node->poll_query_until('postgres', "SELECT count(*) = 0 FROM voutbox.events WHERE aggregate_id LIKE 'a-%'")
  or die 'the expired events were never removed';
my $kept = $node->safe_psql('postgres', "SELECT extract(epoch FROM now()) - $saved_at");
ok($kept >= 2, "delivered events were kept at least voutbox.retention ($kept s)");
like($node->safe_psql('postgres', "SELECT string_agg(DISTINCT state, ',') FROM voutbox.ring"),
	qr/current/, 'the ring keeps turning');
wait_for_delivered($node, 100, "aggregate_id LIKE 'b-%'");
is($node->safe_psql('postgres', 'SELECT count(*) FROM outbox_dlq'), '0', 'nothing lost to retention');

# --- a reader holds a lock on the current table across its retirement.
my $cur = $node->safe_psql('postgres', "SELECT slot FROM voutbox.ring WHERE state = 'current'");
save_some('c', 50);
my $reader = $node->background_psql('postgres');
$reader->query_safe("BEGIN; SELECT count(*) FROM voutbox.events_$cur");
$node->poll_query_until('postgres',
	"SELECT state = 'retired' AND since < now() - interval '4 seconds' FROM voutbox.ring WHERE slot = $cur")
  or die "slot $cur did not stay retired";
ok($node->safe_psql('postgres', "SELECT count(*) FROM voutbox.events_$cur") > 0,
	'a locked table is not truncated, even when expired');

# Meanwhile saving and delivery go on without waiting for any lock.
my ($ret, $out, $err) = $node->psql('postgres',
	"SET lock_timeout = '200ms'; SELECT count(outbox_save('acme', 'test', 'd-' || g, 'item.kept.v1', '{}')) FROM generate_series(1, 50) g");
is($ret, 0, 'outbox_save does not wait while retention is held up') or diag($err);
wait_for_delivered($node, 50, "aggregate_id LIKE 'd-%'");
pass('delivery goes on');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
		  . "WHERE NOT l.granted AND c.relnamespace = 'voutbox'::regnamespace"),
	'0', 'nobody queues for a lock on the storage');

$reader->query_safe('COMMIT');
$node->poll_query_until('postgres', "SELECT count(*) = 0 FROM voutbox.events_$cur")
  or die "slot $cur not truncated after the reader left";
pass('truncated once the reader left');

# --- what is retained is still complete: every event still in the ring is delivered.
is($node->safe_psql('postgres', "SELECT count(*) FROM outbox WHERE status <> 'delivered'"),
	'0', 'no pending event left behind');

# --- the cursor's history does not grow without bound.
ok($node->safe_psql('postgres', 'SELECT count(*) FROM voutbox.batches') < 50,
	'old cursor rows are trimmed');

# --- dead letters expire after dlq_retention.
$node->safe_psql('postgres', q{
	INSERT INTO outbox_dlq (id, tenant_id, aggregate_type, aggregate_id, event_type, event_version,
		payload, idempotency_key, correlation_id, created_at, pii, topic, seq, retry_count, reason, moved_at)
	VALUES ('01900000-0000-7000-8000-000000000001', 'acme', 'test', 'x', 'item.kept.v1', 1, '{}',
		'k', 'x', now(), false, 'acme.item.kept.v1', 0, 11, 'max_retries_exceeded', now())});
$node->poll_query_until('postgres', 'SELECT count(*) = 0 FROM outbox_dlq')
  or die 'dead letter not trimmed';
pass('expired dead letters are deleted');

my @msgs = consume_all($kafka, 'acme.item.kept.v1');
is(scalar(grep { $_->{event}{aggregate_id} =~ /^[abcd]-/ } @msgs), 300, 'all 300 events reached Kafka');

$reader->quit;
$node->stop;
kafka_stop($kafka);
done_testing();
