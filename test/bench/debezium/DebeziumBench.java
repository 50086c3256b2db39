/*
 * DebeziumBench: the Debezium baseline of voutbox's benchmarks.
 *
 * Debezium's embedded engine (PostgreSQL connector, pgoutput) streams the new rows of
 * one outbox table through the outbox event router (io.debezium.transforms.outbox.EventRouter,
 * its defaults: topic outbox.event.<aggregatetype>, key aggregateid, header id, value the
 * payload, expanded from jsonb and written as schemaless JSON), and this program's own
 * KafkaProducer (acks=all, idempotent) sends every record.  At least once: a batch is
 * marked processed only after all its records are acknowledged by Kafka.
 *
 *   java -cp "$(build.sh)" DebeziumBench key=value ...
 *
 * Keys: brokers (required), offsets (required: a directory for the offset file),
 * host (127.0.0.1), port (5432), dbname (postgres), user (postgres), password (none),
 * slot (voutbox_dbz), publication (<slot>_pub), table (public.outbox_dbz), linger.ms (5),
 * offset.flush.interval.ms (1000).  dbz.X=V sets Debezium property X, producer.X=V sets
 * Kafka producer property X.  Everything else is Debezium's default, e.g. max.batch.size
 * 2048 and poll.interval.ms 500 (about 1 s from insert to send at a low rate; pass
 * dbz.poll.interval.ms=10 for a tuned one); its __debezium.context.* headers are off.
 *
 * Prints one line "ready" on stdout once the connector's task has started (the slot and
 * the publication exist then: a row committed after it is streamed).  Logs go to stderr.
 * SIGTERM stops it cleanly (engine, then producer) and it says "DebeziumBench: sent N" on stderr.
 */

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;

import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.connect.header.Header;
import org.apache.kafka.connect.json.JsonConverter;
import org.apache.kafka.connect.source.SourceRecord;

import io.debezium.embedded.Connect;
import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.RecordChangeEvent;
import io.debezium.engine.format.ChangeEventFormat;

public class DebeziumBench {
    private static final AtomicLong sent = new AtomicLong();
    private static volatile int exitCode = 0;

    public static void main(String[] args) throws Exception {
        System.setProperty("log4j.shutdownHookEnabled", "false"); // keep logging while closing
        Map<String, String> a = new HashMap<>();
        for (String arg : args) {
            int eq = arg.indexOf('=');
            if (eq <= 0)
                die("argument is not key=value: " + arg);
            a.put(arg.substring(0, eq), arg.substring(eq + 1));
        }
        String brokers = required(a, "brokers");
        Path offsets = Path.of(required(a, "offsets"));
        Files.createDirectories(offsets);
        String slot = a.getOrDefault("slot", "voutbox_dbz");

        Properties dbz = new Properties();
        dbz.setProperty("name", "voutbox-dbz-" + slot);
        dbz.setProperty("connector.class", "io.debezium.connector.postgresql.PostgresConnector");
        dbz.setProperty("topic.prefix", "voutbox-dbz");
        dbz.setProperty("offset.storage", "org.apache.kafka.connect.storage.FileOffsetBackingStore");
        dbz.setProperty("offset.storage.file.filename", offsets.resolve("offsets.dat").toString());
        dbz.setProperty("offset.flush.interval.ms", a.getOrDefault("offset.flush.interval.ms", "1000"));
        dbz.setProperty("database.hostname", a.getOrDefault("host", "127.0.0.1"));
        dbz.setProperty("database.port", a.getOrDefault("port", "5432"));
        dbz.setProperty("database.dbname", a.getOrDefault("dbname", "postgres"));
        dbz.setProperty("database.user", a.getOrDefault("user", "postgres"));
        if (a.containsKey("password"))
            dbz.setProperty("database.password", a.get("password"));
        dbz.setProperty("plugin.name", "pgoutput");
        dbz.setProperty("slot.name", slot);
        dbz.setProperty("publication.name", a.getOrDefault("publication", slot + "_pub"));
        dbz.setProperty("publication.autocreate.mode", "filtered"); // only the included table
        dbz.setProperty("table.include.list", a.getOrDefault("table", "public.outbox_dbz"));
        dbz.setProperty("snapshot.mode", "no_data"); // stream new rows only
        dbz.setProperty("extended.headers.enabled", "false"); // no __debezium.context.* headers
        dbz.setProperty("transforms", "outbox");
        dbz.setProperty("transforms.outbox.type", "io.debezium.transforms.outbox.EventRouter");
        dbz.setProperty("transforms.outbox.table.expand.json.payload", "true");

        Properties prod = new Properties();
        prod.setProperty(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, brokers);
        prod.setProperty(ProducerConfig.ACKS_CONFIG, "all");
        prod.setProperty(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
        prod.setProperty(ProducerConfig.LINGER_MS_CONFIG, a.getOrDefault("linger.ms", "5"));
        prod.setProperty(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        prod.setProperty(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());

        for (Map.Entry<String, String> e : a.entrySet()) {
            if (e.getKey().startsWith("dbz."))
                dbz.setProperty(e.getKey().substring(4), e.getValue());
            else if (e.getKey().startsWith("producer."))
                prod.setProperty(e.getKey().substring(9), e.getValue());
            else if (!List.of("brokers", "offsets", "host", "port", "dbname", "user", "password", "slot",
                    "publication", "table", "linger.ms", "offset.flush.interval.ms").contains(e.getKey()))
                die("unknown key: " + e.getKey());
        }

        // The payload, expanded by the router into a Struct, written back as plain JSON.
        JsonConverter json = new JsonConverter();
        json.configure(Map.of("schemas.enable", "false"), false);
        KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(prod);
        CountDownLatch done = new CountDownLatch(1);
        AtomicBoolean ready = new AtomicBoolean();

        DebeziumEngine<RecordChangeEvent<SourceRecord>> engine = DebeziumEngine.create(ChangeEventFormat.of(Connect.class))
                .using(dbz)
                .using(new DebeziumEngine.ConnectorCallback() {
                    @Override
                    public void taskStarted() {
                        // The task's start() has created the publication and the slot.
                        if (ready.compareAndSet(false, true)) {
                            System.out.println("ready");
                            System.out.flush();
                        }
                    }
                })
                .using((success, message, error) -> {
                    if (!success) {
                        // (the engine has logged the stack trace)
                        System.err.println("DebeziumBench: engine failed: " + message);
                        exitCode = 1;
                    }
                    done.countDown();
                })
                .notifying((records, committer) -> {
                    List<Future<RecordMetadata>> acks = new ArrayList<>(records.size());
                    for (RecordChangeEvent<SourceRecord> r : records) {
                        ProducerRecord<byte[], byte[]> pr = toKafka(r.record(), json);
                        if (pr != null)
                            acks.add(producer.send(pr));
                    }
                    producer.flush();
                    try {
                        for (Future<RecordMetadata> f : acks)
                            f.get(); // throws if Kafka did not take it: then nothing is marked
                    } catch (java.util.concurrent.ExecutionException e) {
                        throw new RuntimeException("send failed", e.getCause());
                    }
                    for (RecordChangeEvent<SourceRecord> r : records)
                        committer.markProcessed(r);
                    committer.markBatchFinished();
                    sent.addAndGet(acks.size());
                })
                .build();

        // SIGTERM: close the engine (it commits the offsets of what was marked processed),
        // then let main close the producer; the JVM exits once this hook returns.
        CountDownLatch closed = new CountDownLatch(1);
        Thread hook = new Thread(() -> {
            try {
                engine.close();
                closed.await();
            } catch (Exception e) {
                e.printStackTrace();
            }
        });
        Runtime.getRuntime().addShutdownHook(hook);
        ExecutorService runner = Executors.newSingleThreadExecutor();
        runner.execute(engine);
        done.await();
        runner.shutdown();
        producer.close();
        System.err.println("DebeziumBench: sent " + sent.get());
        closed.countDown();
        if (exitCode != 0) {
            try {
                Runtime.getRuntime().removeShutdownHook(hook);
            } catch (IllegalStateException e) {
                return; // SIGTERM came first (e.g. while starting): the JVM is exiting anyway
            }
            System.exit(exitCode);
        }
    }

    /* A routed outbox record as a Kafka record, or null for what the router dropped. */
    private static ProducerRecord<byte[], byte[]> toKafka(SourceRecord r, JsonConverter json) {
        if (r.topic() == null || r.value() == null)
            return null; // e.g. a tombstone: the bench only inserts
        byte[] key = r.key() == null ? null : r.key().toString().getBytes(StandardCharsets.UTF_8);
        byte[] value = json.fromConnectData(r.topic(), r.valueSchema(), r.value());
        ProducerRecord<byte[], byte[]> pr = new ProducerRecord<>(r.topic(), null, key, value);
        for (Header h : r.headers())
            if (h.value() != null)
                pr.headers().add(h.key(), h.value().toString().getBytes(StandardCharsets.UTF_8));
        return pr;
    }

    private static String required(Map<String, String> a, String key) {
        String v = a.get(key);
        if (v == null || v.isEmpty())
            die("missing " + key + "=...");
        return v;
    }

    private static void die(String msg) {
        System.err.println("DebeziumBench: " + msg);
        System.exit(2);
    }
}
