//! Campaign-link metadata (`campaign_links`).

use crate::rows::CampaignLinkRow;
use crate::{Result, Store};

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
}
