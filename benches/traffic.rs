//! Generated traffic and an in-process processor, shared by the benchmarks.
//!
//! The generator is deterministic (xorshift, seeded per day) so runs are comparable. The feeder
//! drives [`PartitionState`] exactly like `eventflow processor` does between Kafka and ClickHouse:
//! apply each fact, and every `flush_every` facts run the processor's flush protocol
//! (`eventflow_aggregate::flush`: dedup decisions, lookups, the writes) against a store.

use std::sync::Arc;
use std::time::Instant;

use eventflow_aggregate::flush::{self, NoRetry};
use eventflow_aggregate::state::{PartitionState, WindowConfig};
use eventflow_aggregate::ProcessorStore;
use eventflow_core::avro::FactCodec;
use eventflow_core::fact::{Entry, Fact, FactHeader, FactKind, PageKind, Ping, SessionOrigin, Utm, Visit};
use eventflow_core::{ClientDirectory, TenancyConfig};
use eventflow_store::rows::Checkpoint;

/// Partitions of the fact topics.
pub const PARTITIONS: u16 = 6;
/// Clients `c00` .. `c99`.
pub const CLIENTS: u64 = 100;
pub const DAY_MS: i64 = 86_400_000;

/// One Kafka message: the partition is used in-process, the key when producing to a broker.
pub struct Msg {
    pub partition: u16,
    pub kind: FactKind,
    pub key: String,
    pub bytes: Vec<u8>,
}

/// xorshift64: deterministic, seeded, good enough to shape traffic.
pub struct Rng(pub u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A day of traffic starting at `day_start_ms`.
#[derive(Debug, Clone, Copy)]
pub struct DaySpec {
    /// Facts, spread evenly over the day in receive order.
    pub facts: usize,
    /// Distinct sessions drawn from (session numbers repeat across days: returning visitors).
    pub sessions: u64,
    pub day_start_ms: i64,
    /// Percent of sessions that belong to `c00`, the big client; the rest spread over `c01`..`c99`.
    pub big_client_percent: u64,
}

/// Client of a session number.
fn client_of(session_no: u64, big_client_percent: u64) -> String {
    if session_no % 100 < big_client_percent {
        "c00".to_owned()
    } else {
        format!("c{:02}", 1 + session_no % (CLIENTS - 1))
    }
}

/// Live webinars of a day: three two-hour slots (10:00, 14:00 and 20:00 in Asia/Seoul).
const WEBINAR_SLOTS_MS: [i64; 3] = [3_600_000, 5 * 3_600_000, 11 * 3_600_000];
const WEBINAR_MS: i64 = 2 * 3_600_000;

/// Generates a day: 55 % visits (landing, webinar info, live pages; three in four with UTM tags,
/// one in four with a campaign id) and 5 % registrations spread over the day, 40 % live-presence
/// pings inside the day's webinar slots (one webinar per slot and client, viewers ping about
/// once a minute, so a busy webinar has many viewers per minute bucket).
pub fn generate_day(spec: DaySpec, codec: &FactCodec) -> Vec<Msg> {
    let DaySpec { facts: n, sessions, day_start_ms, big_client_percent } = spec;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ sessions ^ (day_start_ms as u64).rotate_left(17));
    // One collector spool per generated day: a spool's sequence numbers never repeat, and the
    // processor drops repeats as redeliveries.
    let spool_id = (day_start_ms as u64) ^ (sessions << 1) ^ n as u64;
    let day_no = day_start_ms.div_euclid(DAY_MS);
    let sources = ["news", "ads", "partner", "linkedin"];
    // (receive time, shape draw, session number, webinar slot), then in receive order.
    let mut plan: Vec<(i64, u64, u64, usize)> = (0..n)
        .map(|_| {
            let r = rng.below(100);
            let slot = rng.below(3) as usize;
            let t = if r >= 60 {
                day_start_ms + WEBINAR_SLOTS_MS[slot] + rng.below(WEBINAR_MS as u64) as i64
            } else {
                day_start_ms + rng.below(DAY_MS as u64) as i64
            };
            (t, r, rng.below(sessions), slot)
        })
        .collect();
    plan.sort_unstable_by_key(|p| p.0);
    let mut out = Vec::with_capacity(n);
    for (i, (t, r, session_no, slot)) in plan.into_iter().enumerate() {
        let client = client_of(session_no, big_client_percent);
        let session = format!("s{session_no}");
        let webinar = format!("w{day_no}-{slot}");
        let header = FactHeader {
            spool_id,
            spool_seq: i as u64 + 1,
            client_id: client,
            received_at_ms: t,
            event_time_ms: t - rng.below(5_000) as i64,
            client_ts: None,
            clock_skew: false,
        };
        let fact = if r < 55 {
            let page = [PageKind::Landing, PageKind::Webinar, PageKind::Live][(r % 3) as usize];
            Fact::Visit(Visit {
                header,
                session_id: session,
                session_origin: SessionOrigin::Cookie,
                page,
                event_id: (page == PageKind::Landing).then(|| format!("ev{}", r % 5)),
                webinar_id: (page != PageKind::Landing).then(|| webinar.clone()),
                event_uid: Some(format!("u{spool_id:x}-{i}")),
                path: Some("/event/summit".into()),
                cid: (r % 4 == 0).then(|| format!("cid{}", r % 9)),
                cid_resolved: false,
                utm: if r % 3 == 0 {
                    Utm::default()
                } else {
                    Utm {
                        source: Some(sources[(r % 4) as usize].into()),
                        medium: Some("email".into()),
                        campaign: Some("fall".into()),
                        ..Utm::default()
                    }
                },
                utm_inherited: false,
                referrer: None,
            })
        } else if r < 60 {
            Fact::Entry(Entry {
                header,
                entry_id: format!("e{spool_id:x}-{i}"),
                session_id: session,
                session_origin: SessionOrigin::Cookie,
                event_id: Some("ev1".into()),
                webinar_id: None,
                cid: None,
                cid_resolved: false,
                utm: Utm::default(),
                utm_inherited: false,
                first_touch_utm: None,
                first_touch_at_ms: None,
            })
        } else {
            Fact::Ping(Ping { header, webinar_id: webinar, session_id: session, session_origin: SessionOrigin::Cookie })
        };
        let key = fact.partition_key();
        let partition = (eventflow_core::hash::id128("p", &key) % u128::from(PARTITIONS)) as u16;
        out.push(Msg { partition, kind: fact.kind(), bytes: codec.encode(&fact).expect("encode"), key });
    }
    out
}

/// The processor's per-partition state machines, fed from memory instead of Kafka.
#[derive(Debug)]
pub struct Feeder {
    codec: FactCodec,
    states: Vec<PartitionState>,
    offsets: Vec<i64>,
    /// Seconds spent in the flush protocol (dedup decisions, lookups, writes).
    pub flush_secs: f64,
}

impl Feeder {
    pub fn new() -> Self {
        let clients = Arc::new(ClientDirectory::new(&TenancyConfig::default(), &Default::default()).expect("clients"));
        let cfg = WindowConfig::new(48 * 3_600_000);
        Self {
            codec: FactCodec::new().expect("codec"),
            states: (0..PARTITIONS)
                .map(|p| PartitionState::new(p, cfg, clients.clone(), &Checkpoint::default(), 1))
                .collect(),
            offsets: vec![0; usize::from(PARTITIONS)],
            flush_secs: 0.0,
        }
    }

    /// Decodes and applies `msgs`, flushing every partition every `flush_every` facts and at the
    /// end, to `store`.
    pub async fn feed<S: ProcessorStore>(&mut self, msgs: &[Msg], store: &S, flush_every: usize) {
        for (i, m) in msgs.iter().enumerate() {
            let fact = self.codec.decode(m.kind, &m.bytes).expect("decode");
            let p = usize::from(m.partition);
            self.states[p].apply(self.offsets[p], fact);
            self.offsets[p] += 1;
            if (i + 1) % flush_every == 0 || i + 1 == msgs.len() {
                self.flush(store).await;
            }
        }
    }

    async fn flush<S: ProcessorStore>(&mut self, store: &S) {
        let t = Instant::now();
        let mut states: Vec<&mut PartitionState> = self.states.iter_mut().collect();
        flush::flush(store, &mut states, false, &NoRetry).await.expect("flush");
        self.flush_secs += t.elapsed().as_secs_f64();
    }

    /// Entries held by the windowing state of all partitions.
    pub fn state_entries(&self) -> usize {
        self.states.iter().map(PartitionState::state_entries).sum()
    }
}
