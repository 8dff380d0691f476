//! Event-time windows of one Kafka partition: the processor's pure core.
//!
//! Facts of one partition (the same partition number of the visit, entry and ping topics; keyed
//! by session, so a session never spans partitions) are applied in processing order. The state
//! keeps, for every *open* client day, compact counters and 128-bit hashed sets (sessions, visit
//! `event_uid`s, entry ids), never the raw facts. A day is open until the partition watermark
//! (highest receive time seen) passes its end plus the allowed lateness; facts of closed days are
//! stored raw, flagged late and folded in by backfill.
//!
//! Every bucket this state emits is the FULL value of the bucket for this partition, computed
//! from all facts with processing sequence `<= version`. That is what makes writes idempotent
//! (ADR 0002): a replay recomputes the same value for the same key, and the highest version wins.
//!
//! Counting rules (CONTRACT.md §1, §4), mirrored by the raw recount in `eventflow-store`:
//! - visits: one per `(client_id, event_uid)` (the copy processed first), every visit without
//!   `event_uid` counts; unique sessions are distinct sessions of counted visits;
//! - entries: one per `(client_id, entry_id)` (the copy processed first); an entry is linked when
//!   any visit of its session (counted or duplicate, on time or late) is at or before its time;
//! - live viewers: distinct sessions that pinged a webinar in a UTC minute.

use std::collections::hash_map::Entry as MapEntry;
use std::sync::Arc;

use chrono_tz::Tz;
use rustc_hash::{FxHashMap, FxHashSet};

use eventflow_core::fact::{Entry, Fact, FactKind, PageKind, Ping, Visit, UNRESOLVED};
use eventflow_core::hash::id128;
use eventflow_core::time;
use eventflow_core::{ClientDirectory, Utm};
use eventflow_store::rows::{
    Checkpoint, DailyMarketingRow, DailySessionRow, DailyTotalsRow, DayCounters, FactRow, LateFactRow,
    MarketingCounters, MarketingDims, MinuteLiveRow, MinuteVisitsRow, Provenance, SessionFirstVisitRow, SpoolMark,
    TopicOffsets,
};

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
    /// How long a visit `event_uid` or entry id is remembered for deduplication, measured on the
    /// partition watermark from when it was first seen (default: lateness + 1 day).
    pub dedup_horizon_ms: i64,
}

impl WindowConfig {
    pub fn new(allowed_lateness_ms: i64) -> Self {
        Self { allowed_lateness_ms, dedup_horizon_ms: allowed_lateness_ms + DAY_MS }
    }
}

/// What happened to one applied fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Folded into its buckets.
    Counted,
    /// Stored raw, but a copy with the same `event_uid` / `entry_id` was counted before.
    Duplicate,
    /// Its day had closed: stored raw and flagged late; backfill folds it in.
    Late,
    /// The same fact (same spool id and sequence) was already processed; dropped entirely.
    Redelivery,
}

/// Everything one flush writes, in write order (see `processor::flush`).
#[derive(Debug, Default)]
pub struct FlushBatch {
    /// Written first: they only ever lower a session's first-visit time, so writing them
    /// ahead of the facts they come from is safe, and they are never lost in a crash.
    pub first_visits: Vec<SessionFirstVisitRow>,
    pub late: Vec<LateFactRow>,
    /// The commit point: facts plus the checkpoint row, one atomic INSERT.
    pub facts: Vec<FactRow>,
    pub minute_visits: Vec<MinuteVisitsRow>,
    pub minute_live: Vec<MinuteLiveRow>,
    pub daily_totals: Vec<DailyTotalsRow>,
    pub daily_marketing: Vec<DailyMarketingRow>,
    pub daily_sessions: Vec<DailySessionRow>,
    pub checkpoint: Checkpoint,
}

impl FlushBatch {
    /// Rows of aggregate tables in this batch.
    pub fn aggregate_rows(&self) -> usize {
        self.minute_visits.len()
            + self.minute_live.len()
            + self.daily_totals.len()
            + self.daily_marketing.len()
            + self.daily_sessions.len()
    }
}

type ClientRef = Arc<str>;

#[derive(Debug)]
struct MarketingState {
    dims: MarketingDims,
    counters: MarketingCounters,
    sessions: FxHashSet<u128>,
    dirty: bool,
}

#[derive(Debug)]
struct DayState {
    tz: Tz,
    counters: DayCounters,
    sessions: FxHashSet<u128>,
    marketing: FxHashMap<u128, MarketingState>,
    dirty: bool,
}

#[derive(Debug, Clone, Copy)]
struct EntryRef {
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
    spools: FxHashMap<(u64, FactKind), SpoolMark>,

    days: FxHashMap<(ClientRef, u16), DayState>,
    minutes: FxHashMap<(ClientRef, i64, PageKind), MinuteState>,
    live: FxHashMap<(ClientRef, u128, i64), LiveState>,
    sessions: FxHashMap<u128, SessionState>,
    visit_uids: FxHashMap<u128, i64>,
    entry_ids: FxHashMap<u128, i64>,

    // Output accumulated until the next flush.
    raw: Vec<FactRow>,
    first_visits: FxHashMap<u128, SessionFirstVisitRow>,
    late: FxHashMap<(ClientRef, u16), u64>,
    new_day_sessions: Vec<DailySessionRow>,
    dirty_days: Vec<(ClientRef, u16)>,
    dirty_minutes: Vec<(ClientRef, i64, PageKind)>,
    dirty_live: Vec<(ClientRef, u128, i64)>,
    pending_lookups: FxHashSet<u128>,
    /// True while replaying stored facts after an assignment.
    replaying: bool,
}

/// Label of a campaign link id in aggregates.
fn cid_label(cid: &Option<String>, resolved: bool) -> &str {
    match cid {
        Some(c) if resolved => c,
        _ => UNRESOLVED,
    }
}

/// Identity of a marketing bucket's dimensions (no allocation on the hot path).
fn marketing_id(event_id: &str, webinar_id: &str, cid: &str, utm: &Utm) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for part in [event_id, webinar_id, cid, Utm::label(&utm.source), Utm::label(&utm.medium), Utm::label(&utm.campaign)]
    {
        h.update(part.as_bytes());
        h.update(&[0xff]);
    }
    h.digest128()
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
            spools,
            days: FxHashMap::default(),
            minutes: FxHashMap::default(),
            live: FxHashMap::default(),
            sessions: FxHashMap::default(),
            visit_uids: FxHashMap::default(),
            entry_ids: FxHashMap::default(),
            raw: Vec::new(),
            first_visits: FxHashMap::default(),
            late: FxHashMap::default(),
            new_day_sessions: Vec::new(),
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
            || !self.new_day_sessions.is_empty()
    }

    /// Entries held in memory (days, buckets, set members, dedup keys): the state-size metric.
    pub fn state_entries(&self) -> usize {
        let day_members: usize = self
            .days
            .values()
            .map(|d| d.sessions.len() + d.marketing.values().map(|m| m.sessions.len() + 1).sum::<usize>() + 1)
            .sum();
        let live_members: usize = self.live.values().map(|l| l.sessions.len() + 1).sum();
        day_members
            + live_members
            + self.minutes.len()
            + self.sessions.len()
            + self.visit_uids.len()
            + self.entry_ids.len()
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
        let tz = self.clients.timezone(&h.client_id);
        let day = time::client_day(h.event_time_ms, tz);
        let late = time::day_closed(day, tz, self.watermark_ms, self.cfg.allowed_lateness_ms);
        let day_no = time::day_number(day);
        let received = h.received_at_ms;
        let client = self.intern(&h.client_id);

        let outcome = self.fold(&client, day_no, tz, late, &fact);
        let is_visit = matches!(fact, Fact::Visit(_));
        self.raw.push(FactRow::from_owned_fact(
            fact,
            day_no,
            Provenance { kafka_partition: self.partition, kafka_offset: offset, seq, late },
        ));
        if late {
            self.late.insert((client.clone(), day_no), seq);
            if is_visit {
                // A late visit can link entries of its session on later days; those still open
                // are relinked in state, closed ones are marked for backfill too.
                let mut next = day;
                while let Some(d) = next.succ_opt() {
                    if !time::day_closed(d, tz, self.watermark_ms, self.cfg.allowed_lateness_ms) {
                        break;
                    }
                    self.late.insert((client.clone(), time::day_number(d)), seq);
                    next = d;
                }
            }
        }
        self.watermark_ms = self.watermark_ms.max(received);
        outcome
    }

    /// Oldest receive time of the stored facts [`Self::replay`] needs: every fact of a day
    /// open at the aggregates watermark (event time at most 5 min ahead of receive time) and
    /// every dedup key still within the horizon.
    pub fn replay_from_ms(&self) -> i64 {
        let open_days = self.aggregates_watermark_ms - self.cfg.allowed_lateness_ms - 2 * DAY_MS;
        open_days.min(self.watermark_ms - self.cfg.dedup_horizon_ms)
    }

    /// Replays facts already stored for this partition (ordered by `seq`, all received since
    /// [`Self::replay_from_ms`]) after an assignment.
    ///
    /// Facts of days still open at the checkpoint's aggregates watermark are counted, so those
    /// days' rows are rewritten as full recounts (days closed before it were written completely).
    /// Dedup keys and session first visits are restored from every replayed fact.
    pub fn replay(&mut self, rows: impl IntoIterator<Item = FactRow>) {
        self.replaying = true;
        let final_watermark = self.watermark_ms;
        let open_at = self.aggregates_watermark_ms;
        let mut replay_watermark = i64::MIN;
        for row in rows {
            let Some(fact) = row.to_fact() else { continue };
            let h = fact.header();
            // Facts a fenced-off previous owner stored beyond its last checkpoint are in the
            // store already; raising the spool marks makes their Kafka copies redeliveries.
            let kind = fact.kind();
            let mark = self.spools.entry((h.spool_id, kind)).or_insert(SpoolMark {
                spool_id: h.spool_id,
                topic: kind,
                high_seq: 0,
                seen_ms: i64::MIN,
            });
            mark.high_seq = mark.high_seq.max(h.spool_seq);
            mark.seen_ms = mark.seen_ms.max(h.received_at_ms);
            let tz = self.clients.timezone(&h.client_id);
            let day = time::client_day(h.event_time_ms, tz);
            // A day being rebuilt gets all of its facts, late ones included: its rows are then
            // the full recount (what backfill writes), never less.
            let closed = time::day_closed(day, tz, open_at, self.cfg.allowed_lateness_ms);
            let client = self.intern(&h.client_id);
            replay_watermark = replay_watermark.max(h.received_at_ms);
            // Dedup keys expire relative to the watermark at the time they were seen.
            self.watermark_ms = replay_watermark;
            self.fold(&client, time::day_number(day), tz, closed, &fact);
        }
        self.watermark_ms = final_watermark;
        self.replaying = false;
        // Every open bucket is rewritten under the new epoch: a crash between the facts insert
        // and the aggregate inserts may have left older versions behind.
        self.mark_all_dirty();
    }

    /// Counts `fact` into its buckets (unless `closed`) and updates dedup and session state.
    fn fold(&mut self, client: &ClientRef, day: u16, tz: Tz, closed: bool, fact: &Fact) -> Outcome {
        match fact {
            Fact::Visit(v) => self.fold_visit(client, day, tz, closed, v),
            Fact::Entry(e) => self.fold_entry(client, day, tz, closed, e),
            Fact::Ping(p) => self.fold_ping(client, day, tz, closed, p),
        }
    }

    fn session_mut(&mut self, client: &ClientRef, session_id: &str) -> (u128, &mut SessionState) {
        let key = id128(client, session_id);
        let state = self.sessions.entry(key).or_insert_with(|| SessionState {
            client: client.clone(),
            session_id: session_id.to_owned(),
            first_visit_ms: None,
            store_checked: false,
            entries: Vec::new(),
            last_event_ms: i64::MIN,
        });
        (key, state)
    }

    fn day_mut(&mut self, client: &ClientRef, day: u16, tz: Tz) -> &mut DayState {
        let key = (client.clone(), day);
        match self.days.entry(key) {
            MapEntry::Occupied(o) => o.into_mut(),
            MapEntry::Vacant(v) => v.insert(DayState {
                tz,
                counters: DayCounters::default(),
                sessions: FxHashSet::default(),
                marketing: FxHashMap::default(),
                dirty: false,
            }),
        }
    }

    /// A duplicate counts nothing, but its day has a stored fact and so gets its `daily_totals`
    /// row (zeros if nothing else counts there): the reader takes a day with facts and no row
    /// for a lost aggregate.
    fn day_of_duplicate(&mut self, client: &ClientRef, day: u16, tz: Tz) -> Outcome {
        if !self.days.contains_key(&(client.clone(), day)) {
            self.day_mut(client, day, tz);
            self.touch_day(client, day);
        }
        Outcome::Duplicate
    }

    fn touch_day(&mut self, client: &ClientRef, day: u16) {
        if let Some(d) = self.days.get_mut(&(client.clone(), day)) {
            if !d.dirty {
                d.dirty = true;
                self.dirty_days.push((client.clone(), day));
            }
        }
    }

    fn fold_visit(&mut self, client: &ClientRef, day: u16, tz: Tz, closed: bool, v: &Visit) -> Outcome {
        let event_ms = v.header.event_time_ms;
        // Any visit, counted or not, establishes the session for linkage.
        let replaying = self.replaying;
        let (session_key, session) = self.session_mut(client, &v.session_id);
        session.last_event_ms = session.last_event_ms.max(event_ms);
        let earlier = session.first_visit_ms.is_none_or(|first| event_ms < first);
        if earlier {
            session.first_visit_ms = Some(event_ms);
            if !replaying {
                self.first_visits
                    .insert(session_key, SessionFirstVisitRow::new(client.to_string(), v.session_id.clone(), event_ms));
            }
            self.relink(session_key);
        }

        let duplicate = match &v.event_uid {
            Some(uid) => {
                let key = id128(client, uid);
                match self.visit_uids.entry(key) {
                    MapEntry::Occupied(_) => true,
                    MapEntry::Vacant(slot) => {
                        slot.insert(self.watermark_ms.max(v.header.received_at_ms));
                        false
                    }
                }
            }
            None => false,
        };
        if closed {
            return Outcome::Late;
        }
        if duplicate {
            return self.day_of_duplicate(client, day, tz);
        }

        let cid = cid_label(&v.cid, v.cid_resolved);
        let (event_id, webinar_id) = (v.event_id.as_deref().unwrap_or(""), v.webinar_id.as_deref().unwrap_or(""));
        let m_key = marketing_id(event_id, webinar_id, cid, &v.utm);
        let d = self.day_mut(client, day, tz);
        d.counters.visits += 1;
        match v.page {
            PageKind::Landing => d.counters.visits_landing += 1,
            PageKind::Webinar => d.counters.visits_webinar += 1,
            PageKind::Live => d.counters.visits_live += 1,
        }
        if v.utm.source.is_none() {
            d.counters.visits_utm_missing += 1;
        }
        if cid == UNRESOLVED {
            d.counters.visits_cid_unresolved += 1;
        }
        let new_day_session = d.sessions.insert(session_key);
        if new_day_session {
            d.counters.unique_sessions += 1;
        }
        let m = d.marketing.entry(m_key).or_insert_with(|| MarketingState {
            dims: MarketingDims {
                event_id: event_id.to_owned(),
                webinar_id: webinar_id.to_owned(),
                cid: cid.to_owned(),
                utm_source: Utm::label(&v.utm.source).to_owned(),
                utm_medium: Utm::label(&v.utm.medium).to_owned(),
                utm_campaign: Utm::label(&v.utm.campaign).to_owned(),
            },
            counters: MarketingCounters::default(),
            sessions: FxHashSet::default(),
            dirty: false,
        });
        m.counters.visits += 1;
        if m.sessions.insert(session_key) {
            m.counters.unique_sessions += 1;
        }
        m.dirty = true;
        if new_day_session {
            self.new_day_sessions.push(DailySessionRow {
                client_id: client.to_string(),
                day,
                session_id: v.session_id.clone(),
            });
        }
        self.touch_day(client, day);

        let minute = time::minute_start_ms(event_ms);
        let mkey = (client.clone(), minute, v.page);
        let ms = self.minutes.entry(mkey.clone()).or_insert(MinuteState { day, visits: 0, dirty: false });
        ms.visits += 1;
        if !ms.dirty {
            ms.dirty = true;
            self.dirty_minutes.push(mkey);
        }
        Outcome::Counted
    }

    fn fold_entry(&mut self, client: &ClientRef, day: u16, tz: Tz, closed: bool, e: &Entry) -> Outcome {
        let event_ms = e.header.event_time_ms;
        let key = id128(client, &e.entry_id);
        let duplicate = match self.entry_ids.entry(key) {
            MapEntry::Occupied(_) => true,
            MapEntry::Vacant(slot) => {
                slot.insert(self.watermark_ms.max(e.header.received_at_ms));
                false
            }
        };
        if closed {
            return Outcome::Late;
        }
        if duplicate {
            return self.day_of_duplicate(client, day, tz);
        }
        let cid = cid_label(&e.cid, e.cid_resolved);
        let (event_id, webinar_id) = (e.event_id.as_deref().unwrap_or(""), e.webinar_id.as_deref().unwrap_or(""));
        let m_key = marketing_id(event_id, webinar_id, cid, &e.utm);

        let (session_key, session) = self.session_mut(client, &e.session_id);
        session.last_event_ms = session.last_event_ms.max(event_ms);
        let linked = session.first_visit_ms.is_some_and(|first| first <= event_ms);
        let needs_lookup = !linked && !session.store_checked;
        session.entries.push(EntryRef { day, marketing: m_key, event_ms, linked });
        if needs_lookup {
            // An earlier visit may be older than the state remembers; ask the store at flush.
            self.pending_lookups.insert(session_key);
        }

        let d = self.day_mut(client, day, tz);
        d.counters.entries += 1;
        d.counters.linked_entries += u64::from(linked);
        let m = d.marketing.entry(m_key).or_insert_with(|| MarketingState {
            dims: MarketingDims {
                event_id: event_id.to_owned(),
                webinar_id: webinar_id.to_owned(),
                cid: cid.to_owned(),
                utm_source: Utm::label(&e.utm.source).to_owned(),
                utm_medium: Utm::label(&e.utm.medium).to_owned(),
                utm_campaign: Utm::label(&e.utm.campaign).to_owned(),
            },
            counters: MarketingCounters::default(),
            sessions: FxHashSet::default(),
            dirty: false,
        });
        m.counters.entries += 1;
        m.counters.linked_entries += u64::from(linked);
        m.dirty = true;
        self.touch_day(client, day);
        Outcome::Counted
    }

    fn fold_ping(&mut self, client: &ClientRef, day: u16, tz: Tz, closed: bool, p: &Ping) -> Outcome {
        if closed {
            return Outcome::Late;
        }
        let session_key = id128(client, &p.session_id);
        let minute = time::minute_start_ms(p.header.event_time_ms);
        let key = (client.clone(), id128(client, &p.webinar_id), minute);
        let live = self.live.entry(key.clone()).or_insert_with(|| LiveState {
            webinar_id: p.webinar_id.clone(),
            day,
            sessions: FxHashSet::default(),
            dirty: false,
        });
        if !live.sessions.insert(session_key) {
            // Second ping of the session in this minute: already a viewer.
            return Outcome::Counted;
        }
        if !live.dirty {
            live.dirty = true;
            self.dirty_live.push(key);
        }
        let d = self.day_mut(client, day, tz);
        d.counters.viewer_minutes += 1;
        self.touch_day(client, day);
        Outcome::Counted
    }

    /// Links entries of `session_key` that its (new) first visit now precedes.
    fn relink(&mut self, session_key: u128) {
        let Some(session) = self.sessions.get_mut(&session_key) else {
            return;
        };
        let Some(first) = session.first_visit_ms else {
            return;
        };
        let client = session.client.clone();
        let mut newly: Vec<(u16, u128)> = Vec::new();
        for entry in session.entries.iter_mut().filter(|e| !e.linked && first <= e.event_ms) {
            entry.linked = true;
            newly.push((entry.day, entry.marketing));
        }
        for (day, m_key) in newly {
            if let Some(d) = self.days.get_mut(&(client.clone(), day)) {
                d.counters.linked_entries += 1;
                if let Some(m) = d.marketing.get_mut(&m_key) {
                    m.counters.linked_entries += 1;
                    m.dirty = true;
                }
            }
            self.touch_day(&client, day);
        }
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
            let key = id128(&session.client_id, &session.session_id);
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

    // -----------------------------------------------------------------------------------------
    // Flushing

    fn mark_all_dirty(&mut self) {
        self.dirty_days.clear();
        for ((client, day), d) in self.days.iter_mut() {
            d.dirty = true;
            for m in d.marketing.values_mut() {
                m.dirty = true;
            }
            self.dirty_days.push((client.clone(), *day));
        }
        self.dirty_minutes.clear();
        for (key, m) in self.minutes.iter_mut() {
            m.dirty = true;
            self.dirty_minutes.push(key.clone());
        }
        self.dirty_live.clear();
        for (key, l) in self.live.iter_mut() {
            l.dirty = true;
            self.dirty_live.push(key.clone());
        }
    }

    /// The checkpoint describing the state after everything applied so far.
    pub fn checkpoint(&self) -> Checkpoint {
        let mut spools: Vec<SpoolMark> = self.spools.values().copied().collect();
        spools.sort_by_key(|m| (m.spool_id, m.topic));
        Checkpoint {
            epoch: self.epoch,
            seq: self.seq(),
            offsets: self.offsets,
            watermark_ms: self.watermark_ms,
            aggregates_watermark_ms: self.aggregates_watermark_ms,
            spools,
        }
    }

    /// Records that the batch from the last [`Self::take_flush`] was written completely, then
    /// releases state of closed days and expired dedup keys.
    pub fn flush_written(&mut self) {
        self.aggregates_watermark_ms = self.pending_aggregates_watermark_ms;
        self.release_closed();
    }

    /// Drains everything to write since the last flush. Call after [`Self::resolve_lookups`]:
    /// rows must not be written while linkage is still provisional.
    pub fn take_flush(&mut self) -> FlushBatch {
        debug_assert!(self.pending_lookups.is_empty(), "flush with unresolved session lookups");
        let version = self.seq();
        let partition = self.partition;
        self.pending_aggregates_watermark_ms = self.watermark_ms;
        let checkpoint = self.checkpoint();
        let mut facts = std::mem::take(&mut self.raw);
        facts.push(FactRow::checkpoint(partition, &checkpoint));

        let mut batch = FlushBatch {
            first_visits: self.first_visits.drain().map(|(_, row)| row).collect(),
            late: self
                .late
                .drain()
                .map(|((client, day), seq)| LateFactRow {
                    client_id: client.to_string(),
                    day,
                    kafka_partition: partition,
                    seq,
                })
                .collect(),
            facts,
            daily_sessions: std::mem::take(&mut self.new_day_sessions),
            checkpoint,
            ..FlushBatch::default()
        };
        for key in self.dirty_days.drain(..) {
            let Some(d) = self.days.get_mut(&key) else {
                continue;
            };
            d.dirty = false;
            batch.daily_totals.push(DailyTotalsRow::new(key.0.to_string(), key.1, partition, version, d.counters));
            for m in d.marketing.values_mut().filter(|m| m.dirty) {
                m.dirty = false;
                batch.daily_marketing.push(DailyMarketingRow::new(
                    key.0.to_string(),
                    key.1,
                    &m.dims,
                    partition,
                    version,
                    m.counters,
                ));
            }
        }
        for key in self.dirty_minutes.drain(..) {
            let Some(m) = self.minutes.get_mut(&key) else {
                continue;
            };
            m.dirty = false;
            batch.minute_visits.push(MinuteVisitsRow {
                client_id: key.0.to_string(),
                minute: u32::try_from(key.1 / 1000).unwrap_or(0),
                page: eventflow_store::rows::page_code(Some(key.2)),
                kafka_partition: partition,
                version,
                visits: m.visits,
            });
        }
        for key in self.dirty_live.drain(..) {
            let Some(l) = self.live.get_mut(&key) else {
                continue;
            };
            l.dirty = false;
            batch.minute_live.push(MinuteLiveRow {
                client_id: key.0.to_string(),
                webinar_id: l.webinar_id.clone(),
                minute: u32::try_from(key.2 / 1000).unwrap_or(0),
                kafka_partition: partition,
                version,
                viewers: l.sessions.len() as u64,
            });
        }
        batch
    }

    /// Releases state of closed days and expired dedup keys. Only after a successful flush:
    /// closed days are never written again, so their last dirty values must be flushed first.
    fn release_closed(&mut self) {
        let wm = self.watermark_ms;
        let lateness = self.cfg.allowed_lateness_ms;
        let closed = |day: u16, tz: Tz| time::day_closed(time::day_from_number(day), tz, wm, lateness);
        self.days.retain(|(_, day), d| d.dirty || !closed(*day, d.tz));
        let clients = self.clients.clone();
        self.minutes.retain(|(client, _, _), m| m.dirty || !closed(m.day, clients.timezone(client)));
        self.live.retain(|(client, _, _), l| l.dirty || !closed(l.day, clients.timezone(client)));
        self.sessions.retain(|key, s| {
            s.entries.retain(|e| !closed(e.day, clients.timezone(&s.client)));
            let tz = clients.timezone(&s.client);
            let last_day = time::day_number(time::client_day(s.last_event_ms.max(0), tz));
            self.pending_lookups.contains(key) || !s.entries.is_empty() || !closed(last_day, tz)
        });
        let horizon = self.cfg.dedup_horizon_ms;
        self.visit_uids.retain(|_, seen| *seen + horizon > wm);
        self.entry_ids.retain(|_, seen| *seen + horizon > wm);
        self.spools.retain(|_, m| m.seen_ms + SPOOL_MARK_RETENTION_MS > wm);
        let live_clients: FxHashSet<&str> = self.days.keys().map(|(c, _)| &**c).collect();
        let sessions_clients: FxHashSet<&str> = self.sessions.values().map(|s| &*s.client).collect();
        self.interned
            .retain(|name, _| live_clients.contains(name.as_str()) || sessions_clients.contains(name.as_str()));
        // `retain` keeps capacity: without this a busy day's tables would stay allocated forever.
        shrink_sparse(&mut self.days);
        shrink_sparse(&mut self.minutes);
        shrink_sparse(&mut self.live);
        shrink_sparse(&mut self.sessions);
        shrink_sparse(&mut self.visit_uids);
        shrink_sparse(&mut self.entry_ids);
        shrink_sparse(&mut self.first_visits);
    }
}

/// Gives memory back once a table is at most a quarter full, keeping room to grow (amortised:
/// a table shrinks only after losing three quarters of its entries).
fn shrink_sparse<K: Eq + std::hash::Hash, V>(map: &mut FxHashMap<K, V>) {
    if map.capacity() > 1024 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
