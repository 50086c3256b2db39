# Topic provisioning with librdkafka's admin API, against a real broker that
# does not create topics itself and enforces ACLs (KRaft StandardAuthorizer;
# every client is User:ANONYMOUS, allowed what no ACL restricts).  A new
# topic is created with voutbox.topic_partitions and voutbox.topic_config
# before its first event goes; a topic the broker refuses to create (a bad
# setting, an ACL) makes its events wait, uncharged, with the reason in
# outbox_stats and the log, and they go once the cause is fixed.
use strict;
use warnings;

use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $vkafka = 'test/tools/vkafka';
my $kafka = kafka_start('topics', 'auto.create.topics.enable=false',
	'authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer',
	'allow.everyone.if.no.acl.found=true');
my $node = voutbox_node('topics', $kafka,
	'voutbox.create_topics' => 'on',
	'voutbox.topic_partitions' => '3',
	'voutbox.topic_config' => 'retention.ms=3600000; max.message.bytes=2000000',
	'voutbox.backoff_base' => '200ms',
	'voutbox.backoff_max' => '1s',
	# Not one retry: a charged failure would go to the DLQ at once.
	'voutbox.max_retries' => '0',
	# (For the part with provisioning off: a missing topic is refused soon.)
	'voutbox.kafka_properties' => 'topic.metadata.propagation.max.ms=300');

sub describe
{
	my ($topic) = @_;
	my $out = `$vkafka describe-topic -b '$kafka->{brokers}' -t '$topic' -T 30 2>/dev/null`;
	return $? == 0 ? decode_json($out) : undef;
}

sub acl
{
	my ($what, $resource, @c) = @_;
	system($vkafka, 'acl', $what, '-b', $kafka->{brokers}, '-t', $resource, map { ('-c', $_) } @c) == 0
	  or die "vkafka acl $what $resource failed";
}

sub status_of
{
	my ($agg) = @_;
	return $node->safe_psql('postgres',
		"SELECT string_agg(status || ' ' || retry_count, ', ' ORDER BY created_at) FROM outbox WHERE aggregate_id = '$agg'");
}

# --- A new topic is created with the configured settings, then delivered to.
ok(!defined describe('acme.lead.created.v1'), 'the topic does not exist beforehand');
$node->safe_psql('postgres',
	'BEGIN; ' . join('; ', map { save_sql('acme', 'lead.created.v1', 'k1', { n => $_ }) } 1 .. 3) . '; COMMIT');
my @msgs = consume_events($kafka, 'acme.lead.created.v1', 3);
is_deeply([ map { $_->{event}{payload}{n} } @msgs ], [ 1, 2, 3 ], 'its events arrive, in order');
my $t = describe('acme.lead.created.v1');
is($t->{partitions}, 3, 'created with voutbox.topic_partitions');
is($t->{config}{'retention.ms'}, '3600000', 'and voutbox.topic_config: retention.ms');
is($t->{config}{'max.message.bytes'}, '2000000', 'and max.message.bytes');

# --- A burst on another new topic, over many keys, saved while the topic is
# being created: every event arrives, once (the first events of a new topic
# once went astray when the producer itself had looked the topic up).
$node->safe_psql('postgres',
	"SELECT count(outbox_save('acme', 'test', 'b-' || (g % 50), 'lead.burst.v1', jsonb_build_object('n', g))) "
	  . "FROM generate_series(1, 500) g");
$node->safe_psql('postgres', save_sql('acme', 'lead.burst.v1', "b-$_", { n => 500 + $_ })) for 1 .. 20;
wait_for_delivered($node, 520, "event_type = 'lead.burst.v1'");
my @burst = consume_all($kafka, 'acme.lead.burst.v1');
check_same_events($node, \@burst, "event_type = 'lead.burst.v1'", 'the burst into a new topic');
check_receipts($node, \@burst, "event_type = 'lead.burst.v1'", 'the burst into a new topic');

# --- A setting the broker refuses: the events wait, uncharged (max_retries
# is 0), the reason is shown; fixed by a reload, they go.
$node->safe_psql('postgres', "ALTER SYSTEM SET voutbox.topic_config = 'retention.ms=forever'");
$node->reload;
$node->safe_psql('postgres', save_sql('acme', 'lead.lost.v1', 'bad1', {}));
$node->poll_query_until('postgres',
	"SELECT last_error LIKE 'could not create topic: INVALID_CONFIG%' FROM outbox_stats WHERE topic = 'acme.lead.lost.v1'")
  or die 'no INVALID_CONFIG in outbox_stats: '
  . $node->safe_psql('postgres', "SELECT last_error FROM outbox_stats WHERE topic = 'acme.lead.lost.v1'");
pass('a refused topic setting is shown in outbox_stats');
like(status_of('bad1'), qr/^(pending|held) 0$/, 'its event waits, no attempt charged');
$node->wait_for_log(qr/voutbox: could not create topic "acme\.lead\.lost\.v1": INVALID_CONFIG/);
pass('and logged');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET voutbox.topic_config');
$node->reload;
$node->poll_query_until('postgres', "SELECT status = 'delivered' FROM outbox WHERE aggregate_id = 'bad1'")
  or die 'bad1: ' . status_of('bad1');
pass('the setting fixed, the topic is created and its event delivered');
is($node->safe_psql('postgres', 'SELECT count(*) FROM outbox_dlq'), '0', 'nothing went to the DLQ');

# --- An ACL refusal.  The cluster allows everything but CREATE, so the
# topic's own ACLs decide; topics "denied.*" may be used, not created.
acl('add', 'kafka-cluster', 'resource=cluster', 'operation=all', 'permission=allow');
acl('add', 'kafka-cluster', 'resource=cluster', 'operation=create', 'permission=deny');
acl('add', 'denied.', 'pattern=prefixed', 'operation=all', 'permission=allow');
acl('add', 'denied.', 'pattern=prefixed', 'operation=create', 'permission=deny');
$node->safe_psql('postgres', save_sql('denied', 'thing.made.v1', 'acl', { n => 1 }));
$node->safe_psql('postgres', save_sql('denied', 'thing.made.v1', 'acl', { n => 2 }));
$node->poll_query_until('postgres',
	"SELECT last_error LIKE 'could not create topic: TOPIC_AUTHORIZATION_FAILED%' FROM outbox_stats WHERE topic = 'denied.thing.made.v1'")
  or die 'no TOPIC_AUTHORIZATION_FAILED in outbox_stats';
pass('an ACL refusal is shown in outbox_stats');
$node->wait_for_log(qr/HINT:  Grant the producer's principal CREATE on the topic/);
pass('the log says what to grant');
# Tried again with backoff (200 ms, 400 ms, ...): still waiting, uncharged.
my $offset = -s $node->logfile;
$node->wait_for_log(qr/could not create topic "denied\.thing\.made\.v1": TOPIC_AUTHORIZATION_FAILED/, $offset);
is(status_of('acl'), 'held 0, held 0', 'tried again, its events still wait, uncharged');
is($node->safe_psql('postgres', "SELECT string_agg(DISTINCT last_error_code, ',') FROM outbox WHERE aggregate_id = 'acl'"),
	'TOPIC_AUTHORIZATION_FAILED', 'outbox says why');

# Meanwhile, another new topic is created and delivered to.
$node->safe_psql('postgres', save_sql('acme', 'lead.won.v1', 'won1', {}));
consume_events($kafka, 'acme.lead.won.v1', 1);

# The refusal lifted: the topic is created on the next try.
acl('delete', 'denied.', 'pattern=prefixed', 'operation=create', 'permission=deny');
acl('delete', 'kafka-cluster', 'resource=cluster', 'operation=create', 'permission=deny');
@msgs = consume_events($kafka, 'denied.thing.made.v1', 2);
is(join(',', map { $_->{event}{payload}{n} } @msgs), '1,2', 'the ACL lifted, both go, in order');
wait_for_delivered($node, 2, "tenant_id = 'denied'");
is($node->safe_psql('postgres', 'SELECT count(*) FROM outbox_dlq'), '0', 'still nothing in the DLQ');

# --- Provisioning off: a missing topic is not created; its event is
# refused by librdkafka, charged, and (max_retries 0) dead-lettered.
$node->safe_psql('postgres', 'ALTER SYSTEM SET voutbox.create_topics = off');
$node->reload;
$node->safe_psql('postgres', save_sql('acme', 'lead.gone.v1', 'off1', {}));
$node->poll_query_until('postgres', "SELECT count(*) = 1 FROM outbox_dlq WHERE aggregate_id = 'off1'")
  or die 'off1: ' . status_of('off1');
pass('provisioning off: the refused event is charged');
ok(!defined describe('acme.lead.gone.v1'), 'and its topic was not created');

$node->stop;
kafka_stop($kafka);
done_testing();
