use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('scratch');
my $node = voutbox_node('scratch', $kafka,
	'voutbox.delivery' => 'exactly_once',
	'max_prepared_transactions' => '10',
	max_wal_senders => '2', wal_level => 'replica');
$node->safe_psql('postgres', save_sql('acme', 'order.placed.v1', 'a', { n => 1 }));
$node->poll_query_until('postgres', "SELECT count(*) = 0 FROM outbox WHERE status <> 'delivered'") or die;
$node->backup('twin');
my $twin = PostgreSQL::Test::Cluster->new('twin');
$twin->init_from_backup($node, 'twin');
$twin->start;
$twin->safe_psql('postgres', save_sql('acme', 'order.placed.v1', 'twin', { n => 1 }));
for (1..6) {
	diag($twin->safe_psql('postgres', "SELECT state, detail FROM outbox_worker; SELECT status, count(*) FROM outbox GROUP BY 1; SELECT backend_type, wait_event, state, query FROM pg_stat_activity WHERE backend_type LIKE 'voutbox%'"));
	diag($node->safe_psql('postgres', "SELECT state, detail FROM outbox_worker"));
	sleep 5;
}
ok(1);
done_testing();
