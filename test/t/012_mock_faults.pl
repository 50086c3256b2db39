# Fault injection with librdkafka's mock cluster (test/tools/vkafka mock), for
# faults a real broker cannot stage on demand: retriable errors on Produce
# (retried with growing delays, then delivered), permanent errors (straight
# to the dead-letter queue), all brokers down then up, added round-trip
# latency, an error that breaks the idempotent producer's sequence, and
# librdkafka acknowledging an event of a failed request without an offset.
# Every case checks no loss, no phantom, per-key order, and the exact
# contents of the DLQ.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $mock = mock_start(brokers => 1);
mock_cmd($mock, "create-topic acme.order.placed.v1 1");
mock_cmd($mock, "create-topic acme.order.denied.v1 1");
mock_cmd($mock, "create-topic acme.counter.bumped.v1 4");
mock_cmd($mock, "create-topic acme.order.acked.v1 1");
my $node = voutbox_node('mock', $mock,
	'voutbox.delivery_timeout' => '1s',
	'voutbox.backoff_base' => '200ms',
	'voutbox.backoff_max' => '3s',
	'voutbox.max_retries' => '1000',
	# librdkafka's own mock tests: a downed mock broker keeps its port
	'voutbox.kafka_properties' => 'socket.connection.setup.timeout.ms=5000; reconnect.backoff.max.ms=1000');

# Wait for a first delivery: the producer has its id and the topic metadata.
$node->safe_psql('postgres', save_sql('acme', 'counter.bumped.v1', 'warmup', { n => 0 }));
wait_for_delivered($node, 1);

sub saved
{
	my ($where) = @_;
	return $node->safe_psql('postgres', "SELECT count(*) FROM outbox WHERE $where");
}

# --- Retriable errors: every Produce request fails with NOT_ENOUGH_REPLICAS
# for a while.  librdkafka retries each one after 100 ms by itself; the
# worker gives up on an attempt after delivery_timeout and retries the event
# with exponential backoff, its key's later event behind it.
my $built = $node->safe_psql('postgres', 'SELECT producers_built FROM outbox_worker');
mock_cmd($mock, 'push-errors 0 ' . join(' ', ('NOT_ENOUGH_REPLICAS') x 45));
$node->safe_psql('postgres',
	'BEGIN; '
	  . save_sql('acme', 'order.placed.v1', 'K', { n => 1 }) . '; '
	  . save_sql('acme', 'order.placed.v1', 'K', { n => 2 }) . '; COMMIT');
# Each attempt: the delay the worker chose (next attempt - failure time).
my %delay;
my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
while (time < $deadline)
{
	my $row = $node->safe_psql('postgres',
		"SELECT retry_count || ' ' || round(extract(epoch FROM next_attempt_at - last_error_at) * 1000) "
		  . "FROM outbox WHERE aggregate_id = 'K' AND status = 'retrying'");
	if ($row)
	{
		my ($n, $ms) = split / /, $row;
		$delay{$n} //= $ms;
	}
	last if saved("aggregate_id = 'K' AND status = 'delivered'") == 2;
}
is(saved("aggregate_id = 'K' AND status = 'delivered'"), 2, 'retriable errors: delivered in the end');
my @n = sort { $a <=> $b } keys %delay;
note('retriable errors: delay after attempt ' . join(', ', map { "$_: $delay{$_} ms" } @n));
ok(@n >= 2, 'retriable errors: retried more than once (' . scalar(@n) . ' attempts seen)');
my $bounds_ok = 1;
for my $k (@n)
{
	my $full = 200 * 2**($k - 1);
	$full = 3000 if $full > 3000;
	# equal jitter: between half and all of the doubled delay
	$bounds_ok &&= $delay{$k} >= $full / 2 - 5 && $delay{$k} <= $full + 5;
	diag("attempt $k: $delay{$k} ms not in [" . $full / 2 . ", $full]") unless $bounds_ok;
}
ok($bounds_ok, 'retriable errors: exponential backoff with jitter from backoff_base');
# Below the cap, the delay of attempt k+1 is drawn from [d, 2d] when that of
# attempt k is from [d/2, d]: it never shrinks.
my $grows = 1;
for my $i (1 .. $#n)
{
	next if 200 * 2**($n[$i] - 1) > 3000;
	$grows &&= $delay{ $n[$i] } >= $delay{ $n[ $i - 1 ] };
}
ok($grows, 'retriable errors: delays grow up to backoff_max');
ok((grep { $_ >= 5 } @n) > 0, 'retriable errors: retried until the delays reach their cap');
ok($node->safe_psql('postgres', "SELECT retry_count >= 2 FROM outbox WHERE aggregate_id = 'K' AND payload->>'n' = '1'") eq 't',
	'retriable errors: the retry count stays with the delivered event');
ok($node->safe_psql('postgres', 'SELECT producers_built FROM outbox_worker') > $built,
	'retriable errors: each timed-out attempt rebuilt the producer');
my @msgs = consume_events($mock, 'acme.order.placed.v1', 2);
is_deeply([ map { $_->{event}{payload}{n} } @msgs ], [ 1, 2 ], 'retriable errors: key order kept');
check_same_events($node, \@msgs, "topic = 'acme.order.placed.v1'", 'retriable errors');
is($node->safe_psql('postgres', 'SELECT count(*) FROM outbox_dlq'), '0', 'retriable errors: nothing dead');

# --- Permanent errors: the next two Produce requests are refused with
# TOPIC_AUTHORIZATION_FAILED.  The first fails a batch of three events: each
# key's head goes again alone; the second fails one of them sent alone (D1
# as a rule: which one depends on how librdkafka grouped the requests, which
# this test does not control), and it is dead at once.  The rest goes on.
mock_cmd($mock, 'push-errors 0 TOPIC_AUTHORIZATION_FAILED TOPIC_AUTHORIZATION_FAILED');
$node->safe_psql('postgres',
	'BEGIN; '
	  . save_sql('acme', 'order.denied.v1', 'D', { n => 1 }) . '; '
	  . save_sql('acme', 'order.denied.v1', 'D', { n => 2 }) . '; '
	  . save_sql('acme', 'order.denied.v1', 'E', { n => 1 }) . '; COMMIT');
$node->poll_query_until('postgres',
	"SELECT pending = 0 FROM outbox_stats WHERE topic = 'acme.order.denied.v1'")
  or die 'permanent errors: the topic did not settle';
my $dead = $node->safe_psql('postgres',
	"SELECT string_agg(aggregate_id || (payload->>'n') || ' ' || reason || ' ' || error_code || ' ' || retry_count, ';') "
	  . 'FROM outbox_dlq');
like($dead, qr/\A[DE]1 permanent_error TOPIC_AUTHORIZATION_FAILED 2\z/,
	'permanent errors: exactly one event is dead, refused alone, with reason and error');
my ($dead_event) = $dead =~ /\A(\w\d)/;
@msgs = consume_events($mock, 'acme.order.denied.v1', 2);
is_deeply([ sort map { $_->{key} . $_->{event}{payload}{n} } @msgs ],
	[ sort grep { $_ ne $dead_event } qw(D1 D2 E1) ],
	"permanent errors: the rest is delivered (dead: $dead_event)");
check_same_events($node, \@msgs, "topic = 'acme.order.denied.v1' AND status <> 'dead'", 'permanent errors');
is( $node->safe_psql('postgres',
		"SELECT in_dlq || ' ' || dead_since_start FROM outbox_stats WHERE topic = 'acme.order.denied.v1'"),
	'1 1', 'permanent errors: outbox_stats counts the dead event');
ok($node->log_contains('the Kafka producer failed: _GAPLESS_GUARANTEE'),
	'permanent errors: the failed batch stopped the producer (gap-less guarantee), which was rebuilt');
$built = $node->safe_psql('postgres', 'SELECT producers_built FROM outbox_worker');

# Load for the next cases: 10 keys, each with increasing n, one event per
# transaction.
my $counter = 0;
sub load
{
	my ($count) = @_;
	for (1 .. $count)
	{
		$counter++;
		$node->safe_psql('postgres',
			save_sql('acme', 'counter.bumped.v1', 'c' . ($counter % 10), { n => $counter }));
	}
	return;
}

# --- All brokers down, then up: the worker waits without using up retries.
load(50);
wait_for_delivered($node, 51, "topic = 'acme.counter.bumped.v1'");
my $failed = $node->safe_psql('postgres', 'SELECT failed_attempts FROM outbox_worker');
mock_cmd($mock, 'down -1');
load(100);
$node->poll_query_until('postgres', "SELECT state = 'broker unreachable' FROM outbox_worker")
  or die 'brokers down: the worker does not say so';
pass('brokers down: outbox_worker says the broker is unreachable');
# Three times the delivery timeout pass...
my $t0 = $node->safe_psql('postgres', 'SELECT now()');
$node->poll_query_until('postgres', "SELECT now() > '$t0'::timestamptz + interval '3 seconds'");
is($node->safe_psql('postgres', 'SELECT failed_attempts FROM outbox_worker'), $failed,
	'brokers down: no retry is used up while no broker answers');
mock_cmd($mock, 'up -1');
wait_for_delivered($node, 151, "topic = 'acme.counter.bumped.v1'");
pass('brokers down: everything is delivered when they are back');

# --- Added round-trip latency (400 ms per request).
mock_cmd($mock, 'rtt -1 400');
load(50);
wait_for_delivered($node, 201, "topic = 'acme.counter.bumped.v1'");
pass('latency: delivered');
mock_cmd($mock, 'rtt -1 0');
is($node->safe_psql('postgres', "SELECT count(*) FROM outbox WHERE topic = 'acme.counter.bumped.v1' AND retry_count > 0"),
	'0', 'outage and latency: no event needed a retry');

# --- The broker loses the producer's sequence: OUT_OF_ORDER_SEQUENCE_NUMBER
# is the producer's trouble, not the events'.
mock_cmd($mock, 'push-errors 0 OUT_OF_ORDER_SEQUENCE_NUMBER');
load(20);
wait_for_delivered($node, 221, "topic = 'acme.counter.bumped.v1'");
pass('broken sequence: delivered');
ok($node->log_contains('the Kafka producer failed: OUT_OF_ORDER_SEQUENCE_NUMBER'),
	'broken sequence: a fatal error of the idempotent producer');
ok($node->safe_psql('postgres', 'SELECT producers_built FROM outbox_worker') > $built,
	'broken sequence: the producer was rebuilt and the unsettled events sent again');

# Everything the topic holds, read to the end (not "the first 221": a
# duplicate would end that read before a later event).
@msgs = consume_all($mock, 'acme.counter.bumped.v1');
check_same_events($node, \@msgs, "topic = 'acme.counter.bumped.v1'", 'outage, latency, sequence');
check_receipts($node, \@msgs, "topic = 'acme.counter.bumped.v1'", 'outage, latency, sequence');
check_key_order(\@msgs, 'n', 'outage, latency, sequence: per-key order holds');
is($node->safe_psql('postgres', "SELECT count(*) FROM outbox_dlq WHERE topic = 'acme.counter.bumped.v1'"),
	'0', 'outage, latency, sequence: nothing dead');
# --- librdkafka's implicit acknowledgement.  A Produce request fails
# (NOT_LEADER_FOR_PARTITION, answered after 1.5 s) while a later request for
# the partition is in flight, and that one succeeds: then librdkafka takes
# the failed request's event for written and acknowledges it without an
# offset.  A real broker does this to a partition just created (KAFKA-15591;
# seen in t/025).  The worker sends such an event again, uncharged the first
# time, charged the second time.
#
# Staging: event A's request fails (the mock broker is seen to take it), B's
# goes while A's is in flight and succeeds; with $twice, A's request sent
# again fails too, with C's behind it.  Staged, A's receipt is behind B's
# (and C's).  The requests fail after 1.5 s, a wide margin for the worker to
# send the next event (a longer delivery_timeout leaves them unstalled).
my $producers = $node->safe_psql('postgres', 'SELECT producers_built FROM outbox_worker');
$node->safe_psql('postgres', "ALTER SYSTEM SET voutbox.delivery_timeout = '10s'");
$node->reload;
$node->safe_psql('postgres', save_sql('acme', 'order.acked.v1', 'w', { n => 0 }));
# (A new setting, a new producer.)
$node->poll_query_until('postgres', "SELECT producers_built > $producers FROM outbox_worker")
  or die 'the new delivery_timeout did not make a new producer';
wait_for_delivered($node, 1, "topic = 'acme.order.acked.v1'");
my $saved = 1;
my $log_offset = -s $node->logfile;

sub acked_save
{
	my ($agg) = @_;
	$node->safe_psql('postgres', save_sql('acme', 'order.acked.v1', $agg, { n => ++$saved }));
	return;
}

sub offset_of
{
	my ($agg) = @_;
	return $node->safe_psql('postgres',
		"SELECT coalesce(kafka_offset, -1) FROM outbox WHERE aggregate_id = '$agg'");
}

sub stage_implicit_ack
{
	my ($name, $twice) = @_;
	my ($a, $b, $c) = ("$name-a", "$name-b", "$name-c");
	my $left = $twice ? 4 : 2;
	mock_cmd($mock, 'broker-errors 1 0 NOT_LEADER_FOR_PARTITION:1500 NO_ERROR:100'
		  . ($twice ? ' NOT_LEADER_FOR_PARTITION:1500 NO_ERROR:100' : ''));
	acked_save($a);
	mock_cmd($mock, 'wait-errors 1 0 ' . --$left);
	acked_save($b);
	mock_cmd($mock, 'wait-errors 1 0 ' . --$left);
	if ($twice)
	{
		mock_cmd($mock, 'wait-errors 1 0 ' . --$left);
		acked_save($c);
	}
	wait_for_delivered($node, $saved, "topic = 'acme.order.acked.v1'");
	my ($at, $bt) = (offset_of($a), offset_of($b));
	my $ct = $twice ? offset_of($c) : -1;
	note("$name: $a at $at, $b at $bt" . ($twice ? ", $c at $ct" : ''));
	# (No receipt: counted delivered on librdkafka's word, the loss itself.)
	return $at < 0 || ($at > $bt && $at > $ct) ? $a : undef;
}

my $once = stage_implicit_ack('once', 0);
ok(defined $once, 'implicit acknowledgement: staged (a failed request, a later one acknowledged)');
$once //= 'none';
is($node->safe_psql('postgres', "SELECT retry_count || ' ' || last_error_code FROM outbox WHERE aggregate_id = '$once'"),
	'0 VOUTBOX_UNCONFIRMED', 'implicit acknowledgement: sent again uncharged, the reason recorded');
my $twice = stage_implicit_ack('twice', 1) // 'none';
is($node->safe_psql('postgres', "SELECT retry_count || ' ' || last_error_code FROM outbox WHERE aggregate_id = '$twice'"),
	'1 VOUTBOX_UNCONFIRMED', 'implicit acknowledgement a second time: charged a retry');
my $once_id = $node->safe_psql('postgres', "SELECT id FROM outbox WHERE aggregate_id = '$once'");
ok($node->log_contains(qr/1 event was acknowledged without an offset; it is not counted delivered\n.*First: event \Q$once_id\E/,
		$log_offset),
	'implicit acknowledgement: the worker says so');
@msgs = consume_all($mock, 'acme.order.acked.v1');
check_same_events($node, \@msgs, "topic = 'acme.order.acked.v1'", 'implicit acknowledgement');
check_receipts($node, \@msgs, "topic = 'acme.order.acked.v1'", 'implicit acknowledgement');

is($node->safe_psql('postgres', 'SELECT count(*) FROM voutbox.deferred WHERE delivered_at IS NULL'),
	'0', 'nothing waits at the end');

$node->stop;
mock_stop($mock);
done_testing();
