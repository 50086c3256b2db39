# A misconfigured worker says so and waits, without crash-looping or losing
# events: no database, unknown database, extension not created, unreachable
# broker.  SIGHUP applies new Kafka settings; SIGTERM stops the worker
# cleanly and the launcher starts a new one; so it does after an ERROR, and
# nothing is lost.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('lifecycle');

# --- voutbox.database not set: the launcher says so; no worker.
my $idle = PostgreSQL::Test::Cluster->new('idle');
$idle->init;
$idle->append_conf('postgresql.conf', "shared_preload_libraries = 'voutbox'\n");
$idle->start;
$idle->wait_for_log(qr/voutbox\.database is not set, so no events are delivered/);
is($idle->safe_psql('postgres', "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'voutbox worker'"),
	'0', 'no worker without voutbox.database');
$idle->stop;

# --- an unknown database: one message, then the worker starts once it exists.
my $node = PostgreSQL::Test::Cluster->new('lifecycle');
$node->init;
$node->append_conf('postgresql.conf', <<"EOC");
shared_preload_libraries = 'voutbox'
voutbox.database = 'app'
voutbox.brokers = '127.0.0.1:1'
voutbox.poll_interval = '200ms'
restart_after_crash = on
EOC
$node->start;
$node->wait_for_log(qr/database "app" named by voutbox\.database does not exist/);
like($node->safe_psql('postgres', "SELECT query FROM pg_stat_activity WHERE backend_type = 'voutbox launcher'"),
	qr/^supervising 0 delivery workers; waiting for database "app" to exist$/, 'the launcher waits for the database');
$node->safe_psql('postgres', 'CREATE DATABASE app');
$node->wait_for_log(qr/voutbox: delivery worker started for database "app"/);

# --- the extension is not created yet.
$node->wait_for_log(qr/extension "voutbox" is not installed in database "app"/);
$node->poll_query_until('app',
	"SELECT query = 'waiting for CREATE EXTENSION voutbox' FROM pg_stat_activity WHERE backend_type = 'voutbox worker'")
  or die 'worker not waiting for the extension';

# Waiting costs nothing: over three seconds the worker uses (almost) no CPU.
sub cpu_ticks
{
	my ($pid) = @_;
	my @f = split ' ', slurp_file("/proc/$pid/stat");
	return $f[13] + $f[14];
}
my $waiting_pid = $node->safe_psql('app', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'voutbox worker'");
my $ticks = cpu_ticks($waiting_pid);
my $t0 = $node->safe_psql('app', 'SELECT now()');
$node->poll_query_until('app', "SELECT now() > '$t0'::timestamptz + interval '3 seconds'")
  or die 'clock did not advance';
ok(cpu_ticks($waiting_pid) - $ticks < 30, 'the waiting worker does not spin');

# --- the broker is unreachable: events wait, nothing is lost.
$node->safe_psql('app', 'CREATE EXTENSION voutbox');
$node->safe_psql('app', save_sql('acme', 'item.added.v1', "i$_", { n => $_ })) for 1 .. 5;
$node->poll_query_until('app',
	"SELECT query LIKE 'waiting for the broker: % events unacknowledged' FROM pg_stat_activity WHERE backend_type = 'voutbox worker'")
  or die 'the worker does not wait for the broker';
is($node->safe_psql('app', "SELECT count(*) FROM outbox WHERE status = 'pending'"), '5', 'events stay pending');

# No crash loop: the same worker process all along.
my $pid = $node->safe_psql('app', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'voutbox worker'");
my $log = slurp_file($node->logfile);
my $starts = () = $log =~ /delivery worker started/g;
is($starts, 1, 'the worker started once');

# --- SIGHUP with the right broker: the producer is rebuilt, events arrive.
$node->safe_psql('app', "ALTER SYSTEM SET voutbox.brokers = '$kafka->{brokers}'");
$node->reload;
$node->wait_for_log(qr/Kafka settings changed; rebuilding the producer/);
$node->poll_query_until('app', "SELECT count(*) = 5 FROM outbox WHERE status = 'delivered'")
  or die 'events not delivered after the reload';
pass('delivered after the broker setting was fixed');
is($node->safe_psql('app', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'voutbox worker'"),
	$pid, 'by the same worker process');
my @msgs = consume_events($kafka, 'acme.item.added.v1', 5);
is(scalar(@msgs), 5, 'all five in Kafka');

# --- invalid settings are refused, the old ones stay in force.
my ($ret, $stdout, $stderr) = $node->psql('app',
	"ALTER SYSTEM SET voutbox.kafka_properties = 'enable.idempotence=false'");
like($stderr, qr/voutbox sets "enable.idempotence" itself/, 'guarantee-breaking property refused');

# --- SIGTERM: a clean stop, and the launcher starts a new worker.
$node->safe_psql('app', "SELECT pg_terminate_backend($pid)");
$node->poll_query_until('app',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'voutbox worker' AND pid <> $pid")
  or die 'no new worker after SIGTERM';
like(slurp_file($node->logfile), qr/voutbox: delivery worker stopped/, 'the worker stopped cleanly');
$node->safe_psql('app', save_sql('acme', 'item.added.v1', 'i6', { n => 6 }));
$node->poll_query_until('app', "SELECT count(*) = 6 FROM outbox WHERE status = 'delivered'")
  or die 'the new worker does not deliver';
pass('the new worker delivers');

# --- secrets come from a file that only the server reads; they never reach
# the log, and only superusers can see where the file is.
my $secrets = $node->data_dir . '/kafka.secrets';
PostgreSQL::Test::Utils::append_to_file($secrets, "# SASL, unused here\nsasl.username=svc\nsasl.password=hunter2\n");
$node->safe_psql('app', "ALTER SYSTEM SET voutbox.kafka_secrets_file = 'kafka.secrets'");
$node->reload;
$node->safe_psql('app', save_sql('acme', 'item.added.v1', 's1', { n => 7 }));
$node->poll_query_until('app', "SELECT count(*) = 7 FROM outbox WHERE status = 'delivered'")
  or die 'not delivered with a secrets file';
pass('delivered with properties from the secrets file');
$node->safe_psql('app', 'CREATE ROLE app_user LOGIN');
($ret, $stdout, $stderr) = $node->psql('app', 'SHOW voutbox.kafka_secrets_file', extra_params => [ '-U', 'app_user' ]);
like($stderr, qr/permission denied|must be superuser|privileges/, 'non-superusers cannot see the setting');
unlink $secrets;
PostgreSQL::Test::Utils::append_to_file($secrets, "socket.timeout.ms=hunter3\n");
$node->reload;
$node->wait_for_log(qr/librdkafka refused the value of "socket.timeout.ms" in voutbox.kafka_secrets_file/);
# A secret written into voutbox.kafka_properties by mistake is refused, and
# the refusal does not show it.
$node->append_conf('postgresql.conf', "voutbox.kafka_properties = 'linger.ms=5; sasl.password=hunter4'\n");
$node->reload;
$node->wait_for_log(qr/The librdkafka property "sasl.password" holds a secret/);
unlike(slurp_file($node->logfile), qr/hunter[234]/, 'no secret value in the log');
is($node->safe_psql('app', "SELECT count(*) FROM pg_settings WHERE setting LIKE '%hunter%'"), '0',
	'nor in pg_settings');
like($node->safe_psql('app', 'SELECT coalesce(last_error, \'\') || detail FROM outbox_worker'), qr/^(?!.*hunter)/s,
	'nor in outbox_worker');
$node->adjust_conf('postgresql.conf', 'voutbox.kafka_properties', "''");
$node->safe_psql('app', 'ALTER SYSTEM RESET voutbox.kafka_secrets_file');
$node->reload;
$node->safe_psql('app', save_sql('acme', 'item.added.v1', 's2', { n => 8 }));
$node->poll_query_until('app', "SELECT count(*) = 8 FROM outbox WHERE status = 'delivered'")
  or die 'not delivered after the secrets file was removed from the settings';

# --- terminating the launcher: it comes back, with exactly one worker.
my $launcher = $node->safe_psql('app', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'voutbox launcher'");
$node->safe_psql('app', "SELECT pg_terminate_backend($launcher)");
$node->poll_query_until('app',
	"SELECT count(*) FILTER (WHERE backend_type = 'voutbox launcher' AND pid <> $launcher) = 1 "
	  . "AND count(*) FILTER (WHERE backend_type = 'voutbox worker') = 1 FROM pg_stat_activity")
  or die 'launcher and worker not back';
pass('the launcher is restarted and starts one worker');
$node->safe_psql('app', save_sql('acme', 'item.added.v1', 's3', { n => 9 }));
$node->poll_query_until('app', "SELECT count(*) = 9 FROM outbox WHERE status = 'delivered'")
  or die 'not delivered after the launcher restart';

# --- an ERROR while reading ends the worker; the launcher starts another,
# and nothing is lost.  Here the retry queue is gone until it comes back.
# (An ERROR while settling does not end it: see t/017.)
$node->safe_psql('app', 'ALTER TABLE voutbox.deferred RENAME TO deferred_away');
$node->safe_psql('app', save_sql('acme', 'item.added.v1', "e$_", { n => $_ })) for 1 .. 3;
$node->wait_for_log(qr/ERROR:  relation "voutbox.deferred" does not exist/);
$node->wait_for_log(qr/background worker "voutbox worker" \(PID \d+\) exited with exit code 1/);
$node->wait_for_log(qr/voutbox: the delivery worker for database "app" exited; starting a new one in/);
is($node->safe_psql('app', "SELECT count(*) FROM voutbox.events e WHERE NOT EXISTS "
		  . "(SELECT 1 FROM voutbox.batches b WHERE pg_visible_in_snapshot(e.txid, b.lo))"),
	'3', 'events stay pending while the worker fails');
$node->safe_psql('app', 'ALTER TABLE voutbox.deferred_away RENAME TO deferred');
$node->poll_query_until('app', "SELECT count(*) = 12 FROM outbox WHERE status = 'delivered'")
  or die 'events not delivered after the error went away';
@msgs = consume_all($kafka, 'acme.item.added.v1');
is(scalar(keys %{ { map { $_->{event}{id} => 1 } @msgs } }), 12, 'all twelve events in Kafka (re-sent ones with the same id)');

# --- a fast server stop stops the worker cleanly too, also while it waits
# for a broker that is gone with librdkafka's queue full.
$node->safe_psql('app', "ALTER SYSTEM SET voutbox.brokers = '127.0.0.1:1'");
$node->safe_psql('app', "ALTER SYSTEM SET voutbox.kafka_properties = 'queue.buffering.max.messages=10'");
$node->reload;
$node->wait_for_log(qr/parameter "voutbox.kafka_properties" changed/);
$node->safe_psql('app',
	"SELECT count(outbox_save('acme', 'test', 'q-' || g, 'item.added.v1', '{}')) FROM generate_series(1, 100) g");
$node->poll_query_until('app',
	"SELECT query LIKE 'waiting for the broker%' FROM pg_stat_activity WHERE backend_type = 'voutbox worker'")
  or die 'worker not waiting for the broker';
$node->safe_psql('app', "ALTER SYSTEM SET voutbox.brokers = '$kafka->{brokers}'");
$node->safe_psql('app', 'ALTER SYSTEM RESET voutbox.kafka_properties');
$node->stop('fast');
pass('fast stop while the local queue is full');
$node->start;
$node->poll_query_until('app', "SELECT count(*) = 112 FROM outbox WHERE status = 'delivered'")
  or die 'events waiting at the stop were not delivered after it';
pass('the events that waited at the stop are delivered after it');
$node->stop('fast');
my $stops = () = slurp_file($node->logfile) =~ /voutbox: delivery worker stopped/g;
is($stops, 4, 'clean stops at server shutdowns and launcher termination');
unlike(slurp_file($node->logfile),
	qr/background worker "voutbox [a-z]+" \(PID \d+\) was terminated by signal/,
	'no crash of a voutbox process');

kafka_stop($kafka);
done_testing();
