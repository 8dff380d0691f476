//! Processor throughput and memory on a generated day of traffic (not a timed test: it reports).
//!
//! `cargo bench --bench processor` (release build). Phases:
//! 1. in-process: Avro decode + windowing state (`PartitionState::apply`) + flush batches, over
//!    a generated day (default 1.2 M facts, 100 clients, 6 partitions), reporting facts/s;
//! 2. the same with every flush written to a real ClickHouse 18.16 (started by the bench);
//! 3. memory: live heap bytes held by the windowing state (counted by a wrapping global allocator,
//!    so the number is exact and independent of allocator caching) for days of growing numbers of
//!    distinct sessions, and what is left after the day closes.
//!
//! Environment: `BENCH_FACTS` (facts per day), `BENCH_SKIP_CLICKHOUSE=1`.

#[path = "../tests/e2e/harness.rs"]
#[allow(unused_imports)]
mod harness;
mod traffic;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use eventflow_aggregate::memory::MemoryStore;
use eventflow_core::avro::FactCodec;
use eventflow_store::{ClickHouseConfig, Store};
use traffic::{generate_day, DaySpec, Feeder, Msg, DAY_MS, PARTITIONS};
/// 2026-11-20T00:00:00Z
const T0: i64 = 1_795_132_800_000;

/// The system allocator, counting bytes currently allocated.
///
/// The only `unsafe` in the workspace: `GlobalAlloc` cannot be implemented without it. Every method
/// forwards its arguments unchanged to `System`, so the allocator contract is `System`'s.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_mib() -> f64 {
    LIVE_BYTES.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Feeds `msgs` to a fresh [`Feeder`] (writing to `store` when given, else to an in-memory store
/// that keeps only what the processor reads back); returns facts/s and the feeder.
async fn run(msgs: &[Msg], store: Option<&Store>, flush_every: usize) -> (f64, Feeder) {
    let mut feeder = Feeder::new();
    let started = Instant::now();
    match store {
        Some(store) => feeder.feed(msgs, store, flush_every).await,
        None => feeder.feed(msgs, &MemoryStore::lean(), flush_every).await,
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "    time: {secs:.1}s total, {:.1}s in flushes (dedup decisions, lookups, writes), {:.1}s decode + windows",
        feeder.flush_secs,
        secs - feeder.flush_secs
    );
    (msgs.len() as f64 / secs, feeder)
}

/// The real `eventflow processor` binary consuming the day from tansu and writing to ClickHouse:
/// facts/s from start to the last fact stored, and the process's peak resident memory.
fn end_to_end(day: &[Msg]) {
    use eventflow_topics::KafkaConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    let dir = harness::TestDir::new("bench-processor-e2e");
    let ch = harness::ClickHouse::start(&dir);
    let broker = harness::Tansu::start(&dir);
    let d = harness::Deployment::new(&dir, &ch.url(), &broker.brokers(), u32::from(PARTITIONS), "");
    d.migrate();

    let kafka = KafkaConfig { brokers: broker.brokers(), ..KafkaConfig::default() };
    let topics = kafka.topics();
    let producer: BaseProducer = kafka.producer().set("linger.ms", "50").create().expect("producer");
    let t = Instant::now();
    for m in day {
        let topic = topics.fact(m.kind);
        let mut record = BaseRecord::to(&topic).key(m.key.as_str()).payload(m.bytes.as_slice());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    producer.poll(std::time::Duration::from_millis(10));
                }
            }
        }
    }
    producer.flush(std::time::Duration::from_secs(600)).expect("flush");
    println!(
        "== end to end: produced {} facts to tansu in {:.1}s ({:.0} msg/s)",
        day.len(),
        t.elapsed().as_secs_f64(),
        day.len() as f64 / t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let mut processor = d.start("processor");
    let status = format!("/proc/{}/status", processor.pid());
    let field = |name: &str| -> u64 {
        std::fs::read_to_string(&status)
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let expected = day.len() as u64;
    let mut stored = 0;
    while t.elapsed().as_secs() < 1200 {
        stored = ch.number("SELECT count() FROM eventflow.facts WHERE kind != 'checkpoint'");
        if stored >= expected {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let secs = t.elapsed().as_secs_f64();
    let (peak, rss) = (field("VmHWM:"), field("VmRSS:"));
    processor.stop(std::time::Duration::from_secs(30));
    assert_eq!(stored, expected, "the processor did not store the whole day within 20 minutes");
    println!(
        "eventflow processor (tansu -> ClickHouse 18.16): {:.0} facts/s ({stored} facts in {secs:.1}s), peak RSS {} MiB, \
         RSS at the end {} MiB",
        stored as f64 / secs,
        peak / 1024,
        rss / 1024
    );
}

/// A partition takeover after 4 days of 1 M facts each: the facts are written to ClickHouse
/// 18.16 through the real flush protocol, then the real `eventflow processor` binary starts on
/// them (with empty topics): the time until every partition is rebuilt and ready, and the
/// process's peak resident memory.
fn takeover(rt: &tokio::runtime::Runtime, codec: &FactCodec) {
    let days: i64 = std::env::var("BENCH_TAKEOVER_DAYS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let per_day: usize = std::env::var("BENCH_TAKEOVER_FACTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    println!("== takeover: {days} days of {per_day} facts, {PARTITIONS} partitions");
    let dir = harness::TestDir::new("bench-takeover");
    let ch = harness::ClickHouse::start(&dir);
    let broker = harness::Tansu::start(&dir);
    let d = harness::Deployment::new(&dir, &ch.url(), &broker.brokers(), u32::from(PARTITIONS), "");
    d.migrate();
    let config = ClickHouseConfig { url: ch.url(), database: "eventflow".into(), ..ClickHouseConfig::default() };
    let store = Store::new(&config);
    let t = Instant::now();
    let mut feeder = Feeder::new();
    for k in 0..days {
        let day = generate_day(
            DaySpec {
                facts: per_day,
                sessions: per_day as u64 / 3,
                day_start_ms: T0 + k * DAY_MS,
                big_client_percent: 1,
            },
            codec,
        );
        rt.block_on(feeder.feed(&day, &store, 50_000));
    }
    drop(feeder);
    let stored = ch.number("SELECT count() FROM eventflow.facts WHERE kind != 'checkpoint'");
    println!("loaded {stored} facts through the flush protocol in {:.1}s", t.elapsed().as_secs_f64());

    let t = Instant::now();
    let mut processor = d.start("processor");
    let status = format!("/proc/{}/status", processor.pid());
    let peak = || -> u64 {
        std::fs::read_to_string(&status)
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let mut ready = 0;
    while t.elapsed().as_secs() < 1800 {
        ready = processor.log_text().matches("partition ready").count();
        if ready >= usize::from(PARTITIONS) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let secs = t.elapsed().as_secs_f64();
    let hwm = peak();
    processor.stop(std::time::Duration::from_secs(30));
    println!(
        "takeover of {PARTITIONS} partitions ({ready} ready) over {stored} stored facts: {secs:.1}s, peak RSS {} MiB",
        hwm / 1024
    );
}

fn main() {
    let n: usize = std::env::var("BENCH_FACTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_200_000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let codec = FactCodec::new().expect("codec");

    println!("== processor benchmark: {n} facts in one day, 100 clients, {PARTITIONS} partitions");
    let t = Instant::now();
    let day = generate_day(DaySpec { facts: n, sessions: 200_000, day_start_ms: T0, big_client_percent: 1 }, &codec);
    println!(
        "generated and Avro-encoded in {:.1}s ({} bytes per message on average)",
        t.elapsed().as_secs_f64(),
        day.iter().map(|m| m.bytes.len()).sum::<usize>() / n
    );

    // Decode alone, for the share of decoding in the total.
    let t = Instant::now();
    for m in &day {
        std::hint::black_box(codec.decode(m.kind, &m.bytes).expect("decode"));
    }
    let decode_rate = n as f64 / t.elapsed().as_secs_f64();
    println!("avro decode only:                      {:>10.0} facts/s", decode_rate);

    let before = live_mib();
    let (rate, states) = rt.block_on(run(&day, None, 50_000));
    println!(
        "decode + windows + flush batches:      {:>10.0} facts/s  ({} state entries, {:.1} MiB of state)",
        rate,
        states.state_entries(),
        live_mib() - before
    );
    drop(states);

    if std::env::var("BENCH_SKIP_CLICKHOUSE").is_err() {
        let dir = harness::TestDir::new("bench-processor");
        let ch = harness::ClickHouse::start(&dir);
        let config = ClickHouseConfig { url: ch.url(), database: "bench".into(), ..ClickHouseConfig::default() };
        let (rate, _states) = rt.block_on(async {
            eventflow_store::migrate::apply(&config).await.expect("migrate");
            let store = Store::new(&config);
            run(&day, Some(&store), 50_000).await
        });
        let stored = ch.number("SELECT count() FROM bench.facts WHERE kind != 'checkpoint'");
        println!("... and writing to ClickHouse 18.16:    {:>10.0} facts/s  ({stored} raw facts stored)", rate);
    }

    if std::env::var("BENCH_SKIP_BROKER").is_err() {
        end_to_end(&day);
    }
    drop(day);

    if std::env::var("BENCH_SKIP_TAKEOVER").is_err() {
        takeover(&rt, &codec);
    }

    if std::env::var("BENCH_SKIP_MEMORY").is_ok() {
        return;
    }
    // Memory: one day each with more distinct sessions (same number of facts per session).
    println!("== heap held by the open windows vs distinct sessions per day (3 facts per session)");
    for sessions in [25_000u64, 50_000, 100_000, 200_000, 400_000] {
        let msgs = generate_day(
            DaySpec { facts: sessions as usize * 3, sessions, day_start_ms: T0, big_client_percent: 1 },
            &codec,
        );
        let before = live_mib();
        let (_, states) = rt.block_on(run(&msgs, None, 50_000));
        let held = live_mib() - before;
        println!(
            "{sessions:>8} sessions: {:>9} state entries, {held:>7.1} MiB held, {:>4.0} bytes per session",
            states.state_entries(),
            held * 1024.0 * 1024.0 / sessions as f64
        );
    }

    // Closed days are released: two days of traffic, the second 3 days after the first.
    let d1 =
        generate_day(DaySpec { facts: 300_000, sessions: 100_000, day_start_ms: T0, big_client_percent: 1 }, &codec);
    let d2 = generate_day(
        DaySpec { facts: 30_000, sessions: 10_000, day_start_ms: T0 + 3 * DAY_MS, big_client_percent: 1 },
        &codec,
    );
    let before = live_mib();
    let (_, busy) = rt.block_on(run(&d1, None, 10_000));
    let busy_mib = live_mib() - before;
    drop(busy);
    let mut both = d1;
    both.extend(d2);
    let before = live_mib();
    let (_, states) = rt.block_on(run(&both, None, 10_000));
    println!(
        "busy day alone: {busy_mib:.1} MiB held; busy day + quiet day 3 days later: {} state entries, {:.1} MiB \
         held (the busy day was released)",
        states.state_entries(),
        live_mib() - before
    );
    drop(states);
    println!("peak RSS of the benchmark process: {} MiB", rss_kib("VmHWM:") / 1024);
}
