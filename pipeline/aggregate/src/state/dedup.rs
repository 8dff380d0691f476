//! Copies of dedup keys (visit `event_uid`, entry `entry_id`) and what the state knows about
//! which copy is first.
//!
//! A copy is not counted when it is applied: it waits in `deferred` until the next flush, where
//! [`crate::flush`] writes every deferred copy to `fact_copies`, reads back the first copies of
//! their keys (from every partition) and decides each one ([`PartitionState::decide`]). A copy
//! counted in one flush can turn out not to be first later (a partition that lagged behind
//! delivers an earlier copy); its owner then reads a notice and takes it out again
//! ([`PartitionState::take_notices`], [`PartitionState::notice_candidates`],
//! [`PartitionState::retract_stored`]). ADR 0003.

use std::collections::BTreeMap;

use chrono_tz::Tz;
use rustc_hash::FxHashMap;

use eventflow_store::rows::{dedup as decision, kind, CopyKey, CopyRow, FactRow, NoticeRow};

use crate::sink::UidKey;

use super::{ClientRef, PartitionState};

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

/// A stored fact a notice is about, to be read from `facts` and taken out of the buckets.
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
    /// Counted copies taken out again because a notice named an earlier copy.
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

#[derive(Debug)]
pub(super) struct DedupState {
    deferred: Vec<Deferred>,
    /// Stored copies this state took out after a notice (stored again as duplicates at the
    /// next flush), with their client day, until it closes.
    lost: FxHashMap<CopyKey, u16>,
    /// Notices of this flush: the winner per key.
    noticed: FxHashMap<UidKey, CopyKey>,
    /// Highest notice sequence read, per writer partition (persisted in the checkpoint).
    cursor: BTreeMap<u16, u64>,
    decisions: Decisions,
}

impl DedupState {
    pub(super) fn new(cursor: BTreeMap<u16, u64>) -> Self {
        Self {
            deferred: Vec::new(),
            lost: FxHashMap::default(),
            noticed: FxHashMap::default(),
            cursor,
            decisions: Decisions::default(),
        }
    }

    pub(super) fn defer(&mut self, index: usize, client: ClientRef, day: u16, tz: Tz, late: bool) {
        self.deferred.push(Deferred { index, client, day, tz, late, counted: None });
    }

    pub(super) fn len(&self) -> usize {
        self.deferred.len() + self.lost.len()
    }

    pub(super) fn cursor(&self) -> &BTreeMap<u16, u64> {
        &self.cursor
    }

    /// Forgets lost copies of days for which `closed` holds.
    pub(super) fn release(&mut self, closed: impl Fn(u16) -> bool) {
        self.lost.retain(|_, day| !closed(*day));
    }
}

impl PartitionState {
    /// The copies applied since the last flush, as `fact_copies` rows (in deferral order).
    pub fn claims(&self) -> Vec<CopyRow> {
        self.dedup
            .deferred
            .iter()
            .filter_map(|d| {
                let row = &self.raw[d.index];
                Some(CopyRow {
                    client_id: row.client_id.clone(),
                    kind: row.kind,
                    uid: row.dedup_uid()?.to_owned(),
                    received_at_ms: row.received_at_ms,
                    spool_id: row.spool_id,
                    spool_seq: row.spool_seq,
                    kafka_partition: row.kafka_partition,
                    day: row.day,
                })
            })
            .collect()
    }

    /// Decides the deferred copies: `first(claim)` says whether that copy (as returned by
    /// [`Self::claims`], same order) is the first of its key.
    pub fn decide(&mut self, first: impl IntoIterator<Item = bool>) {
        for (d, is_first) in self.dedup.deferred.iter_mut().zip(first) {
            d.counted = Some(is_first);
        }
    }

    /// A fresh processing sequence for the notices this partition writes in this flush (notice
    /// readers keep a cursor per writer, so every flush's notices need a higher sequence).
    pub fn notice_seq(&mut self) -> u64 {
        self.next_seq()
    }

    /// Highest notice sequence read so far, per writer partition.
    pub fn notice_cursor(&self) -> &BTreeMap<u16, u64> {
        self.dedup.cursor()
    }

    /// Takes the notices addressed to this partition above its cursor (others are ignored) and
    /// returns their keys: [`Self::notice_candidates`] then needs every copy of those keys this
    /// partition holds.
    pub fn take_notices(&mut self, notices: &[NoticeRow]) -> Vec<UidKey> {
        let mut cursor = self.dedup.cursor.clone();
        for n in notices.iter().filter(|n| n.target_partition == self.partition) {
            let seen = self.dedup.cursor.get(&n.writer_partition).copied().unwrap_or(0);
            if n.writer_seq <= seen {
                continue;
            }
            let c = cursor.entry(n.writer_partition).or_insert(0);
            *c = (*c).max(n.writer_seq);
            let winner = self.dedup.noticed.entry((n.client_id.clone(), n.kind, n.uid.clone())).or_insert(n.winner());
            *winner = (*winner).min(n.winner());
        }
        self.dedup.cursor = cursor;
        self.dedup.noticed.keys().cloned().collect()
    }

    /// Given the copies of the noticed keys (any partition), finds this partition's copies that
    /// come after a notice's winner: one deferred in this flush becomes a duplicate; a stored
    /// one is returned, to be read from the store and given to [`Self::retract_stored`].
    pub fn notice_candidates(&mut self, copies: &[CopyRow]) -> Vec<FactRef> {
        let noticed = std::mem::take(&mut self.dedup.noticed);
        let mut fetch = Vec::new();
        for c in copies.iter().filter(|c| c.kafka_partition == self.partition) {
            let Some(winner) = noticed.get(&(c.client_id.clone(), c.kind, c.uid.clone())) else { continue };
            let key = c.key();
            if key <= *winner || self.dedup.lost.contains_key(&key) {
                continue;
            }
            let raw = &self.raw;
            match self.dedup.deferred.iter_mut().find(|d| raw[d.index].copy_key() == key) {
                Some(d) => d.counted = Some(false),
                None => fetch.push(FactRef { client_id: c.client_id.clone(), day: c.day, kind: c.kind, key }),
            }
        }
        fetch
    }

    /// Takes stored copies that a notice's winner precedes out of the buckets they were
    /// counted in (on an open day in state exactly; on a closed day by marking it for
    /// backfill) and stores them again marked duplicate, under a new sequence. Copies stored
    /// as duplicates change nothing.
    pub fn retract_stored(&mut self, rows: &[FactRow]) {
        for row in rows {
            if row.dedup == decision::DUPLICATE || row.kafka_partition != self.partition || row.dedup_uid().is_none() {
                continue;
            }
            let (day, tz) = self.day_of(&row.client_id, row.event_time_ms);
            if self.dedup.lost.insert(row.copy_key(), day).is_some() {
                continue;
            }
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
    /// Call after [`Self::decide`] and the notices of the flush.
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
