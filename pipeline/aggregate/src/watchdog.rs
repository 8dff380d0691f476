//! Partition watchdog: end offsets for the lag metric, and orphaned partitions.
//!
//! Runs on its own thread with its own Kafka client (never a group member), so broker round
//! trips never stall the consumer loop. Every couple of seconds it reads the end offset of every
//! fact topic partition (for `eventflow_processor_consumer_lag` and the caught-up watermark) and
//! the group's committed offsets.
//!
//! A partition number is *orphaned* when its topics have messages beyond the committed offsets
//! and the committed offsets have not moved for `orphan_after`, while this instance does not own
//! it: nobody is processing it. That happens when a consumer dies and the group coordinator fails
//! to hand its partitions to the survivors (seen with some Kafka-compatible brokers), or when an
//! owner is stuck. The watchdog then asks the consumer loop to leave and rejoin the group, which
//! forces a fresh assignment; at most once per `rejoin_backoff`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, warn};

use eventflow_core::logs::LogLimiter;
use eventflow_core::FactKind;
use eventflow_topics::context::QuietContext;
use eventflow_topics::KafkaConfig;

/// State shared between the watchdog and the consumer loop.
#[derive(Debug, Default)]
pub struct Shared {
    /// End offset per (topic, partition).
    pub high_watermarks: Mutex<HashMap<(String, i32), i64>>,
    /// Partition numbers this instance owns (maintained by the consumer loop).
    pub owned: Mutex<BTreeSet<u16>>,
    /// Set by the watchdog; the consumer loop rejoins the group and clears it.
    pub rejoin: AtomicBool,
    pub stop: AtomicBool,
}

/// Watchdog settings.
#[derive(Debug, Clone)]
pub struct WatchdogConfig {
    pub kafka: KafkaConfig,
    pub group_id: String,
    pub partitions: usize,
    pub every: Duration,
    pub orphan_after: Duration,
    pub rejoin_backoff: Duration,
    /// The processor's failure-log budget (its client reports every failed reconnect).
    pub logs: Arc<LogLimiter>,
}

/// Metrics of the watchdog.
#[derive(Debug, Clone)]
pub struct WatchdogMetrics {
    pub orphaned: IntGauge,
    pub rejoins: IntCounter,
}

/// Starts the watchdog thread.
pub fn spawn(
    cfg: WatchdogConfig,
    shared: Arc<Shared>,
    metrics: WatchdogMetrics,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("partition-watchdog".into()).spawn(move || run(cfg, shared, metrics))
}

fn run(cfg: WatchdogConfig, shared: Arc<Shared>, metrics: WatchdogMetrics) {
    let client: BaseConsumer<QuietContext> = match cfg
        .kafka
        .plain()
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .create_with_context(QuietContext::new(cfg.logs.clone()))
    {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "partition watchdog could not create its Kafka client");
            return;
        }
    };
    let topics = cfg.kafka.topics();
    // Per partition number: committed total when it last changed, and when that was.
    let mut progress: HashMap<u16, (i64, Instant)> = HashMap::new();
    let mut last_rejoin: Option<Instant> = None;
    while !shared.stop.load(Ordering::Acquire) {
        let started = Instant::now();
        let mut highs = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for kind in FactKind::ALL {
            let topic = topics.fact(kind);
            for p in 0..cfg.partitions {
                let p = i32::try_from(p).unwrap_or(i32::MAX);
                if let Ok((_, high)) = client.fetch_watermarks(&topic, p, Duration::from_secs(2)) {
                    highs.insert((topic.clone(), p), high);
                }
                let _ = tpl.add_partition_offset(&topic, p, Offset::Invalid);
            }
        }
        if let Ok(mut hw) = shared.high_watermarks.lock() {
            hw.extend(highs.iter().map(|(k, v)| (k.clone(), *v)));
        }
        match client.committed_offsets(tpl, Duration::from_secs(2)) {
            Ok(committed) => {
                let owned = shared.owned.lock().map(|o| o.clone()).unwrap_or_default();
                let mut orphaned = Vec::new();
                for p in 0..cfg.partitions {
                    let pn = u16::try_from(p).unwrap_or(u16::MAX);
                    let (mut lag, mut total) = (0i64, 0i64);
                    for kind in FactKind::ALL {
                        let topic = topics.fact(kind);
                        let pi = i32::try_from(p).unwrap_or(i32::MAX);
                        let done = committed
                            .find_partition(&topic, pi)
                            .and_then(|e| e.offset().to_raw())
                            .filter(|o| *o >= 0)
                            .unwrap_or(0);
                        let high = highs.get(&(topic, pi)).copied().unwrap_or(0);
                        lag += (high - done).max(0);
                        total += done;
                    }
                    let entry = progress.entry(pn).or_insert((total, Instant::now()));
                    if entry.0 != total {
                        *entry = (total, Instant::now());
                    }
                    if lag > 0 && !owned.contains(&pn) && entry.1.elapsed() >= cfg.orphan_after {
                        orphaned.push(pn);
                    }
                }
                metrics.orphaned.set(orphaned.len() as i64);
                let backoff_over = last_rejoin.is_none_or(|t| t.elapsed() >= cfg.rejoin_backoff);
                if !orphaned.is_empty() && backoff_over {
                    warn!(partitions = ?orphaned, "partitions have a backlog and no progress for {:?}; rejoining the consumer group to get them reassigned", cfg.orphan_after);
                    shared.rejoin.store(true, Ordering::Release);
                    metrics.rejoins.inc();
                    last_rejoin = Some(Instant::now());
                    // Give the new assignment time to show progress.
                    for v in progress.values_mut() {
                        v.1 = Instant::now();
                    }
                }
            }
            Err(e) => debug!(error = %e, "reading committed offsets"),
        }
        let spent = started.elapsed();
        if spent < cfg.every {
            std::thread::sleep(cfg.every - spent);
        }
    }
}
