# Nothing is published before its commit is durable.  A transaction that
# commits with synchronous_commit = off (any session may SET it) is visible
# at once, but its commit record reaches the disk only later: an immediate
# stop in between erases it.  The worker flushes the WAL up to what it read
# before it sends anything.  Here the settle is held up (a lock on the cursor
# table) and the WAL writer flushes only every 10 s, so that nothing but the
# worker's own flush can make the commits durable before the stop; after
# recovery, every event in Kafka must still exist.  Three times, because the
# WAL writer may flush by chance.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('durable');
kafka_create_topic($kafka, 'acme.item.async.v1', 1);
my $node = voutbox_node('durable', $kafka,
	wal_writer_delay => '10s',
	wal_writer_flush_after => '1GB',
	autovacuum => 'off',
	checkpoint_timeout => '1h',
	bgwriter_lru_maxpages => '0');

for my $attempt (1 .. 3)
{
	# The worker must have read the cursor already: the lock stops its settle only.
	$node->poll_query_until('postgres', "SELECT state = 'idle' FROM outbox_worker")
	  or die 'the worker is not idle';
	my $locker = $node->background_psql('postgres');
	$locker->query_safe('BEGIN');
	$locker->query_safe('LOCK TABLE voutbox.batches IN EXCLUSIVE MODE');

	# (The position of the WAL just before the commit record: the commit
	# ends after it.)
	my $commit_lsn = $node->safe_psql('postgres', qq{
		SET synchronous_commit = off;
		BEGIN;
		SELECT count(outbox_save('acme', 'item', 'a$attempt-' || g, 'item.async.v1',
		                         jsonb_build_object('attempt', $attempt, 'n', g)))
		  FROM generate_series(1, 20) g;
		SELECT pg_current_wal_insert_lsn();
		COMMIT;});
	($commit_lsn) = $commit_lsn =~ /(\S+)\z/;
	$node->poll_query_until('postgres',
		"SELECT wait_event_type = 'Lock' AND query = 'settling a batch' "
		  . "FROM pg_stat_activity WHERE backend_type = 'voutbox worker'")
	  or die 'the worker did not reach the settle';
	my @sent = grep { $_->{event}{payload}{attempt} == $attempt }
	  consume_all($kafka, 'acme.item.async.v1');
	is(scalar(@sent), 20, "attempt $attempt: the events were published before the settle");
	is($node->safe_psql('postgres', "SELECT pg_current_wal_flush_lsn() >= '$commit_lsn'"), 't',
		"attempt $attempt: their commit was flushed before they were published");

	$node->stop('immediate');
	eval { $locker->quit };
	$node->start;
	my %kept = map { $_ => 1 } split /\n/, $node->safe_psql('postgres',
		"SELECT id FROM outbox WHERE payload->>'attempt' = '$attempt'");
	my @phantoms = grep { !$kept{ $_->{event}{id} } } @sent;
	is(scalar(@phantoms), 0, "attempt $attempt: every published event survived the immediate stop");
}

# Everything committed is delivered in the end (again, after the stops).
wait_for_delivered($node, 60);
my @msgs = consume_all($kafka, 'acme.item.async.v1');
check_same_events($node, \@msgs, 'true', 'asynchronous commits');

$node->stop;
kafka_stop($kafka);
done_testing();
