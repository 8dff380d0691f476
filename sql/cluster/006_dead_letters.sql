-- Cluster variant of sql/006_dead_letters.sql (see sql/cluster/README.md): dead_letters_local
-- (ReplicatedReplacingMergeTree, same columns, ORDER BY and version column as the single-node
-- table) plus a Distributed dead_letters.
--
-- Sharding key: kafka_partition, an ORDER BY column and the key of the facts and checkpoints of
-- that partition, so a dead letter written again after a crash lands on the same shard (FINAL
-- folds it) as the flush that moves the partition past it.
CREATE TABLE IF NOT EXISTS {database}.dead_letters_local ON CLUSTER '{cluster}'
(
    topic           String,
    kafka_partition UInt16,
    kafka_offset    Int64,
    reason          String,
    detail          String,
    payload         String,
    payload_bytes   UInt32,
    recorded_ms     UInt64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/dead_letters_local', '{replica}', recorded_ms)
ORDER BY (topic, kafka_partition, kafka_offset)
SETTINGS index_granularity = 1024;

CREATE TABLE IF NOT EXISTS {database}.dead_letters ON CLUSTER '{cluster}'
AS {database}.dead_letters_local
ENGINE = Distributed('{cluster}', '{database}', 'dead_letters_local', kafka_partition);
