# Permanent errors, staged on a real broker: a topic whose max.message.bytes
# is smaller than one event, and a producer whose message.max.bytes is (so
# librdkafka refuses the event before sending it).  The event goes to the
# dead-letter queue with the reason and the error, without retries with
# backoff; events whose batch failed with it are sent again alone and
# delivered; the later events of its key follow, in order.  The DLQ is then
# administered from SQL: requeued after the fix, or discarded.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('permanent');
kafka_create_topic($kafka, 'acme.order.shipped.v1', 1, 'max.message.bytes=4000');
kafka_create_topic($kafka, 'acme.order.packed.v1', 1);
my $node = voutbox_node('permanent', $kafka,
	'voutbox.backoff_base' => '1min',    # a retry with backoff would show
	'voutbox.max_retries' => '1000');

# --- The broker refuses a batch: one event is too large for the topic.
my $big = "jsonb_build_object('n', 2, 'pad', repeat('x', 5000))";
my $sql = 'BEGIN; ' . save_sql('acme', 'order.shipped.v1', 'S', { n => 1 }) . '; '
  . "SELECT outbox_save('acme', 'order', 'S', 'order.shipped.v1', $big); "
  . save_sql('acme', 'order.shipped.v1', 'S', { n => 3 }) . '; ';
$sql .= save_sql('acme', 'order.shipped.v1', "T$_", { n => $_ }) . '; ' for 1 .. 5;
$node->safe_psql('postgres', "$sql COMMIT");

$node->poll_query_until('postgres',
	"SELECT pending = 0 AND in_dlq = 1 FROM outbox_stats WHERE topic = 'acme.order.shipped.v1'")
  or die 'the topic did not settle';
is( $node->safe_psql('postgres',
		"SELECT aggregate_id || ' ' || (payload->>'n') || ' ' || reason || ' ' || error_code || ' ' "
		  . "|| (last_error LIKE 'MSG_SIZE_TOO_LARGE: %') || ' ' || (retry_count BETWEEN 1 AND 2) FROM outbox_dlq"),
	'S 2 permanent_error MSG_SIZE_TOO_LARGE true true',
	'the large event is dead at once, with its reason and error');
my @msgs = consume_events($kafka, 'acme.order.shipped.v1', 7);
is_deeply([ map { $_->{event}{payload}{n} } grep { $_->{key} eq 'S' } @msgs ], [ 1, 3 ],
	'its key goes on, in order');
is_deeply([ sort map { $_->{key} } grep { $_->{key} ne 'S' } @msgs ], [ map { "T$_" } 1 .. 5 ],
	'the events that shared its batch are delivered');
check_same_events($node, \@msgs, "topic = 'acme.order.shipped.v1' AND status <> 'dead'",
	'too large for the topic');
is($node->safe_psql('postgres', "SELECT count(*) FROM outbox WHERE status = 'delivered'"),
	'7', 'every other event is delivered');
ok( $node->log_contains('moved to the dead-letter queue'),
	'the log says an event went to the dead-letter queue');

# --- librdkafka refuses the event before sending it.
$node->append_conf('postgresql.conf', "voutbox.kafka_properties = 'message.max.bytes=3000'\n");
$node->reload;
$node->poll_query_until('postgres', "SELECT setting = 'message.max.bytes=3000' FROM pg_settings WHERE name = 'voutbox.kafka_properties'")
  or die 'no reload';
$node->safe_psql('postgres',
	'BEGIN; '
	  . save_sql('acme', 'order.packed.v1', 'P', { n => 1 }) . '; '
	  . "SELECT outbox_save('acme', 'order', 'P', 'order.packed.v1', $big); "
	  . save_sql('acme', 'order.packed.v1', 'P', { n => 3 }) . '; COMMIT');
$node->poll_query_until('postgres',
	"SELECT pending = 0 AND in_dlq = 1 FROM outbox_stats WHERE topic = 'acme.order.packed.v1'")
  or die 'the refused event is not dead';
is( $node->safe_psql('postgres',
		"SELECT string_agg((payload->>'n') || ':' || status, ',' ORDER BY created_at, (payload->>'n')) "
		  . "FROM outbox WHERE aggregate_id = 'P'"),
	'1:delivered,2:dead,3:delivered', 'the refused event is dead, its key goes on');
is( $node->safe_psql('postgres',
		"SELECT error_code FROM outbox_dlq WHERE topic = 'acme.order.packed.v1'"),
	'MSG_SIZE_TOO_LARGE', "librdkafka's refusal is recorded");

# --- The producer is fixed; the dead event is requeued from SQL, in the
# same transaction as a fix of its data.
$node->append_conf('postgresql.conf', "voutbox.kafka_properties = ''\n");
$node->reload;
$node->poll_query_until('postgres', "SELECT setting = '' FROM pg_settings WHERE name = 'voutbox.kafka_properties'")
  or die 'no reload';
my $dead = $node->safe_psql('postgres', "SELECT id FROM outbox_dlq WHERE topic = 'acme.order.packed.v1'");
is( $node->safe_psql('postgres',
		"BEGIN; UPDATE outbox_dlq SET payload = payload || '{\"fixed\": true}' WHERE id = '$dead'; "
		  . "SELECT outbox_dlq_requeue_where(error_code => 'MSG_SIZE_TOO_LARGE', event_type => 'order.packed.v1'); "
		  . 'COMMIT'),
	'1', 'requeued by filter');
wait_for_delivered($node, 3, "aggregate_id = 'P'");
@msgs = consume_events($kafka, 'acme.order.packed.v1', 3);
is_deeply([ map { $_->{event}{payload}{n} } @msgs ], [ 1, 3, 2 ], 'the requeued event arrives');
is($msgs[2]{event}{id}, $dead, 'with its id');
is($msgs[2]{event}{payload}{fixed}, JSON::PP::true, 'and the fixed payload');

# --- The other dead event is discarded.
is($node->safe_psql('postgres', "SELECT outbox_dlq_discard_where(tenant_id => 'acme')"),
	'1', 'discarded by filter');
is( $node->safe_psql('postgres', "SELECT status || ' ' || (published_at IS NULL) FROM outbox WHERE payload->>'pad' IS NOT NULL AND aggregate_id = 'S'"),
	'discarded true', 'the outbox view shows it discarded, never published');
is($node->safe_psql('postgres', 'SELECT count(*) FROM outbox_dlq'), '0', 'the DLQ is empty');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM outbox WHERE status NOT IN ('delivered', 'discarded')"),
	'0', 'nothing waits');

$node->stop;
kafka_stop($kafka);
done_testing();
