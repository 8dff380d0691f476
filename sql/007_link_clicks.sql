-- Clicks on tracked campaign links (GET /r/{cid}) per link and UTC minute, written by the
-- collector (pipeline/collect/src/clicks.rs). Only clicks of known links (answered 302) are
-- recorded, so the rows are bounded by the imported links; unknown cids are counted only in
-- eventflow_collector_link_clicks_total{outcome="unknown"}.
--
-- Every collector process counts clicks in memory under a boot id drawn when it starts and,
-- every collector.link_clicks_flush, writes the running count of each (client_id, cid, minute)
-- that changed since its last write: `clicks` is the count since that boot, and the row's
-- version. A retried insert writes the same or a higher count (ReplacingMergeTree keeps the
-- highest, readers take max()), so a retry never counts twice; a restarted collector has a new
-- boot id, so its rows add to the old ones instead of replacing them. A collector that crashes
-- loses the clicks counted since its last successful write (a redirect is not an acknowledged
-- fact; see docs/architecture.md).
--
-- Clicks of a link over a range: the sum over (minute, boot_id) of max(clicks).
CREATE TABLE IF NOT EXISTS link_clicks
(
    client_id String,
    minute    DateTime,
    cid       String,
    boot_id   UInt64,
    clicks    UInt64
)
ENGINE = ReplacingMergeTree(clicks)
ORDER BY (client_id, minute, cid, boot_id)
SETTINGS index_granularity = 1024;
