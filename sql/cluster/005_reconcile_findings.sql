-- Cluster variant of sql/005_reconcile_findings.sql (see sql/cluster/README.md):
-- reconcile_findings_local (ReplicatedReplacingMergeTree, same columns, ORDER BY and version
-- column as the single-node table) plus a Distributed reconcile_findings.
--
-- Sharding key: cityHash64(client_id), an ORDER BY column, so every check of a client day lands
-- on one shard (FINAL keeps the newest) and the reader's one-client range read is one shard's.
CREATE TABLE IF NOT EXISTS {database}.reconcile_findings_local ON CLUSTER '{cluster}'
(
    client_id        String,
    day              Date,
    checked_ms       UInt64,
    mismatches       UInt32,
    pending_backfill UInt8,
    detail           String
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/reconcile_findings_local', '{replica}', checked_ms)
ORDER BY (client_id, day)
SETTINGS index_granularity = 1024;

CREATE TABLE IF NOT EXISTS {database}.reconcile_findings ON CLUSTER '{cluster}'
AS {database}.reconcile_findings_local
ENGINE = Distributed('{cluster}', '{database}', 'reconcile_findings_local', cityHash64(client_id));
