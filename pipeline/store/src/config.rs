//! `[clickhouse]` configuration.

use serde::{Deserialize, Serialize};

/// Where the EventFlow database lives.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP interface of the server (`EVENTFLOW__CLICKHOUSE__URL`).
    #[serde(default = "default_url")]
    pub url: String,
    /// Database holding EventFlow's tables; created by `eventflow migrate`.
    #[serde(default = "default_database")]
    pub database: String,
    /// User name.
    #[serde(default = "default_user")]
    pub user: String,
    /// Password (prefer the `EVENTFLOW__CLICKHOUSE__PASSWORD` environment override).
    #[serde(default)]
    pub password: String,
    /// Upper bound for one request (insert or query), in milliseconds.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Name of the ClickHouse cluster when the cluster variant of the schema is used
    /// (`eventflow migrate --cluster`): inserts then go synchronously through the Distributed
    /// tables (`insert_distributed_sync = 1`). See sql/cluster/README.md.
    #[serde(default)]
    pub cluster: Option<String>,
}

fn default_url() -> String {
    "http://127.0.0.1:8123".to_owned()
}

fn default_database() -> String {
    "eventflow".to_owned()
}

fn default_user() -> String {
    "default".to_owned()
}

fn default_request_timeout_ms() -> u64 {
    30_000
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: default_url(),
            database: default_database(),
            user: default_user(),
            password: String::new(),
            request_timeout_ms: default_request_timeout_ms(),
            cluster: None,
        }
    }
}

impl ClickHouseConfig {
    /// A client without a default database (migrations create it first).
    ///
    /// Validation is off: it needs `RowBinaryWithNamesAndTypes`, which ClickHouse 18.16 lacks;
    /// row types are instead checked against both engines by the portability tests.
    pub fn client(&self) -> clickhouse::Client {
        let mut client = clickhouse::Client::default().with_url(&self.url).with_user(&self.user).with_validation(false);
        if !self.password.is_empty() {
            client = client.with_password(&self.password);
        }
        if self.cluster.is_some() {
            // The facts of a partition and its checkpoint must be on their shard when the
            // INSERT returns (ADR 0002).
            client = client.with_setting("insert_distributed_sync", "1");
        }
        client
    }
}
