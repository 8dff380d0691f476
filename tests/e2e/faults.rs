//! Fault tests: whatever happens to the processes, every acknowledged fact is stored exactly
//! once and every aggregate equals a recount of the raw facts.
//!
//! A steady stream of beacons runs while processors are killed (`kill -9`), instances join and
//! leave the consumer group, ClickHouse stops for a minute, the broker stops, or the collector is
//! killed with a full spool. Afterwards the test checks, against numbers the traffic generator
//! recorded itself: raw facts stored = facts acknowledged (no loss), physical rows = distinct
//! fact ids (no fact stored twice), overview totals = what was sent, and `eventflow reconcile`
//! finds no difference.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;

/// What the generator sent and got acknowledged.
#[derive(Debug, Default)]
pub struct Sent {
    pub accepted: AtomicU64,
    pub refused_requests: AtomicU64,
    pub visits: AtomicU64,
    pub entries: AtomicU64,
    pub pings: AtomicU64,
    /// Sessions with an acknowledged visit.
    pub sessions: Mutex<HashSet<String>>,
    /// Request latencies (ms) of acknowledged requests, with the time they were sent.
    pub latencies: Mutex<Vec<(Instant, f64)>>,
}

/// A steady stream of beacons for `client` until stopped.
pub struct Traffic {
    pub sent: Arc<Sent>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    /// About `per_second` facts per second in batches of 10: visits with unique `event_uid`s,
    /// a registration after every fifth visit, and pings.
    pub fn start(collector: String, client: &str, per_second: u64) -> Traffic {
        let sent = Arc::new(Sent::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, client) = (sent.clone(), stop.clone(), client.to_owned());
        let task = tokio::spawn(async move {
            let http = http();
            let mut n: u64 = 0;
            let pause = Duration::from_millis((10_000 / per_second.max(1)).max(1));
            while !st.load(Ordering::Acquire) {
                let mut batch = Vec::new();
                let mut kinds = Vec::new();
                for _ in 0..10 {
                    n += 1;
                    let session = format!("{client}-s{}", n % 97);
                    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                    let (fact, kind) = match n % 7 {
                        0 => (
                            json!({"type": "entry", "client_id": client, "entry_id": format!("{client}-e{n}"), "webinar_id": "w1", "session_id": session, "ts": now}),
                            "entry",
                        ),
                        1 | 2 => (
                            json!({"type": "ping", "client_id": client, "webinar_id": "w1", "session_id": session, "ts": now}),
                            "ping",
                        ),
                        _ => {
                            let page = ["landing", "webinar", "live"][(n % 3) as usize];
                            let source = ["news", "ads"][(n % 2) as usize];
                            (
                                json!({"type": "visit", "client_id": client, "page": page, "event_id": "ev", "webinar_id": "w1",
                                    "session_id": session, "event_uid": format!("{client}-u{n}"), "ts": now, "utm": {"source": source}}),
                                "visit",
                            )
                        }
                    };
                    batch.push(fact);
                    kinds.push((kind, session));
                }
                let started = Instant::now();
                let resp = http
                    .post(format!("{collector}/v1/collect"))
                    .header("content-type", "application/json")
                    .body(Value::Array(batch).to_string())
                    .timeout(Duration::from_secs(20))
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status().as_u16() == 202 => {
                        let ms = started.elapsed().as_secs_f64() * 1000.0;
                        let body: Value = r.json().await.unwrap_or_default();
                        assert_eq!(body["accepted"], 10, "{body}");
                        s.accepted.fetch_add(10, Ordering::Relaxed);
                        for (kind, session) in kinds {
                            match kind {
                                "visit" => {
                                    s.visits.fetch_add(1, Ordering::Relaxed);
                                    s.sessions.lock().unwrap().insert(session);
                                }
                                "entry" => {
                                    s.entries.fetch_add(1, Ordering::Relaxed);
                                }
                                _ => {
                                    s.pings.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        s.latencies.lock().unwrap().push((started, ms));
                    }
                    // Not acknowledged (collector down or 503): nothing was stored, nothing counts.
                    _ => {
                        s.refused_requests.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(pause).await;
            }
        });
        Traffic { sent, stop, task }
    }

    pub async fn stop(self) -> Arc<Sent> {
        self.stop.store(true, Ordering::Release);
        let _ = self.task.await;
        self.sent
    }
}

/// p50 and p99 (ms) of latencies sent within `[from, to)`.
pub fn percentiles(sent: &Sent, from: Instant, to: Instant) -> (f64, f64, usize) {
    let mut l: Vec<f64> =
        sent.latencies.lock().unwrap().iter().filter(|(t, _)| *t >= from && *t < to).map(|(_, ms)| *ms).collect();
    l.sort_by(|a, b| a.total_cmp(b));
    if l.is_empty() {
        return (0.0, 0.0, 0);
    }
    let at = |q: f64| l[((l.len() as f64 * q).ceil() as usize).clamp(1, l.len()) - 1];
    (at(0.5), at(0.99), l.len())
}

/// Waits until ClickHouse holds every acknowledged fact (logically), then checks exactly-once
/// storage, the overview totals and reconcile.
pub async fn verify(ch: &ClickHouse, d: &Deployment, client: &str, sent: &Sent) {
    let accepted = sent.accepted.load(Ordering::Relaxed);
    assert!(accepted > 0, "the traffic generator got nothing acknowledged");
    let q_client = format!("client_id = '{client}' AND kind != 'checkpoint'");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let stored = ch.number(&format!("SELECT count() FROM eventflow.facts FINAL WHERE {q_client}"));
        if stored >= accepted || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Give the last flush of aggregates time to land.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stored = ch.number(&format!("SELECT count() FROM eventflow.facts FINAL WHERE {q_client}"));
    let physical = ch.number(&format!("SELECT count() FROM eventflow.facts WHERE {q_client}"));
    let distinct = ch.number(&format!("SELECT uniqExact(fact_id) FROM eventflow.facts WHERE {q_client}"));
    eprintln!("facts acknowledged {accepted}, stored {stored}, physical rows {physical}, distinct ids {distinct}");
    assert_eq!(stored, accepted, "facts lost or invented: {} acknowledged, {} stored", accepted, stored);
    assert_eq!(physical, distinct, "a fact was stored twice ({physical} rows, {distinct} distinct facts)");

    // The overview equals what was sent.
    let today_and_yesterday = {
        let tz = if client == "globex" { chrono_tz::America::New_York } else { chrono_tz::Asia::Seoul };
        let today = chrono::Utc::now().with_timezone(&tz).date_naive();
        (today - chrono::Duration::days(1), today)
    };
    let (from, to) = today_and_yesterday;
    let url = format!("{}/v1/clients/{client}/statistics/overview?from={from}&to={to}", d.api_url());
    let (status, o) = get_json(&url, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{o}");
    assert_eq!(o["totals"]["visits"].as_u64(), Some(sent.visits.load(Ordering::Relaxed)), "{o}");
    assert_eq!(o["totals"]["entries"].as_u64(), Some(sent.entries.load(Ordering::Relaxed)), "{o}");
    assert_eq!(o["totals"]["unique_sessions"].as_u64(), Some(sent.sessions.lock().unwrap().len() as u64), "{o}");
    for section in ["totals", "by_page", "by_day", "campaigns", "live", "quality"] {
        assert_eq!(o["meta"]["data_sources"][section], "aggregated", "{section}: {o}");
    }
    let (code, out) = d.run(&["reconcile", "--from", &from.to_string(), "--to", &to.to_string(), "--client", client]);
    assert_eq!(code, 0, "reconcile found differences:\n{out}");
}

fn setup(name: &str, partitions: u32, extra: &str) -> (TestDir, ClickHouse, Tansu, Deployment) {
    let dir = TestDir::new(name);
    let ch = ClickHouse::start(&dir);
    let broker = Tansu::start(&dir);
    let d = Deployment::new(&dir, &ch.url(), &broker.brokers(), partitions, extra);
    d.migrate();
    (dir, ch, broker, d)
}

/// Processor `kill -9` at ten random moments of a steady stream, restarted each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_killed_ten_times_loses_and_doubles_nothing() {
    let (_dir, ch, _broker, d) = setup("kill9-processor", 3, "");
    let _collector = d.start("collector");
    let _api = d.start("api");
    let mut processor = d.start("processor");
    let traffic = Traffic::start(d.collector_url(), "acme", 300);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..10 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Somewhere between 0.3 and 2.3 s into the round: mid-batch, mid-flush or mid-rebuild.
        tokio::time::sleep(Duration::from_millis(300 + rng % 2000)).await;
        processor.kill9();
        eprintln!("round {round}: processor killed");
        processor = d.start("processor");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = traffic.stop().await;
    verify(&ch, &d, "acme", &sent).await;
    drop(processor);
}

/// Two processor instances in one consumer group; instances leave, join and crash mid-stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalances_between_two_processors_lose_and_double_nothing() {
    let (dir, ch, _broker, d) = setup("rebalance", 4, "");
    let _collector = d.start("collector");
    let _api = d.start("api");
    let second = |port: u16| vec![("EVENTFLOW__PROCESSOR__LISTEN", format!("127.0.0.1:{port}"))];
    let port_b = free_port();
    let mut a = d.start("processor");
    let mut b = d.start_with("processor", &second(port_b));
    let traffic = Traffic::start(d.collector_url(), "acme", 300);
    let assigned = |port: u16| async move {
        let page = get_text(&format!("http://127.0.0.1:{port}/metrics")).await;
        metric_sum(&page, "eventflow_processor_assigned_partitions")
    };
    // Both instances own partitions.
    eventually(Duration::from_secs(60), "partitions split between two instances", || async {
        assigned(d.processor_port).await >= 1.0 && assigned(port_b).await >= 1.0
    })
    .await;
    for round in 0..3 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        a.stop(Duration::from_secs(30)); // leaves the group: b takes everything
        eventually(Duration::from_secs(60), "b owns every partition", || async { assigned(port_b).await >= 4.0 }).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        a = d.start("processor"); // joins: partitions move back
        eventually(Duration::from_secs(60), "a owns partitions again", || async {
            assigned(d.processor_port).await >= 1.0
        })
        .await;
        eprintln!("round {round}: rebalanced twice");
    }
    // A crash instead of a clean leave, then a replacement instance.
    b.kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    b = d.start_with("processor", &second(port_b));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = traffic.stop().await;
    verify(&ch, &d, "acme", &sent).await;
    drop((a, b, dir));
}

/// ClickHouse stops for a minute in the middle of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_down_for_a_minute_loses_and_doubles_nothing() {
    let (_dir, mut ch, _broker, d) = setup("clickhouse-outage", 3, "");
    let _collector = d.start("collector");
    let _api = d.start("api");
    let _processor = d.start("processor");
    let traffic = Traffic::start(d.collector_url(), "acme", 300);
    tokio::time::sleep(Duration::from_secs(3)).await;
    ch.stop();
    eprintln!("clickhouse stopped");
    tokio::time::sleep(Duration::from_secs(60)).await;
    let page = get_text(&format!("{}/metrics", d.processor_url())).await;
    assert!(
        metric_sum(&page, "eventflow_clickhouse_insert_errors_total") > 0.0,
        "the outage shows in the insert error metric"
    );
    ch.restart();
    eprintln!("clickhouse back");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sent = traffic.stop().await;
    verify(&ch, &d, "acme", &sent).await;
}

/// The broker stops during a steady stream: the collector keeps acknowledging from its spool,
/// then delivers everything exactly once when the broker returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_keeps_every_acknowledged_fact() {
    let (_dir, ch, mut broker, d) = setup("broker-outage", 3, "");
    let _collector = d.start("collector");
    let _api = d.start("api");
    let _processor = d.start("processor");
    let traffic = Traffic::start(d.collector_url(), "acme", 300);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = Instant::now();
    broker.stop();
    let outage_start = Instant::now();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let spooled =
        metric_sum(&get_text(&format!("{}/metrics", d.collector_url())).await, "eventflow_collector_spool_facts");
    assert!(spooled > 0.0, "facts wait in the spool while the broker is down");
    let outage_end = Instant::now();
    broker.restart();
    eprintln!("broker back after {:?} ({} facts were spooled)", outage_end - outage_start, spooled);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sent = traffic.stop().await;
    let (p50, p99, n) = percentiles(&sent, outage_start, outage_end);
    let (bp50, bp99, bn) = percentiles(&sent, before - Duration::from_secs(3), outage_start);
    eprintln!("collector latency: before the outage p50 {bp50:.1} ms p99 {bp99:.1} ms ({bn} requests); during p50 {p50:.1} ms p99 {p99:.1} ms ({n} requests)");
    assert!(n > 0, "requests were acknowledged during the outage");
    assert_eq!(sent.refused_requests.load(Ordering::Relaxed), 0, "no request was refused during the outage");
    verify(&ch, &d, "acme", &sent).await;
    eventually(Duration::from_secs(60), "spool drained", || async {
        metric_sum(&get_text(&format!("{}/metrics", d.collector_url())).await, "eventflow_collector_spool_facts") == 0.0
    })
    .await;
}

/// The collector is killed with facts in its spool (broker down); after a restart of both,
/// every acknowledged fact arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_killed_with_a_full_spool_loses_nothing() {
    let (_dir, ch, mut broker, d) = setup("kill9-collector", 3, "");
    let mut collector = d.start("collector");
    let _api = d.start("api");
    let _processor = d.start("processor");
    let traffic = Traffic::start(d.collector_url(), "acme", 300);
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.stop();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let spooled =
        metric_sum(&get_text(&format!("{}/metrics", d.collector_url())).await, "eventflow_collector_spool_facts");
    assert!(spooled > 0.0);
    collector.kill9();
    // Requests during the collector's absence are not acknowledged and do not count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restart();
    collector = d.start("collector");
    eprintln!("collector restarted with {spooled} facts in its spool");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sent = traffic.stop().await;
    verify(&ch, &d, "acme", &sent).await;
    let page = get_text(&format!("{}/metrics", d.processor_url())).await;
    let redeliveries: f64 = page
        .lines()
        .filter(|l| l.starts_with("eventflow_processor_facts_total{") && l.contains("outcome=\"redelivery\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    eprintln!("redeliveries dropped by the processor: {redeliveries}");
    drop(collector);
}
