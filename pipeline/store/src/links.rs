//! Campaign-link metadata (`campaign_links`) and clicks per link (`link_clicks`, written by the
//! collector, read by the reader API).

use crate::rows::{CampaignLinkRow, LinkClickRow};
use crate::{Result, Store};

/// Clicks of one link over a range (all collector boots and minutes).
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Deserialize)]
pub struct LinkClicks {
    pub cid: String,
    pub clicks: u64,
}

impl Store {
    /// Every campaign link, latest version of each.
    pub async fn campaign_links(&self) -> Result<Vec<CampaignLinkRow>> {
        self.timed(async {
            Ok(self.query("SELECT ?fields FROM campaign_links FINAL")?.fetch_all::<CampaignLinkRow>().await?)
        })
        .await
    }

    /// Adds or replaces links (the newest `updated_at` wins).
    pub async fn upsert_campaign_links(&self, links: &[CampaignLinkRow]) -> Result<()> {
        self.insert("campaign_links", links).await
    }

    /// The latest version of one link, if it exists (the collector's read-through on a cache
    /// miss, `eventflow backfill --cid`; `cid` is the sorting key, so this reads one granule).
    pub async fn campaign_link(&self, cid: &str) -> Result<Option<CampaignLinkRow>> {
        self.timed(async {
            Ok(self
                .query("SELECT ?fields FROM campaign_links FINAL WHERE cid = ?")?
                .bind(cid)
                .fetch_optional::<CampaignLinkRow>()
                .await?)
        })
        .await
    }

    /// Writes the collector's running click counts (one INSERT; a retry of the same rows, or a
    /// later count of the same key, replaces rather than adds: see `sql/007_link_clicks.sql`).
    pub async fn record_link_clicks(&self, rows: &[LinkClickRow]) -> Result<()> {
        self.insert("link_clicks", rows).await
    }

    /// Clicks per link of `client` in the UTC minutes of `[from_s, to_s)` (unix seconds), most
    /// clicks first, then by cid. A primary-key range read; each (minute, cid, boot) key counts
    /// with its highest running count, whether or not its retries were merged yet.
    pub async fn link_clicks(&self, client: &str, from_s: u32, to_s: u32) -> Result<Vec<LinkClicks>> {
        self.timed(async {
            Ok(self
                .query(
                    "SELECT cid, sum(c) AS clicks FROM (SELECT cid, max(clicks) AS c FROM link_clicks \
                     WHERE client_id = ? AND minute >= toDateTime(?) AND minute < toDateTime(?) \
                     GROUP BY minute, cid, boot_id) GROUP BY cid ORDER BY clicks DESC, cid",
                )?
                .bind(client)
                .bind(from_s)
                .bind(to_s)
                .fetch_all::<LinkClicks>()
                .await?)
        })
        .await
    }
}
