# The envelope is UTF-8 JSON whatever the database's encoding: in a LATIN1
# database, text is converted (payload, headers, key); in an SQL_ASCII one,
# whose bytes mean nothing in particular, the worker refuses to deliver and
# says why, and the events wait.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('encoding');
my $node = PostgreSQL::Test::Cluster->new('encoding');
$node->init(extra => [ '--encoding=LATIN1', '--locale=C' ]);
$node->append_conf('postgresql.conf', <<"EOC");
shared_preload_libraries = 'voutbox'
voutbox.database = 'postgres'
voutbox.brokers = '$kafka->{brokers}'
EOC
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION voutbox');
is($node->safe_psql('postgres', 'SHOW server_encoding'), 'LATIN1', 'a LATIN1 database');

# psql sends UTF-8; the server stores LATIN1.
my $id = $node->safe_psql('postgres', q{
	SET client_encoding = 'UTF8';
	SELECT outbox_save('acme', 'lead', 'Zoë', 'lead.created.v1', '{"name": "Zoë Müller", "city": "Zürich"}',
	                   metadata => '{"note": "à bientôt"}', correlation_id => 'façade',
	                   pii_fields => ARRAY['prénom'])});
wait_for_delivered($node, 1);
my ($m) = consume_events($kafka, 'acme.lead.created.v1', 1);
is($m->{event}{id}, $id, 'the event arrived');
is_deeply($m->{event}{payload}, { name => "Zo\x{eb} M\x{fc}ller", city => "Z\x{fc}rich" },
	'payload in UTF-8');
is($m->{event}{metadata}{note}, "\x{e0} bient\x{f4}t", 'metadata in UTF-8');
is_deeply($m->{event}{privacy}{fields}, ["pr\x{e9}nom"], 'PII field names in UTF-8');
is($m->{event}{aggregate_id}, "Zo\x{eb}", 'aggregate id in UTF-8');
is($m->{key}, "Zo\x{eb}", 'key in UTF-8 (as a Java producer would hash it)');
is($m->{headers}{correlation_id}, "fa\x{e7}ade", 'headers in UTF-8');

# --- WIN1252 has characters without an equivalent in UTF-8 (0x81): saving
# one is the caller's error (22P05), and an event that holds one all the same
# (saved by an older version; here written into the storage by hand) goes to
# the dead-letter queue instead of stopping the worker.
$node->safe_psql('postgres', "CREATE DATABASE win ENCODING 'WIN1252' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0");
$node->safe_psql('win', 'CREATE EXTENSION voutbox');
my ($rc, $out, $err) = $node->psql('win',
	q{SELECT outbox_save('acme', 'lead', 'w1', 'lead.created.v1', jsonb_build_object('s', convert_from('\x81', 'WIN1252')))});
like($err, qr/ERROR:  character with byte sequence 0x81 in encoding "WIN1252" has no equivalent in encoding "UTF8"/,
	'saving a character without an equivalent in UTF-8 is refused');
like($err, qr/CONTEXT:  argument payload of outbox_save/, 'the error names the argument');
$node->safe_psql('win', q{
	SET client_encoding = 'UTF8';
	BEGIN;
	SELECT outbox_save('acme', 'lead', 'w2', 'lead.created.v1', '{"s": "x"}');
	UPDATE voutbox.events SET payload = jsonb_build_object('s', convert_from('\x81', 'WIN1252')) WHERE aggregate_id = 'w2';
	SELECT outbox_save('acme', 'lead', 'w3', 'lead.created.v1', '{"s": "Zoë"}');
	COMMIT;});
$node->append_conf('postgresql.conf', "voutbox.database = 'win'\n");
$node->restart;
$node->poll_query_until('win', "SELECT count(*) = 1 FROM outbox_dlq WHERE aggregate_id = 'w2'")
  or die 'the unconvertible event did not reach the DLQ';
is($node->safe_psql('win', "SELECT reason || ' ' || error_code FROM outbox_dlq"), 'permanent_error _BAD_MSG',
	'the event that cannot be converted is dead, as a permanent error');
$node->poll_query_until('win', "SELECT status = 'delivered' FROM outbox WHERE aggregate_id = 'w3'")
  or die 'the next event was not delivered';
my @w = grep { $_->{event}{aggregate_id} eq 'w3' } consume_all($kafka, 'acme.lead.created.v1');
is($w[0]{event}{payload}{s}, "Zo\x{eb}", 'the worker goes on, converting the others');

# --- SQL_ASCII: refused, with a reason; the events wait.
$node->safe_psql('postgres', "CREATE DATABASE ascii ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0");
$node->safe_psql('ascii', 'CREATE EXTENSION voutbox');
$node->safe_psql('ascii', save_sql('acme', 'lead.created.v1', 'a1', { n => 1 }));
$node->append_conf('postgresql.conf', "voutbox.database = 'ascii'\n");
$node->restart;
$node->wait_for_log(qr/voutbox: database "ascii" has the encoding SQL_ASCII; no event is delivered/);
$node->poll_query_until('ascii', "SELECT state = 'unsupported encoding' FROM outbox_worker")
  or die 'the worker does not say why it does not deliver';
pass('outbox_worker says the encoding is not supported');
is($node->safe_psql('ascii', 'SELECT status FROM outbox'), 'pending', 'the event waits');

$node->stop;
kafka_stop($kafka);
done_testing();
