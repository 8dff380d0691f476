//! The consumer loop: fact topics in, flushes to ClickHouse out.
//!
//! One dedicated thread polls a `BaseConsumer` (several times faster than a `StreamConsumer` at
//! high rates) subscribed to the three fact topics. Partition number `p` of the three topics is
//! one unit of work with one [`PartitionState`]. The loop:
//!
//! 1. on assignment, pauses the unit's topic partitions, loads its checkpoint from ClickHouse,
//!    replays the stored facts of its open days into a fresh state under a new epoch, rewrites
//!    its open buckets, then seeks to the checkpoint offsets and resumes;
//! 2. applies each message to its unit's state; a message that does not decode (after re-reading
//!    what is new in the schema registry topic, for an unknown writer schema) is recorded as a
//!    dead letter and the partition moves on ([`PartitionState::dead_letter`]);
//! 3. every `flush_interval` (or `max_batch_facts`) runs one flush ([`crate::flush`]: dedup
//!    decisions and notices, then markers, facts with checkpoints (the commit point), buckets);
//!    then commits the Kafka offsets those rows cover. With nothing to write it still flushes
//!    every [`IDLE_NOTICE_POLL`], to compare the copies other partitions log and apply the
//!    dedup notices they send;
//! 4. on revocation, drops the unit's state without writing: facts not yet flushed are
//!    re-consumed by the next owner from the stored checkpoint.
//!
//! ClickHouse writes are retried until they succeed (or shutdown); a write never happens for a
//! unit after its revocation, and a fenced-off zombie loses to the new owner's higher epoch.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use eventflow_core::avro::{CodecError, FactCodec};
use eventflow_core::logs::{clip_display, LogLimiter};
use eventflow_core::metrics::OTHER_CLIENTS;
use eventflow_core::{time, ClientDirectory, FactKind};
use eventflow_store::rows::{dead_letter, DeadLetterRow, ProgressRow};
use eventflow_store::StoreError;
use eventflow_topics::{context, registry, KafkaConfig, Topics};

use crate::config::ProcessorConfig;
use crate::flush::{self, Retry};
use crate::metrics::{KafkaGauges, ProcessorMetrics};
use crate::sink::ProcessorStore;
use crate::state::{Outcome, PartitionState, WindowConfig};
use crate::{series, watchdog};

/// How often a processor with nothing to flush still runs a flush, to compare the copies other
/// partitions wrote to `copy_log` and read the dedup notices addressed to its partitions
/// ([`crate::flush`], step 2): without it a copy counted on a partition that receives no more
/// facts would stay counted after an earlier copy turned up elsewhere. With nothing new that is
/// two reads and no write.
const IDLE_NOTICE_POLL: Duration = Duration::from_secs(2);

/// Shared view of the processor for health endpoints.
#[derive(Debug, Default)]
pub struct ProcessorStatus {
    /// True once the consumer is subscribed and no flush is failing.
    pub healthy: AtomicBool,
    /// False from the moment shutdown starts.
    pub running: AtomicBool,
}

/// Everything the processor needs.
pub struct ProcessorDeps<S: ProcessorStore> {
    pub config: ProcessorConfig,
    pub kafka: KafkaConfig,
    pub store: Arc<S>,
    pub clients: Arc<ClientDirectory>,
    pub metrics: ProcessorMetrics,
    pub status: Arc<ProcessorStatus>,
    /// Partitions of each fact topic (checked at start-up).
    pub partitions: usize,
    /// Runtime the store's futures run on (the loop itself is a plain thread).
    pub runtime: Handle,
}

impl<S: ProcessorStore> std::fmt::Debug for ProcessorDeps<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessorDeps")
            .field("config", &self.config)
            .field("kafka", &self.kafka)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum RebalanceEvent {
    Assigned(Vec<(String, i32)>),
    Revoked(Vec<(String, i32)>),
}

/// A flush is due once this many dead letters wait (their payloads are kept in memory).
const MAX_PENDING_DEAD_LETTERS: usize = 1000;

/// librdkafka callbacks: rebalance events are queued for the loop (they arrive inside `poll`,
/// on the loop's thread); statistics become gauges; errors and log lines are rate-limited.
struct LoopContext {
    events: Mutex<Vec<RebalanceEvent>>,
    kafka: KafkaGauges,
    logs: Arc<LogLimiter>,
}

fn tpl_entries(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect()
}

impl ClientContext for LoopContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.kafka.record(&statistics);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        context::log_line(&self.logs, level, fac, log_message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        context::client_error(&self.logs, &error, reason);
    }
}

impl ConsumerContext for LoopContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            if let Ok(mut events) = self.events.lock() {
                events.push(RebalanceEvent::Revoked(tpl_entries(tpl)));
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Nothing is consumed until the unit's state is rebuilt and positioned.
            if let Err(e) = consumer.pause(tpl) {
                self.logs.emit(
                    "pause_assigned",
                    |suppressed| warn!(error = %e, suppressed, "pausing newly assigned partitions"),
                );
            }
            if let Ok(mut events) = self.events.lock() {
                events.push(RebalanceEvent::Assigned(tpl_entries(tpl)));
            }
        }
    }
}

enum Unit {
    /// Assigned, state not yet rebuilt.
    Pending,
    Ready(Box<PartitionState>),
}

struct Loop<S: ProcessorStore> {
    deps: ProcessorDeps<S>,
    consumer: BaseConsumer<LoopContext>,
    topics: Topics,
    codec: FactCodec,
    /// Reads what is new in the schema registry topic when a message has an unknown schema.
    registry: Option<registry::Reader>,
    window: WindowConfig,
    flush_interval: Duration,
    instance: String,
    /// Topic partitions currently assigned, by partition number.
    assigned: BTreeMap<u16, BTreeSet<FactKind>>,
    units: BTreeMap<u16, Unit>,
    last_flush: Instant,
    last_heartbeat: Instant,
    last_metrics: Instant,
    next_rebuild: Instant,
    watchdog: Arc<watchdog::Shared>,
    /// Rebuild requests being answered: partition -> request time (see `rebuild_requests`).
    rebuild_requests: BTreeMap<u16, i64>,
    /// Label values currently exported, so those no longer owned can be removed.
    exported_lag: BTreeSet<(String, String)>,
    exported_clients: BTreeSet<String>,
}

/// Runs the processor until `shutdown` is cancelled. Blocking: call from a dedicated thread.
pub fn run<S: ProcessorStore>(deps: ProcessorDeps<S>, shutdown: CancellationToken) -> anyhow::Result<()> {
    deps.config.validate()?;
    let topics = deps.kafka.topics();
    let context = LoopContext {
        events: Mutex::new(Vec::new()),
        kafka: deps.metrics.kafka.clone(),
        logs: deps.metrics.logs.clone(),
    };
    let consumer: BaseConsumer<LoopContext> = deps
        .kafka
        .consumer(&deps.config.group_id)
        .create_with_context(context)
        .context("creating the Kafka consumer")?;
    let fact_topics = topics.facts();
    let names: Vec<&str> = fact_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names).context("subscribing to the fact topics")?;
    let window = WindowConfig::new(deps.config.allowed_lateness_ms()?);
    let flush_interval = Duration::from_millis(u64::try_from(deps.config.flush_interval_ms()?).unwrap_or(1000));
    let instance = deps.config.instance_name();
    let watchdog_shared = Arc::new(watchdog::Shared::default());
    let watchdog_thread = watchdog::spawn(
        watchdog::WatchdogConfig {
            kafka: deps.kafka.clone(),
            group_id: deps.config.group_id.clone(),
            partitions: deps.partitions,
            every: Duration::from_secs(2),
            orphan_after: Duration::from_millis(u64::try_from(deps.config.orphan_after_ms()?).unwrap_or(30_000)),
            rejoin_backoff: Duration::from_millis(u64::try_from(deps.config.rejoin_backoff_ms()?).unwrap_or(60_000)),
            logs: deps.metrics.logs.clone(),
        },
        watchdog_shared.clone(),
        watchdog::WatchdogMetrics {
            orphaned: deps.metrics.orphaned_partitions.clone(),
            rejoins: deps.metrics.forced_rejoins.clone(),
        },
    )?;
    info!(instance = %instance, group = %deps.config.group_id, topics = ?fact_topics, "processor started");
    deps.status.running.store(true, Ordering::SeqCst);
    deps.status.healthy.store(true, Ordering::SeqCst);
    let now = Instant::now();
    let mut l = Loop {
        consumer,
        topics,
        codec: FactCodec::new()?,
        registry: None,
        window,
        flush_interval,
        instance,
        assigned: BTreeMap::new(),
        units: BTreeMap::new(),
        last_flush: now,
        last_heartbeat: now,
        last_metrics: now,
        next_rebuild: now,
        watchdog: watchdog_shared.clone(),
        rebuild_requests: BTreeMap::new(),
        exported_lag: BTreeSet::new(),
        exported_clients: BTreeSet::new(),
        deps,
    };
    let result = l.run(&shutdown);
    l.deps.status.running.store(false, Ordering::SeqCst);
    l.consumer.unsubscribe();
    watchdog_shared.stop.store(true, Ordering::Release);
    let _ = watchdog_thread.join();
    result
}

impl<S: ProcessorStore> Loop<S> {
    fn run(&mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        while !shutdown.is_cancelled() {
            // Detached: the message outlives the borrow of the consumer (one small copy).
            let message = self.consumer.poll(Duration::from_millis(100)).map(|m| m.map(|m| m.detach()));
            self.handle_rebalance_events();
            match message {
                Some(Ok(m)) => self.handle_message(m.topic(), m.partition(), m.offset(), m.payload()),
                Some(Err(e)) => self
                    .deps
                    .metrics
                    .logs
                    .emit("kafka_consumer_error", |suppressed| warn!(error = %e, suppressed, "kafka consumer error")),
                None => {}
            }
            if self.watchdog.rejoin.swap(false, Ordering::AcqRel) {
                self.rejoin(shutdown);
            }
            if self.units.values().any(|u| matches!(u, Unit::Pending)) && Instant::now() >= self.next_rebuild {
                self.activate_pending(shutdown);
            }
            let buffered: usize = self.ready_states().map(|s| s.unflushed()).sum();
            let dead_letters: usize = self.ready_states().map(|s| s.unflushed_dead_letters()).sum();
            let due = self.last_flush.elapsed() >= self.flush_interval;
            // Other partitions' copies and notices arrive through ClickHouse, not with our facts:
            // an idle processor still flushes now and then to compare and apply them.
            let notices_due = self.last_flush.elapsed() >= IDLE_NOTICE_POLL && self.ready_states().next().is_some();
            if (due && self.ready_states().any(|s| s.has_output()))
                || buffered >= self.deps.config.max_batch_facts
                || dead_letters >= MAX_PENDING_DEAD_LETTERS
                || notices_due
            {
                self.flush(shutdown);
            }
            if self.last_heartbeat.elapsed() >= Duration::from_secs(2) {
                self.heartbeat();
                self.answer_rebuild_requests(shutdown);
            }
            if self.last_metrics.elapsed() >= Duration::from_secs(1) {
                self.update_metrics();
            }
        }
        info!("processor stopping: final flush");
        self.flush(&CancellationToken::new().child_token());
        Ok(())
    }

    fn ready_states(&self) -> impl Iterator<Item = &PartitionState> {
        self.units.values().filter_map(|u| match u {
            Unit::Ready(s) => Some(&**s),
            Unit::Pending => None,
        })
    }

    // -----------------------------------------------------------------------------------------
    // Assignment

    fn handle_rebalance_events(&mut self) {
        let events: Vec<RebalanceEvent> = match self.consumer.context().events.lock() {
            Ok(mut e) => std::mem::take(&mut *e),
            Err(_) => return,
        };
        for event in events {
            match event {
                RebalanceEvent::Revoked(parts) => {
                    for (topic, p) in parts {
                        let (Some(kind), Ok(p)) = (self.topics.kind_of(&topic), u16::try_from(p)) else {
                            continue;
                        };
                        if let Some(set) = self.assigned.get_mut(&p) {
                            set.remove(&kind);
                            if set.is_empty() {
                                self.assigned.remove(&p);
                            }
                        }
                        if self.units.remove(&p).is_some() {
                            info!(
                                partition = p,
                                "partition revoked; unflushed facts will be re-read by its next owner"
                            );
                        }
                    }
                }
                RebalanceEvent::Assigned(parts) => {
                    for (topic, p) in parts {
                        let (Some(kind), Ok(p)) = (self.topics.kind_of(&topic), u16::try_from(p)) else {
                            continue;
                        };
                        self.assigned.entry(p).or_default().insert(kind);
                    }
                    for (p, kinds) in &self.assigned {
                        if kinds.len() == FactKind::ALL.len() {
                            self.units.entry(*p).or_insert(Unit::Pending);
                        } else {
                            warn!(partition = p, ?kinds, "only some fact topics of this partition are assigned (is partition.assignment.strategy = range and are the topics co-partitioned?)");
                        }
                    }
                    self.next_rebuild = Instant::now();
                }
            }
        }
        self.deps.metrics.assigned_partitions.set(self.units.len() as i64);
        if let Ok(mut owned) = self.watchdog.owned.lock() {
            *owned = self.units.keys().copied().collect();
        }
    }

    /// Flushes, leaves the group and joins again as a new member: forces a fresh assignment.
    fn rejoin(&mut self, shutdown: &CancellationToken) {
        self.flush(shutdown);
        warn!("rejoining the consumer group");
        self.consumer.unsubscribe();
        self.units.clear();
        self.assigned.clear();
        if let Ok(mut owned) = self.watchdog.owned.lock() {
            owned.clear();
        }
        let topics = self.topics.facts();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        if let Err(e) = self.consumer.subscribe(&names) {
            error!(error = %e, "subscribing again failed");
        }
    }

    /// Rebuilds the state of pending units from ClickHouse and positions their consumers.
    fn activate_pending(&mut self, shutdown: &CancellationToken) {
        let pending: Vec<u16> =
            self.units.iter().filter(|(_, u)| matches!(u, Unit::Pending)).map(|(p, _)| *p).collect();
        match self.rebuild(&pending, shutdown) {
            Ok(states) => {
                for state in states {
                    let p = state.partition();
                    let offsets = state.offsets();
                    let mut tpl = TopicPartitionList::new();
                    for kind in FactKind::ALL {
                        let topic = self.topics.fact(kind);
                        let offset = offsets.get(kind);
                        if let Err(e) =
                            self.consumer.seek(&topic, i32::from(p), Offset::Offset(offset), Duration::from_secs(10))
                        {
                            // A paused partition that has not fetched yet cannot be seeked in some
                            // librdkafka versions; fall back to resuming from the committed offset
                            // (always <= the checkpoint), and the offset guard skips the rest.
                            debug!(partition = p, topic = %topic, error = %e, "seek failed");
                        }
                        let _ = tpl.add_partition(&topic, i32::from(p));
                    }
                    if let Err(e) = self.consumer.resume(&tpl) {
                        self.deps.metrics.logs.emit(
                            "resume_partition",
                            |suppressed| error!(partition = p, error = %e, suppressed, "resuming partition"),
                        );
                    }
                    info!(partition = p, epoch = state.epoch(), offsets = ?offsets, "partition ready");
                    self.units.insert(p, Unit::Ready(Box::new(state)));
                }
            }
            Err(e) => {
                self.deps.metrics.logs.emit("rebuild_failed", |suppressed| {
                    warn!(error = %clip_display(&e), partitions = ?pending, suppressed, "rebuilding partition state failed; retrying")
                });
                self.deps.status.healthy.store(false, Ordering::SeqCst);
                self.next_rebuild = Instant::now() + Duration::from_secs(2);
            }
        }
    }

    fn rebuild(&mut self, partitions: &[u16], shutdown: &CancellationToken) -> anyhow::Result<Vec<PartitionState>> {
        let started = Instant::now();
        let retry = self.retry(shutdown);
        let (states, report) = self.deps.runtime.block_on(flush::rebuild(
            &*self.deps.store,
            partitions,
            self.window,
            &self.deps.clients,
            &self.rebuild_requests,
            &retry,
        ))?;
        for p in partitions {
            self.rebuild_requests.remove(p);
        }
        self.deps.status.healthy.store(true, Ordering::SeqCst);
        if let Some(r) = report {
            self.deps.metrics.record_decisions(&r.decisions, r.notices_written);
            if r.aggregate_rows > 0 {
                self.deps.metrics.record_flush(r.facts, r.aggregate_rows, started.elapsed());
            }
        }
        Ok(states)
    }

    /// Retries of store calls: logged, counted, with backoff, until shutdown.
    fn retry<'a>(&'a self, shutdown: &'a CancellationToken) -> LoopRetry<'a> {
        LoopRetry { metrics: &self.deps.metrics, status: &self.deps.status, shutdown }
    }

    // -----------------------------------------------------------------------------------------
    // Messages

    fn handle_message(&mut self, topic: &str, partition: i32, offset: i64, payload: Option<&[u8]>) {
        let (Some(kind), Ok(p)) = (self.topics.kind_of(topic), u16::try_from(partition)) else {
            return;
        };
        match self.units.get(&p) {
            Some(Unit::Ready(state)) if offset >= state.offsets().get(kind) => {}
            // Not ready, or already in the stored state (fetched before the seek took effect).
            _ => return,
        }
        let payload = payload.unwrap_or_default();
        let decoded = match self.codec.decode(kind, payload) {
            Err(CodecError::UnknownSchema(_)) => {
                // Perhaps a newer collector's schema: read what is new in the registry topic
                // (nothing new costs one round trip) and try once more.
                self.refresh_registry();
                self.codec.decode(kind, payload)
            }
            other => other,
        };
        let Some(Unit::Ready(state)) = self.units.get_mut(&p) else {
            return;
        };
        let fact = match decoded {
            Ok(fact) => fact,
            Err(e) => {
                // Never counted, never blocking: recorded with the flush that moves past it.
                let reason = if matches!(e, CodecError::UnknownSchema(_)) {
                    dead_letter::UNKNOWN_SCHEMA
                } else {
                    dead_letter::CORRUPT
                };
                self.deps.metrics.decode_errors.with_label_values(&[reason]).inc();
                let detail = e.to_string();
                let now = u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0);
                let row = DeadLetterRow::new(topic, p, offset, reason, &detail, payload, now);
                if state.dead_letter(kind, offset, row) {
                    self.deps.metrics.logs.emit("dead_letter", |suppressed| {
                        warn!(
                            topic,
                            partition,
                            offset,
                            reason,
                            error = %clip_display(&detail),
                            payload_bytes = payload.len(),
                            suppressed,
                            "undecodable message recorded in dead_letters; the partition moves on"
                        )
                    });
                }
                return;
            }
        };
        let outcome = state.apply(offset, fact);
        let label = match outcome {
            Outcome::Counted => "counted",
            // Counted as decided at the flush (`record_decisions`).
            Outcome::Deferred => return,
            Outcome::Late => {
                self.deps.metrics.late_facts.inc();
                "late"
            }
            Outcome::Redelivery => "redelivery",
        };
        self.deps.metrics.facts.with_label_values(&[kind.as_str(), label]).inc();
    }

    /// Registers the schemas published to the registry topic since the last read.
    fn refresh_registry(&mut self) {
        if self.registry.is_none() {
            match registry::Reader::new(&self.deps.kafka, self.deps.metrics.logs.clone()) {
                Ok(r) => self.registry = Some(r),
                Err(e) => {
                    self.deps.metrics.logs.emit(
                        "registry_read",
                        |suppressed| warn!(error = %e, suppressed, "creating the schema registry reader"),
                    );
                    return;
                }
            }
        }
        if let Some(reader) = self.registry.as_mut() {
            match reader.refresh(&self.codec, Duration::from_secs(5)) {
                Ok(0) => {}
                Ok(n) => info!(messages = n, "schema registry topic re-read"),
                Err(e) => self.deps.metrics.logs.emit(
                    "registry_read",
                    |suppressed| warn!(error = %e, suppressed, "reading the schema registry topic"),
                ),
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Flushing

    fn flush(&mut self, shutdown: &CancellationToken) {
        let started = Instant::now();
        let mut states: Vec<Box<PartitionState>> = Vec::new();
        let keys: Vec<u16> = self.units.keys().copied().collect();
        for p in keys {
            if let Some(Unit::Ready(s)) = self.units.remove(&p) {
                states.push(s);
            } else {
                self.units.insert(p, Unit::Pending);
            }
        }
        let result = {
            let retry = self.retry(shutdown);
            let mut plain: Vec<&mut PartitionState> = states.iter_mut().map(|b| &mut **b).collect();
            self.deps.runtime.block_on(flush::flush(&*self.deps.store, &mut plain, false, &retry))
        };
        self.last_flush = Instant::now();
        match result {
            Ok(report) => {
                self.deps.status.healthy.store(true, Ordering::SeqCst);
                if let Some(r) = report {
                    let plain: Vec<&mut PartitionState> = states.iter_mut().map(|b| &mut **b).collect();
                    self.commit(&plain);
                    self.deps.metrics.record_dead_letters(&r.dead_letters);
                    self.deps.metrics.record_decisions(&r.decisions, r.notices_written);
                    self.deps.metrics.record_flush(r.facts, r.aggregate_rows, started.elapsed());
                }
                for s in states {
                    self.units.insert(s.partition(), Unit::Ready(s));
                }
            }
            Err(e) => {
                // Only on shutdown: the states are dropped, and the facts not committed are
                // consumed again by the next owner from the stored checkpoint.
                warn!(error = %e, "flush abandoned");
            }
        }
    }

    /// Commits the Kafka offsets the written flush covers (advisory: the checkpoint stored with
    /// the facts is authoritative; committed offsets feed lag tooling and are never ahead of it).
    fn commit(&self, states: &[&mut PartitionState]) {
        let mut tpl = TopicPartitionList::new();
        for s in states {
            let offsets = s.offsets();
            for kind in FactKind::ALL {
                let _ = tpl.add_partition_offset(
                    &self.topics.fact(kind),
                    i32::from(s.partition()),
                    Offset::Offset(offsets.get(kind)),
                );
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                debug!(error = %e, "offset commit failed (the checkpoint in ClickHouse is authoritative)");
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Progress and metrics

    /// Per unit: the event time up to which its facts are in the aggregates (see
    /// [`PartitionState::written_event_watermark_ms`]), or `now` when the unit has consumed and
    /// written everything in its three topic partitions. A unit whose topics' end offsets are
    /// not known yet (the first seconds after a start) is not caught up: a processor starting
    /// on a backlog never reports fresh numbers.
    fn effective_watermarks(&self) -> Vec<(u16, i64, i64)> {
        let hw = self.watchdog.high_watermarks.lock().map(|h| h.clone()).unwrap_or_default();
        let now = Utc::now().timestamp_millis();
        self.ready_states()
            .filter_map(|s| {
                let mut lag = 0i64;
                let mut known = true;
                for kind in FactKind::ALL {
                    match hw.get(&(self.topics.fact(kind), i32::from(s.partition()))) {
                        Some(high) => lag += (high - s.offsets().get(kind)).max(0),
                        None => known = false,
                    }
                }
                let caught_up = known && lag == 0 && s.unflushed() == 0;
                let wm = if caught_up { now } else { s.written_event_watermark_ms() };
                // A partition that never had a fact and whose end is not known yet says
                // nothing; one with a backlog and nothing written yet is as stale as can be.
                (wm > 0 || lag > 0 || s.unflushed() > 0).then_some((s.partition(), wm, lag))
            })
            .collect()
    }

    /// Rebuilds the open windows of owned partitions for which `eventflow backfill` asked it
    /// (after re-attributing stored facts): flushes, pauses them and takes them over again from
    /// the stored facts, as after an assignment.
    fn answer_rebuild_requests(&mut self, shutdown: &CancellationToken) {
        let owned: Vec<u16> = self.ready_states().map(PartitionState::partition).collect();
        if owned.is_empty() {
            return;
        }
        let requests = match self.deps.runtime.block_on(self.deps.store.rebuild_requests(&owned)) {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "reading rebuild requests failed");
                return;
            }
        };
        let due: Vec<(u16, i64)> = self
            .ready_states()
            .filter_map(|s| {
                requests.get(&s.partition()).filter(|ms| **ms > s.rebuild_request_ms()).map(|ms| (s.partition(), *ms))
            })
            .collect();
        if due.is_empty() {
            return;
        }
        self.flush(shutdown);
        for (p, ms) in due {
            let mut tpl = TopicPartitionList::new();
            for kind in FactKind::ALL {
                let _ = tpl.add_partition(&self.topics.fact(kind), i32::from(p));
            }
            if let Err(e) = self.consumer.pause(&tpl) {
                warn!(partition = p, error = %e, "pausing a partition to rebuild it");
            }
            info!(partition = p, requested_ms = ms, "rebuilding the partition's open days on request");
            self.units.insert(p, Unit::Pending);
            self.rebuild_requests.insert(p, ms);
        }
        self.next_rebuild = Instant::now();
    }

    fn heartbeat(&mut self) {
        self.last_heartbeat = Instant::now();
        let now = Utc::now().timestamp_millis();
        let rows: Vec<ProgressRow> = self
            .effective_watermarks()
            .into_iter()
            .map(|(p, wm, _)| ProgressRow {
                kafka_partition: p,
                instance: self.instance.clone(),
                watermark_ms: wm,
                heartbeat_ms: u64::try_from(now).unwrap_or(0),
            })
            .collect();
        if rows.is_empty() {
            return;
        }
        if let Err(e) = self.deps.runtime.block_on(self.deps.store.heartbeat(&rows)) {
            debug!(error = %e, "progress heartbeat failed");
        }
    }

    fn update_metrics(&mut self) {
        self.last_metrics = Instant::now();
        let m = &self.deps.metrics;
        let hw = self.watchdog.high_watermarks.lock().map(|h| h.clone()).unwrap_or_default();
        let mut lag_labels = BTreeSet::new();
        for s in self.ready_states() {
            for kind in FactKind::ALL {
                let topic = self.topics.fact(kind);
                let high = hw.get(&(topic.clone(), i32::from(s.partition()))).copied().unwrap_or(0);
                let partition = s.partition().to_string();
                m.consumer_lag
                    .with_label_values(&[topic.as_str(), partition.as_str()])
                    .set((high - s.offsets().get(kind)).max(0));
                lag_labels.insert((topic, partition));
            }
        }
        // Partitions given away in a rebalance are reported by their new owner only.
        for (topic, partition) in self.exported_lag.difference(&lag_labels) {
            let _ = m.consumer_lag.remove_label_values(&[topic.as_str(), partition.as_str()]);
        }
        self.exported_lag = lag_labels;

        let marks = self.effective_watermarks();
        if let Some(min) = marks.iter().map(|(_, wm, _)| *wm).min() {
            let now = Utc::now().timestamp_millis();
            m.watermark_seconds.set(min as f64 / 1000.0);
            m.staleness_seconds.set(((now - min).max(0)) as f64 / 1000.0);
        }
        m.open_state_entries.set(self.ready_states().map(|s| s.state_entries() as i64).sum());
        // Visits today per client, over the partitions this instance owns (sum over instances).
        // Configured clients always have a series; other clients with open days up to
        // processor.metrics_max_clients, the rest summed into client="_other".
        let now = Utc::now().timestamp_millis();
        let configured: BTreeSet<String> = self.deps.clients.clients().map(|c| c.to_string()).collect();
        let mut candidates: BTreeSet<String> = configured.clone();
        for s in self.ready_states() {
            candidates.extend(s.clients().map(str::to_owned));
        }
        let visits: BTreeMap<String, u64> = candidates
            .into_iter()
            .map(|client| {
                let tz = self.deps.clients.timezone(&client);
                let today = time::day_number(time::client_day(now, tz));
                let n = self.ready_states().map(|s| s.day_visits(&client, today)).sum();
                (client, n)
            })
            .collect();
        let split =
            series::split(&configured, visits.iter().map(|(c, v)| (c, *v)), self.deps.config.metrics_max_clients);
        let mut clients: BTreeSet<String> = BTreeSet::new();
        for client in configured.iter().chain(split.own.iter()) {
            let n = visits.get(client).copied().unwrap_or(0);
            m.visits_today.with_label_values(&[client.as_str()]).set(n as f64);
            clients.insert(client.clone());
        }
        if !split.folded.is_empty() {
            let other: u64 = split.folded.iter().filter_map(|c| visits.get(c)).sum();
            m.visits_today.with_label_values(&[OTHER_CLIENTS]).set(other as f64);
            clients.insert(OTHER_CLIENTS.to_owned());
        }
        m.visits_today_folded.set(i64::try_from(split.folded.len()).unwrap_or(i64::MAX));
        for gone in self.exported_clients.difference(&clients) {
            let _ = m.visits_today.remove_label_values(&[gone.as_str()]);
        }
        self.exported_clients = clients;
    }
}

/// [`Retry`] of the consumer loop: every failure is counted and logged, the loop waits with
/// backoff (5 s for errors that retrying is unlikely to fix, such as a schema being migrated)
/// and keeps staleness honest while it is blocked; it gives up only at shutdown.
struct LoopRetry<'a> {
    metrics: &'a ProcessorMetrics,
    status: &'a ProcessorStatus,
    shutdown: &'a CancellationToken,
}

impl Retry for LoopRetry<'_> {
    async fn again(&self, error: &StoreError, attempt: u32) -> bool {
        self.metrics.insert_errors.inc();
        self.status.healthy.store(false, Ordering::SeqCst);
        if self.shutdown.is_cancelled() {
            return false;
        }
        let backoff = if error.is_retryable() {
            self.metrics.logs.emit("clickhouse_retry", |suppressed| {
                warn!(error = %clip_display(error), attempt, suppressed, "ClickHouse request failed; retrying")
            });
            Duration::from_millis(100u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(5))
        } else {
            self.metrics.logs.emit("clickhouse_rejected", |suppressed| {
                error!(error = %clip_display(error), attempt, suppressed, "ClickHouse rejected a request (not retryable); retrying in 5 s in case the schema is being migrated")
            });
            Duration::from_secs(5)
        };
        // The loop is blocked here: keep staleness honest while ClickHouse fails.
        let wm = self.metrics.watermark_seconds.get();
        if wm > 0.0 {
            let now = Utc::now().timestamp_millis() as f64 / 1000.0;
            self.metrics.staleness_seconds.set((now - wm).max(0.0));
        }
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(backoff) => true,
        }
    }
}
