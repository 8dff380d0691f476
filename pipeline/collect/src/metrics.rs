//! Prometheus metrics of the collector (names in `eventflow_core::metrics`).
//!
//! Label values are bounded: fact types, outcomes, reasons and route templates are closed sets;
//! the `client` label of [`ClientSeries`] holds at most `collector.max_client_series` values
//! plus `_other`.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use eventflow_core::metrics as names;

/// Every metric the collector exports.
#[derive(Debug, Clone)]
pub struct CollectorMetrics {
    pub facts: IntCounterVec,
    pub rejections: IntCounterVec,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub spool_facts: IntGauge,
    pub spool_bytes: IntGauge,
    pub spool_oldest_age: Gauge,
    pub produce_errors: IntCounterVec,
    pub delivered: IntCounter,
    pub link_clicks: IntCounterVec,
    pub link_lookups: IntCounterVec,
    pub links_cached: IntGauge,
    pub link_click_metrics: crate::clicks::ClickMetrics,
    pub spool_fsync: Histogram,
    pub spool_max_bytes: IntGauge,
    pub spool_refusals: IntCounterVec,
    pub rate_limiter_keys: IntGaugeVec,
    pub client_facts: IntCounterVec,
    pub client_facts_folded: IntCounter,
    pub log_lines_suppressed: IntCounterVec,
    pub connections: IntGauge,
    pub connections_closed: IntCounterVec,
}

impl CollectorMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            facts: IntCounterVec::new(
                Opts::new(names::COLLECTOR_FACTS_TOTAL, "Facts received, by type and outcome (accepted or rejected)."),
                &["type", "outcome"],
            )?,
            rejections: IntCounterVec::new(
                Opts::new(names::COLLECTOR_REJECTIONS_TOTAL, "Rejected facts by type and reason."),
                &["type", "reason"],
            )?,
            requests: IntCounterVec::new(
                Opts::new(names::COLLECTOR_REQUESTS_TOTAL, "HTTP requests by route template and status."),
                &["route", "status"],
            )?,
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    names::COLLECTOR_REQUEST_DURATION_SECONDS,
                    "Collector request latency by route template.",
                )
                .buckets(names::LATENCY_BUCKETS.to_vec()),
                &["route"],
            )?,
            spool_facts: IntGauge::new(
                names::COLLECTOR_SPOOL_FACTS,
                "Acknowledged facts in the spool not yet in Kafka.",
            )?,
            spool_bytes: IntGauge::new(names::COLLECTOR_SPOOL_BYTES, "Bytes in the spool not yet in Kafka.")?,
            spool_oldest_age: Gauge::new(
                names::COLLECTOR_OLDEST_SPOOLED_SECONDS,
                "Age of the oldest fact in flight to Kafka (0 when none).",
            )?,
            produce_errors: IntCounterVec::new(
                Opts::new(
                    names::COLLECTOR_PRODUCE_ERRORS_TOTAL,
                    "Kafka producer errors by kind (transport, delivery, fatal).",
                ),
                &["kind"],
            )?,
            delivered: IntCounter::new(names::COLLECTOR_DELIVERED_TOTAL, "Facts acknowledged by Kafka.")?,
            link_clicks: IntCounterVec::new(
                Opts::new(
                    "eventflow_collector_link_clicks_total",
                    "Tracked campaign link clicks (GET /r/{cid}) by outcome.",
                ),
                &["outcome"],
            )?,
            link_lookups: IntCounterVec::new(
                Opts::new(
                    "eventflow_collector_link_lookups_total",
                    "Campaign-link cache misses by outcome: looked up in ClickHouse (found, not_found, \
                     error), or answered without a query (negative, shared, limited).",
                ),
                &["outcome"],
            )?,
            links_cached: IntGauge::new(
                "eventflow_collector_links_cached",
                "Campaign links in the collector's in-memory copy.",
            )?,
            link_click_metrics: crate::clicks::ClickMetrics {
                dropped: IntCounter::new(
                    names::COLLECTOR_LINK_CLICKS_DROPPED_TOTAL,
                    "Clicks on known links not recorded per link: their key was new and \
                     collector.link_clicks_max_entries keys were held.",
                )?,
                flush_errors: IntCounter::new(
                    names::COLLECTOR_LINK_CLICK_FLUSH_ERRORS_TOTAL,
                    "Failed writes of the per-link click counts to ClickHouse (retried at the next flush).",
                )?,
                keys: IntGauge::new(
                    names::COLLECTOR_LINK_CLICK_KEYS,
                    "(client, link, minute) keys of click counts held in memory.",
                )?,
                unwritten: IntGauge::new(
                    names::COLLECTOR_LINK_CLICKS_UNWRITTEN,
                    "Clicks on known links counted but not yet written to ClickHouse (lost if the process crashes).",
                )?,
                last_flush: Gauge::new(
                    names::COLLECTOR_LINK_CLICK_LAST_FLUSH_TIMESTAMP_SECONDS,
                    "Unix time up to which every recorded link click is written to ClickHouse (the last successful flush).",
                )?,
            },
            spool_fsync: Histogram::with_opts(
                HistogramOpts::new(
                    names::COLLECTOR_SPOOL_FSYNC_SECONDS,
                    "Duration of one group commit of the spool (write and fdatasync).",
                )
                .buckets(names::LATENCY_BUCKETS.to_vec()),
            )?,
            spool_max_bytes: IntGauge::new(
                names::COLLECTOR_SPOOL_MAX_BYTES,
                "Bytes the spool may hold awaiting Kafka (collector.spool_max_bytes).",
            )?,
            spool_refusals: IntCounterVec::new(
                Opts::new(
                    names::COLLECTOR_SPOOL_REFUSALS_TOTAL,
                    "Requests refused with 503 by the spool: full (spool_max_bytes) or client_share (a client \
                     at its share of it).",
                ),
                &["reason"],
            )?,
            rate_limiter_keys: IntGaugeVec::new(
                Opts::new(
                    names::COLLECTOR_RATE_LIMITER_KEYS,
                    "Keys remembered by each rate limit (at most collector.rate_limit_keys).",
                ),
                &["limiter"],
            )?,
            client_facts: IntCounterVec::new(
                Opts::new(
                    names::COLLECTOR_CLIENT_FACTS_TOTAL,
                    "Facts by client and outcome; clients beyond collector.max_client_series are counted as \
                     client=\"_other\".",
                ),
                &["client", "outcome"],
            )?,
            client_facts_folded: IntCounter::new(
                names::COLLECTOR_CLIENT_FACTS_FOLDED_TOTAL,
                "Facts counted under client=\"_other\" because their client has no series of its own.",
            )?,
            log_lines_suppressed: IntCounterVec::new(
                Opts::new(
                    names::COLLECTOR_LOG_LINES_SUPPRESSED_TOTAL,
                    "Failure log lines not written because their reason was over its log rate.",
                ),
                &["reason"],
            )?,
            connections: IntGauge::new(names::COLLECTOR_CONNECTIONS, "Open HTTP connections.")?,
            connections_closed: IntCounterVec::new(
                Opts::new(
                    names::COLLECTOR_CONNECTIONS_CLOSED_TOTAL,
                    "Connections the collector closed: evicted (the oldest, for a new one beyond \
                     collector.max_connections) or error (a protocol error or timeout).",
                ),
                &["reason"],
            )?,
        };
        // Series that alerts watch exist from the start (at 0).
        for reason in ["full", "client_share"] {
            m.spool_refusals.with_label_values(&[reason]);
        }
        for reason in ["evicted", "error"] {
            m.connections_closed.with_label_values(&[reason]);
        }
        for kind in eventflow_core::FactKind::ALL {
            for outcome in ["accepted", "rejected", "failed"] {
                m.facts.with_label_values(&[kind.as_str(), outcome]);
            }
        }
        for kind in ["transport", "delivery", "fatal"] {
            m.produce_errors.with_label_values(&[kind]);
        }
        for outcome in ["redirected", "unknown", "unavailable"] {
            m.link_clicks.with_label_values(&[outcome]);
        }
        for outcome in crate::links::LOOKUP_OUTCOMES {
            m.link_lookups.with_label_values(&[outcome]);
        }
        registry.register(Box::new(m.spool_fsync.clone()))?;
        registry.register(Box::new(m.facts.clone()))?;
        registry.register(Box::new(m.rejections.clone()))?;
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.request_duration.clone()))?;
        registry.register(Box::new(m.spool_facts.clone()))?;
        registry.register(Box::new(m.spool_bytes.clone()))?;
        registry.register(Box::new(m.spool_oldest_age.clone()))?;
        registry.register(Box::new(m.produce_errors.clone()))?;
        registry.register(Box::new(m.delivered.clone()))?;
        registry.register(Box::new(m.link_clicks.clone()))?;
        registry.register(Box::new(m.link_lookups.clone()))?;
        registry.register(Box::new(m.links_cached.clone()))?;
        registry.register(Box::new(m.link_click_metrics.dropped.clone()))?;
        registry.register(Box::new(m.link_click_metrics.flush_errors.clone()))?;
        registry.register(Box::new(m.link_click_metrics.keys.clone()))?;
        registry.register(Box::new(m.link_click_metrics.unwritten.clone()))?;
        registry.register(Box::new(m.link_click_metrics.last_flush.clone()))?;
        registry.register(Box::new(m.spool_max_bytes.clone()))?;
        registry.register(Box::new(m.spool_refusals.clone()))?;
        registry.register(Box::new(m.rate_limiter_keys.clone()))?;
        registry.register(Box::new(m.client_facts.clone()))?;
        registry.register(Box::new(m.client_facts_folded.clone()))?;
        registry.register(Box::new(m.log_lines_suppressed.clone()))?;
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.connections_closed.clone()))?;
        Ok(m)
    }
}

/// The label for a client in the per-client series.
pub const OTHER_CLIENTS: &str = "_other";

/// The `client` label of `eventflow_collector_client_facts_total`, bounded.
///
/// Configured clients always have their own series; other clients get one in order of arrival
/// while fewer than `max` clients have one; the facts of the rest are counted under `_other`
/// (not a valid client id, so it never names a client) and in
/// `eventflow_collector_client_facts_folded_total`.
#[derive(Debug)]
pub struct ClientSeries {
    max: usize,
    named: Mutex<HashSet<String>>,
    facts: IntCounterVec,
    folded: IntCounter,
}

impl ClientSeries {
    pub fn new<'a>(metrics: &CollectorMetrics, max: usize, configured: impl IntoIterator<Item = &'a str>) -> Self {
        let named: HashSet<String> = configured.into_iter().map(str::to_owned).collect();
        for client in named.iter().map(String::as_str).chain([OTHER_CLIENTS]) {
            for outcome in ["accepted", "rejected", "failed"] {
                metrics.client_facts.with_label_values(&[client, outcome]);
            }
        }
        Self {
            max,
            named: Mutex::new(named),
            facts: metrics.client_facts.clone(),
            folded: metrics.client_facts_folded.clone(),
        }
    }

    /// Counts `n` facts of `client` with `outcome`.
    pub fn count(&self, client: &str, outcome: &str, n: u64) {
        if n == 0 {
            return;
        }
        let own = {
            let mut named = self.named.lock().unwrap_or_else(PoisonError::into_inner);
            if named.contains(client) {
                true
            } else if named.len() < self.max {
                named.insert(client.to_owned());
                true
            } else {
                false
            }
        };
        if own {
            self.facts.with_label_values(&[client, outcome]).inc_by(n);
        } else {
            self.facts.with_label_values(&[OTHER_CLIENTS, outcome]).inc_by(n);
            self.folded.inc_by(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_series_are_capped_with_an_other_bucket() {
        let registry = Registry::new();
        let m = CollectorMetrics::new(&registry).unwrap();
        let series = ClientSeries::new(&m, 4, ["acme", "globex"]);
        for i in 0..100 {
            series.count(&format!("c{i}"), "accepted", 1);
        }
        series.count("acme", "accepted", 3);
        series.count("c1", "rejected", 2);
        // acme, globex, c0 and c1 have series; c2..c99 (98 facts) are folded.
        assert_eq!(m.client_facts_folded.get(), 98);
        assert_eq!(m.client_facts.with_label_values(&["_other", "accepted"]).get(), 98);
        assert_eq!(m.client_facts.with_label_values(&["acme", "accepted"]).get(), 3);
        assert_eq!(m.client_facts.with_label_values(&["c1", "rejected"]).get(), 2);
        let families = registry.gather();
        let clients: HashSet<String> = families
            .iter()
            .filter(|f| f.name() == names::COLLECTOR_CLIENT_FACTS_TOTAL)
            .flat_map(|f| f.get_metric().iter())
            .flat_map(|m| m.get_label().iter().filter(|l| l.name() == "client").map(|l| l.value().to_owned()))
            .collect();
        assert_eq!(clients.len(), 4 + 1, "{clients:?}");
    }
}
