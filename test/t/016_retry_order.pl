# The retry queue keeps commit order.  Transaction A saves an event of key
# K first but commits last; transaction B saves one of K after A and commits
# first.  B's event is delivered first, fails (its topic does not exist yet)
# and waits for a retry.  Then A commits: its event has the lower save number,
# but it is later in commit order, so it must wait behind B's, and B's retry
# must keep its backoff.  Once the topic exists, K arrives as B, A.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use VoutboxTest;

my $kafka = kafka_start('retry_order', 'auto.create.topics.enable=false');
my $node = voutbox_node('retry_order', $kafka,
	# Its missing topics stay missing: voutbox does not create them.
	'voutbox.create_topics' => 'off',
	'voutbox.delivery_timeout' => '1s',
	'voutbox.backoff_base' => '4s',
	'voutbox.backoff_max' => '4s',
	'voutbox.max_retries' => '1000');

my $a = $node->background_psql('postgres');
$a->query_safe('BEGIN');
$a->query_safe(save_sql('acme', 'order.placed.v1', 'K', { n => 'A' }));
my $seq_a = $a->query_safe("SELECT seq FROM voutbox.events WHERE payload->>'n' = 'A'");
$node->safe_psql('postgres', save_sql('acme', 'order.placed.v1', 'K', { n => 'B' }));
my $seq_b = $node->safe_psql('postgres', "SELECT seq FROM voutbox.events WHERE payload->>'n' = 'B'");
cmp_ok($seq_a, '<', $seq_b, "A's event has the lower save number");

$node->poll_query_until('postgres',
	"SELECT status = 'retrying' FROM outbox WHERE payload->>'n' = 'B'")
  or die "B's event did not fail";
my $b_before = $node->safe_psql('postgres',
	"SELECT retry_count || ' ' || next_attempt_at FROM outbox WHERE payload->>'n' = 'B'");

$a->query_safe('COMMIT');
$node->poll_query_until('postgres',
	"SELECT status <> 'pending' FROM outbox WHERE payload->>'n' = 'A'")
  or die "A's event was not read";
is($node->safe_psql('postgres', "SELECT status FROM outbox WHERE payload->>'n' = 'A'"),
	'held', "A's event waits behind B's, which is earlier in commit order");
is( $node->safe_psql('postgres',
		"SELECT retry_count || ' ' || next_attempt_at FROM outbox WHERE payload->>'n' = 'B'"),
	$b_before, "B's retry keeps its attempt count and its backoff");

kafka_create_topic($kafka, 'acme.order.placed.v1', 1);
wait_for_delivered($node, 2);
my @msgs = consume_all($kafka, 'acme.order.placed.v1');
my %seen;
my @order = grep { !$seen{$_}++ } map { $_->{event}{payload}{n} } @msgs;
is(join(',', @order), 'B,A', 'K arrives in commit order: B, then A');

$a->quit;
$node->stop;
kafka_stop($kafka);
done_testing();
