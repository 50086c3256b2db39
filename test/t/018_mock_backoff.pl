# Two faults librdkafka's mock cluster stages on demand:
#  - A producer that fails fatally as soon as it is built (here the cluster
#    refuses the idempotent producer its id, as a cluster without the
#    IdempotentWrite ACL would): the worker builds the next one after 1, 2,
#    4... seconds rather than every second, says so, and resumes once the
#    cluster agrees.
#  - A delivery report _MSG_TIMED_OUT with voutbox.delivery_timeout at its
#    largest value: the topic's new events then wait for its retry.  The
#    wait is computed without overflowing an int (which made it a wait in
#    the past, and which UBSan reports in the sanitizer pass).
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $mock = mock_start(brokers => 1);
mock_cmd($mock, "create-topic acme.item.ok.v1 1");
mock_cmd($mock, "create-topic acme.item.slow.v1 1");
my $node = voutbox_node('mock_backoff', $mock,
	'voutbox.backoff_base' => '30s',
	'voutbox.max_retries' => '1000',
	'voutbox.kafka_properties' => 'socket.connection.setup.timeout.ms=5000; reconnect.backoff.max.ms=1000');
$node->safe_psql('postgres', save_sql('acme', 'item.ok.v1', 'warmup', { n => 0 }));
wait_for_delivered($node, 1);

# --- Every new producer is refused its id.  The running one is stopped by a
# fatal error first.
my $built = $node->safe_psql('postgres', 'SELECT producers_built FROM outbox_worker');
mock_cmd($mock, 'push-errors 22 ' . join(' ', ('CLUSTER_AUTHORIZATION_FAILED') x 4));
mock_cmd($mock, 'push-errors 0 OUT_OF_ORDER_SEQUENCE_NUMBER');
$node->safe_psql('postgres', save_sql('acme', 'item.ok.v1', 'k', { n => $_ })) for 1 .. 3;
$node->wait_for_log(qr/the Kafka producer failed 3 times in a row before it delivered anything; the next one is built in 4000 ms/);
my @delays = slurp_file($node->logfile) =~ /failed \d+ times? in a row before it delivered anything; the next one is built in (\d+) ms/g;
is(join(',', @delays[ 0 .. 2 ]), '1000,2000,4000', 'each failed producer doubles the wait for the next');
$node->poll_query_until('postgres', "SELECT state = 'producer failing' FROM outbox_worker")
  or die 'outbox_worker does not say the producer fails';
pass('outbox_worker says the producer fails');
wait_for_delivered($node, 4, "topic = 'acme.item.ok.v1'");
pass('delivered once the cluster gives the producer an id');
my $now_built = $node->safe_psql('postgres', 'SELECT producers_built FROM outbox_worker');
cmp_ok($now_built - $built, '<=', 6, 'a handful of producers were built, not one a second');
my @msgs = consume_events($mock, 'acme.item.ok.v1', 4);
check_key_order([ grep { $_->{key} eq 'k' } @msgs ], 'n', 'in order');

# --- _MSG_TIMED_OUT reported with delivery_timeout at INT_MAX ms.
$node->append_conf('postgresql.conf', "voutbox.delivery_timeout = '2147483647ms'\n");
$node->reload;
$node->poll_query_until('postgres', "SELECT setting = '2147483647' FROM pg_settings WHERE name = 'voutbox.delivery_timeout'")
  or die 'delivery_timeout not applied';
mock_cmd($mock, 'push-errors 0 _MSG_TIMED_OUT');
$node->safe_psql('postgres', save_sql('acme', 'item.slow.v1', 's1', { n => 1 }));
$node->poll_query_until('postgres', "SELECT status = 'retrying' FROM outbox WHERE aggregate_id = 's1'")
  or die 'the timed-out event is not retrying';
$node->safe_psql('postgres', save_sql('acme', 'item.slow.v1', 's2', { n => 2 }));
$node->poll_query_until('postgres', "SELECT status <> 'pending' FROM outbox WHERE aggregate_id = 's2'")
  or die 'the next event of the topic was not read';
is($node->safe_psql('postgres', "SELECT status FROM outbox WHERE aggregate_id = 's2'"), 'held',
	"a new event of the silent topic waits for the topic's retry");
ok($node->safe_psql('postgres',
		"SELECT next_attempt_at > now() + interval '1 day' FROM outbox WHERE aggregate_id = 's2'") eq 't',
	'until after the retry and its 24-day timeout, not a time in the past');

$node->stop;
mock_stop($mock);
done_testing();
