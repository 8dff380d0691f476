//! Drains the spool to Kafka, in order, and never gives up on a fact.
//!
//! A dedicated thread reads durable records from the spool cursor onwards and produces them
//! with the idempotent `acks=all` producer of the topics crate (`message.timeout.ms=0`: a message
//! waits for the broker as long as it takes). Acknowledgements advance the cursor to the first
//! record still in flight; the cursor is persisted every 100 ms, and fully delivered segments are
//! deleted. If the producer hits a fatal error it is recreated and the records after the cursor
//! are sent again; the processor recognises those redeliveries by spool id and sequence.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use tracing::{error, info, warn};

use eventflow_core::avro::FactCodec;
use eventflow_topics::{registry, KafkaConfig, Topics};

use crate::metrics::CollectorMetrics;
use crate::spool::{client_of_key, Shared};

/// Records produced but not yet acknowledged, at most.
const WINDOW: usize = 20_000;

struct DrainContext {
    acks: Mutex<Vec<(u64, Result<(), String>)>>,
    metrics: CollectorMetrics,
}

impl ClientContext for DrainContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.metrics.produce_errors.with_label_values(&["transport"]).inc();
        warn!(error = %error, reason, "kafka producer error");
    }
}

impl ProducerContext for DrainContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let outcome = result.as_ref().map(|_| ()).map_err(|(e, _)| e.to_string());
        if let Ok(mut acks) = self.acks.lock() {
            acks.push((seq as u64, outcome));
        }
    }
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
}

impl Drainer {
    /// Starts the drainer thread.
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("spool-drainer".into()).spawn(move || self.run())
    }

    fn run(self) {
        let topics = self.kafka.topics();
        self.spawn_schema_publisher();
        loop {
            match self.drain_with_new_producer(&topics) {
                Ok(()) => return,
                Err(e) => {
                    error!(error = %e, "spool drainer restarting its producer");
                    self.metrics.produce_errors.with_label_values(&["fatal"]).inc();
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
        let _ = std::thread::Builder::new().name("schema-publisher".into()).spawn(move || {
            while !stop.load(Ordering::Acquire) {
                match registry::publish(&kafka, &codec, Duration::from_secs(10)) {
                    Ok(()) => {
                        info!("writer schemas published");
                        return;
                    }
                    Err(e) => {
                        warn!(error = %e, "publishing writer schemas; retrying");
                        std::thread::sleep(Duration::from_secs(2));
                    }
                }
            }
        });
    }

    fn drain_with_new_producer(&self, topics: &Topics) -> Result<(), String> {
        let context = DrainContext { acks: Mutex::new(Vec::new()), metrics: self.metrics.clone() };
        let producer: BaseProducer<DrainContext> =
            self.kafka.producer().create_with_context(context).map_err(|e| format!("creating producer: {e}"))?;
        let mut reader = self.shared.reader(self.shared.cursor());
        // In flight: sequence -> (record bytes, receive time, client).
        let mut in_flight: BTreeMap<u64, (u64, i64, String)> = BTreeMap::new();
        let mut next_unread = self.shared.cursor();
        let mut delivered_bytes = 0u64;
        let mut delivered_by_client: HashMap<String, u64> = HashMap::new();
        let mut last_commit = Instant::now();
        let mut stopping_since: Option<Instant> = None;
        loop {
            producer.poll(Duration::ZERO);
            let acks = producer.context().acks.lock().map(|mut a| std::mem::take(&mut *a)).unwrap_or_default();
            for (seq, outcome) in acks {
                match outcome {
                    Ok(()) => {
                        if let Some((bytes, _, client)) = in_flight.remove(&seq) {
                            delivered_bytes += bytes;
                            *delivered_by_client.entry(client).or_default() += bytes;
                            self.metrics.delivered.inc();
                        }
                    }
                    Err(e) => {
                        self.metrics.produce_errors.with_label_values(&["delivery"]).inc();
                        return Err(format!("delivery of spool record {seq} failed: {e}"));
                    }
                }
            }
            if let Some((code, reason)) = producer.client().fatal_error() {
                return Err(format!("fatal producer error {code:?}: {reason}"));
            }

            // Everything before the first record in flight (or not yet read) is in Kafka.
            let cursor = in_flight.keys().next().copied().unwrap_or(next_unread);
            let oldest = in_flight.values().next().map(|(_, received, _)| *received);
            self.metrics.spool_oldest_age.set(oldest.map_or(0.0, |r| ((now_ms() - r).max(0)) as f64 / 1000.0));
            if cursor > self.shared.cursor()
                && (last_commit.elapsed() >= Duration::from_millis(100) || in_flight.is_empty())
            {
                if let Err(e) = self.shared.commit_cursor(cursor, delivered_bytes, &delivered_by_client) {
                    error!(error = %e, "persisting the spool cursor");
                } else {
                    delivered_bytes = 0;
                    delivered_by_client.clear();
                }
                last_commit = Instant::now();
            }
            self.metrics.spool_facts.set(self.shared.pending_facts() as i64);
            self.metrics.spool_bytes.set(self.shared.pending_bytes() as i64);

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
                    Err(e) => return Err(format!("reading the spool: {e}")),
                };
                let topic = topics.fact(record.kind);
                let mut base = BaseRecord::<str, [u8], usize>::with_opaque_to(&topic, record.seq as usize)
                    .key(record.key.as_str())
                    .payload(record.value.as_slice());
                loop {
                    match producer.send(base) {
                        Ok(()) => break,
                        Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                            base = back;
                            producer.poll(Duration::from_millis(10));
                        }
                        Err((e, _)) => return Err(format!("producing spool record {}: {e}", record.seq)),
                    }
                }
                let bytes = (record.key.len() + record.value.len() + 27) as u64;
                in_flight.insert(record.seq, (bytes, record.received_ms, client_of_key(&record.key).to_owned()));
                next_unread = record.seq + 1;
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
