# Committed events arrive in Kafka with the exact envelope, headers, topic
# and key; rolled-back ones never do; the worker shows in pg_stat_activity.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('delivery');
my $node = voutbox_node('delivery', $kafka);

# The launcher and the worker are visible, named, and say what they do.
$node->poll_query_until('postgres',
	"SELECT query = 'waiting for events' FROM pg_stat_activity WHERE backend_type = 'voutbox worker'")
  or die "the worker did not come up";
is( $node->safe_psql('postgres',
		"SELECT backend_type || ': ' || state || ', ' || query FROM pg_stat_activity "
		  . "WHERE backend_type LIKE 'voutbox%' ORDER BY backend_type"),
	"voutbox launcher: idle, supervising 1 delivery worker\n"
	  . "voutbox worker: idle, waiting for events",
	'launcher and worker in pg_stat_activity');

# One event with every argument, inside a session that has a trace context.
my $full = $node->safe_psql('postgres', q{
	SET voutbox.traceparent = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01';
	SELECT outbox_save(tenant_id => 'acme', aggregate_type => 'lead', aggregate_id => '42',
		event_type => 'lead.created.v1',
		payload => '{"source": "web", "amount": 0.10, "big": 123456789012345678901234567890, "name": "Zoë"}',
		metadata => '{"ip": "10.0.0.1"}', idempotency_key => 'lead-42-created',
		correlation_id => 'signup-7', pii => true, pii_fields => ARRAY['email', 'phone'],
		consent => '{"marketing": true}', producer => 'leads@1.2.3')});

# One that rolls back, then one with every default.
$node->safe_psql('postgres', q{
	BEGIN;
	SELECT outbox_save('acme', 'lead', '43', 'lead.created.v1', '{"rolled": "back"}');
	ROLLBACK;});
my $plain = $node->safe_psql('postgres',
	q{SELECT outbox_save('acme', 'lead', '44', 'lead.created.v1', '{}')});

wait_for_delivered($node, 2);
my @msgs = consume_events($kafka, 'acme.lead.created.v1', 2);
my %by_id = map { $_->{event}{id} => $_ } @msgs;

# --- the full event, field by field
my $m = $by_id{$full};
ok($m, 'the full event arrived');
is($m->{topic}, 'acme.lead.created.v1', 'topic from {tenant_id}.{event_type}');
is($m->{key}, '42', 'key from {aggregate_id}');
my $occurred = $node->safe_psql('postgres',
	"SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM outbox WHERE id = '$full'");
is_deeply(
	$m->{event},
	{
		id => $full,
		event => 'lead.created.v1',
		schema_version => 1,
		idempotency_key => 'lead-42-created',
		trace_id => '0af7651916cd43dd8448eb211c80319c',
		correlation_id => 'signup-7',
		tenant_id => 'acme',
		aggregate_type => 'lead',
		aggregate_id => '42',
		occurred_at => $occurred,
		producer => 'leads@1.2.3',
		privacy => { pii => JSON::PP::true, fields => [ 'email', 'phone' ], consent => { marketing => JSON::PP::true } },
		payload => { source => 'web', amount => 0.10, big => '123456789012345678901234567890', name => "Zo\x{eb}" },
		metadata => { ip => '10.0.0.1' },
	},
	'envelope of the full event');
# JSON numbers travel as PostgreSQL wrote them, not through a double.
like($m->{value}, qr/"amount": 0\.10\b/, 'decimal kept digit for digit');
like($m->{value}, qr/"big": 123456789012345678901234567890\b/, 'big integer kept');
like($m->{value}, qr/^\{"id":"\Q$full\E","event":"lead.created.v1","schema_version":1,/,
	'envelope fields in their documented order');
is_deeply(
	$m->{headers},
	{
		idempotency_key => 'lead-42-created',
		event_type => 'lead.created.v1',
		tenant_id => 'acme',
		correlation_id => 'signup-7',
		'content-type' => 'application/json',
		traceparent => '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01',
	},
	'headers of the full event');

# --- the event with every default
$m = $by_id{$plain};
ok($m, 'the plain event arrived');
is($m->{key}, '44', 'key of the plain event');
is_deeply(
	[ @{ $m->{event} }{qw(idempotency_key trace_id correlation_id producer metadata)} ],
	[ $plain, undef, '44', undef, undef ],
	'defaults: key is the id, correlation is the aggregate, no trace, producer or metadata');
is_deeply($m->{event}{privacy}, { pii => JSON::PP::false, fields => [], consent => undef },
	'default privacy flags');
is_deeply($m->{event}{payload}, {}, 'empty payload');
ok(!exists $m->{headers}{traceparent}, 'no traceparent header without a trace id');
is($m->{headers}{idempotency_key}, $plain, 'idempotency header defaults to the id');

# --- nothing else is in the topic: the rolled-back event never arrives
my @to_end = split /\n/,
  `test/tools/vkafka consume -b '$kafka->{brokers}' -t acme.lead.created.v1 -e -T 60`;
is(scalar(@to_end), 2, 'exactly the two committed events are in the topic');
unlike(join("\n", @to_end), qr/rolled/, 'the rolled-back event is not');

# --- the outbox view knows they were published
is( $node->safe_psql('postgres',
		"SELECT string_agg(aggregate_id || ':' || status || ':' || (published_at >= created_at), ',' ORDER BY aggregate_id) FROM outbox"),
	'42:delivered:true,44:delivered:true',
	'outbox shows both delivered with published_at');
is($node->safe_psql('postgres', 'SELECT count(*) FROM voutbox.deferred'),
	'0', 'nothing deferred');

$node->stop;
like(slurp_file($node->logfile), qr/voutbox: delivery worker stopped/, 'clean stop logged');
kafka_stop($kafka);
done_testing();
