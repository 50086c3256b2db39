# voutbox benchmarks, each figure beside its baselines, all in one run on
# one machine (this machine is shared and noisy: compare the ratios).
#
#   a. drain: a backlog of N events committed at once, timed from the commit
#      to the broker's append of the last one (topics with LogAppendTime);
#      vs a bare librdkafka producer sending N messages of the envelope's
#      size with the same settings (idempotent, acks=all, linger.ms), and vs
#      Debezium 3.6.1 (embedded engine, PostgreSQL connector with pgoutput,
#      outbox EventRouter, its own idempotent acks=all producer, offsets
#      committed after the acks) draining the same rows from its table
#   b. latency at steady rates (pgbench --rate, 4 clients): each event
#      carries clock_timestamp() of its save, its transaction commits right
#      after; latency is that to the broker's append (LogAppendTime), for
#      voutbox and for Debezium; beside a bare producer's produce-to-ack
#   c. CPU: the worker's (all its threads) per 1000 events, vs Debezium's
#      JVM plus its walsender; peak RSS of both
#   d. save path: outbox_save() vs a plain INSERT of the same row into a
#      table with the same unique index, with and without idempotency keys,
#      one event per pgbench transaction and in bulk
#   e. a silent topic: latency of the other topics at the first rate while
#      a tenth of the events go to a topic that does not answer (one that
#      does not exist on a broker that creates none: librdkafka waits for
#      it), with voutbox.delivery_timeout at 2 s so that its events time out
#      over and over; beside b's figures
#   f. exactly_once: the drain of a's backlog (N events committed at once)
#      in voutbox.delivery = exactly_once beside at_least_once, alternated
#      twice in one run, timed from the commit until the outbox shows every
#      event delivered (settled: in exactly_once, after Kafka's commit), with
#      the worker's CPU
#
# Run by test/bench/run.sh (as an unprivileged user).  Writes Markdown to
# $BENCH_REPORT and, if gnuplot is there, a chart to $BENCH_CHART.
use strict;
use warnings;

use IO::Select;
use POSIX ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;
use Time::HiRes qw(time);
use VoutboxTest;

my $N = $ENV{BENCH_EVENTS} // 200000;
my $BATCH = $ENV{BENCH_BATCH} // 10000;
my $SECONDS = $ENV{BENCH_SECONDS} // 15;
my @RATES = split /,/, ($ENV{BENCH_RATES} // '500,2000');
my $BATCH_BYTES = $ENV{BENCH_BATCH_BYTES} // '8MB';
# (5000: outbox_save() takes a lock per idempotency key, and a transaction
# with more keys than the lock table holds fails; see the README's limits)
my $BULK = $ENV{BENCH_BULK} // 5000;
# linger.ms of every producer: voutbox's default
my $LINGER = $ENV{BENCH_LINGER} // 1;
# Which parts to run (all by default).
my %PART = map { $_ => 1 } split /,/, ($ENV{BENCH_PARTS} // 'save,drain,latency,silent,debezium,eos');
my $vkafka = 'test/tools/vkafka';
my $dir = $PostgreSQL::Test::Utils::tmp_check;

# (Every topic is created here: part e needs one that does not exist.)
my $kafka = kafka_start('bench', 'auto.create.topics.enable=false');
my $node = voutbox_node('bench', $kafka,
	'voutbox.batch_size' => $BATCH,
	'voutbox.batch_bytes' => $BATCH_BYTES,
	# Part e needs a topic that stays missing; the others create theirs.
	'voutbox.create_topics' => 'off',
	shared_buffers => '512MB',
	work_mem => '64MB',
	max_wal_size => '4GB',
	synchronous_commit => 'on',
	fsync => 'on',
	# for Debezium
	wal_level => 'logical',
	max_wal_senders => '4',
	max_replication_slots => '4',
	# for part f (exactly_once prepares its settles)
	max_prepared_transactions => '4',
	listen_addresses => '127.0.0.1');
$node->append_conf('pg_hba.conf',
	"host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n");
$node->reload;
my $pg = $node->safe_psql('postgres', 'SHOW server_version');
my $superuser = $node->safe_psql('postgres', 'SELECT current_user');
my $wpid = worker_pid($node);
my (@report, %chart);

my $payload = "jsonb_build_object('order_id', 'o-' || :n, 'amount', 129.90, 'currency', 'EUR', "
  . "'customer', jsonb_build_object('id', 'c-4711', 'tier', 'gold'), 'items', 3, "
  . "'note', 'deliver to the back door, ring twice, leave with neighbour if absent')";
# The same, carrying the time of its save in microseconds.
my $timed = $payload =~ s/^jsonb_build_object\(/jsonb_build_object('t_us', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint, /r;

$node->safe_psql('postgres',
	'CREATE TABLE outbox_dbz (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), '
	  . 'aggregatetype varchar(255) NOT NULL, aggregateid varchar(255) NOT NULL, '
	  . 'type varchar(255) NOT NULL, payload jsonb)');

# --- helpers

# CPU time (user + system, all threads) of a process so far, in ms.
sub proc_cpu_ms
{
	my ($pid) = @_;
	die "no pid" unless $pid =~ /^\d+$/;
	open my $f, '<', "/proc/$pid/stat" or die "no process $pid";
	my @f = split / /, (split /\) /, scalar(<$f>))[1];
	close $f;
	return ($f[11] + $f[12]) * 1000 / POSIX::sysconf(POSIX::_SC_CLK_TCK);    # utime, stime
}

# A line of /proc/$pid/status or smaps_rollup, in MB.
sub proc_mb
{
	my ($pid, $file, $field) = @_;
	my $kb = 0;
	open my $f, '<', "/proc/$pid/$file" or return 0;
	while (<$f>)
	{
		$kb += $1 if /^$field:\s+(\d+)/;
	}
	close $f;
	return $kb / 1024;
}

# The p-th percentile (0 < p <= 1) of sorted values.
sub pct
{
	my ($v, $p) = @_;
	return $v->[ int($p * (@$v - 1) + 0.5) ];
}

# Consume $count messages of $topic: the broker append times (ms) of those
# whose key is not "warm" (the warm-up events), and, for those whose payload
# carries t_us, [append ms, t_us] pairs (read from the raw line, no decoding).
sub consume_times
{
	my ($topic, $count) = @_;
	my (@append, @pairs, $n);
	open my $c, '-|', $vkafka, 'consume', '-b', $kafka->{brokers}, '-t', $topic,
	  '-n', $count, '-T', 300
	  or die "vkafka: $!";
	while (my $line = <$c>)
	{
		my ($ts) = $line =~ /"timestamp":(\d+)/;
		die "not LogAppendTime: $line" unless $line =~ /"timestamp_type":"LogAppendTime"/;
		$n++;
		next if $line =~ /"key":"warm"/;
		push @append, $ts;
		push @pairs, [ $ts, $1 ] if $line =~ /t_us\\":\s*(\d+)/;
	}
	close $c;
	die "consumed " . ($n // 0) . " of $count messages from $topic" if ($n // 0) < $count;
	return (\@append, \@pairs);
}

sub new_topic
{
	my ($topic) = @_;
	kafka_create_topic($kafka, $topic, 4, 'message.timestamp.type=LogAppendTime');
}

# Latencies in ms (append - save), sorted, and their summary.
sub latencies
{
	my ($pairs) = @_;
	my @lat = sort { $a <=> $b } map { $_->[0] - $_->[1] / 1000 } @$pairs;
	die 'no latency measured' unless @lat;
	return { p50 => pct(\@lat, 0.5), p95 => pct(\@lat, 0.95), p99 => pct(\@lat, 0.99),
		max => $lat[-1], n => scalar(@lat) };
}

# Debezium's runner: started with its own slot, stopped with it dropped.
my $dbz_classpath;
sub dbz_start
{
	my ($slot) = @_;
	$dbz_classpath //= `bash test/bench/debezium/build.sh`;
	chomp $dbz_classpath;
	my $pid = open(my $out, '-|', 'java', '-Xms256m', '-Xmx512m', '-cp', $dbz_classpath,
		'DebeziumBench', "brokers=$kafka->{brokers}", "offsets=$dir/dbz-$slot",
		'host=127.0.0.1', 'port=' . $node->port, "user=$superuser", "slot=$slot",
		'dbz.poll.interval.ms=10', "linger.ms=$LINGER")
	  or die "java: $!";
	my $sel = IO::Select->new($out);
	my $line = '';
	while ($line !~ /^ready/)
	{
		die 'Debezium did not start' unless $sel->can_read(180);
		defined($line = <$out>) or die 'Debezium exited';
	}
	$node->poll_query_until('postgres',
		"SELECT active_pid IS NOT NULL FROM pg_replication_slots WHERE slot_name = '$slot'")
	  or die 'Debezium does not stream';
	my $walsender = $node->safe_psql('postgres',
		"SELECT active_pid FROM pg_replication_slots WHERE slot_name = '$slot'");
	return { pid => $pid, out => $out, slot => $slot, walsender => $walsender };
}

sub dbz_cpu_ms
{
	my ($d) = @_;
	return proc_cpu_ms($d->{pid}) + proc_cpu_ms($d->{walsender});
}

sub dbz_stop
{
	my ($d) = @_;
	$d->{rss} = proc_mb($d->{pid}, 'status', 'VmHWM');
	kill 'TERM', $d->{pid};
	close $d->{out};
	$node->poll_query_until('postgres',
		"SELECT NOT active FROM pg_replication_slots WHERE slot_name = '$d->{slot}'")
	  or die 'slot still active';
	$node->safe_psql('postgres', "SELECT pg_drop_replication_slot('$d->{slot}'); "
		  . "DROP PUBLICATION IF EXISTS $d->{slot}_pub");
}

# --- a. drain a backlog
my %drain;
if ($PART{drain})
{
	new_topic('acme.order.placed.v1');
	$node->safe_psql('postgres', "SELECT outbox_save('acme', 'order', 'warm', 'order.placed.v1', '{}')");
	wait_for_delivered($node, 1);
	consume_times('acme.order.placed.v1', 1);
	my $cpu0 = proc_cpu_ms($wpid);
	my $t0 = $node->safe_psql('postgres', "BEGIN; SELECT count(outbox_save('acme', 'order', (n % 1000)::text, 'order.placed.v1', "
		  . ($payload =~ s/:n/n/gr) . ")) FROM generate_series(1, $N) n; COMMIT; "
		  . "SELECT extract(epoch FROM clock_timestamp())");
	$t0 = (split /\n/, $t0)[-1];
	$node->poll_query_until('postgres', "SELECT count(*) = 0 FROM outbox WHERE status <> 'delivered'", 't')
	  or die 'backlog not drained';
	my $cpu = proc_cpu_ms($wpid) - $cpu0;
	my ($append) = consume_times('acme.order.placed.v1', $N + 1);
	my @a = sort { $a <=> $b } @$append;
	my $rounds = $node->safe_psql('postgres', "SELECT count(*) FROM voutbox.batches WHERE settled_at >= to_timestamp($t0)");
	my @sample = consume_events($kafka, 'acme.order.placed.v1', 100);
	my $size = 0;
	$size += length($_->{value}) for @sample;
	$size = int($size / @sample);
	kafka_create_topic($kafka, 'bench.raw', 4);
	my $raw = decode_json(`$vkafka produce -b '$kafka->{brokers}' -t bench.raw -n $N -s $size -k 1000 -l $LINGER`);
	%drain = (voutbox => $N / ($a[-1] / 1000 - $t0), first => $a[0] - 1000 * $t0,
		cpu => 1000 * $cpu / $N, bare => $raw->{per_second}, size => $size, rounds => $rounds);

	if ($PART{debezium})
	{
		new_topic('outbox.event.order');
		my $d = dbz_start('bench_drain');
		$node->safe_psql('postgres', "INSERT INTO outbox_dbz (aggregatetype, aggregateid, type, payload) "
			  . "VALUES ('order', 'warm', 'order.placed.v1', '{}')");
		consume_times('outbox.event.order', 1);
		my $dcpu0 = dbz_cpu_ms($d);
		my $d0 = $node->safe_psql('postgres', "INSERT INTO outbox_dbz (aggregatetype, aggregateid, type, payload) "
			  . "SELECT 'order', (n % 1000)::text, 'order.placed.v1', " . ($payload =~ s/:n/n/gr)
			  . " FROM generate_series(1, $N) n; SELECT extract(epoch FROM clock_timestamp())");
		my ($dappend) = consume_times('outbox.event.order', $N + 1);
		my $dcpu = dbz_cpu_ms($d) - $dcpu0;
		my @da = sort { $a <=> $b } @$dappend;
		dbz_stop($d);
		$drain{debezium} = $N / ($da[-1] / 1000 - $d0);
		$drain{dfirst} = $da[0] - 1000 * $d0;
		$drain{dcpu} = 1000 * $dcpu / $N;
		$drain{drss} = $d->{rss};
	}
	push @report, sprintf('| a. drain: %d events committed at once, commit to last broker append, events/s | %.0f | %.0f | %s | %.2f | %s |',
		$N, $drain{voutbox}, $drain{bare}, $drain{debezium} ? sprintf('%.0f', $drain{debezium}) : '-',
		$drain{voutbox} / $drain{bare}, $drain{debezium} ? sprintf('%.1f×', $drain{voutbox} / $drain{debezium}) : '-');
	push @report, sprintf('| a. drain: first event appended, ms after the commit | %.0f | | %s | | |',
		$drain{first}, defined $drain{dfirst} ? sprintf('%.0f', $drain{dfirst}) : '-');
	push @report, sprintf('| c. drain: CPU, ms per 1000 events (voutbox: worker; Debezium: JVM + walsender) | %.1f | | %s | | %s |',
		$drain{cpu}, $drain{dcpu} ? sprintf('%.1f', $drain{dcpu}) : '-',
		$drain{dcpu} ? sprintf('%.2f×', $drain{cpu} / $drain{dcpu}) : '-');
	$chart{drain} = [ $drain{voutbox}, $drain{bare}, $drain{debezium} // 0 ];
	$chart{cpu_drain} = [ $drain{cpu}, $drain{dcpu} // 0 ];
}

# --- b. latency at steady rates
if ($PART{latency})
{
	for my $rate (@RATES)
	{
		my $count = $rate * $SECONDS;
		my $clients = $count >= 4 ? 4 : 1;
		my %l;

		my $type = "order.lat$rate.v1";
		new_topic("acme.$type");
		$node->safe_psql('postgres', "SELECT outbox_save('acme', 'order', 'warm', '$type', '{}')");
		wait_for_delivered($node, 1, "event_type = '$type'");
		PostgreSQL::Test::Utils::append_to_file("$dir/rate$rate.sql",
			"\\set n random(1, 1000000)\nSELECT outbox_save('acme', 'order', :n::text, '$type', $timed);\n");
		my $cpu0 = proc_cpu_ms($wpid);
		system("pgbench -n -c $clients -j 2 -R $rate -t " . int($count / $clients)
			  . " -f $dir/rate$rate.sql -h ${\ $node->host} -p ${\ $node->port} postgres >/dev/null 2>&1");
		my $saved = $node->safe_psql('postgres', "SELECT count(*) FROM outbox WHERE event_type = '$type'");
		$node->poll_query_until('postgres', "SELECT count(*) = 0 FROM outbox WHERE status <> 'delivered'", 't')
		  or die 'latency events not delivered';
		my $cpu = proc_cpu_ms($wpid) - $cpu0;
		$l{voutbox} = latencies((consume_times("acme.$type", $saved))[1]);
		$l{cpu} = 1000 * $cpu / $l{voutbox}{n};
		kafka_create_topic($kafka, "bench.lat$rate", 4);
		$l{bare} = decode_json(`$vkafka produce -b '$kafka->{brokers}' -t bench.lat$rate -n $count -s 580 -r $rate -l $LINGER`);

		if ($PART{debezium})
		{
			new_topic("outbox.event.lat$rate");
			my $d = dbz_start("bench_lat$rate");
			$node->safe_psql('postgres', "INSERT INTO outbox_dbz (aggregatetype, aggregateid, type, payload) "
				  . "VALUES ('lat$rate', 'warm', '$type', '{}')");
			consume_times("outbox.event.lat$rate", 1);
			PostgreSQL::Test::Utils::append_to_file("$dir/dbz$rate.sql",
				"\\set n random(1, 1000000)\nINSERT INTO outbox_dbz (aggregatetype, aggregateid, type, payload) "
				  . "VALUES ('lat$rate', :n::text, '$type', $timed);\n");
			my $dcpu0 = dbz_cpu_ms($d);
			system("pgbench -n -c $clients -j 2 -R $rate -t " . int($count / $clients)
				  . " -f $dir/dbz$rate.sql -h ${\ $node->host} -p ${\ $node->port} postgres >/dev/null 2>&1");
			my $dsaved = $node->safe_psql('postgres', "SELECT count(*) FROM outbox_dbz WHERE aggregatetype = 'lat$rate'");
			my (undef, $pairs) = consume_times("outbox.event.lat$rate", $dsaved);
			$l{dcpu} = 1000 * (dbz_cpu_ms($d) - $dcpu0) / ($dsaved - 1);
			$l{debezium} = latencies($pairs);
			dbz_stop($d);
			$drain{drss} //= $d->{rss};
		}
		my ($v, $b, $d) = @l{qw(voutbox bare debezium)};
		push @report, sprintf('| b. latency at %d events/s, commit to broker append, ms p50 / p95 / p99 / max (bare producer: produce to ack) | %.1f / %.1f / %.1f / %.1f | %.1f / %.1f / %.1f | %s | %.2f (p50) | %s |',
			$rate, @$v{qw(p50 p95 p99 max)}, @$b{qw(p50_ms p95_ms p99_ms)},
			$d ? sprintf('%.1f / %.1f / %.1f / %.1f', @$d{qw(p50 p95 p99 max)}) : '-',
			$v->{p50} / $b->{p50_ms},
			$d ? sprintf('%.2f (p50), %.2f (p99)', $v->{p50} / $d->{p50}, $v->{p99} / $d->{p99}) : '-');
		push @report, sprintf('| c. CPU at %d events/s, ms per 1000 events | %.1f | | %s | | %s |',
			$rate, $l{cpu}, $l{dcpu} ? sprintf('%.1f', $l{dcpu}) : '-',
			$l{dcpu} ? sprintf('%.2f×', $l{cpu} / $l{dcpu}) : '-');
		$chart{"lat$rate"} = [ $v->{p50}, $v->{p99}, $d ? ($d->{p50}, $d->{p99}) : (0, 0) ];
		$chart{"cpu$rate"} = [ $l{cpu}, $l{dcpu} // 0 ];
	}
}
# --- e. a silent topic
if ($PART{silent})
{
	my $rate = $RATES[0];
	my $count = $rate * $SECONDS;
	my $type = "order.quiet$rate.v1";
	my $silent = "order.silent$rate.v1";
	new_topic("acme.$type");
	$node->append_conf('postgresql.conf', "voutbox.delivery_timeout = '2s'\nvoutbox.max_retries = 1000\nvoutbox.backoff_max = '2s'\n");
	$node->reload;
	$node->safe_psql('postgres', "SELECT outbox_save('acme', 'order', 'warm', '$type', '{}')");
	wait_for_delivered($node, 1, "event_type = '$type'");
	PostgreSQL::Test::Utils::append_to_file("$dir/quiet$rate.sql",
		"\\set n random(1, 1000000)\nSELECT outbox_save('acme', 'order', :n::text, '$type', $timed);\n");
	PostgreSQL::Test::Utils::append_to_file("$dir/silent$rate.sql",
		"\\set n random(1, 1000000)\nSELECT outbox_save('acme', 'order', :n::text, '$silent', $timed);\n");
	system("pgbench -n -c 4 -j 2 -R $rate -t " . int($count / 4)
		  . " -f $dir/quiet$rate.sql\@9 -f $dir/silent$rate.sql\@1 -h ${\ $node->host} -p ${\ $node->port} postgres >/dev/null 2>&1");
	my $saved = $node->safe_psql('postgres', "SELECT count(*) FROM outbox WHERE event_type = '$type'");
	$node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM outbox WHERE status <> 'delivered' AND event_type = '$type'", 't')
	  or die 'events of the answering topic not delivered';
	my $retried = $node->safe_psql('postgres',
		"SELECT coalesce(sum(retry_count), 0) FROM outbox WHERE event_type = '$silent'");
	my $l = latencies((consume_times("acme.$type", $saved))[1]);
	# The silent topic is created; its events go, and the settings are put back.
	new_topic("acme.$silent");
	$node->poll_query_until('postgres', "SELECT count(*) = 0 FROM outbox WHERE status <> 'delivered'", 't')
	  or die 'events of the silent topic not delivered';
	$node->append_conf('postgresql.conf', "voutbox.delivery_timeout = '60s'\nvoutbox.max_retries = 10\nvoutbox.backoff_max = '5min'\n");
	$node->reload;
	my $normal = $chart{"lat$rate"};
	push @report, sprintf('| e. other topics\' latency at %d events/s while a tenth of them go to a topic that does not answer (%d failed attempts of its events), ms p50 / p95 / p99 / max | %.1f / %.1f / %.1f / %.1f | | | %s | |',
		$rate, $retried, @$l{qw(p50 p95 p99 max)},
		$normal ? sprintf('%.2f (p99 vs b\'s %.1f)', $l->{p99} / $normal->[1], $normal->[1]) : '-');
}

if ($PART{drain} || $PART{latency})
{
	push @report, sprintf('| c. peak RSS, MB (voutbox: worker, VmHWM, with the shared buffers it touched; private now %.1f) | %.1f | | %s | | |',
		proc_mb($wpid, 'smaps_rollup', 'Private_(?:Clean|Dirty)'), proc_mb($wpid, 'status', 'VmHWM'),
		$drain{drss} ? sprintf('%.1f (JVM, VmHWM)', $drain{drss}) : '-');
}

# --- f. exactly_once beside at_least_once
if ($PART{eos})
{
	my $type = 'order.eos.v1';
	my %f;
	new_topic("acme.$type");
	# (Made here as the worker would make it, so that it can be read before the first checkpoint.)
	my $ctopic = checkpoint_topic($node);
	kafka_create_topic($kafka, $ctopic, 1, 'cleanup.policy=compact');
	for my $mode (qw(at_least_once exactly_once at_least_once exactly_once))
	{
		$node->safe_psql('postgres', "ALTER SYSTEM SET voutbox.delivery = '$mode'; SELECT pg_reload_conf()");
		# (The worker rebuilds its producer for the new mode before it sends the next round.)
		$node->safe_psql('postgres', "SELECT outbox_save('acme', 'order', 'warm', '$type', '{}')");
		$node->poll_query_until('postgres', "SELECT count(*) = 0 FROM outbox WHERE status <> 'delivered'", 't')
		  or die 'warm-up event not delivered';
		my $checkpoints = () = consume_all($kafka, $ctopic, 10);
		my $cpu0 = proc_cpu_ms($wpid);
		my $t0 = $node->safe_psql('postgres', "BEGIN; SELECT count(outbox_save('acme', 'order', (n % 1000)::text, '$type', "
			  . ($payload =~ s/:n/n/gr) . ")) FROM generate_series(1, $N) n; COMMIT; "
			  . "SELECT extract(epoch FROM clock_timestamp())");
		$t0 = (split /\n/, $t0)[-1];
		my $deadline = time() + 600;
		while ($node->safe_psql('postgres', "SELECT count(*) = 0 FROM outbox WHERE status <> 'delivered'") ne 't')
		{
			die "the $mode backlog was not drained" if time() > $deadline;
			Time::HiRes::sleep(0.01);
		}
		my $t1 = time();
		my $cpu = proc_cpu_ms($wpid) - $cpu0;
		my $more = (() = consume_all($kafka, $ctopic, 10)) - $checkpoints;
		# (A check that the mode took: only exactly_once writes checkpoints.)
		die "$mode: $more checkpoint records" if ($mode eq 'exactly_once') != ($more > 0);
		push @{ $f{$mode} }, { rate => $N / ($t1 - $t0), cpu => 1000 * $cpu / $N, txns => $more };
	}
	$node->safe_psql('postgres', "ALTER SYSTEM RESET voutbox.delivery; SELECT pg_reload_conf()");
	my ($alo) = sort { $b->{rate} <=> $a->{rate} } @{ $f{at_least_once} };
	my ($eos) = sort { $b->{rate} <=> $a->{rate} } @{ $f{exactly_once} };
	push @report, sprintf('| f. exactly_once drain: %d events committed at once, commit to all settled, events/s (best of 2; at_least_once beside it: %s; exactly_once runs: %s; Kafka transactions: %s) | %.0f | %.0f (at_least_once) | | %.2f | |',
		$N, join(', ', map { sprintf('%.0f', $_->{rate}) } @{ $f{at_least_once} }),
		join(', ', map { sprintf('%.0f', $_->{rate}) } @{ $f{exactly_once} }),
		join(', ', map { $_->{txns} } @{ $f{exactly_once} }),
		$eos->{rate}, $alo->{rate}, $eos->{rate} / $alo->{rate});
	push @report, sprintf('| f. exactly_once drain: worker CPU, ms per 1000 events (runs: %s; at_least_once: %s) | %.1f | %.1f (at_least_once) | | %.2f | |',
		join(', ', map { sprintf('%.1f', $_->{cpu}) } @{ $f{exactly_once} }),
		join(', ', map { sprintf('%.1f', $_->{cpu}) } @{ $f{at_least_once} }),
		$eos->{cpu}, $alo->{cpu}, $eos->{cpu} / $alo->{cpu});
}

# --- d. save path, in a database the worker does not serve
if ($PART{save})
{
	$node->safe_psql('postgres', 'CREATE DATABASE save_bench');
	$node->safe_psql('save_bench', 'CREATE EXTENSION voutbox');
	$node->safe_psql('save_bench',
		'CREATE TABLE plain_outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), tenant_id text, '
		  . 'aggregate_type text, aggregate_id text, event_type text, payload jsonb, idempotency_key text, '
		  . 'created_at timestamptz DEFAULT now(), published_at timestamptz); '
		  . 'CREATE UNIQUE INDEX ON plain_outbox (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL');
	my %sql = (
		save => "SELECT outbox_save('acme', 'order', :n::text, 'order.placed.v1', $payload);",
		save_key => "SELECT outbox_save('acme', 'order', :n::text, 'order.placed.v1', $payload, "
		  . "idempotency_key => gen_random_uuid()::text);",
		insert => "INSERT INTO plain_outbox (tenant_id, aggregate_type, aggregate_id, event_type, payload) "
		  . "VALUES ('acme', 'order', :n::text, 'order.placed.v1', $payload);",
		insert_key => "INSERT INTO plain_outbox (tenant_id, aggregate_type, aggregate_id, event_type, payload, "
		  . "idempotency_key) VALUES ('acme', 'order', :n::text, 'order.placed.v1', $payload, gen_random_uuid()::text);");
	PostgreSQL::Test::Utils::append_to_file("$dir/$_.sql", "\\set n random(1, 1000000)\n$sql{$_}\n") for keys %sql;
	# The same save where routes exist: 20 of them, tried in order, the last
	# one matching (a CloudEvents format and two static headers).
	$node->safe_psql('postgres', 'CREATE DATABASE save_routes_bench');
	$node->safe_psql('save_routes_bench', 'CREATE EXTENSION voutbox');
	$node->safe_psql('save_routes_bench', q{
		INSERT INTO outbox_routes (name, priority, tenant_pattern, event_type_pattern, topic_template)
		SELECT 'other-' || i, i, 'tenant' || i, '*', '{tenant_id}.routed' FROM generate_series(1, 19) i;
		INSERT INTO outbox_routes (name, priority, tenant_pattern, event_type_pattern, topic_template, format, headers)
		VALUES ('acme-orders', 100, 'acme', 'order.*', '{tenant_id}.orders', 'cloudevents',
				'{"x-team": "orders", "x-schema": "order/v1"}')});
	my %db = (save_routed => 'save_routes_bench');
	PostgreSQL::Test::Utils::append_to_file("$dir/save_routed.sql", "\\set n random(1, 1000000)\n$sql{save}\n");
	my %tps;
	for my $round (1 .. 2)
	{
		for my $kind ('insert', 'save', 'save_routed', 'insert_key', 'save_key')
		{
			my $out = `pgbench -n -c 2 -j 2 -T $SECONDS -f $dir/$kind.sql -h ${\ $node->host} -p ${\ $node->port} ${\ ($db{$kind} // 'save_bench')} 2>&1`;
			my ($t) = $out =~ /tps = ([\d.]+)/;
			push @{ $tps{$kind} }, $t;
		}
	}
	my %best = map { $_ => (sort { $a <=> $b } @{ $tps{$_} })[-1] } keys %tps;
	for my $k ('', '_key')
	{
		push @report, sprintf('| d. save path%s: transactions/s, 2 clients, one event each (baseline: plain INSERT, same unique index) | %.0f | %.0f | | %.2f | |',
			$k ? ' with idempotency keys' : ', no keys', $best{"save$k"}, $best{"insert$k"}, $best{"save$k"} / $best{"insert$k"});
	}
	push @report, sprintf('| d. save path with 20 routes (the 20th matches: CloudEvents, 2 headers): transactions/s, 2 clients, one event each | %.0f | %.0f | | %.2f | |',
		$best{save_routed}, $best{insert}, $best{save_routed} / $best{insert});

	# in bulk: one statement saves $BULK events
	my %bulk = (
		save => "SELECT count(outbox_save('acme', 'order', n::text, 'order.placed.v1', " . ($payload =~ s/:n/n/gr) . ")) FROM generate_series(1, $BULK) n",
		save_key => "SELECT count(outbox_save('acme', 'order', n::text, 'order.placed.v1', " . ($payload =~ s/:n/n/gr)
		  . ", idempotency_key => gen_random_uuid()::text)) FROM generate_series(1, $BULK) n",
		insert => "INSERT INTO plain_outbox (tenant_id, aggregate_type, aggregate_id, event_type, payload) "
		  . "SELECT 'acme', 'order', n::text, 'order.placed.v1', " . ($payload =~ s/:n/n/gr) . " FROM generate_series(1, $BULK) n",
		insert_key => "INSERT INTO plain_outbox (tenant_id, aggregate_type, aggregate_id, event_type, payload, idempotency_key) "
		  . "SELECT 'acme', 'order', n::text, 'order.placed.v1', " . ($payload =~ s/:n/n/gr)
		  . ", gen_random_uuid()::text FROM generate_series(1, $BULK) n");
	my %secs;
	for my $round (1 .. 3)
	{
		for my $kind (sort keys %bulk)
		{
			my $t = time;
			$node->safe_psql('save_bench', $bulk{$kind});
			my $s = time - $t;
			$secs{$kind} = $s if !defined $secs{$kind} || $s < $secs{$kind};
		}
	}
	for my $k ('', '_key')
	{
		push @report, sprintf('| d. save path in bulk%s: %d events in one statement, events/s | %.0f | %.0f | | %.2f | |',
			$k ? ', with idempotency keys' : ', no keys', $BULK, $BULK / $secs{"save$k"}, $BULK / $secs{"insert$k"},
			$secs{"insert$k"} / $secs{"save$k"});
	}
}

my $cpus = `nproc`;
chomp $cpus;
my $rdkafka = `pkg-config --modversion rdkafka`;
chomp $rdkafka;
# PostgreSQL::Test::Utils sends STDOUT to the test log: write the report to a file.
open my $out, '>', $ENV{BENCH_REPORT} // "$dir/bench-report.md" or die $!;
print $out "## voutbox benchmark, " . `date -u +%Y-%m-%d`;
print $out "\nPostgreSQL $pg, Apache Kafka 4.1 (one KRaft node on loopback), $cpus CPUs, librdkafka $rdkafka, "
  . "Debezium 3.6.1 (embedded engine, pgoutput, outbox EventRouter, poll.interval.ms 10; its producer: kafka-clients). "
  . "Every producer idempotent, acks=all, linger.ms $LINGER; fsync on, synchronous_commit on. voutbox: batch_size $BATCH, "
  . "batch_bytes $BATCH_BYTES" . (%drain ? ", envelopes of $drain{size} bytes (Debezium sends the payload alone)" : '')
  . (%drain ? "; the drain took $drain{rounds} rounds" : '') . ".\n\n";
print $out "| what | voutbox | bare producer / plain INSERT | Debezium | voutbox / bare | voutbox vs Debezium |\n";
print $out "|---|---|---|---|---|---|\n";
print $out "$_\n" for @report;
close $out;
# (A test, so that a run of only some parts, without other tests, passes.)
ok(@report > 0, 'the report has figures');

# The chart, from this run's figures.
if ($ENV{BENCH_CHART} && %chart && system('command -v gnuplot >/dev/null') == 0)
{
	open my $dat, '>', "$dir/chart.dat" or die $!;
	printf $dat "\"drain, 1000 events/s\" %.1f %.1f %.1f\n", map { $_ / 1000 } @{ $chart{drain} // [ 0, 0, 0 ] };
	for my $rate (@RATES)
	{
		my $l = $chart{"lat$rate"} // [ 0, 0, 0, 0 ];
		printf $dat "\"p50 ms at %d/s\" %.2f 0 %.2f\n", $rate, $l->[0], $l->[2];
		printf $dat "\"p99 ms at %d/s\" %.2f 0 %.2f\n", $rate, $l->[1], $l->[3];
	}
	printf $dat "\"CPU ms/1000 ev, drain\" %.1f 0 %.1f\n", @{ $chart{cpu_drain} // [ 0, 0 ] };
	printf $dat "\"CPU ms/1000 ev at %d/s\" %.1f 0 %.1f\n", $_, @{ $chart{"cpu$_"} // [ 0, 0 ] } for @RATES;
	close $dat;
	open my $gp, '|-', 'gnuplot' or die $!;
	print $gp <<"GP";
set terminal pngcairo size 1100,520 font ',10' noenhanced
set output '$ENV{BENCH_CHART}'
set title 'voutbox vs a bare librdkafka producer and Debezium 3.6.1, one run on one machine ($cpus CPUs); log scale'
set style data histogram
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set logscale y
set yrange [0.1:*]
set xtics rotate by -25 left
set key top left
plot '$dir/chart.dat' using 2:xtic(1) title 'voutbox', '' using 3 title 'bare producer', '' using 4 title 'Debezium'
GP
	close $gp;
}
note('done');
$node->stop;
kafka_stop($kafka);
done_testing();
