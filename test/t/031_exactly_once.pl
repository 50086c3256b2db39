# Exactly-once delivery (voutbox.delivery = exactly_once).  A read_committed
# consumer sees every committed event once, in order per key, whatever kills
# the worker at each step of a settle (fault injection: the worker kills
# itself with SIGKILL, as kill -9 would, and the server restarts), a
# transaction aborted after its settle was prepared, across an
# immediate stop under load, and across a kill -9 of the broker.  A
# permanent error in a transaction aborts it: the others go again, the
# event goes to the DLQ, the retry queue keeps its key's order.  A copy of
# the server (same system identifier: a failed-over primary) fences the
# worker, which delivers nothing until its configuration is reloaded.  A
# read_uncommitted consumer sees the aborted transactions' copies too: that
# is what the mode documents.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('eos');
my $node = voutbox_node('eos', $kafka,
	'voutbox.delivery' => 'exactly_once',
	'max_prepared_transactions' => '10',
	'voutbox.fault_injection' => 'on',
	'voutbox.delivery_timeout' => '10s',
	# (for the copy of the server below)
	max_wal_senders => '2',
	wal_level => 'replica');
my $topic = 'acme.order.placed.v1';
kafka_create_topic($kafka, $topic, 3);
kafka_create_topic($kafka, 'acme.order.shipped.v1', 1, 'max.message.bytes=4000');
$node->safe_psql('postgres', q{
	CREATE ROLE app LOGIN;
	SELECT outbox_tenant_grant('acme', 'app');
});

my $saved = 0;

# Save $n events over 10 keys as the application's role, in one transaction.
sub save_events
{
	my ($n) = @_;
	my $from = $saved + 1;
	$saved += $n;
	$node->safe_psql('postgres', qq{
		SET ROLE app;
		SELECT count(outbox_save('acme', 'order', (i % 10)::text, 'order.placed.v1',
		                         jsonb_build_object('n', i)))
		  FROM generate_series($from, $saved) i;
	});
	return;
}

sub wait_all_delivered
{
	$node->poll_query_until('postgres',
		"SELECT count(*) = $saved FROM outbox WHERE status = 'delivered' AND event_type = 'order.placed.v1'")
	  or die "timed out waiting for $saved delivered events";
	return;
}

# --- steady delivery
$node->poll_query_until('postgres', "SELECT state = 'idle' FROM outbox_worker")
  or die 'the worker did not come up';
save_events(300);
wait_all_delivered();
my @msgs = consume_all($kafka, $topic);
is(check_same_events($node, \@msgs, 'true', 'exactly_once'), 0, 'no duplicate');
my ($sysid, $dboid) = split /\|/, $node->safe_psql('postgres',
	"SELECT system_identifier, (SELECT oid FROM pg_database WHERE datname = 'postgres') FROM pg_control_system()");
my @checkpoints = consume_all($kafka, checkpoint_topic($node));
ok(@checkpoints > 0, "the worker wrote checkpoint records to its own topic");
is($checkpoints[-1]{key}, "voutbox-$sysid-$dboid", 'keyed by the transactional.id');
like($checkpoints[-1]{value}, qr/"gid":"voutbox:$dboid:[0-9a-f]{32}"/, 'naming the settle');
my $ct = kafka_describe_topic($kafka, checkpoint_topic($node));
is(($ct->{partitions} // '') . ' ' . ($ct->{config}{'cleanup.policy'} // ''), '1 compact',
	'the checkpoint topic: one partition, compacted');

# --- prepared transactions named like a settle, by an ordinary role, in
# this database and in another: the worker's recovery leaves them alone
$node->safe_psql('postgres', 'CREATE DATABASE other; GRANT ALL ON DATABASE other TO app');
$node->safe_psql('postgres', "SET ROLE app; BEGIN; PREPARE TRANSACTION 'voutbox:$dboid:mine'");
$node->safe_psql('other', "SET ROLE app; BEGIN; PREPARE TRANSACTION 'voutbox:$dboid:theirs'");
{
	my $pid = worker_pid($node);
	$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
	$node->poll_query_until('postgres',
		"SELECT pid IS NOT NULL AND pid <> $pid AND state = 'idle' FROM outbox_worker")
	  or die 'the worker did not come back';
	save_events(10);
	wait_all_delivered();
	is($node->safe_psql('postgres', 'SELECT string_agg(gid, \',\' ORDER BY gid) FROM pg_prepared_xacts'),
		"voutbox:$dboid:mine,voutbox:$dboid:theirs",
		"a restarted worker delivers, and leaves the other roles' prepared transactions alone");
	$node->safe_psql('postgres', "ROLLBACK PREPARED 'voutbox:$dboid:mine'");
	$node->safe_psql('other', "ROLLBACK PREPARED 'voutbox:$dboid:theirs'");
}

# --- the worker killed at every step of a settle
my %resolution = (
	before_prepare => undef,
	after_prepare => 'rolled back',
	after_kafka_commit => 'committed',
	after_commit_prepared => undef);
for my $point (qw(before_prepare after_prepare after_kafka_commit after_commit_prepared))
{
	my $offset = -s $node->logfile;
	inject_fault($node, $point);
	save_events(100);
	$node->wait_for_log(qr/kills itself at "$point"/, $offset);
	wait_all_delivered();
	pass("killed at $point: every event delivered after the restart");
	my $log = PostgreSQL::Test::Utils::slurp_file($node->logfile, $offset);
	if (defined $resolution{$point})
	{
		like($log, qr/recovery: $resolution{$point} the settle "voutbox:\d+:\w+"/,
			"killed at $point: recovery $resolution{$point} the prepared settle");
	}
	else
	{
		unlike($log, qr/recovery: \w+ \w* ?the settle/, "killed at $point: nothing left prepared");
	}
}
is($node->safe_psql('postgres', 'SELECT count(*) FROM pg_prepared_xacts'), '0',
	'no prepared transaction left');

# --- a transaction aborted after its settle was prepared (as one is when a
# standby is too slow or the transaction too old): the settle is rolled
# back, the events go again, and the statistics count each event once.
{
	my $offset = -s $node->logfile;
	my $before = $node->safe_psql('postgres', 'SELECT delivered FROM outbox_worker');
	inject_fault($node, 'abort_after_prepare');
	save_events(50);
	$node->wait_for_log(qr/fault injection at "abort_after_prepare"/, $offset);
	wait_all_delivered();
	pass('aborted after PREPARE: every event delivered afterwards');
	# (The statistics count a settle just after COMMIT PREPARED.)
	$node->poll_query_until('postgres', "SELECT delivered >= $before + 50 FROM outbox_worker")
	  or die 'the statistics did not count the events';
	is($node->safe_psql('postgres', 'SELECT delivered FROM outbox_worker') - $before, 50,
		'aborted after PREPARE: outbox_worker counts each event once');
	is($node->safe_psql('postgres', 'SELECT count(*) FROM pg_prepared_xacts'), '0',
		'aborted after PREPARE: the settle was rolled back');
}

# --- an immediate stop under load
my $script = counter_script($node, 20);
my $bench = start_pgbench($node, $script, '-c', '2', '-j', '2', '-R', '300', '-T', '6');
$node->poll_query_until('postgres',
	"SELECT count(*) > 200 FROM outbox WHERE status = 'delivered' AND key IS NOT NULL AND event_type = 'counter.bumped.v1'")
  or die 'no load delivered';
$node->stop('immediate');
finish_pgbench($bench);
$node->start;
$node->poll_query_until('postgres',
	"SELECT count(*) = 0 FROM outbox WHERE status <> 'delivered'")
  or die 'the backlog was not delivered after the immediate stop';
pass('delivered everything after an immediate stop');

# --- a permanent error in a transaction: aborted; the event dies alone,
# the rest (its key's later events behind it) are delivered once
{
	my $big = "jsonb_build_object('n', 2, 'pad', repeat('x', 5000))";
	my $sql = 'BEGIN; SET LOCAL ROLE app; '
	  . save_sql('acme', 'order.shipped.v1', 'S', { n => 1 }) . '; '
	  . "SELECT outbox_save('acme', 'order', 'S', 'order.shipped.v1', $big); "
	  . save_sql('acme', 'order.shipped.v1', 'S', { n => 3 }) . '; ';
	$sql .= save_sql('acme', 'order.shipped.v1', "T$_", { n => $_ }) . '; ' for 1 .. 5;
	$node->safe_psql('postgres', "$sql COMMIT");
	$node->poll_query_until('postgres',
		"SELECT pending = 0 AND in_dlq = 1 FROM outbox_stats WHERE topic = 'acme.order.shipped.v1'")
	  or die 'the topic did not settle';
	is($node->safe_psql('postgres', "SELECT (payload->>'n') || ' ' || reason || ' ' || error_code FROM outbox_dlq"),
		'2 permanent_error MSG_SIZE_TOO_LARGE', 'the large event is dead');
	my @shipped = consume_all($kafka, 'acme.order.shipped.v1');
	is(scalar(@shipped), 7, 'read_committed: the 7 others once each');
	is_deeply([ map { $_->{event}{payload}{n} } grep { $_->{key} eq 'S' } @shipped ], [ 1, 3 ],
		"the dead event's key: the others, in order");
}

# --- no event goes to a checkpoint topic, whatever the template says
$node->safe_psql('postgres',
	"ALTER SYSTEM SET voutbox.topic_template = 'voutbox.checkpoints.{tenant_id}'; SELECT pg_reload_conf()");
$node->poll_query_until('postgres', "SELECT current_setting('voutbox.topic_template') LIKE 'voutbox.checkpoints.%'")
  or die 'the template did not change';
my $forged = $node->safe_psql('postgres', "SET ROLE app; " . save_sql('acme', 'order.placed.v1', 'forged', { n => 1 }));
$node->safe_psql('postgres', "ALTER SYSTEM RESET voutbox.topic_template; SELECT pg_reload_conf()");
$node->poll_query_until('postgres', "SELECT count(*) = 1 FROM outbox_dlq WHERE id = '$forged'")
  or die 'the event for a checkpoint topic was not refused';
is($node->safe_psql('postgres', "SELECT error_code FROM outbox_dlq WHERE id = '$forged'"),
	'TOPIC_AUTHORIZATION_FAILED', 'an event rendered to a checkpoint topic is refused (to the DLQ)');

# --- kill -9 of the broker while a backlog is in a transaction
save_events(20000);
$node->poll_query_until('postgres',
	"SELECT count(*) > 0 FROM outbox WHERE status = 'delivered' AND event_type = 'order.placed.v1' "
	  . "AND (payload->>'n')::int > $saved - 20000")
  or die 'the backlog did not start';
kafka_stop($kafka, 'kill');
ok($node->safe_psql('postgres', "SELECT count(*) > 0 FROM outbox WHERE status <> 'delivered'") eq 't',
	'the broker was killed with events still to deliver');
$kafka = kafka_start('eos');
wait_all_delivered();
pass('the backlog was delivered after the broker came back');
is($node->safe_psql('postgres', "SELECT count(*) FROM outbox WHERE retry_count > 0 AND event_type = 'order.placed.v1' AND id <> '$forged'"),
	'0', 'the outage cost no event a retry');

# --- what consumers see
@msgs = consume_all($kafka, "$topic,acme.counter.bumped.v1");
is(check_same_events($node, \@msgs, "event_type <> 'order.shipped.v1' AND id <> '$forged'", 'read_committed'), 0,
	'read_committed: no duplicate across the kills and the immediate stop');
check_key_order([ grep { $_->{topic} eq $topic } @msgs ], 'n', 'read_committed: per key in order');
check_key_order([ grep { $_->{topic} ne $topic } @msgs ], 'n', 'read_committed: load per key in order');
my @uncommitted = consume_all($kafka, "$topic", undef, '-c isolation.level=read_uncommitted');
ok(scalar(@uncommitted) > scalar(grep { $_->{topic} eq $topic } @msgs),
	'read_uncommitted sees copies from aborted transactions (' . scalar(@uncommitted) . ' messages)');

# --- fencing: a copy of the server, with the same system identifier and
# database (a failed-over primary), takes the transactional.id over
$node->backup('twin');
my $twin = PostgreSQL::Test::Cluster->new('twin');
$twin->init_from_backup($node, 'twin');
$twin->start;
my $twin_id = $twin->safe_psql('postgres', "SET ROLE app; " . save_sql('acme', 'order.placed.v1', 'twin', { n => 1 }));
$twin->poll_query_until('postgres', "SELECT status = 'delivered' FROM outbox WHERE id = '$twin_id'")
  or die "the twin's worker did not deliver: "
  . $twin->safe_psql('postgres', 'SELECT state, detail, last_error FROM outbox_worker');
my $id = $node->safe_psql('postgres', "SET ROLE app; " . save_sql('acme', 'order.placed.v1', 'fenced', { n => 1 }));
$node->poll_query_until('postgres', "SELECT state = 'fenced' FROM outbox_worker")
  or die 'the worker was not fenced';
pass('the first worker is fenced');
is($node->safe_psql('postgres', "SELECT status FROM outbox WHERE id = '$id'"), 'pending',
	"the fenced worker's event is not delivered");
ok(!grep({ $_->{event}{id} eq $id } consume_all($kafka, $topic, undef, '-c isolation.level=read_uncommitted')),
	"the fenced worker's event is not in Kafka, even uncommitted");
$twin->stop;
$node->reload;
$node->poll_query_until('postgres', "SELECT status = 'delivered' FROM outbox WHERE id = '$id'")
  or die 'the worker did not deliver after the reload';
is(scalar(grep { $_->{event}{id} eq $id } consume_all($kafka, $topic)), 1,
	'after the reload, the worker takes over: the event delivered once');

$node->stop;
kafka_stop($kafka);
done_testing();
