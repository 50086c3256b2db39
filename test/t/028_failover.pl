# PostgreSQL failover under load: a primary with a streaming standby, the
# primary killed while events are being saved and delivered, the standby
# promoted.  The worker on the new primary delivers every event that
# committed there, per key in order, and nothing was ever published that
# the new primary does not have:
#  - asynchronous replication with voutbox.standby_names: the worker waits
#    for the standby, even while it is down (the primary's later commits,
#    lost with it, never reach Kafka);
#  - synchronous replication, with no setting: the worker waits for what
#    the synchronous standby confirmed, also for a session that commits
#    with synchronous_commit = local while the standby is down;
#  - exactly_once with voutbox.standby_names: the primary dies after Kafka
#    committed a transaction and before its settle was committed (the
#    worker kills itself there, with restart_after_crash off); the standby
#    has the settle prepared, and its worker commits it after the
#    promotion: a read_committed consumer sees no duplicate.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use VoutboxTest;

plan skip_all => 'not in the sanitizer pass' if $ENV{VOUTBOX_SANITIZE_PRELOAD};

my $kafka = kafka_start('failover');
my $keys = 20;

# A primary delivering to $kafka under its own topic prefix, and a
# streaming standby named "<name>_standby".
sub pair
{
	my ($name, %conf) = @_;
	# (Set once the standby streams: commits would wait for it until then.)
	my $sync = delete $conf{synchronous_standby_names};
	my $primary = PostgreSQL::Test::Cluster->new("${name}_primary");
	$primary->init(allows_streaming => 1, extra => [ '--encoding=UTF8', '--locale=C' ]);
	my %settings = (
		shared_preload_libraries => 'voutbox',
		'voutbox.database' => 'postgres',
		'voutbox.brokers' => $kafka->{brokers},
		'voutbox.topic_template' => "$name.{tenant_id}.{event_type}",
		%conf);
	$primary->append_conf('postgresql.conf',
		join('', map { "$_ = '$settings{$_}'\n" } sort keys %settings));
	$primary->start;
	$primary->safe_psql('postgres', 'CREATE EXTENSION voutbox');
	$primary->backup('base');
	my $standby = PostgreSQL::Test::Cluster->new("${name}_standby");
	$standby->init_from_backup($primary, 'base', has_streaming => 1);
	$standby->append_conf('postgresql.conf',
		"primary_conninfo = 'host=" . $primary->host . ' port=' . $primary->port
		  . " application_name=${name}_standby'\n");
	$standby->start;
	$primary->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM pg_stat_replication WHERE application_name = '${name}_standby' AND state = 'streaming'")
	  or die "the standby of $name does not stream";
	if (defined $sync)
	{
		$primary->safe_psql('postgres',
			"ALTER SYSTEM SET synchronous_standby_names = '$sync'; SELECT pg_reload_conf()");
		$primary->poll_query_until('postgres',
			"SELECT sync_state = 'sync' FROM pg_stat_replication WHERE application_name = '${name}_standby'")
		  or die "the standby of $name is not synchronous";
	}
	return ($primary, $standby);
}

# Promote the standby; returns the seconds from the promotion until every
# event it has is delivered.
sub promote_and_drain
{
	my ($standby) = @_;
	my $t0 = time;
	$standby->promote;
	$standby->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()')
	  or die 'the standby was not promoted';
	# As with synchronous_standby_names, the new primary names its own
	# standbys (it has none here): until then it waits for the old name.
	if ($standby->safe_psql('postgres', 'SHOW voutbox.standby_names') ne '')
	{
		ok( $standby->poll_query_until('postgres',
				"SELECT state = 'waiting for standbys' FROM outbox_worker"),
			'the new primary waits for the standby it was named, until it names its own');
		$standby->safe_psql('postgres',
			"ALTER SYSTEM SET voutbox.standby_names = ''; SELECT pg_reload_conf()");
	}
	$standby->poll_query_until('postgres',
		"SELECT count(*) FILTER (WHERE status <> 'delivered') = 0 AND count(*) > 0 FROM outbox", 't')
	  or die 'the new primary did not deliver its events';
	return time - $t0;
}

# Kafka has exactly the new primary's events, per key in order.
sub check_topic
{
	my ($node, $topic, $name) = @_;
	my @msgs = consume_all($kafka, $topic);
	my $dups = check_same_events($node, \@msgs, 'true', $name);
	check_key_order(\@msgs, 'n', "$name: per key, the counter's order");
	return ($dups, scalar(@msgs));
}

# --- asynchronous replication, voutbox.standby_names
{
	my ($primary, $standby) = pair('async', 'voutbox.standby_names' => 'async_standby');
	my $script = counter_script($primary, $keys);
	my $load = start_pgbench($primary, $script, '-c', '2', '-T', '120', '-R', '400');
	wait_for_delivered($primary, 300);

	# The standby goes away; the primary goes on committing, and delivers none of it.
	$standby->stop('fast');
	my $at_stop = $primary->safe_psql('postgres', 'SELECT count(*) FROM outbox');
	$primary->poll_query_until('postgres', "SELECT count(*) >= $at_stop + 200 FROM outbox")
	  or die 'the load stopped';
	ok( $primary->poll_query_until('postgres',
			"SELECT state = 'waiting for standbys' FROM outbox_worker"),
		'async: the worker waits for the standby');
	my $saved = $primary->safe_psql('postgres', 'SELECT count(*) FROM outbox');
	my $delivered = $primary->safe_psql('postgres',
		"SELECT count(*) FROM outbox WHERE status = 'delivered'");
	cmp_ok($delivered, '<=', $at_stop, 'async: nothing committed after the standby left was delivered');
	like($primary->safe_psql('postgres', 'SELECT detail FROM outbox_worker'),
		qr/waiting for standby "async_standby" to flush/, 'async: the worker says which standby it waits for');

	# Under load, the primary dies; the standby (which missed its last commits) takes over.
	$primary->kill9;
	finish_pgbench($load);
	$standby->start;
	my $resume = promote_and_drain($standby);
	my $kept = $standby->safe_psql('postgres', 'SELECT count(*) FROM outbox');
	cmp_ok($kept, '<', $saved, "async: the failover lost commits ($saved saved, $kept on the standby)");
	my ($dups, $n) = check_topic($standby, 'async.acme.counter.bumped.v1', 'async failover');
	note("async failover: $kept events, $n messages, $dups duplicates, all delivered "
		  . sprintf('%.1f s', $resume) . ' after the promotion');
	$standby->stop;
}

# --- synchronous replication, no setting
{
	my ($primary, $standby) = pair('sync',
		synchronous_standby_names => 'sync_standby', synchronous_commit => 'on');
	my $script = counter_script($primary, $keys);
	my $load = start_pgbench($primary, $script, '-c', '2', '-T', '120', '-R', '400');
	wait_for_delivered($primary, 500);

	# The standby goes away: commits wait for it (the worker's settles too,
	# so the load pauses here to let the worker settle first), but a session
	# may commit without waiting.  Its events must not go out.
	$load->{h}->kill_kill;
	$primary->poll_query_until('postgres', "SELECT state = 'idle' FROM outbox_worker")
	  or die 'the worker did not settle';
	kafka_create_topic($kafka, 'sync.acme.local.saved.v1', 1);
	$standby->stop('fast');
	$primary->safe_psql('postgres', q{
		SET synchronous_commit = local;
		SELECT outbox_save('acme', 'local', i::text, 'local.saved.v1', '{}') FROM generate_series(1, 50) i;
	});
	ok( $primary->poll_query_until('postgres',
			"SELECT state = 'waiting for standbys' FROM outbox_worker"),
		'sync: the worker waits for the synchronous standby');
	like($primary->safe_psql('postgres', 'SELECT detail FROM outbox_worker'),
		qr/waiting for the synchronous standbys/, 'sync: and says so');
	is( $primary->safe_psql('postgres',
			"SELECT count(*) FROM outbox WHERE event_type = 'local.saved.v1' AND status = 'delivered'"),
		'0', 'sync: the events committed with synchronous_commit = local are not delivered');

	# Under load again (its commits wait for the standby), the primary dies.
	$load = start_pgbench($primary, $script, '-c', '2', '-T', '120', '-R', '400');
	$primary->poll_query_until('postgres',
		"SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event = 'SyncRep'")
	  or die 'the load does not wait for the standby';
	$primary->kill9;
	finish_pgbench($load);
	$standby->start;
	my $resume = promote_and_drain($standby);
	my $kept = $standby->safe_psql('postgres', 'SELECT count(*) FROM outbox');
	my ($dups, $n) = check_topic($standby, 'sync.acme.counter.bumped.v1', 'sync failover');
	my @local = consume_all($kafka, 'sync.acme.local.saved.v1');
	is(scalar(@local), 0, 'sync: none of the locally committed events reached Kafka');
	note("sync failover: $kept events, $n messages, $dups duplicates, all delivered "
		  . sprintf('%.1f s', $resume) . ' after the promotion');
	$standby->stop;
}

# --- exactly_once, voutbox.standby_names: the primary dies between Kafka's
# commit and its settle's
{
	my ($primary, $standby) = pair('eos', 'voutbox.standby_names' => 'eos_standby',
		'voutbox.delivery' => 'exactly_once', max_prepared_transactions => '4',
		'voutbox.fault_injection' => 'on', restart_after_crash => 'off');
	my $script = counter_script($primary, $keys);
	my $load = start_pgbench($primary, $script, '-c', '2', '-T', '120', '-R', '400');
	wait_for_delivered($primary, 300);
	my $offset = -s $primary->logfile;
	inject_fault($primary, 'after_kafka_commit');
	$primary->wait_for_log(qr/kills itself at "after_kafka_commit"/, $offset);
	# (restart_after_crash is off: the whole primary is down.)
	finish_pgbench($load);
	$primary->kill9;
	my $standby_offset = -s $standby->logfile;
	my $resume = promote_and_drain($standby);
	like(PostgreSQL::Test::Utils::slurp_file($standby->logfile, $standby_offset),
		qr/recovery: committed the settle "voutbox:\d+:\w+"/,
		'eos: the promoted standby had the settle prepared, and committed it');
	my $kept = $standby->safe_psql('postgres', 'SELECT count(*) FROM outbox');
	my ($dups, $n) = check_topic($standby, 'eos.acme.counter.bumped.v1', 'eos failover');
	is($dups, 0, 'eos: a read_committed consumer sees no duplicate');
	note("eos failover: $kept events, $n messages, $dups duplicates, all delivered "
		  . sprintf('%.1f s', $resume) . ' after the promotion');
	$standby->stop;
}

kafka_stop($kafka);
done_testing();
