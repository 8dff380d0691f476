//! `[collector]` configuration.

use serde::{Deserialize, Serialize};

use crate::ratelimit::Limit;

/// Edge collector settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// Address of the HTTP listener (`EVENTFLOW__COLLECTOR__LISTEN`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Directory of the durable spool. Must be on local disk and survive restarts.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: String,
    /// Bytes awaiting delivery to Kafka above which requests get `503` + `Retry-After`.
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: u64,
    /// Size of one spool segment file.
    #[serde(default = "default_segment_bytes")]
    pub spool_segment_bytes: u64,
    /// Origins allowed to send beacons with cookies (CORS). `"*"` allows any origin.
    #[serde(default = "default_origins")]
    pub allowed_origins: Vec<String>,
    /// `Domain` attribute of `ef_sid` / `ef_utm` (e.g. `example.com` to share them with pages on
    /// `www.example.com` when the collector runs on `collect.example.com`).
    #[serde(default)]
    pub cookie_domain: Option<String>,
    /// Add `Secure` to cookies (set this when the collector is served over HTTPS).
    #[serde(default)]
    pub cookie_secure: bool,
    /// Requests per second per client IP.
    #[serde(default = "default_ip_limit")]
    pub rate_limit_per_ip: Limit,
    /// Facts per second per client id.
    #[serde(default = "default_client_limit")]
    pub rate_limit_per_client: Limit,
    /// Take the client IP from the first `X-Forwarded-For` entry (only behind a trusted proxy).
    #[serde(default)]
    pub trust_forwarded_for: bool,
    /// How often the campaign-link cache is refreshed from ClickHouse (`60s`).
    #[serde(default = "default_links_refresh")]
    pub links_refresh: String,
    /// On shutdown, how long in-flight facts may take to reach Kafka before the collector exits
    /// (the rest stays in the spool).
    #[serde(default = "default_grace")]
    pub shutdown_grace: String,
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}
fn default_spool_dir() -> String {
    "data/spool".to_owned()
}
fn default_spool_max_bytes() -> u64 {
    1 << 30
}
fn default_segment_bytes() -> u64 {
    64 << 20
}
fn default_origins() -> Vec<String> {
    vec!["*".to_owned()]
}
fn default_ip_limit() -> Limit {
    Limit { per_second: 50.0, burst: 500.0 }
}
fn default_client_limit() -> Limit {
    Limit { per_second: 5000.0, burst: 50_000.0 }
}
fn default_links_refresh() -> String {
    "60s".to_owned()
}
fn default_grace() -> String {
    "5s".to_owned()
}

impl Default for CollectorConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            spool_dir: default_spool_dir(),
            spool_max_bytes: default_spool_max_bytes(),
            spool_segment_bytes: default_segment_bytes(),
            allowed_origins: default_origins(),
            cookie_domain: None,
            cookie_secure: false,
            rate_limit_per_ip: default_ip_limit(),
            rate_limit_per_client: default_client_limit(),
            trust_forwarded_for: false,
            links_refresh: default_links_refresh(),
            shutdown_grace: default_grace(),
        }
    }
}
