//! The flush protocol and the takeover of a partition: the one place that says in which order
//! the processor reads and writes the store. The consumer loop ([`crate::processor`]) and the
//! property tests (`state/tests.rs`, against an in-memory model with crashes) both run it.
//!
//! A flush of the partitions one processor owns:
//! 1. **Copies.** Every copy of a dedup key applied since the last flush is written to
//!    `fact_copies` (before its fact: a copy row only says "this fact exists"), then the first
//!    copies of those keys are read back. A copy counts iff it is the first of its key
//!    ([`eventflow_store::rows::CopyKey`] order); when the first copy is one of ours and other
//!    copies were written before, every partition holding copies of the key gets a notice
//!    naming the first copy (ADR 0003). Two processors deciding copies of one key at the same
//!    time: each writes its copies before reading, so at least one of them sees both, and
//!    either it loses or it notifies the other.
//! 2. **Notices.** Notices for our partitions above their cursors are read; our copies of a
//!    noticed key after its first copy become duplicates: deferred ones at once, stored ones are
//!    taken out of the buckets (a closed day is marked for backfill) and stored again marked
//!    duplicate, so the commit below makes the change durable.
//! 3. **Fold and link.** Decided copies are folded; sessions of new entries are looked up in
//!    `session_first_visits`.
//! 4. **Write.** First-visit, late and fact-day markers and the dead letters (messages that did
//!    not decode, which the checkpoints move past), then facts with the checkpoints (the commit
//!    point: decisions, notice cursors and offsets become durable together), then the bucket
//!    tables ([`ProcessorStore::write`]).
//!
//! Every store call is retried through [`Retry`] until it succeeds; when `Retry` gives up
//! (shutdown, or a simulated crash) the states must be dropped: facts not yet committed are
//! consumed again by the next owner, and every step before the commit point is idempotent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;

use eventflow_core::ClientDirectory;
use eventflow_store::rows::{dead_letter, Checkpoint, CopyKey, CopyRow, NoticeRow};
use eventflow_store::StoreError;

use crate::sink::{ProcessorStore, UidKey};
use crate::state::{Decisions, FlushBatch, PartitionState, WindowConfig, EPOCH_SHIFT};

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
    let notices_written = decide_copies(store, states, retry).await?;
    apply_notices(store, states, retry).await?;
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
    call(retry, || store.write(&batch)).await?;
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

fn uid_key(c: &CopyRow) -> UidKey {
    (c.client_id.clone(), c.kind, c.uid.clone())
}

/// Step 1: writes the copies of this flush, reads the first copies of their keys, decides
/// every copy and writes the notices. Returns the number of notices written.
async fn decide_copies<S: ProcessorStore, R: Retry>(
    store: &S,
    states: &mut [&mut PartitionState],
    retry: &R,
) -> Result<usize, StoreError> {
    let claims: Vec<Vec<CopyRow>> = states.iter().map(|s| s.claims()).collect();
    let all: Vec<CopyRow> = claims.iter().flatten().cloned().collect();
    if all.is_empty() {
        return Ok(0);
    }
    call(retry, || store.write_copies(&all)).await?;

    // How many copies of one key this flush holds: the first `n + 1` copies of a key then
    // include the first copy that is not ours (at most `n` of ours can precede it).
    let mut ours_per_key: HashMap<UidKey, usize> = HashMap::new();
    let mut ours: HashSet<(UidKey, CopyKey)> = HashSet::new();
    for c in &all {
        *ours_per_key.entry(uid_key(c)).or_default() += 1;
        ours.insert((uid_key(c), c.key()));
    }
    let per_key = ours_per_key.values().copied().max().unwrap_or(1) + 1;
    let keys: Vec<UidKey> = ours_per_key.keys().cloned().collect();
    let found = call(retry, || store.first_copies(&keys, per_key)).await?;
    let mut copies: HashMap<UidKey, Vec<CopyRow>> = HashMap::new();
    for c in found {
        copies.entry(uid_key(&c)).or_default().push(c);
    }
    for list in copies.values_mut() {
        list.sort_by_key(CopyRow::key);
        list.dedup_by_key(|c| c.key());
    }

    for (s, claims) in states.iter_mut().zip(&claims) {
        // A key whose copies are not visible yet (cannot happen on one server: ours were just
        // written) is decided in favour of our copy.
        let first =
            claims.iter().map(|c| copies.get(&uid_key(c)).and_then(|l| l.first()).is_none_or(|f| f.key() == c.key()));
        s.decide(first.collect::<Vec<bool>>());
    }

    // Notices: the first copy is ours and other copies were stored before it: every partition
    // holding copies of the key is told which copy is first (its owner takes out any later copy
    // it counted; copies claimed but never stored are decided when they are consumed again).
    let contested: Vec<UidKey> = copies
        .iter()
        .filter(|(key, list)| {
            list.first().is_some_and(|f| ours.contains(&((*key).clone(), f.key())))
                && list.iter().any(|c| !ours.contains(&((*key).clone(), c.key())))
        })
        .map(|(key, _)| key.clone())
        .collect();
    if contested.is_empty() {
        return Ok(0);
    }
    let holders = call(retry, || store.copy_partitions(&contested)).await?;
    let mut notices: Vec<NoticeRow> = Vec::new();
    for (key, target) in holders {
        let Some(first) = copies.get(&key).and_then(|l| l.first()) else { continue };
        notices.push(NoticeRow {
            writer_partition: first.kafka_partition,
            writer_seq: 0,
            target_partition: target,
            client_id: key.0,
            kind: key.1,
            uid: key.2,
            winner_received_at_ms: first.received_at_ms,
            winner_spool_id: first.spool_id,
            winner_spool_seq: first.spool_seq,
        });
    }
    let mut seqs: BTreeMap<u16, u64> = BTreeMap::new();
    for s in states.iter_mut() {
        if notices.iter().any(|n| n.writer_partition == s.partition()) {
            seqs.insert(s.partition(), s.notice_seq());
        }
    }
    for n in &mut notices {
        n.writer_seq = seqs.get(&n.writer_partition).copied().unwrap_or(0);
    }
    call(retry, || store.write_notices(&notices)).await?;
    Ok(notices.len())
}

/// Step 2: reads the notices for our partitions and takes the named copies out.
async fn apply_notices<S: ProcessorStore, R: Retry>(
    store: &S,
    states: &mut [&mut PartitionState],
    retry: &R,
) -> Result<(), StoreError> {
    if states.is_empty() {
        return Ok(());
    }
    let targets: Vec<u16> = states.iter().map(|s| s.partition()).collect();
    // One read for all our partitions, from the lowest cursor of each writer; each state
    // skips what it has seen.
    let mut cursor: BTreeMap<u16, u64> = BTreeMap::new();
    let writers: HashSet<u16> = states.iter().flat_map(|s| s.notice_cursor().keys().copied()).collect();
    for w in writers {
        let low = states.iter().map(|s| s.notice_cursor().get(&w).copied().unwrap_or(0)).min().unwrap_or(0);
        cursor.insert(w, low);
    }
    let notices = call(retry, || store.notices_since(&targets, &cursor)).await?;
    if notices.is_empty() {
        return Ok(());
    }
    let mut keys: Vec<UidKey> = states.iter_mut().flat_map(|s| s.take_notices(&notices)).collect();
    keys.sort();
    keys.dedup();
    if keys.is_empty() {
        return Ok(());
    }
    let copies = call(retry, || store.copies_in(&keys, &targets)).await?;
    let fetch: Vec<_> = states.iter_mut().flat_map(|s| s.notice_candidates(&copies)).collect();
    if fetch.is_empty() {
        return Ok(());
    }
    let rows = call(retry, || store.facts_by_ref(&fetch)).await?;
    for s in states.iter_mut() {
        s.retract_stored(&rows);
    }
    Ok(())
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
    let mut states: BTreeMap<u16, PartitionState> = BTreeMap::new();
    for p in partitions {
        let cp = checkpoints.get(p).cloned().unwrap_or_else(Checkpoint::default);
        let epoch = cp.epoch.checked_add(1).filter(|e| u64::from(*e) < (1u64 << (64 - EPOCH_SHIFT))).unwrap_or(1);
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
