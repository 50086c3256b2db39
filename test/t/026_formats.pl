# Envelope formats (voutbox.format), checked field by field against the
# specifications: CloudEvents 1.0 with its Kafka protocol binding (structured
# and binary mode), and what Debezium's outbox EventRouter emits.  The
# CloudEvents messages are read back the way the binding tells a receiver
# to, by a decoder that is first checked on the specification's own example
# messages.
use strict;
use warnings;

use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

# --- A CloudEvents receiver, per the Kafka protocol binding (v1.0.2) ---

# RFC 3339 date-time; URI-reference (RFC 3986: no character outside the
# allowed set, percent-encodings well-formed); attribute names (spec.md:
# lower-case a-z and 0-9, SHOULD be at most 20 characters).
my $rfc3339 = qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$/;
my $uri_reference = qr/^(?:[A-Za-z0-9\-._~:\/?#\[\]@!\$&'()*+,;=]|%[0-9A-Fa-f]{2})+$/;

# Returns (attributes, data, mode) of a consumed message, or dies saying
# which rule it breaks.
sub ce_decode
{
	my ($m) = @_;
	my %h = %{ $m->{headers} // {} };
	my (%attr, $data, $mode);
	my $ct = $h{'content-type'};
	if (defined $ct && $ct =~ /^application\/cloudevents/i)
	{
		# §3.3: structured mode; the JSON event format (json-format.md).
		die "structured mode needs content-type application/cloudevents+json, not $ct"
		  unless $ct =~ /^application\/cloudevents\+json(;|$)/i;
		$mode = 'structured';
		my $ev = JSON::PP->new->decode($m->{value});
		die 'the event is not a JSON object' unless ref $ev eq 'HASH';
		$data = delete $ev->{data};
		die 'data_base64 with JSON data' if exists $ev->{data_base64};
		%attr = %$ev;
		die "a JSON attribute value must be a string: $_"
		  for grep { ref $attr{$_} } keys %attr;
	}
	else
	{
		# §3.2: binary mode; ce_ headers, content-type is datacontenttype.
		$mode = 'binary';
		for my $k (keys %h)
		{
			next unless $k =~ /^ce_(.*)$/;
			die "datacontenttype goes in content-type, not ce_datacontenttype" if $1 eq 'datacontenttype';
			$attr{$1} = $h{$k};
		}
		$attr{datacontenttype} = $ct if defined $ct;
		$data = $m->{value};
		$data = JSON::PP->new->allow_nonref->decode($data)
		  if defined $data && ($attr{datacontenttype} // '') =~ /^application\/(.*\+)?json/;
	}
	# spec.md, context attributes.
	die "attribute name $_ is not [a-z0-9]{1,20}" for grep { !/^[a-z0-9]{1,20}$/ } keys %attr;
	die "required attribute $_ missing or empty" for grep { !defined $attr{$_} || $attr{$_} eq '' } qw(id source specversion type);
	die "specversion is $attr{specversion}, not 1.0" unless $attr{specversion} eq '1.0';
	die "source $attr{source} is not a URI-reference" unless $attr{source} =~ $uri_reference;
	die "time $attr{time} is not RFC 3339" if defined $attr{time} && $attr{time} !~ $rfc3339;
	die "subject is empty" if defined $attr{subject} && $attr{subject} eq '';
	die "partitionkey is empty" if defined $attr{partitionkey} && $attr{partitionkey} eq '';
	die "traceparent is not W3C" if defined $attr{traceparent}
	  && $attr{traceparent} !~ /^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$/;
	return (\%attr, $data, $mode);
}

# The decoder on the binding's own examples (§3.2.5, §3.3.4, with the
# JSON format's data for the structured one).
{
	my ($a, $d, $mode) = ce_decode({
		key => 'mykey',
		headers => {
			ce_specversion => '1.0', ce_type => 'com.example.someevent',
			ce_source => '/mycontext/subcontext', ce_id => '1234-1234-1234',
			ce_time => '2018-04-05T03:56:24Z', 'content-type' => 'application/avro' },
		value => '...application data encoded in Avro...' });
	is_deeply([ $mode, $a->{id}, $a->{source}, $a->{type}, $a->{datacontenttype}, $d ],
		[ 'binary', '1234-1234-1234', '/mycontext/subcontext', 'com.example.someevent',
		  'application/avro', '...application data encoded in Avro...' ],
		"the decoder reads the binding's binary example");
	($a, $d, $mode) = ce_decode({
		key => 'mykey',
		headers => { 'content-type' => 'application/cloudevents+json; charset=UTF-8' },
		value => JSON::PP->new->encode({
			specversion => '1.0', type => 'com.example.someevent', source => '/mycontext/subcontext',
			id => '1234-1234-1234', time => '2018-04-05T03:56:24Z',
			datacontenttype => 'application/json', data => { appinfoA => 'abc' } }) });
	is_deeply([ $mode, $a->{time}, $d ], [ 'structured', '2018-04-05T03:56:24Z', { appinfoA => 'abc' } ],
		"the decoder reads the binding's structured example");
	ok(!eval { ce_decode({ headers => { ce_id => 'x', ce_source => '/s', ce_type => 't' }, value => '' }); 1 },
		'the decoder refuses an event without specversion');
	ok(!eval { ce_decode({ headers => { ce_specversion => '1.0', ce_id => 'x', ce_source => 'a b', ce_type => 't' }, value => '' }); 1 },
		'and a source that is not a URI-reference');
}

# --- voutbox's messages in each format ---

my $kafka = kafka_start('formats');
my $node = voutbox_node('formats', $kafka);
my $tp = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01';

# Save one event to a topic of its own, with the format set (a restart, so
# that the worker surely has it), and return it as consumed with its row.
sub send_in
{
	my ($format, $n) = @_;
	$node->safe_psql('postgres', "ALTER SYSTEM SET voutbox.format = '$format'");
	$node->restart;
	my $type = "fmt${n}.made.v1";
	my $id = $node->safe_psql('postgres', qq{
		SET voutbox.traceparent = '$tp';
		SELECT outbox_save('acme', 'Sales Lead/EU', 'agg-$n', '$type',
			'{"amount": 0.10, "big": 123456789012345678901234567890, "name": "Zoë"}',
			metadata => '{"m": 1}', correlation_id => 'corr-$n', idempotency_key => 'idem-$n')});
	my ($m) = consume_events_raw("acme.$type");
	my $row = decode_json($node->safe_psql('postgres',
		"SELECT row_to_json(o) FROM (SELECT id, payload::text AS payload_text, "
		  . "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS time "
		  . "FROM outbox WHERE id = '$id') o"));
	return ($m, $row);
}

# consume_events() decodes the voutbox envelope: read raw messages here.
sub consume_events_raw
{
	my ($topic, $n) = @_;
	$n //= 1;
	my @lines = `test/tools/vkafka consume -b '$kafka->{brokers}' -t '$topic' -n $n -T 60`;
	is($? >> 8, 0, "$n message(s) arrived in $topic");
	return map { decode_json($_) } @lines;
}

my $number_text = qr/"amount": 0\.10\b.*"big": 123456789012345678901234567890\b|"big": 123456789012345678901234567890\b.*"amount": 0\.10\b/;

for my $case ([ 'cloudevents', 1, 'structured' ], [ 'cloudevents_binary', 2, 'binary' ])
{
	my ($format, $n, $want_mode) = @$case;
	my ($m, $row) = send_in($format, $n);
	my ($a, $d, $mode) = eval { ce_decode($m) };
	ok(defined $a, "$format: a valid CloudEvent") or diag($@);
	next unless defined $a;
	is($mode, $want_mode, "$format: $want_mode mode");
	is_deeply(
		{ map { $_ => $a->{$_} } keys %$a },
		{ specversion => '1.0', id => $row->{id}, source => '/voutbox/acme/Sales%20Lead%2FEU',
		  type => "fmt$n.made.v1", subject => "agg-$n", time => $row->{time},
		  datacontenttype => 'application/json', traceparent => $tp, partitionkey => "agg-$n",
		  tenantid => 'acme', correlationid => "corr-$n", idempotencykey => "idem-$n" },
		"$format: every attribute, and nothing else");
	is($m->{key}, "agg-$n", "$format: the record key is the event's key");
	like($m->{value}, $number_text, "$format: the data's numbers keep their digits");
	is_deeply($d, JSON::PP->new->decode($row->{payload_text}), "$format: data is the payload");
	is($m->{headers}{traceparent}, $tp, "$format: the W3C traceparent header stays for tracing");
	if ($mode eq 'binary')
	{
		is($m->{value}, $row->{payload_text}, 'binary: the value is the payload as stored');
		is($m->{headers}{'content-type'}, 'application/json', 'binary: content-type is datacontenttype');
	}
	else
	{
		is($m->{headers}{'content-type'}, 'application/cloudevents+json; charset=UTF-8',
			'structured: content-type of the JSON event format');
	}
}

# Debezium's outbox EventRouter (defaults): value the payload, key the
# aggregate id, header "id" the event id.
{
	my ($m, $row) = send_in('debezium', 3);
	is($m->{value}, $row->{payload_text}, 'debezium: the value is the payload');
	is($m->{key}, 'agg-3', 'debezium: the key is the aggregate id');
	is($m->{headers}{id}, $row->{id}, 'debezium: header id is the event id');
	is_deeply([ sort keys %{ $m->{headers} } ], [ 'id', 'traceparent' ], 'debezium: no other header');
}

# Back to voutbox's own envelope.
{
	my ($m, $row) = send_in('voutbox', 4);
	my $env = JSON::PP->new->decode($m->{value});
	is($env->{id}, $row->{id}, 'voutbox: the envelope again');
	is($m->{headers}{'content-type'}, 'application/json', 'voutbox: its headers');
}

# --- Routes: the format, key, headers and topic settings per route ---
# With voutbox.format at its default, routes choose the format of their
# events, saved by a role that neither is a superuser nor owns the
# extension, and bound to its tenant.  The topic of a route with topic
# settings is created with them.
$node->safe_psql('postgres', q{
	ALTER SYSTEM RESET voutbox.format;
	ALTER SYSTEM SET voutbox.create_topics = on;
	CREATE ROLE app_acme;
	GRANT SELECT ON outbox TO app_acme;
	GRANT SELECT ON outbox_routes TO app_acme;
	SELECT outbox_tenant_grant('acme', 'app_acme');
	INSERT INTO outbox_routes (name, tenant_pattern, event_type_pattern, topic_template, key_template,
							   format, headers, topic_partitions, topic_config)
	VALUES ('acme-orders', 'acme', 'order.*', '{tenant_id}.orders', '{aggregate_type}:{aggregate_id}',
			'cloudevents_binary', '{"x-team": "payments", "x-schema": "orders/v1"}', 3,
			'retention.ms=3600000');
	INSERT INTO outbox_routes (name, event_type_pattern, format)
	VALUES ('invoices-debezium', 'invoice.*', 'debezium');
});
$node->restart;
my %routed_ids = map { $_->[0] => $_->[1] } map { [ split /\|/ ] } split /\n/, $node->safe_psql('postgres', q{
	SET ROLE app_acme;
	BEGIN;
	SELECT 'order', outbox_save('acme', 'order', 'r1', 'order.paid.v1', '{"total": 12.50}');
	SELECT 'invoice', outbox_save('acme', 'invoice', 'r2', 'invoice.sent.v1', '{"n": 2}');
	SELECT 'lead', outbox_save('acme', 'lead', 'r3', 'routes.made.v1', '{"n": 3}');
	COMMIT;
});
{
	my ($m) = consume_events_raw('acme.orders');
	my ($a, $d, $mode) = eval { ce_decode($m) };
	ok(defined $a, 'route acme-orders: a valid CloudEvent') or diag($@);
	is($mode, 'binary', 'route acme-orders: in binary mode, its format');
	is($a->{id}, $routed_ids{order}, 'route acme-orders: the event');
	is_deeply($d, { total => 12.50 }, 'route acme-orders: data is the payload');
	is($m->{key}, 'order:r1', 'route acme-orders: the key from its key template');
	is($a->{partitionkey}, 'order:r1', 'route acme-orders: partitionkey too');
	is_deeply([ @{ $m->{headers} }{qw(x-team x-schema)} ], [ 'payments', 'orders/v1' ],
		'route acme-orders: its static headers');
	my $desc = decode_json(`test/tools/vkafka describe-topic -b '$kafka->{brokers}' -t acme.orders -T 30`);
	is($desc->{partitions}, 3, 'route acme-orders: its topic created with its partitions');
	is($desc->{config}{'retention.ms'}, '3600000', 'route acme-orders: and its topic_config');
}
{
	my ($m) = consume_events_raw('acme.invoice.sent.v1');
	is($m->{value}, '{"n": 2}', 'route invoices-debezium: the payload as the value');
	is_deeply($m->{headers}, { id => $routed_ids{invoice} }, 'route invoices-debezium: header id only');
}
{
	my ($m) = consume_events_raw('acme.routes.made.v1');
	is(JSON::PP->new->decode($m->{value})->{id}, $routed_ids{lead}, 'no route: voutbox.format');
}

# A route changes what later saves get, not what is saved: an event saved
# before the change commits after it and still goes as its route said then.
{
	my $saver = $node->background_psql('postgres');
	$saver->query_safe('SET ROLE app_acme');
	$saver->query_safe('BEGIN');
	my $before = $saver->query_safe(
		q{SELECT outbox_save('acme', 'order', 'r4', 'order.paid.v1', '{"n": 4}')});
	$node->safe_psql('postgres', q{
		UPDATE outbox_routes SET format = 'cloudevents', headers = '{"x-team": "billing"}'
		 WHERE name = 'acme-orders'});
	$saver->query_safe('COMMIT');
	my $after = $saver->query_safe(
		q{SELECT outbox_save('acme', 'order', 'r5', 'order.paid.v1', '{"n": 5}')});
	$saver->quit;
	my @m = consume_events_raw('acme.orders', 3);
	my %by_id = map { my ($a) = ce_decode($_); ($a->{id} => [ $_, (ce_decode($_))[2] ]) } @m;
	is($by_id{$before}[1], 'binary', 'saved before the change: the format it was saved with');
	is($by_id{$before}[0]{headers}{'x-team'}, 'payments', 'and the headers');
	is($by_id{$after}[1], 'structured', 'saved after the change: the new format');
	is($by_id{$after}[0]{headers}{'x-team'}, 'billing', 'and the new headers');
}

$node->stop;
kafka_stop($kafka);
done_testing();
