//! `[collector]` configuration.
//!
//! Durations are typed ([`ConfigDuration`]): a malformed value fails when the configuration is
//! loaded, not when the collector first uses it.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
    /// Session lifetime (`30m`, CONTRACT.md §2): `Max-Age` of the sliding `ef_sid` cookie, and how
    /// long the tracker keeps a tab's session between two tracked pages (at least `1s`).
    #[serde(default = "default_session_lifetime")]
    pub session_lifetime: ConfigDuration,
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
    pub links_refresh: ConfigDuration,
    /// A `cid` missing from the cache is looked up in ClickHouse before it is called unknown;
    /// this long at most (`1s`), after which it is treated as unknown for this request.
    #[serde(default = "default_links_lookup_timeout")]
    pub links_lookup_timeout: ConfigDuration,
    /// Lookups of missing `cid`s running at once, over all requests (`4`; `0` turns lookups off:
    /// only the refreshed cache is used).
    #[serde(default = "default_links_lookup_concurrency")]
    pub links_lookup_concurrency: usize,
    /// Lookups started per second, over all requests (`20`, burst `50`): random `cid`s cannot
    /// turn every request into a ClickHouse query.
    #[serde(default = "default_links_lookup_rate")]
    pub links_lookup_rate: Limit,
    /// How long a `cid` that ClickHouse did not know is answered as unknown without asking again
    /// (`5s`).
    #[serde(default = "default_links_negative_ttl")]
    pub links_negative_ttl: ConfigDuration,
    /// Most `cid`s remembered as unknown (`10000`); the oldest is forgotten first.
    #[serde(default = "default_links_negative_entries")]
    pub links_negative_entries: usize,
    /// On shutdown, how long in-flight facts may take to reach Kafka before the collector exits
    /// (the rest stays in the spool).
    #[serde(default = "default_grace")]
    pub shutdown_grace: ConfigDuration,
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
fn default_session_lifetime() -> ConfigDuration {
    ConfigDuration::from_secs(30 * 60)
}
fn default_ip_limit() -> Limit {
    Limit { per_second: 50.0, burst: 500.0 }
}
fn default_client_limit() -> Limit {
    Limit { per_second: 5000.0, burst: 50_000.0 }
}
fn default_links_refresh() -> ConfigDuration {
    ConfigDuration::from_secs(60)
}
fn default_links_lookup_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(1)
}
fn default_links_lookup_concurrency() -> usize {
    4
}
fn default_links_lookup_rate() -> Limit {
    Limit { per_second: 20.0, burst: 50.0 }
}
fn default_links_negative_ttl() -> ConfigDuration {
    ConfigDuration::from_secs(5)
}
fn default_links_negative_entries() -> usize {
    10_000
}
fn default_grace() -> ConfigDuration {
    ConfigDuration::from_secs(5)
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
            session_lifetime: default_session_lifetime(),
            rate_limit_per_ip: default_ip_limit(),
            rate_limit_per_client: default_client_limit(),
            trust_forwarded_for: false,
            links_refresh: default_links_refresh(),
            links_lookup_timeout: default_links_lookup_timeout(),
            links_lookup_concurrency: default_links_lookup_concurrency(),
            links_lookup_rate: default_links_lookup_rate(),
            links_negative_ttl: default_links_negative_ttl(),
            links_negative_entries: default_links_negative_entries(),
            shutdown_grace: default_grace(),
        }
    }
}

impl CollectorConfig {
    /// Checks the combinations serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.session_lifetime.get() < Duration::from_secs(1) {
            return Err(format!("collector.session_lifetime = {} is shorter than 1s", self.session_lifetime));
        }
        if self.links_refresh.get().is_zero() {
            return Err("collector.links_refresh must be longer than 0s".to_owned());
        }
        Ok(())
    }
}

/// A duration written as a whole number and a unit: `1500ms`, `30s`, `30m`, `48h`, `2d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConfigDuration(Duration);

impl ConfigDuration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    pub const fn from_millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }

    pub const fn get(self) -> Duration {
        self.0
    }
}

impl From<ConfigDuration> for Duration {
    fn from(d: ConfigDuration) -> Duration {
        d.0
    }
}

impl FromStr for ConfigDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        eventflow_core::time::parse_duration_ms(s)
            .and_then(|ms| u64::try_from(ms).ok())
            .map(ConfigDuration::from_millis)
            .ok_or_else(|| format!("{s:?} is not a duration (a whole number and ms, s, m, h or d, e.g. \"30s\")"))
    }
}

impl fmt::Display for ConfigDuration {
    /// The largest unit that writes the value exactly, so it reads back the same.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
            if ms > 0 && ms % size == 0 {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for ConfigDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_print_and_fail_at_load() {
        for (text, ms) in
            [("1500ms", 1500), ("4s", 4000), ("30m", 1_800_000), ("48h", 172_800_000), ("2d", 172_800_000)]
        {
            let d: ConfigDuration = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(d.get(), Duration::from_millis(ms), "{text}");
            assert_eq!(d.to_string().parse::<ConfigDuration>(), Ok(d), "{text} prints as {d}");
        }
        assert_eq!(ConfigDuration::from_secs(90).to_string(), "90s");
        assert_eq!(ConfigDuration::from_millis(0).to_string(), "0ms");
        for bad in ["", "30", "s", "30 minutes", "-5s", "1.5s"] {
            assert!(bad.parse::<ConfigDuration>().is_err(), "{bad:?} accepted");
        }
        let c: CollectorConfig =
            serde_json::from_str(r#"{"session_lifetime": "4s"}"#).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.session_lifetime.get(), Duration::from_secs(4));
        assert_eq!(c.links_refresh.get(), Duration::from_secs(60));
        let err = serde_json::from_str::<CollectorConfig>(r#"{"session_lifetime": "half an hour"}"#)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("half an hour"), "{err}");
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = CollectorConfig::default();
        assert_eq!(c.session_lifetime.get(), Duration::from_secs(30 * 60));
        assert_eq!(c.validate(), Ok(()));
        let short =
            CollectorConfig { session_lifetime: ConfigDuration::from_millis(500), ..CollectorConfig::default() };
        assert!(short.validate().is_err());
    }
}
