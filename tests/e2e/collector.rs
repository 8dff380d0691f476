//! The collector's answers to bad input, over HTTP against the real binary: a clear 4xx and a
//! counted reason for every malformed input, good facts of the same batch kept and stored
//! verbatim, one structured log line per failure and none per success, rate limits.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;

async fn post_raw(url: &str, content_type: &str, body: Vec<u8>) -> (u16, Value, reqwest::header::HeaderMap) {
    let resp = http()
        .post(format!("{url}/v1/collect"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("POST");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, resp.json().await.unwrap_or(Value::Null), headers)
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let (s, v, _) = post_raw(url, "application/json", body.to_string().into_bytes()).await;
    (s, v)
}

fn visit(extra: Value) -> Value {
    let mut v =
        json!({"type": "visit", "client_id": "acme", "page": "landing", "event_id": "summit", "session_id": "s1"});
    v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    v
}

fn reasons(body: &Value) -> Vec<(u64, String, Option<String>)> {
    body["rejected"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["index"].as_u64().unwrap(),
                        r["reason"].as_str().unwrap().to_owned(),
                        r["field"].as_str().map(str::to_owned),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_counted_reasons() {
    let dir = TestDir::new("collector-input");
    let ch = ClickHouse::start(&dir);
    let broker = Tansu::start(&dir);
    let d = Deployment::new(&dir, &ch.url(), &broker.brokers(), 3, "[tenancy]\nallow_unknown_clients = false\n");
    d.migrate();
    let collector = d.start("collector");
    let _processor = d.start("processor");
    let c = d.collector_url();

    // Request-level errors: status and error code.
    let big = format!("[{}]", vec![visit(json!({"path": "x".repeat(1000)})).to_string(); 70].join(","));
    let too_many = Value::Array(vec![visit(json!({})); 101]).to_string();
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("invalid JSON", "application/json", b"{\"type\": \"visit\",".to_vec(), 400, "malformed_json"),
        (
            "invalid UTF-8",
            "text/plain",
            b"{\"type\": \"visit\", \"client_id\": \"\xff\xfe\"}".to_vec(),
            400,
            "invalid_utf8",
        ),
        ("not an object", "application/json", b"42".to_vec(), 400, "not_object_or_array"),
        ("empty batch", "application/json", b"[]".to_vec(), 400, "empty_batch"),
        ("over 64 KiB", "application/json", big.into_bytes(), 413, "body_too_large"),
        ("101 facts", "application/json", too_many.into_bytes(), 413, "too_many_facts"),
        ("XML", "application/xml", b"<visit/>".to_vec(), 415, "unsupported_media_type"),
    ];
    for (name, ct, body, status, code) in cases {
        let (s, v, _) = post_raw(&c, ct, body).await;
        assert_eq!((s, v["error"].as_str()), (status, Some(code)), "{name}: {v}");
        assert!(v["detail"].is_string(), "{name}: {v}");
    }

    // Fact-level errors next to good facts: the good ones are kept.
    let ten_kb = "u".repeat(10 * 1024);
    let nasty = "Robert'); DROP TABLE facts; -- <script>alert(\"x\")</script> \\ % _ \u{1F600}";
    let batch = json!([
        visit(json!({"event_uid": "good-1"})),
        {"type": "visit", "client_id": 7, "page": "landing", "event_id": "e"},
        {"type": "teleport", "client_id": "acme"},
        visit(json!({"page": 5})),
        visit(json!({"utm": "newsletter"})),
        visit(json!({"path": "/event/a\u{0001}b"})),
        visit(json!({"utm": {"source": ten_kb}})),
        visit(json!({"client_id": "nobody"})),
        visit(json!({"event_uid": "ts-1970", "ts": "1970-01-01T00:00:00Z"})),
        visit(json!({"event_uid": "ts-2100", "ts": "2100-01-01T00:00:00Z"})),
        visit(json!({"event_uid": "nasty", "session_id": "s-nasty", "path": nasty, "referrer": nasty,
            "utm": {"source": nasty, "medium": nasty, "campaign": nasty, "term": nasty, "content": nasty}, "cid": nasty})),
        {"type": "ping", "client_id": "acme", "webinar_id": "w1"},
    ]);
    let (s, v) = post(&c, batch).await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["accepted"], 4, "{v}");
    assert_eq!(
        reasons(&v),
        vec![
            (1, "invalid_client_id".into(), None),
            (2, "unknown_type".into(), None),
            (3, "invalid_page".into(), None),
            (4, "invalid_field".into(), Some("utm".into())),
            (5, "invalid_field".into(), Some("path".into())),
            (6, "invalid_field".into(), Some("utm.source".into())),
            (7, "unknown_client".into(), None),
            (11, "missing_session_id".into(), None),
        ]
    );

    // A browser without a cookie sends a visit and a registration together: one session.
    let (s, v) = post(
        &c,
        json!([
            {"type": "entry", "client_id": "acme", "entry_id": "e-batch", "event_id": "summit"},
            {"type": "visit", "client_id": "acme", "page": "landing", "event_id": "summit", "event_uid": "batch-visit"},
        ]),
    )
    .await;
    assert_eq!((s, v["accepted"].as_u64()), (202, Some(2)), "{v}");

    // Everything accepted is stored verbatim; bad clocks fall back to receive time.
    eventually(Duration::from_secs(60), "accepted facts stored", || async {
        ch.number("SELECT count() FROM eventflow.facts FINAL WHERE client_id = 'acme' AND kind != 'checkpoint'") == 6
    })
    .await;
    let row = ch
        .query("SELECT path, referrer, utm_source, utm_medium, utm_campaign, utm_term, utm_content, cid, cid_resolved FROM eventflow.facts FINAL WHERE event_uid = 'nasty' FORMAT JSONEachRow")
        .unwrap();
    let row: Value = serde_json::from_str(row.trim()).unwrap();
    for field in ["path", "referrer", "utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content", "cid"] {
        assert_eq!(row[field].as_str(), Some(nasty), "{field} stored verbatim");
    }
    assert_eq!(row["cid_resolved"].as_u64(), Some(0));
    let skew = ch
        .query("SELECT event_uid, clock_skew, abs(event_time_ms - received_at_ms) < 1000 FROM eventflow.facts FINAL WHERE event_uid LIKE 'ts-%' ORDER BY event_uid FORMAT TSV")
        .unwrap();
    assert_eq!(skew.trim(), "ts-1970\t1\t1\nts-2100\t1\t1");
    let sessions = ch.query("SELECT uniqExact(session_id), min(session_origin) FROM eventflow.facts FINAL WHERE event_uid = 'batch-visit' OR entry_id = 'e-batch' FORMAT TSV").unwrap();
    assert_eq!(sessions.trim(), "1\tcreated");

    // Counted reasons, and one structured log line per failure, none per success.
    let m = get_text(&format!("{c}/metrics")).await;
    for (reason, n) in
        [("invalid_field", 3.0), ("unknown_client", 1.0), ("invalid_page", 1.0), ("missing_session_id", 1.0)]
    {
        let got: f64 = m
            .lines()
            .filter(|l| {
                l.starts_with("eventflow_collector_rejections_total{") && l.contains(&format!("reason=\"{reason}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(got, n, "rejections with reason {reason}");
    }
    let log = collector.log_text();
    let lines: Vec<Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let fails = |event: &str| lines.iter().filter(|l| l["event"] == event).count();
    // 7 request-level errors + 7 rejected visits (the bad client id and unknown type count as visits).
    assert_eq!(fails("VisitTrackFail"), 7 + 7, "{log}");
    assert_eq!(fails("PingTrackFail"), 1);
    assert_eq!(fails("EntryTrackFail"), 0);
    let field = lines
        .iter()
        .find(|l| l["event"] == "VisitTrackFail" && l["reason"] == "invalid_field" && l["field"] == "utm.source")
        .expect("field named");
    assert_eq!(field["client_id"], "acme");
    let per_success = lines.iter().filter(|l| l["level"] == "INFO" && l.to_string().contains("good-1")).count();
    assert_eq!(per_success, 0, "successes are not logged per fact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429() {
    let dir = TestDir::new("collector-ratelimit");
    let ch = ClickHouse::start(&dir);
    let broker = Tansu::start(&dir);
    let d = Deployment::new(&dir, &ch.url(), &broker.brokers(), 3, "");
    d.migrate();
    let port = free_port();
    let _collector = d.start_with(
        "collector",
        &[
            ("EVENTFLOW__COLLECTOR__LISTEN", format!("127.0.0.1:{port}")),
            ("EVENTFLOW__COLLECTOR__RATE_LIMIT_PER_IP__PER_SECOND", "1".into()),
            ("EVENTFLOW__COLLECTOR__RATE_LIMIT_PER_IP__BURST", "3".into()),
            ("EVENTFLOW__COLLECTOR__RATE_LIMIT_PER_CLIENT__PER_SECOND", "1".into()),
            ("EVENTFLOW__COLLECTOR__RATE_LIMIT_PER_CLIENT__BURST", "2".into()),
        ],
    );
    let c = format!("http://127.0.0.1:{port}");
    // Per client: a burst of 2 facts, then the rest of the batch is rate limited (counted).
    let (s, v) = post(&c, json!([visit(json!({})), visit(json!({})), visit(json!({})), visit(json!({}))])).await;
    assert_eq!((s, v["accepted"].as_u64()), (202, Some(2)), "{v}");
    assert_eq!(reasons(&v).iter().filter(|r| r.1 == "rate_limited").count(), 2);
    // Only rate-limited facts in a request: 429.
    let (s, v, h) = post_raw(&c, "application/json", visit(json!({})).to_string().into_bytes()).await;
    assert_eq!((s, v["accepted"].as_u64()), (429, Some(0)), "{v}");
    assert_eq!(h.get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    // Per IP: a burst of 3 requests, refilled at 1 per second; the burst is spent, so one of
    // the next two requests (sent back to back) is refused before its body is read.
    let mut refused = None;
    for _ in 0..2 {
        let (s, v, h) = post_raw(&c, "application/json", b"{}".to_vec()).await;
        if s == 429 {
            refused = Some((v, h));
            break;
        }
    }
    let (v, h) = refused.expect("a request over the per-IP limit gets 429");
    assert_eq!(v["error"].as_str(), Some("rate_limited"), "{v}");
    assert!(h.contains_key("retry-after"));
}

// -------------------------------------------------------------------------------------------
// Campaign links and attribution (tests share these helpers)

/// `Set-Cookie` values of a response by cookie name (value only, attributes dropped).
fn set_cookies(h: &reqwest::header::HeaderMap) -> std::collections::BTreeMap<String, String> {
    h.get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let (name, rest) = v.split_once('=')?;
            Some((name.to_owned(), rest.split(';').next().unwrap_or("").to_owned()))
        })
        .collect()
}

/// `POST /v1/collect` with a `Cookie` header (a browser's cookies, set by hand).
async fn post_with_cookie(url: &str, body: Value, cookie: Option<&str>) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = http().post(format!("{url}/v1/collect")).header("content-type", "text/plain").body(body.to_string());
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let resp = req.send().await.expect("POST");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, resp.json().await.unwrap_or(Value::Null), headers)
}

/// `GET /r/{cid}`: (status, Location, Set-Cookie values).
pub(crate) async fn click(
    url: &str,
    cid: &str,
    cookie: Option<&str>,
) -> (u16, String, std::collections::BTreeMap<String, String>) {
    let mut req = http().get(format!("{url}/r/{cid}"));
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let resp = req.send().await.expect("GET /r/{cid}");
    let location = resp.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    (resp.status().as_u16(), location, set_cookies(resp.headers()))
}

/// Loads campaign links with the real `eventflow links import` (CSV rows without the header).
pub(crate) fn import_links(d: &Deployment, dir: &TestDir, file: &str, rows: &str) {
    let csv = dir.join(file);
    std::fs::write(
        &csv,
        format!("cid,client_id,destination,utm_source,utm_medium,utm_campaign,utm_term,utm_content\n{rows}"),
    )
    .unwrap();
    let (code, out) = d.run(&["links", "import", csv.to_str().unwrap()]);
    assert_eq!(code, 0, "links import: {out}");
}

/// A cid nobody imported.
pub(crate) fn random_cid(tag: &str) -> String {
    format!("{tag}-{:016x}", rand::random::<u64>())
}

/// `eventflow_collector_link_lookups_total{outcome}` of a metrics page.
fn lookups(page: &str, outcome: &str) -> f64 {
    metric_value(page, "eventflow_collector_link_lookups_total", &[("outcome", outcome)]).unwrap_or(0.0)
}

/// Lookups that reached ClickHouse.
fn queries(page: &str) -> f64 {
    ["found", "not_found", "error"].iter().map(|o| lookups(page, o)).sum()
}

/// SELECT queries ClickHouse has run since it started (its own `SelectQuery` profile event;
/// the reading query counts itself).
fn clickhouse_selects(ch: &ClickHouse) -> u64 {
    ch.number("SELECT sum(value) FROM system.events WHERE event = 'SelectQuery'")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn campaign_links_resolve_as_soon_as_imported() {
    let dir = TestDir::new("collector-links");
    let ch = ClickHouse::start(&dir);
    let broker = Tansu::start(&dir);
    let d = Deployment::new(&dir, &ch.url(), &broker.brokers(), 3, "");
    d.migrate();
    // A link imported before the collector starts is in its first cache refresh. The cache is
    // not refreshed again during the test (1 h), so every later link can only be found by
    // reading through to ClickHouse.
    import_links(&d, &dir, "old.csv", "old,acme,https://site.test/event/old,,,,,\n");
    let _collector = d.start_with(
        "collector",
        &[
            ("EVENTFLOW__COLLECTOR__LINKS_REFRESH", "1h".into()),
            // Generous for a loaded test machine: a lookup that times out would count as an
            // error, not as the found / not-found this test expects.
            ("EVENTFLOW__COLLECTOR__LINKS_LOOKUP_TIMEOUT", "10s".into()),
            ("EVENTFLOW__COLLECTOR__LINKS_LOOKUP_RATE__PER_SECOND", "5".into()),
            ("EVENTFLOW__COLLECTOR__LINKS_LOOKUP_RATE__BURST", "10".into()),
        ],
    );
    let c = d.collector_url();
    let metrics_url = format!("{c}/metrics");
    eventually(Duration::from_secs(20), "the collector knows link old", || async {
        click(&c, "old", None).await.0 == 302
    })
    .await;
    let base = get_text(&metrics_url).await;

    // Imported now, clicked right after the command returned.
    import_links(
        &d,
        &dir,
        "new.csv",
        "spring,acme,https://site.test/event/summit?lang=ko,newsletter,email,spring-sale,,\n\
         fall,globex,https://globex.test/e,,,,,\n",
    );
    let (status, location, cookies) = click(&c, "spring", None).await;
    assert_eq!(status, 302, "a just-imported link redirects");
    assert_eq!(
        location,
        "https://site.test/event/summit?lang=ko&cid=spring&utm_source=newsletter&utm_medium=email&utm_campaign=spring-sale"
    );
    assert!(cookies.contains_key("ef_utm"), "{cookies:?}");
    let m = get_text(&metrics_url).await;
    let found = lookups(&base, "found");
    assert_eq!((lookups(&m, "found") - found, queries(&m) - queries(&base)), (1.0, 1.0), "one read-through found it");
    // Now it is cached: no second lookup.
    assert_eq!(click(&c, "spring", None).await.0, 302);
    assert_eq!(queries(&get_text(&metrics_url).await) - queries(&base), 1.0);

    // The same unknown cid, again and again: one ClickHouse query, then the negative cache.
    let selects_before = clickhouse_selects(&ch);
    let unknown = random_cid("nope");
    for _ in 0..30 {
        assert_eq!(click(&c, &unknown, None).await.0, 404);
    }
    let m = get_text(&metrics_url).await;
    let not_found = lookups(&base, "not_found");
    assert_eq!((lookups(&m, "not_found") - not_found, lookups(&m, "negative")), (1.0, 29.0));
    // The same unknown cid from 50 requests at once: still one query.
    let unknown2 = random_cid("burst");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (c, cid) = (c.clone(), unknown2.clone());
            tokio::spawn(async move { click(&c, &cid, None).await.0 })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 404);
    }
    let m = get_text(&metrics_url).await;
    assert_eq!(lookups(&m, "not_found") - not_found, 2.0, "concurrent misses of one cid share one query");
    assert_eq!(lookups(&m, "shared") + lookups(&m, "negative"), 29.0 + 49.0);
    // ClickHouse saw exactly those two lookups (plus the two reads of its counter).
    assert_eq!(clickhouse_selects(&ch) - selects_before, 2 + 1, "ClickHouse queries for 80 unknown-link clicks");

    // 100 different random cids at once (hostile traffic): the lookups are bounded by the rate
    // (burst 10, 5 per second) and the concurrency (4); the rest are answered without a query.
    let before = get_text(&metrics_url).await;
    let selects_before = clickhouse_selects(&ch);
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { click(&c, &random_cid("hostile"), None).await.0 })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap()).or_insert(0u32) += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = get_text(&metrics_url).await;
    let ran = queries(&after) - queries(&before);
    let delta = |outcome: &str| lookups(&after, outcome) - lookups(&before, outcome);
    let status_count = |code: u16| f64::from(statuses.get(&code).copied().unwrap_or(0));
    eprintln!("100 random cids in {elapsed:.2} s: statuses {statuses:?}, {ran} lookups, {} limited", delta("limited"));
    assert!(ran >= 1.0 && ran <= 10.0 + 5.0 * elapsed.ceil(), "{ran} lookups in {elapsed:.2} s");
    assert_eq!(ran + delta("limited"), 100.0, "every miss either queried or was limited");
    assert_eq!(status_count(404), delta("not_found"), "{statuses:?}");
    assert_eq!(status_count(503), delta("limited") + delta("error"), "{statuses:?}");
    assert_eq!(clickhouse_selects(&ch) - selects_before, ran as u64 + 1, "ClickHouse queries for 100 random cids");

    // POST /v1/collect resolves a just-imported cid too (the fact is stored with cid_resolved).
    let _processor = d.start("processor");
    tokio::time::sleep(Duration::from_millis(1200)).await; // the lookup budget refills
    import_links(&d, &dir, "summer.csv", "summer,acme,https://site.test/event/summer,ads,cpc,summer,,\n");
    let batch = json!([
        visit(json!({"session_id": "s-links", "event_uid": "v-summer", "cid": "summer"})),
        visit(json!({"session_id": "s-links", "event_uid": "v-fall", "cid": "fall"})),
        visit(json!({"session_id": "s-links", "event_uid": "v-random", "cid": random_cid("nope")})),
    ]);
    let (s, v) = post(&c, batch).await;
    assert_eq!((s, v["accepted"].as_u64()), (202, Some(3)), "{v}");
    eventually(Duration::from_secs(60), "the three visits stored", || async {
        ch.number("SELECT count() FROM eventflow.facts FINAL WHERE session_id = 's-links'") == 3
    })
    .await;
    let rows = ch.json_rows(
        "SELECT event_uid, cid_resolved FROM eventflow.facts FINAL WHERE session_id = 's-links' ORDER BY event_uid",
    );
    let got: Vec<(String, String)> = rows.iter().map(|r| (col(r, "event_uid"), col(r, "cid_resolved"))).collect();
    let want = |u: &str, r: &str| (u.to_owned(), r.to_owned());
    // fall is a link of globex, not acme; the random cid is nobody's.
    assert_eq!(got, vec![want("v-fall", "0"), want("v-random", "0"), want("v-summer", "1")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn facts_naming_their_session_get_cookie_attribution() {
    let dir = TestDir::new("collector-body-utm");
    let ch = ClickHouse::start(&dir);
    let broker = Tansu::start(&dir);
    let d = Deployment::new(&dir, &ch.url(), &broker.brokers(), 3, "");
    d.migrate();
    import_links(&d, &dir, "links.csv", "spring,acme,https://site.test/event/summit,newsletter,email,spring-sale,,\n");
    let _collector = d.start("collector");
    let _processor = d.start("processor");
    let c = d.collector_url();
    eventually(Duration::from_secs(20), "the collector knows link spring", || async {
        click(&c, "spring", None).await.0 == 302
    })
    .await;

    // First touch: a browser arrives from an ad (no cookie yet): the collector sets ef_utm.
    let (s, v, h) = post_with_cookie(
        &c,
        json!({"type": "visit", "client_id": "acme", "page": "landing", "event_id": "summit", "event_uid": "v-ad",
               "utm": {"source": "google", "medium": "cpc", "campaign": "brand"}}),
        None,
    )
    .await;
    assert_eq!((s, v["accepted"].as_u64()), (202, Some(1)), "{v}");
    let utm1 = set_cookies(&h).get("ef_utm").cloned().expect("ef_utm after a touch");
    // Last touch: the same browser clicks the newsletter's tracked link.
    let (status, _, cookies) = click(&c, "spring", Some(&format!("ef_utm={utm1}"))).await;
    assert_eq!(status, 302);
    let utm2 = cookies.get("ef_utm").cloned().expect("ef_utm after the click");
    // The page then sends facts that name their session in the body (the tracker's
    // eventflow.entry({session_id}) path, or a page whose ef_sid expired).
    let cookie = format!("ef_utm={utm2}");
    let (s, v, _) = post_with_cookie(
        &c,
        json!({"type": "entry", "client_id": "acme", "entry_id": "e-body", "event_id": "summit",
               "session_id": "page-session-1"}),
        Some(&cookie),
    )
    .await;
    assert_eq!((s, v["accepted"].as_u64()), (202, Some(1)), "{v}");
    let (s, v, _) =
        post_with_cookie(&c, visit(json!({"session_id": "page-session-1", "event_uid": "v-body"})), Some(&cookie))
            .await;
    assert_eq!((s, v["accepted"].as_u64()), (202, Some(1)), "{v}");

    // A server-side batch (no cookies) for two sessions: facts that name their session are
    // attributed by their own fields only, as if each had come alone.
    let (s, v, _) = post_with_cookie(
        &c,
        json!([
            visit(json!({"session_id": "srv-a", "event_uid": "v-srv-a", "utm": {"source": "ads"}})),
            {"type": "entry", "client_id": "acme", "entry_id": "e-srv-b", "event_id": "summit", "session_id": "srv-b"},
            {"type": "entry", "client_id": "acme", "entry_id": "e-srv-a", "event_id": "summit", "session_id": "srv-a"},
        ]),
        None,
    )
    .await;
    assert_eq!((s, v["accepted"].as_u64()), (202, Some(3)), "{v}");

    eventually(Duration::from_secs(60), "six facts stored", || async {
        ch.number("SELECT count() FROM eventflow.facts FINAL WHERE client_id = 'acme' AND kind != 'checkpoint'") == 6
    })
    .await;
    let rows = ch.json_rows(
        "SELECT if(kind = 'entry', entry_id, event_uid) AS id, session_origin, cid, cid_resolved, utm_source, \
         utm_medium, utm_campaign, utm_inherited, first_utm_source, first_utm_medium, first_utm_campaign, \
         first_touch_ms, event_time_ms \
         FROM eventflow.facts FINAL WHERE client_id = 'acme' AND kind != 'checkpoint' ORDER BY id",
    );
    let by_id = |id: &str| rows.iter().find(|r| col(r, "id") == id).unwrap_or_else(|| panic!("{id} in {rows:?}"));
    let ad = by_id("v-ad");
    let entry = by_id("e-body");
    // Last touch (the click) with the link's cid and UTM, inherited from ef_utm.
    let last = |r: &Value| {
        (col(r, "cid"), col(r, "cid_resolved"), col(r, "utm_source"), col(r, "utm_medium"), col(r, "utm_campaign"))
    };
    let spring = ("spring".to_owned(), "1".to_owned(), "newsletter".into(), "email".into(), "spring-sale".into());
    assert_eq!(last(entry), spring, "the entry's last touch: {entry}");
    assert_eq!((col(entry, "session_origin"), col(entry, "utm_inherited")), ("body".into(), "1".into()));
    assert_eq!(last(by_id("v-body")), spring, "a visit naming its session inherits the last touch too");
    // First touch (the ad), with its time.
    assert_eq!(
        (col(entry, "first_utm_source"), col(entry, "first_utm_medium"), col(entry, "first_utm_campaign")),
        ("google".into(), "cpc".into(), "brand".into()),
        "the entry's first touch: {entry}"
    );
    let first_touch: i64 = col(entry, "first_touch_ms").parse().unwrap();
    let ad_time: i64 = col(ad, "event_time_ms").parse().unwrap();
    assert!((first_touch - ad_time).abs() < 5_000, "first touch at {first_touch}, the ad visit at {ad_time}");
    // The server batch: no cookie, so a fact without UTM has no attribution, in either session.
    let none = (String::new(), String::new(), "0".to_owned());
    for id in ["e-srv-b", "e-srv-a"] {
        let e = by_id(id);
        assert_eq!((col(e, "utm_source"), col(e, "first_utm_source"), col(e, "utm_inherited")), none, "{e}");
    }
    assert_eq!(col(by_id("v-srv-a"), "utm_source"), "ads");
}
