# Retriable errors, staged on a real broker that does not create topics
# automatically: events for a topic that does not exist yet wait in
# librdkafka for its metadata until the worker's voutbox.delivery_timeout
# gives up on them.  The event is then retried with
# growing delays and never lost; later events of its key wait behind it while
# other keys flow; after voutbox.max_retries it moves to the dead-letter
# queue, its key goes on, and outbox_dlq_requeue() sends it again.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use VoutboxTest;

my $kafka = kafka_start('retry', 'auto.create.topics.enable=false');
kafka_create_topic($kafka, 'acme.order.noted.v1', 2);
my $node = voutbox_node('retry', $kafka,
	# Its missing topics stay missing: voutbox does not create them.
	'voutbox.create_topics' => 'off',
	'voutbox.delivery_timeout' => '1s',
	'voutbox.backoff_base' => '100ms',
	'voutbox.backoff_max' => '1600ms',
	'voutbox.max_retries' => '1000');

# (Alone in flight: a straggler, an event of a topic that does not answer
# while others do, stays in flight instead, t/021.)
$node->safe_psql('postgres',
	'BEGIN; '
	  . save_sql('acme', 'order.placed.v1', 'K', { n => 1 }) . '; '
	  . save_sql('acme', 'order.placed.v1', 'K', { n => 2 }) . '; COMMIT');

# Record every attempt of the head of K (poll with a deadline).
my @attempts;
my $deadline = time + 90;
while (@attempts < 6 && time < $deadline)
{
	my $row = $node->safe_psql('postgres',
		"SELECT retry_count || ' ' || extract(epoch FROM last_error_at) FROM outbox "
		  . "WHERE aggregate_id = 'K' AND status = 'retrying'");
	next unless $row;
	my ($n, $at) = split / /, $row;
	push @attempts, [ $n, $at ] if !@attempts || $attempts[-1][0] != $n;
}
ok(@attempts >= 6, 'the failing event is retried again and again');
# Each gap is a backoff delay plus the delivery timeout (1 s) of the attempt.
my @gaps = map { $attempts[$_][1] - $attempts[ $_ - 1 ][1] } 1 .. $#attempts;
note('delays between attempts (s): ' . join(' ', map { sprintf('%.2f', $_) } @gaps));
my $grows = 1;
$grows &&= $gaps[$_] >= $gaps[ $_ - 1 ] * 0.8 - 0.1 for 1 .. $#gaps;
ok($grows, 'delays do not shrink');
ok($gaps[0] < 1.9, 'the first delay is about backoff_base (0.1 s) plus the timeout');
ok($gaps[-1] >= 1.7 && $gaps[-1] <= 3.5,
	'delays reach backoff_max (1.6 s, jittered down to half) plus the timeout');

$node->safe_psql('postgres', save_sql('acme', 'order.noted.v1', 'L', { n => 1 }));
wait_for_delivered($node, 1, "aggregate_id = 'L'");

is( $node->safe_psql('postgres',
		"SELECT string_agg(aggregate_id || ':' || status, ',' ORDER BY aggregate_id, created_at) FROM outbox "
		  . "WHERE aggregate_id IN ('K', 'L')"),
	'K:retrying,K:held,L:delivered',
	'the key waits behind its failing head; another key flows');
is( $node->safe_psql('postgres',
		"SELECT last_error_code || ' ' || (next_attempt_at > last_error_at OR next_attempt_at IS NULL) "
		  . "FROM outbox WHERE status = 'retrying'"),
	'_MSG_TIMED_OUT true', 'the timeout is recorded, with the next attempt (none while it is in flight)');
is( $node->safe_psql('postgres',
		"SELECT pending || ' ' || waiting_for_retry || ' ' || held || ' ' || in_dlq || ' ' "
		  . "|| (failed_attempts_since_start >= 6) || ' ' || (last_error LIKE '_MSG_TIMED_OUT%') "
		  . "FROM outbox_stats WHERE topic = 'acme.order.placed.v1'"),
	'2 1 1 0 true true', 'outbox_stats shows the retry, the held event and the error');

# --- While the topic does not answer, its new events wait for it instead
# of holding up every round for delivery_timeout; other topics flow.
sub log_count
{
	my ($re) = @_;
	my $n = () = slurp_file($node->logfile) =~ /$re/g;
	return $n;
}
my $head_retries = sub {
	$node->safe_psql('postgres', "SELECT retry_count FROM outbox WHERE aggregate_id = 'K' AND payload->>'n' = '1'");
};
my ($timeouts0, $retries0) = (log_count(qr/events time out/), $head_retries->());
# One event of the silent topic and one of another topic at a time, each
# pair read by the worker before the next is saved: sent, each X would cost
# a round of its own its timeout.
for my $i (1 .. 10)
{
	$node->safe_psql('postgres',
		'BEGIN; ' . save_sql('acme', 'order.placed.v1', "X$i", { n => 1 }) . '; '
		  . save_sql('acme', 'order.noted.v1', "N$i", { n => 1 }) . '; COMMIT');
	$node->poll_query_until('postgres', "SELECT status <> 'pending' FROM outbox WHERE aggregate_id = 'X$i'")
	  or die "X$i was not read";
}
wait_for_delivered($node, 11, "topic = 'acme.order.noted.v1'");
my ($timeouts1, $retries1) = (log_count(qr/events time out/), $head_retries->());
note("during 10 rounds with an event of the silent topic: " . ($timeouts1 - $timeouts0)
	  . ' timeouts, ' . ($retries1 - $retries0) . ' retries of the head');
ok($timeouts1 - $timeouts0 <= $retries1 - $retries0 + 2,
	'new events of the silent topic cost no timeout of their own');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM outbox WHERE aggregate_id LIKE 'X%' AND status IN ('held', 'retrying')"),
	'10', 'they wait for the topic');

# The topic is created: the head goes out, then its key, in order, and the
# events that waited for the topic.
kafka_create_topic($kafka, 'acme.order.placed.v1', 2);
wait_for_delivered($node, 23);
my @msgs = grep { $_->{key} eq 'K' } consume_all($kafka, 'acme.order.placed.v1');
is_deeply([ map { $_->{event}{payload}{n} } @msgs ], [ 1, 2 ],
	'key K arrives in order after the retries');
is($node->safe_psql('postgres', 'SELECT count(*) FROM outbox_dlq'), '0', 'nothing dead');

# --- max_retries: the head goes to the dead-letter queue, its key proceeds.
$node->append_conf('postgresql.conf', "voutbox.max_retries = 2\n");
$node->reload;
$node->safe_psql('postgres',
	'BEGIN; '
	  . save_sql('acme', 'order.returned.v1', 'M', { n => 1 }) . '; '
	  . save_sql('acme', 'order.returned.v1', 'M', { n => 2 }) . '; COMMIT');
$node->poll_query_until('postgres', 'SELECT in_dlq = 1 FROM outbox_stats WHERE topic = \'acme.order.returned.v1\'')
  or die 'nothing reached the dead-letter queue';
$node->append_conf('postgresql.conf', "voutbox.max_retries = 1000\n");
$node->reload;
kafka_create_topic($kafka, 'acme.order.returned.v1', 2);
is( $node->safe_psql('postgres',
		"SELECT aggregate_id || ' ' || retry_count || ' ' || reason || ' ' || error_code || ' ' "
		  . "|| (last_error LIKE '_MSG_TIMED_OUT%') || ' ' || (moved_at IS NOT NULL) || ' ' || (payload->>'n') "
		  . 'FROM outbox_dlq'),
	'M 3 max_retries_exceeded _MSG_TIMED_OUT true true 1',
	'dead letter: retry count, reason, error, last error, time moved, payload');
wait_for_delivered($node, 1, "aggregate_id = 'M'");
is( $node->safe_psql('postgres', "SELECT string_agg(status, ',' ORDER BY created_at) FROM outbox WHERE aggregate_id = 'M'"),
	'dead,delivered', 'the rest of the key is delivered');
@msgs = consume_events($kafka, 'acme.order.returned.v1', 1);
is($msgs[0]{event}{payload}{n}, 2, 'only the second event of M reached Kafka');

# --- The dead event is sent again from SQL: same id, same idempotency key.
my ($dead_id, $dead_key) = split /\|/,
  $node->safe_psql('postgres', 'SELECT id, idempotency_key FROM outbox_dlq');
is($node->safe_psql('postgres', "SELECT outbox_dlq_requeue('$dead_id')"), '1', 'requeued one event');
wait_for_delivered($node, 2, "aggregate_id = 'M'");
# (A timeout while the new topic's metadata spreads may send M's second
# event twice: look at each event's first copy.)
my %seen;
@msgs = grep { !$seen{ $_->{event}{id} }++ } consume_all($kafka, 'acme.order.returned.v1');
is(scalar(@msgs), 2, 'two events of M in Kafka');
is($msgs[1]{event}{id}, $dead_id, 'the requeued event keeps its id');
is($msgs[1]{headers}{idempotency_key}, $dead_key, 'and its idempotency key');
is( $node->safe_psql('postgres',
		"SELECT pending || ' ' || in_dlq || ' ' || delivered_since_start || ' ' || dead_since_start "
		  . "FROM outbox_stats WHERE topic = 'acme.order.returned.v1'"),
	'0 0 2 1', 'outbox_stats: nothing waits, nothing dead, 2 delivered, 1 died on the way');
is($node->safe_psql('postgres', 'SELECT count(*) FROM voutbox.deferred WHERE delivered_at IS NULL'),
	'0', 'nothing waits any more');

$node->stop;
kafka_stop($kafka);
done_testing();
