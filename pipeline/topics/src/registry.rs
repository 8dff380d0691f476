//! The schema registry topic: writer schemas keyed by fingerprint.
//!
//! Every message carries only its writer schema's fingerprint (Avro single-object encoding).
//! Collectors publish the schemas they write to `<prefix>.schemas` (key: fingerprint in hex,
//! value: canonical schema JSON) before their facts; a processor that meets an unknown
//! fingerprint, e.g. from a newer collector, reads this topic and registers what it finds.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use eventflow_core::avro::FactCodec;
use eventflow_core::FactKind;

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

/// Reads the whole registry topic and registers every schema in `codec`. Returns how many
/// schemas were read.
pub fn load(config: &KafkaConfig, codec: &FactCodec, timeout: Duration) -> Result<usize, KafkaError> {
    let topic = config.topics().schemas();
    let consumer: BaseConsumer = config.plain().set("group.id", "eventflow-registry-reader").create()?;
    let (low, high) = consumer.fetch_watermarks(&topic, 0, timeout)?;
    if high <= low {
        return Ok(0);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(low))?;
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + timeout;
    let mut read = 0;
    while Instant::now() < deadline {
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg?;
        if let Some(payload) = msg.payload_view::<str>().and_then(Result::ok) {
            if codec.register(payload).is_ok() {
                read += 1;
            }
        }
        if msg.offset() + 1 >= high {
            break;
        }
    }
    Ok(read)
}
