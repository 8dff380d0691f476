-- Cluster variant of sql/003_operations.sql (see sql/cluster/README.md). Each table T is
-- T_local (ReplicatedReplacingMergeTree, same columns, ORDER BY and version column as the
-- single-node T) plus a Distributed table T with the single-node name.
--
-- Sharding keys (every version of a row key on one shard, because ReplacingMergeTree and FINAL
-- deduplicate only within a shard; the key is always made of ORDER BY columns):
--   late_facts, backfill_marks, processor_progress: kafka_partition, like the facts and
--     aggregates of that partition. A client day is pending while
--     late_facts.seq > backfill_marks.covered_seq; both are per partition, so the comparison
--     is made row by row after the Distributed read.
--   campaign_links: cityHash64(cid); re-imports of a link (higher updated_at) replace the old row
--     on the same shard.
CREATE TABLE IF NOT EXISTS {database}.late_facts_local ON CLUSTER '{cluster}'
(
    client_id       String,
    day             Date,
    kafka_partition UInt16,
    seq             UInt64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/late_facts_local', '{replica}', seq)
ORDER BY (client_id, day, kafka_partition)
SETTINGS index_granularity = 1024;

CREATE TABLE IF NOT EXISTS {database}.late_facts ON CLUSTER '{cluster}'
AS {database}.late_facts_local
ENGINE = Distributed('{cluster}', '{database}', 'late_facts_local', kafka_partition);

CREATE TABLE IF NOT EXISTS {database}.backfill_marks_local ON CLUSTER '{cluster}'
(
    client_id       String,
    day             Date,
    kafka_partition UInt16,
    covered_seq     UInt64,
    finished_at     DateTime
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/backfill_marks_local', '{replica}', covered_seq)
ORDER BY (client_id, day, kafka_partition)
SETTINGS index_granularity = 1024;

CREATE TABLE IF NOT EXISTS {database}.backfill_marks ON CLUSTER '{cluster}'
AS {database}.backfill_marks_local
ENGINE = Distributed('{cluster}', '{database}', 'backfill_marks_local', kafka_partition);

CREATE TABLE IF NOT EXISTS {database}.processor_progress_local ON CLUSTER '{cluster}'
(
    kafka_partition UInt16,
    instance        String,
    watermark_ms    Int64,
    heartbeat_ms    UInt64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/processor_progress_local', '{replica}', heartbeat_ms)
ORDER BY kafka_partition;

CREATE TABLE IF NOT EXISTS {database}.processor_progress ON CLUSTER '{cluster}'
AS {database}.processor_progress_local
ENGINE = Distributed('{cluster}', '{database}', 'processor_progress_local', kafka_partition);

CREATE TABLE IF NOT EXISTS {database}.campaign_links_local ON CLUSTER '{cluster}'
(
    cid          String,
    client_id    String,
    destination  String,
    utm_source   String,
    utm_medium   String,
    utm_campaign String,
    utm_term     String,
    utm_content  String,
    updated_at   DateTime
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/campaign_links_local', '{replica}', updated_at)
ORDER BY cid;

CREATE TABLE IF NOT EXISTS {database}.campaign_links ON CLUSTER '{cluster}'
AS {database}.campaign_links_local
ENGINE = Distributed('{cluster}', '{database}', 'campaign_links_local', cityHash64(cid));
