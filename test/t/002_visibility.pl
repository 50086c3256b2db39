# Batches follow transaction visibility: a transaction that commits after a
# later one is still delivered, and a transaction held open in another
# session stalls nobody.  The event storage gets no dead tuples meanwhile.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('visibility');
my $node = voutbox_node('visibility', $kafka);
$node->safe_psql('postgres', 'CREATE EXTENSION pgstattuple');

# A session keeps a transaction with an xid (and its snapshot) open all along.
my $holder = $node->background_psql('postgres');
$holder->query_safe('BEGIN ISOLATION LEVEL REPEATABLE READ');
my $held_xid = $holder->query_safe('SELECT pg_current_xact_id()');

# "late" takes its transaction id and save order first, but commits last.
my $late = $node->background_psql('postgres');
$late->query_safe('BEGIN');
$late->query_safe(save_sql('acme', 'order.placed.v1', 'late', { n => 1 }));

# Others commit meanwhile, in many small transactions and one big one.
$node->safe_psql('postgres', save_sql('acme', 'order.placed.v1', "early-$_", { n => $_ }))
  for 1 .. 20;
$node->safe_psql('postgres',
	"SELECT count(outbox_save('acme', 'test', 'bulk-' || g, 'order.placed.v1', jsonb_build_object('n', g))) "
	  . "FROM generate_series(1, 2000) g");

wait_for_delivered($node, 2020);
pass('committed events are delivered while older transactions are open');
is( $node->safe_psql('postgres', "SELECT status FROM voutbox.events e JOIN outbox USING (id) WHERE e.aggregate_id = 'late'"),
	'', 'the open transaction\'s event is invisible');

# The cursor moved past the open transactions without waiting for them.
ok( $node->safe_psql('postgres',
		"SELECT pg_snapshot_xmax(lo) > '$held_xid'::xid8 FROM voutbox.batches ORDER BY batch_id DESC LIMIT 1") eq 't',
	'cursor is past the held transaction');

$late->query_safe('COMMIT');
wait_for_delivered($node, 1, "aggregate_id = 'late'");
pass('the late commit is delivered');

my @msgs = consume_events($kafka, 'acme.order.placed.v1', 2021);
my %ids = map { $_->{event}{aggregate_id} => 1 } @msgs;
ok($ids{late} && $ids{'early-20'} && $ids{'bulk-2000'}, 'late, early and bulk events all in Kafka');
is(scalar(keys %ids), 2021, 'no event missing, none twice');

# Nothing of the event storage or the cursor was updated or deleted, so the
# held snapshot left no dead tuples behind.
for my $rel (qw(events_0 batches))
{
	is( $node->safe_psql('postgres', "SELECT dead_tuple_count FROM pgstattuple('voutbox.$rel')"),
		'0', "no dead tuples in voutbox.$rel under a held snapshot");
}

$holder->query_safe('COMMIT');
$holder->quit;
$late->quit;
$node->stop;
kafka_stop($kafka);
done_testing();
