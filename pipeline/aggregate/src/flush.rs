//! The flush protocol and the takeover of a partition: the one place that says in which order
//! the processor reads and writes the store. The consumer loop ([`crate::processor`]) and the
//! property tests (`state/tests.rs`, against an in-memory model with crashes) both run it.
//!
//! A flush of the partitions one processor owns:
//! 1. **Decide.** Each copy of a dedup key applied since the last flush is decided against its
//!    partition's own copies: it counts unless the copy just before it (by
//!    [`eventflow_store::rows::CopyKey`]) was received within the dedup horizon (ADR 0003).
//! 2. **Compare.** The copies are written to `copy_log` (and `fact_copies`), then the copies the
//!    other partitions wrote since each partition's cursor are read back and compared: an own
//!    copy that a remote copy precedes within the horizon no longer counts; a remote copy that
//!    an own copy precedes gets a notice to its partition. Each writes before it reads, so of
//!    two processors deciding copies of one key at the same time at least one compares them.
//!    Notices for our partitions above their cursors are read; an own copy they name no longer
//!    counts. A copy decided in this flush is simply a duplicate; one stored earlier is taken out
//!    of the buckets (a closed day is marked for backfill) and stored again marked duplicate.
//! 3. **Fold and link.** Decided copies are folded; sessions of new entries are looked up in
//!    `session_first_visits`.
//! 4. **Write.** First-visit, late and fact-day markers and the dead letters (messages that did
//!    not decode, which the checkpoints move past), then facts with the checkpoints (the commit
//!    point: decisions, notice cursors and offsets become durable together), then the bucket
//!    tables, each step retried on its own ([`write`]).
//!
//! Every store call is retried through [`Retry`] until it succeeds; when `Retry` gives up
//! (shutdown, or a simulated crash) the states must be dropped: facts not yet committed are
//! consumed again by the next owner, and every step before the commit point is idempotent. The
//! commit point itself is not: a retried facts INSERT first asks whether the failed attempt
//! landed after all (ClickHouse stopped after storing the block, before answering).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;

use eventflow_core::ClientDirectory;
use eventflow_store::rows::{dead_letter, kind, Checkpoint, NoticeRow};
use eventflow_store::StoreError;

use crate::sink::ProcessorStore;
use crate::state::{Decisions, FactRef, FlushBatch, PartitionState, WindowConfig, EPOCH_SHIFT};

/// What to do when a store call fails.
pub trait Retry {
    /// Called after the `attempt`-th failure (1-based); resolves to true to try again.
    fn again(&self, error: &StoreError, attempt: u32) -> impl Future<Output = bool> + Send;
}

/// Never retries (tests: a failure is a crash).
#[derive(Debug, Clone, Copy)]
pub struct NoRetry;

impl Retry for NoRetry {
    async fn again(&self, _error: &StoreError, _attempt: u32) -> bool {
        false
    }
}

async fn call<T, F, Fut, R>(retry: &R, mut f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
    R: Retry,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                attempt += 1;
                if !retry.again(&e, attempt).await {
                    return Err(e);
                }
            }
        }
    }
}

/// Writes a flush in three steps (markers, then the facts with their checkpoints, then the
/// buckets), each retried on its own so that a step that succeeded is not written again. A failed
/// facts INSERT may still have landed (the block was stored, the answer lost): before trying it
/// again, the stored checkpoints are compared with the batch's, and when they are all there the
/// INSERT did land (one block: all of its rows or none) and is not repeated. ClickHouse 18.16
/// has no insert deduplication tokens for plain MergeTree tables to do this for us.
async fn write<S: ProcessorStore, R: Retry>(store: &S, batch: &FlushBatch, retry: &R) -> Result<(), StoreError> {
    call(retry, || store.write_markers(batch)).await?;
    let mut attempted = false;
    call(retry, || {
        let again = std::mem::replace(&mut attempted, true);
        async move {
            if again && committed(store, batch).await? {
                tracing::info!("the facts insert that failed had landed after all; not written again");
                return Ok(());
            }
            store.write_facts(batch).await
        }
    })
    .await?;
    call(retry, || store.write_buckets(batch)).await
}

/// Whether every checkpoint of `batch` is the stored checkpoint of its partition.
async fn committed<S: ProcessorStore>(store: &S, batch: &FlushBatch) -> Result<bool, StoreError> {
    let mut ours: BTreeMap<u16, Checkpoint> = BTreeMap::new();
    for row in batch.facts.iter().filter(|r| r.kind == kind::CHECKPOINT) {
        let cp: Checkpoint = serde_json::from_str(&row.checkpoint)
            .map_err(|e| StoreError::Invalid(format!("checkpoint of partition {}: {e}", row.kafka_partition)))?;
        ours.insert(row.kafka_partition, cp);
    }
    let partitions: Vec<u16> = ours.keys().copied().collect();
    let stored = store.checkpoints(&partitions).await?;
    Ok(!ours.is_empty() && ours.iter().all(|(p, cp)| stored.get(p) == Some(cp)))
}

/// What a written flush contained.
#[derive(Debug, Default, Clone, Copy)]
pub struct FlushReport {
    pub facts: usize,
    pub aggregate_rows: usize,
    pub decisions: Decisions,
    pub notices_written: usize,
    pub dead_letters: DeadLetterCounts,
}

/// Dead letters of a written flush, by reason.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetterCounts {
    pub unknown_schema: u64,
    pub corrupt: u64,
}

/// Flushes `states` (the partitions one processor owns). `Ok(None)`: nothing to write (with
/// `always`, the checkpoints are written even then: a takeover stores its new epoch at once).
pub async fn flush<S: ProcessorStore, R: Retry>(
    store: &S,
    states: &mut [&mut PartitionState],
    always: bool,
    retry: &R,
) -> Result<Option<FlushReport>, StoreError> {
    let notices_written = dedup(store, states, retry).await?;
    let mut decisions = Decisions::default();
    for s in states.iter_mut() {
        s.fold_decided();
        decisions += s.take_decisions();
    }
    resolve_lookups(store, states, retry).await?;
    if !always && !states.iter().any(|s| s.has_output()) {
        return Ok(None);
    }
    let mut batch = FlushBatch::default();
    for s in states.iter_mut() {
        batch.extend(s.take_flush());
    }
    write(store, &batch, retry).await?;
    for s in states.iter_mut() {
        s.flush_written();
    }
    let mut dead_letters = DeadLetterCounts::default();
    for row in &batch.dead_letters {
        if row.reason == dead_letter::UNKNOWN_SCHEMA {
            dead_letters.unknown_schema += 1;
        } else {
            dead_letters.corrupt += 1;
        }
    }
    Ok(Some(FlushReport {
        facts: batch.facts.len(),
        aggregate_rows: batch.aggregate_rows(),
        decisions,
        notices_written,
        dead_letters,
    }))
}

/// Steps 1-3: decides this flush's copies against each partition's own copies, writes them to
/// `copy_log` (and `fact_copies`), compares them with what the other partitions wrote since
/// each partition's cursor, writes the resulting notices, reads the notices for our partitions,
/// and takes out the stored copies that no longer count. Returns the number of notices written.
async fn dedup<S: ProcessorStore, R: Retry>(
    store: &S,
    states: &mut [&mut PartitionState],
    retry: &R,
) -> Result<usize, StoreError> {
    if states.is_empty() {
        return Ok(0);
    }
    let mut claims = Vec::new();
    for s in states.iter_mut() {
        s.decide();
        if s.has_deferred() {
            let seq = s.writer_seq();
            claims.extend(s.claims(seq));
        }
    }
    if !claims.is_empty() {
        call(retry, || store.write_claims(&claims)).await?;
    }
    drop(claims);

    // The other partitions' copies since the lowest cursor of each writer (each state skips
    // what it has compared, and its own).
    let cursor = lowest(states, PartitionState::claim_cursor);
    let log = call(retry, || store.claims_since(&cursor)).await?;
    let mut notices: Vec<NoticeRow> = Vec::new();
    for s in states.iter_mut() {
        let mut mine = s.compare_claims(&log);
        if !mine.is_empty() {
            let seq = s.writer_seq();
            for n in &mut mine {
                n.writer_seq = seq;
            }
            notices.extend(mine);
        }
    }
    drop(log);
    let written = notices.len();
    if !notices.is_empty() {
        call(retry, || store.write_notices(&notices)).await?;
    }

    let targets: Vec<u16> = states.iter().map(|s| s.partition()).collect();
    let cursor = lowest(states, PartitionState::notice_cursor);
    let received = call(retry, || store.notices_since(&targets, &cursor)).await?;
    for s in states.iter_mut() {
        s.take_notices(&received);
    }
    let fetch: Vec<FactRef> = states.iter_mut().flat_map(|s| s.stored_to_retract()).collect();
    if !fetch.is_empty() {
        let rows = call(retry, || store.facts_by_ref(&fetch)).await?;
        for s in states.iter_mut() {
            s.retract_stored(&rows);
        }
    }
    Ok(written)
}

/// For each writer partition in any state's cursor, the lowest position over the states.
fn lowest(
    states: &[&mut PartitionState],
    cursor: impl Fn(&PartitionState) -> &BTreeMap<u16, u64>,
) -> BTreeMap<u16, u64> {
    let writers: BTreeSet<u16> = states.iter().flat_map(|s| cursor(s).keys().copied().collect::<Vec<_>>()).collect();
    writers
        .into_iter()
        .map(|w| (w, states.iter().map(|s| cursor(s).get(&w).copied().unwrap_or(0)).min().unwrap_or(0)))
        .collect()
}

/// Step 3b: earliest visits of the sessions of new entries that the state does not know.
async fn resolve_lookups<S: ProcessorStore, R: Retry>(
    store: &S,
    states: &mut [&mut PartitionState],
    retry: &R,
) -> Result<(), StoreError> {
    let wanted: Vec<_> = states.iter().flat_map(|s| s.pending_lookups()).collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let found = call(retry, || store.first_visits(&wanted)).await?;
    for s in states.iter_mut() {
        s.resolve_lookups(found.iter().cloned());
    }
    Ok(())
}

/// Takes `partitions` over: loads their checkpoints, replays the stored facts of their open
/// days into fresh states under a new epoch, and rewrites every open bucket before anything new
/// is consumed (notices above the checkpoints' cursors are read by that first flush).
/// `rebuild_requests`: the rebuild requests this takeover answers (stored with its checkpoints).
pub async fn rebuild<S: ProcessorStore, R: Retry>(
    store: &S,
    partitions: &[u16],
    window: WindowConfig,
    clients: &Arc<ClientDirectory>,
    rebuild_requests: &BTreeMap<u16, i64>,
    retry: &R,
) -> Result<(Vec<PartitionState>, Option<FlushReport>), StoreError> {
    let checkpoints = call(retry, || store.checkpoints(partitions)).await?;
    let checkpoints_of = |s: &PartitionState| checkpoints.get(&s.partition()).cloned().unwrap_or_default();
    // A takeover that crashed before its first checkpoint may have written copy-log rows and
    // notices under the epoch after the checkpoint's, and readers moved their cursors past
    // them: the new epoch is above both, so no sequence is ever written twice.
    let written = call(retry, || store.last_writer_seqs(partitions)).await?;
    let mut states: BTreeMap<u16, PartitionState> = BTreeMap::new();
    for p in partitions {
        let cp = checkpoints.get(p).cloned().unwrap_or_else(Checkpoint::default);
        let last_epoch = written.get(p).map_or(0, |seq| seq >> EPOCH_SHIFT);
        let epoch = u64::from(cp.epoch)
            .max(last_epoch)
            .checked_add(1)
            .filter(|e| *e < (1u64 << (64 - EPOCH_SHIFT)))
            .and_then(|e| u32::try_from(e).ok())
            .unwrap_or(1);
        states.insert(*p, PartitionState::new(*p, window, clients.clone(), &cp, epoch));
    }
    let since = states.values().map(PartitionState::replay_from_ms).min().unwrap_or(0);
    let from_day = states.values().map(PartitionState::replay_from_day).min().unwrap_or(0);
    // Rows stream into the states as they arrive (replay does not depend on their order): a
    // takeover holds the states, never the rows. A failed read leaves half-replayed states, so
    // every attempt starts again from fresh ones.
    let fresh = |states: &BTreeMap<u16, PartitionState>| -> BTreeMap<u16, PartitionState> {
        states
            .iter()
            .map(|(p, s)| (*p, PartitionState::new(*p, window, clients.clone(), &checkpoints_of(s), s.epoch())))
            .collect()
    };
    let template = states;
    let mut attempt = 0;
    let mut states = loop {
        let mut states = fresh(&template);
        let result = {
            let mut each = |row: eventflow_store::rows::FactRow| {
                if let Some(s) = states.get_mut(&row.kafka_partition) {
                    s.replay_row(row);
                }
            };
            store.facts_since(partitions, since, from_day, &mut each).await
        };
        match result {
            Ok(_) => break states,
            Err(e) => {
                attempt += 1;
                if !retry.again(&e, attempt).await {
                    return Err(e);
                }
            }
        }
    };
    for (p, state) in states.iter_mut() {
        state.replay_done();
        if let Some(ms) = rebuild_requests.get(p) {
            state.set_rebuild_request_ms(*ms);
        }
    }
    let mut states: Vec<PartitionState> = states.into_values().collect();
    let report = {
        let mut refs: Vec<&mut PartitionState> = states.iter_mut().collect();
        flush(store, &mut refs, true, retry).await?
    };
    Ok((states, report))
}
