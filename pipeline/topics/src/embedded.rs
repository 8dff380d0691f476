//! The embedded broker of `eventflow dev` and of broker-fault tests: librdkafka's in-process
//! mock cluster. It speaks the Kafka protocol on a loopback port (idempotent producer, consumer
//! groups with commits), keeps data in memory, and can inject broker faults.

use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::KafkaConfig;

/// An in-process Kafka-protocol broker with EventFlow's topics created.
pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker").field("bootstrap", &self.bootstrap_servers()).finish()
    }
}

impl EmbeddedBroker {
    /// Starts one mock broker and creates the fact and schema topics of `config`.
    pub fn start(config: &KafkaConfig) -> Result<Self, KafkaError> {
        let cluster = MockCluster::new(1)?;
        let topics = config.topics();
        for topic in topics.facts() {
            cluster.create_topic(&topic, config.partitions, 1)?;
        }
        cluster.create_topic(&topics.schemas(), 1, 1)?;
        Ok(Self { cluster })
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Takes the broker down (connections refused) until [`Self::up`].
    pub fn down(&self) -> Result<(), KafkaError> {
        self.cluster.broker_down(1)
    }

    pub fn up(&self) -> Result<(), KafkaError> {
        self.cluster.broker_up(1)
    }

    /// Direct access for fault injection (request errors, latency).
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }
}
