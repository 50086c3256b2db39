# How long the first event on a brand-new topic takes to reach the broker:
# from the commit that saved it to the broker's append (LogAppendTime, set
# broker-wide), for topics nobody created beforehand, with the broker's
# auto-creation on and off.  Run by test/bench/new_topic.sh; prints Markdown.
# Settings: NEW_TOPICS (5 topics per mode), NEW_TOPIC_DEADLINE (20 s).
use strict;
use warnings;

use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Time::HiRes qw(time usleep);
use VoutboxTest;

my $n = $ENV{NEW_TOPICS} // 5;
my $deadline = $ENV{NEW_TOPIC_DEADLINE} // 20;
my $vkafka = 'test/tools/vkafka';
my @report = ("| broker auto-creation | topic | commit to append (ms) |", "|---|---|---|");
my %summary;

for my $auto ('true', 'false')
{
	my $kafka = kafka_start("newtopic_$auto", "auto.create.topics.enable=$auto",
		'log.message.timestamp.type=LogAppendTime');
	my $node = voutbox_node("newtopic_$auto", $kafka, %{ decode_json($ENV{NEW_TOPIC_CONF} // '{}') });
	# Warm up: the producer is connected before the first new topic.
	kafka_create_topic($kafka, 'warm.up.v1', 1);
	$node->safe_psql('postgres', save_sql('warm', 'up.v1', 'w', {}));
	wait_for_delivered($node, 1);

	my @lat;
	for my $i (1 .. $n)
	{
		my $tenant = "n$i$auto";
		my $topic = "$tenant.created.v1";
		my $out = $node->safe_psql('postgres',
			"BEGIN; " . save_sql($tenant, 'created.v1', "a$i", {}) . "; COMMIT; "
			  . "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint");
		my $committed = (split /\n/, $out)[-1];
		my $t0 = time;
		my $delivered = 0;
		while (time - $t0 < $deadline)
		{
			$delivered = $node->safe_psql('postgres',
				"SELECT count(*) FROM outbox WHERE tenant_id = '$tenant' AND status = 'delivered'");
			last if $delivered;
			usleep(20_000);
		}
		my $cell;
		if ($delivered)
		{
			my $line = `$vkafka consume -b '$kafka->{brokers}' -t '$topic' -n 1 -T 30`;
			my ($ts) = $line =~ /"timestamp":(\d+)/;
			die "not LogAppendTime: $line" unless $line =~ /"timestamp_type":"LogAppendTime"/;
			push @lat, $ts - $committed;
			$cell = $ts - $committed;
		}
		else
		{
			my $state = $node->safe_psql('postgres',
				"SELECT status || coalesce(': ' || last_error, '') FROM outbox WHERE tenant_id = '$tenant'");
			$cell = "not delivered within $deadline s ($state)";
		}
		push @report, "| $auto | $topic | $cell |";
	}
	my @s = sort { $a <=> $b } @lat;
	$summary{$auto} = @s
	  ? sprintf('median %d ms, max %d ms (%d of %d delivered)', $s[ int($#s / 2) ], $s[-1], scalar(@s), $n)
	  : "none of $n delivered within $deadline s";
	$node->stop;
	kafka_stop($kafka);
}

# (PostgreSQL::Test::Utils sends STDOUT to the test's log: write a file.)
open my $out, '>', $ENV{NEW_TOPIC_REPORT} or die "cannot write the report: $!";
print $out join("\n", @report), "\n\n";
print $out "- auto-creation on: $summary{true}\n- auto-creation off: $summary{false}\n";
close $out;
