//! Processor throughput and memory on a generated day of traffic (not a timed test: it reports).
//!
//! `cargo bench --bench processor` (release build). Phases:
//! 1. in-process: Avro decode + windowing state (`PartitionState::apply`) + flush batches, over
//!    a generated day (default 1.2 M facts, 100 clients, 6 partitions), reporting facts/s;
//! 2. the same with every flush written to a real ClickHouse 18.16 (started by the bench);
//! 3. memory: peak RSS and state entries for days of growing numbers of distinct sessions.
//!
//! Environment: `BENCH_FACTS` (facts per day), `BENCH_SKIP_CLICKHOUSE=1`.

#[path = "../tests/e2e/harness.rs"]
#[allow(dead_code, unused_imports)]
mod harness;

use std::sync::Arc;
use std::time::Instant;

use eventflow_aggregate::state::{PartitionState, WindowConfig};
use eventflow_aggregate::ProcessorStore;
use eventflow_core::avro::FactCodec;
use eventflow_core::fact::{Entry, Fact, FactHeader, FactKind, PageKind, Ping, SessionOrigin, Utm, Visit};
use eventflow_core::{ClientDirectory, TenancyConfig};
use eventflow_store::rows::Checkpoint;
use eventflow_store::{ClickHouseConfig, Store};

const PARTITIONS: u16 = 6;
/// 2026-11-20T00:00:00Z
const T0: i64 = 1_795_132_800_000;

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A day of traffic: `n` facts in receive-time order, `sessions` distinct sessions, 100 clients.
/// Returns (partition, kind, Avro message) like the processor would consume them.
fn generate_day(n: usize, sessions: u64, day_start: i64, codec: &FactCodec) -> Vec<(u16, FactKind, Vec<u8>)> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ sessions);
    let mut out = Vec::with_capacity(n);
    let sources = ["news", "ads", "partner", "linkedin"];
    for i in 0..n {
        let t = day_start + (i as i64) * 86_400_000 / n as i64;
        let session_no = rng.below(sessions);
        let client = format!("c{:02}", session_no % 100);
        let session = format!("s{session_no}");
        let header = FactHeader {
            spool_id: 1,
            spool_seq: i as u64 + 1,
            client_id: client.clone(),
            received_at_ms: t,
            event_time_ms: t - rng.below(5_000) as i64,
            client_ts: None,
            clock_skew: false,
        };
        let r = rng.below(100);
        let fact = if r < 55 {
            let page = [PageKind::Landing, PageKind::Webinar, PageKind::Live][(r % 3) as usize];
            Fact::Visit(Visit {
                header,
                session_id: session.clone(),
                session_origin: SessionOrigin::Cookie,
                page,
                event_id: (page == PageKind::Landing).then(|| format!("ev{}", r % 5)),
                webinar_id: (page != PageKind::Landing).then(|| format!("w{}", r % 7)),
                event_uid: Some(format!("u{i}")),
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
                entry_id: format!("e{i}"),
                session_id: session.clone(),
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
            Fact::Ping(Ping {
                header,
                webinar_id: format!("w{}", r % 7),
                session_id: session.clone(),
                session_origin: SessionOrigin::Cookie,
            })
        };
        let key = fact.partition_key();
        let partition = (eventflow_core::hash::id128("p", &key) % u128::from(PARTITIONS)) as u16;
        out.push((partition, fact.kind(), codec.encode(&fact).expect("encode")));
    }
    out
}

fn clients() -> Arc<ClientDirectory> {
    Arc::new(ClientDirectory::new(&TenancyConfig::default(), &Default::default()).expect("clients"))
}

/// Decodes and applies `msgs`, flushing every `flush_every` facts; returns (facts/s, state entries at the end).
async fn run(msgs: &[(u16, FactKind, Vec<u8>)], store: Option<&Store>, flush_every: usize) -> (f64, usize) {
    let codec = FactCodec::new().expect("codec");
    let cfg = WindowConfig::new(48 * 3_600_000);
    let mut states: Vec<PartitionState> =
        (0..PARTITIONS).map(|p| PartitionState::new(p, cfg, clients(), &Checkpoint::default(), 1)).collect();
    let mut offsets = [0i64; PARTITIONS as usize];
    let started = Instant::now();
    for (i, (p, kind, bytes)) in msgs.iter().enumerate() {
        let fact = codec.decode(*kind, bytes).expect("decode");
        let s = &mut states[*p as usize];
        s.apply(offsets[*p as usize], fact);
        offsets[*p as usize] += 1;
        if (i + 1) % flush_every == 0 || i + 1 == msgs.len() {
            for s in states.iter_mut() {
                let lookups = s.pending_lookups();
                let found = match store {
                    Some(st) => st.first_visits(&lookups).await.expect("lookups"),
                    None => lookups.into_iter().map(|l| (l, None)).collect(),
                };
                s.resolve_lookups(found);
                let batch = s.take_flush();
                if let Some(st) = store {
                    st.write(&batch).await.expect("write");
                }
                s.flush_written();
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    (msgs.len() as f64 / secs, states.iter().map(PartitionState::state_entries).sum())
}

fn main() {
    let n: usize = std::env::var("BENCH_FACTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_200_000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let codec = FactCodec::new().expect("codec");

    println!("== processor benchmark: {n} facts in one day, 100 clients, {PARTITIONS} partitions");
    let t = Instant::now();
    let day = generate_day(n, 200_000, T0, &codec);
    println!(
        "generated and Avro-encoded in {:.1}s ({} bytes per message on average)",
        t.elapsed().as_secs_f64(),
        day.iter().map(|m| m.2.len()).sum::<usize>() / n
    );

    // Decode alone, for the share of decoding in the total.
    let t = Instant::now();
    for (_, kind, bytes) in &day {
        std::hint::black_box(codec.decode(*kind, bytes).expect("decode"));
    }
    let decode_rate = n as f64 / t.elapsed().as_secs_f64();
    println!("avro decode only:                      {:>10.0} facts/s", decode_rate);

    let base_rss = rss_kib("VmRSS:");
    let (rate, entries) = rt.block_on(run(&day, None, 50_000));
    println!(
        "decode + windows + flush batches:      {:>10.0} facts/s  ({entries} state entries, RSS {} MiB)",
        rate,
        rss_kib("VmRSS:") / 1024
    );
    let _ = base_rss;

    if std::env::var("BENCH_SKIP_CLICKHOUSE").is_err() {
        let dir = harness::TestDir::new("bench-processor");
        let ch = harness::ClickHouse::start(&dir);
        let config = ClickHouseConfig { url: ch.url(), database: "bench".into(), ..ClickHouseConfig::default() };
        let (rate, _) = rt.block_on(async {
            eventflow_store::migrate::apply(&config).await.expect("migrate");
            let store = Store::new(&config);
            run(&day, Some(&store), 50_000).await
        });
        let stored = ch.number("SELECT count() FROM bench.facts WHERE kind != 'checkpoint'");
        println!("... and writing to ClickHouse 18.16:    {:>10.0} facts/s  ({stored} raw facts stored)", rate);
    }

    // Memory: one day each with more distinct sessions (same number of facts per session).
    println!("== memory of the open windows vs distinct sessions per day (3 facts per session)");
    for sessions in [25_000u64, 50_000, 100_000, 200_000] {
        let msgs = generate_day(sessions as usize * 3, sessions, T0, &codec);
        let before = rss_kib("VmRSS:");
        let (_, entries) = rt.block_on(run(&msgs, None, 50_000));
        let after = rss_kib("VmRSS:");
        println!(
            "{sessions:>8} sessions: {entries:>9} state entries, RSS {:>5} MiB (+{} MiB), peak {} MiB",
            after / 1024,
            after.saturating_sub(before) / 1024,
            rss_kib("VmHWM:") / 1024
        );
        drop(msgs);
    }

    // Closed days are released: two days of traffic, the second 3 days after the first.
    let d1 = generate_day(300_000, 100_000, T0, &codec);
    let d2 = generate_day(30_000, 10_000, T0 + 3 * 86_400_000, &codec);
    let mut both = d1;
    both.extend(d2);
    let (_, entries) = rt.block_on(run(&both, None, 10_000));
    println!("after a busy day and a quiet day three days later: {entries} state entries (the busy day was released)");
    println!("peak RSS of the benchmark process: {} MiB", rss_kib("VmHWM:") / 1024);
}
