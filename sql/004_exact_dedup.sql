-- Exact deduplication across partitions, and session sets that can be corrected.
-- See docs/adr/0003-exact-dedup-across-partitions.md.
--
-- The counting rule (CONTRACT.md §1): a visit counts once per (client_id, event_uid), an entry
-- once per (client_id, entry_id), within the dedup horizon (72 hours). Copies are ordered by
-- (received_at_ms, spool_id, spool_seq): the collector's receive time, then the fact's identity
-- in the collector spool that acknowledged it. A copy counts when no copy comes before it, or
-- when the copy just before it was received more than the horizon earlier.

-- What the processor decided about a fact when it stored it: counted, or a duplicate of a copy
-- that came first. When a notice (dedup_notices) turns a counted copy into a duplicate, the
-- processor stores the fact again with `duplicate` and a higher `seq` (ReplacingMergeTree).
-- 'undecided' marks rows stored before this migration (counted as they were) and pings.
ALTER TABLE facts ADD COLUMN dedup Enum8('undecided' = 0, 'counted' = 1, 'duplicate' = 2) DEFAULT 'undecided';

-- Every stored copy of a visit with an event_uid or of an entry, ordered by its dedup key: an
-- index of `facts` by (client_id, kind, uid), written by the processor before the facts (a copy
-- row only says "this fact exists"). The raw recount reads the copies of a key here instead of
-- scanning a client's whole history. `eventflow backfill` rebuilds it from `facts`.
CREATE TABLE IF NOT EXISTS fact_copies
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
ENGINE = ReplacingMergeTree
ORDER BY (client_id, kind, uid, received_at_ms, spool_id, spool_seq)
SETTINGS index_granularity = 1024;

-- The same copies as a log, in the order each partition wrote them: every processor reads the
-- copies the other partitions wrote since its cursor (per writer partition, kept in each
-- partition's checkpoint) and compares them with its own copies of the same keys.
CREATE TABLE IF NOT EXISTS copy_log
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
ENGINE = ReplacingMergeTree
ORDER BY (writer_partition, writer_seq, client_id, kind, uid, received_at_ms, spool_id, spool_seq);

-- "Your copy `loser` comes after `winner` within the dedup horizon, so it does not count":
-- written by the processor that holds `winner` for the partition that holds `loser` (target),
-- when it sees the loser in copy_log. The target's owner reads the notices above its cursor
-- (per writer partition, in its checkpoint), takes the loser out of its buckets if it counted
-- it, and stores its fact again marked duplicate; on a day already closed it marks the day for
-- backfill.
CREATE TABLE IF NOT EXISTS dedup_notices
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
ENGINE = ReplacingMergeTree
ORDER BY (writer_partition, writer_seq, target_partition, client_id, kind, uid, loser_spool_id, loser_spool_seq);

-- Sessions with a counted visit per client day, versioned like the other aggregates (replaces
-- the insert-only daily_sessions set, which could not be corrected). `present = 0` takes a
-- session out (its only counted visit turned out to be a duplicate, or backfill found none).
-- A session's facts are in one Kafka partition, whose processing sequence is the version.
-- Distinct sessions over any range: uniqExact(session_id) over the FINAL rows with present = 1.
CREATE TABLE IF NOT EXISTS day_sessions
(
    client_id       String,
    day             Date,
    session_id      String,
    kafka_partition UInt16,
    version         UInt64,
    present         UInt8
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (client_id, day, session_id, kafka_partition)
SETTINGS index_granularity = 1024;

INSERT INTO day_sessions (client_id, day, session_id, kafka_partition, version, present)
SELECT client_id, day, session_id, toUInt16(0), toUInt64(0), toUInt8(1) FROM daily_sessions;

DROP TABLE IF EXISTS daily_sessions;

-- Requests to rebuild a partition's open windows from the stored facts (the processor owning it
-- polls them with its heartbeat and replays, as after a takeover). Written by
-- `eventflow backfill --cid` when it re-attributes stored facts to a link imported after they
-- arrived: the stream's in-memory buckets of open days must follow.
CREATE TABLE IF NOT EXISTS rebuild_requests
(
    kafka_partition UInt16,
    requested_ms    Int64,
    reason          String
)
ENGINE = ReplacingMergeTree
ORDER BY (kafka_partition, requested_ms);

-- Client days with stored facts, per Kafka partition: the reader checks that each of them has
-- its daily_totals row (a missing row means a lost or deleted aggregate) without reading the
-- raw facts. Written by the processor ahead of the facts (a marker only says "facts of this
-- day exist"), and rebuilt by `eventflow backfill` in the client's current time zone.
CREATE TABLE IF NOT EXISTS fact_days
(
    client_id       String,
    day             Date,
    kafka_partition UInt16
)
ENGINE = ReplacingMergeTree
ORDER BY (client_id, day, kafka_partition)
SETTINGS index_granularity = 1024;

INSERT INTO fact_days (client_id, day, kafka_partition)
SELECT DISTINCT client_id, day, kafka_partition FROM facts WHERE kind != 'checkpoint';
