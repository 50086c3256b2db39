-- Topic provisioning settings: voutbox.topic_config is checked when set
-- (the broker checks the names and values when it creates a topic);
-- partitions and replication factor take -1 for the broker's defaults.
\set VERBOSITY default
ALTER SYSTEM SET voutbox.topic_config = 'retention.ms=604800000; cleanup.policy=compact,delete';
ALTER SYSTEM SET voutbox.topic_config = ' min.insync.replicas = 2 ;';
ALTER SYSTEM SET voutbox.topic_config = '';
ALTER SYSTEM SET voutbox.topic_config = 'retention.ms';
ALTER SYSTEM SET voutbox.topic_config = 'retention.ms=';
ALTER SYSTEM SET voutbox.topic_config = 'Retention.MS=1';
ALTER SYSTEM SET voutbox.topic_config = '=1';
ALTER SYSTEM SET voutbox.topic_partitions = 0;
ALTER SYSTEM SET voutbox.topic_partitions = -1;
ALTER SYSTEM SET voutbox.topic_replication_factor = -2;
ALTER SYSTEM SET voutbox.format = 'cloudevents_binary';
ALTER SYSTEM SET voutbox.format = 'avro';
ALTER SYSTEM RESET ALL;
SELECT name, setting, context FROM pg_settings
 WHERE name IN ('voutbox.create_topics', 'voutbox.topic_partitions',
				'voutbox.topic_replication_factor', 'voutbox.topic_config', 'voutbox.database',
				'voutbox.format')
 ORDER BY name;
\set VERBOSITY terse
