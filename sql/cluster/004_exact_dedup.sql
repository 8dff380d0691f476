-- Cluster variant of sql/004_exact_dedup.sql (see sql/cluster/README.md).
--
-- Sharding keys (made of ORDER BY columns, so every version of a row key lands on one shard):
--   fact_copies: cityHash64(client_id, uid). All copies of one dedup key are on one shard, so
--     the recount sorts the copies of a key on one shard.
--   copy_log, dedup_notices: writer_partition (both are read by writer and sequence).
--   day_sessions: kafka_partition, like the other per-partition aggregates: a session lives in
--     one Kafka partition. uniqExact over the Distributed table merges the shards exactly.
--   rebuild_requests, fact_days: kafka_partition.
-- The facts column is added to facts_local and to the Distributed facts (ALTER ... ADD COLUMN
-- has no IF NOT EXISTS on ClickHouse 18.16; `eventflow migrate` applies a file once).
ALTER TABLE {database}.facts_local ON CLUSTER '{cluster}' ADD COLUMN dedup Enum8('undecided' = 0, 'counted' = 1, 'duplicate' = 2) DEFAULT 'undecided';

ALTER TABLE {database}.facts ON CLUSTER '{cluster}' ADD COLUMN dedup Enum8('undecided' = 0, 'counted' = 1, 'duplicate' = 2) DEFAULT 'undecided';

CREATE TABLE IF NOT EXISTS {database}.fact_copies_local ON CLUSTER '{cluster}'
(
    client_id       String,
    kind            Enum8('visit' = 1, 'entry' = 2),
    uid             String,
    received_at_ms  Int64,
    spool_id        UInt64,
    spool_seq       UInt64,
    kafka_partition UInt16,
    day             Date
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/fact_copies_local', '{replica}')
ORDER BY (client_id, kind, uid, received_at_ms, spool_id, spool_seq)
SETTINGS index_granularity = 1024;

CREATE TABLE IF NOT EXISTS {database}.fact_copies ON CLUSTER '{cluster}'
AS {database}.fact_copies_local
ENGINE = Distributed('{cluster}', '{database}', 'fact_copies_local', cityHash64(client_id, uid));

CREATE TABLE IF NOT EXISTS {database}.copy_log_local ON CLUSTER '{cluster}'
(
    writer_partition UInt16,
    writer_seq       UInt64,
    client_id        String,
    kind             Enum8('visit' = 1, 'entry' = 2),
    uid              String,
    received_at_ms   Int64,
    spool_id         UInt64,
    spool_seq        UInt64,
    day              Date
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/copy_log_local', '{replica}')
ORDER BY (writer_partition, writer_seq, client_id, kind, uid, received_at_ms, spool_id, spool_seq);

CREATE TABLE IF NOT EXISTS {database}.copy_log ON CLUSTER '{cluster}'
AS {database}.copy_log_local
ENGINE = Distributed('{cluster}', '{database}', 'copy_log_local', writer_partition);

CREATE TABLE IF NOT EXISTS {database}.dedup_notices_local ON CLUSTER '{cluster}'
(
    writer_partition      UInt16,
    writer_seq            UInt64,
    target_partition      UInt16,
    client_id             String,
    kind                  Enum8('visit' = 1, 'entry' = 2),
    uid                   String,
    day                   Date,
    loser_received_at_ms  Int64,
    loser_spool_id        UInt64,
    loser_spool_seq       UInt64,
    winner_received_at_ms Int64,
    winner_spool_id       UInt64,
    winner_spool_seq      UInt64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/dedup_notices_local', '{replica}')
ORDER BY (writer_partition, writer_seq, target_partition, client_id, kind, uid, loser_spool_id, loser_spool_seq);

CREATE TABLE IF NOT EXISTS {database}.dedup_notices ON CLUSTER '{cluster}'
AS {database}.dedup_notices_local
ENGINE = Distributed('{cluster}', '{database}', 'dedup_notices_local', writer_partition);

CREATE TABLE IF NOT EXISTS {database}.day_sessions_local ON CLUSTER '{cluster}'
(
    client_id       String,
    day             Date,
    session_id      String,
    kafka_partition UInt16,
    version         UInt64,
    present         UInt8
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/day_sessions_local', '{replica}', version)
ORDER BY (client_id, day, session_id, kafka_partition)
SETTINGS index_granularity = 1024;

CREATE TABLE IF NOT EXISTS {database}.day_sessions ON CLUSTER '{cluster}'
AS {database}.day_sessions_local
ENGINE = Distributed('{cluster}', '{database}', 'day_sessions_local', kafka_partition);

CREATE TABLE IF NOT EXISTS {database}.rebuild_requests_local ON CLUSTER '{cluster}'
(
    kafka_partition UInt16,
    requested_ms    Int64,
    reason          String
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/rebuild_requests_local', '{replica}')
ORDER BY (kafka_partition, requested_ms);

CREATE TABLE IF NOT EXISTS {database}.rebuild_requests ON CLUSTER '{cluster}'
AS {database}.rebuild_requests_local
ENGINE = Distributed('{cluster}', '{database}', 'rebuild_requests_local', kafka_partition);

INSERT INTO {database}.day_sessions (client_id, day, session_id, kafka_partition, version, present)
SELECT client_id, day, session_id, toUInt16(0), toUInt64(0), toUInt8(1) FROM {database}.daily_sessions;

DROP TABLE IF EXISTS {database}.daily_sessions ON CLUSTER '{cluster}';

DROP TABLE IF EXISTS {database}.daily_sessions_local ON CLUSTER '{cluster}';

CREATE TABLE IF NOT EXISTS {database}.fact_days_local ON CLUSTER '{cluster}'
(
    client_id       String,
    day             Date,
    kafka_partition UInt16
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/fact_days_local', '{replica}')
ORDER BY (client_id, day, kafka_partition)
SETTINGS index_granularity = 1024;

CREATE TABLE IF NOT EXISTS {database}.fact_days ON CLUSTER '{cluster}'
AS {database}.fact_days_local
ENGINE = Distributed('{cluster}', '{database}', 'fact_days_local', kafka_partition);

INSERT INTO {database}.fact_days (client_id, day, kafka_partition)
SELECT DISTINCT client_id, day, kafka_partition FROM {database}.facts WHERE kind != 'checkpoint';
