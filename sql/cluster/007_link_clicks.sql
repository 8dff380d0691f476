-- Cluster variant of sql/007_link_clicks.sql (see sql/cluster/README.md):
-- link_clicks_local (ReplicatedReplacingMergeTree, same columns, ORDER BY and version column as
-- the single-node table) plus a Distributed link_clicks.
--
-- Sharding key: cityHash64(client_id, cid), ORDER BY columns, so every version of a row key
-- (one collector boot's running count of a link's minute) lands on one shard and FINAL or
-- max() folds its retries there; one busy client's links spread over the shards.
CREATE TABLE IF NOT EXISTS {database}.link_clicks_local ON CLUSTER '{cluster}'
(
    client_id String,
    minute    DateTime,
    cid       String,
    boot_id   UInt64,
    clicks    UInt64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/link_clicks_local', '{replica}', clicks)
ORDER BY (client_id, minute, cid, boot_id)
SETTINGS index_granularity = 1024;

CREATE TABLE IF NOT EXISTS {database}.link_clicks ON CLUSTER '{cluster}'
AS {database}.link_clicks_local
ENGINE = Distributed('{cluster}', '{database}', 'link_clicks_local', cityHash64(client_id, cid));
