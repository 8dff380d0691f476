-- Operational state: late facts awaiting backfill, backfill coverage, processor progress and
-- campaign-link metadata.

-- Highest processing sequence of a late fact (stored raw after its day closed) per client day and
-- Kafka partition. A day is pending while late_facts.seq > backfill_marks.covered_seq.
CREATE TABLE IF NOT EXISTS late_facts
(
    client_id       String,
    day             Date,
    kafka_partition UInt16,
    seq             UInt64
)
ENGINE = ReplacingMergeTree(seq)
ORDER BY (client_id, day, kafka_partition)
SETTINGS index_granularity = 1024;

-- Raw facts up to covered_seq of a Kafka partition are folded into the aggregates of a client day.
CREATE TABLE IF NOT EXISTS backfill_marks
(
    client_id       String,
    day             Date,
    kafka_partition UInt16,
    covered_seq     UInt64,
    finished_at     DateTime
)
ENGINE = ReplacingMergeTree(covered_seq)
ORDER BY (client_id, day, kafka_partition)
SETTINGS index_granularity = 1024;

-- Last heartbeat of the processor instance owning each Kafka partition. watermark_ms is the
-- event time up to which that partition's facts are in the aggregates (now, when caught up).
CREATE TABLE IF NOT EXISTS processor_progress
(
    kafka_partition UInt16,
    instance        String,
    watermark_ms    Int64,
    heartbeat_ms    UInt64
)
ENGINE = ReplacingMergeTree(heartbeat_ms)
ORDER BY kafka_partition;

-- Tracked campaign links (GET /r/{cid}). A visit's cid resolves when it names a link of the same
-- client; otherwise it aggregates under 'unresolved'.
CREATE TABLE IF NOT EXISTS campaign_links
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
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY cid;
