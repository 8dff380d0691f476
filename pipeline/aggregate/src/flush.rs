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
//! 4. **Write.** First-visit and late markers, then facts with the checkpoints (the commit
//!    point: decisions, notice cursors and offsets become durable together), then the bucket
//!    tables ([`ProcessorStore::write`]).
//!
//! Every store call is retried through [`Retry`] until it succeeds; when `Retry` gives up
//! (shutdown, or a simulated crash) the states must be dropped: facts not yet committed are
//! consumed again by the next owner, and every step before the commit point is idempotent.

use std::collections::{BTreeMap, HashSet};

use rustc_hash::{FxHashMap, FxHashSet};
use std::future::Future;
use std::sync::Arc;

use eventflow_core::ClientDirectory;
use eventflow_store::rows::{Checkpoint, CopyKey, CopyRow, NoticeRow};
use eventflow_store::StoreError;

use crate::sink::{uid_id, uid_ref, ProcessorStore, UidKey, UidRef};
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
    Ok(Some(FlushReport {
        facts: batch.facts.len(),
        aggregate_rows: batch.aggregate_rows(),
        decisions,
        notices_written,
    }))
}

fn copy_id(c: &CopyRow) -> u128 {
    uid_id(&c.client_id, c.kind, &c.uid)
}

/// Step 1: writes the copies of this flush, reads the first copies of their keys, decides
/// every copy and writes the notices. Returns the number of notices written.
///
/// The hot path of every flush: keys are handled by their 128-bit identity ([`uid_id`]), and
/// strings are neither hashed again nor cloned beyond the rows the store needs.
async fn decide_copies<S: ProcessorStore, R: Retry>(
    store: &S,
    states: &mut [&mut PartitionState],
    retry: &R,
) -> Result<usize, StoreError> {
    let mut all: Vec<CopyRow> = Vec::new();
    // Which state each copy belongs to (copies of one state are consecutive, in its order).
    let mut owner: Vec<usize> = Vec::new();
    for (i, s) in states.iter().enumerate() {
        let claims = s.claims();
        owner.extend(std::iter::repeat_n(i, claims.len()));
        all.extend(claims);
    }
    if all.is_empty() {
        return Ok(0);
    }
    call(retry, || store.write_copies(&all)).await?;

    // How many copies of one key this flush holds: the first `n + 1` copies of a key then
    // include the first copy that is not ours (at most `n` of ours can precede it).
    let ids: Vec<u128> = all.iter().map(copy_id).collect();
    let mut first_claim: FxHashMap<u128, (usize, usize)> = FxHashMap::default();
    first_claim.reserve(all.len());
    let mut ours: FxHashSet<(u128, CopyKey)> = FxHashSet::default();
    ours.reserve(all.len());
    for (j, c) in all.iter().enumerate() {
        first_claim.entry(ids[j]).or_insert((j, 0)).1 += 1;
        ours.insert((ids[j], c.key()));
    }
    let per_key = first_claim.values().map(|(_, n)| *n).max().unwrap_or(1) + 1;
    let keys: Vec<UidRef<'_>> =
        first_claim.values().map(|(j, _)| (all[*j].client_id.as_str(), all[*j].kind, all[*j].uid.as_str())).collect();
    let found = call(retry, || store.first_copies(&keys, per_key)).await?;
    drop(keys);
    let mut copies: FxHashMap<u128, Vec<CopyRow>> = FxHashMap::default();
    copies.reserve(first_claim.len());
    for c in found {
        copies.entry(copy_id(&c)).or_default().push(c);
    }
    for list in copies.values_mut() {
        if list.len() > 1 {
            list.sort_by_key(CopyRow::key);
            list.dedup_by_key(|c| c.key());
        }
    }

    // A key whose copies are not visible yet (cannot happen on one server: ours were just
    // written) is decided in favour of our copy.
    let mut firsts: Vec<Vec<bool>> = vec![Vec::new(); states.len()];
    for (j, c) in all.iter().enumerate() {
        let first = copies.get(&ids[j]).and_then(|l| l.first()).is_none_or(|f| f.key() == c.key());
        firsts[owner[j]].push(first);
    }
    for (s, first) in states.iter_mut().zip(firsts) {
        s.decide(first);
    }

    // Notices: the first copy is ours and other copies were stored before it: every partition
    // holding copies of the key is told which copy is first (its owner takes out any later copy
    // it counted; copies claimed but never stored are decided when they are consumed again).
    let contested: Vec<(u128, &CopyRow)> = copies
        .iter()
        .filter(|(id, list)| {
            list.first().is_some_and(|f| ours.contains(&(**id, f.key())))
                && list.iter().any(|c| !ours.contains(&(**id, c.key())))
        })
        .filter_map(|(id, list)| Some((*id, list.first()?)))
        .collect();
    if contested.is_empty() {
        return Ok(0);
    }
    let keys: Vec<UidRef<'_>> = contested.iter().map(|(_, f)| (f.client_id.as_str(), f.kind, f.uid.as_str())).collect();
    let holders = call(retry, || store.copy_partitions(&keys)).await?;
    let winners: FxHashMap<u128, &CopyRow> = contested.iter().copied().collect();
    let mut notices: Vec<NoticeRow> = Vec::new();
    for (key, target) in holders {
        let Some(first) = winners.get(&uid_id(&key.0, key.1, &key.2)) else { continue };
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
    let refs: Vec<UidRef<'_>> = keys.iter().map(uid_ref).collect();
    let copies = call(retry, || store.copies_in(&refs, &targets)).await?;
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
