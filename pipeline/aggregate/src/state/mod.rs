//! Event-time windows of one Kafka partition: the processor's pure core.
//!
//! Facts of one partition (the same partition number of the visit, entry and ping topics; keyed
//! by session, so a session never spans partitions) are applied in processing order. The state
//! keeps, for every *open* client day, compact counters and 128-bit hashed session sets with
//! reference counts, never the raw facts. A day is open until the partition watermark (highest
//! receive time seen) passes its end plus the allowed lateness; facts of closed days are stored
//! raw, flagged late and folded in by backfill.
//!
//! Every bucket this state emits is the FULL value of the bucket for this partition, computed
//! from all facts with processing sequence `<= version`. That is what makes writes idempotent
//! (ADR 0002): a replay recomputes the same value for the same key, and the highest version wins.
//!
//! Counting rules (CONTRACT.md §1, §4; `docs/architecture.md`), mirrored by the raw recount in
//! `eventflow-store`:
//! - visits: one per `(client_id, event_uid)` within the dedup horizon: copies are ordered by
//!   `(received_at_ms, spool_id, spool_seq)` ([`CopyKey`]) over all partitions, and a copy counts
//!   unless the copy just before it was received at most 72 hours earlier; every visit without
//!   `event_uid` counts. Copies wait for the next flush, where [`crate::flush`] decides them and
//!   compares them with the other partitions' copies (ADR 0003): the module [`dedup`] holds that
//!   part of the state;
//! - unique sessions: distinct sessions of counted visits (reference-counted, so a copy found
//!   not to be first takes its session out again);
//! - entries: one per `(client_id, entry_id)`, the same rule; an entry is linked when
//!   any visit of its session (counted or duplicate, on time or late) is at or before its time;
//! - live viewers: distinct sessions that pinged a webinar in a UTC minute.
//!
//! Labels: a missing, empty or literal `"unknown"` UTM field aggregates under `"unknown"` (and a
//! visit whose source is `"unknown"` counts as UTM-missing); a campaign link id aggregates under
//! itself only when the collector resolved it to a link of the same client, else under
//! `"unresolved"` ([`labels`]).

mod count;
mod dedup;
mod output;

use std::sync::Arc;

use chrono_tz::Tz;
use rustc_hash::{FxHashMap, FxHashSet};

use eventflow_core::fact::{Fact, FactKind, PageKind};
use eventflow_core::time;
use eventflow_core::ClientDirectory;
use eventflow_store::rows::{
    Checkpoint, CopyKey, DailyMarketingRow, DailyTotalsRow, DayCounters, DaySessionRow, FactDayRow, FactRow,
    LateFactRow, MarketingCounters, MarketingDims, MinuteLiveRow, MinuteVisitsRow, Provenance, SessionFirstVisitRow,
    SpoolMark, TopicOffsets,
};

pub use dedup::{Decisions, FactRef};

const DAY_MS: i64 = 86_400_000;
/// Spool marks not seen for this long are pruned from checkpoints.
const SPOOL_MARK_RETENTION_MS: i64 = 30 * DAY_MS;
/// Bits of the processing sequence below the ownership epoch.
pub const EPOCH_SHIFT: u32 = 40;

/// Window parameters.
#[derive(Debug, Clone, Copy)]
pub struct WindowConfig {
    /// How long after a day's end its buckets still accept facts (default 48 h).
    pub allowed_lateness_ms: i64,
}

impl WindowConfig {
    pub fn new(allowed_lateness_ms: i64) -> Self {
        Self { allowed_lateness_ms }
    }
}

/// What happened to one applied fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Folded into its buckets.
    Counted,
    /// A copy of a dedup key: decided (counted or duplicate) at the next flush.
    Deferred,
    /// Its day had closed: stored raw and flagged late; backfill folds it in.
    Late,
    /// The same fact (same spool id and sequence) was already processed; dropped entirely.
    Redelivery,
}

/// Everything one flush writes, in write order (see [`crate::flush`]).
#[derive(Debug, Default)]
pub struct FlushBatch {
    /// Written first: they only ever lower a session's first-visit time, so writing them
    /// ahead of the facts they come from is safe, and they are never lost in a crash.
    pub first_visits: Vec<SessionFirstVisitRow>,
    pub late: Vec<LateFactRow>,
    /// Client days with facts in this flush (markers: written ahead of the facts).
    pub fact_days: Vec<FactDayRow>,
    /// The commit point: facts plus the checkpoint row, one atomic INSERT.
    pub facts: Vec<FactRow>,
    pub minute_visits: Vec<MinuteVisitsRow>,
    pub minute_live: Vec<MinuteLiveRow>,
    pub daily_totals: Vec<DailyTotalsRow>,
    pub daily_marketing: Vec<DailyMarketingRow>,
    pub day_sessions: Vec<DaySessionRow>,
    pub checkpoint: Checkpoint,
}

impl FlushBatch {
    /// Rows of aggregate tables in this batch.
    pub fn aggregate_rows(&self) -> usize {
        self.minute_visits.len()
            + self.minute_live.len()
            + self.daily_totals.len()
            + self.daily_marketing.len()
            + self.day_sessions.len()
    }

    /// Appends the rows of `other` (one batch for the partitions of one processor).
    pub fn extend(&mut self, other: FlushBatch) {
        self.first_visits.extend(other.first_visits);
        self.late.extend(other.late);
        self.fact_days.extend(other.fact_days);
        self.facts.extend(other.facts);
        self.minute_visits.extend(other.minute_visits);
        self.minute_live.extend(other.minute_live);
        self.daily_totals.extend(other.daily_totals);
        self.daily_marketing.extend(other.daily_marketing);
        self.day_sessions.extend(other.day_sessions);
    }
}

type ClientRef = Arc<str>;

/// Reference counts of the sessions of a bucket: a session counts while it has a counted visit.
type SessionCounts = FxHashMap<u128, u32>;

#[derive(Debug)]
struct MarketingState {
    dims: MarketingDims,
    counters: MarketingCounters,
    sessions: SessionCounts,
    dirty: bool,
}

#[derive(Debug)]
struct DayState {
    tz: Tz,
    counters: DayCounters,
    sessions: SessionCounts,
    marketing: FxHashMap<u128, MarketingState>,
    dirty: bool,
}

#[derive(Debug, Clone, Copy)]
struct EntryRef {
    /// The counted copy (so a notice can take it out again).
    key: CopyKey,
    day: u16,
    marketing: u128,
    event_ms: i64,
    linked: bool,
}

#[derive(Debug)]
struct SessionState {
    client: ClientRef,
    session_id: String,
    /// Earliest visit seen for the session (in this state or looked up in the store).
    first_visit_ms: Option<i64>,
    /// Whether `session_first_visits` was consulted, so older visits are accounted for.
    store_checked: bool,
    /// Counted entries of open days, re-evaluated when an earlier visit shows up.
    entries: Vec<EntryRef>,
    /// Latest event time of any fact of the session; the state is dropped when its day closes.
    last_event_ms: i64,
}

#[derive(Debug)]
struct LiveState {
    webinar_id: String,
    day: u16,
    sessions: FxHashSet<u128>,
    dirty: bool,
}

#[derive(Debug)]
struct MinuteState {
    day: u16,
    visits: u64,
    dirty: bool,
}

/// A session whose earliest visit must be looked up in `session_first_visits`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionRef {
    pub client_id: String,
    pub session_id: String,
}

/// Windowed state of one Kafka partition.
#[derive(Debug)]
pub struct PartitionState {
    partition: u16,
    cfg: WindowConfig,
    clients: Arc<ClientDirectory>,
    interned: FxHashMap<String, ClientRef>,

    epoch: u32,
    counter: u64,
    offsets: TopicOffsets,
    watermark_ms: i64,
    /// See [`Checkpoint::aggregates_watermark_ms`].
    aggregates_watermark_ms: i64,
    /// Watermark at the last `take_flush`; becomes `aggregates_watermark_ms` once that flush
    /// has been written completely.
    pending_aggregates_watermark_ms: i64,
    /// Latest event time applied (capped at the receive watermark); see
    /// [`Checkpoint::event_watermark_ms`].
    event_watermark_ms: i64,
    /// `event_watermark_ms` of the facts written so far (at the last written flush).
    written_event_watermark_ms: i64,
    pending_event_watermark_ms: i64,
    spools: FxHashMap<(u64, FactKind), SpoolMark>,
    /// See [`Checkpoint::rebuild_request_ms`].
    rebuild_request_ms: i64,

    days: FxHashMap<(ClientRef, u16), DayState>,
    minutes: FxHashMap<(ClientRef, i64, PageKind), MinuteState>,
    live: FxHashMap<(ClientRef, u128, i64), LiveState>,
    sessions: FxHashMap<u128, SessionState>,
    /// Copies of dedup keys, their decisions and the notices read (see [`dedup`]).
    dedup: dedup::DedupState,

    // Output accumulated until the next flush.
    raw: Vec<FactRow>,
    first_visits: FxHashMap<u128, SessionFirstVisitRow>,
    late: FxHashMap<(ClientRef, u16), u64>,
    /// Client days of the facts applied since the last flush.
    fact_days: FxHashSet<(ClientRef, u16)>,
    /// Presence of sessions per day changed since the last flush: (client, day, session).
    session_rows: FxHashMap<(ClientRef, u16, u128), (String, bool)>,
    dirty_days: Vec<(ClientRef, u16)>,
    dirty_minutes: Vec<(ClientRef, i64, PageKind)>,
    dirty_live: Vec<(ClientRef, u128, i64)>,
    pending_lookups: FxHashSet<u128>,
    /// True while replaying stored facts after an assignment.
    replaying: bool,
}

/// How a fact's dimensions aggregate: the one definition of `unknown` and `unresolved`.
pub mod labels {
    use eventflow_core::fact::{UNKNOWN, UNRESOLVED};

    /// A UTM field's label: missing (empty) and the literal `"unknown"` are the same bucket.
    pub fn utm(value: &str) -> &str {
        if value.is_empty() {
            UNKNOWN
        } else {
            value
        }
    }

    /// Whether a visit counts as having no UTM source.
    pub fn utm_missing(source: &str) -> bool {
        utm(source) == UNKNOWN
    }

    /// A campaign link id's label: itself when the collector resolved it to a link of the same
    /// client, otherwise `"unresolved"`.
    pub fn cid(cid: &str, resolved: bool) -> &str {
        if resolved && !cid.is_empty() {
            cid
        } else {
            UNRESOLVED
        }
    }
}

impl PartitionState {
    /// Fresh state for `partition`, continuing from `checkpoint` under a new ownership `epoch`.
    pub fn new(
        partition: u16,
        cfg: WindowConfig,
        clients: Arc<ClientDirectory>,
        checkpoint: &Checkpoint,
        epoch: u32,
    ) -> Self {
        let mut spools = FxHashMap::default();
        for mark in &checkpoint.spools {
            spools.insert((mark.spool_id, mark.topic), *mark);
        }
        Self {
            partition,
            cfg,
            clients,
            interned: FxHashMap::default(),
            epoch,
            counter: 0,
            offsets: checkpoint.offsets,
            watermark_ms: checkpoint.watermark_ms,
            aggregates_watermark_ms: checkpoint.aggregates_watermark_ms,
            pending_aggregates_watermark_ms: checkpoint.aggregates_watermark_ms,
            event_watermark_ms: checkpoint.event_watermark_ms,
            written_event_watermark_ms: checkpoint.event_watermark_ms,
            pending_event_watermark_ms: checkpoint.event_watermark_ms,
            spools,
            rebuild_request_ms: checkpoint.rebuild_request_ms,
            days: FxHashMap::default(),
            minutes: FxHashMap::default(),
            live: FxHashMap::default(),
            sessions: FxHashMap::default(),
            dedup: dedup::DedupState::new(checkpoint.notice_cursor.clone(), checkpoint.claim_cursor.clone()),
            raw: Vec::new(),
            first_visits: FxHashMap::default(),
            late: FxHashMap::default(),
            fact_days: FxHashSet::default(),
            session_rows: FxHashMap::default(),
            dirty_days: Vec::new(),
            dirty_minutes: Vec::new(),
            dirty_live: Vec::new(),
            pending_lookups: FxHashSet::default(),
            replaying: false,
        }
    }

    pub fn partition(&self) -> u16 {
        self.partition
    }

    /// Last processing sequence assigned; the version of every row the next flush writes.
    pub fn seq(&self) -> u64 {
        (u64::from(self.epoch) << EPOCH_SHIFT) | self.counter
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Next offsets to consume.
    pub fn offsets(&self) -> TopicOffsets {
        self.offsets
    }

    /// Highest receive time processed.
    pub fn watermark_ms(&self) -> i64 {
        self.watermark_ms
    }

    /// Event time up to which this partition's written facts go (see
    /// [`Checkpoint::event_watermark_ms`]): what `watermark` and staleness report while the
    /// partition has a backlog.
    pub fn written_event_watermark_ms(&self) -> i64 {
        self.written_event_watermark_ms
    }

    /// The latest rebuild request this state was rebuilt for (see `rebuild_requests`).
    pub fn rebuild_request_ms(&self) -> i64 {
        self.rebuild_request_ms
    }

    /// Records that this state was rebuilt for the request of `ms` (stored with the next flush).
    pub fn set_rebuild_request_ms(&mut self, ms: i64) {
        self.rebuild_request_ms = self.rebuild_request_ms.max(ms);
    }

    /// Facts applied since the last flush.
    pub fn unflushed(&self) -> usize {
        self.raw.len()
    }

    /// Whether a flush has anything to write.
    pub fn has_output(&self) -> bool {
        !self.raw.is_empty()
            || !self.dirty_days.is_empty()
            || !self.dirty_minutes.is_empty()
            || !self.dirty_live.is_empty()
            || !self.session_rows.is_empty()
            || !self.late.is_empty()
    }

    /// Entries held in memory (days, buckets, set members, sessions): the state-size metric.
    pub fn state_entries(&self) -> usize {
        let day_members: usize = self
            .days
            .values()
            .map(|d| d.sessions.len() + d.marketing.values().map(|m| m.sessions.len() + 1).sum::<usize>() + 1)
            .sum();
        let live_members: usize = self.live.values().map(|l| l.sessions.len() + 1).sum();
        day_members + live_members + self.minutes.len() + self.sessions.len() + self.dedup.len()
    }

    /// Counted visits of `client` on `day` in this partition.
    pub fn day_visits(&self, client: &str, day: u16) -> u64 {
        self.interned.get(client).and_then(|c| self.days.get(&(c.clone(), day))).map_or(0, |d| d.counters.visits)
    }

    /// Clients with open days in this partition.
    pub fn clients(&self) -> impl Iterator<Item = &str> {
        self.interned.keys().map(String::as_str)
    }

    fn intern(&mut self, client: &str) -> ClientRef {
        if let Some(c) = self.interned.get(client) {
            return c.clone();
        }
        let c: ClientRef = Arc::from(client);
        self.interned.insert(client.to_owned(), c.clone());
        c
    }

    fn next_seq(&mut self) -> u64 {
        self.counter += 1;
        self.seq()
    }

    fn day_is_closed(&self, day: u16, tz: Tz, watermark_ms: i64) -> bool {
        time::day_closed(time::day_from_number(day), tz, watermark_ms, self.cfg.allowed_lateness_ms)
    }

    /// Client day of a fact, in the client's current time zone.
    fn day_of(&self, client_id: &str, event_time_ms: i64) -> (u16, Tz) {
        let tz = self.clients.timezone(client_id);
        (time::day_number(time::client_day(event_time_ms, tz)), tz)
    }

    // -----------------------------------------------------------------------------------------
    // Applying facts

    /// Moves past a message that is not a fact (undecodable), so the checkpoint advances.
    pub fn skip(&mut self, kind: FactKind, offset: i64) {
        if offset >= self.offsets.get(kind) {
            self.offsets.set(kind, offset + 1);
        }
    }

    /// Applies a fact consumed at `offset` of its kind's topic.
    pub fn apply(&mut self, offset: i64, fact: Fact) -> Outcome {
        let kind = fact.kind();
        if offset >= self.offsets.get(kind) {
            self.offsets.set(kind, offset + 1);
        }
        let h = fact.header();
        // Redelivery: the collector re-sends the tail of its spool after a crash; per partition
        // a spool's facts arrive in spool order, so anything at or below the mark was seen.
        match self.spools.get_mut(&(h.spool_id, kind)) {
            Some(mark) if h.spool_seq <= mark.high_seq => return Outcome::Redelivery,
            Some(mark) => {
                mark.high_seq = h.spool_seq;
                mark.seen_ms = mark.seen_ms.max(h.received_at_ms);
            }
            None => {
                self.spools.insert(
                    (h.spool_id, kind),
                    SpoolMark { spool_id: h.spool_id, topic: kind, high_seq: h.spool_seq, seen_ms: h.received_at_ms },
                );
            }
        }
        let seq = self.next_seq();
        let (day, tz) = self.day_of(&h.client_id, h.event_time_ms);
        let late = self.day_is_closed(day, tz, self.watermark_ms);
        let received = h.received_at_ms;
        let event_ms = h.event_time_ms;
        let client = self.intern(&h.client_id);
        let row = FactRow::from_owned_fact(
            fact,
            day,
            Provenance { kafka_partition: self.partition, kafka_offset: offset, seq, late },
        );
        if row.kind == eventflow_store::rows::kind::VISIT {
            self.observe_visit(&client, &row);
        }
        if late {
            self.mark_late(&client, day, tz, row.kind == eventflow_store::rows::kind::VISIT, seq);
        }
        self.fact_days.insert((client.clone(), day));
        let outcome = if row.dedup_uid().is_some() {
            self.dedup.defer(self.raw.len(), client, day, tz, late);
            Outcome::Deferred
        } else if late {
            Outcome::Late
        } else {
            self.count(&client, day, tz, &row);
            Outcome::Counted
        };
        self.raw.push(row);
        self.watermark_ms = self.watermark_ms.max(received);
        self.event_watermark_ms = self.event_watermark_ms.max(event_ms.min(self.watermark_ms));
        outcome
    }

    /// Records a late fact of `day`: its day needs backfill; a late visit can link entries of
    /// its session on later days, so closed later days are marked too (open ones are relinked
    /// in state).
    fn mark_late(&mut self, client: &ClientRef, day: u16, tz: Tz, is_visit: bool, seq: u64) {
        self.late.insert((client.clone(), day), seq);
        if is_visit {
            let mut next = time::day_from_number(day);
            while let Some(d) = next.succ_opt() {
                if !time::day_closed(d, tz, self.watermark_ms, self.cfg.allowed_lateness_ms) {
                    break;
                }
                self.late.insert((client.clone(), time::day_number(d)), seq);
                next = d;
            }
        }
    }

    /// Oldest receive time of the stored facts [`Self::replay`] needs: every fact of a day
    /// open at the aggregates watermark (event time at most 5 min ahead of receive time), and
    /// every copy of a dedup key within the horizon of the watermark.
    pub fn replay_from_ms(&self) -> i64 {
        let open_days = self.aggregates_watermark_ms - self.cfg.allowed_lateness_ms - 2 * DAY_MS;
        let horizon = self.watermark_ms - eventflow_core::fact::DEDUP_HORIZON_MS - time::MAX_CLOCK_AHEAD_MS;
        open_days.min(horizon)
    }

    /// Oldest client day [`Self::replay`] needs (any time zone), for primary-key reads.
    pub fn replay_from_day(&self) -> u16 {
        let from = self.replay_from_ms() - DAY_MS;
        time::day_number(time::client_day(from.max(0), chrono_tz::UTC))
    }

    /// Replays facts already stored for this partition (all received since
    /// [`Self::replay_from_ms`], in any order), then [`Self::replay_done`].
    pub fn replay(&mut self, rows: impl IntoIterator<Item = FactRow>) {
        for row in rows {
            self.replay_row(row);
        }
        self.replay_done();
    }

    /// Replays one stored fact after an assignment (see [`Self::replay_done`]); the order of
    /// rows does not matter: everything replay restores is a maximum, a minimum, a set or a
    /// sum.
    ///
    /// Facts of days still open at the checkpoint's aggregates watermark are counted as their
    /// stored decision says (a copy taken out after a notice was stored again as a duplicate),
    /// so those days' rows are rewritten as full recounts (days closed before it were written
    /// completely). Session first visits are restored from every replayed fact.
    pub fn replay_row(&mut self, row: FactRow) {
        self.replaying = true;
        let Some(kind) = row.fact_kind() else { return };
        // Facts a fenced-off previous owner stored beyond its last checkpoint are in the
        // store already; raising the spool marks makes their Kafka copies redeliveries.
        let mark = self.spools.entry((row.spool_id, kind)).or_insert(SpoolMark {
            spool_id: row.spool_id,
            topic: kind,
            high_seq: 0,
            seen_ms: i64::MIN,
        });
        mark.high_seq = mark.high_seq.max(row.spool_seq);
        mark.seen_ms = mark.seen_ms.max(row.received_at_ms);
        self.dedup.remember(&row);
        let (day, tz) = self.day_of(&row.client_id, row.event_time_ms);
        // A day being rebuilt gets all of its facts, late ones included: its rows are then
        // the full recount (what backfill writes), never less.
        let closed = self.day_is_closed(day, tz, self.aggregates_watermark_ms);
        let client = self.intern(&row.client_id);
        if row.kind == eventflow_store::rows::kind::VISIT {
            self.observe_visit(&client, &row);
        }
        if closed {
            return;
        }
        let counted = row.dedup_uid().is_none() || row.dedup != eventflow_store::rows::dedup::DUPLICATE;
        if counted {
            self.count(&client, day, tz, &row);
        } else {
            self.not_counted(&client, day, tz, &row);
        }
    }

    /// Ends a replay: every open bucket is rewritten under the new epoch (a crash between the
    /// facts insert and the aggregate inserts may have left older versions behind).
    pub fn replay_done(&mut self) {
        self.replaying = false;
        self.mark_all_dirty();
    }

    // -----------------------------------------------------------------------------------------
    // Store lookups

    /// Sessions whose earliest visit must be looked up before the next flush.
    pub fn pending_lookups(&self) -> Vec<SessionRef> {
        self.pending_lookups
            .iter()
            .filter_map(|k| self.sessions.get(k))
            .map(|s| SessionRef { client_id: s.client.to_string(), session_id: s.session_id.clone() })
            .collect()
    }

    /// Applies looked-up earliest visits (`None`: the store knows no visit of the session).
    pub fn resolve_lookups(&mut self, found: impl IntoIterator<Item = (SessionRef, Option<i64>)>) {
        for (session, first) in found {
            let key = eventflow_core::hash::id128(&session.client_id, &session.session_id);
            self.pending_lookups.remove(&key);
            let Some(state) = self.sessions.get_mut(&key) else {
                continue;
            };
            state.store_checked = true;
            if let Some(ms) = first {
                if state.first_visit_ms.is_none_or(|cur| ms < cur) {
                    state.first_visit_ms = Some(ms);
                    self.relink(key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
