//! The schema registry topic: writer schemas keyed by fingerprint.
//!
//! Every message carries only its writer schema's fingerprint (Avro single-object encoding).
//! Collectors publish the schemas they write to `<prefix>.schemas` (key: fingerprint in hex,
//! value: canonical schema JSON) before their facts; a processor that meets an unknown
//! fingerprint, e.g. from a newer collector, reads what is new in this topic ([`Reader`]) and
//! registers what it finds. A fingerprint still unknown after that is not a schema anyone
//! published: the processor records the message as a dead letter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use eventflow_core::avro::FactCodec;
use eventflow_core::logs::LogLimiter;
use eventflow_core::FactKind;

use crate::context::QuietContext;
use crate::KafkaConfig;

/// Publishes the codec's current writer schemas and waits until Kafka has them.
pub fn publish(config: &KafkaConfig, codec: &FactCodec, timeout: Duration) -> Result<(), KafkaError> {
    let producer: ThreadedProducer<_> = config.producer().create()?;
    let topic = config.topics().schemas();
    for kind in FactKind::ALL {
        let key = format!("{:016x}", codec.current_fingerprint(kind));
        let value = codec.canonical_schema(kind);
        producer.send(BaseRecord::<String, String>::to(&topic).key(&key).payload(&value)).map_err(|(e, _)| e)?;
    }
    producer.flush(timeout)
}

/// Reads the registry topic incrementally with one long-lived client: the first
/// [`Reader::refresh`] reads the whole topic, later ones only the messages published since, and
/// one whose topic has nothing new costs a single round trip (the end offset). An unknown
/// fingerprint per message therefore never re-reads the whole topic.
pub struct Reader {
    consumer: BaseConsumer<QuietContext>,
    topic: String,
    /// Offset of the next message to read (`None`: nothing read yet).
    next: Option<i64>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").field("topic", &self.topic).field("next", &self.next).finish_non_exhaustive()
    }
}

impl Reader {
    pub fn new(config: &KafkaConfig, logs: Arc<LogLimiter>) -> Result<Self, KafkaError> {
        let consumer = config
            .plain()
            .set("group.id", "eventflow-registry-reader")
            .set("enable.auto.commit", "false")
            .create_with_context(QuietContext::new(logs))?;
        Ok(Self { consumer, topic: config.topics().schemas(), next: None })
    }

    /// Registers in `codec` every schema published since the last call; returns how many
    /// messages were read (0 when the topic has nothing new).
    pub fn refresh(&mut self, codec: &FactCodec, timeout: Duration) -> Result<usize, KafkaError> {
        let (low, high) = self.consumer.fetch_watermarks(&self.topic, 0, timeout)?;
        let from = self.next.unwrap_or(low).max(low);
        if high <= from {
            self.next = Some(from);
            return Ok(0);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, 0, Offset::Offset(from))?;
        self.consumer.assign(&tpl)?;
        let deadline = Instant::now() + timeout;
        let mut read = 0;
        let mut next = from;
        while Instant::now() < deadline && next < high {
            let Some(msg) = self.consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let msg = msg?;
            if let Some(payload) = msg.payload_view::<str>().and_then(Result::ok) {
                // Not a schema of a fact kind (or not a schema): nothing to register.
                let _ = codec.register(payload);
            }
            read += 1;
            next = next.max(msg.offset() + 1);
        }
        self.next = Some(next);
        Ok(read)
    }
}
