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
	my ($topic) = @_;
	my @lines = `test/tools/vkafka consume -b '$kafka->{brokers}' -t '$topic' -n 1 -T 60`;
	is($? >> 8, 0, "a message arrived in $topic");
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

$node->stop;
kafka_stop($kafka);
done_testing();
