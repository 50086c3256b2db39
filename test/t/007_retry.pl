# A failed delivery is retried later with growing delays and never lost;
# later events of its key wait behind it while other keys flow, also when
# librdkafka refuses the event before sending it; after voutbox.max_retries
# it moves to the dead-letter queue and its key goes on.  The failures are
# real: a topic whose max.message.bytes is below the event, and a producer
# whose message.max.bytes is.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use VoutboxTest;

my $kafka = kafka_start('retry');
kafka_create_topic($kafka, 'acme.order.placed.v1', 2, 'max.message.bytes=2000');
kafka_create_topic($kafka, 'acme.order.shipped.v1', 2, 'max.message.bytes=2000');
my $node = voutbox_node('retry', $kafka,
	'voutbox.backoff_base' => '100ms',
	'voutbox.backoff_max' => '1600ms',
	'voutbox.max_retries' => '1000');

my $big = "jsonb_build_object('n', 1, 'pad', repeat('x', 5000))";
$node->safe_psql('postgres', "SELECT outbox_save('acme', 'order', 'K', 'order.placed.v1', $big)");
$node->safe_psql('postgres', save_sql('acme', 'order.placed.v1', 'K', { n => 2 }));
$node->safe_psql('postgres', save_sql('acme', 'order.placed.v1', 'L', { n => 1 }));

# Record every attempt of the big event (poll with a deadline).
my @attempts;
my $deadline = time + 60;
while (@attempts < 6 && time < $deadline)
{
	my $row = $node->safe_psql('postgres',
		"SELECT retry_count || ' ' || extract(epoch FROM d.last_error_at) FROM outbox o "
		  . "JOIN voutbox.deferred d USING (id) WHERE o.aggregate_id = 'K' AND o.status = 'retrying'");
	next unless $row;
	my ($n, $at) = split / /, $row;
	push @attempts, [ $n, $at ] if !@attempts || $attempts[-1][0] != $n;
}
ok(@attempts >= 6, 'the failing event is retried again and again');
my @gaps = map { $attempts[$_][1] - $attempts[ $_ - 1 ][1] } 1 .. $#attempts;
note('delays between attempts (s): ' . join(' ', map { sprintf('%.2f', $_) } @gaps));
my $grows = 1;
$grows &&= $gaps[$_] >= $gaps[ $_ - 1 ] * 0.9 for 1 .. $#gaps;
ok($grows, 'delays do not shrink');
ok($gaps[-1] >= 0.8 && $gaps[-1] <= 1.7, 'delays reach backoff_max (1.6 s, jittered down to half)');

is( $node->safe_psql('postgres',
		"SELECT string_agg(aggregate_id || ':' || status, ',' ORDER BY aggregate_id, created_at) FROM outbox"),
	'K:retrying,K:held,L:delivered',
	'the key waits behind its failing head; another key flows');
like($node->safe_psql('postgres', "SELECT last_error FROM outbox WHERE status = 'retrying'"),
	qr/^MSG_SIZE_TOO_LARGE: /, 'the broker\'s error is recorded');

# The topic is fixed: the head goes out, then its key, in order.
kafka_alter_topic($kafka, 'acme.order.placed.v1', 'max.message.bytes=1000000');
wait_for_delivered($node, 3);
my @msgs = consume_events($kafka, 'acme.order.placed.v1', 3);
is_deeply([ map { $_->{event}{payload}{n} } grep { $_->{key} eq 'K' } @msgs ], [ 1, 2 ],
	'key K arrives in order after the retries');

# --- librdkafka refuses an event at once (larger than message.max.bytes):
# the later events of its key are not sent behind it, and stay held while it
# is retried again and again, each retry alone.
$node->append_conf('postgresql.conf', "voutbox.kafka_properties = 'message.max.bytes=3000'\n");
$node->reload;
$node->safe_psql('postgres',
	"BEGIN; "
	  . save_sql('acme', 'order.packed.v1', 'P', { n => 1 }) . "; "
	  . "SELECT outbox_save('acme', 'order', 'P', 'order.packed.v1', jsonb_build_object('n', 2, 'pad', repeat('x', 5000))); "
	  . save_sql('acme', 'order.packed.v1', 'P', { n => 3 }) . "; COMMIT");
$node->poll_query_until('postgres',
	"SELECT retry_count >= 3 FROM outbox WHERE aggregate_id = 'P' AND status = 'retrying'")
  or die 'the refused event is not retried';
is( $node->safe_psql('postgres',
		"SELECT string_agg((payload->>'n') || ':' || status, ',' ORDER BY created_at, (payload->>'n')) FROM outbox WHERE aggregate_id = 'P'"),
	'1:delivered,2:retrying,3:held',
	'the event behind a refused one is held through every retry');
like($node->safe_psql('postgres', "SELECT last_error FROM outbox WHERE aggregate_id = 'P' AND status = 'retrying'"),
	qr/^MSG_SIZE_TOO_LARGE: /, 'librdkafka\'s refusal is recorded');
$node->append_conf('postgresql.conf', "voutbox.kafka_properties = ''\n");
$node->reload;
wait_for_delivered($node, 3, "aggregate_id = 'P'");
@msgs = consume_events($kafka, 'acme.order.packed.v1', 3);
is_deeply([ map { $_->{event}{payload}{n} } @msgs ], [ 1, 2, 3 ], 'key P arrives in order');

# --- max_retries: the head goes to the dead-letter queue, its key proceeds.
$node->append_conf('postgresql.conf', "voutbox.max_retries = 2\n");
$node->reload;
$node->safe_psql('postgres', "SELECT outbox_save('acme', 'order', 'M', 'order.shipped.v1', $big)");
$node->safe_psql('postgres', save_sql('acme', 'order.shipped.v1', 'M', { n => 2 }));
$node->poll_query_until('postgres', 'SELECT count(*) = 1 FROM outbox_dlq')
  or die 'nothing reached the dead-letter queue';
is( $node->safe_psql('postgres',
		"SELECT aggregate_id || ' ' || retry_count || ' ' || reason || ' ' || (last_error LIKE 'MSG_SIZE_TOO_LARGE%') "
		  . '|| \' \' || (moved_at IS NOT NULL) || \' \' || (payload->>\'n\') FROM outbox_dlq'),
	'M 3 max_retries_exceeded true true 1',
	'dead letter: retry count, reason, last error, time moved, payload');
wait_for_delivered($node, 1, "aggregate_id = 'M'");
is( $node->safe_psql('postgres', "SELECT string_agg(status, ',' ORDER BY created_at) FROM outbox WHERE aggregate_id = 'M'"),
	'dead,delivered', 'the rest of the key is delivered');
is($node->safe_psql('postgres', 'SELECT count(*) FROM voutbox.deferred WHERE delivered_at IS NULL'),
	'0', 'nothing waits any more');
@msgs = consume_events($kafka, 'acme.order.shipped.v1', 1);
is($msgs[0]{event}{payload}{n}, 2, 'only the second event of M reached Kafka');

$node->stop;
kafka_stop($kafka);
done_testing();
