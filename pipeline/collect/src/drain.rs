//! Drains the spool to Kafka, in order, and never gives up on a fact, nor on the spool.
//!
//! A dedicated thread reads durable records from the spool cursor onwards and produces them
//! with the idempotent `acks=all` producer of the topics crate (`message.timeout.ms=0`: a message
//! waits for the broker as long as it takes). Acknowledgements advance the cursor to the first
//! record still in flight; the cursor is persisted every 100 ms, and fully delivered segments are
//! deleted. If the producer hits an error it is recreated and the records after the cursor
//! are sent again; the processor recognises those redeliveries by spool id and sequence.
//!
//! A record the broker refuses for good ([`classify`]: too large, failing the broker's record
//! validation or policy) would block the cursor for ever and, behind it, fill the spool. It is
//! moved aside instead ([`Quarantine`]): written, fsynced, to `<spool_dir>/quarantine/` as one
//! JSON file with the record, its topic and key and what the broker said, counted in
//! `eventflow_collector_quarantined_facts_total{reason}`, and skipped; `eventflow quarantine
//! replay` sends it again once the cause is fixed. Refusals that concern the producer rather than
//! the record (authorization, a missing topic) are retried like transient errors for
//! [`QUARANTINE_AFTER`] (an operator can fix them, and then nothing needs replaying), then
//! quarantined too: the drainer never retries for ever and never drops a record silently.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use eventflow_core::avro::FactCodec;
use eventflow_core::logs::{clip_display, LogLimiter};
use eventflow_core::metrics as names;
use eventflow_core::FactKind;
use eventflow_topics::{context, registry, KafkaConfig, Topics};

use crate::metrics::CollectorMetrics;
use crate::spool::{client_of_key, Record, Shared};

/// Records produced but not yet acknowledged, at most.
const WINDOW: usize = 20_000;

/// How long a refusal that concerns the producer or the topic (authorization, unknown topic)
/// is retried before the records it hits are quarantined.
pub const QUARANTINE_AFTER: Duration = Duration::from_secs(10 * 60);

/// The failure-log budget of the drainer, registered as
/// `eventflow_collector_drain_log_lines_suppressed_total`.
pub fn drain_logs(registry: &Registry) -> prometheus::Result<Arc<LogLimiter>> {
    Ok(Arc::new(LogLimiter::register(
        registry,
        names::COLLECTOR_DRAIN_LOG_LINES_SUPPRESSED_TOTAL,
        "Failure log lines of the spool drainer left out because their reason exceeded its budget (5 per minute).",
    )?))
}

/// What a failed record means for the drainer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The broker refuses this record for good: quarantine it (the label says why).
    Record(&'static str),
    /// The broker refuses the producer or the topic: retry, quarantine after [`QUARANTINE_AFTER`].
    Config(&'static str),
    /// Anything else: recreate the producer and send again.
    Transient,
}

/// Classifies a produce or delivery error.
pub fn classify(error: &KafkaError) -> Failure {
    use RDKafkaErrorCode as C;
    match error.rdkafka_error_code() {
        Some(C::MessageSizeTooLarge | C::MessageBatchTooLarge) => Failure::Record("message_too_large"),
        Some(C::InvalidRecord) => Failure::Record("invalid_record"),
        Some(C::InvalidTimestamp) => Failure::Record("invalid_timestamp"),
        Some(C::PolicyViolation | C::UnsupportedForMessageFormat) => Failure::Record("policy_violation"),
        Some(C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed) => Failure::Config("authorization"),
        Some(C::UnknownTopic | C::UnknownTopicOrPartition | C::InvalidTopic) => Failure::Config("unknown_topic"),
        _ => Failure::Transient,
    }
}

/// Every `reason` label of `eventflow_collector_quarantined_facts_total`.
pub const QUARANTINE_REASONS: [&str; 6] =
    ["message_too_large", "invalid_record", "invalid_timestamp", "policy_violation", "authorization", "unknown_topic"];

/// One quarantined record, as stored in its file (`<spool id>-<seq>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quarantined {
    /// The spool the record came from (hex) and its sequence there.
    pub spool_id: String,
    pub seq: u64,
    pub topic: String,
    pub kind: String,
    pub key: String,
    pub received_ms: i64,
    /// [`QUARANTINE_REASONS`].
    pub reason: String,
    /// What librdkafka / the broker said.
    pub error: String,
    pub quarantined_at_ms: i64,
    /// The message value (Avro single-object encoding), hex.
    pub value_hex: String,
    /// The decoded fact, for reading (absent if the value does not decode).
    pub fact: Option<serde_json::Value>,
}

/// The quarantine directory of a spool and its metrics.
#[derive(Debug, Clone)]
pub struct Quarantine {
    dir: PathBuf,
    quarantined: IntCounterVec,
    held: IntGauge,
}

impl Quarantine {
    /// The quarantine of the spool in `spool_dir`; registers its metrics in `registry`.
    pub fn new(spool_dir: &Path, registry: &Registry) -> prometheus::Result<Self> {
        let q = Self {
            dir: spool_dir.join("quarantine"),
            quarantined: IntCounterVec::new(
                Opts::new(
                    names::COLLECTOR_QUARANTINED_FACTS_TOTAL,
                    "Spooled facts the broker refused for good, moved to the quarantine directory, by reason.",
                ),
                &["reason"],
            )?,
            held: IntGauge::new(
                names::COLLECTOR_QUARANTINE_FACTS,
                "Facts in the quarantine directory (not delivered to Kafka; eventflow quarantine replay).",
            )?,
        };
        for reason in QUARANTINE_REASONS {
            q.quarantined.with_label_values(&[reason]);
        }
        registry.register(Box::new(q.quarantined.clone()))?;
        registry.register(Box::new(q.held.clone()))?;
        q.held.set(i64::try_from(q.files().len()).unwrap_or(i64::MAX));
        Ok(q)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The quarantine files, sorted (by spool id, then sequence).
    pub fn files(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> =
            fs::read_dir(&self.dir).map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default();
        out.retain(|p| p.extension().is_some_and(|x| x == "json"));
        out.sort();
        out
    }

    /// Sequences of `spool_id` quarantined at or after `from` (skipped when the spool is read).
    fn seqs(&self, spool_id: u64, from: u64) -> BTreeSet<u64> {
        let prefix = format!("{spool_id:016x}-");
        self.files()
            .iter()
            .filter_map(|p| p.file_stem()?.to_str()?.strip_prefix(&prefix)?.parse::<u64>().ok())
            .filter(|s| *s >= from)
            .collect()
    }

    /// Writes `record` to the quarantine (fsynced file and directory) before the drainer moves
    /// past it. Writing the same record again replaces its file.
    fn put(
        &self,
        spool_id: u64,
        record: &Record,
        topic: &str,
        reason: &'static str,
        error: &KafkaError,
        codec: &FactCodec,
    ) -> std::io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let q = Quarantined {
            spool_id: format!("{spool_id:016x}"),
            seq: record.seq,
            topic: topic.to_owned(),
            kind: record.kind.as_str().to_owned(),
            key: record.key.clone(),
            received_ms: record.received_ms,
            reason: reason.to_owned(),
            error: clip_display(error),
            quarantined_at_ms: chrono::Utc::now().timestamp_millis(),
            value_hex: record.value.iter().map(|b| format!("{b:02x}")).collect(),
            fact: codec.decode(record.kind, &record.value).ok().and_then(|f| serde_json::to_value(f).ok()),
        };
        let name = format!("{spool_id:016x}-{:020}", record.seq);
        let tmp = self.dir.join(format!("{name}.tmp"));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(&q).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join(format!("{name}.json")))?;
        File::open(&self.dir)?.sync_all()?;
        self.quarantined.with_label_values(&[reason]).inc();
        self.held.set(i64::try_from(self.files().len()).unwrap_or(i64::MAX));
        Ok(())
    }
}

struct DrainContext {
    acks: Mutex<Vec<(u64, Result<(), KafkaError>)>>,
    metrics: CollectorMetrics,
    logs: Arc<LogLimiter>,
}

impl ClientContext for DrainContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        context::log_line(&self.logs, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.metrics.produce_errors.with_label_values(&["transport"]).inc();
        context::client_error(&self.logs, &error, reason);
    }

    fn stats(&self, _statistics: rdkafka::Statistics) {}
}

impl ProducerContext for DrainContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let outcome = result.as_ref().map(|_| ()).map_err(|(e, _)| e.clone());
        if let Ok(mut acks) = self.acks.lock() {
            acks.push((seq as u64, outcome));
        }
    }
}

/// Why a producer session ended early.
#[derive(Debug)]
enum Restart {
    /// The producer is unusable (counted as `fatal`).
    Fatal(String),
    /// A record failed; the records after the cursor are sent again by a new producer.
    Resend(String),
}

/// The spool drainer. Runs until `stop` is set, then gives in-flight messages `grace` to land.
#[derive(Debug)]
pub struct Drainer {
    pub shared: Arc<Shared>,
    pub kafka: KafkaConfig,
    pub codec: FactCodec,
    pub metrics: CollectorMetrics,
    pub stop: Arc<AtomicBool>,
    pub grace: Duration,
    /// Where records the broker refuses for good go.
    pub quarantine: Quarantine,
    /// Failure-log budget ([`drain_logs`]).
    pub logs: Arc<LogLimiter>,
}

/// State of the drainer that outlives a producer.
#[derive(Debug, Default)]
struct Progress {
    /// Quarantined sequences at or after the cursor: skipped when the spool is read again.
    skip: BTreeSet<u64>,
    /// Per fact kind (topic): since when its records fail with a producer-level refusal
    /// (cleared by a delivery to that topic).
    refused_since: BTreeMap<FactKind, Instant>,
}

impl Drainer {
    /// Starts the drainer thread.
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("spool-drainer".into()).spawn(move || self.run())
    }

    fn run(self) {
        let topics = self.kafka.topics();
        self.spawn_schema_publisher();
        let mut progress = Progress {
            skip: self.quarantine.seqs(self.shared.spool_id, self.shared.cursor()),
            refused_since: BTreeMap::new(),
        };
        loop {
            match self.drain_with_new_producer(&topics, &mut progress) {
                Ok(()) => return,
                Err(restart) => {
                    let (why, fatal) = match restart {
                        Restart::Fatal(why) => (why, true),
                        Restart::Resend(why) => (why, false),
                    };
                    if fatal {
                        self.metrics.produce_errors.with_label_values(&["fatal"]).inc();
                    }
                    self.logs.emit(
                        "producer_restart",
                        |suppressed| warn!(error = %why, suppressed, "spool drainer restarting its producer"),
                    );
                    if self.stop.load(Ordering::Acquire) {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// Publishes the writer schemas to the registry topic, retrying until Kafka takes them.
    fn spawn_schema_publisher(&self) {
        let kafka = self.kafka.clone();
        let codec = self.codec.clone();
        let stop = self.stop.clone();
        let logs = self.logs.clone();
        let _ = std::thread::Builder::new().name("schema-publisher".into()).spawn(move || {
            while !stop.load(Ordering::Acquire) {
                match registry::publish(&kafka, &codec, Duration::from_secs(10)) {
                    Ok(()) => {
                        info!("writer schemas published");
                        return;
                    }
                    Err(e) => {
                        logs.emit(
                            "schema_publish",
                            |suppressed| warn!(error = %e, suppressed, "publishing writer schemas; retrying"),
                        );
                        std::thread::sleep(Duration::from_secs(2));
                    }
                }
            }
        });
    }

    /// Quarantines spool record `seq` (read again from the spool); false if it cannot be.
    fn quarantine_seq(&self, topics: &Topics, seq: u64, reason: &'static str, error: &KafkaError) -> bool {
        let record = match self.shared.reader(seq).read_next() {
            Ok(Some(r)) if r.seq == seq => r,
            other => {
                self.logs.emit("quarantine_failed", |suppressed| {
                    warn!(seq, found = ?other.map(|r| r.map(|r| r.seq)), suppressed, "cannot read a refused record back from the spool to quarantine it; it stays in the spool")
                });
                return false;
            }
        };
        self.quarantine_record(topics, &record, reason, error)
    }

    fn quarantine_record(&self, topics: &Topics, record: &Record, reason: &'static str, error: &KafkaError) -> bool {
        let topic = topics.fact(record.kind);
        match self.quarantine.put(self.shared.spool_id, record, &topic, reason, error, &self.codec) {
            Ok(()) => {
                self.logs.emit("quarantined", |suppressed| {
                    warn!(
                        seq = record.seq,
                        topic = %topic,
                        reason,
                        error = %clip_display(error),
                        dir = %self.quarantine.dir().display(),
                        suppressed,
                        "the broker refused a spooled fact for good; moved to the quarantine"
                    )
                });
                true
            }
            Err(e) => {
                self.logs.emit("quarantine_failed", |suppressed| {
                    warn!(seq = record.seq, error = %e, suppressed, "writing the quarantine file failed; the record stays in the spool")
                });
                false
            }
        }
    }

    /// Whether a refused record of `kind` is quarantined now (record-level refusal, or a
    /// producer-level one that lasted [`QUARANTINE_AFTER`] on its topic); returns its reason.
    fn quarantine_reason(&self, failure: Failure, kind: FactKind, progress: &mut Progress) -> Option<&'static str> {
        match failure {
            Failure::Record(reason) => Some(reason),
            Failure::Config(reason) => {
                let since = *progress.refused_since.entry(kind).or_insert_with(Instant::now);
                (since.elapsed() >= QUARANTINE_AFTER).then_some(reason)
            }
            Failure::Transient => None,
        }
    }

    fn drain_with_new_producer(&self, topics: &Topics, progress: &mut Progress) -> Result<(), Restart> {
        let context =
            DrainContext { acks: Mutex::new(Vec::new()), metrics: self.metrics.clone(), logs: self.logs.clone() };
        let producer: BaseProducer<DrainContext> = self
            .kafka
            .producer()
            .create_with_context(context)
            .map_err(|e| Restart::Fatal(format!("creating producer: {e}")))?;
        let mut reader = self.shared.reader(self.shared.cursor());
        // In flight: sequence -> (record bytes, receive time, kind, client).
        let mut in_flight: BTreeMap<u64, (u64, i64, FactKind, String)> = BTreeMap::new();
        let mut next_unread = self.shared.cursor();
        let mut delivered_bytes = 0u64;
        let mut delivered_by_client: HashMap<String, u64> = HashMap::new();
        let mut last_commit = Instant::now();
        let mut last_held = Instant::now();
        let mut stopping_since: Option<Instant> = None;
        loop {
            producer.poll(Duration::ZERO);
            let acks = producer.context().acks.lock().map(|mut a| std::mem::take(&mut *a)).unwrap_or_default();
            let mut resend: Option<String> = None;
            for (seq, outcome) in acks {
                match outcome {
                    Ok(()) => {
                        if let Some((bytes, _, kind, client)) = in_flight.remove(&seq) {
                            progress.refused_since.remove(&kind);
                            delivered_bytes += bytes;
                            *delivered_by_client.entry(client).or_default() += bytes;
                            self.metrics.delivered.inc();
                        }
                    }
                    Err(e) => {
                        self.metrics.produce_errors.with_label_values(&["delivery"]).inc();
                        let kind = in_flight.get(&seq).map(|f| f.2);
                        let quarantined = kind
                            .and_then(|kind| self.quarantine_reason(classify(&e), kind, progress))
                            .is_some_and(|reason| self.quarantine_seq(topics, seq, reason, &e));
                        if quarantined {
                            progress.skip.insert(seq);
                            if let Some((bytes, _, _, client)) = in_flight.remove(&seq) {
                                delivered_bytes += bytes;
                                *delivered_by_client.entry(client).or_default() += bytes;
                            }
                        }
                        // Either way a new producer sends what follows the cursor again (an
                        // idempotent producer cannot continue a partition after a failed batch).
                        resend.get_or_insert_with(|| format!("delivery of spool record {seq} failed: {e}"));
                    }
                }
            }
            if let Some(why) = resend {
                return Err(Restart::Resend(why));
            }
            if let Some((code, reason)) = producer.client().fatal_error() {
                return Err(Restart::Fatal(format!("fatal producer error {code:?}: {reason}")));
            }

            // Everything before the first record in flight (or not yet read) is in Kafka or in
            // the quarantine.
            let cursor = in_flight.keys().next().copied().unwrap_or(next_unread);
            let oldest = in_flight.values().next().map(|(_, received, _, _)| *received);
            self.metrics.spool_oldest_age.set(oldest.map_or(0.0, |r| ((now_ms() - r).max(0)) as f64 / 1000.0));
            if cursor > self.shared.cursor()
                && (last_commit.elapsed() >= Duration::from_millis(100) || in_flight.is_empty())
            {
                if let Err(e) = self.shared.commit_cursor(cursor, delivered_bytes, &delivered_by_client) {
                    self.logs.emit(
                        "cursor_persist",
                        |suppressed| warn!(error = %e, suppressed, "persisting the spool cursor"),
                    );
                } else {
                    delivered_bytes = 0;
                    delivered_by_client.clear();
                    progress.skip = progress.skip.split_off(&cursor);
                }
                last_commit = Instant::now();
            }
            self.metrics.spool_facts.set(self.shared.pending_facts() as i64);
            self.metrics.spool_bytes.set(self.shared.pending_bytes() as i64);
            if last_held.elapsed() >= Duration::from_secs(60) {
                // Files replayed (or removed) by an operator leave the gauge.
                self.quarantine.held.set(i64::try_from(self.quarantine.files().len()).unwrap_or(i64::MAX));
                last_held = Instant::now();
            }

            if self.stop.load(Ordering::Acquire) {
                let since = *stopping_since.get_or_insert_with(Instant::now);
                if in_flight.is_empty() || since.elapsed() >= self.grace {
                    if !in_flight.is_empty() {
                        info!(
                            in_flight = in_flight.len(),
                            "stopping with facts still in flight; they stay in the spool"
                        );
                    }
                    let _ = producer.flush(Duration::from_millis(100));
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }

            let mut sent = 0;
            while in_flight.len() < WINDOW && sent < 1000 {
                let record = match reader.read_next() {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => return Err(Restart::Fatal(format!("reading the spool: {e}"))),
                };
                let bytes = (record.key.len() + record.value.len() + 27) as u64;
                let client = client_of_key(&record.key).to_owned();
                next_unread = record.seq + 1;
                if progress.skip.contains(&record.seq) {
                    // Quarantined before this producer started.
                    delivered_bytes += bytes;
                    *delivered_by_client.entry(client).or_default() += bytes;
                    continue;
                }
                let topic = topics.fact(record.kind);
                let mut base = BaseRecord::<str, [u8], usize>::with_opaque_to(&topic, record.seq as usize)
                    .key(record.key.as_str())
                    .payload(record.value.as_slice());
                loop {
                    match producer.send(base) {
                        Ok(()) => {
                            in_flight.insert(record.seq, (bytes, record.received_ms, record.kind, client));
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            base = back;
                            producer.poll(Duration::from_millis(10));
                        }
                        Err((e, _)) => {
                            // Refused before it left (e.g. larger than message.max.bytes).
                            let reason = self.quarantine_reason(classify(&e), record.kind, progress);
                            if reason.is_some_and(|r| self.quarantine_record(topics, &record, r, &e)) {
                                progress.skip.insert(record.seq);
                                delivered_bytes += bytes;
                                *delivered_by_client.entry(client).or_default() += bytes;
                                break;
                            }
                            return Err(Restart::Resend(format!("producing spool record {}: {e}", record.seq)));
                        }
                    }
                }
                sent += 1;
            }
            if sent == 0 {
                // Idle or waiting for acknowledgements: serve callbacks while we wait.
                producer.poll(Duration::from_millis(if in_flight.is_empty() { 2 } else { 5 }));
            }
        }
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// What [`replay`] did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    pub replayed: Vec<PathBuf>,
    pub failed: Vec<(PathBuf, String)>,
}

/// Identity a replayed fact takes: its spool id with the bits of `REPLAY` flipped, so the
/// processor does not take it for a redelivery of the spool's later facts (which it has seen),
/// and a second replay of the same file is a redelivery of the first (dropped).
pub fn replay_spool_id(spool_id: u64) -> u64 {
    spool_id ^ 0x5245_504c_4159
}

/// Sends quarantined facts (the files, in spool sequence order) to their topics again, under a
/// replay identity ([`replay_spool_id`]), with the drainer's producer settings; each file
/// delivered is renamed `*.replayed`. For use once the cause of the refusal is fixed.
pub fn replay(kafka: &KafkaConfig, files: &[PathBuf], timeout: Duration) -> Result<ReplayReport, String> {
    let codec = FactCodec::new().map_err(|e| e.to_string())?;
    let mut items: Vec<(PathBuf, Quarantined)> = Vec::new();
    for path in files {
        let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let q: Quarantined = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        items.push((path.clone(), q));
    }
    // Per spool, in sequence order: the processor keeps the highest sequence per spool.
    items.sort_by(|a, b| (&a.1.spool_id, a.1.seq).cmp(&(&b.1.spool_id, b.1.seq)));
    let producer: BaseProducer = kafka.producer().create().map_err(|e| format!("creating producer: {e}"))?;
    let mut report = ReplayReport::default();
    for (path, q) in items {
        match replay_one(&producer, &codec, &q, timeout) {
            Ok(()) => {
                let done = path.with_extension("replayed");
                fs::rename(&path, &done).map_err(|e| format!("{}: {e}", path.display()))?;
                report.replayed.push(done);
            }
            Err(e) => report.failed.push((path, e)),
        }
    }
    Ok(report)
}

fn replay_one(producer: &BaseProducer, codec: &FactCodec, q: &Quarantined, timeout: Duration) -> Result<(), String> {
    let kind = FactKind::ALL.into_iter().find(|k| k.as_str() == q.kind).ok_or(format!("unknown kind {}", q.kind))?;
    let raw: Vec<u8> = (0..q.value_hex.len() / 2)
        .map(|i| u8::from_str_radix(q.value_hex.get(2 * i..2 * i + 2).unwrap_or("zz"), 16))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("value_hex: {e}"))?;
    let mut fact = codec.decode(kind, &raw).map_err(|e| format!("the quarantined value does not decode: {e}"))?;
    let header = fact.header_mut();
    header.spool_id = replay_spool_id(header.spool_id);
    let value = codec.encode(&fact).map_err(|e| e.to_string())?;
    producer
        .send(BaseRecord::<str, [u8]>::to(&q.topic).key(q.key.as_str()).payload(value.as_slice()))
        .map_err(|(e, _)| e.to_string())?;
    producer.flush(timeout).map_err(|e| e.to_string())?;
    if producer.in_flight_count() > 0 {
        return Err("not acknowledged in time".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_of_the_record_are_quarantined_others_retried() {
        let e = |c| KafkaError::MessageProduction(c);
        assert_eq!(classify(&e(RDKafkaErrorCode::MessageSizeTooLarge)), Failure::Record("message_too_large"));
        assert_eq!(classify(&e(RDKafkaErrorCode::InvalidRecord)), Failure::Record("invalid_record"));
        assert_eq!(classify(&e(RDKafkaErrorCode::TopicAuthorizationFailed)), Failure::Config("authorization"));
        assert_eq!(classify(&e(RDKafkaErrorCode::UnknownTopicOrPartition)), Failure::Config("unknown_topic"));
        assert_eq!(classify(&e(RDKafkaErrorCode::BrokerTransportFailure)), Failure::Transient);
        assert_eq!(classify(&e(RDKafkaErrorCode::NotLeaderForPartition)), Failure::Transient);
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::MessageBatchTooLarge,
            RDKafkaErrorCode::InvalidRecord,
            RDKafkaErrorCode::InvalidTimestamp,
            RDKafkaErrorCode::PolicyViolation,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::InvalidTopic,
        ] {
            let (Failure::Record(r) | Failure::Config(r)) = classify(&e(code)) else { panic!("{code:?}") };
            assert!(QUARANTINE_REASONS.contains(&r), "{r} is a pre-registered label");
        }
    }

    #[test]
    fn quarantine_files_hold_the_record_and_are_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::new();
        let q = Quarantine::new(dir.path(), &registry).unwrap();
        let codec = FactCodec::new().unwrap();
        let record =
            Record { seq: 7, kind: FactKind::Ping, received_ms: 5, key: "acme/s".into(), value: vec![1, 2, 255] };
        let error = KafkaError::MessageProduction(RDKafkaErrorCode::InvalidRecord);
        q.put(0xab, &record, "ef.pings", "invalid_record", &error, &codec).unwrap();
        q.put(0xab, &record, "ef.pings", "invalid_record", &error, &codec).unwrap();
        assert_eq!(q.files().len(), 1, "the same record again replaces its file");
        assert_eq!(q.seqs(0xab, 0), BTreeSet::from([7]));
        assert!(q.seqs(0xab, 8).is_empty() && q.seqs(0xac, 0).is_empty());
        let stored: Quarantined = serde_json::from_str(&fs::read_to_string(&q.files()[0]).unwrap()).unwrap();
        assert_eq!((stored.value_hex.as_str(), stored.key.as_str(), stored.seq), ("0102ff", "acme/s", 7));
        assert_eq!((stored.topic.as_str(), stored.kind.as_str(), stored.fact), ("ef.pings", "ping", None));
        let page = eventflow_core::metrics::render(&registry).0;
        assert!(page.contains("eventflow_collector_quarantined_facts_total{reason=\"invalid_record\"} 2"), "{page}");
        assert!(page.contains("eventflow_collector_quarantine_facts 1"), "{page}");
    }
}
