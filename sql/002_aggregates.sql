-- Aggregates written by the stream processor (and by `eventflow backfill`).
--
-- Idempotency comes from the data model, not from insert deduplication (which ClickHouse 18.16
-- lacks): every versioned row holds the FULL value of one bucket for one Kafka partition, computed
-- from all raw facts of that partition up to processing sequence `version`. A replay recomputes
-- the same value for the same key; ReplacingMergeTree keeps the highest version. Facts are keyed by
-- session in Kafka, so a session lives in one partition and per-partition distinct-session counts
-- add up exactly. Readers take `FINAL` rows and sum over `kafka_partition`.
--
-- index_granularity 1024 (default 8192): a dashboard reads one client's few days, a few hundred
-- rows; with 8192-row granules every part made it read and merge (FINAL) tens of thousands.
-- Measured on 10 M facts (docs/performance.md): a small client's 7-day daily_marketing FINAL
-- read went from 27 389 rows / 11 ms to 3 072 rows / 1.3 ms.

-- Visits per UTC minute and page kind.
CREATE TABLE IF NOT EXISTS minute_visits
(
    client_id       String,
    minute          DateTime,
    page            Enum8('none' = 0, 'landing' = 1, 'webinar' = 2, 'live' = 3),
    kafka_partition UInt16,
    version         UInt64,
    visits          UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (client_id, minute, page, kafka_partition)
SETTINGS index_granularity = 1024;

-- Concurrent live viewers: sessions that pinged a webinar in a UTC minute.
CREATE TABLE IF NOT EXISTS minute_live
(
    client_id       String,
    webinar_id      String,
    minute          DateTime,
    kafka_partition UInt16,
    version         UInt64,
    viewers         UInt64
)
ENGINE = ReplacingMergeTree(version)
-- minute before webinar_id: the overview reads every webinar of a client in a time range, and
-- must read only that range however long the client's history (the per-webinar series also
-- filters on minute).
ORDER BY (client_id, minute, webinar_id, kafka_partition)
SETTINGS index_granularity = 1024;

-- Per client day (client time zone): totals, page kinds, quality counters.
CREATE TABLE IF NOT EXISTS daily_totals
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
ENGINE = ReplacingMergeTree(version)
ORDER BY (client_id, day, kafka_partition)
SETTINGS index_granularity = 1024;

-- Marketing stats per client day, event/webinar, campaign link and UTM source/medium/campaign.
-- Missing UTM fields are 'unknown', missing or unknown campaign links 'unresolved'.
CREATE TABLE IF NOT EXISTS daily_marketing
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
ENGINE = ReplacingMergeTree(version)
ORDER BY (client_id, day, event_id, webinar_id, cid, utm_source, utm_medium, utm_campaign, kafka_partition)
SETTINGS index_granularity = 1024;

-- Sessions with a visit per client day: a set, so replays are harmless. Distinct sessions over
-- any date range are uniqExact over these rows (distinct counts do not add across days).
CREATE TABLE IF NOT EXISTS daily_sessions
(
    client_id  String,
    day        Date,
    session_id String
)
ENGINE = ReplacingMergeTree
ORDER BY (client_id, day, session_id)
SETTINGS index_granularity = 1024;

-- Earliest visit of each session, for linking registrations to visits older than the open
-- windows. version = 2^64 - 1 - first_visit_ms, so the highest version is the earliest visit.
CREATE TABLE IF NOT EXISTS session_first_visits
(
    client_id      String,
    session_id     String,
    first_visit_ms Int64,
    version        UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (client_id, session_id)
SETTINGS index_granularity = 1024;
