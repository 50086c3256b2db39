# Bounded resources: the worker's memory does not grow with the number of
# events it delivers.  pg_log_backend_memory_contexts() writes the worker's
# memory use to the log; it is compared after 10000 and after 60000 events.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('memory');
my $node = voutbox_node('memory', $kafka, 'voutbox.batch_size' => '1000');

# Grand total of the worker's memory contexts, as it logs it.
sub worker_memory
{
	my $pid = worker_pid($node);
	my $offset = -s $node->logfile;
	$node->safe_psql('postgres', "SELECT pg_log_backend_memory_contexts($pid)");
	$node->wait_for_log(qr/\[$pid\] LOG:  Grand total: \d+ bytes/, $offset);
	my ($bytes) = substr(slurp_file($node->logfile), $offset) =~ /\[$pid\] LOG:  Grand total: (\d+) bytes/;
	return $bytes;
}

sub deliver
{
	my ($n) = @_;
	my $before = $node->safe_psql('postgres', 'SELECT count(*) FROM voutbox.events');
	# many small transactions and rounds, as in production
	$node->safe_psql('postgres', "DO \$\$ BEGIN FOR i IN 1 .. $n / 100 LOOP "
		  . "PERFORM outbox_save('acme', 'test', (g % 50)::text, 'item.sent.v1', jsonb_build_object('g', g)) "
		  . "FROM generate_series(1, 100) g; COMMIT; END LOOP; END \$\$");
	wait_for_delivered($node, $before + $n);
	return;
}

$node->append_conf('postgresql.conf', "log_line_prefix = '%m [%p] '\n");
$node->reload;
deliver(10000);
my $after_warmup = worker_memory();
deliver(50000);
my $after_more = worker_memory();
note("worker memory: $after_warmup bytes after 10000 events, $after_more after 60000");
ok($after_more - $after_warmup < 512 * 1024, 'memory does not grow with the events delivered');

# --- A byte budget per round (voutbox.batch_bytes): large events make small
# rounds, so that the worker holds a few MB however large the payloads are.
$node->append_conf('postgresql.conf', "voutbox.batch_bytes = '1MB'\n");
$node->reload;
$node->poll_query_until('postgres', "SELECT setting = '1048576' FROM pg_settings WHERE name = 'voutbox.batch_bytes'")
  or die 'batch_bytes not applied';
my $last_batch = $node->safe_psql('postgres', 'SELECT max(batch_id) FROM voutbox.batches');
$node->safe_psql('postgres',
	"SELECT count(outbox_save('acme', 'test', 'big' || g, 'item.big.v1', "
	  . "jsonb_build_object('blob', repeat('x', 200000), 'g', g))) FROM generate_series(1, 40) g");
wait_for_delivered($node, 40, "event_type = 'item.big.v1'");
my ($rounds, $largest) = split /\|/, $node->safe_psql('postgres',
	"SELECT count(*), max(events) FROM voutbox.batches WHERE batch_id > $last_batch AND events > 0");
note("40 events of 200 kB with batch_bytes = 1MB: $rounds rounds, the largest of $largest events");
ok($largest >= 1 && $largest <= 5, 'a round holds at most 1 MB of events');
my @big = grep { $_->{event}{event} eq 'item.big.v1' } consume_all($kafka, 'acme.item.big.v1');
is(scalar(keys %{ { map { $_->{event}{payload}{g} => 1 } @big } }), 40, 'and all 40 arrive');

$node->stop;
kafka_stop($kafka);
done_testing();
