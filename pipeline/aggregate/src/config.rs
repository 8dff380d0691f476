//! `[processor]` configuration.

use serde::{Deserialize, Serialize};

use eventflow_core::time::parse_duration_ms;

/// Stream processor settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessorConfig {
    /// Address of the processor's HTTP listener (`/metrics`, `/healthz`, `/readyz`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Kafka consumer group of all processor instances.
    #[serde(default = "default_group")]
    pub group_id: String,
    /// How long after a client day ends its buckets still accept facts (`48h`). Later facts
    /// are stored raw, counted in `eventflow_processor_late_facts_total` and folded in by backfill.
    /// The collector uses the same value to accept client timestamps.
    #[serde(default = "default_lateness")]
    pub allowed_lateness: String,
    /// Flush to ClickHouse at least this often while facts arrive (`1s`).
    #[serde(default = "default_flush_interval")]
    pub flush_interval: String,
    /// Flush as soon as this many facts are buffered.
    #[serde(default = "default_max_batch")]
    pub max_batch_facts: usize,
    /// Name reported in `processor_progress` (default: host name and process id).
    #[serde(default)]
    pub instance: Option<String>,
    /// Fold late facts into their days automatically (backfill of pending client days) this
    /// often; `0s` turns it off.
    #[serde(default = "default_fold_interval")]
    pub fold_late_interval: String,
    /// Reconcile recent days continuously this often (`0s` turns it off).
    #[serde(default = "default_reconcile_interval")]
    pub reconcile_interval: String,
    /// How many recent client days the continuous reconcile checks.
    #[serde(default = "default_reconcile_days")]
    pub reconcile_days: u32,
    /// A partition with a backlog whose committed offsets have not moved for this long, and
    /// that this instance does not own, is orphaned: the instance rejoins the group.
    #[serde(default = "default_orphan_after")]
    pub orphan_after: String,
    /// At most one forced rejoin this often.
    #[serde(default = "default_rejoin_backoff")]
    pub rejoin_backoff: String,
    /// Most clients with their own `eventflow_visits_today` and `eventflow_reconcile_mismatch`
    /// series. Configured clients always have one; other clients fill the remaining places (by
    /// most visits today, resp. most differing figures), the rest are summed into one series
    /// `client="_other"` and counted in `eventflow_visits_today_clients_folded` /
    /// `eventflow_reconcile_clients_folded`.
    #[serde(default = "default_max_clients")]
    pub metrics_max_clients: usize,
    /// Most clients one continuous-reconcile pass checks. Configured clients are checked in
    /// every pass; the other clients with facts take the remaining places in turns, so each is
    /// checked every few passes (those left for a later pass: `eventflow_reconcile_clients_deferred`).
    #[serde(default = "default_max_clients")]
    pub reconcile_max_clients: usize,
}

fn default_listen() -> String {
    "127.0.0.1:8082".to_owned()
}
fn default_group() -> String {
    "eventflow-processor".to_owned()
}
fn default_lateness() -> String {
    "48h".to_owned()
}
fn default_flush_interval() -> String {
    "1s".to_owned()
}
fn default_max_batch() -> usize {
    50_000
}
fn default_fold_interval() -> String {
    "5m".to_owned()
}
fn default_reconcile_interval() -> String {
    "10m".to_owned()
}
fn default_reconcile_days() -> u32 {
    3
}
fn default_orphan_after() -> String {
    "30s".to_owned()
}
fn default_rejoin_backoff() -> String {
    "60s".to_owned()
}
fn default_max_clients() -> usize {
    1000
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            group_id: default_group(),
            allowed_lateness: default_lateness(),
            flush_interval: default_flush_interval(),
            max_batch_facts: default_max_batch(),
            instance: None,
            fold_late_interval: default_fold_interval(),
            reconcile_interval: default_reconcile_interval(),
            reconcile_days: default_reconcile_days(),
            orphan_after: default_orphan_after(),
            rejoin_backoff: default_rejoin_backoff(),
            metrics_max_clients: default_max_clients(),
            reconcile_max_clients: default_max_clients(),
        }
    }
}

/// A configuration value that is not a valid duration.
#[derive(Debug, thiserror::Error)]
#[error("processor.{key} = {value:?} is not a duration like 48h, 1s or 500ms")]
pub struct DurationError {
    pub key: &'static str,
    pub value: String,
}

fn duration(key: &'static str, value: &str) -> Result<i64, DurationError> {
    parse_duration_ms(value).ok_or_else(|| DurationError { key, value: value.to_owned() })
}

impl ProcessorConfig {
    pub fn allowed_lateness_ms(&self) -> Result<i64, DurationError> {
        duration("allowed_lateness", &self.allowed_lateness)
    }
    pub fn flush_interval_ms(&self) -> Result<i64, DurationError> {
        duration("flush_interval", &self.flush_interval)
    }
    pub fn fold_late_interval_ms(&self) -> Result<i64, DurationError> {
        duration("fold_late_interval", &self.fold_late_interval)
    }
    pub fn reconcile_interval_ms(&self) -> Result<i64, DurationError> {
        duration("reconcile_interval", &self.reconcile_interval)
    }
    pub fn orphan_after_ms(&self) -> Result<i64, DurationError> {
        duration("orphan_after", &self.orphan_after)
    }
    pub fn rejoin_backoff_ms(&self) -> Result<i64, DurationError> {
        duration("rejoin_backoff", &self.rejoin_backoff)
    }

    /// Checks every duration once at start-up.
    pub fn validate(&self) -> Result<(), DurationError> {
        self.allowed_lateness_ms()?;
        self.flush_interval_ms()?;
        self.fold_late_interval_ms()?;
        self.reconcile_interval_ms()?;
        self.orphan_after_ms()?;
        self.rejoin_backoff_ms()?;
        Ok(())
    }

    pub fn instance_name(&self) -> String {
        self.instance.clone().unwrap_or_else(|| {
            let host =
                std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "host".into());
            format!("{host}-{}", std::process::id())
        })
    }
}
