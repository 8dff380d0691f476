//! Prometheus metrics of the processor (names in `eventflow_core::metrics`).

use std::sync::Arc;

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use eventflow_core::logs::LogLimiter;
use eventflow_core::metrics as names;
use eventflow_store::rows::dead_letter;

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
    /// Dead letters written (counted once the flush holding them is acknowledged), by reason.
    pub dead_letters: IntCounterVec,
    /// Clients summed into `client="_other"` of `eventflow_visits_today` at the last update.
    pub visits_today_folded: IntGauge,
    /// Clients whose reconcile figures are summed into `client="_other"` at the last pass.
    pub reconcile_folded: IntGauge,
    /// Clients with facts that the last continuous-reconcile pass left for a later one.
    pub reconcile_deferred: IntGauge,
    /// From librdkafka's statistics of the consumer (every `statistics.interval.ms`).
    pub kafka: KafkaGauges,
    /// Failure logs of the processor: a budget per reason, the rest counted.
    pub logs: Arc<LogLimiter>,
}

/// Gauges fed by the consumer's librdkafka statistics.
#[derive(Debug, Clone)]
pub struct KafkaGauges {
    pub brokers_up: IntGauge,
    pub broker_rtt_seconds: GaugeVec,
    pub fetch_queue_messages: IntGauge,
    pub fetch_queue_bytes: IntGauge,
}

impl KafkaGauges {
    /// Updates the gauges from one statistics report.
    pub fn record(&self, stats: &rdkafka::Statistics) {
        let mut up = 0;
        for broker in stats.brokers.values() {
            // Bootstrap entries (node id -1) stand for the configured addresses, not brokers.
            if broker.nodeid < 0 {
                continue;
            }
            if broker.state == "UP" {
                up += 1;
            }
            if let Some(rtt) = &broker.rtt {
                self.broker_rtt_seconds.with_label_values(&[broker.name.as_str()]).set(rtt.avg as f64 / 1e6);
            }
        }
        self.brokers_up.set(up);
        let (mut messages, mut bytes) = (0i64, 0u64);
        for topic in stats.topics.values() {
            for (id, partition) in &topic.partitions {
                // Partition -1 is librdkafka's internal unassigned-messages partition.
                if *id >= 0 {
                    messages += partition.fetchq_cnt.max(0);
                    bytes += partition.fetchq_size;
                }
            }
        }
        self.fetch_queue_messages.set(messages);
        self.fetch_queue_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
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

    /// Dead letters of a written flush.
    pub fn record_dead_letters(&self, counts: &crate::flush::DeadLetterCounts) {
        self.dead_letters.with_label_values(&[dead_letter::UNKNOWN_SCHEMA]).inc_by(counts.unknown_schema);
        self.dead_letters.with_label_values(&[dead_letter::CORRUPT]).inc_by(counts.corrupt);
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
            dead_letters: IntCounterVec::new(
                Opts::new(
                    names::PROCESSOR_DEAD_LETTERS_TOTAL,
                    "Messages of the fact topics recorded in the dead_letters table instead of being counted, by reason.",
                ),
                &["reason"],
            )?,
            visits_today_folded: IntGauge::new(
                names::VISITS_TODAY_CLIENTS_FOLDED,
                "Clients with visits today folded into client=\"_other\" of eventflow_visits_today (beyond processor.metrics_max_clients).",
            )?,
            reconcile_folded: IntGauge::new(
                names::RECONCILE_CLIENTS_FOLDED,
                "Clients whose reconcile figures are folded into client=\"_other\" of eventflow_reconcile_mismatch (beyond processor.metrics_max_clients).",
            )?,
            reconcile_deferred: IntGauge::new(
                names::RECONCILE_CLIENTS_DEFERRED,
                "Clients with facts that the last continuous-reconcile pass left to a later pass (beyond processor.reconcile_max_clients).",
            )?,
            kafka: KafkaGauges {
                brokers_up: IntGauge::new(
                    names::PROCESSOR_KAFKA_BROKERS_UP,
                    "Kafka brokers the consumer is connected to (librdkafka statistics).",
                )?,
                broker_rtt_seconds: GaugeVec::new(
                    Opts::new(
                        names::PROCESSOR_KAFKA_BROKER_RTT_SECONDS,
                        "Average request round-trip time to each broker over the last statistics interval.",
                    ),
                    &["broker"],
                )?,
                fetch_queue_messages: IntGauge::new(
                    names::PROCESSOR_KAFKA_FETCH_QUEUE_MESSAGES,
                    "Messages fetched from Kafka and not yet handed to the processor.",
                )?,
                fetch_queue_bytes: IntGauge::new(
                    names::PROCESSOR_KAFKA_FETCH_QUEUE_BYTES,
                    "Bytes of the messages fetched from Kafka and not yet handed to the processor.",
                )?,
            },
            logs: Arc::new(LogLimiter::register(
                registry,
                names::PROCESSOR_LOG_LINES_SUPPRESSED_TOTAL,
                "Failure log lines of the processor left out because their reason exceeded its budget (5 per minute).",
            )?),
        };
        for reason in dead_letter::REASONS {
            m.dead_letters.with_label_values(&[reason]);
        }
        registry.register(Box::new(m.dead_letters.clone()))?;
        registry.register(Box::new(m.visits_today_folded.clone()))?;
        registry.register(Box::new(m.reconcile_folded.clone()))?;
        registry.register(Box::new(m.reconcile_deferred.clone()))?;
        registry.register(Box::new(m.kafka.brokers_up.clone()))?;
        registry.register(Box::new(m.kafka.broker_rtt_seconds.clone()))?;
        registry.register(Box::new(m.kafka.fetch_queue_messages.clone()))?;
        registry.register(Box::new(m.kafka.fetch_queue_bytes.clone()))?;
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
