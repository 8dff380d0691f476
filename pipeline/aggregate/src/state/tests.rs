//! Property tests of the windowing state and the flush protocol against an independent recount.
//!
//! `recount` below is written from the contract's definitions over the stored raw rows, with
//! none of the state's machinery. The simulation runs one or two processor instances over one
//! to three partitions through random interleavings of the three fact topics, with copies of
//! one `event_uid` / `entry_id` sent from different sessions (so they land in different
//! partitions and arrive out of order), flushes through the real protocol
//! ([`crate::flush`]) into a model of the ClickHouse tables (ReplacingMergeTree: highest
//! version per key wins), crashes at random store calls (and half way through the aggregate
//! inserts), moves partitions between instances, restarts from the stored checkpoint with a
//! new epoch and replays. Whatever happened, once quiet the merged aggregates must equal the
//! recount and no fact may be stored twice. Undecodable messages sprinkled among the facts must
//! each end up in the dead letters, exactly once per message, with the partition moving on.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use proptest::prelude::*;

use super::*;
use crate::flush::{self, NoRetry};
use crate::memory::{Crash, MemoryStore};
use eventflow_core::fact::{Entry, FactHeader, Ping, SessionOrigin, Utm, Visit};
use eventflow_core::{ClientSettings, TenancyConfig};
use eventflow_store::rows::{dead_letter, kind, DeadLetterRow};

const H: i64 = 3_600_000;
/// 2026-11-25T00:00:00Z.
const T0: i64 = 1_795_564_800_000;

fn clients() -> Arc<ClientDirectory> {
    let mut map = std::collections::BTreeMap::new();
    map.insert("kr".to_owned(), ClientSettings { timezone: Some("Asia/Seoul".into()), token: None });
    map.insert("ny".to_owned(), ClientSettings { timezone: Some("America/New_York".into()), token: None });
    Arc::new(ClientDirectory::new(&TenancyConfig::default(), &map).unwrap())
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
}

// ---------------------------------------------------------------------------------------------
// The oracle

#[derive(Debug, Default, PartialEq)]
struct Aggregates {
    totals: BTreeMap<(String, u16), DayCounters>,
    marketing: BTreeMap<(String, u16, MarketingDims), MarketingCounters>,
    minutes: BTreeMap<(String, u32, i8), u64>,
    live: BTreeMap<(String, String, u32), u64>,
    sessions: BTreeSet<(String, u16, String)>,
}

fn label(v: &str) -> String {
    if v.is_empty() {
        "unknown".into()
    } else {
        v.into()
    }
}

fn dims(r: &FactRow) -> MarketingDims {
    MarketingDims {
        event_id: r.event_id.clone(),
        webinar_id: r.webinar_id.clone(),
        cid: if r.cid_resolved == 1 && !r.cid.is_empty() { r.cid.clone() } else { "unresolved".into() },
        utm_source: label(&r.utm_source),
        utm_medium: label(&r.utm_medium),
        utm_campaign: label(&r.utm_campaign),
    }
}

/// Recount of stored raw facts, straight from CONTRACT.md §1/§4: what backfill produces.
fn recount(raw: &[FactRow]) -> Aggregates {
    let mut out = Aggregates::default();
    // Every client day with a stored fact has its daily_totals row, zeros when all of its facts
    // are duplicates: the reader takes a day with facts and no row for a lost aggregate.
    for r in raw {
        out.totals.entry((r.client_id.clone(), r.day)).or_default();
    }
    // Copies of a key in (receive time, spool id, spool sequence) order: a copy counts unless
    // the copy just before it was received within the dedup horizon.
    type Copy = (i64, u64, u64);
    type Key<'a> = (&'a str, i8, &'a str);
    let key = |r: &FactRow| (r.received_at_ms, r.spool_id, r.spool_seq);
    let mut copies: HashMap<Key, Vec<Copy>> = HashMap::new();
    for r in raw {
        let uid = match r.kind {
            kind::VISIT if !r.event_uid.is_empty() => r.event_uid.as_str(),
            kind::ENTRY => r.entry_id.as_str(),
            _ => continue,
        };
        copies.entry((&r.client_id, r.kind, uid)).or_default().push(key(r));
    }
    let mut counted_copies: HashSet<(Key, Copy)> = HashSet::new();
    for ((c, k, u), list) in copies.iter_mut() {
        list.sort();
        for (i, copy) in list.iter().enumerate() {
            if i == 0 || copy.0 - list[i - 1].0 > eventflow_core::fact::DEDUP_HORIZON_MS {
                counted_copies.insert(((c, *k, u), *copy));
            }
        }
    }
    let is_first = |r: &FactRow, uid: &str| counted_copies.contains(&((r.client_id.as_str(), r.kind, uid), key(r)));
    let visits: Vec<&FactRow> = raw.iter().filter(|r| r.kind == kind::VISIT).collect();
    let counted = visits.iter().filter(|v| v.event_uid.is_empty() || is_first(v, &v.event_uid));
    let mut day_sessions: BTreeMap<(String, u16), BTreeSet<String>> = BTreeMap::new();
    let mut m_sessions: BTreeMap<(String, u16, MarketingDims), BTreeSet<String>> = BTreeMap::new();
    for v in counted {
        let t = out.totals.entry((v.client_id.clone(), v.day)).or_default();
        t.visits += 1;
        match v.page {
            1 => t.visits_landing += 1,
            2 => t.visits_webinar += 1,
            _ => t.visits_live += 1,
        }
        t.visits_utm_missing += u64::from(label(&v.utm_source) == "unknown");
        t.visits_cid_unresolved += u64::from(dims(v).cid == "unresolved");
        day_sessions.entry((v.client_id.clone(), v.day)).or_default().insert(v.session_id.clone());
        let key = (v.client_id.clone(), v.day, dims(v));
        out.marketing.entry(key.clone()).or_default().visits += 1;
        m_sessions.entry(key).or_default().insert(v.session_id.clone());
        *out.minutes.entry((v.client_id.clone(), (v.event_time_ms / 60_000 * 60) as u32, v.page)).or_default() += 1;
        out.sessions.insert((v.client_id.clone(), v.day, v.session_id.clone()));
    }
    for ((c, d), s) in day_sessions {
        out.totals.get_mut(&(c, d)).unwrap().unique_sessions = s.len() as u64;
    }
    for (k, s) in m_sessions {
        out.marketing.get_mut(&k).unwrap().unique_sessions = s.len() as u64;
    }
    // Entries: the same rule per (client, entry_id); linked when any visit of the session is
    // at or before the entry's event time.
    for e in raw.iter().filter(|r| r.kind == kind::ENTRY && is_first(r, &r.entry_id)) {
        let linked = visits
            .iter()
            .any(|v| v.client_id == e.client_id && v.session_id == e.session_id && v.event_time_ms <= e.event_time_ms);
        let t = out.totals.entry((e.client_id.clone(), e.day)).or_default();
        t.entries += 1;
        t.linked_entries += u64::from(linked);
        let m = out.marketing.entry((e.client_id.clone(), e.day, dims(e))).or_default();
        m.entries += 1;
        m.linked_entries += u64::from(linked);
    }
    // Live viewers: distinct sessions per (client, webinar, minute).
    let mut viewers: BTreeMap<(String, String, u32), (u16, BTreeSet<String>)> = BTreeMap::new();
    for p in raw.iter().filter(|r| r.kind == kind::PING) {
        let minute = (p.event_time_ms.div_euclid(60_000) * 60) as u32;
        viewers
            .entry((p.client_id.clone(), p.webinar_id.clone(), minute))
            .or_insert((p.day, BTreeSet::new()))
            .1
            .insert(p.session_id.clone());
    }
    for ((c, w, m), (day, s)) in viewers {
        out.live.insert((c.clone(), w, m), s.len() as u64);
        out.totals.entry((c, day)).or_default().viewer_minutes += s.len() as u64;
    }
    out
}

impl Aggregates {
    /// Drops every bucket of a day flagged for backfill: the stream leaves late facts (and
    /// copies found not first after their day closed) to backfill, so only unflagged days must
    /// equal the recount.
    fn without(mut self, flagged: &BTreeSet<(String, u16)>) -> Self {
        let tz = clients();
        let day_of_minute = |client: &str, minute: u32| {
            time::day_number(time::client_day(i64::from(minute) * 1000, tz.timezone(client)))
        };
        let keep = |c: &str, d: u16| !flagged.contains(&(c.to_owned(), d));
        self.totals.retain(|(c, d), _| keep(c, *d));
        self.marketing.retain(|(c, d, _), _| keep(c, *d));
        self.minutes.retain(|(c, m, _), _| keep(c, day_of_minute(c, *m)));
        self.live.retain(|(c, _, m), _| keep(c, day_of_minute(c, *m)));
        self.sessions.retain(|(c, d, _)| keep(c, *d));
        self
    }
}

/// Human-readable differences between two aggregate sets (empty when equal).
fn diff(got: &Aggregates, want: &Aggregates) -> String {
    fn section<K: std::fmt::Debug + Ord, V: std::fmt::Debug + PartialEq>(
        out: &mut String,
        name: &str,
        a: &BTreeMap<K, V>,
        b: &BTreeMap<K, V>,
    ) {
        let keys: BTreeSet<&K> = a.keys().chain(b.keys()).collect();
        for k in keys {
            if a.get(k) != b.get(k) {
                out.push_str(&format!("{name} {k:?}: got {:?}, want {:?}\n", a.get(k), b.get(k)));
            }
        }
    }
    let mut out = String::new();
    section(&mut out, "totals", &got.totals, &want.totals);
    section(&mut out, "marketing", &got.marketing, &want.marketing);
    section(&mut out, "minutes", &got.minutes, &want.minutes);
    section(&mut out, "live", &got.live, &want.live);
    for s in got.sessions.symmetric_difference(&want.sessions) {
        out.push_str(&format!("sessions {s:?} only in {}\n", if got.sessions.contains(s) { "got" } else { "want" }));
    }
    out
}

trait Merged {
    fn merged(&self) -> Aggregates;
    fn raw(&self) -> Vec<FactRow>;
    fn late_days(&self) -> BTreeSet<(String, u16)>;
    fn physical_duplicates(&self) -> usize;
}

impl Merged for MemoryStore {
    fn merged(&self) -> Aggregates {
        let t = self.tables();
        let mut out = Aggregates::default();
        for r in t.totals.values() {
            *out.totals.entry((r.client_id.clone(), r.day)).or_default() += r.counters();
        }
        for r in t.marketing.values() {
            let m = out.marketing.entry((r.client_id.clone(), r.day, r.dims())).or_default();
            m.visits += r.visits;
            m.unique_sessions += r.unique_sessions;
            m.entries += r.entries;
            m.linked_entries += r.linked_entries;
        }
        for r in t.minute_visits.values() {
            *out.minutes.entry((r.client_id.clone(), r.minute, r.page)).or_default() += r.visits;
        }
        for r in t.minute_live.values() {
            *out.live.entry((r.client_id.clone(), r.webinar_id.clone(), r.minute)).or_default() += r.viewers;
        }
        // Rows with nothing in them are what a full-value writer leaves when a bucket empties.
        out.minutes.retain(|_, v| *v > 0);
        out.marketing.retain(|_, m| *m != MarketingCounters::default());
        out.sessions = t
            .day_sessions
            .values()
            .filter(|r| r.present == 1)
            .map(|r| (r.client_id.clone(), r.day, r.session_id.clone()))
            .collect();
        out
    }

    fn raw(&self) -> Vec<FactRow> {
        self.tables().facts.values().cloned().collect()
    }

    fn late_days(&self) -> BTreeSet<(String, u16)> {
        self.tables().late_days.clone()
    }

    fn physical_duplicates(&self) -> usize {
        self.tables().physical_duplicates
    }
}

// ---------------------------------------------------------------------------------------------
// Generated traffic and simulated processors

/// One generated fact and the partition its session key maps to.
#[derive(Clone)]
struct Gen {
    fact: Fact,
    partition: u16,
}

impl std::fmt::Debug for Gen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = self.fact.header();
        let detail = match &self.fact {
            Fact::Visit(v) => format!("visit s={} uid={:?} page={:?}", v.session_id, v.event_uid, v.page),
            Fact::Entry(e) => format!("entry s={} id={}", e.session_id, e.entry_id),
            Fact::Ping(p) => format!("ping s={} w={}", p.session_id, p.webinar_id),
        };
        write!(
            f,
            "#{} p{} {} t={} r={} {}",
            h.spool_seq, self.partition, h.client_id, h.event_time_ms, h.received_at_ms, detail
        )
    }
}

#[derive(Debug, Clone)]
struct Scenario {
    facts: Vec<Gen>,
    /// Undecodable messages: (position, topic slot); see [`simulate`].
    poison: Vec<(usize, usize)>,
    /// Drives interleavings, flush points, crash points and rebalances.
    seed: u64,
}

/// A message of a partition's topic log: a fact, or bytes that do not decode.
type Message = Option<Fact>;

fn topic_name(slot: usize) -> &'static str {
    ["t.visits", "t.entries", "t.pings"][slot]
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: deterministic, dependency-free.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// (kind, client, session, uid/entry/webinar, page/utm, minute offset, cid, receive delay)
type Spec = (u8, u8, u8, u8, u8, i64, u8, u8);

fn arb_fact() -> impl Strategy<Value = Spec> {
    (0u8..10, 0u8..2, 0u8..6, 0u8..5, 0u8..7, 0i64..(40 * 60), 0u8..3, 0u8..4)
}

/// Copies of one `event_uid` / `entry_id` come from any session (a cookieless retry, a relay, a
/// second tab), so with several partitions they land in different ones; receive delays make
/// later copies arrive first.
fn build(spec: Spec, spool_seq: u64, partitions: u16) -> Gen {
    let (k, client, session, ident, variant, minute, cid, delay) = spec;
    let client_id = if client == 0 { "kr" } else { "ny" };
    // Around midnight in both zones: Seoul midnight is 15:00Z, New York midnight is 05:00Z.
    let base = if client == 0 { T0 + 14 * H } else { T0 + 4 * H };
    let event_time_ms = base + minute * 60_000 + i64::from(variant) * 1_000;
    let header = FactHeader {
        spool_id: 7,
        spool_seq,
        client_id: client_id.into(),
        received_at_ms: event_time_ms + 500 + i64::from(delay) * 7 * 60_000,
        event_time_ms,
        client_ts: None,
        clock_skew: false,
    };
    let session_id = format!("s{session}");
    let utm = Utm {
        // Variant 6 sends the literal label: it must count exactly like a missing source.
        source: match variant {
            6 => Some("unknown".to_owned()),
            v if v % 3 != 0 => Some(format!("src{}", v % 2)),
            _ => None,
        },
        medium: (variant == 4).then(|| "email".to_owned()),
        campaign: (variant % 2 == 0).then(|| "fall".to_owned()),
        term: None,
        content: None,
    };
    let cid_value = (cid > 0).then(|| format!("c{cid}"));
    let fact = match k {
        0..=5 => {
            let page = [PageKind::Landing, PageKind::Webinar, PageKind::Live][usize::from(variant % 3)];
            Fact::Visit(Visit {
                header,
                session_id,
                session_origin: SessionOrigin::Cookie,
                page,
                event_id: (page == PageKind::Landing).then(|| "ev".to_owned()),
                webinar_id: (page != PageKind::Landing).then(|| format!("w{}", ident % 2)),
                event_uid: (ident < 3).then(|| format!("u{ident}")),
                path: None,
                cid: cid_value,
                cid_resolved: cid == 1,
                utm,
                utm_inherited: false,
                referrer: None,
            })
        }
        6 | 7 => Fact::Entry(Entry {
            header,
            entry_id: format!("e{ident}"),
            session_id,
            session_origin: SessionOrigin::Body,
            event_id: Some("ev".into()),
            webinar_id: None,
            cid: cid_value,
            cid_resolved: cid == 1,
            utm,
            utm_inherited: false,
            first_touch_utm: None,
            first_touch_at_ms: None,
        }),
        _ => Fact::Ping(Ping {
            header,
            webinar_id: format!("w{}", ident % 2),
            session_id,
            session_origin: SessionOrigin::Cookie,
        }),
    };
    let key = fact.partition_key();
    let partition = (eventflow_core::hash::id128("p", &key) % u128::from(partitions)) as u16;
    Gen { fact, partition }
}

fn scenario(partitions: u16) -> impl Strategy<Value = Scenario> {
    (
        proptest::collection::vec(arb_fact(), 1..120),
        any::<u64>(),
        proptest::collection::vec(0usize..120, 0..6),
        proptest::collection::vec((0usize..400, 0usize..3), 0..5),
    )
        .prop_map(move |(specs, seed, redeliver, poison)| {
            let mut facts: Vec<Gen> =
                specs.into_iter().enumerate().map(|(i, s)| build(s, i as u64 + 1, partitions)).collect();
            // Collector redeliveries: the same fact (same spool sequence) appended again later.
            for r in redeliver {
                if let Some(g) = facts.get(r % facts.len()).cloned() {
                    facts.push(g);
                }
            }
            Scenario { facts, poison, seed: seed | 1 }
        })
}

/// One processor instance: the partitions it owns, and their states once rebuilt.
#[derive(Default)]
struct Instance {
    owned: BTreeSet<u16>,
    states: BTreeMap<u16, PartitionState>,
}

struct Sim<'a> {
    model: &'a MemoryStore,
    logs: BTreeMap<u16, [Vec<Message>; 3]>,
    instances: Vec<Instance>,
    cfg: WindowConfig,
    rng: Rng,
    crashes: usize,
}

fn trace(msg: impl FnOnce() -> String) {
    if std::env::var_os("EVENTFLOW_SIM_TRACE").is_some() {
        eprintln!("{}", msg());
    }
}

impl Sim<'_> {
    /// Arms a crash at a random upcoming store call, sometimes (a bounded number per run).
    fn maybe_crash(&mut self) {
        let max = if std::env::var_os("EVENTFLOW_SIM_NO_CRASH").is_some() { 0 } else { 6 };
        if self.crashes < max && self.rng.below(5) == 0 {
            self.crashes += 1;
            let crash = if self.rng.below(4) == 0 {
                Crash::DuringAggregates(self.rng.below(32) as u8)
            } else if self.rng.below(6) == 0 {
                Crash::FactsAnswerLost
            } else {
                Crash::AtCall(self.rng.below(8) as u32)
            };
            trace(|| format!("arm {crash:?}"));
            self.model.arm(crash);
        } else {
            self.model.arm(Crash::Never);
        }
    }

    /// Rebuilds the states of `i`'s owned partitions that it does not hold; a crash drops all.
    fn activate(&mut self, i: usize) -> bool {
        let missing: Vec<u16> =
            self.instances[i].owned.iter().filter(|p| !self.instances[i].states.contains_key(p)).copied().collect();
        if missing.is_empty() {
            return true;
        }
        trace(|| format!("instance {i} rebuilds {missing:?}"));
        match block_on(flush::rebuild(self.model, &missing, self.cfg, &clients(), &BTreeMap::new(), &NoRetry)) {
            Ok((states, _)) => {
                for s in states {
                    self.instances[i].states.insert(s.partition(), s);
                }
                true
            }
            Err(_) => {
                self.instances[i].states.clear();
                false
            }
        }
    }

    fn flush(&mut self, i: usize) -> bool {
        // Half the flushes retry failed calls as the consumer loop does; the others crash.
        let retry = RetryUpTo(if self.rng.below(2) == 0 { 0 } else { 2 });
        let inst = &mut self.instances[i];
        let mut refs: Vec<&mut PartitionState> = inst.states.values_mut().collect();
        let r = block_on(flush::flush(self.model, &mut refs, false, &retry));
        trace(|| format!("instance {i} flush {:?}", r.as_ref().map(|r| r.map(|r| (r.decisions, r.notices_written)))));
        for s in inst.states.values() {
            trace(|| {
                format!(
                    "  p{} claim cursor {:x?} notice cursor {:x?}",
                    s.partition(),
                    s.claim_cursor(),
                    s.notice_cursor()
                )
            });
        }
        if r.is_ok() {
            true
        } else {
            // A crashed processor loses all its state; it starts over from the checkpoints.
            inst.states.clear();
            false
        }
    }

    /// Applies the next message of a random topic of a random partition of `i`, if any.
    fn step(&mut self, i: usize) -> bool {
        let candidates: Vec<(u16, usize)> = self.instances[i]
            .states
            .values()
            .flat_map(|s| {
                let p = s.partition();
                let logs = &self.logs[&p];
                FactKind::ALL
                    .iter()
                    .enumerate()
                    .filter(move |(t, k)| (s.offsets().get(**k) as usize) < logs[*t].len())
                    .map(move |(t, _)| (p, t))
            })
            .collect();
        if candidates.is_empty() {
            return false;
        }
        let (p, t) = candidates[self.rng.below(candidates.len() as u64) as usize];
        let state = self.instances[i].states.get_mut(&p).unwrap();
        let offset = state.offsets().get(FactKind::ALL[t]);
        let Some(fact) = self.logs[&p][t][offset as usize].clone() else {
            let row = DeadLetterRow::new(topic_name(t), p, offset, dead_letter::CORRUPT, "not avro", b"\x00poison", 1);
            let recorded = state.dead_letter(FactKind::ALL[t], offset, row);
            trace(|| format!("instance {i} p{p} dead letter at {t}/{offset}: {recorded}"));
            return true;
        };
        let seq = fact.header().spool_seq;
        let outcome = state.apply(offset, fact);
        trace(|| format!("instance {i} p{p} applies #{seq}: {outcome:?}"));
        true
    }

    /// Moves a random partition to another instance: the old owner drops it unflushed.
    fn rebalance(&mut self) {
        if self.instances.len() < 2 || std::env::var_os("EVENTFLOW_SIM_NO_REBALANCE").is_some() {
            return;
        }
        let from = self.rng.below(self.instances.len() as u64) as usize;
        let Some(&p) = self.instances[from].owned.iter().next() else { return };
        let to = (from + 1) % self.instances.len();
        self.instances[from].owned.remove(&p);
        self.instances[from].states.remove(&p);
        self.instances[to].owned.insert(p);
    }

    fn run(&mut self) {
        let mut idle_rounds = 0;
        while idle_rounds < 3 {
            let mut progressed = false;
            for i in 0..self.instances.len() {
                self.maybe_crash();
                if !self.activate(i) {
                    progressed = true;
                    continue;
                }
                let steps = self.rng.below(12);
                for _ in 0..steps {
                    progressed |= self.step(i);
                }
                if self.rng.below(3) == 0 || !progressed {
                    self.maybe_crash();
                    if !self.flush(i) {
                        progressed = true;
                    }
                }
            }
            if self.rng.below(25) == 0 {
                self.rebalance();
            }
            idle_rounds = if progressed { 0 } else { idle_rounds + 1 };
        }
        // Quiesce: no crashes; flush every instance until notices written in one round have
        // been read in the next.
        self.model.arm(Crash::Never);
        for _ in 0..3 {
            for i in 0..self.instances.len() {
                assert!(self.activate(i));
                while self.step(i) {}
                assert!(self.flush(i));
            }
        }
    }
}

/// Where the poisoned messages of `s` sit: (topic slot, partition, offset), in insertion order.
fn poison_offsets(s: &Scenario, partitions: u16) -> BTreeSet<(usize, u16, i64)> {
    logs_of(s, partitions)
        .iter()
        .flat_map(|(p, logs)| {
            logs.iter().enumerate().flat_map(move |(slot, log)| {
                log.iter().enumerate().filter(|(_, m)| m.is_none()).map(move |(o, _)| (slot, *p, o as i64))
            })
        })
        .collect()
}

/// The topic logs of every partition: the facts in order, with the poisoned messages inserted
/// at `position % (len + 1)` of partition `position % partitions`.
fn logs_of(s: &Scenario, partitions: u16) -> BTreeMap<u16, [Vec<Message>; 3]> {
    let mut logs: BTreeMap<u16, [Vec<Message>; 3]> = (0..partitions).map(|p| (p, Default::default())).collect();
    for g in &s.facts {
        let slot = match g.fact.kind() {
            FactKind::Visit => 0,
            FactKind::Entry => 1,
            FactKind::Ping => 2,
        };
        logs.get_mut(&g.partition).unwrap()[slot].push(Some(g.fact.clone()));
    }
    for (position, slot) in &s.poison {
        let p = (*position % usize::from(partitions)) as u16;
        let log = &mut logs.get_mut(&p).unwrap()[*slot];
        log.insert(position % (log.len() + 1), None);
    }
    logs
}

fn simulate(s: &Scenario, partitions: u16, instances: usize, lateness_ms: i64) -> MemoryStore {
    let model = MemoryStore::new();
    let logs = logs_of(s, partitions);
    let mut insts: Vec<Instance> = (0..instances).map(|_| Instance::default()).collect();
    for p in 0..partitions {
        insts[usize::from(p) % instances].owned.insert(p);
    }
    let mut sim = Sim {
        model: &model,
        logs,
        instances: insts,
        cfg: WindowConfig::new(lateness_ms),
        rng: Rng(s.seed),
        crashes: 0,
    };
    sim.run();
    model
}

fn dump(model: &MemoryStore) {
    trace(|| {
        let t = model.tables();
        let mut out = String::from("stored visits and entries (seq, partition, uid, dedup, received, day):\n");
        for r in t.facts.values().filter(|r| r.dedup_uid().is_some()) {
            out.push_str(&format!(
                "  #{} p{} {} {:?} {} {}\n",
                r.spool_seq,
                r.kafka_partition,
                r.client_id,
                r.dedup_uid(),
                r.dedup,
                r.received_at_ms
            ));
            out.push_str(&format!("     day {}\n", r.day));
        }
        for r in t.totals.values() {
            out.push_str(&format!(
                "totals p{} {} {} visits {} sessions {} v{:x}\n",
                r.kafka_partition, r.client_id, r.day, r.visits, r.unique_sessions, r.version
            ));
        }
        for r in t.facts.values().filter(|r| r.kind == kind::VISIT) {
            out.push_str(&format!(
                "visit #{} p{} {} {} uid {:?} dedup {} session {}\n",
                r.spool_seq, r.kafka_partition, r.client_id, r.day, r.event_uid, r.dedup, r.session_id
            ));
        }
        for ((w, seq), rows) in &t.log {
            let ids: Vec<_> = rows.iter().map(|r| format!("{}:{}#{}", r.client_id, r.uid, r.spool_seq)).collect();
            out.push_str(&format!("copy_log w{w} seq {seq:x}: {ids:?}\n"));
        }
        out.push_str(&format!(
            "notices: {:?}\n",
            t.notices.iter().map(|n| (n.target_partition, &n.uid, n.winner_spool_seq)).collect::<Vec<_>>()
        ));
        out
    });
}

/// Every poisoned message is a dead letter (one row per message, none for anything else), and
/// no more rows were inserted than the crashes can explain (a rewrite needs a lost commit).
fn check_dead_letters(model: &MemoryStore, s: &Scenario, partitions: u16) -> Result<(), TestCaseError> {
    let want: BTreeSet<(String, u16, i64)> =
        poison_offsets(s, partitions).into_iter().map(|(slot, p, o)| (topic_name(slot).to_owned(), p, o)).collect();
    let t = model.tables();
    let got: BTreeSet<(String, u16, i64)> = t.dead_letters.keys().cloned().collect();
    prop_assert_eq!(&got, &want, "dead letters");
    prop_assert!(t.dead_letter_inserts >= want.len());
    Ok(())
}

fn check(model: &MemoryStore, s: &Scenario) -> Result<(), TestCaseError> {
    let raw = model.raw();
    prop_assert_eq!(model.physical_duplicates(), 0, "a fact was stored twice");
    let distinct: BTreeSet<(u64, u64)> =
        s.facts.iter().map(|g| (g.fact.header().spool_id, g.fact.header().spool_seq)).collect();
    prop_assert_eq!(raw.len(), distinct.len(), "every fact is stored exactly once");
    let late = model.late_days();
    let d = diff(&model.merged().without(&late), &recount(&raw).without(&late));
    if !d.is_empty() {
        dump(model);
    }
    prop_assert!(d.is_empty(), "{}", d);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300), .. ProptestConfig::default() })]

    #[test]
    fn aggregates_equal_recount_despite_crashes_and_replays(s in scenario(1)) {
        let model = simulate(&s, 1, 1, 48 * H);
        check(&model, &s)?;
        check_dead_letters(&model, &s, 1)?;
    }

    #[test]
    fn copies_across_partitions_count_once(s in scenario(3)) {
        let model = simulate(&s, 3, 2, 48 * H);
        check(&model, &s)?;
        check_dead_letters(&model, &s, 3)?;
    }

    #[test]
    fn without_late_facts_everything_equals_recount(s in scenario(2)) {
        // A week of allowed lateness: nothing in the generated two days is ever late.
        let model = simulate(&s, 2, 2, 7 * 24 * H);
        let raw = model.raw();
        prop_assert!(model.late_days().is_empty(), "{:?}", model.late_days());
        prop_assert!(raw.iter().all(|r| r.late == 0));
        let d = diff(&model.merged(), &recount(&raw));
        if !d.is_empty() {
            dump(&model);
        }
        prop_assert!(d.is_empty(), "{}", d);
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-computed cases

fn visit(seq: u64, client: &str, session: &str, uid: Option<&str>, event_ms: i64, received_ms: i64) -> Fact {
    Fact::Visit(Visit {
        header: FactHeader {
            spool_id: 1,
            spool_seq: seq,
            client_id: client.into(),
            received_at_ms: received_ms,
            event_time_ms: event_ms,
            client_ts: None,
            clock_skew: false,
        },
        session_id: session.into(),
        session_origin: SessionOrigin::Cookie,
        page: PageKind::Landing,
        event_id: Some("ev".into()),
        webinar_id: None,
        event_uid: uid.map(str::to_owned),
        path: None,
        cid: None,
        cid_resolved: false,
        utm: Utm::default(),
        utm_inherited: false,
        referrer: None,
    })
}

fn entry(seq: u64, client: &str, session: &str, id: &str, event_ms: i64) -> Fact {
    Fact::Entry(Entry {
        header: FactHeader {
            spool_id: 1,
            spool_seq: seq,
            client_id: client.into(),
            received_at_ms: event_ms,
            event_time_ms: event_ms,
            client_ts: None,
            clock_skew: false,
        },
        entry_id: id.into(),
        session_id: session.into(),
        session_origin: SessionOrigin::Body,
        event_id: Some("ev".into()),
        webinar_id: None,
        cid: None,
        cid_resolved: false,
        utm: Utm::default(),
        utm_inherited: false,
        first_touch_utm: None,
        first_touch_at_ms: None,
    })
}

fn fresh(partition: u16) -> PartitionState {
    PartitionState::new(partition, WindowConfig::new(48 * H), clients(), &Checkpoint::default(), 1)
}

/// Flushes `states` through the protocol against `model`; returns the written day totals.
fn flush_all(model: &MemoryStore, states: &mut [&mut PartitionState]) -> Vec<(u16, u16, u64, u64, u64)> {
    block_on(flush::flush(model, states, false, &NoRetry)).unwrap();
    let t = model.tables();
    let mut totals: Vec<_> =
        t.totals.values().map(|r| (r.kafka_partition, r.day, r.visits, r.unique_sessions, r.entries)).collect();
    totals.sort();
    totals
}

#[test]
fn seoul_midnight_splits_days_and_dedups_by_event_uid() {
    let model = MemoryStore::new();
    let mut s = fresh(0);
    // 14:59:59Z = 23:59:59 KST on Nov 25; 15:00:00Z = 00:00 KST on Nov 26.
    let before = T0 + 15 * H - 1_000;
    assert_eq!(s.apply(0, visit(1, "kr", "a", Some("u1"), before, before)), Outcome::Deferred);
    assert_eq!(s.apply(1, visit(2, "kr", "a", Some("u1"), before + 2_000, before + 2_000)), Outcome::Deferred);
    assert_eq!(s.apply(2, visit(3, "kr", "b", None, before + 1_000, before + 1_000)), Outcome::Counted);
    assert_eq!(s.apply(3, visit(3, "kr", "b", None, before + 1_000, before + 1_000)), Outcome::Redelivery);
    let totals = flush_all(&model, &mut [&mut s]);
    let nov25 = time::day_number(chrono::NaiveDate::from_ymd_opt(2026, 11, 25).unwrap());
    // The second copy of u1 (next day) is a duplicate: its day gets a zero row.
    assert_eq!(totals, vec![(0, nov25, 1, 1, 0), (0, nov25 + 1, 1, 1, 0)]);
    let raw = model.raw();
    assert_eq!(raw.len(), 3);
    let decisions: BTreeMap<u64, i8> = raw.iter().map(|r| (r.spool_seq, r.dedup)).collect();
    assert_eq!(decisions[&1], eventflow_store::rows::dedup::COUNTED);
    assert_eq!(decisions[&2], eventflow_store::rows::dedup::DUPLICATE);
    assert_eq!(model.tables().checkpoints[&0].offsets.visits, 4);
}

#[test]
fn an_earlier_copy_in_another_partition_takes_the_count_over() {
    // The report: one visit sent from several sessions. Partition 1 lags: its copy,
    // received first, is processed after partition 0 counted a later copy.
    let model = MemoryStore::new();
    let (mut p0, mut p1) = (fresh(0), fresh(1));
    let t = T0 + 20 * H;
    p0.apply(0, visit(2, "kr", "relay", Some("v"), t, t + 5_000));
    let before = flush_all(&model, &mut [&mut p0]);
    assert_eq!(before.iter().map(|r| r.2).sum::<u64>(), 1, "partition 0 counts its copy: {before:?}");
    p1.apply(0, visit(1, "kr", "tab", Some("v"), t, t));
    // Partition 1's flush reads partition 0's copy in copy_log, finds its own copy first and
    // writes a notice for partition 0 ...
    flush_all(&model, &mut [&mut p1]);
    let targets: BTreeSet<u16> = model.tables().notices.iter().map(|n| n.target_partition).collect();
    assert_eq!(targets, BTreeSet::from([0]));
    // ... which partition 0 reads at its next flush and takes its copy out.
    let after = flush_all(&model, &mut [&mut p0]);
    let by_partition: BTreeMap<u16, (u64, u64)> = after.iter().map(|r| (r.0, (r.2, r.3))).collect();
    assert_eq!(by_partition[&0], (0, 0));
    assert_eq!(by_partition[&1], (1, 1));
    let sessions: Vec<(String, u8)> = model
        .tables()
        .day_sessions
        .values()
        .map(|r| (r.session_id.clone(), r.present))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(sessions, vec![("relay".to_owned(), 0), ("tab".to_owned(), 1)]);
}

#[test]
fn literal_unknown_source_counts_as_missing() {
    let model = MemoryStore::new();
    let mut s = fresh(0);
    let t = T0 + 20 * H;
    let mut v = visit(1, "kr", "a", None, t, t);
    if let Fact::Visit(v) = &mut v {
        v.utm.source = Some("unknown".into());
    }
    s.apply(0, v);
    flush_all(&model, &mut [&mut s]);
    let t = model.tables();
    let row = t.totals.values().next().unwrap();
    assert_eq!((row.visits, row.visits_utm_missing), (1, 1));
}

#[test]
fn late_visit_links_an_earlier_entry_and_late_days_are_flagged() {
    let model = MemoryStore::new();
    let mut s = fresh(0);
    let t = T0 + 20 * H;
    // Entry first; its session's visit arrives afterwards with an earlier event time.
    s.apply(0, entry(1, "kr", "a", "e1", t));
    block_on(flush::flush(&model, &mut [&mut s], false, &NoRetry)).unwrap();
    let first = model.tables().totals.values().next().unwrap().clone();
    assert_eq!((first.entries, first.linked_entries), (1, 0));
    s.apply(0, visit(2, "kr", "a", None, t - 60_000, t + 1_000));
    block_on(flush::flush(&model, &mut [&mut s], false, &NoRetry)).unwrap();
    let second = model.tables().totals.values().next().unwrap().clone();
    assert_eq!((second.entries, second.linked_entries), (1, 1));
    assert!(second.version > first.version);

    // Three days later the day of `t` has closed: a fact for it is stored but flagged late.
    s.apply(1, visit(3, "kr", "z", None, t + 72 * H, t + 72 * H));
    assert_eq!(s.apply(2, visit(4, "kr", "b", None, t, t + 72 * H)), Outcome::Late);
    block_on(flush::flush(&model, &mut [&mut s], false, &NoRetry)).unwrap();
    assert_eq!(model.late_days().len(), 1);
    assert!(model.raw().iter().any(|r| r.late == 1 && r.session_id == "b"));
}

#[test]
fn copies_within_the_horizon_are_duplicates_and_later_ones_count_again() {
    // Copies 2 days apart are one visit; a copy 4 days after the last one counts again (the
    // horizon is 72 hours between consecutive copies, in the stream as in the recount).
    let model = MemoryStore::new();
    let mut s = fresh(0);
    let t = T0 + 20 * H;
    s.apply(0, visit(1, "kr", "a", Some("u"), t, t));
    flush_all(&model, &mut [&mut s]);
    s.apply(1, visit(2, "kr", "b", Some("u"), t + 48 * H, t + 48 * H));
    flush_all(&model, &mut [&mut s]);
    s.apply(2, visit(3, "kr", "c", Some("u"), t + 144 * H, t + 144 * H));
    flush_all(&model, &mut [&mut s]);
    let raw = model.raw();
    let decision = |seq: u64| raw.iter().find(|r| r.spool_seq == seq).unwrap().dedup;
    use eventflow_store::rows::dedup::{COUNTED, DUPLICATE};
    assert_eq!((decision(1), decision(2), decision(3)), (COUNTED, DUPLICATE, COUNTED));
    let d = diff(&model.merged().without(&model.late_days()), &recount(&raw).without(&model.late_days()));
    assert!(d.is_empty(), "{d}");
}

/// Retries a failed store call at once, at most `.0` times (the consumer loop's policy without
/// the waiting).
#[derive(Debug)]
struct RetryUpTo(u32);

impl flush::Retry for RetryUpTo {
    async fn again(&self, _error: &eventflow_store::StoreError, attempt: u32) -> bool {
        attempt <= self.0
    }
}

#[test]
fn a_write_retried_after_its_answer_was_lost_stores_nothing_twice() {
    // ClickHouse stops while a flush is being written: an INSERT can land although its caller
    // sees an error. The consumer loop retries; what landed must not be written again.
    for crash in [Crash::DuringAggregates(0b10101), Crash::FactsAnswerLost] {
        let model = MemoryStore::new();
        let mut s = fresh(0);
        let t = T0 + 20 * H;
        s.apply(0, visit(1, "kr", "a", Some("u1"), t, t));
        s.apply(1, visit(2, "kr", "b", Some("u2"), t + 1_000, t + 1_000));
        s.apply(2, entry(3, "kr", "a", "e1", t + 2_000));
        model.arm(crash);
        block_on(flush::flush(&model, &mut [&mut s], false, &RetryUpTo(3))).unwrap();
        assert_eq!(model.physical_duplicates(), 0, "{crash:?}: a fact was stored twice");
        assert_eq!(model.raw().len(), 3, "{crash:?}");
        let d = diff(&model.merged(), &recount(&model.raw()));
        assert!(d.is_empty(), "{crash:?}: {d}");
        assert_eq!(model.tables().checkpoints[&0].offsets.visits, 2, "{crash:?}");
    }
}

#[test]
fn state_is_released_when_days_close() {
    let model = MemoryStore::new();
    let mut s = fresh(0);
    let t = T0 + 20 * H;
    for i in 0..100 {
        s.apply(i, visit(i as u64 + 1, "kr", &format!("s{i}"), Some(&format!("u{i}")), t, t));
    }
    flush_all(&model, &mut [&mut s]);
    let busy = s.state_entries();
    assert!(busy > 300, "{busy}");
    // Four days later the day is closed.
    s.apply(100, visit(101, "kr", "x", None, t + 96 * H, t + 96 * H));
    flush_all(&model, &mut [&mut s]);
    assert!(s.state_entries() < 10, "{}", s.state_entries());
}
