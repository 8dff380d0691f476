//! The reader API against its OpenAPI document, on a running deployment.
//!
//! Every route is called (successes and every documented error), every JSON body is validated
//! against the schema `openapi.json` gives for that path, method, status and content type, and
//! every documented path, method and status must have been exercised: the document cannot drift
//! from the implementation in either direction. The validator below implements exactly the
//! subset of OpenAPI 3.0 schema keywords the document uses and rejects any other keyword, so a
//! constraint added to the document is either checked here or fails the test.
//!
//! The pipeline helpers (`start_pipeline`, `send_known_facts`) are shared with `dashboard.rs`.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Duration as Span, TimeZone, Timelike, Utc};
use serde_json::{json, Value};

use crate::harness::*;

// ---------------------------------------------------------------------------------------------
// A running pipeline with a known set of facts

/// Collector, processor and API on real ClickHouse 18.16 and tansu. Fields drop in order: the
/// services stop before the data directory is removed.
#[allow(dead_code)] // the service handles are held only to be killed on drop
pub struct Pipeline {
    pub api: Proc,
    pub processor: Proc,
    pub collector: Proc,
    pub broker: Tansu,
    /// `None` once killed with [`Pipeline::kill_clickhouse`].
    ch: Option<ClickHouse>,
    pub d: Deployment,
    pub dir: TestDir,
}

/// Starts the whole pipeline like `pipeline.rs` does (`extra` is appended to the configuration).
pub async fn start_pipeline(name: &str, extra: &str) -> Pipeline {
    let dir = TestDir::new(name);
    let ch = ClickHouse::start(&dir);
    let broker = Tansu::start(&dir);
    let d = Deployment::new(&dir, &ch.url(), &broker.brokers(), 3, extra);
    d.migrate();
    let collector = d.start("collector");
    let processor = d.start("processor");
    let api = d.start("api");
    Pipeline { api, processor, collector, broker, ch: Some(ch), d, dir }
}

impl Pipeline {
    pub fn ch(&self) -> &ClickHouse {
        self.ch.as_ref().expect("ClickHouse was killed")
    }

    /// SIGKILL (a graceful stop of 18.16 takes about 20 s).
    pub fn kill_clickhouse(&mut self) {
        self.ch = None;
    }
}

/// What `send_known_facts` sent, with the numbers worked out by hand.
#[derive(Debug, Clone)]
pub struct Known {
    /// acme's client day (Asia/Seoul) of every fact.
    pub day: String,
    /// The 7 days of the default range, oldest first (Asia/Seoul), and the 30 of `range=30d`.
    pub days7: Vec<String>,
    pub days30: Vec<String>,
    /// The five minutes with live viewers of webinar w1, as the API renders them.
    pub live_minutes: Vec<String>,
    pub live_concurrent: Vec<u64>,
    pub facts_accepted: u64,
}

const SEOUL: chrono_tz::Tz = chrono_tz::Asia::Seoul;

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn seoul_day(t: DateTime<Utc>) -> chrono::NaiveDate {
    t.with_timezone(&SEOUL).date_naive()
}

/// Sends acme's facts, all with an explicit `ts` about two hours ago and within one Seoul day,
/// and waits until they are processed.
///
/// By hand (webinar w1, event "summit"):
/// - visits: s1 landing (newsletter/email/fall; its beacon retried with the same event_uid,
///   counted once), s1 webinar, s2 landing (ads/cpc/spring), s2 live, s3 webinar, s6 landing
///   = 6 visits: landing 3, webinar 2, live 1; sessions s1 s2 s3 s6 = 4;
/// - entries: e1 (s1, after its visits: linked), e2 (s2, after its visits: linked), e3 (s4, never
///   visited: not linked) = 3 entries, 2 linked; conversion 3/4 = 0.75, link rate 2/3;
/// - UTM source missing on s1 webinar, s2 live, s3 webinar, s6 landing = 4 of 6; no cid resolves;
/// - campaigns: (unresolved, unknown×3) visits 4 entries 3 (entries carry no UTM), ads/cpc/spring
///   visits 1, newsletter/email/fall visits 1;
/// - pings of w1 in minutes m0..m4: s2 in all five (twice in m2), s3 in m1..m3, s5 in m2
///   = concurrent 1, 2, 3, 2, 1; peak 3 at m2; 9 viewer-minutes.
pub async fn send_known_facts(p: &Pipeline) -> Known {
    let now = Utc::now();
    // A UTC minute boundary about two hours ago, moved back until the facts (20 minutes) stay
    // within one Seoul day.
    let mut t0 = now - Span::hours(2);
    t0 = t0 - Span::seconds(i64::from(t0.second())) - Span::nanoseconds(i64::from(t0.nanosecond()));
    while seoul_day(t0) != seoul_day(t0 + Span::minutes(20)) {
        t0 -= Span::minutes(30);
    }
    let at = |s: i64| rfc3339(t0 + Span::seconds(s));
    let visit = |session: &str, page: &str, uid: &str, s: i64, utm: Option<(&str, &str, &str)>| {
        let mut v = json!({"type": "visit", "client_id": "acme", "page": page, "session_id": session,
                           "event_uid": uid, "ts": at(s)});
        if page == "landing" {
            v["event_id"] = json!("summit");
        } else {
            v["webinar_id"] = json!("w1");
        }
        if let Some((source, medium, campaign)) = utm {
            v["utm"] = json!({"source": source, "medium": medium, "campaign": campaign});
        }
        v
    };
    let entry = |session: &str, id: &str, s: i64| {
        json!({"type": "entry", "client_id": "acme", "entry_id": id, "webinar_id": "w1",
               "session_id": session, "ts": at(s)})
    };
    let ping = |session: &str, minute: i64, sec: i64| {
        json!({"type": "ping", "client_id": "acme", "webinar_id": "w1", "session_id": session,
               "ts": at(600 + minute * 60 + sec)})
    };
    let news = Some(("newsletter", "email", "fall"));
    let ads = Some(("ads", "cpc", "spring"));
    let mut facts = vec![
        visit("s1", "landing", "u1", 0, news),
        visit("s1", "landing", "u1", 10, news),
        visit("s1", "webinar", "u2", 60, None),
        entry("s1", "e1", 120),
        visit("s2", "landing", "u3", 180, ads),
        visit("s3", "webinar", "u5", 200, None),
        visit("s6", "landing", "u6", 220, None),
        visit("s2", "live", "u4", 240, None),
        entry("s4", "e3", 260),
        entry("s2", "e2", 300),
    ];
    for m in 0..5 {
        facts.push(ping("s2", m, 5));
    }
    facts.push(ping("s2", 2, 35));
    for m in 1..4 {
        facts.push(ping("s3", m, 20));
    }
    facts.push(ping("s5", 2, 30));
    let n = facts.len() as u64;
    assert_eq!(n, 20);

    let resp = http()
        .post(format!("{}/v1/collect", p.d.collector_url()))
        .header("content-type", "application/json")
        .body(Value::Array(facts).to_string())
        .send()
        .await
        .expect("POST /v1/collect");
    assert_eq!(resp.status().as_u16(), 202);
    let body: Value = resp.json().await.expect("collect body");
    assert_eq!(body["accepted"], json!(n), "{body}");
    wait_processed(&p.d, n, Duration::from_secs(90)).await;

    let today = seoul_day(now);
    let days = |count: i64| -> Vec<String> {
        (0..count).rev().map(|k| (today - Span::days(k)).format("%Y-%m-%d").to_string()).collect()
    };
    let live_minutes = (0..5)
        .map(|m| {
            SEOUL
                .from_utc_datetime(&(t0 + Span::seconds(600 + m * 60)).naive_utc())
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
        })
        .collect();
    Known {
        day: seoul_day(t0).format("%Y-%m-%d").to_string(),
        days7: days(7),
        days30: days(30),
        live_minutes,
        live_concurrent: vec![1, 2, 3, 2, 1],
        facts_accepted: n,
    }
}

// ---------------------------------------------------------------------------------------------
// A small validator for the OpenAPI 3.0 schema subset used by openapi.json

const KEYWORDS: [&str; 12] = [
    "$ref",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "nullable",
    "format",
    "minimum",
    "maximum",
    "description",
];

fn resolve<'a>(doc: &'a Value, reference: &str) -> &'a Value {
    let pointer = reference.strip_prefix('#').unwrap_or_else(|| panic!("only local $ref are supported: {reference}"));
    doc.pointer(pointer).unwrap_or_else(|| panic!("dangling $ref {reference}"))
}

/// Validates `value` against `schema`; appends one message per violation to `errors`.
pub fn validate(doc: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    let s = schema.as_object().unwrap_or_else(|| panic!("schema at {at} is not an object"));
    for key in s.keys() {
        assert!(KEYWORDS.contains(&key.as_str()), "schema keyword {key:?} at {at} is not checked by this validator");
    }
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        return validate(doc, resolve(doc, r), value, at, errors);
    }
    if value.is_null() {
        if s.get("nullable") != Some(&Value::Bool(true)) {
            errors.push(format!("{at}: null is not allowed"));
        }
        return;
    }
    if let Some(allowed) = s.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            errors.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    let ty = s.get("type").and_then(Value::as_str);
    let type_ok = match ty {
        None => true,
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("boolean") => value.is_boolean(),
        // JSON integers only: 1.0 is a number, not an integer.
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some(other) => panic!("unknown type {other:?} at {at}"),
    };
    if !type_ok {
        errors.push(format!("{at}: expected {}, got {value}", ty.unwrap_or("?")));
        return;
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = s.get("minimum").and_then(Value::as_f64) {
            if n < min {
                errors.push(format!("{at}: {n} < minimum {min}"));
            }
        }
        if let Some(max) = s.get("maximum").and_then(Value::as_f64) {
            if n > max {
                errors.push(format!("{at}: {n} > maximum {max}"));
            }
        }
    }
    if let (Some(format), Some(text)) = (s.get("format").and_then(Value::as_str), value.as_str()) {
        let ok = match format {
            "date" => text.len() == 10 && chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").is_ok(),
            "date-time" => DateTime::parse_from_rfc3339(text).is_ok(),
            other => panic!("unknown format {other:?} at {at}"),
        };
        if !ok {
            errors.push(format!("{at}: {text:?} is not a {format}"));
        }
    }
    if let Some(obj) = value.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        for req in s.get("required").and_then(Value::as_array).into_iter().flatten() {
            let req = req.as_str().expect("required names are strings");
            if !obj.contains_key(req) {
                errors.push(format!("{at}: missing required property {req:?}"));
            }
        }
        for (k, v) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(sub) => validate(doc, sub, v, &format!("{at}.{k}"), errors),
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errors.push(format!("{at}: unexpected property {k:?}"))
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            validate(doc, items, v, &format!("{at}[{i}]"), errors);
        }
    }
}

fn schema_errors(doc: &Value, schema: &Value, value: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    validate(doc, schema, value, "$", &mut errors);
    errors
}

// ---------------------------------------------------------------------------------------------
// Calling routes and checking them against the document

/// The document and which (path template, method, status) were exercised.
struct Contract {
    doc: Value,
    base: String,
    seen: BTreeSet<(String, String, u16)>,
}

/// One response, read whole.
struct Reply {
    status: u16,
    content_type: String,
    www_authenticate: Option<String>,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text))
    }
}

impl Contract {
    /// `GET url` (relative to the API) and checks the reply against `template`'s documentation.
    async fn call(&mut self, template: &str, url: &str, token: Option<&str>) -> Reply {
        let mut req = http().get(format!("{}{url}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("GET");
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let content_type = header("content-type").unwrap_or_default();
        let www_authenticate = header("www-authenticate");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let reply = Reply { status, content_type, www_authenticate, text };
        self.check(template, url, &reply);
        reply
    }

    fn check(&mut self, template: &str, url: &str, r: &Reply) {
        let doc = self.doc.clone();
        let operation = doc["paths"][template]["get"].clone();
        assert!(operation.is_object(), "GET {template} is not documented (called {url})");
        let mut response = operation["responses"][r.status.to_string()].clone();
        assert!(response.is_object(), "GET {url}: status {} is not documented for {template}: {}", r.status, r.text);
        if let Some(reference) = response.get("$ref").and_then(Value::as_str) {
            response = resolve(&doc, reference).clone();
        }
        let media = r.content_type.split(';').next().unwrap_or("").trim().to_owned();
        let content =
            response["content"].as_object().unwrap_or_else(|| panic!("{template} {}: no content documented", r.status));
        let schema = content.get(&media).unwrap_or_else(|| {
            panic!(
                "GET {url}: content type {:?} not documented for {template} {} (documented: {:?})",
                r.content_type,
                r.status,
                content.keys().collect::<Vec<_>>()
            )
        })["schema"]
            .clone();
        let value = if media == "application/json" { r.json() } else { Value::String(r.text.clone()) };
        let errors = schema_errors(&doc, &schema, &value);
        assert!(
            errors.is_empty(),
            "GET {url} ({}) does not match its schema:\n  {}\nbody: {}",
            r.status,
            errors.join("\n  "),
            r.text
        );
        self.seen.insert((template.to_owned(), "get".to_owned(), r.status));
    }

    /// Every documented path, method and status that was never exercised.
    fn unexercised(&self) -> Vec<String> {
        let mut missing = Vec::new();
        for (path, item) in self.doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                for status in op["responses"].as_object().expect("responses").keys() {
                    let code: u16 = status.parse().expect("numeric status");
                    if !self.seen.contains(&(path.clone(), method.clone(), code)) {
                        missing.push(format!("{} {path} {code}", method.to_uppercase()));
                    }
                }
            }
        }
        missing
    }
}

const OVERVIEW: &str = "/v1/clients/{client_id}/statistics/overview";
const LIVE: &str = "/v1/clients/{client_id}/statistics/live/{webinar_id}";

fn assert_error(r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.json()["error"], code, "{}", r.text);
}

/// The validator itself rejects what it must (so a passing contract test means something).
#[test]
fn schema_validator_rejects_drift() {
    let doc: Value = serde_json::from_str(include_str!("../../pipeline/serve/assets/openapi.json")).unwrap();
    let totals = json!({"$ref": "#/components/schemas/Totals"});
    let good = json!({"visits": 6, "unique_sessions": 4, "entries": 3, "linked_entries": 2, "conversion_rate": 0.75});
    assert_eq!(schema_errors(&doc, &totals, &good), Vec::<String>::new());
    let mut extra = good.clone();
    extra["bonus"] = json!(1);
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("entries");
    let mut float = good.clone();
    float["visits"] = json!(6.0);
    let mut null = good.clone();
    null["conversion_rate"] = Value::Null;
    let mut negative = good.clone();
    negative["entries"] = json!(-1);
    for bad in [extra, missing, float, null, negative] {
        assert_eq!(schema_errors(&doc, &totals, &bad).len(), 1, "{bad}");
    }
    let source = json!({"$ref": "#/components/schemas/DataSource"});
    assert!(schema_errors(&doc, &source, &json!("aggregated")).is_empty());
    assert!(!schema_errors(&doc, &source, &json!("cached")).is_empty());
    let wm = json!({"$ref": "#/components/schemas/Watermark"});
    assert!(schema_errors(&doc, &wm, &Value::Null).is_empty());
    assert!(schema_errors(&doc, &wm, &json!("2026-11-26T10:05:59+09:00")).is_empty());
    assert!(!schema_errors(&doc, &wm, &json!("10:05:59")).is_empty());
    // Response objects are closed.
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        if schema["type"] == "object" && name != "OpenApiDocument" {
            assert_eq!(schema["additionalProperties"], json!(false), "{name} must set additionalProperties: false");
        }
    }
}

/// Every route, every documented status, every JSON body against openapi.json.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_matches_openapi() {
    // Unknown client ids are refused so that the admin token can observe 404.
    let mut p = start_pipeline("api-contract", "\n[tenancy]\nallow_unknown_clients = false\n").await;
    let known = send_known_facts(&p).await;
    let doc: Value = serde_json::from_str(&get_text(&format!("{}/openapi.json", p.d.api_url())).await)
        .expect("openapi.json is JSON");
    let mut c = Contract { doc, base: p.d.api_url(), seen: BTreeSet::new() };

    // ---- documents and operations --------------------------------------------------------
    let r = c.call("/openapi.json", "/openapi.json", None).await;
    assert_eq!(r.json()["openapi"], "3.0.3");
    let r = c.call("/", "/", None).await;
    assert!(r.text.contains("<html") && r.text.contains("id=\"by-day\""));
    assert_eq!(c.call("/healthz", "/healthz", None).await.text, "ok");
    assert_eq!(c.call("/readyz", "/readyz", None).await.text, "ready");
    let r = c.call("/metrics", "/metrics", None).await;
    assert!(r.text.contains("eventflow_api_request_duration_seconds"));

    // ---- overview: default range, 30d, explicit from/to, admin --------------------------
    let acme = "/v1/clients/acme/statistics";
    let r = c.call(OVERVIEW, &format!("{acme}/overview"), Some(ACME_TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let o = r.json();
    assert_eq!((o["from"].as_str(), o["to"].as_str()), (Some(known.days7[0].as_str()), Some(known.days7[6].as_str())));
    assert_eq!(o["by_day"].as_array().map(Vec::len), Some(7));
    assert_eq!(
        o["totals"],
        json!({"visits": 6, "unique_sessions": 4, "entries": 3, "linked_entries": 2, "conversion_rate": 0.75})
    );
    assert!(o["meta"]["watermark"].is_string(), "{o}");
    let r = c.call(OVERVIEW, &format!("{acme}/overview?range=30d"), Some(ACME_TOKEN)).await;
    assert_eq!(r.json()["by_day"].as_array().map(Vec::len), Some(30));
    assert_eq!(r.json()["from"], known.days30[0].as_str());
    let url = format!("{acme}/overview?from={d}&to={d}", d = known.day);
    let r = c.call(OVERVIEW, &url, Some(ADMIN_TOKEN)).await;
    let o = r.json();
    assert_eq!(o["by_day"], json!([{"date": known.day, "visits": 6, "unique_sessions": 4, "entries": 3}]));
    assert_eq!(
        o["live"],
        json!([{"webinar_id": "w1", "peak_concurrent": 3, "peak_minute": known.live_minutes[2], "viewer_minutes": 9}])
    );

    // ---- live series ---------------------------------------------------------------------
    let r = c.call(LIVE, &format!("{acme}/live/w1"), Some(ACME_TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let s = r.json();
    let expected: Vec<Value> = known
        .live_minutes
        .iter()
        .zip(&known.live_concurrent)
        .map(|(m, n)| json!({"minute": m, "concurrent": n}))
        .collect();
    assert_eq!(s["series"], Value::Array(expected));
    let r = c.call(LIVE, &format!("{acme}/live/nobody-watched?range=30d"), Some(ACME_TOKEN)).await;
    assert_eq!(r.json()["series"], json!([]));

    // ---- errors --------------------------------------------------------------------------
    for (template, path) in [(OVERVIEW, format!("{acme}/overview")), (LIVE, format!("{acme}/live/w1"))] {
        let r = c.call(template, &format!("{path}?from=2026-13-01"), Some(ACME_TOKEN)).await;
        assert_error(&r, 400, "invalid_date");
        let r = c.call(template, &format!("{path}?from=2026-11-03&to=2026-11-02"), Some(ACME_TOKEN)).await;
        assert_error(&r, 400, "invalid_range");
        let r = c.call(template, &format!("{path}?from=2020-01-01&to=2026-11-02"), Some(ACME_TOKEN)).await;
        assert_error(&r, 400, "range_too_long");
        let r = c.call(template, &format!("{path}?range=1y"), Some(ACME_TOKEN)).await;
        assert_error(&r, 400, "invalid_range");
        let r = c.call(template, &format!("{path}?range=7d&to=2026-11-02"), Some(ACME_TOKEN)).await;
        assert_error(&r, 400, "invalid_range");
        let r = c.call(template, &format!("{path}?from=2026-11-01&from=2026-11-02"), Some(ACME_TOKEN)).await;
        assert_error(&r, 400, "invalid_query");
        let r = c.call(template, &path, None).await;
        assert_error(&r, 401, "unauthorized");
        assert_eq!(r.www_authenticate.as_deref(), Some("Bearer"));
        let r = c.call(template, &path, Some("not-a-token-at-all-000")).await;
        assert_error(&r, 401, "unauthorized");
        let r = c.call(template, &path, Some(GLOBEX_TOKEN)).await;
        assert_error(&r, 403, "forbidden");
        let other = path.replace("/acme/", "/nosuch/");
        let r = c.call(template, &other, Some(ADMIN_TOKEN)).await;
        assert_error(&r, 404, "unknown_client");
        let bad_id = path.replace("/acme/", "/Not.A.Client/");
        let r = c.call(template, &bad_id, Some(ADMIN_TOKEN)).await;
        assert_error(&r, 404, "unknown_client");
    }
    let long = "w".repeat(129);
    let r = c.call(LIVE, &format!("{acme}/live/{long}"), Some(ACME_TOKEN)).await;
    assert_error(&r, 400, "invalid_webinar_id");
    let r = c.call(LIVE, &format!("{acme}/live/w%01"), Some(ACME_TOKEN)).await;
    assert_error(&r, 400, "invalid_webinar_id");

    // ---- ClickHouse down: sections in error (still 200), freshness unknown, not ready ----
    p.kill_clickhouse();
    let r = c.call(OVERVIEW, &format!("{acme}/overview"), Some(ACME_TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let o = r.json();
    for section in ["totals", "by_page", "by_day", "campaigns", "link_clicks", "live", "quality"] {
        assert_eq!(o["meta"]["data_sources"][section], "error", "{section}: {o}");
    }
    assert_eq!((o["meta"]["watermark"].clone(), o["meta"]["staleness_seconds"].clone()), (Value::Null, Value::Null));
    assert_eq!(o["totals"]["visits"], 0);
    assert_eq!(o["by_day"].as_array().map(Vec::len), Some(7), "by_day keeps every day, zeros included");
    let r = c.call(LIVE, &format!("{acme}/live/w1"), Some(ACME_TOKEN)).await;
    assert_eq!(r.json()["meta"]["data_sources"]["live"], "error");
    let r = c.call("/readyz", "/readyz", None).await;
    assert_error(&r, 503, "clickhouse_unavailable");

    // ---- nothing documented went untested --------------------------------------------------
    let missing = c.unexercised();
    assert!(missing.is_empty(), "documented but never exercised: {missing:?}");
    let _ = known.facts_accepted;
}

/// The live series is aggregate-first with raw fallback like the overview: with acme's
/// `minute_live` rows deleted, the overview already serves `live` from raw facts, and the series
/// must too (same numbers, `data_sources.live = raw`) instead of an empty "aggregated" series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_series_falls_back_to_raw_when_its_aggregate_is_missing() {
    let p = start_pipeline("api-live-raw", "").await;
    let known = send_known_facts(&p).await;
    p.ch().query("ALTER TABLE eventflow.minute_live DELETE WHERE client_id = 'acme'").expect("mutation");
    eventually(Duration::from_secs(30), "minute_live rows of acme deleted", || async {
        p.ch().number("SELECT count() FROM eventflow.minute_live WHERE client_id = 'acme'") == 0
    })
    .await;
    let api = format!("{}/v1/clients/acme/statistics", p.d.api_url());
    let (status, o) = get_json(&format!("{api}/overview"), Some(ACME_TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(o["meta"]["data_sources"]["live"], "raw", "{o}");
    assert_eq!(o["live"][0]["viewer_minutes"], 9, "{o}");
    let (status, s) = get_json(&format!("{api}/live/w1"), Some(ACME_TOKEN)).await;
    assert_eq!(status, 200);
    let expected: Vec<Value> = known
        .live_minutes
        .iter()
        .zip(&known.live_concurrent)
        .map(|(m, n)| json!({"minute": m, "concurrent": n}))
        .collect();
    assert_eq!(
        (s["meta"]["data_sources"]["live"].clone(), s["series"].clone()),
        (json!("raw"), Value::Array(expected)),
        "the live series must detect the missing aggregate and recount from raw facts: {s}"
    );
}

/// Every overview section falls back to raw facts on its own when its aggregate is missing, with
/// the same numbers, and `eventflow backfill` brings the aggregate back. Each case deletes acme's
/// rows of one aggregate table; the sections that read it (directly or through a cross-check)
/// must turn `raw` and the others stay `aggregated`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_section_falls_back_to_raw_when_its_aggregate_is_missing() {
    const ALL: [&str; 6] = ["totals", "by_page", "by_day", "campaigns", "live", "quality"];
    let mut p = start_pipeline("api-raw-sections", "").await;
    let known = send_known_facts(&p).await;
    // The continuous reconcile job (off in the other tests) must notice the damage too.
    p.processor.stop(Duration::from_secs(20));
    p.processor = p.d.start_with("processor", &[("EVENTFLOW__PROCESSOR__RECONCILE_INTERVAL", "1s".into())]);
    let processor_metrics = format!("{}/metrics", p.d.processor_url());
    // A processor taking over partitions rewrites every open bucket under its new epoch before it
    // consumes (and exports the lag of) the partition. Wait for all 3 x 3 lag series, or that
    // rewrite could restore rows this test is about to delete.
    eventually(Duration::from_secs(60), "the restarted processor owns every partition", || async {
        get_text(&processor_metrics)
            .await
            .lines()
            .filter(|l| l.starts_with("eventflow_processor_consumer_lag{"))
            .count()
            == 9
    })
    .await;
    let acme_mismatches = |page: &str| -> f64 {
        page.lines()
            .filter(|l| l.starts_with("eventflow_reconcile_mismatch{") && l.contains("client=\"acme\""))
            .filter(|l| !l.contains("metric=\"pending_backfill\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let url = format!("{}/v1/clients/acme/statistics/overview", p.d.api_url());
    let overview = || async {
        let (status, mut o) = get_json(&url, Some(ACME_TOKEN)).await;
        assert_eq!(status, 200, "{o}");
        let meta = o.as_object_mut().and_then(|m| m.remove("meta")).expect("meta");
        let sources: Vec<(String, String)> =
            ALL.iter().map(|s| (s.to_string(), meta["data_sources"][*s].as_str().unwrap_or("?").to_owned())).collect();
        (o, sources)
    };
    let expect = |raw: &[&str]| -> Vec<(String, String)> {
        ALL.iter().map(|s| (s.to_string(), if raw.contains(s) { "raw" } else { "aggregated" }.to_owned())).collect()
    };

    let (baseline, sources) = overview().await;
    assert_eq!(sources, expect(&[]), "{baseline}");
    // The numbers worked out by hand in send_known_facts (also asserted in every_route_matches_openapi).
    assert_eq!(
        baseline["totals"],
        json!({"visits": 6, "unique_sessions": 4, "entries": 3, "linked_entries": 2, "conversion_rate": 0.75})
    );
    assert_eq!(baseline["live"][0]["viewer_minutes"], 9, "{baseline}");

    let cases: [(&str, &[&str]); 4] = [
        ("daily_marketing", &["campaigns"]),
        ("minute_live", &["live"]),
        ("day_sessions", &["totals", "by_day"]),
        // The reference of every cross-check: without it nothing is served from aggregates.
        ("daily_totals", &ALL),
    ];
    for (table, raw) in cases {
        p.ch().query(&format!("ALTER TABLE eventflow.{table} DELETE WHERE client_id = 'acme'")).expect("mutation");
        eventually(Duration::from_secs(30), &format!("{table} rows of acme deleted"), || async {
            p.ch().number(&format!("SELECT count() FROM eventflow.{table} WHERE client_id = 'acme'")) == 0
        })
        .await;
        let (o, sources) = overview().await;
        assert_eq!(sources, expect(raw), "{table} deleted: {o}");
        assert_eq!(o, baseline, "{table} deleted: the raw recount must give the same numbers");
        if table == "daily_marketing" {
            eventually(Duration::from_secs(60), "the reconcile job reports acme's campaign mismatch", || async {
                acme_mismatches(&get_text(&processor_metrics).await) > 0.0
            })
            .await;
        }

        let (code, out) =
            p.d.run(&["backfill", "--from", &known.days7[0], "--to", &known.days7[6], "--client", "acme"]);
        assert_eq!(code, 0, "backfill: {out}");
        let (o, sources) = overview().await;
        assert_eq!(sources, expect(&[]), "{table} rebuilt by backfill: {o}");
        assert_eq!(o, baseline, "{table} rebuilt by backfill");
        if table == "daily_marketing" {
            eventually(Duration::from_secs(60), "the reconcile job clears acme's mismatch", || async {
                acme_mismatches(&get_text(&processor_metrics).await) == 0.0
            })
            .await;
        }
    }
}
