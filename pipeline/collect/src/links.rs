//! Campaign-link metadata, cached in memory.
//!
//! Links live in ClickHouse (`campaign_links`, loaded with `eventflow links import`). The
//! collector refreshes its cache in the background; a refresh failure keeps the last good copy
//! and never blocks or drops a fact: an unknown `cid`, or one of another client, simply
//! aggregates under `unresolved`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use eventflow_core::fact::Utm;
use eventflow_store::rows::CampaignLinkRow;
use eventflow_store::Store;

/// A tracked campaign link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub client_id: String,
    pub destination: String,
    pub utm: Utm,
}

impl From<CampaignLinkRow> for Link {
    fn from(r: CampaignLinkRow) -> Self {
        let o = |s: String| (!s.is_empty()).then_some(s);
        Link {
            client_id: r.client_id,
            destination: r.destination,
            utm: Utm {
                source: o(r.utm_source),
                medium: o(r.utm_medium),
                campaign: o(r.utm_campaign),
                term: o(r.utm_term),
                content: o(r.utm_content),
            },
        }
    }
}

/// The link cache shared by request handlers.
#[derive(Debug, Clone, Default)]
pub struct Links {
    inner: Arc<RwLock<HashMap<String, Link>>>,
}

impl Links {
    pub fn get(&self, cid: &str) -> Option<Link> {
        self.inner.read().ok()?.get(cid).cloned()
    }

    /// Whether `cid` names a link of `client_id`.
    pub fn resolves(&self, client_id: &str, cid: &str) -> bool {
        self.inner.read().map(|m| m.get(cid).is_some_and(|l| l.client_id == client_id)).unwrap_or(false)
    }

    pub fn replace(&self, links: HashMap<String, Link>) {
        if let Ok(mut m) = self.inner.write() {
            *m = links;
        }
    }

    pub fn len(&self) -> usize {
        self.inner.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refreshes from `store` every `every` until `shutdown`.
    pub async fn refresh_loop(self, store: Store, every: Duration, shutdown: CancellationToken) {
        loop {
            match store.campaign_links().await {
                Ok(rows) => {
                    let map: HashMap<String, Link> = rows.into_iter().map(|r| (r.cid.clone(), Link::from(r))).collect();
                    debug!(links = map.len(), "campaign links refreshed");
                    self.replace(map);
                }
                Err(e) => {
                    warn!(error = %e, "refreshing campaign links failed; keeping the cached copy")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}
