//! Prometheus metrics of the processor (names in `eventflow_core::metrics`).

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use eventflow_core::metrics as names;

/// Every metric the processor exports; registered once per process.
#[derive(Debug, Clone)]
pub struct ProcessorMetrics {
    pub consumer_lag: IntGaugeVec,
    pub watermark_seconds: Gauge,
    pub staleness_seconds: Gauge,
    pub late_facts: IntCounter,
    pub last_flush_timestamp: Gauge,
    pub facts: IntCounterVec,
    pub dedup_retractions: IntCounterVec,
    pub dedup_notices: IntCounter,
    pub flush_duration: Histogram,
    pub flush_rows: IntCounterVec,
    pub insert_errors: IntCounter,
    pub assigned_partitions: IntGauge,
    pub open_state_entries: IntGauge,
    pub decode_errors: IntCounterVec,
    pub visits_today: GaugeVec,
    pub reconcile_mismatch: GaugeVec,
    pub reconcile_last_run: Gauge,
    pub orphaned_partitions: IntGauge,
    pub forced_rejoins: IntCounter,
}

impl ProcessorMetrics {
    /// A write ClickHouse acknowledged: a regular flush or the rewrite after a takeover.
    pub fn record_flush(&self, facts: usize, aggregate_rows: usize, took: std::time::Duration) {
        self.flush_rows.with_label_values(&["facts"]).inc_by(facts as u64);
        self.flush_rows.with_label_values(&["aggregates"]).inc_by(aggregate_rows as u64);
        self.flush_duration.observe(took.as_secs_f64());
        self.last_flush_timestamp.set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
    }

    /// Dedup decisions of a written flush: copies counted, duplicates, counted copies taken out
    /// again because an earlier copy turned up, and notices written.
    pub fn record_decisions(&self, d: &crate::state::Decisions, notices: usize) {
        self.dedup_notices.inc_by(notices as u64);
        let visit = eventflow_core::FactKind::Visit.as_str();
        let entry = eventflow_core::FactKind::Entry.as_str();
        self.facts.with_label_values(&[visit, "counted"]).inc_by(d.visits_counted);
        self.facts.with_label_values(&[visit, "duplicate"]).inc_by(d.visits_duplicate);
        self.facts.with_label_values(&[entry, "counted"]).inc_by(d.entries_counted);
        self.facts.with_label_values(&[entry, "duplicate"]).inc_by(d.entries_duplicate);
        self.dedup_retractions.with_label_values(&[visit]).inc_by(d.visits_retracted);
        self.dedup_retractions.with_label_values(&[entry]).inc_by(d.entries_retracted);
    }

    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            consumer_lag: IntGaugeVec::new(
                Opts::new(
                    names::PROCESSOR_CONSUMER_LAG,
                    "Messages between the processor's position and the end of each fact topic partition.",
                ),
                &["topic", "partition"],
            )?,
            watermark_seconds: Gauge::new(
                names::PROCESSOR_WATERMARK_SECONDS,
                "Event time (unix seconds) up to which this instance's partitions are folded into the aggregates.",
            )?,
            staleness_seconds: Gauge::new(names::PROCESSOR_STALENESS_SECONDS, "Now minus the watermark, in seconds.")?,
            late_facts: IntCounter::new(
                names::PROCESSOR_LATE_FACTS_TOTAL,
                "Facts that arrived after their day closed (stored raw, folded in by backfill).",
            )?,
            last_flush_timestamp: Gauge::new(
                names::PROCESSOR_LAST_FLUSH_TIMESTAMP_SECONDS,
                "Unix time of the last flush that ClickHouse acknowledged.",
            )?,
            facts: IntCounterVec::new(
                Opts::new(
                    names::PROCESSOR_FACTS_TOTAL,
                    "Facts consumed, by type and outcome (counted, duplicate, late, redelivery).",
                ),
                &["type", "outcome"],
            )?,
            dedup_retractions: IntCounterVec::new(
                Opts::new(
                    names::PROCESSOR_DEDUP_RETRACTIONS_TOTAL,
                    "Counted copies of a visit or entry taken out again because an earlier copy of the same \
                     event_uid / entry_id turned up later (in another partition, or delivered late).",
                ),
                &["type"],
            )?,
            dedup_notices: IntCounter::new(
                names::PROCESSOR_DEDUP_NOTICES_TOTAL,
                "Dedup notices written: a copy in another partition comes after one of this partition's within the dedup horizon.",
            )?,
            flush_duration: Histogram::with_opts(
                HistogramOpts::new(names::PROCESSOR_FLUSH_DURATION_SECONDS, "Duration of a flush to ClickHouse.")
                    .buckets(names::LATENCY_BUCKETS.to_vec()),
            )?,
            flush_rows: IntCounterVec::new(
                Opts::new(names::PROCESSOR_FLUSH_ROWS_TOTAL, "Rows written to ClickHouse, by table group."),
                &["table"],
            )?,
            insert_errors: IntCounter::new(
                names::CLICKHOUSE_INSERT_ERRORS_TOTAL,
                "Failed ClickHouse writes (each is retried; a growing rate means aggregation is stuck).",
            )?,
            assigned_partitions: IntGauge::new(
                names::PROCESSOR_ASSIGNED_PARTITIONS,
                "Fact-topic partition numbers owned by this instance.",
            )?,
            open_state_entries: IntGauge::new(
                names::PROCESSOR_OPEN_STATE_ENTRIES,
                "Entries held for open windows (buckets, set members, dedup keys).",
            )?,
            decode_errors: IntCounterVec::new(
                Opts::new(names::PROCESSOR_DECODE_ERRORS_TOTAL, "Messages that could not be decoded, by reason."),
                &["reason"],
            )?,
            visits_today: GaugeVec::new(
                Opts::new(
                    names::VISITS_TODAY,
                    "Visits today (client time zone) in the partitions this instance owns; sum over instances.",
                ),
                &["client"],
            )?,
            reconcile_mismatch: GaugeVec::new(
                Opts::new(
                    names::RECONCILE_MISMATCH,
                    "Aggregate figures differing from a raw recount over recent days, per client and metric family \
                     (family pending_backfill: differences on days with late facts not yet folded in).",
                ),
                &["client", "metric"],
            )?,
            reconcile_last_run: Gauge::new(
                names::RECONCILE_LAST_RUN_TIMESTAMP_SECONDS,
                "Unix time of the last completed reconcile.",
            )?,
            orphaned_partitions: IntGauge::new(
                names::PROCESSOR_ORPHANED_PARTITIONS,
                "Partition numbers with a backlog and no committed progress that this instance does not own.",
            )?,
            forced_rejoins: IntCounter::new(
                names::PROCESSOR_FORCED_REJOINS_TOTAL,
                "Times this instance left and rejoined the consumer group because partitions were orphaned.",
            )?,
        };
        registry.register(Box::new(m.orphaned_partitions.clone()))?;
        registry.register(Box::new(m.forced_rejoins.clone()))?;
        // Series that alerts watch exist from the start (at 0), so a first error shows as an
        // increase rather than as a new series.
        for kind in eventflow_core::FactKind::ALL {
            for outcome in ["counted", "duplicate", "late", "redelivery"] {
                m.facts.with_label_values(&[kind.as_str(), outcome]);
            }
        }
        for reason in ["unknown_schema", "corrupt"] {
            m.decode_errors.with_label_values(&[reason]);
        }
        registry.register(Box::new(m.reconcile_mismatch.clone()))?;
        registry.register(Box::new(m.reconcile_last_run.clone()))?;
        registry.register(Box::new(m.consumer_lag.clone()))?;
        registry.register(Box::new(m.watermark_seconds.clone()))?;
        registry.register(Box::new(m.staleness_seconds.clone()))?;
        registry.register(Box::new(m.late_facts.clone()))?;
        registry.register(Box::new(m.last_flush_timestamp.clone()))?;
        registry.register(Box::new(m.facts.clone()))?;
        registry.register(Box::new(m.dedup_retractions.clone()))?;
        registry.register(Box::new(m.dedup_notices.clone()))?;
        for kind in ["visit", "entry"] {
            m.dedup_retractions.with_label_values(&[kind]);
        }
        registry.register(Box::new(m.flush_duration.clone()))?;
        registry.register(Box::new(m.flush_rows.clone()))?;
        registry.register(Box::new(m.insert_errors.clone()))?;
        registry.register(Box::new(m.assigned_partitions.clone()))?;
        registry.register(Box::new(m.open_state_entries.clone()))?;
        registry.register(Box::new(m.decode_errors.clone()))?;
        registry.register(Box::new(m.visits_today.clone()))?;
        Ok(m)
    }
}
