-- Cluster variant of sql/001_facts.sql, applied by `eventflow migrate --cluster NAME`, which
-- replaces {cluster} and {database} in this text before sending it ({shard} and {replica} are
-- server macros and stay as they are). See sql/cluster/README.md.
--
-- Every table T of the single-node schema becomes two tables, created on every host:
--   T_local  the data, ReplicatedReplacingMergeTree with the same columns, ORDER BY and version
--            column as the single-node T;
--   T        a Distributed table over T_local, so the application keeps using the same names.
--
-- Sharding key: kafka_partition. ReplacingMergeTree (and FINAL) only deduplicates rows within
-- one shard, so every version of a key must be on one shard. A fact always travels through the
-- same Kafka partition (topics are keyed by session and the partition count is fixed), so all
-- copies of a fact, including one a fenced-off zombie processor wrote again, share
-- kafka_partition. The processor writes the facts of a Kafka partition and that partition's
-- checkpoint row in one INSERT; with this key the whole flush of one partition lands on one shard
-- as one block (one part), so facts and checkpoint still become visible together (ADR 0002).
-- Writes must be synchronous (insert_distributed_sync = 1) so the INSERT returns only once the
-- shard has the block.
CREATE DATABASE IF NOT EXISTS {database} ON CLUSTER '{cluster}';

CREATE TABLE IF NOT EXISTS {database}.facts_local ON CLUSTER '{cluster}'
(
    client_id         String,
    day               Date,
    kind              Enum8('checkpoint' = 0, 'visit' = 1, 'entry' = 2, 'ping' = 3),
    fact_id           String,
    seq               UInt64,
    kafka_partition   UInt16,
    kafka_offset      Int64,
    spool_id          UInt64,
    spool_seq         UInt64,
    event_time        DateTime,
    event_time_ms     Int64,
    received_at_ms    Int64,
    client_ts         String,
    clock_skew        UInt8,
    late              UInt8,
    session_id        String,
    session_origin    Enum8('none' = 0, 'body' = 1, 'cookie' = 2, 'created' = 3),
    page              Enum8('none' = 0, 'landing' = 1, 'webinar' = 2, 'live' = 3),
    event_id          String,
    webinar_id        String,
    event_uid         String,
    entry_id          String,
    path              String,
    cid               String,
    cid_resolved      UInt8,
    utm_source        String,
    utm_medium        String,
    utm_campaign      String,
    utm_term          String,
    utm_content       String,
    utm_inherited     UInt8,
    first_utm_source   String,
    first_utm_medium   String,
    first_utm_campaign String,
    first_utm_term     String,
    first_utm_content  String,
    first_touch_ms    Int64,
    referrer          String,
    checkpoint        String
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/facts_local', '{replica}', seq)
ORDER BY (client_id, day, kind, fact_id);

CREATE TABLE IF NOT EXISTS {database}.facts ON CLUSTER '{cluster}'
AS {database}.facts_local
ENGINE = Distributed('{cluster}', '{database}', 'facts_local', kafka_partition);
