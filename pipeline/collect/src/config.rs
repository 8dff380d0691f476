//! `[collector]` configuration.
//!
//! Durations and sizes are typed ([`ConfigDuration`], [`ConfigSize`]): a malformed value fails
//! when the configuration is loaded, not when the collector first uses it, and so do the
//! combinations [`CollectorConfig::validate`] checks.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
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
    /// Bytes awaiting delivery to Kafka that a request may not take the spool beyond: it gets
    /// `503` + `Retry-After` instead (`1GiB`; keep it below the volume's size).
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: ConfigSize,
    /// Share of `spool_max_bytes` one client may hold (`0.5`): a client whose facts fill its
    /// share gets `503` (`spool_client_share`) while the others are still acknowledged.
    #[serde(default = "default_spool_client_share")]
    pub spool_client_share: f64,
    /// Size of one spool segment file.
    #[serde(default = "default_segment_bytes")]
    pub spool_segment_bytes: ConfigSize,
    /// Largest request head (request line and headers, `32KiB`); a larger one gets `431`.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: ConfigSize,
    /// How long a client may take to send a request's head, and how long an idle keep-alive
    /// connection stays open (`10s`).
    #[serde(default = "default_header_timeout")]
    pub header_timeout: ConfigDuration,
    /// How long a client may take to send a request's body, in total (`10s`); then `408`.
    #[serde(default = "default_body_timeout")]
    pub body_timeout: ConfigDuration,
    /// Connections held at once (`1024`). A connection beyond it closes the oldest one (at once
    /// when it is idle, after its request otherwise), so a flood of idle connections cannot keep
    /// a visitor out.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
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
    /// Requests per second per source address (an IPv6 source is its /64).
    #[serde(default = "default_ip_limit")]
    pub rate_limit_per_ip: Limit,
    /// Facts per second per source address: one address sending 100-fact batches uses up its
    /// own budget, not its tenant's.
    #[serde(default = "default_ip_fact_limit")]
    pub fact_rate_limit_per_ip: Limit,
    /// Facts per second per client id.
    #[serde(default = "default_client_limit")]
    pub rate_limit_per_client: Limit,
    /// Requests per second per client id (a request counts for every client it has facts of).
    #[serde(default = "default_client_request_limit")]
    pub request_rate_limit_per_client: Limit,
    /// Keys each rate limit remembers (`100000`); the least recently seen is forgotten first, in
    /// O(1). Forgetting a key gives it a fresh budget, so keep this above the number of
    /// addresses active within a burst's refill time.
    #[serde(default = "default_rate_limit_keys")]
    pub rate_limit_keys: usize,
    /// Read the source address from `X-Forwarded-For` when the connection comes from one of
    /// `trusted_proxies`: the rightmost address that is not a trusted proxy.
    #[serde(default)]
    pub trust_forwarded_for: bool,
    /// Networks of the proxies whose `X-Forwarded-For` is believed (default: loopback and the
    /// private ranges, where ingress controllers and load balancers live).
    #[serde(default = "default_trusted_proxies")]
    pub trusted_proxies: Vec<IpNet>,
    /// Clients with their own series in the per-client metrics (`1000`, configured clients
    /// included and always present); facts of the others are counted under `client="_other"`.
    #[serde(default = "default_max_client_series")]
    pub max_client_series: usize,
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
    /// How often the clicks on known campaign links (`GET /r/{cid}`) counted in memory are
    /// written to ClickHouse (`link_clicks`, `5s`). Clicks counted since the last write are lost
    /// if the collector crashes; a graceful stop writes them.
    #[serde(default = "default_link_clicks_flush")]
    pub link_clicks_flush: ConfigDuration,
    /// Most (client, link, UTC minute) click counts held in memory (`100000`); a click needing a
    /// new one beyond that is not recorded per link (`eventflow_collector_link_clicks_dropped_total`).
    /// A count leaves memory once written and its minute is over, so this is only reached with
    /// that many links clicked within two minutes, or while ClickHouse refuses the writes.
    #[serde(default = "default_link_clicks_max_entries")]
    pub link_clicks_max_entries: usize,
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
fn default_spool_max_bytes() -> ConfigSize {
    ConfigSize(1 << 30)
}
fn default_spool_client_share() -> f64 {
    0.5
}
fn default_segment_bytes() -> ConfigSize {
    ConfigSize(64 << 20)
}
fn default_max_header_bytes() -> ConfigSize {
    ConfigSize(32 << 10)
}
fn default_header_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(10)
}
fn default_body_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(10)
}
fn default_max_connections() -> usize {
    1024
}
fn default_ip_fact_limit() -> Limit {
    Limit { per_second: 200.0, burst: 2000.0 }
}
fn default_client_request_limit() -> Limit {
    Limit { per_second: 5000.0, burst: 50_000.0 }
}
fn default_rate_limit_keys() -> usize {
    100_000
}
fn default_trusted_proxies() -> Vec<IpNet> {
    ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect()
}
fn default_max_client_series() -> usize {
    1000
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
fn default_link_clicks_flush() -> ConfigDuration {
    ConfigDuration::from_secs(5)
}
fn default_link_clicks_max_entries() -> usize {
    100_000
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
            spool_client_share: default_spool_client_share(),
            spool_segment_bytes: default_segment_bytes(),
            max_header_bytes: default_max_header_bytes(),
            header_timeout: default_header_timeout(),
            body_timeout: default_body_timeout(),
            max_connections: default_max_connections(),
            allowed_origins: default_origins(),
            cookie_domain: None,
            cookie_secure: false,
            session_lifetime: default_session_lifetime(),
            rate_limit_per_ip: default_ip_limit(),
            fact_rate_limit_per_ip: default_ip_fact_limit(),
            rate_limit_per_client: default_client_limit(),
            request_rate_limit_per_client: default_client_request_limit(),
            rate_limit_keys: default_rate_limit_keys(),
            trust_forwarded_for: false,
            trusted_proxies: default_trusted_proxies(),
            max_client_series: default_max_client_series(),
            links_refresh: default_links_refresh(),
            links_lookup_timeout: default_links_lookup_timeout(),
            links_lookup_concurrency: default_links_lookup_concurrency(),
            links_lookup_rate: default_links_lookup_rate(),
            links_negative_ttl: default_links_negative_ttl(),
            links_negative_entries: default_links_negative_entries(),
            link_clicks_flush: default_link_clicks_flush(),
            link_clicks_max_entries: default_link_clicks_max_entries(),
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
        if self.link_clicks_flush.get().is_zero() {
            return Err("collector.link_clicks_flush must be longer than 0s".to_owned());
        }
        if self.link_clicks_max_entries == 0 {
            return Err("collector.link_clicks_max_entries must be at least 1".to_owned());
        }
        for (name, d) in [("header_timeout", self.header_timeout), ("body_timeout", self.body_timeout)] {
            if d.get().is_zero() {
                return Err(format!("collector.{name} must be longer than 0s"));
            }
        }
        let header = self.max_header_bytes.get();
        if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&header) {
            return Err(format!(
                "collector.max_header_bytes = {} must be between {} and {}",
                self.max_header_bytes,
                ConfigSize(MIN_HEADER_BYTES),
                ConfigSize(MAX_HEADER_BYTES)
            ));
        }
        if self.max_connections == 0 {
            return Err("collector.max_connections must be at least 1".to_owned());
        }
        if !(self.spool_client_share > 0.0 && self.spool_client_share <= 1.0) {
            return Err(format!("collector.spool_client_share = {} must be in (0, 1]", self.spool_client_share));
        }
        if self.spool_max_bytes.get() == 0 || self.spool_segment_bytes.get() == 0 {
            return Err("collector.spool_max_bytes and spool_segment_bytes must be above 0".to_owned());
        }
        if self.rate_limit_keys == 0 {
            return Err("collector.rate_limit_keys must be at least 1".to_owned());
        }
        for (name, limit) in [
            ("rate_limit_per_ip", self.rate_limit_per_ip),
            ("fact_rate_limit_per_ip", self.fact_rate_limit_per_ip),
            ("rate_limit_per_client", self.rate_limit_per_client),
            ("request_rate_limit_per_client", self.request_rate_limit_per_client),
            ("links_lookup_rate", self.links_lookup_rate),
        ] {
            limit.validate().map_err(|e| format!("collector.{name}: {e}"))?;
        }
        Ok(())
    }

    /// Whether `addr` is in one of `trusted_proxies`.
    pub fn is_trusted_proxy(&self, addr: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&addr))
    }
}

/// Bounds of `max_header_bytes`: hyper needs room for a request line and a few headers; above
/// 1 MiB a header limit protects nothing.
const MIN_HEADER_BYTES: u64 = 4 << 10;
const MAX_HEADER_BYTES: u64 = 1 << 20;

/// A size in bytes, written as a whole number of bytes (`1073741824`) or with a unit: `512B`,
/// `32KiB`, `64MiB`, `1GiB` (powers of 1024) or `32KB`, `64MB`, `1GB` (powers of 1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConfigSize(u64);

impl ConfigSize {
    pub const fn from_bytes(bytes: u64) -> Self {
        Self(bytes)
    }

    pub const fn get(self) -> u64 {
        self.0
    }
}

impl FromStr for ConfigSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let multiplier: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => u64::MAX,
        };
        digits
            .parse::<u64>()
            .ok()
            .filter(|_| multiplier != u64::MAX)
            .and_then(|n| n.checked_mul(multiplier))
            .map(ConfigSize)
            .ok_or_else(|| format!("{s:?} is not a size (bytes, or a whole number and B, KiB, MiB, GiB, KB, MB or GB)"))
    }
}

impl fmt::Display for ConfigSize {
    /// The largest binary unit that writes the value exactly, so it reads back the same.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if self.0 > 0 && self.0 % size == 0 {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ConfigSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConfigSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Bytes(n) => Ok(ConfigSize(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
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
        assert_eq!(c.link_clicks_flush.get(), Duration::from_secs(5));
        let c: CollectorConfig =
            serde_json::from_str(r#"{"link_clicks_flush": "250ms"}"#).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.link_clicks_flush.get(), Duration::from_millis(250));
        assert!(serde_json::from_str::<CollectorConfig>(r#"{"link_clicks_flush": "5"}"#).is_err());
        let err = serde_json::from_str::<CollectorConfig>(r#"{"session_lifetime": "half an hour"}"#)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("half an hour"), "{err}");
    }

    #[test]
    fn sizes_parse_print_and_fail_at_load() {
        for (text, bytes) in [
            ("0", 0),
            ("1073741824", 1 << 30),
            ("512B", 512),
            ("32KiB", 32 * 1024),
            ("64MiB", 64 << 20),
            ("1GiB", 1 << 30),
            ("32KB", 32_000),
            ("2GB", 2_000_000_000),
        ] {
            let s: ConfigSize = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(s.get(), bytes, "{text}");
            assert_eq!(s.to_string().parse::<ConfigSize>(), Ok(s), "{text} prints as {s}");
        }
        for bad in ["", "KiB", "1.5GiB", "-1", "10 parsecs", "99999999999999999999"] {
            assert!(bad.parse::<ConfigSize>().is_err(), "{bad:?} accepted");
        }
        let c: CollectorConfig = serde_json::from_str(r#"{"spool_max_bytes": 1048576, "max_header_bytes": "16KiB"}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((c.spool_max_bytes.get(), c.max_header_bytes.get()), (1 << 20, 16 << 10));
        assert!(serde_json::from_str::<CollectorConfig>(r#"{"max_header_bytes": "lots"}"#).is_err());
    }

    #[test]
    fn bad_combinations_fail_at_load() {
        let ok = CollectorConfig::default();
        let bad = [
            CollectorConfig { max_header_bytes: ConfigSize(100), ..ok.clone() },
            CollectorConfig { max_header_bytes: ConfigSize(10 << 20), ..ok.clone() },
            CollectorConfig { header_timeout: ConfigDuration::from_millis(0), ..ok.clone() },
            CollectorConfig { body_timeout: ConfigDuration::from_millis(0), ..ok.clone() },
            CollectorConfig { max_connections: 0, ..ok.clone() },
            CollectorConfig { spool_client_share: 0.0, ..ok.clone() },
            CollectorConfig { spool_client_share: 1.5, ..ok.clone() },
            CollectorConfig { rate_limit_keys: 0, ..ok.clone() },
            CollectorConfig { link_clicks_flush: ConfigDuration::from_millis(0), ..ok.clone() },
            CollectorConfig { link_clicks_max_entries: 0, ..ok.clone() },
            CollectorConfig { fact_rate_limit_per_ip: Limit { per_second: 5.0, burst: 0.0 }, ..ok.clone() },
            CollectorConfig { rate_limit_per_ip: Limit { per_second: -1.0, burst: 5.0 }, ..ok.clone() },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
        assert!(ok.is_trusted_proxy("10.1.2.3".parse().unwrap()));
        assert!(ok.is_trusted_proxy("::1".parse().unwrap()));
        assert!(!ok.is_trusted_proxy("203.0.113.9".parse().unwrap()));
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
