-- Raw facts, exactly as the processor received them, plus the processor's checkpoints.
--
-- Why checkpoints live in this table: ClickHouse has no multi-statement transactions, but one
-- INSERT of one block into one partition of a MergeTree is atomic (a single part). The table has
-- no PARTITION BY and the processor writes each flush as one INSERT of at most 100 000 rows, so a
-- flush's facts and its checkpoint rows (Kafka offsets, processing sequence, spool high-water
-- marks per Kafka partition) become visible together or not at all. After a crash the processor
-- resumes exactly where the stored facts end: no fact is stored twice and none is skipped.
--
-- `seq` is the processing sequence within a Kafka partition (epoch << 40 | counter); the
-- ReplacingMergeTree keeps the highest for a fact that a fenced-off zombie also wrote.
-- Every column is portable between ClickHouse 18.16 and current releases (tested on both).
CREATE TABLE IF NOT EXISTS facts
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
ENGINE = ReplacingMergeTree(seq)
ORDER BY (client_id, day, kind, fact_id);
