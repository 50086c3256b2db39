# A topic that does not answer delays only its own events.  On a real
# broker that does not create topics automatically, the events of a topic
# that does not exist yet wait in librdkafka for its metadata (up to its
# topic.metadata.propagation.max.ms, 30 s): to the worker they are simply
# not acknowledged, while another topic's events are.
#
# - Isolation: the silent topic's first event straggles out of its round,
#   which is settled without it: the other topic's events are delivered and
#   recorded as such while it is still in flight, well before
#   voutbox.delivery_timeout; the straggler waits in voutbox.deferred as in
#   flight (due at 'infinity'), holding its key, and the topic's new events
#   wait for it.
# - Crash: a worker that stops with a straggler in flight leaves it due to
#   the next one, which delivers it once the topic answers.
# - Deadline: every delivery_timeout a straggler goes without a report
#   counts as a failed attempt, while librdkafka keeps trying; with no retry
#   left it goes to the DLQ (the producer is given up on); the other topic
#   flows on.
# - Refused at once: a topic librdkafka knows to be missing refuses its
#   events when they are handed over; the other topic's events of the same
#   round go at once.
# Every case: no loss, no phantom, per-key order, nothing dead.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('silent', 'auto.create.topics.enable=false');
kafka_create_topic($kafka, 'acme.flow.v1', 4);

my $node = voutbox_node('silent', $kafka,
	# Its missing topics stay missing: voutbox does not create them.
	'voutbox.create_topics' => 'off',
	'voutbox.delivery_timeout' => '15s',
	'voutbox.backoff_base' => '200ms',
	'voutbox.backoff_max' => '1s',
	'voutbox.max_retries' => '1000');
$node->safe_psql('postgres', save_sql('acme', 'flow.v1', 'warmup', { n => 0 }));
wait_for_delivered($node, 1);

my $flows = 0;
# Save $n events of the flowing topic, one transaction each, over 10 keys.
sub save_flow
{
	my ($n) = @_;
	$node->safe_psql('postgres',
		join(";\n", map { save_sql('acme', 'flow.v1', 'f' . ($_ % 10), { n => $flows + $_ }) } 1 .. $n));
	$flows += $n;
	return;
}

sub silent_status
{
	my ($agg, $n) = @_;
	return $node->safe_psql('postgres',
		"SELECT status || '/' || retry_count FROM outbox "
		  . "WHERE topic = 'acme.silent.v1' AND aggregate_id = '$agg' AND (payload->>'n')::int = $n");
}

# --- Isolation.
$node->safe_psql('postgres', save_sql('acme', 'silent.v1', 'a', { n => 1 }));
save_flow(40);
wait_for_delivered($node, 1 + $flows, "topic = 'acme.flow.v1'");
is(silent_status('a', 1), 'pending/0',
	'the other topic was delivered while the silent event is still in flight, untried');
$node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM voutbox.deferred WHERE due_at = 'infinity' AND holds_key AND delivered_at IS NULL")
  or die 'the straggler was not recorded in flight';
pass('the straggler waits in voutbox.deferred as in flight, holding its key');
ok($node->log_contains(qr/1 events \(first of topic "acme\.silent\.v1"\) have no delivery report/),
	'the log says a straggler left its round');

# The silent topic's key waits behind its straggler; its other keys wait for
# the topic; the other topic flows.
$node->safe_psql('postgres',
	join(";\n", save_sql('acme', 'silent.v1', 'a', { n => 2 }),
		save_sql('acme', 'silent.v1', 'b', { n => 1 })));
save_flow(20);
wait_for_delivered($node, 1 + $flows, "topic = 'acme.flow.v1'");
$node->poll_query_until('postgres',
	"SELECT count(*) = 2 FROM outbox WHERE topic = 'acme.silent.v1' AND status = 'held'")
  or die 'the silent topic\'s new events do not wait';
is(silent_status('a', 2) . ' ' . silent_status('b', 1) . ' ' . silent_status('a', 1),
	'held/0 held/0 pending/0',
	'the straggler\'s key and topic wait for it, unsent, while the other topic flows');

# --- Crash with the straggler in flight: the topic answers while the
# server is down; the next worker sends it again, and its key follows.
$node->stop('immediate');
kafka_create_topic($kafka, 'acme.silent.v1', 2);
$node->start;
save_flow(10);
wait_for_delivered($node, 1 + $flows + 3);
pass('the straggler left in flight by a stopped worker is delivered by the next one');

# --- Deadline, on another topic that does not exist: with a shorter
# delivery_timeout, every 2 s without a report counts as a failed attempt
# while librdkafka keeps trying (the event stays in flight, sent once); with
# no retry left, the producer is given up on and the straggler goes to the
# DLQ.  The other topic flows meanwhile.
$node->append_conf('postgresql.conf', "voutbox.delivery_timeout = '2s'\nvoutbox.max_retries = 2\n");
$node->reload;
$node->safe_psql('postgres', save_sql('acme', 'silent2.v1', 'd', { n => 1 }));
save_flow(20);
$node->poll_query_until('postgres',
	"SELECT status || '/' || retry_count || '/' || (next_attempt_at IS NULL) FROM outbox "
	  . "WHERE topic = 'acme.silent2.v1' AND aggregate_id = 'd'",
	'retrying/1/true')
  or die 'the straggler was not charged a timeout in flight';
pass('a straggler out-waiting delivery_timeout is charged an attempt, still in flight');
ok($node->log_contains(qr/1 stragglers have had no delivery report for another 2000 ms/),
	'the log says so');
save_flow(20);
wait_for_delivered($node, 1 + $flows + 3, "topic <> 'acme.silent2.v1'");
$node->poll_query_until('postgres',
	"SELECT reason || ' ' || error_code || ' ' || retry_count FROM outbox_dlq WHERE aggregate_id = 'd'",
	'max_retries_exceeded _MSG_TIMED_OUT 3')
  or die 'the straggler did not go to the DLQ';
pass('with no retry left, the straggler goes to the DLQ');
ok($node->log_contains(qr/some have no retry left; \d+ events in flight are given up/),
	'the log says the producer was given up on');
save_flow(20);
wait_for_delivered($node, 1 + $flows + 3, "topic <> 'acme.silent2.v1'");
pass('the other topic flows on with a new producer');

# --- Refused at once: once librdkafka's metadata says a topic is missing
# (after topic.metadata.propagation.max.ms, here 300 ms) it refuses each of
# the topic's events when it is handed one, and only those: the other
# topic's events of the same round are sent, not deferred behind them as
# after a failure of the producer.  With max_retries 0 a refused event goes
# to the DLQ at once, its topic not stalled: the next round hands the
# producer events of the missing topic again.
$node->append_conf('postgresql.conf',
	"voutbox.kafka_properties = 'topic.metadata.propagation.max.ms=300'\n"
	  . "voutbox.max_retries = 0\nvoutbox.delivery_timeout = '15s'\n");
$node->reload;
$node->safe_psql('postgres', save_sql('acme', 'gone.v1', 'g0', { n => 0 }));
$node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM outbox_dlq WHERE topic = 'acme.gone.v1' AND aggregate_id = 'g0' "
	  . "AND error_code IN ('_UNKNOWN_TOPIC', 'UNKNOWN_TOPIC_OR_PART')")
  or die 'the missing topic\'s event did not fail';
my $before = $flows;
# One transaction, so one round: each refused event comes before events of
# the other topic.
$node->safe_psql('postgres',
	join(";\n", 'BEGIN',
		(map { (save_sql('acme', 'gone.v1', "g$_", { n => 1 }),
				save_sql('acme', 'flow.v1', 'f' . ($_ % 10), { n => $before + $_ })) } 1 .. 5),
		'COMMIT'));
$flows += 5;
wait_for_delivered($node, 1 + $flows + 3, "topic <> 'acme.silent2.v1' AND topic <> 'acme.gone.v1'");
is($node->safe_psql('postgres',
		"SELECT count(*) FROM voutbox.deferred "
		  . "WHERE topic = 'acme.flow.v1' AND (payload->>'n')::int > $before"),
	'0', 'the other topic\'s events of the round went at once, not deferred behind the refused ones');
$node->poll_query_until('postgres',
	"SELECT count(*) = 5 FROM outbox_dlq WHERE topic = 'acme.gone.v1' AND aggregate_id <> 'g0' "
	  . "AND error_code = '_UNKNOWN_TOPIC' AND reason = 'max_retries_exceeded'")
  or die 'the refused events were not each charged their attempt';
pass('each refused event is charged its attempt');
# Once the topic exists, they are sent again from the DLQ (a requeue wakes
# the worker, which looks at the deferred events again).
$node->append_conf('postgresql.conf', "voutbox.max_retries = 1000\n");
$node->reload;
kafka_create_topic($kafka, 'acme.gone.v1', 2);
is($node->safe_psql('postgres', "SELECT outbox_dlq_requeue_where(event_type => 'gone.v1')"), '6',
	'the refused events are requeued');
wait_for_delivered($node, 6, "topic = 'acme.gone.v1'");
pass('the refused events go once the topic exists');

my @flow = grep { $_->{event}{aggregate_id} ne 'warmup' } consume_all($kafka, 'acme.flow.v1');
check_same_events($node, \@flow, "topic = 'acme.flow.v1' AND aggregate_id <> 'warmup'",
	'flowing topic');
check_key_order(\@flow, 'n', 'flowing topic: per-key order holds');
my @silent = consume_all($kafka, 'acme.silent.v1');
check_same_events($node, \@silent, "topic = 'acme.silent.v1'", 'silent topic');
check_key_order(\@silent, 'n', 'silent topic: per-key order holds');
my @gone = consume_all($kafka, 'acme.gone.v1');
check_same_events($node, \@gone, "topic = 'acme.gone.v1'", 'refused topic');
is($node->safe_psql('postgres', "SELECT string_agg(topic || ':' || status, ',') FROM outbox WHERE status <> 'delivered'"),
	'acme.silent2.v1:dead', 'nothing waits; the one dead event is the second silent topic\'s');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM voutbox.deferred WHERE due_at = 'infinity' AND delivered_at IS NULL"),
	'0', 'nothing is left in flight');

$node->stop;
kafka_stop($kafka);
done_testing();
