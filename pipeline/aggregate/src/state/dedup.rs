//! Copies of dedup keys (visit `event_uid`, entry `entry_id`) and which of them count.
//!
//! The rule (ADR 0003): copies of a key are ordered by [`CopyKey`] (receive time, then spool
//! identity); a copy counts unless the copy just before it was received at most
//! [`DEDUP_HORIZON_MS`] earlier. Copies of one key can be in any partition.
//!
//! The state keeps an index of this partition's own copies received within the horizon
//! (counted or not: a duplicate still makes the next copy a duplicate). A copy is not counted
//! when it is applied: it waits in `deferred` until the flush, where [`crate::flush`]:
//! 1. decides it against this partition's own earlier copies ([`PartitionState::decide`]);
//!    a later own copy it precedes is taken out again;
//! 2. writes it to `copy_log`, reads what the other partitions wrote since this partition's
//!    cursor, and compares ([`PartitionState::compare_claims`]): an own copy that a remote
//!    copy precedes is taken out; a remote copy that an own copy precedes gets a notice;
//! 3. reads the notices for this partition ([`PartitionState::take_notices`]).
//!
//! Taking out a copy stored earlier means reading its row ([`FactRef`]) and
//! [`PartitionState::retract_stored`]. For every pair of copies of one key in two partitions,
//! at least one of the two owners compares them (each writes its copies before it reads the
//! log), so no pair is missed.

use std::collections::BTreeMap;

use chrono_tz::Tz;
use rustc_hash::FxHashMap;

use eventflow_core::fact::DEDUP_HORIZON_MS;
use eventflow_store::rows::{dedup as decision, kind, ClaimRow, CopyKey, FactRow, NoticeRow};

use super::{ClientRef, PartitionState};
use crate::sink::uid_id;

/// A copy waiting for its decision. `index` points into the unflushed raw rows.
#[derive(Debug)]
struct Deferred {
    index: usize,
    client: ClientRef,
    day: u16,
    tz: Tz,
    late: bool,
    counted: Option<bool>,
}

/// One of this partition's copies of a key, decided.
#[derive(Debug, Clone, Copy)]
struct OwnCopy {
    key: CopyKey,
    /// `facts.day` (as stored).
    day: u16,
    counted: bool,
}

/// A stored fact to read from `facts` and take out of the buckets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FactRef {
    pub client_id: String,
    /// `facts.day` (as stored).
    pub day: u16,
    pub kind: i8,
    pub key: CopyKey,
}

/// Decisions of one flush, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Decisions {
    pub visits_counted: u64,
    pub visits_duplicate: u64,
    pub entries_counted: u64,
    pub entries_duplicate: u64,
    /// Counted copies taken out again because an earlier copy turned up.
    pub visits_retracted: u64,
    pub entries_retracted: u64,
}

impl std::ops::AddAssign for Decisions {
    fn add_assign(&mut self, o: Self) {
        self.visits_counted += o.visits_counted;
        self.visits_duplicate += o.visits_duplicate;
        self.entries_counted += o.entries_counted;
        self.entries_duplicate += o.entries_duplicate;
        self.visits_retracted += o.visits_retracted;
        self.entries_retracted += o.entries_retracted;
    }
}

/// Whether a copy received at `later_ms` is within the horizon of one received at
/// `earlier_ms` (and so does not count, when `earlier` comes first).
fn within_horizon(earlier_ms: i64, later_ms: i64) -> bool {
    later_ms - earlier_ms <= DEDUP_HORIZON_MS
}

#[derive(Debug)]
pub(super) struct DedupState {
    deferred: Vec<Deferred>,
    /// Own copies received within the horizon of the watermark, per key identity
    /// ([`uid_id`]), in copy order.
    own: FxHashMap<u128, Vec<OwnCopy>>,
    /// Copies to take out at this flush (after a comparison or a notice).
    to_retract: FxHashMap<CopyKey, FactRef>,
    /// Highest notice sequence read, per writer partition (persisted in the checkpoint).
    notice_cursor: BTreeMap<u16, u64>,
    /// Highest `copy_log` sequence compared, per writer partition (persisted too).
    claim_cursor: BTreeMap<u16, u64>,
    decisions: Decisions,
}

impl DedupState {
    pub(super) fn new(notice_cursor: BTreeMap<u16, u64>, claim_cursor: BTreeMap<u16, u64>) -> Self {
        Self {
            deferred: Vec::new(),
            own: FxHashMap::default(),
            to_retract: FxHashMap::default(),
            notice_cursor,
            claim_cursor,
            decisions: Decisions::default(),
        }
    }

    pub(super) fn defer(&mut self, index: usize, client: ClientRef, day: u16, tz: Tz, late: bool) {
        self.deferred.push(Deferred { index, client, day, tz, late, counted: None });
    }

    pub(super) fn len(&self) -> usize {
        self.deferred.len() + self.own.len()
    }

    pub(super) fn notice_cursor(&self) -> &BTreeMap<u16, u64> {
        &self.notice_cursor
    }

    pub(super) fn claim_cursor(&self) -> &BTreeMap<u16, u64> {
        &self.claim_cursor
    }

    /// Remembers a stored own copy (replay after a takeover).
    pub(super) fn remember(&mut self, row: &FactRow) {
        if let Some(uid) = row.dedup_uid() {
            let copy = OwnCopy { key: row.copy_key(), day: row.day, counted: row.dedup != decision::DUPLICATE };
            insert_sorted(self.own.entry(uid_id(&row.client_id, row.kind, uid)).or_default(), copy);
        }
    }

    /// Forgets own copies received more than the horizon before `watermark_ms` (they can no
    /// longer precede a new copy within the horizon).
    pub(super) fn release(&mut self, watermark_ms: i64) {
        let keep_from = watermark_ms.saturating_sub(DEDUP_HORIZON_MS + eventflow_core::time::MAX_CLOCK_AHEAD_MS);
        self.own.retain(|_, copies| {
            copies.retain(|c| c.key.received_at_ms >= keep_from);
            !copies.is_empty()
        });
    }
}

fn insert_sorted(copies: &mut Vec<OwnCopy>, copy: OwnCopy) {
    match copies.binary_search_by_key(&copy.key, |c| c.key) {
        Ok(at) => copies[at] = copy,
        Err(at) => copies.insert(at, copy),
    }
}

impl PartitionState {
    fn uid_id_of(&self, index: usize) -> Option<u128> {
        let row = &self.raw[index];
        Some(uid_id(&row.client_id, row.kind, row.dedup_uid()?))
    }

    /// Decides the copies applied since the last flush against this partition's own copies
    /// (those of earlier flushes and each other). An own copy of an earlier flush that one of
    /// them precedes within the horizon is taken out ([`Self::stored_to_retract`]).
    pub fn decide(&mut self) {
        let mut order: Vec<(u128, CopyKey, usize)> = self
            .dedup
            .deferred
            .iter()
            .enumerate()
            .filter_map(|(i, d)| Some((self.uid_id_of(d.index)?, self.raw[d.index].copy_key(), i)))
            .collect();
        order.sort_unstable();
        for (id, key, i) in order {
            let row = &self.raw[self.dedup.deferred[i].index];
            let (day, client_id, kind) = (row.day, &row.client_id, row.kind);
            let copies = self.dedup.own.entry(id).or_default();
            let at = copies.partition_point(|c| c.key < key);
            let counted = at == 0 || !within_horizon(copies[at - 1].key.received_at_ms, key.received_at_ms);
            self.dedup.deferred[i].counted = Some(counted);
            // A later own copy within the horizon (decided in an earlier flush: a copy received
            // earlier arrived later) no longer counts.
            if let Some(next) = copies.get_mut(at) {
                if next.counted && within_horizon(key.received_at_ms, next.key.received_at_ms) {
                    next.counted = false;
                    let r = FactRef { client_id: client_id.clone(), day: next.day, kind, key: next.key };
                    self.dedup.to_retract.insert(next.key, r);
                }
            }
            insert_sorted(copies, OwnCopy { key, day, counted });
        }
    }

    /// The copies applied since the last flush, as `copy_log` rows written at `writer_seq`.
    pub fn claims(&self, writer_seq: u64) -> Vec<ClaimRow> {
        self.dedup
            .deferred
            .iter()
            .filter_map(|d| {
                let row = &self.raw[d.index];
                Some(ClaimRow {
                    writer_partition: self.partition,
                    writer_seq,
                    client_id: row.client_id.clone(),
                    kind: row.kind,
                    uid: row.dedup_uid()?.to_owned(),
                    received_at_ms: row.received_at_ms,
                    spool_id: row.spool_id,
                    spool_seq: row.spool_seq,
                    day: row.day,
                })
            })
            .collect()
    }

    /// A fresh processing sequence for what this partition writes to `copy_log` or
    /// `dedup_notices` in this flush (readers keep a cursor per writer, so every flush needs a
    /// higher sequence).
    pub fn writer_seq(&mut self) -> u64 {
        self.next_seq()
    }

    /// Highest `copy_log` sequence compared so far, per writer partition.
    pub fn claim_cursor(&self) -> &BTreeMap<u16, u64> {
        self.dedup.claim_cursor()
    }

    /// Highest notice sequence read so far, per writer partition.
    pub fn notice_cursor(&self) -> &BTreeMap<u16, u64> {
        self.dedup.notice_cursor()
    }

    /// Compares the copies other partitions wrote (those above this partition's cursor; own
    /// ones are skipped) with this partition's copies of the same keys. An own copy that a
    /// remote copy precedes within the horizon is taken out; for a remote copy that an own copy
    /// precedes within the horizon, returns a notice (its `writer_seq` is set by the caller).
    pub fn compare_claims(&mut self, claims: &[ClaimRow]) -> Vec<NoticeRow> {
        let mut notices = Vec::new();
        let mut cursor = self.dedup.claim_cursor.clone();
        for c in claims {
            if c.writer_partition == self.partition {
                continue;
            }
            if c.writer_seq <= self.dedup.claim_cursor.get(&c.writer_partition).copied().unwrap_or(0) {
                continue;
            }
            let at = cursor.entry(c.writer_partition).or_insert(0);
            *at = (*at).max(c.writer_seq);
            let Some(copies) = self.dedup.own.get_mut(&uid_id(&c.client_id, c.kind, &c.uid)) else { continue };
            let remote = c.key();
            let pos = copies.partition_point(|o| o.key < remote);
            // Our copy just before the remote one precedes it: the remote copy does not count.
            if let Some(before) = pos.checked_sub(1).map(|i| copies[i]) {
                if within_horizon(before.key.received_at_ms, remote.received_at_ms) {
                    notices.push(NoticeRow {
                        writer_partition: self.partition,
                        writer_seq: 0,
                        target_partition: c.writer_partition,
                        client_id: c.client_id.clone(),
                        kind: c.kind,
                        uid: c.uid.clone(),
                        day: c.day,
                        loser_received_at_ms: remote.received_at_ms,
                        loser_spool_id: remote.spool_id,
                        loser_spool_seq: remote.spool_seq,
                        winner_received_at_ms: before.key.received_at_ms,
                        winner_spool_id: before.key.spool_id,
                        winner_spool_seq: before.key.spool_seq,
                    });
                }
            }
            // The remote copy precedes our next copy: ours does not count.
            if let Some(next) = copies.get_mut(pos) {
                if next.counted && next.key != remote && within_horizon(remote.received_at_ms, next.key.received_at_ms)
                {
                    next.counted = false;
                    let r = FactRef { client_id: c.client_id.clone(), day: next.day, kind: c.kind, key: next.key };
                    self.dedup.to_retract.insert(next.key, r);
                }
            }
        }
        self.dedup.claim_cursor = cursor;
        notices
    }

    /// Reads the notices addressed to this partition above its cursor (others are ignored):
    /// each names an own copy that another partition's copy precedes.
    pub fn take_notices(&mut self, notices: &[NoticeRow]) {
        let mut cursor = self.dedup.notice_cursor.clone();
        for n in notices.iter().filter(|n| n.target_partition == self.partition) {
            if n.writer_seq <= self.dedup.notice_cursor.get(&n.writer_partition).copied().unwrap_or(0) {
                continue;
            }
            let at = cursor.entry(n.writer_partition).or_insert(0);
            *at = (*at).max(n.writer_seq);
            let loser = n.loser();
            if let Some(copy) = self
                .dedup
                .own
                .get_mut(&uid_id(&n.client_id, n.kind, &n.uid))
                .and_then(|copies| copies.iter_mut().find(|c| c.key == loser))
            {
                if !copy.counted {
                    continue;
                }
                copy.counted = false;
            }
            // Not in the index: a copy older than the horizon the state keeps, or one not
            // consumed yet (its own flush will see the winner in copy_log). Its stored row
            // decides.
            let r = FactRef { client_id: n.client_id.clone(), day: n.day, kind: n.kind, key: loser };
            self.dedup.to_retract.insert(loser, r);
        }
        self.dedup.notice_cursor = cursor;
    }

    /// The stored facts to read and give to [`Self::retract_stored`]: own copies of earlier
    /// flushes that no longer count. Copies still deferred in this flush are simply decided
    /// duplicates.
    pub fn stored_to_retract(&mut self) -> Vec<FactRef> {
        let to_retract = std::mem::take(&mut self.dedup.to_retract);
        if to_retract.is_empty() {
            return Vec::new();
        }
        let raw = &self.raw;
        let mut fetch = Vec::new();
        let deferred: FxHashMap<CopyKey, usize> =
            self.dedup.deferred.iter().enumerate().map(|(i, d)| (raw[d.index].copy_key(), i)).collect();
        for (key, r) in to_retract {
            match deferred.get(&key) {
                Some(i) => self.dedup.deferred[*i].counted = Some(false),
                None => fetch.push(r),
            }
        }
        fetch
    }

    /// Takes stored copies that no longer count out of the buckets they were counted in (on
    /// an open day in state exactly; on a closed day by marking it for backfill) and stores
    /// them again marked duplicate, under a new sequence. Copies stored as duplicates change
    /// nothing.
    pub fn retract_stored(&mut self, rows: &[FactRow]) {
        for row in rows {
            if row.dedup == decision::DUPLICATE || row.kafka_partition != self.partition || row.dedup_uid().is_none() {
                continue;
            }
            let (day, tz) = self.day_of(&row.client_id, row.event_time_ms);
            let client = self.intern(&row.client_id);
            // A day still held in state is written again at the next flush: take the copy out
            // there. Otherwise (closed, or the copy was late and never in the stream's buckets)
            // backfill recounts the day.
            let in_state = row.late == 0 && self.days.contains_key(&(client.clone(), day));
            if !(in_state && self.uncount(&client, day, tz, row)) {
                let seq = self.seq();
                self.mark_late(&client, day, tz, false, seq);
            }
            if row.kind == kind::VISIT {
                self.dedup.decisions.visits_retracted += 1;
            } else {
                self.dedup.decisions.entries_retracted += 1;
            }
            let mut again = row.clone();
            again.dedup = decision::DUPLICATE;
            again.seq = self.next_seq();
            self.raw.push(again);
        }
    }

    /// Folds the deferred copies as decided, sets their stored decision and empties the list.
    pub fn fold_decided(&mut self) {
        let deferred = std::mem::take(&mut self.dedup.deferred);
        for d in deferred {
            let counted = d.counted.unwrap_or(false);
            let mut row = std::mem::take(&mut self.raw[d.index]);
            row.dedup = if counted { decision::COUNTED } else { decision::DUPLICATE };
            let stats = &mut self.dedup.decisions;
            match (row.kind, counted) {
                (kind::VISIT, true) => stats.visits_counted += 1,
                (kind::VISIT, false) => stats.visits_duplicate += 1,
                (_, true) => stats.entries_counted += 1,
                (_, false) => stats.entries_duplicate += 1,
            }
            if !d.late {
                if counted {
                    self.count(&d.client, d.day, d.tz, &row);
                } else {
                    self.not_counted(&d.client, d.day, d.tz, &row);
                }
            }
            self.raw[d.index] = row;
        }
    }

    /// Whether copies are waiting for a decision.
    pub fn has_deferred(&self) -> bool {
        !self.dedup.deferred.is_empty()
    }

    /// Decisions since the last call (for metrics).
    pub fn take_decisions(&mut self) -> Decisions {
        std::mem::take(&mut self.dedup.decisions)
    }
}
