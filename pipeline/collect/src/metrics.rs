//! Prometheus metrics of the collector (names in `eventflow_core::metrics`).

use prometheus::{Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

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
    pub spool_fsync: Histogram,
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
            spool_fsync: Histogram::with_opts(
                HistogramOpts::new(
                    names::COLLECTOR_SPOOL_FSYNC_SECONDS,
                    "Duration of one group commit of the spool (write and fdatasync).",
                )
                .buckets(names::LATENCY_BUCKETS.to_vec()),
            )?,
        };
        // Series that alerts watch exist from the start (at 0).
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
        Ok(m)
    }
}
