//! Background work of the processor besides consuming: folding late facts into their days
//! (automatic backfill) and reconciling recent days continuously.
//!
//! The continuous reconcile is bounded per pass whatever client ids arrive: configured clients
//! are checked in every pass, the other clients with facts share the remaining places of
//! `processor.reconcile_max_clients` in turns (a cursor moves through them from pass to pass),
//! and their mismatch series are capped like `eventflow_visits_today` ([`crate::series`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use eventflow_core::logs::clip_display;
use eventflow_core::metrics::OTHER_CLIENTS;
use eventflow_core::{time, ClientDirectory};
use eventflow_store::recount::Scope;
use eventflow_store::Store;

use crate::metrics::ProcessorMetrics;
use crate::{backfill, reconcile, series};

/// Settings of the background loops (from `[processor]`).
#[derive(Debug, Clone, Copy)]
pub struct MaintenanceConfig {
    /// 0 disables late folding.
    pub fold_every: Duration,
    /// 0 disables continuous reconcile.
    pub reconcile_every: Duration,
    pub reconcile_days: u32,
    /// Most clients one reconcile pass checks (`processor.reconcile_max_clients`).
    pub reconcile_max_clients: usize,
    /// Most clients with their own mismatch series (`processor.metrics_max_clients`).
    pub metrics_max_clients: usize,
}

/// What the continuous reconcile carries from one pass to the next.
#[derive(Debug, Default)]
pub struct ReconcileTurns {
    /// The last unconfigured client checked: the next pass starts after it.
    cursor: Option<String>,
    /// Figures of unconfigured clients that differed at their last check (metric family ->
    /// count, `pending_backfill` included); clean clients are not kept.
    figures: BTreeMap<String, BTreeMap<&'static str, u64>>,
    /// Unconfigured `client` label values exported (so those no longer shown are removed).
    exported: BTreeSet<String>,
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
                metrics.logs.emit(
                    "fold_late_failed",
                    |suppressed| warn!(error = %clip_display(&e), suppressed, "folding late facts failed; will retry"),
                );
            }
        }
    };
    let reconcile = async {
        if cfg.reconcile_every.is_zero() {
            return;
        }
        let mut turns = ReconcileTurns::default();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(cfg.reconcile_every) => {}
            }
            if let Err(e) = reconcile_recent(&store, &clients, &metrics, &cfg, &mut turns).await {
                metrics.logs.emit("reconcile_failed", |suppressed| {
                    warn!(error = %clip_display(&e), suppressed, "continuous reconcile failed; will retry")
                });
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

/// Reconciles the last `reconcile_days` client days of the configured clients and of up to
/// `reconcile_max_clients` clients in all (the others with facts take turns across passes),
/// updates the mismatch gauges and records the result of every client day checked in
/// `reconcile_findings` (read by the reader API). A difference must show up in two passes 10 s
/// apart to count (a flush can land between the aggregate and the raw reads of one pass).
pub async fn reconcile_recent(
    store: &Store,
    clients: &ClientDirectory,
    metrics: &ProcessorMetrics,
    cfg: &MaintenanceConfig,
    turns: &mut ReconcileTurns,
) -> Result<(), eventflow_store::StoreError> {
    let days = cfg.reconcile_days;
    let now = Utc::now().timestamp_millis();
    let widest_from = time::client_day(now, chrono_tz::Etc::GMTPlus12) - chrono::Duration::days(i64::from(days));
    let widest_to = time::client_day(now, chrono_tz::Etc::GMTMinus14);
    let configured: BTreeSet<String> = clients.clients().map(|c| c.to_string()).collect();
    let with_facts: BTreeSet<String> = store.clients_with_facts(widest_from, widest_to).await?.into_iter().collect();
    let others: Vec<&String> = with_facts.iter().filter(|c| !configured.contains(*c)).collect();
    let (checked_others, deferred) =
        in_turns(&others, turns.cursor.as_deref(), cfg.reconcile_max_clients, configured.len());
    metrics.reconcile_deferred.set(i64::try_from(deferred).unwrap_or(i64::MAX));
    if let Some(last) = checked_others.last() {
        turns.cursor = Some((*last).clone());
    }
    let ids: Vec<String> = configured.iter().cloned().chain(checked_others.into_iter().cloned()).collect();
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
        let mut figures = reconcile::counts(&real);
        figures.insert("pending_backfill", pending.len() as u64);
        if configured.contains(&client) {
            for (metric, n) in &figures {
                metrics.reconcile_mismatch.with_label_values(&[client.as_str(), metric]).set(*n as f64);
            }
        } else if figures.values().any(|n| *n > 0) {
            turns.figures.insert(client.clone(), figures);
        } else {
            turns.figures.remove(&client);
        }
        for m in real.iter().take(20) {
            metrics.logs.emit("reconcile_mismatch", |suppressed| {
                warn!(event = "ReconcileMismatch", client_id = %m.client, metric = m.metric, detail = %clip_display(m), suppressed, "aggregate differs from raw recount")
            });
        }
        // Every day checked gets a row (after the gauges, which alerting relies on): the reader
        // API names the days whose newest check found differences.
        store.record_reconcile_findings(&findings).await?;
    }
    // Clients without facts in the window any more have nothing left to differ.
    turns.figures.retain(|c, _| with_facts.contains(c));
    export_unconfigured(metrics, &configured, turns, cfg.metrics_max_clients);
    metrics.reconcile_last_run.set(Utc::now().timestamp_millis() as f64 / 1000.0);
    Ok(())
}

/// The unconfigured clients one pass checks: up to `max_clients - configured` of `others`
/// (sorted), starting after `cursor` and wrapping around; and how many are left for later.
fn in_turns<'a>(
    others: &[&'a String],
    cursor: Option<&str>,
    max_clients: usize,
    configured: usize,
) -> (Vec<&'a String>, usize) {
    let places = max_clients.saturating_sub(configured).min(others.len());
    let start = cursor.map_or(0, |c| others.partition_point(|o| o.as_str() <= c));
    let checked: Vec<&String> = others.iter().cycle().skip(start).take(places).copied().collect();
    (checked, others.len() - places)
}

/// Mismatch series of the unconfigured clients: those differing at their last check, the
/// highest totals up to the series cap with their own series, the rest summed into `_other`.
fn export_unconfigured(
    metrics: &ProcessorMetrics,
    configured: &BTreeSet<String>,
    turns: &mut ReconcileTurns,
    max_series: usize,
) {
    let split = series::split(configured, turns.figures.iter().map(|(c, f)| (c, f.values().sum())), max_series);
    let mut shown = BTreeSet::new();
    for client in &split.own {
        for (metric, n) in &turns.figures[client] {
            metrics.reconcile_mismatch.with_label_values(&[client.as_str(), metric]).set(*n as f64);
        }
        shown.insert(client.clone());
    }
    if !split.folded.is_empty() {
        let mut other: BTreeMap<&'static str, u64> = BTreeMap::new();
        for client in &split.folded {
            for (metric, n) in &turns.figures[client] {
                *other.entry(metric).or_default() += n;
            }
        }
        for (metric, n) in other {
            metrics.reconcile_mismatch.with_label_values(&[OTHER_CLIENTS, metric]).set(n as f64);
        }
        shown.insert(OTHER_CLIENTS.to_owned());
    }
    for gone in turns.exported.difference(&shown) {
        for metric in reconcile::METRICS.iter().copied().chain(["pending_backfill"]) {
            let _ = metrics.reconcile_mismatch.remove_label_values(&[gone.as_str(), metric]);
        }
    }
    metrics.reconcile_folded.set(i64::try_from(split.folded.len()).unwrap_or(i64::MAX));
    turns.exported = shown;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_take_turns_through_the_unconfigured_clients() {
        let names: Vec<String> = (1..=5).map(|i| format!("c{i}")).collect();
        let others: Vec<&String> = names.iter().collect();
        // 2 configured clients and a cap of 4: two places per pass, three deferred.
        let (a, deferred) = in_turns(&others, None, 4, 2);
        assert_eq!((a.iter().map(|s| s.as_str()).collect::<Vec<_>>(), deferred), (vec!["c1", "c2"], 3));
        let (b, _) = in_turns(&others, Some("c2"), 4, 2);
        assert_eq!(b.iter().map(|s| s.as_str()).collect::<Vec<_>>(), ["c3", "c4"]);
        // Wraps around: after c4 come c5 and c1.
        let (c, _) = in_turns(&others, Some("c4"), 4, 2);
        assert_eq!(c.iter().map(|s| s.as_str()).collect::<Vec<_>>(), ["c5", "c1"]);
        // A cursor that vanished (no facts any more) continues with the next id.
        let (d, _) = in_turns(&others, Some("c25"), 4, 2);
        assert_eq!(d.iter().map(|s| s.as_str()).collect::<Vec<_>>(), ["c3", "c4"]);
        // Room for all: each once, nothing deferred.
        let (e, deferred) = in_turns(&others, Some("c3"), 1000, 2);
        assert_eq!((e.len(), deferred), (5, 0));
        // No place left after the configured clients.
        assert_eq!(in_turns(&others, None, 2, 2), (vec![], 5));
    }

    #[test]
    fn mismatch_series_are_capped_with_an_other_bucket() {
        let registry = prometheus::Registry::new();
        let metrics = ProcessorMetrics::new(&registry).unwrap();
        let configured: BTreeSet<String> = ["acme".to_owned()].into();
        let mut turns = ReconcileTurns::default();
        for (client, visits, pending) in [("c1", 3u64, 0u64), ("c2", 1, 1), ("c3", 1, 0)] {
            turns.figures.insert(client.to_owned(), [("visits", visits), ("pending_backfill", pending)].into());
        }
        // Cap 2: acme and c1 (3 differing figures, the most); c2 (2) and c3 (1) summed into _other.
        export_unconfigured(&metrics, &configured, &mut turns, 2);
        let page = eventflow_core::metrics::render(&registry).0;
        let series: Vec<&str> = page.lines().filter(|l| l.starts_with("eventflow_reconcile_mismatch{")).collect();
        assert!(series.contains(&"eventflow_reconcile_mismatch{client=\"c1\",metric=\"visits\"} 3"), "{page}");
        assert!(series.contains(&"eventflow_reconcile_mismatch{client=\"_other\",metric=\"visits\"} 2"), "{page}");
        assert!(series.contains(&"eventflow_reconcile_mismatch{client=\"_other\",metric=\"pending_backfill\"} 1"));
        assert_eq!(series.len(), 4, "{page}");
        assert!(page.contains("eventflow_reconcile_clients_folded 2"), "{page}");
        // c1 found clean: its series go, c2 takes its place, c3 alone is folded.
        turns.figures.remove("c1");
        export_unconfigured(&metrics, &configured, &mut turns, 2);
        let page = eventflow_core::metrics::render(&registry).0;
        let mut series: Vec<&str> = page.lines().filter(|l| l.starts_with("eventflow_reconcile_mismatch{")).collect();
        series.sort_unstable();
        assert_eq!(
            series,
            [
                "eventflow_reconcile_mismatch{client=\"_other\",metric=\"pending_backfill\"} 0",
                "eventflow_reconcile_mismatch{client=\"_other\",metric=\"visits\"} 1",
                "eventflow_reconcile_mismatch{client=\"c2\",metric=\"pending_backfill\"} 1",
                "eventflow_reconcile_mismatch{client=\"c2\",metric=\"visits\"} 1",
            ]
        );
    }
}
