# Prometheus metrics through postgres_exporter: the queries file the
# repository ships (monitoring/postgres_exporter.yaml), run by the real
# exporter (Debian's prometheus-postgres-exporter) connected as a role that
# does not own the extension, a member of the read-only voutbox_monitor
# while tenants are bound to roles, scraped over HTTP.
# Checked: every metric is exposed with its type and its labels (database,
# tenant, topic), the counters count what the worker did, the gauges what
# waits, and the exporter reports no error for the queries.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use HTTP::Tiny;
use IPC::Run;
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use VoutboxTest;

# (No C code of its own: not worth the sanitizer pass's time.)
plan skip_all => 'not in the sanitizer pass' if $ENV{VOUTBOX_SANITIZE_PRELOAD};
my $exporter = '/usr/bin/prometheus-postgres-exporter';
-x $exporter or BAIL_OUT("$exporter is missing: bash test/install-deps.sh installs it");
my $queries = abs_path(dirname(__FILE__) . '/../../monitoring/postgres_exporter.yaml');

my $kafka = kafka_start('metrics');
my $node = voutbox_node('metrics', $kafka);
# Tenants are bound to roles: the exporter sees every tenant's figures as a
# member of voutbox_monitor, and nothing more.
$node->safe_psql('postgres', "CREATE ROLE exporter LOGIN; GRANT voutbox_monitor TO exporter; "
	  . "CREATE ROLE acme_app; SELECT outbox_tenant_grant('acme', 'acme_app')");
my ($rc, $stdout, $stderr) = $node->psql('postgres', 'SET ROLE exporter; SELECT count(*) FROM outbox');
like($stderr, qr/permission denied for view outbox/, 'the monitoring role cannot read the events');
($rc, $stdout, $stderr) = $node->psql('postgres',
	"SET ROLE exporter; SELECT outbox_dlq_requeue('00000000-0000-0000-0000-000000000000')");
like($stderr, qr/permission denied for function outbox_dlq_requeue/, 'nor administer the DLQ');
$node->safe_psql('postgres',
	join(";\n", map { save_sql('acme', 'm.v1', "k$_", { n => $_ }) } 1 .. 3)
	  . ";\n" . save_sql('globex', 'm.v1', 'k1', { n => 1 }));
wait_for_delivered($node, 4);
# One event scheduled in the future: a gauge that is not 0.
$node->safe_psql('postgres',
	"SELECT outbox_save('acme', 'order', 'later', 'm.v1', '{}', "
	  . "scheduled_for => now() + interval '1 hour')");

my $port = PostgreSQL::Test::Cluster::get_free_port();
my ($out, $err) = ('', '');
local $ENV{DATA_SOURCE_NAME} =
  'host=' . $node->host . ' port=' . $node->port . ' user=exporter dbname=postgres sslmode=disable';
my $h = IPC::Run::start(
	[ $exporter, "--extend.query-path=$queries", "--web.listen-address=127.0.0.1:$port",
		'--disable-default-metrics', '--disable-settings-metrics' ],
	'>', \$out, '2>', \$err);

# Scrape until the worker's and the topics' series are there (the exporter
# starts, and the scheduled event is counted by the view at once).
my $http = HTTP::Tiny->new(timeout => 10);
my $body = '';
my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
while (time < $deadline)
{
	my $r = $http->get("http://127.0.0.1:$port/metrics");
	$body = $r->{content} if $r->{success};
	last if $body =~ /^voutbox_worker_up\{/m && $body =~ /^voutbox_topic_delivered_total\{/m;
	sleep 1;
}
like($body, qr/^voutbox_topic_delivered_total\{/m, 'the exporter exposes voutbox\'s metrics')
  or diag("exporter's stderr: $err");

# name{labels} value, the labels as a hash.
my %series;
for my $line (split /\n/, $body)
{
	next unless $line =~ /^(voutbox_\w+)\{([^}]*)\}\s+(\S+)$/;
	my ($name, $labels, $value) = ($1, $2, $3);
	my %l = $labels =~ /(\w+)="([^"]*)"/g;
	push @{ $series{$name} }, { labels => \%l, value => $value };
}
sub value_of
{
	my ($name, %want) = @_;
	for my $s (@{ $series{$name} // [] })
	{
		return $s->{value} + 0
		  unless grep { ($s->{labels}{$_} // '') ne $want{$_} } keys %want;
	}
	return undef;
}

for my $m (qw(delivered_total failed_attempts_total dead_total))
{
	like($body, qr/^# TYPE voutbox_topic_$m counter$/m, "voutbox_topic_$m is a counter");
	like($body, qr/^# TYPE voutbox_worker_$m counter$/m, "voutbox_worker_$m is a counter");
}
for my $m (qw(events_pending oldest_pending_age_seconds events_waiting_for_retry events_held
	events_scheduled events_in_dlq last_error_timestamp_seconds))
{
	like($body, qr/^# TYPE voutbox_topic_$m gauge$/m, "voutbox_topic_$m is a gauge");
}
like($body, qr/^# TYPE voutbox_worker_rounds_total counter$/m, 'voutbox_worker_rounds_total is a counter');
like($body, qr/^# TYPE voutbox_worker_up gauge$/m, 'voutbox_worker_up is a gauge');

is(value_of('voutbox_topic_delivered_total', database => 'postgres', tenant => 'acme', topic => 'acme.m.v1'),
	3, 'delivered, per database, tenant and topic');
is(value_of('voutbox_topic_delivered_total', database => 'postgres', tenant => 'globex', topic => 'globex.m.v1'),
	1, 'another tenant\'s topic is a series of its own');
is(value_of('voutbox_topic_events_scheduled', tenant => 'acme', topic => 'acme.m.v1'), 1,
	'the scheduled event is counted as scheduled');
is(value_of('voutbox_topic_events_in_dlq', tenant => 'acme', topic => 'acme.m.v1'), 0, 'nothing in the DLQ');
is(value_of('voutbox_worker_up', database => 'postgres'), 1, 'the worker is up');
cmp_ok(value_of('voutbox_worker_delivered_total', database => 'postgres') // -1, '>=', 4,
	'the worker\'s counter counts what it delivered');
cmp_ok(value_of('voutbox_worker_rounds_total', database => 'postgres') // -1, '>=', 1,
	'and its rounds');
unlike($body, qr/^pg_exporter_user_queries_load_error\{[^}]*\}\s+1$/m, 'the queries file loads');
like($body, qr/^pg_exporter_last_scrape_error\s+0$/m, 'the scrape had no error');

$h->kill_kill;
$node->stop;
kafka_stop($kafka);
done_testing();
