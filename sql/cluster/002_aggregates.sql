-- Cluster variant of sql/002_aggregates.sql (see sql/cluster/README.md). Each table T is
-- T_local (ReplicatedReplacingMergeTree, same columns, ORDER BY and version column as the
-- single-node T) plus a Distributed table T with the single-node name.
--
-- Sharding keys: ReplacingMergeTree and FINAL deduplicate only within a shard, so every version
-- of a row key must land on one shard. The key is always made of ORDER BY columns:
--   minute_visits, minute_live, daily_totals, daily_marketing: kafka_partition. Every row is the
--     value of one bucket for one Kafka partition (part of the ORDER BY), and the processor writes
--     a partition's rows with the same key as its facts and checkpoint. Readers sum over
--     kafka_partition, which the Distributed read does across shards.
--   daily_sessions, session_first_visits: cityHash64(client_id, session_id). A session can be
--     re-inserted by replays and backfill; all copies go to the same shard. uniqExact over
--     daily_sessions merges the per-shard states exactly.
CREATE TABLE IF NOT EXISTS {database}.minute_visits_local ON CLUSTER '{cluster}'
(
    client_id       String,
    minute          DateTime,
    page            Enum8('none' = 0, 'landing' = 1, 'webinar' = 2, 'live' = 3),
    kafka_partition UInt16,
    version         UInt64,
    visits          UInt64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/minute_visits_local', '{replica}', version)
ORDER BY (client_id, minute, page, kafka_partition)
SETTINGS index_granularity = 1024;

CREATE TABLE IF NOT EXISTS {database}.minute_visits ON CLUSTER '{cluster}'
AS {database}.minute_visits_local
ENGINE = Distributed('{cluster}', '{database}', 'minute_visits_local', kafka_partition);

CREATE TABLE IF NOT EXISTS {database}.minute_live_local ON CLUSTER '{cluster}'
(
    client_id       String,
    webinar_id      String,
    minute          DateTime,
    kafka_partition UInt16,
    version         UInt64,
    viewers         UInt64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/minute_live_local', '{replica}', version)
ORDER BY (client_id, minute, webinar_id, kafka_partition)
SETTINGS index_granularity = 1024;

CREATE TABLE IF NOT EXISTS {database}.minute_live ON CLUSTER '{cluster}'
AS {database}.minute_live_local
ENGINE = Distributed('{cluster}', '{database}', 'minute_live_local', kafka_partition);

CREATE TABLE IF NOT EXISTS {database}.daily_totals_local ON CLUSTER '{cluster}'
(
    client_id             String,
    day                   Date,
    kafka_partition       UInt16,
    version               UInt64,
    visits                UInt64,
    visits_landing        UInt64,
    visits_webinar        UInt64,
    visits_live           UInt64,
    unique_sessions       UInt64,
    entries               UInt64,
    linked_entries        UInt64,
    visits_utm_missing    UInt64,
    visits_cid_unresolved UInt64,
    viewer_minutes        UInt64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/daily_totals_local', '{replica}', version)
ORDER BY (client_id, day, kafka_partition)
SETTINGS index_granularity = 1024;

CREATE TABLE IF NOT EXISTS {database}.daily_totals ON CLUSTER '{cluster}'
AS {database}.daily_totals_local
ENGINE = Distributed('{cluster}', '{database}', 'daily_totals_local', kafka_partition);

CREATE TABLE IF NOT EXISTS {database}.daily_marketing_local ON CLUSTER '{cluster}'
(
    client_id       String,
    day             Date,
    event_id        String,
    webinar_id      String,
    cid             String,
    utm_source      String,
    utm_medium      String,
    utm_campaign    String,
    kafka_partition UInt16,
    version         UInt64,
    visits          UInt64,
    unique_sessions UInt64,
    entries         UInt64,
    linked_entries  UInt64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/daily_marketing_local', '{replica}', version)
ORDER BY (client_id, day, event_id, webinar_id, cid, utm_source, utm_medium, utm_campaign, kafka_partition)
SETTINGS index_granularity = 1024;

CREATE TABLE IF NOT EXISTS {database}.daily_marketing ON CLUSTER '{cluster}'
AS {database}.daily_marketing_local
ENGINE = Distributed('{cluster}', '{database}', 'daily_marketing_local', kafka_partition);

CREATE TABLE IF NOT EXISTS {database}.daily_sessions_local ON CLUSTER '{cluster}'
(
    client_id  String,
    day        Date,
    session_id String
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/daily_sessions_local', '{replica}')
ORDER BY (client_id, day, session_id)
SETTINGS index_granularity = 1024;

CREATE TABLE IF NOT EXISTS {database}.daily_sessions ON CLUSTER '{cluster}'
AS {database}.daily_sessions_local
ENGINE = Distributed('{cluster}', '{database}', 'daily_sessions_local', cityHash64(client_id, session_id));

CREATE TABLE IF NOT EXISTS {database}.session_first_visits_local ON CLUSTER '{cluster}'
(
    client_id      String,
    session_id     String,
    first_visit_ms Int64,
    version        UInt64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/session_first_visits_local', '{replica}', version)
ORDER BY (client_id, session_id)
SETTINGS index_granularity = 1024;

CREATE TABLE IF NOT EXISTS {database}.session_first_visits ON CLUSTER '{cluster}'
AS {database}.session_first_visits_local
ENGINE = Distributed('{cluster}', '{database}', 'session_first_visits_local', cityHash64(client_id, session_id));
