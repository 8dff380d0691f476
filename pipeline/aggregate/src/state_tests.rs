//! Property tests of the windowing state against an independent recount.
//!
//! `recount` below is written from the contract's definitions over the stored raw rows, with
//! none of the state's machinery. The simulation drives one or two partitions through random
//! interleavings of the three fact topics, flushes into a model of the ClickHouse tables
//! (ReplacingMergeTree: highest version per key wins), crashes at random write steps, restarts
//! from the stored checkpoint with a new epoch and replays. Whatever happened, the merged
//! aggregates must equal the recount and no fact may be stored twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;

use super::*;
use eventflow_core::fact::{FactHeader, SessionOrigin};
use eventflow_core::{ClientSettings, TenancyConfig};
use eventflow_store::rows::kind;

const H: i64 = 3_600_000;
/// 2026-11-25T00:00:00Z.
const T0: i64 = 1_795_564_800_000;

fn clients() -> Arc<ClientDirectory> {
    let mut map = std::collections::BTreeMap::new();
    map.insert("kr".to_owned(), ClientSettings { timezone: Some("Asia/Seoul".into()), token: None });
    map.insert("ny".to_owned(), ClientSettings { timezone: Some("America/New_York".into()), token: None });
    Arc::new(ClientDirectory::new(&TenancyConfig::default(), &map).unwrap())
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
    let visits: Vec<&FactRow> = raw.iter().filter(|r| r.kind == kind::VISIT).collect();
    // Earliest copy (lowest seq) of each (client, event_uid) counts.
    let mut first_copy: HashMap<(&str, &str), u64> = HashMap::new();
    for v in visits.iter().filter(|v| !v.event_uid.is_empty()) {
        let e = first_copy.entry((&v.client_id, &v.event_uid)).or_insert(u64::MAX);
        *e = (*e).min(v.seq);
    }
    let counted = visits
        .iter()
        .filter(|v| v.event_uid.is_empty() || first_copy[&(v.client_id.as_str(), v.event_uid.as_str())] == v.seq);
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
        t.visits_utm_missing += u64::from(v.utm_source.is_empty());
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
    // Entries: lowest seq per (client, entry_id); linked when any visit of the session is at or
    // before the entry's event time.
    let mut first_entry: HashMap<(&str, &str), &FactRow> = HashMap::new();
    for e in raw.iter().filter(|r| r.kind == kind::ENTRY) {
        let slot = first_entry.entry((&e.client_id, &e.entry_id)).or_insert(e);
        if e.seq < slot.seq {
            *slot = e;
        }
    }
    for e in first_entry.values() {
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
    /// Drops every bucket of a day flagged for backfill: the stream leaves late facts to
    /// backfill, so only unflagged days must equal the recount.
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

// ---------------------------------------------------------------------------------------------
// Model of the ClickHouse tables

#[derive(Debug, Default)]
struct Store {
    facts: BTreeMap<String, FactRow>,
    physical_duplicates: usize,
    checkpoints: HashMap<u16, Checkpoint>,
    minute_visits: HashMap<(String, u32, i8, u16), MinuteVisitsRow>,
    minute_live: HashMap<(String, String, u32, u16), MinuteLiveRow>,
    totals: HashMap<(String, u16, u16), DailyTotalsRow>,
    marketing: HashMap<(String, u16, MarketingDims, u16), DailyMarketingRow>,
    sessions: BTreeSet<(String, u16, String)>,
    first_visits: HashMap<(String, String), i64>,
    /// Client days with late facts (pending backfill).
    late_days: BTreeSet<(String, u16)>,
}

fn keep_max<K: std::hash::Hash + Eq, R>(map: &mut HashMap<K, R>, key: K, row: R, version: impl Fn(&R) -> u64) {
    match map.get(&key) {
        Some(old) if version(old) > version(&row) => {}
        _ => {
            map.insert(key, row);
        }
    }
}

/// Where a simulated crash interrupts a flush.
#[derive(Debug, Clone, Copy)]
enum Crash {
    Never,
    Before(usize),
    During(u8),
}

impl Store {
    /// Writes `batch` like the processor does: first visits, late markers, facts, then the five
    /// aggregate tables concurrently. Returns false when it "crashed": `Crash::Before(step)` stops
    /// before step 0-2; `Crash::During(mask)` stops while the aggregate inserts were in flight,
    /// after only the tables whose bit is set in `mask` landed (any subset can).
    fn write(&mut self, batch: &FlushBatch, crash: Crash) -> bool {
        for step in 0..8 {
            match crash {
                Crash::Before(at) if step == at => return false,
                Crash::During(mask) if step >= 3 && mask & (1 << (step - 3)) == 0 => continue,
                _ => {}
            }
            match step {
                0 => {
                    for r in &batch.first_visits {
                        let e =
                            self.first_visits.entry((r.client_id.clone(), r.session_id.clone())).or_insert(i64::MAX);
                        *e = (*e).min(r.first_visit_ms);
                    }
                }
                1 => batch.late.iter().for_each(|r| {
                    self.late_days.insert((r.client_id.clone(), r.day));
                }),
                2 => {
                    for r in &batch.facts {
                        if r.kind == kind::CHECKPOINT {
                            let cp: Checkpoint = serde_json::from_str(&r.checkpoint).unwrap();
                            keep_max(&mut self.checkpoints, r.kafka_partition, cp, |c| c.seq);
                        } else {
                            if self.facts.contains_key(&r.fact_id) {
                                self.physical_duplicates += 1;
                            }
                            let keep = self.facts.get(&r.fact_id).is_none_or(|old| old.seq <= r.seq);
                            if keep {
                                self.facts.insert(r.fact_id.clone(), r.clone());
                            }
                        }
                    }
                }
                3 => batch.minute_visits.iter().for_each(|r| {
                    keep_max(
                        &mut self.minute_visits,
                        (r.client_id.clone(), r.minute, r.page, r.kafka_partition),
                        r.clone(),
                        |r| r.version,
                    )
                }),
                4 => batch.minute_live.iter().for_each(|r| {
                    keep_max(
                        &mut self.minute_live,
                        (r.client_id.clone(), r.webinar_id.clone(), r.minute, r.kafka_partition),
                        r.clone(),
                        |r| r.version,
                    )
                }),
                5 => batch.daily_totals.iter().for_each(|r| {
                    keep_max(&mut self.totals, (r.client_id.clone(), r.day, r.kafka_partition), r.clone(), |r| {
                        r.version
                    })
                }),
                6 => batch.daily_marketing.iter().for_each(|r| {
                    keep_max(
                        &mut self.marketing,
                        (r.client_id.clone(), r.day, r.dims(), r.kafka_partition),
                        r.clone(),
                        |r| r.version,
                    )
                }),
                _ => batch.daily_sessions.iter().for_each(|r| {
                    self.sessions.insert((r.client_id.clone(), r.day, r.session_id.clone()));
                }),
            }
        }
        !matches!(crash, Crash::During(_))
    }

    fn merged(&self) -> Aggregates {
        let mut out = Aggregates::default();
        for r in self.totals.values() {
            *out.totals.entry((r.client_id.clone(), r.day)).or_default() += r.counters();
        }
        for r in self.marketing.values() {
            let m = out.marketing.entry((r.client_id.clone(), r.day, r.dims())).or_default();
            m.visits += r.visits;
            m.unique_sessions += r.unique_sessions;
            m.entries += r.entries;
            m.linked_entries += r.linked_entries;
        }
        for r in self.minute_visits.values() {
            *out.minutes.entry((r.client_id.clone(), r.minute, r.page)).or_default() += r.visits;
        }
        for r in self.minute_live.values() {
            *out.live.entry((r.client_id.clone(), r.webinar_id.clone(), r.minute)).or_default() += r.viewers;
        }
        out.sessions = self.sessions.clone();
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Generated traffic and the simulated processor

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
    /// Drives interleavings, flush points and crash points.
    seed: u64,
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

fn arb_fact(partitions: u16) -> impl Strategy<Value = (u8, u8, u8, u8, u8, i64, u8, u8)> {
    let _ = partitions;
    // (kind, client, session, uid/entry/webinar, page/utm, minute offset, cid, origin)
    (0u8..10, 0u8..2, 0u8..6, 0u8..5, 0u8..6, 0i64..(40 * 60), 0u8..3, 0u8..3)
}

/// With `scoped_ids`, an `event_uid` / `entry_id` is only ever reused within one session: copies
/// of one visit or entry then share a partition (the documented precondition of exact dedup with
/// more than one partition, see docs/adr/0002).
fn build(spec: (u8, u8, u8, u8, u8, i64, u8, u8), spool_seq: u64, partitions: u16, scoped_ids: bool) -> Gen {
    let (k, client, session, ident, variant, minute, cid, _) = spec;
    let client_id = if client == 0 { "kr" } else { "ny" };
    // Around midnight in both zones: Seoul midnight is 15:00Z, New York midnight is 05:00Z.
    let base = if client == 0 { T0 + 14 * H } else { T0 + 4 * H };
    let event_time_ms = base + minute * 60_000 + i64::from(variant) * 1_000;
    let header = FactHeader {
        spool_id: 7,
        spool_seq,
        client_id: client_id.into(),
        received_at_ms: event_time_ms + 500,
        event_time_ms,
        client_ts: None,
        clock_skew: false,
    };
    let session_id = format!("s{session}");
    let scope = if scoped_ids { session_id.clone() } else { String::new() };
    let utm = Utm {
        source: (variant % 3 != 0).then(|| format!("src{}", variant % 2)),
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
                event_uid: (ident < 3).then(|| format!("u{scope}{ident}")),
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
            entry_id: format!("e{scope}{ident}"),
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
    let scoped_ids = partitions > 1;
    (
        proptest::collection::vec(arb_fact(partitions), 1..120),
        any::<u64>(),
        proptest::collection::vec(0usize..120, 0..6),
    )
        .prop_map(move |(specs, seed, redeliver)| {
            let mut facts: Vec<Gen> =
                specs.into_iter().enumerate().map(|(i, s)| build(s, i as u64 + 1, partitions, scoped_ids)).collect();
            // Collector redeliveries: the same fact (same spool sequence) appended again later.
            for r in redeliver {
                if let Some(g) = facts.get(r % facts.len()).cloned() {
                    facts.push(g);
                }
            }
            Scenario { facts, seed: seed | 1 }
        })
}

/// Runs one partition's three topic logs through the processor with crashes; returns the store.
fn run_partition(store: &mut Store, logs: &[Vec<Fact>; 3], partition: u16, rng: &mut Rng, lateness_ms: i64) {
    let cfg = WindowConfig::new(lateness_ms);
    let dir = clients();
    let mut restarts = 0;
    'owner: loop {
        // Take the partition over: checkpoint, new epoch, replay of stored facts.
        let cp = store.checkpoints.get(&partition).cloned().unwrap_or_default();
        let mut state = PartitionState::new(partition, cfg, dir.clone(), &cp, cp.epoch + 1);
        let from = state.replay_from_ms();
        let mut stored: Vec<FactRow> = store
            .facts
            .values()
            .filter(|r| r.kafka_partition == partition && r.received_at_ms >= from)
            .cloned()
            .collect();
        stored.sort_by_key(|r| r.seq);
        state.replay(stored);
        let flush = |state: &mut PartitionState, store: &mut Store, crash: Crash| -> bool {
            let lookups = state.pending_lookups();
            let found: Vec<_> = lookups
                .into_iter()
                .map(|s| {
                    let ms = store.first_visits.get(&(s.client_id.clone(), s.session_id.clone())).copied();
                    (s, ms)
                })
                .collect();
            state.resolve_lookups(found);
            let batch = state.take_flush();
            let ok = store.write(&batch, crash);
            if ok {
                state.flush_written();
            }
            ok
        };
        // Crash the rebuild flush sometimes, too (at most a few restarts so the run ends).
        let crash = |rng: &mut Rng, restarts: usize| {
            if restarts < 4 && rng.below(6) == 0 {
                match rng.below(4) {
                    3 => Crash::During(rng.below(32) as u8),
                    step => Crash::Before(step as usize),
                }
            } else {
                Crash::Never
            }
        };
        if !flush(&mut state, store, crash(rng, restarts)) {
            restarts += 1;
            continue 'owner;
        }
        let mut next = [0usize; 3];
        for (i, kind) in FactKind::ALL.iter().enumerate() {
            next[i] = usize::try_from(state.offsets().get(*kind)).unwrap();
        }
        loop {
            let open: Vec<usize> = (0..3).filter(|i| next[*i] < logs[*i].len()).collect();
            if open.is_empty() {
                if !flush(&mut state, store, Crash::Never) {
                    unreachable!()
                }
                return;
            }
            let topic = open[rng.below(open.len() as u64) as usize];
            let offset = next[topic];
            next[topic] += 1;
            state.apply(offset as i64, logs[topic][offset].clone());
            if rng.below(7) == 0 && !flush(&mut state, store, crash(rng, restarts)) {
                restarts += 1;
                continue 'owner;
            }
        }
    }
}

fn simulate(s: &Scenario, partitions: u16, lateness_ms: i64) -> Store {
    let mut store = Store::default();
    let mut rng = Rng(s.seed);
    for p in 0..partitions {
        let mut logs: [Vec<Fact>; 3] = Default::default();
        for g in s.facts.iter().filter(|g| g.partition == p) {
            let slot = match g.fact.kind() {
                FactKind::Visit => 0,
                FactKind::Entry => 1,
                FactKind::Ping => 2,
            };
            logs[slot].push(g.fact.clone());
        }
        run_partition(&mut store, &logs, p, &mut rng, lateness_ms);
    }
    store
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300), .. ProptestConfig::default() })]

    #[test]
    fn aggregates_equal_recount_despite_crashes_and_replays(s in scenario(1)) {
        let store = simulate(&s, 1, 48 * H);
        let raw: Vec<FactRow> = store.facts.values().cloned().collect();
        prop_assert_eq!(store.physical_duplicates, 0, "a fact was stored twice");
        let distinct_facts: BTreeSet<(u64, u64)> = s.facts.iter().map(|g| (g.fact.header().spool_id, g.fact.header().spool_seq)).collect();
        prop_assert_eq!(raw.len(), distinct_facts.len(), "every fact is stored exactly once");
        let d = diff(&store.merged().without(&store.late_days), &recount(&raw).without(&store.late_days));
        prop_assert!(d.is_empty(), "{}", d);
    }

    #[test]
    fn partitions_add_up(s in scenario(3)) {
        let store = simulate(&s, 3, 48 * H);
        let raw: Vec<FactRow> = store.facts.values().cloned().collect();
        prop_assert_eq!(store.physical_duplicates, 0);
        let d = diff(&store.merged().without(&store.late_days), &recount(&raw).without(&store.late_days));
        prop_assert!(d.is_empty(), "{}", d);
    }

    #[test]
    fn without_late_facts_everything_equals_recount(s in scenario(2)) {
        // A week of allowed lateness: nothing in the generated two days is ever late.
        let store = simulate(&s, 2, 7 * 24 * H);
        let raw: Vec<FactRow> = store.facts.values().cloned().collect();
        prop_assert!(store.late_days.is_empty());
        prop_assert!(raw.iter().all(|r| r.late == 0));
        let d = diff(&store.merged(), &recount(&raw));
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

fn fresh() -> PartitionState {
    PartitionState::new(0, WindowConfig::new(48 * H), clients(), &Checkpoint::default(), 1)
}

#[test]
fn seoul_midnight_splits_days_and_dedups_by_event_uid() {
    let mut s = fresh();
    // 14:59:59Z = 23:59:59 KST on Nov 25; 15:00:00Z = 00:00 KST on Nov 26.
    let before = T0 + 15 * H - 1_000;
    assert_eq!(s.apply(0, visit(1, "kr", "a", Some("u1"), before, before)), Outcome::Counted);
    assert_eq!(s.apply(1, visit(2, "kr", "a", Some("u1"), before + 2_000, before + 2_000)), Outcome::Duplicate);
    assert_eq!(s.apply(2, visit(3, "kr", "b", None, before + 1_000, before + 1_000)), Outcome::Counted);
    assert_eq!(s.apply(3, visit(3, "kr", "b", None, before + 1_000, before + 1_000)), Outcome::Redelivery);
    let batch = s.take_flush();
    let mut totals: Vec<(u16, u64, u64)> =
        batch.daily_totals.iter().map(|r| (r.day, r.visits, r.unique_sessions)).collect();
    totals.sort();
    let nov25 = time::day_number(chrono::NaiveDate::from_ymd_opt(2026, 11, 25).unwrap());
    assert_eq!(totals, vec![(nov25, 1, 1), (nov25 + 1, 1, 1)]);
    assert_eq!(batch.facts.len(), 4, "three facts and the checkpoint");
    assert_eq!(batch.checkpoint.offsets.visits, 4);
}

#[test]
fn late_visit_links_an_earlier_entry_and_late_days_are_flagged() {
    let mut s = fresh();
    let t = T0 + 20 * H;
    // Entry first; its session's visit arrives afterwards with an earlier event time.
    s.apply(0, entry(1, "kr", "a", "e1", t));
    let lookups = s.pending_lookups();
    assert_eq!(lookups.len(), 1);
    s.resolve_lookups(lookups.into_iter().map(|l| (l, None)));
    let first = s.take_flush();
    assert_eq!((first.daily_totals[0].entries, first.daily_totals[0].linked_entries), (1, 0));
    s.apply(0, visit(2, "kr", "a", None, t - 60_000, t + 1_000));
    let second = s.take_flush();
    assert_eq!((second.daily_totals[0].entries, second.daily_totals[0].linked_entries), (1, 1));
    assert!(second.daily_totals[0].version > first.daily_totals[0].version);

    // Three days later the day of `t` has closed: a fact for it is stored but flagged late.
    s.apply(1, visit(3, "kr", "z", None, t + 72 * H, t + 72 * H));
    assert_eq!(s.apply(2, visit(4, "kr", "b", None, t, t + 72 * H)), Outcome::Late);
    let third = s.take_flush();
    assert_eq!(third.late.len(), 1);
    assert!(third.facts.iter().any(|r| r.late == 1 && r.session_id == "b"));
}

#[test]
fn state_is_released_when_days_close() {
    let mut s = fresh();
    let t = T0 + 20 * H;
    for i in 0..100 {
        s.apply(i, visit(i as u64 + 1, "kr", &format!("s{i}"), Some(&format!("u{i}")), t, t));
    }
    s.take_flush();
    s.flush_written();
    let busy = s.state_entries();
    assert!(busy > 300, "{busy}");
    // Four days later: the day is closed and the dedup horizon passed.
    s.apply(100, visit(101, "kr", "x", None, t + 96 * H, t + 96 * H));
    s.take_flush();
    s.flush_written();
    assert!(s.state_entries() < 10, "{}", s.state_entries());
}
