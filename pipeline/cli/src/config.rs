//! The configuration file plus `EVENTFLOW__SECTION__KEY` environment overrides.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use serde::Deserialize;

use eventflow_aggregate::ProcessorConfig;
use eventflow_collect::CollectorConfig;
use eventflow_core::{ClientDirectory, ClientSettings, TenancyConfig};
use eventflow_serve::ApiConfig;
use eventflow_store::ClickHouseConfig;
use eventflow_topics::KafkaConfig;

/// `[telemetry]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `json` (one object per line, for log shippers) or `text`.
    #[serde(default = "default_format")]
    pub log_format: String,
    /// `tracing` filter, e.g. `info` or `info,eventflow_aggregate=debug` (`RUST_LOG` wins).
    #[serde(default = "default_level")]
    pub log_level: String,
}

fn default_format() -> String {
    "json".to_owned()
}
fn default_level() -> String {
    "info".to_owned()
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { log_format: default_format(), log_level: default_level() }
    }
}

/// The whole configuration (see `deploy/eventflow.example.toml`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub collector: CollectorConfig,
    #[serde(default)]
    pub processor: ProcessorConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub clickhouse: ClickHouseConfig,
    #[serde(default)]
    pub tenancy: TenancyConfig,
    #[serde(default)]
    pub clients: BTreeMap<String, ClientSettings>,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// A loaded configuration and whether `kafka.brokers` was set explicitly (file or environment):
/// `eventflow dev` uses its embedded broker only when it was not.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub explicit_brokers: bool,
}

/// Loads `file` (if given) and applies `EVENTFLOW__SECTION__KEY` overrides, then validates
/// everything that can be checked before starting.
pub fn load(file: Option<&Path>) -> anyhow::Result<Loaded> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml).required(true));
    }
    builder = builder.add_source(
        config::Environment::with_prefix("EVENTFLOW")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("collector.allowed_origins")
            .with_list_parse_key("collector.trusted_proxies"),
    );
    let raw = builder.build().context("reading configuration")?;
    let explicit_brokers = raw.get_string("kafka.brokers").is_ok();
    let config: Config = raw.try_deserialize().context("invalid configuration")?;
    config.collector.validate().map_err(anyhow::Error::msg).context("invalid [collector] configuration")?;
    config.processor.validate().context("invalid [processor] configuration")?;
    ClientDirectory::new(&config.tenancy, &config.clients).context("invalid [tenancy] or [clients] configuration")?;
    if config.kafka.partitions < 1 {
        anyhow::bail!("kafka.partitions must be at least 1");
    }
    Ok(Loaded { config, explicit_brokers })
}

impl Config {
    pub fn clients(&self) -> anyhow::Result<ClientDirectory> {
        Ok(ClientDirectory::new(&self.tenancy, &self.clients)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::default();
        assert_eq!(c.collector.listen, "127.0.0.1:8080");
        assert_eq!(c.api.listen, "127.0.0.1:8081");
        assert_eq!(c.api.admin_token, None);
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.clickhouse.url, "http://127.0.0.1:8123");
        assert_eq!(c.clickhouse.database, "eventflow");
        assert_eq!(c.processor.allowed_lateness, "48h");
        assert_eq!(c.tenancy.default_timezone, "Asia/Seoul");
    }

    #[test]
    fn the_example_configuration_loads_with_the_defaults() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/eventflow.example.toml");
        let loaded = load(Some(&example)).unwrap();
        let (c, d) = (&loaded.config.collector, eventflow_collect::CollectorConfig::default());
        assert_eq!(c.session_lifetime, d.session_lifetime);
        assert_eq!(c.session_lifetime.get(), std::time::Duration::from_secs(30 * 60));
        assert_eq!(
            (c.links_refresh, c.links_lookup_timeout, c.links_negative_ttl),
            (d.links_refresh, d.links_lookup_timeout, d.links_negative_ttl)
        );
        assert_eq!(
            (c.links_lookup_concurrency, c.links_lookup_rate, c.links_negative_entries),
            (d.links_lookup_concurrency, d.links_lookup_rate, d.links_negative_entries)
        );
        assert_eq!(c.shutdown_grace, d.shutdown_grace);
        assert_eq!(
            (c.spool_max_bytes, c.spool_segment_bytes, c.max_header_bytes, c.header_timeout, c.body_timeout),
            (d.spool_max_bytes, d.spool_segment_bytes, d.max_header_bytes, d.header_timeout, d.body_timeout)
        );
        assert_eq!(
            (c.max_connections, c.spool_client_share, c.rate_limit_keys, c.max_client_series),
            (d.max_connections, d.spool_client_share, d.rate_limit_keys, d.max_client_series)
        );
        assert_eq!(
            (c.rate_limit_per_ip, c.fact_rate_limit_per_ip, c.rate_limit_per_client, c.request_rate_limit_per_client),
            (d.rate_limit_per_ip, d.fact_rate_limit_per_ip, d.rate_limit_per_client, d.request_rate_limit_per_client)
        );
        assert_eq!((c.trust_forwarded_for, &c.trusted_proxies), (d.trust_forwarded_for, &d.trusted_proxies));
        assert!(!loaded.config.tenancy.allow_unknown_clients, "unknown clients are refused by default");
    }

    #[test]
    fn file_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[collector]\nlisten = \"127.0.0.1:9999\"\n[clients.acme]\ntimezone = \"Europe/Berlin\"\n[kafka]\npartitions = 3\n",
        )
        .unwrap();
        // Only this test reads these variables.
        std::env::set_var("EVENTFLOW__API__LISTEN", "127.0.0.1:7777");
        std::env::set_var("EVENTFLOW__CLICKHOUSE__DATABASE", "other_db");
        let loaded = load(Some(&path)).unwrap();
        std::env::remove_var("EVENTFLOW__API__LISTEN");
        std::env::remove_var("EVENTFLOW__CLICKHOUSE__DATABASE");
        assert_eq!(loaded.config.collector.listen, "127.0.0.1:9999");
        assert_eq!(loaded.config.api.listen, "127.0.0.1:7777");
        assert_eq!(loaded.config.clickhouse.database, "other_db");
        assert_eq!(loaded.config.kafka.partitions, 3);
        assert!(!loaded.explicit_brokers);
        assert_eq!(loaded.config.clients().unwrap().timezone("acme"), chrono_tz::Europe::Berlin);

        std::fs::write(&path, "[collector]\nlisten_typo = \"x\"\n").unwrap();
        let err = format!("{:#}", load(Some(&path)).unwrap_err());
        assert!(err.contains("listen_typo"), "{err}");
        // Durations are checked when the configuration is loaded.
        std::fs::write(&path, "[collector]\nsession_lifetime = \"half an hour\"\n").unwrap();
        let err = format!("{:#}", load(Some(&path)).unwrap_err());
        assert!(err.contains("half an hour"), "{err}");
        std::fs::write(&path, "[collector]\nsession_lifetime = \"500ms\"\n").unwrap();
        let err = format!("{:#}", load(Some(&path)).unwrap_err());
        assert!(err.contains("session_lifetime"), "{err}");
    }
}
