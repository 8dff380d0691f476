//! `eventflow dev`: collector, processor and API in one process. With no `kafka.brokers`
//! configured it runs on the embedded broker (librdkafka's in-process cluster); with
//! `EVENTFLOW__KAFKA__BROKERS` set it uses that broker (here tansu) and creates the topics itself.
//! Either way it applies the migrations to a fresh ClickHouse on start, and the overview shows the
//! numbers worked out by hand below, all from aggregates (also with a day that has nothing but a
//! duplicate).

use std::fs;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;

/// The config `Deployment` writes, without its `kafka.brokers` line: dev's embedded default.
fn without_brokers(d: &Deployment) {
    let text = fs::read_to_string(&d.config).expect("reading config");
    let kept: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with("brokers =")).collect();
    assert_eq!(kept.len() + 1, text.lines().count(), "exactly one brokers line removed");
    fs::write(&d.config, kept.join("\n")).expect("writing config");
}

async fn collect(d: &Deployment, batch: Value) -> u64 {
    let resp = http()
        .post(format!("{}/v1/collect", d.collector_url()))
        .header("content-type", "application/json")
        .body(batch.to_string())
        .send()
        .await
        .expect("POST /v1/collect");
    assert_eq!(resp.status().as_u16(), 202);
    let body: Value = resp.json().await.expect("collect response");
    assert_eq!(body["rejected"], json!([]), "{body}");
    body["accepted"].as_u64().expect("accepted count")
}

/// Sends the scenario, waits until it is processed, checks the overview and the metrics, and
/// stops the process with SIGTERM.
async fn scenario(d: &Deployment, mut dev: Proc) {
    let visit = |s: &str, page: &str, uid: &str| {
        let mut v = json!({"type": "visit", "client_id": "acme", "page": page, "session_id": s, "event_uid": uid});
        if page == "landing" {
            v["event_id"] = json!("summit");
        } else {
            v["webinar_id"] = json!("w1");
        }
        v
    };
    let entry = |s: &str, id: &str| json!({"type": "entry", "client_id": "acme", "entry_id": id, "webinar_id": "w1", "session_id": s});
    let ping = |s: &str| json!({"type": "ping", "client_id": "acme", "webinar_id": "w1", "session_id": s});

    // Five sessions land; s1's beacon arrives twice (same event_uid); s1 and s2 open the webinar
    // page and then register (linked); s6 registers with no visit (not linked); s1 and s2 watch live.
    let mut accepted = 0;
    accepted += collect(
        d,
        json!([
            visit("s1", "landing", "u1"),
            visit("s1", "landing", "u1"),
            visit("s2", "landing", "u2"),
            visit("s3", "landing", "u3"),
            visit("s4", "landing", "u4"),
            visit("s5", "landing", "u5"),
            visit("s1", "webinar", "u6"),
            visit("s2", "webinar", "u7"),
        ]),
    )
    .await;
    // Entries after their visits (a later request, so a later event time).
    tokio::time::sleep(Duration::from_millis(50)).await;
    accepted += collect(d, json!([entry("s1", "e1"), entry("s2", "e2"), entry("s6", "e3")])).await;
    accepted += collect(d, json!([ping("s1"), ping("s2")])).await;
    // e1 sent again a day later with yesterday's time: a duplicate alone on its day. The day has a
    // stored fact and so a daily_totals row of zeros; without it the reader would take the
    // aggregate for lost and serve every section raw.
    let yesterday = (chrono::Utc::now() - chrono::Duration::hours(25)).to_rfc3339();
    let mut again = entry("s1", "e1");
    again["ts"] = json!(yesterday);
    accepted += collect(d, json!([again])).await;
    assert_eq!(accepted, 14);
    wait_processed(d, accepted, Duration::from_secs(60)).await;

    let url = format!("{}/v1/clients/acme/statistics/overview", d.api_url());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let o = loop {
        let (status, o) = get_json(&url, Some(ACME_TOKEN)).await;
        let complete = o["totals"]["entries"] == json!(3) && o["live"].as_array().is_some_and(|l| !l.is_empty());
        if (status == 200 && complete) || std::time::Instant::now() > deadline {
            break o;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        o["totals"],
        json!({"visits": 7, "unique_sessions": 5, "entries": 3, "linked_entries": 2, "conversion_rate": 0.6}),
        "{o}"
    );
    assert_eq!(o["by_page"], json!({"landing": 5, "webinar": 2, "live": 0}), "{o}");
    assert_eq!(o["live"][0]["webinar_id"], "w1", "{o}");
    assert_eq!(o["live"][0]["peak_concurrent"], 2, "{o}");
    assert_eq!(o["live"][0]["viewer_minutes"], 2, "{o}");
    for (section, source) in o["meta"]["data_sources"].as_object().expect("data_sources") {
        assert_eq!(source, "aggregated", "{section}: {o}");
    }

    // One process, every service's metrics.
    let collector = get_text(&format!("{}/metrics", d.collector_url())).await;
    let visits_accepted =
        metric_value(&collector, "eventflow_collector_facts_total", &[("type", "visit"), ("outcome", "accepted")]);
    assert_eq!(visits_accepted, Some(8.0));
    let processor = get_text(&format!("{}/metrics", d.processor_url())).await;
    let dup =
        metric_value(&processor, "eventflow_processor_facts_total", &[("type", "visit"), ("outcome", "duplicate")]);
    assert_eq!(dup, Some(1.0));
    let dup =
        metric_value(&processor, "eventflow_processor_facts_total", &[("type", "entry"), ("outcome", "duplicate")]);
    assert_eq!(dup, Some(1.0));
    assert!(processor.contains("eventflow_processor_consumer_lag{"), "{processor}");

    // The stored facts agree with the aggregates.
    let today = chrono::Utc::now().with_timezone(&chrono_tz::Asia::Seoul).date_naive();
    let (from, to) = ((today - chrono::Duration::days(7)).to_string(), (today + chrono::Duration::days(1)).to_string());
    let (code, out) = d.run(&["reconcile", "--from", &from, "--to", &to, "--client", "acme"]);
    assert_eq!(code, 0, "{out}");

    let status = dev.stop(Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "dev did not stop cleanly on SIGTERM: {status:?}\n{}", dev.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_everything_on_the_embedded_broker() {
    let dir = TestDir::new("dev-embedded");
    let ch = ClickHouse::start(&dir);
    let d = Deployment::new(&dir, &ch.url(), "unused", 2, "");
    without_brokers(&d);
    // No `eventflow migrate`: dev applies the migrations itself.
    let dev = d.start("dev");
    assert!(dev.log_text().contains("embedded Kafka-protocol broker"), "{}", dev.log_text());
    scenario(&d, dev).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_uses_the_broker_named_by_the_environment() {
    let dir = TestDir::new("dev-tansu");
    let ch = ClickHouse::start(&dir);
    let broker = Tansu::start(&dir);
    let d = Deployment::new(&dir, &ch.url(), "unused", 2, "");
    without_brokers(&d);
    let dev = d.start_with("dev", &[("EVENTFLOW__KAFKA__BROKERS", broker.brokers())]);
    assert!(dev.log_text().contains("using the configured Kafka"), "{}", dev.log_text());
    scenario(&d, dev).await;
}
