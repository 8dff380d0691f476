//! Background work of the processor besides consuming: folding late facts into their days
//! (automatic backfill) and reconciling recent days continuously.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use eventflow_core::{time, ClientDirectory};
use eventflow_store::recount::Scope;
use eventflow_store::Store;

use crate::metrics::ProcessorMetrics;
use crate::{backfill, reconcile};

/// Settings of the background loops (from `[processor]`).
#[derive(Debug, Clone, Copy)]
pub struct MaintenanceConfig {
    /// 0 disables late folding.
    pub fold_every: Duration,
    /// 0 disables continuous reconcile.
    pub reconcile_every: Duration,
    pub reconcile_days: u32,
}

/// Runs both loops until `shutdown`.
pub async fn run(
    store: Store,
    clients: Arc<ClientDirectory>,
    metrics: ProcessorMetrics,
    cfg: MaintenanceConfig,
    shutdown: CancellationToken,
) {
    let fold = async {
        if cfg.fold_every.is_zero() {
            return;
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(cfg.fold_every) => {}
            }
            if let Err(e) = fold_late(&store, &clients).await {
                warn!(error = %e, "folding late facts failed; will retry");
            }
        }
    };
    let reconcile = async {
        if cfg.reconcile_every.is_zero() {
            return;
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(cfg.reconcile_every) => {}
            }
            if let Err(e) = reconcile_recent(&store, &clients, &metrics, cfg.reconcile_days).await {
                warn!(error = %e, "continuous reconcile failed; will retry");
            }
        }
    };
    tokio::join!(fold, reconcile);
}

/// Backfills every client day that has late facts not yet folded in.
pub async fn fold_late(store: &Store, clients: &ClientDirectory) -> Result<usize, eventflow_store::StoreError> {
    let pending = store.all_pending_late_days().await?;
    for (client, day) in &pending {
        let day = time::day_from_number(*day);
        let scope = Scope { client_id: client.clone(), from: day, to: day, tz: clients.timezone(client), cid: None };
        let report = backfill::backfill_scope(store, &scope).await?;
        info!(client = %client, day = %time::format_day(day), rows = report.rows_written, "late facts folded in");
    }
    Ok(pending.len())
}

/// Reconciles the last `days` client days of every client, updates the mismatch gauges and
/// records the result of every client day in `reconcile_findings` (read by the reader API).
/// A difference must show up in two passes 10 s apart to count (a flush can land between the
/// aggregate and the raw reads of one pass).
pub async fn reconcile_recent(
    store: &Store,
    clients: &ClientDirectory,
    metrics: &ProcessorMetrics,
    days: u32,
) -> Result<(), eventflow_store::StoreError> {
    let now = Utc::now().timestamp_millis();
    let widest_from = time::client_day(now, chrono_tz::Etc::GMTPlus12) - chrono::Duration::days(i64::from(days));
    let widest_to = time::client_day(now, chrono_tz::Etc::GMTMinus14);
    let mut ids: BTreeSet<String> = clients.clients().map(|c| c.to_string()).collect();
    ids.extend(store.clients_with_facts(widest_from, widest_to).await?);
    for client in ids {
        let tz = clients.timezone(&client);
        let to = time::client_day(now, tz);
        let from = to - chrono::Duration::days(i64::from(days.max(1)) - 1);
        let mut checked_ms = Utc::now().timestamp_millis();
        let first = reconcile::client(store, &client, tz, from, to).await?;
        let confirmed = if first.is_empty() {
            first
        } else {
            tokio::time::sleep(Duration::from_secs(10)).await;
            checked_ms = Utc::now().timestamp_millis();
            let second = reconcile::client(store, &client, tz, from, to).await?;
            second
                .into_iter()
                .filter(|m| first.iter().any(|f| f.day == m.day && f.metric == m.metric && f.key == m.key))
                .collect()
        };
        let findings = reconcile::findings(&client, from, to, u64::try_from(checked_ms).unwrap_or(0), &confirmed);
        let (pending, real): (Vec<_>, Vec<_>) = confirmed.into_iter().partition(|m| m.pending_backfill);
        for (metric, n) in reconcile::counts(&real) {
            metrics.reconcile_mismatch.with_label_values(&[client.as_str(), metric]).set(n as f64);
        }
        metrics.reconcile_mismatch.with_label_values(&[client.as_str(), "pending_backfill"]).set(pending.len() as f64);
        for m in real.iter().take(20) {
            warn!(event = "ReconcileMismatch", client_id = %m.client, metric = m.metric, detail = %m, "aggregate differs from raw recount");
        }
        // Every day checked gets a row (after the gauges, which alerting relies on): the reader
        // API names the days whose newest check found differences.
        store.record_reconcile_findings(&findings).await?;
    }
    metrics.reconcile_last_run.set(Utc::now().timestamp_millis() as f64 / 1000.0);
    Ok(())
}
