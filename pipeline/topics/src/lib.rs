//! Kafka topics between the collector and the processor.
//!
//! Facts travel on one topic per kind (`<prefix>.visits`, `<prefix>.entries`,
//! `<prefix>.pings`), keyed by `<client_id>/<session_id>` so a session lives in the same
//! partition number of all three (the topics are created with equal partition counts, and the
//! processor uses the `range` assignor, which gives one consumer the same partition numbers of
//! every topic). Writer schemas are published to `<prefix>.schemas` (see [`registry`]).
//!
//! This crate owns every librdkafka setting, so the guarantees (idempotent `acks=all` producer,
//! manual offset storage, co-partitioned assignment) are stated in one place, and the callbacks
//! that keep librdkafka's errors and statistics out of the logs ([`context`]).

pub mod admin;
pub mod context;
pub mod embedded;
pub mod registry;

use std::collections::HashMap;

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

use eventflow_core::FactKind;

/// `[kafka]` configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers (`EVENTFLOW__KAFKA__BROKERS`).
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Topic names are `<prefix>.visits`, `<prefix>.entries`, `<prefix>.pings`, `<prefix>.schemas`.
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// Partitions of each fact topic, used by `eventflow migrate` when it creates them. All fact
    /// topics must have the same count; changing it re-shuffles sessions (see docs/operations).
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor of created topics.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// Extra librdkafka properties for every client (e.g. `security.protocol`).
    #[serde(default)]
    pub properties: HashMap<String, String>,
}

fn default_brokers() -> String {
    "127.0.0.1:9092".to_owned()
}

fn default_prefix() -> String {
    "eventflow".to_owned()
}

fn default_partitions() -> i32 {
    6
}

fn default_replication() -> i32 {
    1
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: default_brokers(),
            topic_prefix: default_prefix(),
            partitions: default_partitions(),
            replication_factor: default_replication(),
            properties: HashMap::new(),
        }
    }
}

/// Names of EventFlow's topics.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    /// Topic of a fact kind.
    pub fn fact(&self, kind: FactKind) -> String {
        format!("{}.{}", self.prefix, kind.topic_suffix())
    }

    /// The three fact topics, in [`FactKind::ALL`] order.
    pub fn facts(&self) -> Vec<String> {
        FactKind::ALL.iter().map(|k| self.fact(*k)).collect()
    }

    /// Kind carried by `topic`, if it is one of the fact topics.
    pub fn kind_of(&self, topic: &str) -> Option<FactKind> {
        FactKind::ALL.into_iter().find(|k| self.fact(*k) == topic)
    }

    /// The schema registry topic.
    pub fn schemas(&self) -> String {
        format!("{}.schemas", self.prefix)
    }
}

impl KafkaConfig {
    pub fn topics(&self) -> Topics {
        Topics::new(&self.topic_prefix)
    }

    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            // Reconnect quickly after a broker outage (the default backs off up to 10 s).
            .set("reconnect.backoff.max.ms", "500");
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// Producer settings of the collector's spool drainer.
    ///
    /// Idempotent with `acks=all`: retries never duplicate or reorder a partition's messages.
    /// `message.timeout.ms=0` (never give up): a message leaves the spool only when Kafka has it,
    /// and no message of a partition is delivered after one that failed, which is what lets the
    /// processor recognise redeliveries by spool sequence. (A timeout would also make librdkafka
    /// bump the idempotent producer's epoch, which some Kafka-compatible brokers mishandle.)
    pub fn producer(&self) -> ClientConfig {
        let mut c = self.base();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            .set("message.timeout.ms", "0")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("statistics.interval.ms", "0");
        c
    }

    /// Consumer settings of the processor.
    ///
    /// Offsets are stored and committed by hand only after ClickHouse acknowledged the rows they
    /// cover; the authoritative position is the checkpoint stored with the facts. The `range`
    /// assignor keeps partition numbers of the three fact topics together.
    pub fn consumer(&self, group_id: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "range")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("max.poll.interval.ms", "300000")
            // Statistics feed the processor's eventflow_processor_kafka_* gauges (never the log).
            .set("statistics.interval.ms", "5000")
            .set("enable.partition.eof", "false");
        c
    }

    /// Settings of short-lived clients (admin, registry reader, lag probes).
    pub fn plain(&self) -> ClientConfig {
        self.base()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        let t = Topics::new("ef");
        assert_eq!(t.facts(), vec!["ef.visits", "ef.entries", "ef.pings"]);
        assert_eq!(t.kind_of("ef.pings"), Some(FactKind::Ping));
        assert_eq!(t.kind_of("ef.schemas"), None);
        assert_eq!(t.schemas(), "ef.schemas");
    }

    #[test]
    fn producer_is_idempotent_and_never_times_out() {
        let c = KafkaConfig::default().producer();
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("message.timeout.ms"), Some("0"));
        let consumer = KafkaConfig::default().consumer("g");
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
        assert_eq!(consumer.get("partition.assignment.strategy"), Some("range"));
    }
}
