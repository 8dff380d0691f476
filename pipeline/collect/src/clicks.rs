//! Clicks on tracked campaign links, per link and UTC minute, counted in memory and written to
//! ClickHouse (`link_clicks`) every `collector.link_clicks_flush`.
//!
//! The redirect handler ([`crate::http`]) records a click here once the `cid` resolved to a
//! known link (`302`); unknown `cid`s are only counted in
//! `eventflow_collector_link_clicks_total{outcome}`, so the keys held here and the rows written
//! are bounded by the imported links (times the minutes they are clicked in).
//!
//! Why rows are idempotent: a collector process draws a boot id when it starts and keeps, per
//! `(client_id, cid, minute)`, the running count of clicks since then. A flush writes, for every
//! key whose count grew since its last successful write, the row `(key, boot id, count)`; the
//! table is a ReplacingMergeTree with the count as version and readers take `max()`. A retried
//! or repeated write of a key therefore replaces (never adds), and a restarted collector, with a
//! new boot id, adds to what the previous process wrote.
//!
//! What is bounded and what can be lost: at most `collector.link_clicks_max_entries` keys are
//! held; a click that would need a new key beyond that is not recorded per link and is counted
//! in `eventflow_collector_link_clicks_dropped_total`. A key leaves memory once its minute is
//! over (plus one minute of grace) and its count is written. Clicks counted since the last
//! successful flush (`eventflow_collector_link_clicks_unwritten`) are lost when the process
//! crashes; a redirect is not an acknowledged fact, unlike `POST /v1/collect`. A graceful stop
//! flushes one last time. A failed flush is counted in
//! `eventflow_collector_link_click_flush_errors_total` and retried at the next interval with
//! the counts of then.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::{Gauge, IntCounter, IntGauge};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use eventflow_store::rows::LinkClickRow;
use eventflow_store::{Store, StoreError};

/// A key stays in memory this long after its minute ended, so that a click timed just before
/// the minute changed, but recorded after a flush, still finds its key (and its count).
const RETIRE_GRACE_S: u32 = 60;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where click counts are written: ClickHouse, or a vector in tests.
pub trait ClickSink: Send + Sync + 'static {
    fn write<'a>(&'a self, rows: &'a [LinkClickRow]) -> BoxFuture<'a, Result<(), StoreError>>;
}

impl ClickSink for Store {
    fn write<'a>(&'a self, rows: &'a [LinkClickRow]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.record_link_clicks(rows))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ClickKey {
    client_id: String,
    cid: String,
    /// Start of the UTC minute, unix seconds.
    minute: u32,
}

#[derive(Debug, Clone, Copy, Default)]
struct Count {
    /// Clicks since this process started.
    clicks: u64,
    /// The count ClickHouse acknowledged last.
    written: u64,
}

/// Running click counts of one collector process (no I/O; see the module documentation).
#[derive(Debug)]
pub struct ClickCounts {
    boot_id: u64,
    max_entries: usize,
    counts: HashMap<ClickKey, Count>,
}

/// Start of the UTC minute of `ms` (unix milliseconds), in seconds.
fn minute_of(ms: i64) -> u32 {
    u32::try_from(ms.div_euclid(60_000) * 60).unwrap_or(0)
}

impl ClickCounts {
    pub fn new(boot_id: u64, max_entries: usize) -> Self {
        Self { boot_id, max_entries, counts: HashMap::new() }
    }

    /// Counts a click on link `cid` of `client_id` at `now_ms`. False when it could not be
    /// recorded: its key is new and `max_entries` keys are held already.
    pub fn record(&mut self, client_id: &str, cid: &str, now_ms: i64) -> bool {
        let key = ClickKey { client_id: client_id.to_owned(), cid: cid.to_owned(), minute: minute_of(now_ms) };
        let held = self.counts.len();
        match self.counts.get_mut(&key) {
            Some(c) => c.clicks += 1,
            None if held >= self.max_entries => return false,
            None => {
                self.counts.insert(key, Count { clicks: 1, written: 0 });
            }
        }
        true
    }

    /// The rows a flush writes now: every key whose count grew since its last successful write,
    /// with its running count (sorted, for stable output).
    pub fn unwritten_rows(&self) -> Vec<LinkClickRow> {
        let mut rows: Vec<LinkClickRow> = self
            .counts
            .iter()
            .filter(|(_, c)| c.clicks > c.written)
            .map(|(k, c)| LinkClickRow {
                client_id: k.client_id.clone(),
                minute: k.minute,
                cid: k.cid.clone(),
                boot_id: self.boot_id,
                clicks: c.clicks,
            })
            .collect();
        rows.sort_by(|a, b| (a.minute, &a.client_id, &a.cid).cmp(&(b.minute, &b.client_id, &b.cid)));
        rows
    }

    /// Records that ClickHouse acknowledged `rows`, then forgets the keys that are written and
    /// whose minute (plus the grace) is over at `now_ms`: no click can reach them any more.
    pub fn acknowledge(&mut self, rows: &[LinkClickRow], now_ms: i64) {
        for r in rows {
            let key = ClickKey { client_id: r.client_id.clone(), cid: r.cid.clone(), minute: r.minute };
            if let Some(c) = self.counts.get_mut(&key) {
                c.written = c.written.max(r.clicks);
            }
        }
        let current = minute_of(now_ms);
        self.counts.retain(|k, c| c.clicks > c.written || k.minute.saturating_add(60 + RETIRE_GRACE_S) > current);
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Clicks counted but not yet acknowledged by ClickHouse (what a crash now would lose).
    pub fn unwritten_clicks(&self) -> u64 {
        self.counts.values().map(|c| c.clicks - c.written.min(c.clicks)).sum()
    }
}

/// Metrics of the click counts.
#[derive(Debug, Clone)]
pub struct ClickMetrics {
    /// `eventflow_collector_link_clicks_dropped_total`.
    pub dropped: IntCounter,
    /// `eventflow_collector_link_click_flush_errors_total`.
    pub flush_errors: IntCounter,
    /// `eventflow_collector_link_click_keys`.
    pub keys: IntGauge,
    /// `eventflow_collector_link_clicks_unwritten`.
    pub unwritten: IntGauge,
    /// `eventflow_collector_link_click_last_flush_timestamp_seconds`.
    pub last_flush: Gauge,
}

/// The click counts shared by the redirect handler and the flush loop; cheap to clone.
#[derive(Debug, Clone)]
pub struct LinkClicks {
    counts: Arc<Mutex<ClickCounts>>,
    metrics: ClickMetrics,
}

impl LinkClicks {
    pub fn new(boot_id: u64, max_entries: usize, metrics: ClickMetrics) -> Self {
        Self { counts: Arc::new(Mutex::new(ClickCounts::new(boot_id, max_entries))), metrics }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, ClickCounts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a click on a known link (the redirect handler, after resolving `cid`).
    pub fn record(&self, client_id: &str, cid: &str) {
        let now = chrono::Utc::now().timestamp_millis();
        let recorded = self.counts().record(client_id, cid, now);
        if !recorded {
            self.metrics.dropped.inc();
        }
    }

    /// Writes the unwritten counts once. Err when ClickHouse refused them (counted; the next
    /// flush writes the counts of then).
    pub async fn flush(&self, sink: &dyn ClickSink) -> Result<usize, StoreError> {
        let started = chrono::Utc::now();
        let rows = self.counts().unwritten_rows();
        let result = if rows.is_empty() { Ok(()) } else { sink.write(&rows).await };
        let mut counts = self.counts();
        match &result {
            Ok(()) => {
                counts.acknowledge(&rows, chrono::Utc::now().timestamp_millis());
                self.metrics.last_flush.set(started.timestamp_millis() as f64 / 1000.0);
            }
            Err(e) => {
                self.metrics.flush_errors.inc();
                warn!(error = %e, rows = rows.len(), clicks_unwritten = counts.unwritten_clicks(),
                      "writing link clicks failed; retrying at the next flush");
            }
        }
        self.set_gauges(&counts);
        result.map(|()| rows.len())
    }

    /// Brings the gauges up to date (a scrape of `/metrics`; flushes update them too).
    pub fn report(&self) {
        self.set_gauges(&self.counts());
    }

    fn set_gauges(&self, counts: &ClickCounts) {
        self.metrics.keys.set(i64::try_from(counts.len()).unwrap_or(i64::MAX));
        self.metrics.unwritten.set(i64::try_from(counts.unwritten_clicks()).unwrap_or(i64::MAX));
    }

    /// Flushes every `every` until `shutdown`, then once more (what a graceful stop saves).
    pub async fn flush_loop(self, sink: Arc<dyn ClickSink>, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let _ = self.flush(sink.as_ref()).await;
        }
        let _ = self.flush(sink.as_ref()).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// 2026-11-26T01:00:00Z.
    const T: i64 = 1_795_654_800_000;

    /// Rows as ClickHouse would keep them: per key (boot included) the highest count.
    #[derive(Default)]
    struct Table {
        rows: Mutex<Vec<LinkClickRow>>,
        fail: AtomicBool,
        /// Acknowledge nothing but store the rows (a write whose answer was lost).
        lose_answer: AtomicBool,
    }

    impl Table {
        /// Clicks per cid: the sum over (minute, boot) of max(clicks), as the reader does.
        fn clicks(&self) -> std::collections::BTreeMap<String, u64> {
            let mut best: HashMap<(String, u32, u64), u64> = HashMap::new();
            for r in self.rows.lock().unwrap().iter() {
                let e = best.entry((r.cid.clone(), r.minute, r.boot_id)).or_default();
                *e = (*e).max(r.clicks);
            }
            let mut out = std::collections::BTreeMap::new();
            for ((cid, _, _), n) in best {
                *out.entry(cid).or_default() += n;
            }
            out
        }
    }

    impl ClickSink for Table {
        fn write<'a>(&'a self, rows: &'a [LinkClickRow]) -> BoxFuture<'a, Result<(), StoreError>> {
            Box::pin(async move {
                if self.fail.load(Ordering::SeqCst) {
                    return Err(StoreError::Invalid("down".into()));
                }
                self.rows.lock().unwrap().extend_from_slice(rows);
                if self.lose_answer.load(Ordering::SeqCst) {
                    return Err(StoreError::Timeout(Duration::from_secs(1)));
                }
                Ok(())
            })
        }
    }

    fn metrics() -> ClickMetrics {
        ClickMetrics {
            dropped: IntCounter::new("dropped", "t").unwrap(),
            flush_errors: IntCounter::new("errors", "t").unwrap(),
            keys: IntGauge::new("keys", "t").unwrap(),
            unwritten: IntGauge::new("unwritten", "t").unwrap(),
            last_flush: Gauge::new("last", "t").unwrap(),
        }
    }

    fn want(pairs: &[(&str, u64)]) -> std::collections::BTreeMap<String, u64> {
        pairs.iter().map(|(c, n)| ((*c).to_owned(), *n)).collect()
    }

    #[test]
    fn counts_per_link_and_minute_and_writes_running_counts() {
        let mut c = ClickCounts::new(7, 100);
        for _ in 0..3 {
            assert!(c.record("acme", "spring", T + 1_000));
        }
        assert!(c.record("acme", "spring", T + 61_000), "next minute");
        assert!(c.record("acme", "fall", T + 59_999));
        assert!(c.record("globex", "spring", T + 5_000), "same cid of another client is another key");
        let rows = c.unwritten_rows();
        let got: Vec<(&str, &str, u32, u64, u64)> =
            rows.iter().map(|r| (r.client_id.as_str(), r.cid.as_str(), r.minute, r.boot_id, r.clicks)).collect();
        let m = (T / 1000) as u32;
        assert_eq!(
            got,
            vec![
                ("acme", "fall", m, 7, 1),
                ("acme", "spring", m, 7, 3),
                ("globex", "spring", m, 7, 1),
                ("acme", "spring", m + 60, 7, 1)
            ]
        );
        assert_eq!(c.unwritten_clicks(), 6);
        // Written: nothing left to write until a key grows; a grown key is written with its
        // running count, not the increment.
        c.acknowledge(&rows, T + 62_000);
        assert!(c.unwritten_rows().is_empty());
        assert_eq!(c.unwritten_clicks(), 0);
        c.record("acme", "spring", T + 62_000);
        let again = c.unwritten_rows();
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].minute, again[0].clicks), (m + 60, 2));
    }

    #[test]
    fn written_keys_leave_after_their_minute_and_unwritten_ones_stay() {
        let mut c = ClickCounts::new(1, 100);
        c.record("acme", "a", T);
        c.record("acme", "b", T);
        let rows = c.unwritten_rows();
        // Only a's row was acknowledged (b's flush happened later, say).
        let a: Vec<LinkClickRow> = rows.iter().filter(|r| r.cid == "a").cloned().collect();
        c.acknowledge(&a, T + 30_000);
        assert_eq!(c.len(), 2, "the minute is not over yet");
        c.acknowledge(&a, T + 60_000 + 59_000);
        assert_eq!(c.len(), 2, "within the grace minute");
        c.acknowledge(&a, T + 120_000);
        assert_eq!(c.len(), 1, "a is written and its minute is over; b is not written");
        assert_eq!(c.unwritten_clicks(), 1);
        c.acknowledge(&c.unwritten_rows(), T + 120_000);
        assert!(c.is_empty());
    }

    #[test]
    fn memory_is_bounded_and_known_keys_keep_counting() {
        let mut c = ClickCounts::new(1, 2);
        assert!(c.record("acme", "a", T));
        assert!(c.record("acme", "b", T));
        assert!(!c.record("acme", "c", T), "a third key does not fit");
        assert!(c.record("acme", "a", T), "an existing key still counts");
        assert!(!c.record("acme", "a", T + 60_000), "a new minute is a new key");
        assert_eq!((c.len(), c.unwritten_clicks()), (2, 3));
        // Once written and retired, there is room again.
        c.acknowledge(&c.unwritten_rows(), T + 180_000);
        assert!(c.record("acme", "c", T + 180_000));
    }

    #[tokio::test]
    async fn retries_do_not_double_count_and_a_restart_adds() {
        let table = Table::default();
        let first = LinkClicks::new(1, 100, metrics());
        for _ in 0..5 {
            first.record("acme", "spring");
        }
        first.record("acme", "fall");
        assert_eq!(first.flush(&table).await.unwrap(), 2);
        assert_eq!(table.clicks(), want(&[("fall", 1), ("spring", 5)]));
        // Nothing new: no write.
        assert_eq!(first.flush(&table).await.unwrap(), 0);
        assert_eq!(table.rows.lock().unwrap().len(), 2);

        // A write whose answer was lost is written again; the table holds it twice and still
        // counts it once.
        first.record("acme", "spring");
        table.lose_answer.store(true, Ordering::SeqCst);
        assert!(first.flush(&table).await.is_err());
        table.lose_answer.store(false, Ordering::SeqCst);
        first.record("acme", "spring");
        assert_eq!(first.flush(&table).await.unwrap(), 1);
        assert_eq!(table.clicks(), want(&[("fall", 1), ("spring", 7)]));
        assert_eq!(first.metrics.flush_errors.get(), 1);

        // ClickHouse down: counts wait in memory (and are what a crash would lose).
        table.fail.store(true, Ordering::SeqCst);
        first.record("acme", "fall");
        first.report();
        assert_eq!(first.metrics.unwritten.get(), 1, "a scrape sees clicks not yet flushed");
        assert!(first.flush(&table).await.is_err());
        assert_eq!(first.metrics.unwritten.get(), 1);
        table.fail.store(false, Ordering::SeqCst);

        // The process crashes here: the unwritten fall click is lost. The next process (new boot
        // id) adds to what is stored, even within the same minutes.
        drop(first);
        let second = LinkClicks::new(2, 100, metrics());
        second.record("acme", "spring");
        second.record("acme", "spring");
        second.flush(&table).await.unwrap();
        assert_eq!(table.clicks(), want(&[("fall", 1), ("spring", 9)]));
        assert_eq!(second.metrics.unwritten.get(), 0);
        assert!(second.metrics.last_flush.get() > 0.0);
    }

    #[tokio::test]
    async fn dropped_clicks_are_counted() {
        let clicks = LinkClicks::new(1, 1, metrics());
        clicks.record("acme", "a");
        clicks.record("acme", "b");
        clicks.record("acme", "b");
        assert_eq!(clicks.metrics.dropped.get(), 2);
        let table = Table::default();
        clicks.flush(&table).await.unwrap();
        assert_eq!(table.clicks(), want(&[("a", 1)]));
        assert_eq!(clicks.metrics.keys.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_flushes_every_interval_and_on_shutdown() {
        let table = Arc::new(Table::default());
        let clicks = LinkClicks::new(1, 100, metrics());
        let stop = CancellationToken::new();
        let sink: Arc<dyn ClickSink> = table.clone();
        let task = tokio::spawn(clicks.clone().flush_loop(sink, Duration::from_secs(5), stop.clone()));
        clicks.record("acme", "a");
        tokio::time::sleep(Duration::from_millis(5_100)).await;
        assert_eq!(table.clicks(), want(&[("a", 1)]));
        clicks.record("acme", "a");
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert_eq!(table.clicks(), want(&[("a", 1)]), "not before the next interval");
        stop.cancel();
        task.await.unwrap();
        assert_eq!(table.clicks(), want(&[("a", 2)]), "the last flush on shutdown");
    }
}
