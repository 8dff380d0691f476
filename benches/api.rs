//! Overview latency over a large data set (not a timed test: it reports numbers).
//!
//! `cargo bench --bench api` (release build). Steps:
//! 1. starts ClickHouse 18.16 and loads 60 generated days for 100 clients (default 170 000 facts a
//!    day, 10.2 M raw facts; `c00` is a big client with 10 % of the sessions) through the
//!    processor's own state machines and writes, so the aggregates are exactly what
//!    `eventflow processor` would have written;
//! 2. starts `eventflow api` and requests overviews of random clients and end days, `range` 7 and
//!    30 days, from several concurrent connections, on the aggregate path;
//! 3. marks every day as waiting for backfill (`late_facts` rows, as the processor writes for late
//!    facts), which sends every section to the raw recount, checks that both paths return the same
//!    numbers, and measures the raw path the same way.
//!
//! Latency is measured by the client, from sending the request to the last byte of the body.
//! Environment: `BENCH_DAYS` (60), `BENCH_FACTS_PER_DAY` (170000), `BENCH_REQUESTS` (requests per
//! aggregate scenario, 1000; raw scenarios do a 25th, on one connection), `BENCH_CONCURRENCY`
//! (connections of the aggregate scenarios, a list: `1,4`).

#[path = "../tests/e2e/harness.rs"]
#[allow(unused_imports)]
mod harness;
#[allow(dead_code)] // each benchmark uses part of it
mod traffic;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate};
use eventflow_core::avro::FactCodec;
use eventflow_store::{ClickHouseConfig, Store};
use serde_json::Value;
use traffic::{generate_day, DaySpec, Feeder, Rng, CLIENTS, DAY_MS};

/// 2026-09-20T00:00:00Z: 60 days end before the benchmark's "today".
const START_MS: i64 = 1_789_862_400_000;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One overview request: client and inclusive date range.
#[derive(Debug, Clone)]
struct Request {
    client: String,
    from: NaiveDate,
    to: NaiveDate,
}

impl Request {
    fn url(&self, api: &str) -> String {
        format!("{api}/v1/clients/{}/statistics/overview?from={}&to={}", self.client, self.from, self.to)
    }
}

/// `count` requests for ranges of `days` days inside the loaded data; `big` picks only `c00`.
fn requests(count: usize, days: i64, data_days: i64, big: bool, seed: u64) -> Vec<Request> {
    let first = DateTime::from_timestamp_millis(START_MS).expect("start").date_naive();
    let mut rng = Rng(seed | 1);
    (0..count)
        .map(|_| {
            let client = if big { 0 } else { rng.below(CLIENTS) };
            // Whole days of data in the clients' time zone (Asia/Seoul, UTC+9): days 1..data_days-1.
            let end = days + rng.below((data_days - 1 - days).max(1) as u64) as i64;
            let to = first + chrono::Duration::days(end);
            Request { client: format!("c{client:02}"), from: to - chrono::Duration::days(days - 1), to }
        })
        .collect()
}

struct Measured {
    latencies_ms: Vec<f64>,
    wall_secs: f64,
}

/// Sends `reqs` over `concurrency` connections; every response must be 200 with every section
/// from `source`.
async fn measure(api: &str, reqs: Vec<Request>, concurrency: usize, source: &'static str) -> Measured {
    let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build().expect("http client");
    let queue = Arc::new(std::sync::Mutex::new(reqs));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, queue, api) = (client.clone(), queue.clone(), api.to_owned());
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let Some(r) = queue.lock().expect("queue").pop() else { break };
                    let t = Instant::now();
                    let resp = client.get(r.url(&api)).bearer_auth(harness::ADMIN_TOKEN).send().await.expect("request");
                    let status = resp.status();
                    let body = resp.bytes().await.expect("body");
                    out.push(t.elapsed().as_secs_f64() * 1000.0);
                    assert_eq!(status, 200, "{}: {}", r.url(&api), String::from_utf8_lossy(&body));
                    let v: Value = serde_json::from_slice(&body).expect("json");
                    let sources = v["meta"]["data_sources"].as_object().expect("data_sources");
                    // link_clicks is read from the collector's click counts: never raw.
                    assert!(
                        sources.iter().filter(|(k, _)| *k != "link_clicks").all(|(_, s)| s == source),
                        "{}: expected every section {source}: {sources:?}",
                        r.url(&api)
                    );
                }
                out
            })
        })
        .collect();
    let mut latencies_ms = Vec::new();
    for w in workers {
        latencies_ms.extend(w.await.expect("worker"));
    }
    Measured { latencies_ms, wall_secs: started.elapsed().as_secs_f64() }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(name: &str, mut m: Measured) {
    m.latencies_ms.sort_by(f64::total_cmp);
    let l = &m.latencies_ms;
    println!(
        "{name:<44} {:>6} req  p50 {:>7.1} ms  p90 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  {:>6.0} req/s",
        l.len(),
        percentile(l, 0.50),
        percentile(l, 0.90),
        percentile(l, 0.99),
        l[l.len() - 1],
        l.len() as f64 / m.wall_secs
    );
}

/// Every scenario of one path: 7 and 30 days, all clients and the big client, each concurrency.
async fn scenarios(api: &str, path: &'static str, count: usize, concurrency: &[usize], data_days: i64) {
    for &c in concurrency {
        for days in [7, 30] {
            for big in [false, true] {
                let who = if big { "c00 (10 % of traffic)" } else { "100 clients" };
                // Warm-up (connections, ClickHouse caches) is not measured.
                measure(api, requests(20, days, data_days, big, 7), c, path).await;
                let seed = days as u64 * 31 + u64::from(big) + c as u64 * 1000;
                let m = measure(api, requests(count, days, data_days, big, seed), c, path).await;
                report(&format!("{path} {days:>2}d, {who}, {c} conn"), m);
            }
        }
    }
}

/// Overview bodies without `meta` (which differs by source and time).
async fn numbers(api: &str, reqs: &[Request]) -> Vec<Value> {
    let client = harness::http();
    let mut out = Vec::new();
    for r in reqs {
        let mut v: Value = client
            .get(r.url(api))
            .bearer_auth(harness::ADMIN_TOKEN)
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json");
        v.as_object_mut().expect("object").remove("meta");
        out.push(v);
    }
    out
}

fn main() {
    let data_days: i64 = env_or("BENCH_DAYS", 60);
    let per_day: usize = env_or("BENCH_FACTS_PER_DAY", 170_000);
    let count: usize = env_or("BENCH_REQUESTS", 1000);
    let concurrency: Vec<usize> = std::env::var("BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,4".into())
        .split(',')
        .map(|c| c.trim().parse().expect("BENCH_CONCURRENCY: comma-separated numbers"))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");

    let dir = harness::TestDir::new("bench-api");
    let ch = harness::ClickHouse::start(&dir);
    let d = harness::Deployment::new(&dir, &ch.url(), "127.0.0.1:9", 6, "");
    let (code, out) = d.run(&["migrate", "--skip-kafka"]);
    assert_eq!(code, 0, "migrate: {out}");

    // 1. Load.
    println!("== loading {data_days} days x {per_day} facts, 100 clients, into ClickHouse 18.16");
    let config = ClickHouseConfig { url: ch.url(), database: "eventflow".into(), ..ClickHouseConfig::default() };
    let store = Store::new(&config);
    let codec = FactCodec::new().expect("codec");
    let started = Instant::now();
    let mut feeder = Feeder::new();
    for day in 0..data_days {
        let spec = DaySpec {
            facts: per_day,
            sessions: per_day as u64 / 4,
            day_start_ms: START_MS + day * DAY_MS,
            big_client_percent: 10,
        };
        let msgs = generate_day(spec, &codec);
        rt.block_on(feeder.feed(&msgs, &store, 100_000));
    }
    let facts = ch.number("SELECT count() FROM eventflow.facts WHERE kind != 'checkpoint'");
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(facts, data_days as u64 * per_day as u64, "every generated fact is stored");
    println!(
        "loaded {facts} raw facts in {secs:.0}s ({:.0} facts/s); c00 has {} of them; {} daily_totals rows",
        facts as f64 / secs,
        ch.number("SELECT count() FROM eventflow.facts WHERE client_id = 'c00'"),
        ch.number("SELECT count() FROM eventflow.daily_totals")
    );
    // No OPTIMIZE: the tables are measured with the parts the load left, as in production.
    println!(
        "active parts: {}",
        ch.query(
            "SELECT arrayStringConcat(groupArray(concat(table, ' ', toString(n))), ', ') FROM (SELECT table, count() AS n \
             FROM system.parts WHERE database = 'eventflow' AND active GROUP BY table ORDER BY table)"
        )
        .expect("parts")
        .trim()
    );

    // 2. Aggregate path.
    let mut api = d.start("api");
    let base = d.api_url();
    println!("== overview latency (client-side, to the last byte), concurrent connections: {concurrency:?}");
    rt.block_on(scenarios(&base, "aggregated", count, &concurrency, data_days));
    let samples: Vec<Request> =
        requests(10, 30, data_days, false, 99).into_iter().chain(requests(5, 7, data_days, true, 98)).collect();
    let aggregated = rt.block_on(numbers(&base, &samples));

    // 3. Raw path: every client day waits for backfill.
    let first = DateTime::from_timestamp_millis(START_MS).expect("start").date_naive() - chrono::Duration::days(1);
    ch.query(&format!(
        "INSERT INTO eventflow.late_facts SELECT concat('c', substring(toString(100 + number % 100), 2)), \
         toDate('{first}') + intDiv(number, 100), 0, 18446744073709551000 FROM system.numbers LIMIT {n}",
        n = (data_days + 3) * 100
    ))
    .expect("late_facts markers");
    let raw = rt.block_on(numbers(&base, &samples));
    assert_eq!(aggregated, raw, "aggregate and raw paths disagree");
    println!("(the aggregate and raw paths returned identical numbers for {} sample overviews)", samples.len());
    // The raw path recounts facts (0.4-5 s a request here): fewer requests, one connection.
    rt.block_on(scenarios(&base, "raw", (count / 25).max(20), &[1], data_days));
    api.stop(Duration::from_secs(10));
}
