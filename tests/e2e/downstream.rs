//! Hostile input downstream of the collector (issue 11), on the real binaries:
//!
//! - poisoned Kafka messages (not Avro, unknown writer schema) go to the `dead_letters` table and
//!   the partition keeps moving;
//! - a record the broker rejects for good is quarantined from the collector's spool, the rest
//!   keeps flowing;
//! - the API's `/metrics` lists no tenant without the admin (or metrics) token; weak tokens, in
//!   any form, stop the binary naming the key; CORS answers configured origins only;
//! - the processor logs no librdkafka statistics and its failure logs are rate-limited;
//! - per-client series and continuous-reconcile jobs are capped.
//!
//! Every test asserts numbers worked out here from what it sent.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};

use eventflow_core::avro::FactCodec;
use eventflow_core::fact::{Fact, FactHeader, PageKind, SessionOrigin, Utm, Visit};

use crate::harness::*;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A landing-page visit of `client` in `session`, received now.
fn visit(spool_id: u64, seq: u64, client: &str, session: &str) -> Fact {
    let now = now_ms();
    Fact::Visit(Visit {
        header: FactHeader {
            spool_id,
            spool_seq: seq,
            client_id: client.into(),
            received_at_ms: now,
            event_time_ms: now,
            client_ts: None,
            clock_skew: false,
        },
        session_id: session.into(),
        session_origin: SessionOrigin::Body,
        page: PageKind::Landing,
        event_id: Some("ev".into()),
        webinar_id: None,
        event_uid: None,
        path: None,
        cid: None,
        cid_resolved: false,
        utm: Utm::default(),
        utm_inherited: false,
        referrer: None,
    })
}

fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.timeout.ms", "30000")
        .create()
        .expect("test producer")
}

/// Produces `payload` to `topic` partition `partition`; returns its offset.
async fn produce(p: &FutureProducer, topic: &str, partition: i32, key: &str, payload: &[u8]) -> i64 {
    let record = FutureRecord::to(topic).partition(partition).key(key).payload(payload);
    p.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("produce").offset
}

/// Inserts `line` right after the `[section]` header of the deployment's configuration.
fn patch_config(d: &Deployment, section: &str, line: &str) {
    let text = std::fs::read_to_string(&d.config).expect("config");
    let header = format!("[{section}]\n");
    assert!(text.contains(&header), "no [{section}] in the test configuration");
    std::fs::write(&d.config, text.replacen(&header, &format!("{header}{line}\n"), 1)).expect("config");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Poisoned messages

/// A message that is not Avro and one with an unknown writer schema, produced straight to
/// partition 0 of the visits topic, are written to `dead_letters` (topic, partition, offset,
/// reason, payload) and counted; a valid visit produced after them is counted, so the partition
/// moved on; a restart neither re-reads nor rewrites the dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_messages_become_dead_letters_and_the_partition_keeps_moving() {
    let dir = TestDir::new("dead-letters");
    let ch = ClickHouse::start(&dir);
    let broker = Tansu::start(&dir);
    let d = Deployment::new(&dir, &ch.url(), &broker.brokers(), 2, "");
    d.migrate();

    let kafka = producer(&broker.brokers());
    let topic = "eventflow.visits";
    let garbage = b"GET / HTTP/1.1 not a fact".to_vec();
    // Avro single-object marker, a fingerprint no collector ever wrote, then junk.
    let mut unknown = vec![0xc3, 0x01];
    unknown.extend_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
    unknown.extend_from_slice(b"\x02\x04junk");
    let codec = FactCodec::new().expect("codec");
    let valid = codec.encode(&visit(0xfeed, 1, "acme", "s-after-poison")).expect("encode");
    assert_eq!(produce(&kafka, topic, 0, "acme/x", &garbage).await, 0);
    assert_eq!(produce(&kafka, topic, 0, "acme/y", &unknown).await, 1);
    assert_eq!(produce(&kafka, topic, 0, "acme/s-after-poison", &valid).await, 2);

    let mut processor = d.start("processor");
    let metrics = format!("{}/metrics", d.processor_url());
    let counted = |page: &str| {
        metric_value(page, "eventflow_processor_facts_total", &[("type", "visit"), ("outcome", "counted")])
    };
    // Before issue 11 the unknown schema paused the partition for good: the visit after it was
    // never counted.
    eventually(Duration::from_secs(60), "the visit after the poisoned messages is counted", || {
        let url = metrics.clone();
        async move { counted(&get_text(&url).await) == Some(1.0) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let rows = ch.json_rows(
        "SELECT topic, kafka_partition, kafka_offset, reason, payload_bytes, payload FROM eventflow.dead_letters FINAL \
         ORDER BY kafka_offset",
    );
    let got: Vec<(String, String, String, String, String, String)> = rows
        .iter()
        .map(|r| {
            (
                col(r, "topic"),
                col(r, "kafka_partition"),
                col(r, "kafka_offset"),
                col(r, "reason"),
                col(r, "payload_bytes"),
                col(r, "payload"),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (topic.into(), "0".into(), "0".into(), "corrupt".into(), "25".into(), hex(&garbage)),
            (topic.into(), "0".into(), "1".into(), "unknown_schema".into(), "16".into(), hex(&unknown)),
        ]
    );
    let page = get_text(&metrics).await;
    assert_eq!(metric_value(&page, "eventflow_processor_dead_letters_total", &[("reason", "corrupt")]), Some(1.0));
    assert_eq!(
        metric_value(&page, "eventflow_processor_dead_letters_total", &[("reason", "unknown_schema")]),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&page, "eventflow_processor_consumer_lag", &[("topic", topic), ("partition", "0")]),
        Some(0.0)
    );
    // The visit is stored at offset 2, once.
    assert_eq!(ch.number("SELECT count() FROM eventflow.facts WHERE kind = 'visit' AND kafka_offset = 2"), 1);

    // A crash and a restart: the checkpoint is past the dead letters, nothing is read or
    // written again.
    processor.kill9();
    let _processor = d.start("processor");
    eventually(Duration::from_secs(60), "the restarted processor owns the partitions", || {
        let url = metrics.clone();
        async move { metric_sum(&get_text(&url).await, "eventflow_processor_assigned_partitions") >= 2.0 }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ch.number("SELECT count() FROM eventflow.dead_letters"), 2, "dead letters written once");
    let page = get_text(&metrics).await;
    assert_eq!(metric_sum(&page, "eventflow_processor_dead_letters_total"), 0.0, "nothing re-read after the restart");
}

// ---------------------------------------------------------------------------------------------
// A record the broker rejects for good

/// The broker validates the pings topic against a JSON schema, so every ping record (Avro) is
/// rejected for good (`INVALID_RECORD`). The collector acknowledged them from its spool: the
/// drainer must move them aside (quarantine, with what it takes to inspect and replay them),
/// count them, drain the spool and keep delivering visits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_rejects_for_good_is_quarantined_and_the_rest_flows() {
    let dir = TestDir::new("quarantine");
    // tansu resolves the registry relative to its working directory (`<dir>/tansu`).
    let schemas = dir.join("tansu").join("schemas");
    std::fs::create_dir_all(&schemas).unwrap();
    std::fs::write(
        schemas.join("eventflow.pings.json"),
        json!({"type": "object", "properties": {"value": {"type": "object"}}}).to_string(),
    )
    .unwrap();
    let ch = ClickHouse::start(&dir);
    let mut broker = Tansu::start_with(&dir, &["--schema-registry", "file://./schemas"]);
    let d = Deployment::new(&dir, &ch.url(), &broker.brokers(), 2, "");
    d.migrate();
    let _collector = d.start("collector");
    let _processor = d.start("processor");

    let post = |facts: Value| {
        let url = format!("{}/v1/collect", d.collector_url());
        async move {
            let resp = http()
                .post(url)
                .header("content-type", "application/json")
                .body(facts.to_string())
                .send()
                .await
                .expect("POST /v1/collect");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let v =
        |s: &str| json!({"type": "visit", "client_id": "acme", "page": "landing", "event_id": "ev", "session_id": s});
    let p = |s: &str| json!({"type": "ping", "client_id": "acme", "webinar_id": "w1", "session_id": s});
    let (status, body) = post(json!([v("s1"), p("s1"), v("s2"), p("s2"), v("s3"), p("s3"), v("s4")])).await;
    assert_eq!((status, &body["accepted"]), (202, &json!(7)), "{body}");

    let collector_metrics = format!("{}/metrics", d.collector_url());
    let processor_metrics = format!("{}/metrics", d.processor_url());
    let visits_counted = |page: &str| {
        metric_value(page, "eventflow_processor_facts_total", &[("type", "visit"), ("outcome", "counted")])
            .unwrap_or(0.0)
    };
    eventually(Duration::from_secs(90), "3 pings quarantined, spool drained, 4 visits counted", || {
        let (c, pr) = (collector_metrics.clone(), processor_metrics.clone());
        async move {
            let cm = get_text(&c).await;
            let pm = get_text(&pr).await;
            metric_sum(&cm, "eventflow_collector_quarantined_facts_total") == 3.0
                && metric_sum(&cm, "eventflow_collector_spool_facts") == 0.0
                && visits_counted(&pm) == 4.0
        }
    })
    .await;
    // Visits sent afterwards keep flowing.
    let (status, _) = post(json!([v("s5"), v("s6")])).await;
    assert_eq!(status, 202);
    eventually(Duration::from_secs(60), "later visits counted", || {
        let pr = processor_metrics.clone();
        async move { visits_counted(&get_text(&pr).await) == 6.0 }
    })
    .await;

    let cm = get_text(&collector_metrics).await;
    assert_eq!(
        metric_value(&cm, "eventflow_collector_quarantined_facts_total", &[("reason", "invalid_record")]),
        Some(3.0),
        "{cm}"
    );
    assert_eq!(metric_value(&cm, "eventflow_collector_quarantine_facts", &[]), Some(3.0));
    assert_eq!(metric_sum(&cm, "eventflow_collector_spool_facts"), 0.0);

    // One file per quarantined record, with the record and what the broker said.
    let qdir = dir.join("spool").join("quarantine");
    let mut files: Vec<_> = std::fs::read_dir(&qdir)
        .unwrap_or_else(|e| panic!("{}: {e}", qdir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    let codec = FactCodec::new().unwrap();
    let mut sessions = Vec::new();
    for f in &files {
        let q: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        assert_eq!((q["topic"].as_str(), q["kind"].as_str()), (Some("eventflow.pings"), Some("ping")), "{q}");
        assert_eq!(q["reason"], "invalid_record", "{q}");
        let raw: Vec<u8> = (0..q["value_hex"].as_str().unwrap().len() / 2)
            .map(|i| u8::from_str_radix(&q["value_hex"].as_str().unwrap()[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let fact = codec.decode(eventflow_core::FactKind::Ping, &raw).expect("the quarantined value decodes");
        assert_eq!(q["key"].as_str(), Some(format!("acme/{}", fact.session_id()).as_str()));
        sessions.push(fact.session_id().to_owned());
    }
    sessions.sort();
    assert_eq!(sessions, ["s1", "s2", "s3"]);
    // Counted when applied; stored by the next flush.
    eventually(Duration::from_secs(30), "6 visits stored", || async {
        ch.number("SELECT count() FROM eventflow.facts WHERE kind = 'visit'") == 6
    })
    .await;
    assert_eq!(ch.number("SELECT count() FROM eventflow.facts WHERE kind = 'ping'"), 0);

    // The cause is fixed (the broker accepts pings again): the quarantined facts are replayed
    // and counted once, however often the replay runs.
    std::fs::remove_file(schemas.join("eventflow.pings.json")).unwrap();
    broker.restart();
    let (code, out) = d.run(&["quarantine", "replay", qdir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("3 replayed, 0 failed"), "{out}");
    let pings_counted = |page: &str| {
        metric_value(page, "eventflow_processor_facts_total", &[("type", "ping"), ("outcome", "counted")])
            .unwrap_or(0.0)
    };
    eventually(Duration::from_secs(60), "the replayed pings are counted", || {
        let pr = processor_metrics.clone();
        async move { pings_counted(&get_text(&pr).await) == 3.0 }
    })
    .await;
    let replayed: Vec<_> = std::fs::read_dir(&qdir).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).collect();
    assert_eq!(replayed.iter().filter(|p| p.extension().is_some_and(|x| x == "replayed")).count(), 3);
    let (code, out) = d.run(&["quarantine", "replay", replayed[0].to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pm = get_text(&processor_metrics).await;
    assert_eq!(pings_counted(&pm), 3.0, "a second replay is a redelivery");
    assert_eq!(
        metric_value(&pm, "eventflow_processor_facts_total", &[("type", "ping"), ("outcome", "redelivery")]),
        Some(1.0)
    );
    eventually(Duration::from_secs(30), "3 pings stored", || async {
        ch.number("SELECT count() FROM eventflow.facts FINAL WHERE kind = 'ping'") == 3
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Tenancy and secrets

/// Series of a metrics page that carry a `client` label.
fn client_series(page: &str) -> Vec<String> {
    page.lines().filter(|l| !l.starts_with('#') && l.contains("client=\"")).map(str::to_owned).collect()
}

async fn get_metrics(url: &str, token: Option<&str>) -> (u16, String) {
    let mut req = http().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("GET /metrics");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// Without a token the API's `/metrics` names no client; with the admin token (or the
/// scrape-only metrics token) it has every series; a client's token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_metrics_list_tenants_only_with_the_admin_token() {
    let dir = TestDir::new("api-metrics-auth");
    let ch = ClickHouse::start(&dir);
    let d = Deployment::new(&dir, &ch.url(), "127.0.0.1:9", 2, "");
    d.migrate_clickhouse_only();
    const METRICS_TOKEN: &str = "scrape-Rk4vT9wqZ2mX7cLp3HsN8bYe";
    patch_config(&d, "api", &format!("metrics_token = \"{METRICS_TOKEN}\""));
    let _api = d.start("api");
    let url = format!("{}/metrics", d.api_url());
    // The quality gauges have a series for each configured client once refreshed (1 s).
    eventually(Duration::from_secs(30), "quality gauges refreshed", || {
        let u = url.clone();
        async move { client_series(&get_metrics(&u, Some(ADMIN_TOKEN)).await.1).len() == 4 }
    })
    .await;

    let (status, anonymous) = get_metrics(&url, None).await;
    assert_eq!(status, 200);
    assert!(anonymous.contains("eventflow_api_request_duration_seconds"), "{anonymous}");
    assert_eq!(client_series(&anonymous), Vec::<String>::new(), "no tenant without a token");

    let (status, admin) = get_metrics(&url, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
    let mut series: Vec<String> =
        client_series(&admin).iter().map(|l| l.rsplit_once(' ').unwrap().0.to_owned()).collect();
    series.sort();
    assert_eq!(
        series,
        [
            "eventflow_session_link_rate{client=\"acme\"}",
            "eventflow_session_link_rate{client=\"globex\"}",
            "eventflow_utm_missing_ratio{client=\"acme\"}",
            "eventflow_utm_missing_ratio{client=\"globex\"}",
        ]
    );
    let (status, scrape) = get_metrics(&url, Some(METRICS_TOKEN)).await;
    assert_eq!((status, client_series(&scrape).len()), (200, 4));
    assert_eq!(get_metrics(&url, Some(ACME_TOKEN)).await.0, 403, "a client token reads no other tenant");
    assert_eq!(get_metrics(&url, Some("not-a-token-of-this-deployment-0")).await.0, 401);
}

/// Exit status and output of `eventflow <service>` with this configuration, if it exits within
/// `timeout` (`None`: it kept running, i.e. it accepted the configuration).
fn run_until_exit(d: &Deployment, service: &str, timeout: Duration) -> Option<(i32, String)> {
    let log = d.dir.join(format!("{service}-refused-{}.log", free_port()));
    let out = std::fs::File::create(&log).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_eventflow"))
        .arg("--config")
        .arg(&d.config)
        .arg(service)
        .current_dir(&d.dir)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("eventflow");
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some((status.code().unwrap_or(-1), std::fs::read_to_string(&log).unwrap_or_default()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Every token form meets one strength rule, checked when the configuration is loaded: a weak
/// plain token, the `sha256:` form of a well-known placeholder (`test`), and a long but
/// repetitive token each stop the binary with an error naming the key. A presented token that
/// fails the rule never authenticates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weak_tokens_stop_the_binary_naming_the_key() {
    let dir = TestDir::new("weak-tokens");
    let ch = ClickHouse::start(&dir);
    let d = Deployment::new(&dir, &ch.url(), "127.0.0.1:9", 2, "");
    d.migrate_clickhouse_only();
    let original = std::fs::read_to_string(&d.config).unwrap();
    // sha256("test"): the token the shipped manifests used to carry.
    let test_hash = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let cases: [(&str, &str, &str, &str); 4] = [
        ("api", "admin_token", "admin_token = \"aaaaaaaaaaaaaaaaaaaaaaaa\"", "api.admin_token"),
        ("api", "admin_token", "admin_token = \"change-me-change-me\"", "api.admin_token"),
        ("clients.acme", "token", &format!("token = \"{test_hash}\""), "clients.acme.token"),
        ("clients.globex", "token", "token = \"globex\"", "clients.globex.token"),
    ];
    for (section, key, line, named) in cases {
        std::fs::write(&d.config, &original).unwrap();
        // Replace the key inside its section.
        let text = std::fs::read_to_string(&d.config).unwrap();
        let start = text.find(&format!("[{section}]\n")).unwrap();
        let at = start + text[start..].find(&format!("{key} = ")).unwrap();
        let end = at + text[at..].find('\n').unwrap();
        std::fs::write(&d.config, format!("{}{line}{}", &text[..at], &text[end..])).unwrap();
        let outcome = run_until_exit(&d, "api", Duration::from_secs(20));
        let Some((code, out)) = outcome else {
            panic!("the API started with {line} in [{section}]");
        };
        assert_eq!(code, 2, "{line}: {out}");
        assert!(out.contains(named), "{line}: the error must name {named}: {out}");
    }

    // The strong tokens of the test configuration start; `Bearer test` is refused even though
    // nobody could configure its hash any more.
    std::fs::write(&d.config, &original).unwrap();
    let _api = d.start("api");
    let overview = format!("{}/v1/clients/acme/statistics/overview", d.api_url());
    assert_eq!(get_json(&overview, Some("test")).await.0, 401);
    assert_eq!(get_json(&overview, Some(ACME_TOKEN)).await.0, 200);
    // `eventflow hash-token` refuses a weak token and generates a strong one.
    let (code, out) = d.run(&["hash-token", "test"]);
    assert_eq!(code, 2, "{out}");
    let (code, out) = d.run(&["hash-token"]);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    let (token, hash) = (lines[0].trim(), lines[1].trim());
    assert!(token.len() >= 32 && hash.starts_with("sha256:") && hash.len() == 7 + 64, "{out}");
    let (code, again) = d.run(&["hash-token", token]);
    assert_eq!((code, again.trim()), (0, hash));
}

async fn preflight(url: &str, origin: &str) -> (u16, BTreeMap<String, String>) {
    let resp = http()
        .request(reqwest::Method::OPTIONS, url)
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .expect("OPTIONS");
    let headers = resp
        .headers()
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("access-control-") || k.as_str() == "vary")
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    (resp.status().as_u16(), headers)
}

/// CORS on the API: a configured origin gets its preflight answered (never with credentials);
/// an unconfigured origin and `Origin: null` get no `Access-Control-Allow-Origin` at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_cors_answers_only_configured_origins() {
    let dir = TestDir::new("api-cors");
    let ch = ClickHouse::start(&dir);
    let d = Deployment::new(&dir, &ch.url(), "127.0.0.1:9", 2, "");
    d.migrate_clickhouse_only();
    patch_config(&d, "api", "allowed_origins = [\"https://dash.example.com\"]");
    let _api = d.start("api");
    let url = format!("{}/v1/clients/acme/statistics/overview", d.api_url());

    let (status, h) = preflight(&url, "https://dash.example.com").await;
    assert_eq!(status, 200, "{h:?}");
    assert_eq!(h.get("access-control-allow-origin").map(String::as_str), Some("https://dash.example.com"));
    assert!(h.get("access-control-allow-headers").is_some_and(|v| v.to_ascii_lowercase().contains("authorization")));
    assert_eq!(h.get("access-control-allow-credentials"), None, "bearer tokens need no credentials mode");
    for origin in ["https://evil.example", "null", "https://dash.example.com.evil.example"] {
        let (_, h) = preflight(&url, origin).await;
        assert_eq!(h.get("access-control-allow-origin"), None, "{origin}: {h:?}");
        assert_eq!(h.get("access-control-allow-credentials"), None, "{origin}: {h:?}");
    }
    // The actual request from the configured origin carries the header; from another it does not.
    for (origin, want) in [("https://dash.example.com", Some("https://dash.example.com")), ("null", None)] {
        let resp = http().get(&url).header("origin", origin).bearer_auth(ACME_TOKEN).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let acao = resp.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(acao.as_deref(), want, "{origin}");
    }

    // `null` or `*` cannot be configured.
    for bad in ["\"null\"", "\"*\"", "\"https://dash.example.com/path\""] {
        let text = std::fs::read_to_string(&d.config).unwrap();
        let patched =
            text.replace("allowed_origins = [\"https://dash.example.com\"]", &format!("allowed_origins = [{bad}]"));
        let copy = Deployment { config: d.dir.join("bad-origins.toml"), ..d.clone() };
        std::fs::write(&copy.config, patched).unwrap();
        let outcome = run_until_exit(&copy, "api", Duration::from_secs(20));
        let (code, out) = outcome.unwrap_or_else(|| panic!("the API started with allowed_origins = [{bad}]"));
        assert!(code != 0 && out.contains("api.allowed_origins"), "{bad}: {out}");
    }
}

// ---------------------------------------------------------------------------------------------
// Quiet logs

/// Log lines of a JSON log file from byte `from` on: (lines, warn-or-error lines, bytes).
fn log_lines(path: &Path, from: usize) -> (Vec<String>, usize, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tail = text.get(from..).unwrap_or_default();
    let lines: Vec<String> = tail.lines().map(str::to_owned).collect();
    let loud = lines.iter().filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\"")).count();
    (lines, loud, tail.len())
}

/// An idle processor writes no librdkafka statistics to its log (they are gauges now); during a
/// 20 s broker outage its failure logs stay within the per-reason budget and the rest is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_logs_stay_quiet_and_kafka_statistics_become_metrics() {
    let dir = TestDir::new("quiet-logs");
    let ch = ClickHouse::start(&dir);
    let mut broker = Tansu::start(&dir);
    let d = Deployment::new(&dir, &ch.url(), &broker.brokers(), 2, "");
    d.migrate();
    let processor = d.start("processor");
    let metrics = format!("{}/metrics", d.processor_url());
    eventually(Duration::from_secs(60), "partitions assigned", || {
        let u = metrics.clone();
        async move { metric_sum(&get_text(&u).await, "eventflow_processor_assigned_partitions") >= 2.0 }
    })
    .await;
    let start = std::fs::metadata(&processor.log).map(|m| m.len() as usize).unwrap_or(0);
    // Statistics are emitted every 5 s: 12 s are at least two intervals.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (lines, _, bytes) = log_lines(&processor.log, start);
    let stats: Vec<&String> = lines.iter().filter(|l| l.contains("stats") || l.contains("Statistics")).collect();
    assert!(stats.is_empty(), "{} statistics lines ({bytes} bytes) in 12 s idle:\n{}", stats.len(), lines.join("\n"));
    assert!(bytes < 2_000, "an idle processor wrote {bytes} bytes of log in 12 s:\n{}", lines.join("\n"));
    eprintln!("measured: an idle processor wrote {bytes} bytes of log in 12 s ({} lines)", lines.len());
    let page = get_text(&metrics).await;
    assert!(metric_value(&page, "eventflow_processor_kafka_brokers_up", &[]).unwrap_or(0.0) >= 1.0, "{page}");
    assert!(page.contains("eventflow_processor_kafka_broker_rtt_seconds{"), "{page}");
    assert!(metric_value(&page, "eventflow_processor_kafka_fetch_queue_messages", &[]).is_some(), "{page}");

    // A broker outage: librdkafka reports a failure on every reconnect attempt.
    let before = std::fs::metadata(&processor.log).map(|m| m.len() as usize).unwrap_or(0);
    broker.stop();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let (lines, loud, _) = log_lines(&processor.log, before);
    let page = get_text(&metrics).await;
    let suppressed = metric_sum(&page, "eventflow_processor_log_lines_suppressed_total");
    eprintln!("measured: a 20 s broker outage wrote {loud} warn/error lines, {suppressed} left out and counted");
    assert!(loud <= 20, "{loud} warn/error lines in a 20 s outage:\n{}", lines.join("\n"));
    assert!(suppressed > 0.0, "the lines not written are counted: {page}");
    assert!(lines.iter().all(|l| l.len() < 2_000), "a log line over 2000 bytes:\n{}", lines.join("\n"));
    assert!(metric_value(&page, "eventflow_processor_kafka_brokers_up", &[]).is_some());
    drop(processor);
}

// ---------------------------------------------------------------------------------------------
// Bounded cardinality

/// Ten unconfigured clients with 1..=10 visits and acme with 2: with
/// `processor.metrics_max_clients = 3`, `eventflow_visits_today` has acme and globex
/// (configured, always), c10 (most visits) and `_other` (the 9 others: 1 + ... + 9 = 45
/// visits), and counts 9 folded clients; with `processor.reconcile_max_clients = 3` each pass
/// checks 3 clients and defers 9, and the passes take turns until every client was checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_series_and_reconcile_jobs_are_capped() {
    let dir = TestDir::new("cardinality");
    let ch = ClickHouse::start(&dir);
    let broker = Tansu::start(&dir);
    let d = Deployment::new(&dir, &ch.url(), &broker.brokers(), 1, "");
    d.migrate();
    let kafka = producer(&broker.brokers());
    let codec = FactCodec::new().unwrap();
    let mut seq = 0;
    let mut send = Vec::new();
    for i in 1..=10u64 {
        for _ in 0..i {
            seq += 1;
            send.push(visit(0xcafe, seq, &format!("c{i:02}"), &format!("s{seq}")));
        }
    }
    for _ in 0..2 {
        seq += 1;
        send.push(visit(0xcafe, seq, "acme", &format!("s{seq}")));
    }
    for fact in &send {
        produce(&kafka, "eventflow.visits", 0, &fact.partition_key(), &codec.encode(fact).unwrap()).await;
    }
    let env = [
        ("EVENTFLOW__PROCESSOR__METRICS_MAX_CLIENTS", "3".to_owned()),
        ("EVENTFLOW__PROCESSOR__RECONCILE_MAX_CLIENTS", "3".to_owned()),
        ("EVENTFLOW__PROCESSOR__RECONCILE_INTERVAL", "1s".to_owned()),
    ];
    let _processor = d.start_with("processor", &env);
    let metrics = format!("{}/metrics", d.processor_url());
    let today = |page: &str| -> BTreeMap<String, f64> {
        page.lines()
            .filter(|l| l.starts_with("eventflow_visits_today{"))
            .map(|l| {
                let client = l.split('"').nth(1).unwrap().to_owned();
                (client, l.rsplit(' ').next().unwrap().parse().unwrap())
            })
            .collect()
    };
    let want: BTreeMap<String, f64> =
        [("_other", 45.0), ("acme", 2.0), ("c10", 10.0), ("globex", 0.0)].map(|(c, v)| (c.to_owned(), v)).into();
    let mut page = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        page = get_text(&metrics).await;
        if today(&page) == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(today(&page), want, "{page}");
    assert_eq!(metric_value(&page, "eventflow_visits_today_clients_folded", &[]), Some(9.0));

    // Reconcile: 12 clients (acme, globex, c01..c10), 3 per pass, 9 deferred; every client is
    // checked within a few passes (they take turns).
    eventually(Duration::from_secs(90), "every client reconciled once", || async {
        ch.number("SELECT uniqExact(client_id) FROM eventflow.reconcile_findings") == 12
    })
    .await;
    let page = get_text(&metrics).await;
    assert_eq!(metric_value(&page, "eventflow_reconcile_clients_deferred", &[]), Some(9.0), "{page}");
    let mut mismatch_clients: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("eventflow_reconcile_mismatch{"))
        .filter_map(|l| l.split("client=\"").nth(1)?.split('"').next())
        .collect();
    mismatch_clients.sort_unstable();
    mismatch_clients.dedup();
    assert_eq!(mismatch_clients, ["acme", "globex"], "clean unconfigured clients need no series");
}
