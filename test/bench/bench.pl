# voutbox benchmarks, each beside its baseline in the same run on the same
# machine (this machine is shared and noisy: compare the ratios).
#
#   1. save path: outbox_save() vs a plain INSERT of the same row into an
#      indexed table (pgbench, alternating rounds)
#   2. drain: a backlog of N committed events to Kafka, vs a bare librdkafka
#      producer sending N messages of the envelope's size with the same
#      settings (idempotent, acks=all) to the same broker
#   3. latency: single-event transactions at a fixed rate, save to settled,
#      vs a bare producer's produce-to-acknowledgement latency at that rate
#
# Run by test/bench/run.sh (as an unprivileged user).  Prints Markdown.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;
use VoutboxTest;

my $N = $ENV{BENCH_EVENTS} // 200000;
my $BATCH = $ENV{BENCH_BATCH} // 10000;
my $SECONDS = $ENV{BENCH_SECONDS} // 15;
my $RATE = $ENV{BENCH_RATE} // 100;
my $BATCH_BYTES = $ENV{BENCH_BATCH_BYTES} // '8MB';
# Which parts to run: save, drain, latency (all by default).
my %PART = map { $_ => 1 } split /,/, ($ENV{BENCH_PARTS} // 'save,drain,latency');
my $vkafka = 'test/tools/vkafka';

my $kafka = kafka_start('bench');
my $node = voutbox_node('bench', $kafka,
	'voutbox.batch_size' => $BATCH,
	'voutbox.batch_bytes' => $BATCH_BYTES,
	shared_buffers => '512MB',
	work_mem => '64MB',
	max_wal_size => '4GB',
	synchronous_commit => 'on',
	fsync => 'on');
my $pg = $node->safe_psql('postgres', 'SHOW server_version');
my @report;
my $payload = "jsonb_build_object('order_id', 'o-' || :n, 'amount', 129.90, 'currency', 'EUR', "
  . "'customer', jsonb_build_object('id', 'c-4711', 'tier', 'gold'), 'items', 3, "
  . "'note', 'deliver to the back door, ring twice, leave with neighbour if absent')";

my $dir = $PostgreSQL::Test::Utils::tmp_check;
my $size = 581;    # the envelope of the drain's events, measured there

# --- 1. save path, in a database the worker does not serve
if ($PART{save})
{
	$node->safe_psql('postgres', 'CREATE DATABASE save_bench');
	$node->safe_psql('save_bench', 'CREATE EXTENSION voutbox');
	$node->safe_psql('save_bench',
		'CREATE TABLE plain_outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), tenant_id text, '
		  . 'aggregate_type text, aggregate_id text, event_type text, payload jsonb, '
		  . 'created_at timestamptz DEFAULT now(), published_at timestamptz)');
	PostgreSQL::Test::Utils::append_to_file("$dir/save.sql",
		"\\set n random(1, 1000000)\nSELECT outbox_save('acme', 'order', :n::text, 'order.placed.v1', $payload);\n");
	PostgreSQL::Test::Utils::append_to_file("$dir/insert.sql",
		"\\set n random(1, 1000000)\nINSERT INTO plain_outbox (tenant_id, aggregate_type, aggregate_id, event_type, payload) "
		  . "VALUES ('acme', 'order', :n::text, 'order.placed.v1', $payload);\n");
	# The same save by an application role bound to its tenant (isolation on),
	# in a database of its own.
	$node->safe_psql('postgres', 'CREATE ROLE bench_app LOGIN');
	$node->safe_psql('postgres', 'CREATE DATABASE save_tenant');
	$node->safe_psql('save_tenant', "CREATE EXTENSION voutbox; SELECT outbox_tenant_grant('acme', 'bench_app')");
	my %tps;
	my %run = (insert => 'save_bench', save => 'save_bench', save_tenant => 'save_tenant -U bench_app');
	for my $round (1 .. 2)
	{
		for my $kind ('insert', 'save', 'save_tenant')
		{
			my $file = $kind eq 'save_tenant' ? 'save' : $kind;
			my $out = `pgbench -n -c 2 -j 2 -T $SECONDS -f $dir/$file.sql -h ${\ $node->host} -p ${\ $node->port} $run{$kind} 2>&1`;
			my ($t) = $out =~ /tps = ([\d.]+)/;
			push @{ $tps{$kind} }, $t;
		}
	}
	my ($save, $insert, $tenant) = map { (sort { $a <=> $b } @{ $tps{$_} })[-1] } qw(save insert save_tenant);
	push @report, sprintf('| save path: transactions/s, 2 clients, one event each | outbox_save %.0f | plain INSERT %.0f | %.2f |',
		$save, $insert, $save / $insert);
	push @report, sprintf('| save path with tenant isolation on, as a role bound to its tenant | outbox_save %.0f | plain INSERT %.0f | %.2f |',
		$tenant, $insert, $tenant / $insert);
}

# --- 2. drain a backlog
if ($PART{drain})
{
	$node->safe_psql('postgres', 'SELECT outbox_save(\'acme\', \'order\', \'warm\', \'order.placed.v1\', \'{}\')');
	wait_for_delivered($node, 1);
	my $t0 = $node->safe_psql('postgres', "BEGIN; SELECT count(outbox_save('acme', 'order', (n % 1000)::text, 'order.placed.v1', "
		  . ($payload =~ s/:n/n/gr) . ")) FROM generate_series(1, $N) n; COMMIT; SELECT extract(epoch FROM clock_timestamp())");
	$t0 = (split /\n/, $t0)[-1];
	$node->poll_query_until('postgres', "SELECT count(*) = 0 FROM outbox WHERE status <> 'delivered'", 't')
	  or die 'backlog not drained';
	my $t1 = $node->safe_psql('postgres', 'SELECT extract(epoch FROM max(settled_at)) FROM voutbox.batches');
	my $drain = $N / ($t1 - $t0);
	my $rounds = $node->safe_psql('postgres', "SELECT count(*) FROM voutbox.batches WHERE settled_at >= to_timestamp($t0)");
	my @sample = consume_events($kafka, 'acme.order.placed.v1', 100);
	$size = 0;
	$size += length($_->{value}) for @sample;
	$size = int($size / @sample);
	my $raw = decode_json(`$vkafka produce -b '$kafka->{brokers}' -t bench.raw -n $N -s $size -k 1000`);
	push @report, sprintf('| drain: %d events of %d bytes, batch_size %d, batch_bytes %s (%d rounds), events/s | voutbox %.0f | bare librdkafka producer %.0f | %.2f |',
		$N, $size, $BATCH, $BATCH_BYTES, $rounds, $drain, $raw->{per_second}, $drain / $raw->{per_second});
}

# --- 3. latency at a fixed rate (on a topic that exists: creating one takes seconds)
if ($PART{latency})
{
	$node->safe_psql('postgres', "SELECT outbox_save('acme', 'order', 'warm', 'order.latency.v1', '{}')");
	wait_for_delivered($node, 1, "event_type = 'order.latency.v1'");
	$node->safe_psql('postgres', "DELETE FROM voutbox.events WHERE event_type = 'order.latency.v1'");
	my $count = $RATE * $SECONDS;
	PostgreSQL::Test::Utils::append_to_file("$dir/one.sql",
		"\\set n random(1, 1000000)\nSELECT outbox_save('acme', 'order', :n::text, 'order.latency.v1', $payload);\n");
	system("pgbench -n -c 1 -R $RATE -t $count -f $dir/one.sql -h ${\ $node->host} -p ${\ $node->port} postgres >/dev/null 2>&1");
	$node->poll_query_until('postgres', "SELECT count(*) = 0 FROM outbox WHERE status <> 'delivered'", 't')
	  or die 'latency events not delivered';
	my $lat = $node->safe_psql('postgres', q{
		SELECT array_to_string(percentile_disc(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
				 (ORDER BY round(1000 * extract(epoch FROM published_at - created_at), 2)), ' ')
		  FROM outbox WHERE event_type = 'order.latency.v1'});
	my @vl = split / /, $lat;
	my $rawlat = decode_json(`$vkafka produce -b '$kafka->{brokers}' -t bench.lat -n $count -s $size -r $RATE`);
	push @report, sprintf('| latency at %d events/s, ms p50 / p95 / p99 | save to settled %s / %s / %s | produce to ack %.2f / %.2f / %.2f | %.2f (p50) |',
		$RATE, @vl, $rawlat->{p50_ms}, $rawlat->{p95_ms}, $rawlat->{p99_ms}, $vl[0] / $rawlat->{p50_ms});
}

my $cpus = `nproc`;
chomp $cpus;
my $rdkafka = `pkg-config --modversion rdkafka`;
chomp $rdkafka;
# PostgreSQL::Test::Utils sends STDOUT to the test log: write the report to a file.
open my $out, '>', $ENV{BENCH_REPORT} // "$dir/bench-report.md" or die $!;
print $out "## voutbox benchmark, " . `date -u +%Y-%m-%d`;
print $out "\nPostgreSQL $pg, Apache Kafka 4.1 (one KRaft node on loopback), $cpus CPUs, librdkafka $rdkafka; "
  . "producer: idempotent, acks=all, linger.ms 5 (librdkafka's default); fsync on, synchronous_commit on.\n\n";
print $out "| what | voutbox | baseline | ratio |\n|---|---|---|---|\n";
print $out "$_\n" for @report;
close $out;
note('done');
$node->stop;
kafka_stop($kafka);
done_testing();
