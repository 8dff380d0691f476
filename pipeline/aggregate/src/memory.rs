//! An in-memory [`ProcessorStore`]: a model of the ClickHouse tables the processor uses, with the
//! same semantics (ReplacingMergeTree: the highest version of a key wins; the facts INSERT is
//! atomic) and a crash injector. The property tests drive the flush protocol against it, and
//! the processor benchmark measures the processor's own cost with it.
//!
//! Crashes: [`MemoryStore::arm`] makes a chosen upcoming call fail before it does anything, or
//! makes the next `write` land its markers and facts and only a chosen subset of the aggregate
//! tables (any subset can survive a crash during the concurrent aggregate inserts).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use eventflow_store::rows::{
    dedup, kind, Checkpoint, ClaimRow, DailyMarketingRow, DailyTotalsRow, DaySessionRow, DeadLetterRow, FactRow,
    MarketingDims, MinuteLiveRow, MinuteVisitsRow, NoticeRow, ProgressRow,
};
use eventflow_store::StoreError;

use crate::sink::ProcessorStore;
use crate::state::{FactRef, FlushBatch, SessionRef};

/// The tables, as the last successful writes left them.
#[derive(Debug, Default)]
pub struct Tables {
    pub facts: HashMap<String, FactRow>,
    /// Facts stored twice for another reason than a copy taken out after a notice.
    pub physical_duplicates: usize,
    pub checkpoints: HashMap<u16, Checkpoint>,
    pub minute_visits: HashMap<(String, u32, i8, u16), MinuteVisitsRow>,
    pub minute_live: HashMap<(String, String, u32, u16), MinuteLiveRow>,
    pub totals: HashMap<(String, u16, u16), DailyTotalsRow>,
    pub marketing: HashMap<(String, u16, MarketingDims, u16), DailyMarketingRow>,
    pub day_sessions: HashMap<(String, u16, String, u16), DaySessionRow>,
    pub first_visits: HashMap<(String, String), i64>,
    /// `copy_log`, by writer partition and sequence.
    pub log: BTreeMap<(u16, u64), Vec<ClaimRow>>,
    pub notices: Vec<NoticeRow>,
    /// Client days with late facts (pending backfill).
    pub late_days: BTreeSet<(String, u16)>,
    /// `dead_letters` as `FINAL` reads it: one row per (topic, partition, offset).
    pub dead_letters: BTreeMap<(String, u16, i64), DeadLetterRow>,
    /// Dead-letter rows inserted, rewrites of a key included (what the table holds before merges).
    pub dead_letter_inserts: usize,
}

/// Where the next store call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    Never,
    /// The `n`-th store call (0-based) from now fails before doing anything.
    AtCall(u32),
    /// The next `write_buckets` stores only the aggregate tables whose bit is set in the mask
    /// (minute_visits, minute_live, daily_totals, daily_marketing, day_sessions), then fails.
    DuringAggregates(u8),
    /// The next facts INSERT lands, then the call fails as if ClickHouse's answer was lost.
    FactsAnswerLost,
}

/// The in-memory store.
#[derive(Debug)]
pub struct MemoryStore {
    tables: Mutex<Tables>,
    crash: Mutex<Crash>,
    /// Keeps raw facts and aggregate rows (off for benchmarks: only what decisions need).
    keep_rows: bool,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

fn keep_max<K: std::hash::Hash + Eq, R>(map: &mut HashMap<K, R>, key: K, row: R, version: impl Fn(&R) -> u64) {
    match map.get(&key) {
        Some(old) if version(old) > version(&row) => {}
        _ => {
            map.insert(key, row);
        }
    }
}

impl MemoryStore {
    /// A store keeping every row (tests).
    pub fn new() -> Self {
        MemoryStore { tables: Mutex::new(Tables::default()), crash: Mutex::new(Crash::Never), keep_rows: true }
    }

    /// A store keeping only what the processor reads back (checkpoints, copies, notices, first
    /// visits): the processor's own cost without ClickHouse, for benchmarks.
    pub fn lean() -> Self {
        MemoryStore { keep_rows: false, ..Self::new() }
    }

    /// Makes a later call fail (see [`Crash`]).
    pub fn arm(&self, crash: Crash) {
        *self.crash.lock().unwrap_or_else(|e| e.into_inner()) = crash;
    }

    /// The tables (for assertions).
    pub fn tables(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self) -> Result<(), StoreError> {
        let mut c = self.crash.lock().unwrap_or_else(|e| e.into_inner());
        match *c {
            Crash::AtCall(0) => {
                *c = Crash::Never;
                Err(StoreError::Invalid("simulated crash".into()))
            }
            Crash::AtCall(n) => {
                *c = Crash::AtCall(n - 1);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl ProcessorStore for MemoryStore {
    async fn checkpoints(&self, partitions: &[u16]) -> Result<HashMap<u16, Checkpoint>, StoreError> {
        self.check()?;
        let t = self.tables();
        Ok(partitions.iter().filter_map(|p| t.checkpoints.get(p).map(|c| (*p, c.clone()))).collect())
    }

    async fn facts_since(
        &self,
        partitions: &[u16],
        since_ms: i64,
        from_day: u16,
        each: &mut (dyn FnMut(FactRow) + Send),
    ) -> Result<usize, StoreError> {
        self.check()?;
        let t = self.tables();
        let rows = t
            .facts
            .values()
            .filter(|r| partitions.contains(&r.kafka_partition) && r.received_at_ms >= since_ms && r.day >= from_day);
        let mut n = 0;
        for r in rows {
            each(r.clone());
            n += 1;
        }
        Ok(n)
    }

    async fn first_visits(&self, sessions: &[SessionRef]) -> Result<Vec<(SessionRef, Option<i64>)>, StoreError> {
        self.check()?;
        let t = self.tables();
        Ok(sessions
            .iter()
            .map(|s| (s.clone(), t.first_visits.get(&(s.client_id.clone(), s.session_id.clone())).copied()))
            .collect())
    }

    async fn write_claims(&self, rows: &[ClaimRow]) -> Result<(), StoreError> {
        self.check()?;
        let mut t = self.tables();
        for r in rows {
            t.log.entry((r.writer_partition, r.writer_seq)).or_default().push(r.clone());
        }
        Ok(())
    }

    async fn claims_since(&self, cursor: &BTreeMap<u16, u64>) -> Result<Vec<ClaimRow>, StoreError> {
        self.check()?;
        let t = self.tables();
        let writers: BTreeSet<u16> = t.log.keys().map(|(w, _)| *w).collect();
        let mut out = Vec::new();
        for w in writers {
            let from = cursor.get(&w).copied().unwrap_or(0).saturating_add(1);
            for rows in t.log.range((w, from)..=(w, u64::MAX)).map(|(_, r)| r) {
                out.extend(rows.iter().cloned());
            }
        }
        Ok(out)
    }

    async fn last_writer_seqs(&self, partitions: &[u16]) -> Result<HashMap<u16, u64>, StoreError> {
        self.check()?;
        let t = self.tables();
        let mut out: HashMap<u16, u64> = HashMap::new();
        let written = t.log.keys().copied().chain(t.notices.iter().map(|n| (n.writer_partition, n.writer_seq)));
        for (w, seq) in written.filter(|(w, _)| partitions.contains(w)) {
            let at = out.entry(w).or_insert(0);
            *at = (*at).max(seq);
        }
        Ok(out)
    }

    async fn write_notices(&self, rows: &[NoticeRow]) -> Result<(), StoreError> {
        self.check()?;
        self.tables().notices.extend(rows.iter().cloned());
        Ok(())
    }

    async fn notices_since(&self, targets: &[u16], cursor: &BTreeMap<u16, u64>) -> Result<Vec<NoticeRow>, StoreError> {
        self.check()?;
        let t = self.tables();
        Ok(t.notices
            .iter()
            .filter(|n| {
                targets.contains(&n.target_partition)
                    && n.writer_seq > cursor.get(&n.writer_partition).copied().unwrap_or(0)
            })
            .cloned()
            .collect())
    }

    async fn facts_by_ref(&self, refs: &[FactRef]) -> Result<Vec<FactRow>, StoreError> {
        self.check()?;
        let t = self.tables();
        Ok(refs.iter().filter_map(|r| t.facts.get(&r.key.fact_id()).cloned()).collect())
    }

    async fn write_markers(&self, batch: &FlushBatch) -> Result<(), StoreError> {
        self.check()?;
        let mut t = self.tables();
        for r in &batch.first_visits {
            let e = t.first_visits.entry((r.client_id.clone(), r.session_id.clone())).or_insert(i64::MAX);
            *e = (*e).min(r.first_visit_ms);
        }
        for r in &batch.late {
            t.late_days.insert((r.client_id.clone(), r.day));
        }
        for r in &batch.dead_letters {
            t.dead_letter_inserts += 1;
            t.dead_letters.insert((r.topic.clone(), r.kafka_partition, r.kafka_offset), r.clone());
        }
        Ok(())
    }

    async fn write_facts(&self, batch: &FlushBatch) -> Result<(), StoreError> {
        self.check()?;
        let mut t = self.tables();
        for r in &batch.facts {
            if r.kind == kind::CHECKPOINT {
                let cp: Checkpoint =
                    serde_json::from_str(&r.checkpoint).map_err(|e| StoreError::Invalid(format!("checkpoint: {e}")))?;
                keep_max(&mut t.checkpoints, r.kafka_partition, cp, |c| c.seq);
            } else if self.keep_rows {
                // A fact stored again is a copy taken out after a notice (stored again marked
                // duplicate); anything else stored twice is a bug.
                let old = t.facts.get(&r.fact_id);
                let retracted = old.is_some_and(|old| old.dedup != dedup::DUPLICATE && r.dedup == dedup::DUPLICATE);
                if old.is_some() && !retracted {
                    t.physical_duplicates += 1;
                }
                if t.facts.get(&r.fact_id).is_none_or(|old| old.seq <= r.seq) {
                    t.facts.insert(r.fact_id.clone(), r.clone());
                }
            }
        }
        drop(t);
        if *self.crash.lock().unwrap_or_else(|e| e.into_inner()) == Crash::FactsAnswerLost {
            self.arm(Crash::Never);
            return Err(StoreError::Invalid("simulated loss of the answer to the facts insert".into()));
        }
        Ok(())
    }

    async fn write_buckets(&self, batch: &FlushBatch) -> Result<(), StoreError> {
        self.check()?;
        let mask = match *self.crash.lock().unwrap_or_else(|e| e.into_inner()) {
            Crash::DuringAggregates(mask) => Some(mask),
            _ => None,
        };
        let mut t = self.tables();
        let lands = |bit: u8| self.keep_rows && mask.is_none_or(|m| m & (1 << bit) != 0);
        if lands(0) {
            for r in &batch.minute_visits {
                let key = (r.client_id.clone(), r.minute, r.page, r.kafka_partition);
                keep_max(&mut t.minute_visits, key, r.clone(), |r| r.version);
            }
        }
        if lands(1) {
            for r in &batch.minute_live {
                let key = (r.client_id.clone(), r.webinar_id.clone(), r.minute, r.kafka_partition);
                keep_max(&mut t.minute_live, key, r.clone(), |r| r.version);
            }
        }
        if lands(2) {
            for r in &batch.daily_totals {
                keep_max(&mut t.totals, (r.client_id.clone(), r.day, r.kafka_partition), r.clone(), |r| r.version);
            }
        }
        if lands(3) {
            for r in &batch.daily_marketing {
                let key = (r.client_id.clone(), r.day, r.dims(), r.kafka_partition);
                keep_max(&mut t.marketing, key, r.clone(), |r| r.version);
            }
        }
        if lands(4) {
            for r in &batch.day_sessions {
                let key = (r.client_id.clone(), r.day, r.session_id.clone(), r.kafka_partition);
                keep_max(&mut t.day_sessions, key, r.clone(), |r| r.version);
            }
        }
        drop(t);
        if mask.is_some() {
            self.arm(Crash::Never);
            return Err(StoreError::Invalid("simulated crash during the aggregate inserts".into()));
        }
        Ok(())
    }

    async fn rebuild_requests(&self, _partitions: &[u16]) -> Result<HashMap<u16, i64>, StoreError> {
        self.check()?;
        Ok(HashMap::new())
    }

    async fn heartbeat(&self, _rows: &[ProgressRow]) -> Result<(), StoreError> {
        Ok(())
    }
}
