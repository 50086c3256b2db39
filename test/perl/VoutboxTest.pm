
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

our @EXPORT = qw(kafka_start kafka_stop kafka_create_topic kafka_alter_topic
  voutbox_node consume_events consume_all worker_pid wait_for_delivered save_sql
  by_key check_key_order check_same_events start_pgbench finish_pgbench counter_script);

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

sub kafka_create_topic
{
	my ($kafka, $topic, $partitions, @configs) = @_;
	my @c = map { ('-c', $_) } @configs;
	system($vkafka, 'create-topic', '-b', $kafka->{brokers}, '-t', $topic,
		'-p', $partitions, @c) == 0
	  or die "could not create topic $topic";
	return;
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

# Everything in the (existing) $topics, read to the end of every partition.
sub consume_all
{
	my ($kafka, $topics, $timeout) = @_;
	$timeout //= $PostgreSQL::Test::Utils::timeout_default;
	my @lines = `$vkafka consume -b '$kafka->{brokers}' -t '$topics' -e -T $timeout`;
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
	is(scalar(@lost), 0, "$name: no committed event lost (" . scalar(keys %db) . " events)");
	is(scalar(@phantom), 0, "$name: no event that was not committed");
	note("$name: $dups duplicates (re-sent after a crash, same id)");
	return $dups;
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

1;
