//! Topic administration: `eventflow migrate` creates the topics that are missing and checks
//! that the fact topics are co-partitioned.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::KafkaConfig;

/// Errors of topic administration.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("creating topic {topic}: {code}")]
    Create { topic: String, code: RDKafkaErrorCode },
    #[error("fact topics must have equal partition counts so a session's facts share a partition number; found {0:?}")]
    NotCoPartitioned(Vec<(String, usize)>),
}

/// Partition count of `topic`, or `None` if it does not exist.
pub fn partition_count(config: &KafkaConfig, topic: &str, timeout: Duration) -> Result<Option<usize>, KafkaError> {
    let consumer: BaseConsumer = config.plain().create()?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .filter(|n| *n > 0))
}

/// What [`ensure_topics`] did.
#[derive(Debug, Default)]
pub struct TopicReport {
    pub created: Vec<String>,
    pub existing: Vec<(String, usize)>,
}

/// Creates missing fact topics (`config.partitions` each) and the single-partition schema
/// topic, then verifies the fact topics are co-partitioned.
pub async fn ensure_topics(config: &KafkaConfig) -> Result<TopicReport, AdminError> {
    let timeout = Duration::from_secs(10);
    let topics = config.topics();
    let admin: AdminClient<DefaultClientContext> = config.plain().create()?;
    let mut report = TopicReport::default();
    let mut wanted: Vec<(String, i32)> = topics.facts().into_iter().map(|t| (t, config.partitions)).collect();
    wanted.push((topics.schemas(), 1));

    let mut missing = Vec::new();
    for (topic, partitions) in &wanted {
        match partition_count(config, topic, timeout)? {
            Some(n) => report.existing.push((topic.clone(), n)),
            None => missing.push((topic.clone(), *partitions)),
        }
    }
    if !missing.is_empty() {
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(config.replication_factor)))
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(timeout));
        for result in admin.create_topics(new.iter(), &opts).await? {
            match result {
                Ok(topic) => report.created.push(topic),
                Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    // Created concurrently by another migrate: fine.
                    report.existing.push((topic, 0));
                }
                Err((topic, code)) => return Err(AdminError::Create { topic, code }),
            }
        }
    }

    // Re-read the fact topics (a freshly created topic may take a moment to show up).
    let mut counts = Vec::new();
    for topic in topics.facts() {
        let mut n = None;
        for _ in 0..50 {
            n = partition_count(config, &topic, timeout)?;
            if n.is_some() {
                break;
            }
            tokio_free_sleep(Duration::from_millis(100));
        }
        counts.push((topic, n.unwrap_or(0)));
    }
    if counts.iter().any(|(_, n)| *n != counts[0].1) || counts[0].1 == 0 {
        return Err(AdminError::NotCoPartitioned(counts));
    }
    Ok(report)
}

/// Partition count shared by the fact topics (checked by the processor at start).
pub fn fact_partitions(config: &KafkaConfig) -> Result<usize, AdminError> {
    let timeout = Duration::from_secs(10);
    let mut counts = Vec::new();
    for topic in config.topics().facts() {
        counts.push((topic.clone(), partition_count(config, &topic, timeout)?.unwrap_or(0)));
    }
    if counts.iter().any(|(_, n)| *n != counts[0].1 || *n == 0) {
        return Err(AdminError::NotCoPartitioned(counts));
    }
    Ok(counts[0].1)
}

// Metadata calls are blocking anyway; a short blocking sleep keeps this crate runtime-agnostic.
fn tokio_free_sleep(d: Duration) {
    std::thread::sleep(d);
}
