# The worker never waits indefinitely behind a lock a user holds, stops
# promptly inside a transaction, and does not re-send events without end
# when its settle keeps failing.
#  - An operator locks outbox_dlq (LOCK TABLE, or rows it edits): delivery
#    goes on; dead events wait in the retry queue, sent no more, and move
#    once the lock goes; the DLQ's retention skips locked rows.
#  - SIGTERM while the worker's settle waits for a lock: it stops at once.
#  - A constraint makes every settle fail: the worker keeps the round, says
#    so, tries again with a growing delay, and sends nothing twice.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use VoutboxTest;

my $kafka = kafka_start('liveness', 'auto.create.topics.enable=false');
kafka_create_topic($kafka, 'acme.item.ok.v1', 2);
my $node = voutbox_node('liveness', $kafka,
	# Its missing topics stay missing: voutbox does not create them.
	'voutbox.create_topics' => 'off',
	'voutbox.delivery_timeout' => '1s',
	'voutbox.max_retries' => '0',
	'voutbox.dlq_retention' => '1h',
	'voutbox.cleanup_interval' => '200ms');
$node->safe_psql('postgres', 'CREATE ROLE ops LOGIN IN ROLE voutbox_admin');

my $n_ok = 0;
sub save_ok
{
	my ($count) = @_;
	$node->safe_psql('postgres',
		"SELECT count(outbox_save('acme', 'item', 'k' || (g % 5), 'item.ok.v1', jsonb_build_object('n', g))) "
		  . "FROM generate_series(" . ($n_ok + 1) . ', ' . ($n_ok + $count) . ') g');
	$n_ok += $count;
	return;
}

# Delivered events are counted from the cursor and Kafka: with outbox_dlq
# locked, the outbox view (which looks into it) waits too.
sub kafka_count
{
	my %ids = map { $_->{event}{id} => 1 } consume_all($kafka, 'acme.item.ok.v1');
	return scalar(keys %ids);
}

# --- An operator holds outbox_dlq locked while an event dies.
my $ops = $node->background_psql('postgres', extra_params => [ '-U', 'ops' ]);
$ops->query_safe('BEGIN');
$ops->query_safe('LOCK TABLE outbox_dlq IN ACCESS EXCLUSIVE MODE');
$node->safe_psql('postgres', save_sql('acme', 'item.lost.v1', 'x', { n => 1 }));
$node->poll_query_until('postgres', "SELECT count(*) = 1 FROM voutbox.deferred WHERE dead_reason IS NOT NULL")
  or die 'the event did not die';
save_ok(20);
$node->poll_query_until('postgres', 'SELECT sum(events) >= 21 FROM voutbox.batches')
  or die 'delivery stopped while outbox_dlq was locked';
is(kafka_count(), 20, 'delivery goes on while outbox_dlq is locked');
$node->wait_for_log(qr/voutbox: outbox_dlq is locked; dead events wait to be moved there/);
pass('the log says dead events wait for the lock');
is($node->safe_psql('postgres', 'SELECT state FROM outbox_worker'), 'idle', 'the worker is idle, not stuck');
$ops->query_safe('COMMIT');
$node->poll_query_until('postgres', "SELECT count(*) = 1 FROM outbox_dlq WHERE aggregate_id = 'x'")
  or die 'the dead event did not move once the lock was released';
pass('the dead event moves to the DLQ once the lock is released');
is($node->safe_psql('postgres', "SELECT status FROM outbox WHERE aggregate_id = 'x'"), 'dead', 'it shows as dead');

# --- An operator edits a dead event in an open transaction; the DLQ's
# retention (1 s) trims the others and skips it, without waiting.
$node->safe_psql('postgres', save_sql('acme', 'item.lost.v1', 'y', { n => 2 }));
$node->poll_query_until('postgres', 'SELECT count(*) = 2 FROM outbox_dlq') or die 'second event did not die';
$ops->query_safe('BEGIN');
$ops->query_safe("UPDATE outbox_dlq SET payload = '{\"n\": 3}' WHERE aggregate_id = 'y'");
$node->safe_psql('postgres', "ALTER SYSTEM SET voutbox.dlq_retention = '1s'");
$node->reload;
$node->poll_query_until('postgres', "SELECT count(*) = 0 FROM outbox_dlq WHERE aggregate_id = 'x'")
  or die 'the unlocked dead event was not trimmed';
is($node->safe_psql('postgres', "SELECT count(*) FROM outbox_dlq WHERE aggregate_id = 'y'"), '1',
	'the locked dead event is skipped by retention');
save_ok(5);
$node->poll_query_until('postgres', 'SELECT sum(events) >= 27 FROM voutbox.batches')
  or die 'delivery stopped while a DLQ row was locked';
pass('delivery goes on while a DLQ row is locked');
$ops->query_safe('ROLLBACK');
$ops->quit;
$node->poll_query_until('postgres', 'SELECT count(*) = 0 FROM outbox_dlq')
  or die 'the dead event was not trimmed after the lock went';

# --- SIGTERM while the settle waits for a lock (here a superuser's).
my $locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN');
$locker->query_safe('LOCK TABLE voutbox.batches IN EXCLUSIVE MODE');
save_ok(5);
$node->poll_query_until('postgres',
	"SELECT wait_event_type = 'Lock' AND query = 'settling a batch' "
	  . "FROM pg_stat_activity WHERE backend_type = 'voutbox worker'")
  or die 'the worker did not reach the settle';
my $pid = worker_pid($node);
my $t0 = time;
$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
my $gone = 0;
while (time - $t0 < 10)
{
	$gone = !kill(0, $pid);
	last if $gone;
	select(undef, undef, undef, 0.05);
}
ok($gone, sprintf('SIGTERM ends the worker waiting for a lock (in %.1f s)', time - $t0));
$node->wait_for_log(qr/voutbox: delivery worker stopped/);
$locker->query_safe('COMMIT');
$locker->quit;
wait_for_delivered($node, $n_ok, "topic = 'acme.item.ok.v1'");
pass('the next worker delivers what the stopped one did not settle');

# --- More than SELECT on a view (here UPDATE on outbox, as "GRANT ALL ON
# ALL TABLES IN SCHEMA public" gives) lets a role LOCK it, which locks the
# storage under it.  The worker does not wait for it: it says so, tries
# again after a growing delay, and goes on once the lock is gone.
$node->safe_psql('postgres', 'CREATE ROLE app LOGIN; GRANT SELECT, UPDATE ON outbox TO app');
my $app = $node->background_psql('postgres', extra_params => [ '-U', 'app' ]);
$app->query_safe('BEGIN');
$app->query_safe('LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE');
$node->poll_query_until('postgres', "SELECT state = 'waiting for a lock' FROM outbox_worker")
  or die 'the worker does not say it waits for a lock';
pass('outbox_worker says the worker waits for a lock');
$node->wait_for_log(qr/voutbox: canceling statement due to lock timeout; trying again in \d+ ms/);
pass('and the log');
$app->query_safe('COMMIT');
$app->quit;
save_ok(3);
wait_for_delivered($node, $n_ok, "topic = 'acme.item.ok.v1'");
pass('delivery goes on once the lock is gone');

# --- Every settle fails: the round is kept and settled later, never re-sent.
$pid = worker_pid($node);
my $before = kafka_count();
$node->safe_psql('postgres', 'ALTER TABLE voutbox.batches ADD CONSTRAINT broken CHECK (events < 0) NOT VALID');
save_ok(10);
$node->wait_for_log(qr/voutbox: could not record the outcome of 10 delivered events \(try 3\)/);
is($node->safe_psql('postgres', 'SELECT state FROM outbox_worker'), 'settle failing',
	'outbox_worker says the settle fails');
like($node->safe_psql('postgres', 'SELECT last_error FROM outbox_worker'), qr/violates check constraint "broken"/,
	'and why');
is(worker_pid($node), $pid, 'the same worker keeps trying');
is(kafka_count(), $before + 10, 'each event was sent once, however often the settle failed');
my @copies = grep { $_->{event}{payload}{n} > $n_ok - 10 } consume_all($kafka, 'acme.item.ok.v1');
is(scalar(@copies), 10, 'no copy at all');
my @tries = slurp_file($node->logfile) =~ /could not record the outcome of 10 delivered events \(try \d+\).*\n.*tries again in (\d+) ms/g;
is(join(',', @tries[0 .. 2]), '1000,2000,4000', 'the delay between tries grows');
$node->safe_psql('postgres', 'ALTER TABLE voutbox.batches DROP CONSTRAINT broken');
wait_for_delivered($node, $n_ok, "topic = 'acme.item.ok.v1'");
pass('settled once the constraint is gone');
is(kafka_count(), $before + 10, 'still each event once');
$node->wait_for_log(qr/recorded the outcome of 10 events after \d+ failed tries/);

$node->stop;
kafka_stop($kafka);
done_testing();
