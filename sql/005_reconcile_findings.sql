-- What the reconcile found per client day: the figures where the aggregates differed from a
-- recount of the raw facts (written by the processor's continuous reconcile after a second
-- pass confirmed them, and, for days found clean, by `eventflow reconcile`). The reader API
-- reads it by primary key for the requested days and says in meta.doubt which days are in
-- doubt; it never reads raw facts for this.
--
-- One row per check of a client day; the newest check (checked_ms) supersedes the older ones,
-- so a later pass that finds the day clean (mismatches = 0) ends the doubt. detail is a JSON
-- array of at most 20 of the differing figures, day totals first:
-- [{"metric": "visits", "key": "", "aggregate": 1660, "raw": 1011}]; mismatches counts them all.
-- pending_backfill = 1: the day has late facts not yet folded in (backfill will fix it).
CREATE TABLE IF NOT EXISTS reconcile_findings
(
    client_id        String,
    day              Date,
    checked_ms       UInt64,
    mismatches       UInt32,
    pending_backfill UInt8,
    detail           String
)
ENGINE = ReplacingMergeTree(checked_ms)
ORDER BY (client_id, day)
SETTINGS index_granularity = 1024;
