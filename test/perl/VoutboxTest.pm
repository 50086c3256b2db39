
# Helpers shared by voutbox's TAP tests: a throwaway Kafka broker, a
# PostgreSQL node with voutbox preloaded, and a consumer with a deadline.

package VoutboxTest;

use strict;
use warnings;

use Cwd qw(abs_path);
use Exporter qw(import);
use File::Basename qw(dirname);
use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

# Sanitizer pass (test/run.sh, test/setup.sh voutbox_sanitize_build): the
# installed voutbox.so is built with -fsanitize=address,undefined and
# VOUTBOX_SANITIZE_PRELOAD is the LD_PRELOAD list it needs (libasan first).
# Only the server gets it: it is set while pg_ctl starts the postmaster, whose
# children inherit it; psql, pgbench, vkafka and the Kafka JVM run without.
# ASan writes its reports to tmp_check/sanitizer/TEST.PID; UBSan (whose
# log_path is ignored when ASan is loaded too) to stderr, i.e. the server log.
# Any report fails the test; test/run.sh checks the whole run again.
if (my $preload = $ENV{VOUTBOX_SANITIZE_PRELOAD})
{
	my $test = File::Basename::basename($0);
	$test =~ s/\.[^.]+$//;
	my $report_dir = sub { "$PostgreSQL::Test::Utils::tmp_check/sanitizer" };
	no strict 'refs';
	no warnings 'redefine';
	for my $method (qw(start restart))
	{
		my $orig = \&{"PostgreSQL::Test::Cluster::$method"};
		*{"PostgreSQL::Test::Cluster::$method"} = sub {
			mkdir $report_dir->();
			# detect_leaks=0: the postmaster and its children exit without
			# freeing.  abort_on_error=1: a finding is a crash (signal 6) the
			# postmaster and the test notice, not an exit(1).
			local $ENV{ASAN_OPTIONS} = 'abort_on_error=1:detect_leaks=0:log_path='
			  . $report_dir->() . "/$test";
			# (UBSan gets these through the preloaded shim of test/setup.sh.)
			local $ENV{UBSAN_OPTIONS} = 'abort_on_error=1:halt_on_error=1:print_stacktrace=1';
			local $ENV{LD_PRELOAD} =
			  $ENV{LD_PRELOAD} ? "$preload $ENV{LD_PRELOAD}" : $preload;
			my $ret = $orig->(@_);
			# libubsan is there only if the voutbox.so loaded is the
			# sanitized one (someone may have installed another since).
			my $pid = $_[0]->{_pid};
			my $maps = defined $pid ? PostgreSQL::Test::Utils::slurp_file("/proc/$pid/maps") : '';
			die "the server (pid $pid) runs without libasan or a sanitized voutbox.so"
			  if defined $pid && ($maps !~ /libasan/ || $maps !~ /libubsan/);
			return $ret;
		};
	}
}

# The sanitizer reports of this test: ASan's files, UBSan's (and any other
# "Sanitizer") lines in its servers' logs.  Returns their number and the
# first two (a crash-looping worker can leave hundreds).
sub _sanitizer_reports
{
	my $test = File::Basename::basename($0);
	$test =~ s/\.[^.]+$//;
	my ($n, $shown) = (0, '');
	for my $f (sort { -M $b <=> -M $a }
		glob("$PostgreSQL::Test::Utils::tmp_check/sanitizer/$test.*"))
	{
		$shown .= "--- $f\n" . PostgreSQL::Test::Utils::slurp_file($f) if ++$n <= 2;
	}
	for my $f (sort glob("$PostgreSQL::Test::Utils::log_path/${test}_*.log"))
	{
		my @lines = split /^/, PostgreSQL::Test::Utils::slurp_file($f);
		for my $i (grep { $lines[$_] =~ /runtime error:|Sanitizer/ } 0 .. $#lines)
		{
			my $last = $i + 25 > $#lines ? $#lines : $i + 25;
			$shown .= "--- $f, line " . ($i + 1) . "\n" . join('', @lines[ $i .. $last ])
			  if ++$n <= 2;
		}
	}
	return ($n, $shown);
}

END
{
	if ($ENV{VOUTBOX_SANITIZE_PRELOAD} && defined $PostgreSQL::Test::Utils::tmp_check)
	{
		my ($n, $shown) = _sanitizer_reports();
		if ($n)
		{
			diag("$n sanitizer reports; the first:\n$shown");
			$? = 1 if $? == 0;    # fails the test (Test::Builder keeps it)
		}
	}
}

our @EXPORT = qw(kafka_start kafka_stop kafka_create_topic kafka_alter_topic
  kafka_cluster_start kafka_cluster_stop kafka_node_stop kafka_node_start
  kafka_active_controller kafka_partition_leader kafka_describe_topic
  voutbox_node consume_events consume_all checkpoint_topic inject_fault worker_pid wait_for_delivered save_sql
  by_key check_key_order check_same_events check_receipts start_pgbench finish_pgbench counter_script
  mock_start mock_cmd mock_stop);

my $root = abs_path(dirname(__FILE__) . '/../..');
my $vkafka = "$root/test/tools/vkafka";

# Brokers started here, killed at exit if a test dies before stopping them.
my %started;
END
{
	local $?;    # keep the test's exit status
	system("$root/test/kafka/stop.sh", $_, 'kill') for keys %started;
}

# Start (or restart, given the same name) a single-node KRaft broker.
# Extra arguments are server.properties lines for its first start.
sub kafka_start
{
	my ($name, @props) = @_;
	my $dir = "$PostgreSQL::Test::Utils::tmp_check/kafka_$name";
	my $out = `$root/test/kafka/start.sh '$dir' @props`;
	die "could not start kafka $name" if $? != 0;
	chomp $out;
	$started{$dir} = 1;
	return { name => $name, dir => $dir, brokers => $out };
}

# Stop the broker: 'term' (default) or 'kill'.
sub kafka_stop
{
	my ($kafka, $mode) = @_;
	system("$root/test/kafka/stop.sh", $kafka->{dir}, $mode // 'term') == 0
	  or die "could not stop kafka $kafka->{name}";
	delete $started{ $kafka->{dir} };
	return;
}

# Start a cluster of $n KRaft nodes (each a broker and a controller) on
# loopback: replication factor $n, min.insync.replicas $n - 1.  Node $i
# (1..$n) is stopped and started again on its own.
sub kafka_cluster_start
{
	my ($name, $n, @props) = @_;
	my $dir = "$PostgreSQL::Test::Utils::tmp_check/kafka_$name";
	my @nodes = map { "$dir/node$_" } 1 .. $n;
	# (Killed at exit even if the cluster never came up whole.)
	$started{$_} = 1 for @nodes;
	my $out = `$root/test/kafka/start-cluster.sh '$dir' $n @props`;
	die "could not start kafka cluster $name" if $? != 0;
	chomp $out;
	return { name => $name, dir => $dir, brokers => $out, nodes => \@nodes };
}

sub kafka_cluster_stop
{
	my ($cluster) = @_;
	kafka_node_stop($cluster, $_) for 1 .. scalar @{ $cluster->{nodes} };
	return;
}

# Stop node $i of a cluster: 'term' (default) or 'kill' (kill -9).
sub kafka_node_stop
{
	my ($cluster, $i, $mode) = @_;
	my $dir = $cluster->{nodes}[ $i - 1 ];
	system("$root/test/kafka/stop.sh", $dir, $mode // 'term') == 0
	  or die "could not stop kafka node $i";
	delete $started{$dir};
	return;
}

# Start node $i of a cluster again; returns once it answers.
sub kafka_node_start
{
	my ($cluster, $i) = @_;
	my $dir = $cluster->{nodes}[ $i - 1 ];
	system("$root/test/kafka/start.sh '$dir' >/dev/null") == 0
	  or die "could not start kafka node $i";
	$started{$dir} = 1;
	return;
}

# The node that is the active controller: the leader of the newest epoch
# in the nodes' KRaft quorum state.
sub kafka_active_controller
{
	my ($cluster) = @_;
	my ($leader, $epoch) = (undef, -1);
	for my $dir (@{ $cluster->{nodes} })
	{
		my $file = "$dir/data/__cluster_metadata-0/quorum-state";
		next unless -f $file;
		my $q = eval { decode_json(slurp_file($file)) } or next;
		($leader, $epoch) = ($q->{leaderId}, $q->{leaderEpoch})
		  if $q->{leaderEpoch} > $epoch && $q->{leaderId} > 0;
	}
	die 'no active controller known' unless defined $leader;
	return $leader;
}

# The node that leads partition $p of $topic, as the cluster's metadata says.
sub kafka_partition_leader
{
	my ($cluster, $topic, $p) = @_;
	my $md = decode_json(scalar `kcat -b '$cluster->{brokers}' -L -t '$topic' -J -m 10`);
	my ($part) = grep { $_->{partition} == $p } @{ $md->{topics}[0]{partitions} };
	die "no partition $p of $topic" unless $part;
	return $part->{leader};
}

sub kafka_create_topic
{
	my ($kafka, $topic, $partitions, @configs) = @_;
	my @c = map { ('-c', $_) } @configs;
	system($vkafka, 'create-topic', '-b', $kafka->{brokers}, '-t', $topic,
		'-p', $partitions, @c) == 0
	  or die "could not create topic $topic";
	return;
}

# The topic as vkafka describe-topic prints it ({partitions,
# replication_factor, config}), or undef if it does not exist.
sub kafka_describe_topic
{
	my ($kafka, $topic) = @_;
	my $out = `$vkafka describe-topic -b '$kafka->{brokers}' -t '$topic'`;
	return $? == 0 ? decode_json($out) : undef;
}

sub kafka_alter_topic
{
	my ($kafka, $topic, @configs) = @_;
	my @c = map { ('-c', $_) } @configs;
	system($vkafka, 'alter-topic', '-b', $kafka->{brokers}, '-t', $topic, @c) == 0
	  or die "could not alter topic $topic";
	return;
}

# A started node whose worker delivers database "postgres" to $kafka, with
# the extension created.  %conf adds postgresql.conf settings.
sub voutbox_node
{
	my ($name, $kafka, %conf) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
	my %settings = (
		shared_preload_libraries => 'voutbox',
		'voutbox.database' => 'postgres',
		'voutbox.brokers' => $kafka ? $kafka->{brokers} : '127.0.0.1:9',
		# PostgreSQL::Test::Cluster turns it off; crash tests need it.
		restart_after_crash => 'on',
		%conf);
	$node->append_conf('postgresql.conf',
		join('', map { "$_ = '$settings{$_}'\n" } sort keys %settings));
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION voutbox');
	return $node;
}

# Consume $count messages from the comma-separated $topics, waiting at most
# $timeout seconds.  Returns the messages, each with its envelope decoded
# into {event}.  Fails the test if fewer arrive.
sub consume_events
{
	my ($kafka, $topics, $count, $timeout) = @_;
	$timeout //= $PostgreSQL::Test::Utils::timeout_default;
	my @lines = `$vkafka consume -b '$kafka->{brokers}' -t '$topics' -n $count -T $timeout`;
	my $rc = $? >> 8;
	my @msgs = map {
		my $m = decode_json($_);
		$m->{event} = JSON::PP->new->decode($m->{value});
		$m
	} @lines;
	is($rc, 0, "$count messages arrived from $topics")
	  or diag("got " . scalar(@msgs) . " messages");
	return @msgs;
}

# The exactly_once worker's checkpoint topic for database postgres of $node
# (voutbox.checkpoint_topic_prefix at its default).
sub checkpoint_topic
{
	my ($node) = @_;
	my ($sysid, $dboid) = split /\|/, $node->safe_psql('postgres',
		"SELECT system_identifier, (SELECT oid FROM pg_database WHERE datname = 'postgres') FROM pg_control_system()");
	return "voutbox.checkpoints.$sysid.$dboid";
}

# Tests only (voutbox.fault_injection on): the worker of $node meets the
# fault $point (src/eos.c) the next time it passes there, once.
sub inject_fault
{
	my ($node, $point) = @_;
	PostgreSQL::Test::Utils::append_to_file($node->data_dir . '/voutbox.fault', "$point\n");
	return;
}

# Everything in the (existing) $topics, read to the end of every partition.
sub consume_all
{
	my ($kafka, $topics, $timeout, $options) = @_;
	$timeout //= $PostgreSQL::Test::Utils::timeout_default;
	$options //= '';
	my @lines = `$vkafka consume -b '$kafka->{brokers}' -t '$topics' -e -T $timeout $options`;
	is($? >> 8, 0, "read $topics to the end");
	return map {
		my $m = decode_json($_);
		$m->{event} = JSON::PP->new->decode($m->{value});
		$m
	} @lines;
}

# The messages carry exactly the committed events of the outbox (matching
# $where): none lost, none that was not committed.  Re-sent duplicates carry
# the same id; their number is reported.
sub check_same_events
{
	my ($node, $msgs, $where, $name) = @_;
	$where //= 'true';
	my %db = map { $_ => 1 } split /\n/,
	  $node->safe_psql('postgres', "SELECT id FROM outbox WHERE $where");
	my %kafka;
	$kafka{ $_->{event}{id} }++ for @$msgs;
	my @lost = grep { !$kafka{$_} } keys %db;
	my @phantom = grep { !$db{$_} } keys %kafka;
	my $dups = scalar(@$msgs) - scalar(keys %kafka);
	is(scalar(@lost), 0, "$name: no committed event lost (" . scalar(keys %db) . " events)")
	  or diag("lost: "
		  . $node->safe_psql('postgres',
			  "SELECT string_agg(format('%s %s %s key %s receipt %s:%s retries %s', id, topic, status, "
				. "aggregate_id, kafka_partition, kafka_offset, retry_count), E'\\n' ORDER BY id) "
				. "FROM outbox WHERE id IN ('" . join("','", @lost[0 .. ($#lost < 19 ? $#lost : 19)]) . "')"));
	is(scalar(@phantom), 0, "$name: no event that was not committed");
	note("$name: $dups duplicates (re-sent after a crash, same id)");
	return $dups;
}

# Every event of outbox WHERE $where has a receipt, and it names the message
# (of @$msgs, read from its topics) that holds the event.  An event counted
# delivered on librdkafka's word alone would have none.
sub check_receipts
{
	my ($node, $msgs, $where, $name) = @_;
	my %at = map { ("$_->{partition}:$_->{offset}" => $_->{event}{id}) } @$msgs;
	my @wrong = grep {
		my ($id, $receipt) = split / /;
		($at{$receipt} // '') ne $id
	} split /\n/, $node->safe_psql('postgres',
		"SELECT format('%s %s:%s', id, kafka_partition, kafka_offset) FROM outbox WHERE $where");
	is(scalar(@wrong), 0, "$name: every receipt names the message of its event")
	  or diag(join("\n", @wrong[0 .. ($#wrong < 19 ? $#wrong : 19)]));
	return;
}

# A pgbench script: bump a per-key counter under a row lock and save it.
sub counter_script
{
	my ($node, $keys) = @_;
	$node->safe_psql('postgres',
		"CREATE TABLE IF NOT EXISTS counters (k int PRIMARY KEY, n int NOT NULL DEFAULT 0); "
		  . "INSERT INTO counters (k) SELECT generate_series(1, $keys) ON CONFLICT DO NOTHING");
	my $script = "$PostgreSQL::Test::Utils::tmp_check/counter_$keys.sql";
	unlink $script;
	PostgreSQL::Test::Utils::append_to_file($script, <<"SQL");
\\set k random(1, $keys)
BEGIN;
UPDATE counters SET n = n + 1 WHERE k = :k RETURNING n \\gset
SELECT outbox_save('acme', 'counter', :k::text, 'counter.bumped.v1', jsonb_build_object('n', :n));
COMMIT;
SQL
	return $script;
}

# Start pgbench in the background.  finish_pgbench() waits for it.
sub start_pgbench
{
	my ($node, $script, @args) = @_;
	my $run = { out => '', err => '' };
	$run->{h} = IPC::Run::start(
		[ 'pgbench', '-n', @args, '-f', $script, '-h', $node->host,
		  '-p', $node->port, 'postgres' ],
		'>', \$run->{out}, '2>', \$run->{err});
	return $run;
}

# Wait for a pgbench started by start_pgbench(); true if it succeeded.
sub finish_pgbench
{
	my ($run) = @_;
	$run->{h}->finish;
	my $ok = $run->{h}->result == 0;
	diag("pgbench: $run->{err}") unless $ok;
	return $ok;
}

sub worker_pid
{
	my ($node) = @_;
	return $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'voutbox worker'");
}

# Wait until $count events have status 'delivered' (with a deadline).
sub wait_for_delivered
{
	my ($node, $count, $where) = @_;
	$where //= 'true';
	$node->poll_query_until('postgres',
		"SELECT count(*) >= $count FROM outbox WHERE status = 'delivered' AND $where")
	  or die "timed out waiting for $count delivered events";
	return;
}

# SQL that saves one event with a JSON payload built from %payload.
sub save_sql
{
	my ($tenant, $type, $agg, $payload) = @_;
	return "SELECT outbox_save('$tenant', 'test', '$agg', '$type', '"
	  . encode_json($payload) . "')";
}

# Group messages by Kafka key, keeping their order of arrival per partition.
sub by_key
{
	my (@msgs) = @_;
	my %keys;
	push @{ $keys{ $_->{key} // '' } }, $_
	  for sort { $a->{partition} <=> $b->{partition} || $a->{offset} <=> $b->{offset} } @msgs;
	return \%keys;
}

# Check that within every key, $field of the payload strictly increases,
# ignoring duplicates (a re-sent event has the same id).
sub check_key_order
{
	my ($msgs, $field, $name) = @_;
	my $keys = by_key(@$msgs);
	my $bad = 0;
	for my $k (sort keys %$keys)
	{
		my %seen;
		my $last = -1;
		for my $m (@{ $keys->{$k} })
		{
			next if $seen{ $m->{event}{id} }++;
			my $v = $m->{event}{payload}{$field};
			if ($v <= $last)
			{
				diag("key $k: $field $v after $last");
				$bad++;
			}
			$last = $v;
		}
	}
	is($bad, 0, $name);
	return;
}


# librdkafka mock clusters ("vkafka mock") started here, killed at exit if a
# test dies before stopping them.
my %mocks;
my $nmocks = 0;
END
{
	local $?;    # keep the test's exit status
	eval { $_->{h}->kill_kill(grace => 2); 1 } for values %mocks;
}

# The next line the mock printed, or undef if none came in time or it exited.
sub _mock_line
{
	my ($mock) = @_;
	$mock->{timer}->start($PostgreSQL::Test::Utils::timeout_default);
	while (1)
	{
		return $1 if $mock->{out} =~ s/\A([^\n]*)\n//;
		return undef if $mock->{timer}->is_expired || !$mock->{h}->pumpable;
		$mock->{h}->pump;
	}
}

# Start a librdkafka mock cluster.  %opts: brokers (how many, default 1, ids
# 1..N), name (of its log file in the test's log directory), debug
# (librdkafka debug contexts, e.g. 'mock,protocol').  Returns a hashref
# usable as $kafka: {brokers} is the bootstrap list.  No topic exists: create
# them with mock_cmd($mock, "create-topic TOPIC PARTITIONS") (a topic that a
# client asks for is otherwise auto-created with 4 partitions).
sub mock_start
{
	my (%opts) = @_;
	my $name = $opts{name} // 'mock' . ++$nmocks;
	my $mock = {
		name => $name,
		in => '',
		out => '',
		log => "$PostgreSQL::Test::Utils::log_path/vkafka_$name.log",
		timer => IPC::Run::timer($PostgreSQL::Test::Utils::timeout_default),
	};
	my @cmd = ($vkafka, 'mock', '-n', $opts{brokers} // 1);
	push @cmd, '-c', "debug=$opts{debug}" if $opts{debug};
	# stderr to a file: a full pipe would block the cluster's logging thread.
	$mock->{h} = IPC::Run::start(\@cmd, '<', \$mock->{in}, '>', \$mock->{out},
		'2>>', $mock->{log}, $mock->{timer});
	$mocks{$mock} = $mock;
	$mock->{brokers} = _mock_line($mock)
	  // die "vkafka mock $name did not start (see $mock->{log})";
	return $mock;
}

# Send one command to the mock (see test/tools/vkafka.c) and wait for its
# answer; dies unless it is "ok".
sub mock_cmd
{
	my ($mock, $cmd) = @_;
	$mock->{in} .= "$cmd\n";
	my $answer = _mock_line($mock);
	die "vkafka mock $mock->{name}: no answer to \"$cmd\"" unless defined $answer;
	die "vkafka mock $mock->{name}: $cmd: $answer" unless $answer eq 'ok';
	return;
}

# Stop the mock cluster and wait for it to exit (killed after the timeout).
sub mock_stop
{
	my ($mock) = @_;
	$mock->{in} .= "quit\n";
	_mock_line($mock);
	$mock->{timer}->start($PostgreSQL::Test::Utils::timeout_default);
	$mock->{h}->pump while $mock->{h}->pumpable && !$mock->{timer}->is_expired;
	$mock->{h}->kill_kill(grace => 2) if $mock->{timer}->is_expired;
	$mock->{h}->finish;
	delete $mocks{$mock};
	return;
}

1;
