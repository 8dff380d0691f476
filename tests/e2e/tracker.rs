//! Browser tests of the tracker (headless Chromium via chromedriver).
//!
//! Every test starts the whole pipeline (ClickHouse 18.16, tansu, collector, processor, API)
//! and serves test pages from another loopback port: landing `/event/summit`, webinar info
//! `/webinar/w1`, live `/webinar/w1/live`, a registration form `/event/summit/register` and
//! `/thanks`. Each page loads `GET /v1/tracker.js` from the collector with `async`, after an
//! inline script that records uncaught errors and unhandled rejections (in `sessionStorage`,
//! so they survive a navigation) and defines the `eventflow` stub documented in tracker.js.
//! Pages on 127.0.0.1:A and the collector on 127.0.0.1:B are same-site, so the collector's
//! `ef_sid` / `ef_utm` cookies come back with the beacons. The tests assert what arrived in
//! ClickHouse (`facts`) and in the overview API, and that the page keeps working when the
//! collector is down, slow, failing, or cannot even serve the tracker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, Locator};
use serde_json::{json, Value};

use crate::harness::*;

// -------------------------------------------------------------------------------------------
// The pipeline

/// One deployment (fields drop in order: services first, the directory last).
struct Stack {
    _api: Proc,
    _processor: Proc,
    collector: Proc,
    _broker: Tansu,
    ch: ClickHouse,
    d: Deployment,
    dir: TestDir,
}

fn start_stack(name: &str) -> Stack {
    start_stack_with(name, &[])
}

/// The pipeline with environment overrides for the collector.
fn start_stack_with(name: &str, collector_env: &[(&str, String)]) -> Stack {
    let dir = TestDir::new(name);
    let ch = ClickHouse::start(&dir);
    let broker = Tansu::start(&dir);
    let d = Deployment::new(&dir, &ch.url(), &broker.brokers(), 3, "");
    d.migrate();
    let collector = d.start_with("collector", collector_env);
    let processor = d.start("processor");
    let api = d.start("api");
    Stack { _api: api, _processor: processor, collector, _broker: broker, ch, d, dir }
}

/// Facts the collector acknowledged so far (all types).
async fn accepted(d: &Deployment) -> u64 {
    let page = get_text(&format!("{}/metrics", d.collector_url())).await;
    page.lines()
        .filter(|l| l.starts_with("eventflow_collector_facts_total{"))
        .filter(|l| l.contains("outcome=\"accepted\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Waits until everything the collector acknowledged is in ClickHouse.
async fn settle(d: &Deployment) -> u64 {
    let n = accepted(d).await;
    wait_processed(d, n, Duration::from_secs(90)).await;
    n
}

/// Rows of `sql` (JSONEachRow).
fn rows(ch: &ClickHouse, sql: &str) -> Vec<Value> {
    let text = ch.query(&format!("{sql} FORMAT JSONEachRow")).unwrap_or_else(|e| panic!("{sql}: {e}"));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// Polls `sql` until it returns at least `n` rows.
async fn wait_rows(ch: &ClickHouse, sql: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = rows(ch, sql);
        if r.len() >= n {
            return r;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {n} rows of {sql}; have {r:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A column as text (ClickHouse quotes 64-bit integers in JSON, not smaller ones).
fn s(row: &Value, col: &str) -> String {
    match &row[col] {
        Value::String(s) => s.clone(),
        Value::Null => panic!("no column {col} in {row}"),
        v => v.to_string(),
    }
}

fn n(row: &Value, col: &str) -> i64 {
    s(row, col).parse().unwrap_or_else(|_| panic!("{col} of {row} is not a number"))
}

const FACT_COLUMNS: &str = "kind, session_id, session_origin, page, event_id, webinar_id, \
     entry_id, path, referrer, cid, cid_resolved, utm_source, utm_medium, utm_campaign, \
     utm_inherited, first_utm_source, first_utm_medium, first_utm_campaign, first_touch_ms, \
     event_time_ms, received_at_ms";

fn facts_sql(kind: &str) -> String {
    format!(
        "SELECT {FACT_COLUMNS} FROM eventflow.facts FINAL \
         WHERE client_id = 'acme' AND kind = '{kind}' ORDER BY received_at_ms, event_time_ms"
    )
}

async fn overview(d: &Deployment) -> Value {
    let (status, body) =
        get_json(&format!("{}/v1/clients/acme/statistics/overview", d.api_url()), Some(ACME_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Polls the overview until `cond` holds; returns it.
async fn wait_overview(d: &Deployment, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = overview(d).await;
        if cond(&o) {
            return o;
        }
        assert!(Instant::now() < deadline, "overview never showed {what}: {o}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

// -------------------------------------------------------------------------------------------
// Test pages

/// `<script async src=".../v1/tracker.js" data-client="acme" ...>` from `collector_port`.
fn tracker_tag(collector_port: u16, attrs: &str) -> String {
    format!(
        r#"<script async src="http://127.0.0.1:{collector_port}/v1/tracker.js" data-client="acme"{attrs}></script>"#
    )
}

/// A page as a site would have it: the error recorder and the tracker stub first, then
/// `head` (page scripts), then the tracker, then `body`.
fn page(title: &str, head: &str, tracker: &str, body: &str) -> String {
    format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<script>
  (function () {{
    function keep(kind, msg) {{
      try {{
        var list = JSON.parse(sessionStorage.getItem("errors") || "[]");
        list.push(kind + ": " + msg + " on " + location.pathname);
        sessionStorage.setItem("errors", JSON.stringify(list));
      }} catch (e) {{}}
    }}
    window.onerror = function (msg, src, line) {{ keep("error", msg + " (" + src + ":" + line + ")"); }};
    window.addEventListener("unhandledrejection", function (e) {{ keep("unhandledrejection", String(e.reason)); }});
    window.visibilityLog = [];
    document.addEventListener("visibilitychange", function () {{
      window.visibilityLog.push([document.visibilityState, Date.now()]);
    }});
    // ?nobeacon: a browser without navigator.sendBeacon (the tracker falls back to fetch).
    if (location.search.indexOf("nobeacon") >= 0) {{ try {{ navigator.sendBeacon = undefined; }} catch (e) {{}} }}
  }})();
  window.eventflow = window.eventflow || {{q: [], entry: function (f) {{ window.eventflow.q.push(["entry", f]); }}}};
</script>
{head}
{tracker}
</head>
<body>
<h1>{title}</h1>
{body}
</body></html>
"#
    )
}

/// Landing / webinar / live content: links, an in-page anchor and a button with a handler.
const CONTENT: &str = r##"
<nav><a id="to-webinar" href="/webinar/w1">Webinar</a> <a id="to-live" href="/webinar/w1/live">Watch live</a>
<a id="to-agenda" href="#agenda">Agenda</a></nav>
<button id="like" type="button">Like</button> <span id="out"></span>
<script>
  document.getElementById("like").addEventListener("click", function () {
    document.getElementById("out").textContent = "clicked";
  });
</script>
<div id="agenda" style="margin-top: 1500px">Agenda</div>
"##;

/// The registration form: the submit handler records the entry and lets the form navigate.
const REGISTER: &str = r#"
<form id="reg" action="/thanks" method="get">
  <input name="email" value="visitor@example.com"> <button id="submit" type="submit">Register</button>
</form>
<script>
  document.getElementById("reg").addEventListener("submit", function () {
    sessionStorage.setItem("submitAt", String(Date.now()));
    eventflow.entry({entry_id: "e-123", event_id: "summit"});
  });
</script>
"#;

const THANKS: &str = r#"
<p id="thanks">Thank you.</p>
<script>
  var at = Number(sessionStorage.getItem("submitAt") || "0");
  window.submitDelay = at ? Date.now() - at : -1;
</script>
"#;

/// The standard site: landing/webinar/live (fallback), registration and thanks pages.
fn site(tracker: &str, register_tracker: &str) -> Vec<(String, String)> {
    vec![
        (
            "/event/summit/register".into(),
            page("Register for Summit", "", register_tracker, &format!("{REGISTER}{CONTENT}")),
        ),
        ("/thanks".into(), page("Thanks", "", tracker, THANKS)),
    ]
}

// -------------------------------------------------------------------------------------------
// Browser helpers

async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.unwrap_or_else(|e| panic!("{script}: {e}"))
}

/// Cookies the browser holds for the current page's host (HttpOnly ones included).
async fn cookie(c: &Client, name: &str) -> Option<String> {
    c.get_all_cookies().await.expect("cookies").into_iter().find(|k| k.name() == name).map(|k| k.value().to_owned())
}

async fn wait_cookie(c: &Client, name: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = cookie(c, name).await {
            return v;
        }
        assert!(Instant::now() < deadline, "the browser never got {name}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn path(c: &Client) -> String {
    c.current_url().await.expect("url").path().to_owned()
}

/// Waits until the page's path is `want`; returns how long that took.
async fn wait_path(c: &Client, want: &str, started: Instant) -> Duration {
    let deadline = started + Duration::from_secs(20);
    loop {
        if path(c).await == want && js(c, "return document.readyState === 'complete';").await == json!(true) {
            return started.elapsed();
        }
        assert!(Instant::now() < deadline, "never reached {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn tracker_loaded(c: &Client) -> bool {
    js(c, "return !!(window.eventflow && window.eventflow.__loaded);").await == json!(true)
}

async fn wait_tracker(c: &Client) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !tracker_loaded(c).await {
        assert!(Instant::now() < deadline, "tracker.js never loaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

/// Errors and unhandled rejections the pages of this origin recorded in this tab.
async fn page_errors(c: &Client) -> Vec<Value> {
    js(c, "return JSON.parse(sessionStorage.getItem('errors') || '[]');").await.as_array().cloned().unwrap_or_default()
}

/// A Chrome DevTools Protocol command through chromedriver (`/goog/cdp/execute`).
#[derive(Debug)]
struct Cdp(&'static str, Value);

impl WebDriverCompatibleCommand for Cdp {
    fn endpoint(
        &self,
        base_url: &reqwest::Url,
        session_id: Option<&str>,
    ) -> Result<reqwest::Url, <reqwest::Url as std::str::FromStr>::Err> {
        base_url.join(&format!("session/{}/goog/cdp/execute", session_id.unwrap_or_default()))
    }

    fn method_and_body(&self, _url: &reqwest::Url) -> (reqwest::Method, Option<String>) {
        (reqwest::Method::POST, Some(json!({"cmd": self.0, "params": self.1}).to_string()))
    }
}

async fn bring_to_front(c: &Client) {
    c.issue_cmd(Cdp("Page.bringToFront", json!({}))).await.expect("Page.bringToFront");
}

// -------------------------------------------------------------------------------------------
// 1. Page kinds and sessions

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tracker_records_each_page_kind_in_one_session() {
    let st = start_stack("tracker-pages");
    let tag = tracker_tag(st.d.collector_port, "");
    let mut routes = site(&tag, &tag);
    // The landing page registers "early", before tracker.js has even been requested, in a
    // browser without a session yet: the stub queues the call, the tracker sends it once the
    // collector has answered the first visit (and set ef_sid).
    routes.push((
        "/event/summit".into(),
        page("Summit", r#"<script>eventflow.entry({entry_id: "early-1"});</script>"#, &tag, CONTENT),
    ));
    let (pages, _server) = serve_pages(routes, page("Page", "", &tag, CONTENT)).await;
    let b = Browser::start(&st.dir).await;
    let c = &b.client;
    let origin = format!("http://127.0.0.1:{pages}");

    // A fresh browser: the first beacon has no cookie, the collector creates ef_sid.
    c.goto(&format!("{origin}/event/summit")).await.expect("landing");
    let sid = wait_cookie(c, "ef_sid").await;
    // An in-page anchor is not a page view.
    click(c, "#to-agenda").await;
    assert_eq!(c.current_url().await.expect("url").fragment(), Some("agenda"));
    // Follow the site's links, as a visitor would (so the referrer is set).
    let t = Instant::now();
    click(c, "#to-webinar").await;
    wait_path(c, "/webinar/w1", t).await;
    wait_tracker(c).await;
    let t = Instant::now();
    click(c, "#to-live").await;
    wait_path(c, "/webinar/w1/live", t).await;
    wait_tracker(c).await;
    assert!(page_errors(c).await.is_empty(), "{:?}", page_errors(c).await);
    c.goto("about:blank").await.expect("blank");

    let visits = wait_rows(&st.ch, &facts_sql("visit"), 3).await;
    let total = settle(&st.d).await;
    let visits_after = rows(&st.ch, &facts_sql("visit"));
    eprintln!("facts accepted by the collector: {total} (3 visits, 1 entry, 1 ping)");
    assert_eq!(visits_after.len(), 3, "exactly one visit per page");
    assert_eq!(visits, visits_after);
    let got: Vec<(String, String, String, String, String)> = visits
        .iter()
        .map(|v| (s(v, "page"), s(v, "event_id"), s(v, "webinar_id"), s(v, "path"), s(v, "session_origin")))
        .collect();
    let row = |p: &str, e: &str, w: &str, path: &str, o: &str| (p.into(), e.into(), w.into(), path.into(), o.into());
    // The first page's visit creates the session; the next pages of the tab name it in the body
    // (the tracker keeps the session the collector answered, in sessionStorage).
    assert_eq!(
        got,
        vec![
            row("landing", "summit", "", "/event/summit", "created"),
            row("webinar", "", "w1", "/webinar/w1", "body"),
            row("live", "", "w1", "/webinar/w1/live", "body"),
        ]
    );
    for v in &visits {
        assert_eq!(s(v, "session_id"), sid, "one session (the ef_sid cookie's): {v}");
    }
    assert_eq!(s(&visits[0], "referrer"), "");
    assert_eq!(s(&visits[1], "referrer"), format!("{origin}/event/summit"));
    assert_eq!(s(&visits[2], "referrer"), format!("{origin}/webinar/w1"));

    // The queued registration: the event from the page, the session the collector answered for
    // the page's visit (named in the body).
    let entries = rows(&st.ch, &facts_sql("entry"));
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(
        (
            s(&entries[0], "entry_id"),
            s(&entries[0], "event_id"),
            s(&entries[0], "session_id"),
            s(&entries[0], "session_origin")
        ),
        ("early-1".into(), "summit".into(), sid.clone(), "body".into())
    );
    // The live page pinged at once (every 30 s by default: the test left before the next).
    let pings = rows(&st.ch, &facts_sql("ping"));
    assert_eq!(pings.len(), 1, "{pings:?}");
    assert_eq!((s(&pings[0], "webinar_id"), s(&pings[0], "session_id")), ("w1".into(), sid.clone()));

    let o =
        wait_overview(&st.d, "the three visits", |o| o["totals"]["visits"] == 3 && o["totals"]["entries"] == 1).await;
    assert_eq!(o["by_page"], json!({"landing": 1, "webinar": 1, "live": 1}));
    assert_eq!(o["totals"]["unique_sessions"], 1);
    assert_eq!(o["totals"]["linked_entries"], 1);
    b.close().await;
}

// -------------------------------------------------------------------------------------------
// 2. Live pings

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tracker_pings_while_live_page_is_visible() {
    let st = start_stack("tracker-pings");
    let tag = tracker_tag(st.d.collector_port, "");
    let live_tag = tracker_tag(st.d.collector_port, r#" data-ping-interval="1000""#);
    let routes = vec![("/webinar/w1/live".into(), page("Live w1", "", &live_tag, CONTENT))];
    let (pages, _server) = serve_pages(routes, page("Page", "", &tag, CONTENT)).await;
    let b = Browser::start(&st.dir).await;
    let c = &b.client;

    c.goto(&format!("http://127.0.0.1:{pages}/webinar/w1/live")).await.expect("live page");
    wait_tracker(c).await;
    let loaded_at = js(c, "return Date.now();").await.as_i64().expect("now");
    tokio::time::sleep(Duration::from_millis(4500)).await;

    // Hide the tab for real: another tab comes to the front (CDP Page.bringToFront).
    let main = c.window().await.expect("window");
    let other = c.new_window(true).await.expect("new tab");
    c.switch_to_window(other.handle).await.expect("switch");
    bring_to_front(c).await;
    tokio::time::sleep(Duration::from_millis(5000)).await;
    c.switch_to_window(main).await.expect("switch back");
    bring_to_front(c).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;

    let log = js(c, "return window.visibilityLog;").await;
    let log = log.as_array().expect("visibility log");
    assert!(page_errors(c).await.is_empty(), "{:?}", page_errors(c).await);
    assert_eq!(log.len(), 2, "hidden then visible: {log:?}");
    assert_eq!((log[0][0].as_str(), log[1][0].as_str()), (Some("hidden"), Some("visible")));
    let hidden_at = log[0][1].as_i64().expect("time");
    let visible_at = log[1][1].as_i64().expect("time");
    let left_at = js(c, "return Date.now();").await.as_i64().expect("now");
    c.goto("about:blank").await.expect("blank");

    settle(&st.d).await;
    let visits = rows(&st.ch, &facts_sql("visit"));
    assert_eq!(visits.len(), 1, "{visits:?}");
    assert_eq!(s(&visits[0], "page"), "live");
    let sid = s(&visits[0], "session_id");
    let pings = rows(&st.ch, &facts_sql("ping"));
    for p in &pings {
        assert_eq!((s(p, "webinar_id"), s(p, "session_id")), ("w1".into(), sid.clone()));
    }
    let at: Vec<i64> = pings.iter().map(|p| n(p, "received_at_ms")).collect();
    let between = |from: i64, to: i64| at.iter().filter(|t| **t >= from && **t < to).count();
    // A ping scheduled just before the change may still be in flight: 300 ms of slack.
    let visible1 = between(0, hidden_at + 300);
    let hidden = between(hidden_at + 300, visible_at);
    let visible2 = between(visible_at, i64::MAX);
    let first_gap = at.first().map(|t| t - n(&visits[0], "received_at_ms"));
    let gaps: Vec<i64> = at.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!(
        "pings: {} in total; visible {} ms: {visible1}; hidden {} ms: {hidden}; visible again \
         {} ms: {visible2}; first ping {first_gap:?} ms after the visit; gaps (ms): {gaps:?}",
        at.len(),
        hidden_at - loaded_at,
        visible_at - hidden_at,
        left_at - visible_at,
    );
    assert!((4..=7).contains(&visible1), "pings while visible: {visible1}");
    assert_eq!(hidden, 0, "no pings while hidden");
    assert!((3..=6).contains(&visible2), "pings after coming back: {visible2}");
    assert!(first_gap.is_some_and(|g| g.abs() < 1500), "ping at once: {first_gap:?}");
    let first_phase: Vec<i64> = at.windows(2).filter(|w| w[1] < hidden_at).map(|w| w[1] - w[0]).collect();
    assert!(first_phase.iter().all(|g| (500..=1800).contains(g)), "every second while visible: {first_phase:?}");

    // Live minute buckets: one viewer in each minute that had a ping.
    let minutes = st.ch.number(
        "SELECT uniqExact(toStartOfMinute(event_time)) FROM eventflow.facts FINAL \
         WHERE client_id = 'acme' AND kind = 'ping'",
    );
    let o = wait_overview(&st.d, "the live viewer-minutes", |o| o["live"][0]["viewer_minutes"] == minutes).await;
    eprintln!("overview live: {}", o["live"]);
    assert_eq!(o["live"].as_array().map(Vec::len), Some(1));
    assert_eq!(o["live"][0]["webinar_id"], "w1");
    assert_eq!(o["live"][0]["peak_concurrent"], 1);
    assert_eq!(o["by_page"]["live"], 1);
    b.close().await;
}

// -------------------------------------------------------------------------------------------
// 3. Registration

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tracker_records_registration_without_delaying_the_form() {
    let st = start_stack("tracker-entry");
    let tag = tracker_tag(st.d.collector_port, "");
    // The registration page belongs to the summit event (not to an event "summit/register").
    let register_tag = tracker_tag(st.d.collector_port, r#" data-event-id="summit""#);
    let (pages, _server) = serve_pages(site(&tag, &register_tag), page("Page", "", &tag, CONTENT)).await;
    let b = Browser::start(&st.dir).await;
    let c = &b.client;
    let origin = format!("http://127.0.0.1:{pages}");

    c.goto(&format!("{origin}/event/summit")).await.expect("landing");
    let sid = wait_cookie(c, "ef_sid").await;
    c.goto(&format!("{origin}/event/summit/register")).await.expect("register");
    wait_tracker(c).await;
    let t = Instant::now();
    click(c, "#submit").await;
    let wall = wait_path(c, "/thanks", t).await;
    let delay = js(c, "return window.submitDelay;").await.as_i64().expect("delay");
    eprintln!("registration submit -> /thanks: {delay} ms in the page, {} ms wall time", wall.as_millis());
    assert!((0..1500).contains(&delay), "form submission delayed: {delay} ms");
    assert!(wall < Duration::from_millis(1500), "{wall:?}");
    assert!(page_errors(c).await.is_empty(), "{:?}", page_errors(c).await);
    assert!(c.current_url().await.expect("url").query().unwrap_or("").contains("email="));

    let entries = wait_rows(&st.ch, &facts_sql("entry"), 1).await;
    settle(&st.d).await;
    assert_eq!(rows(&st.ch, &facts_sql("entry")).len(), 1);
    let e = &entries[0];
    assert_eq!(
        (s(e, "entry_id"), s(e, "event_id"), s(e, "session_id"), s(e, "session_origin")),
        ("e-123".into(), "summit".into(), sid.clone(), "body".into())
    );
    let visits = rows(&st.ch, &facts_sql("visit"));
    let kinds: Vec<(String, String, String)> =
        visits.iter().map(|v| (s(v, "page"), s(v, "event_id"), s(v, "session_id"))).collect();
    assert_eq!(
        kinds,
        vec![("landing".into(), "summit".into(), sid.clone()), ("landing".into(), "summit".into(), sid.clone()),],
        "the landing and the registration page; /thanks is not a tracked page"
    );
    assert!(n(&visits[0], "event_time_ms") <= n(e, "event_time_ms"));

    let o = wait_overview(&st.d, "a linked registration", |o| {
        o["totals"]["entries"] == 1 && o["totals"]["linked_entries"] == 1
    })
    .await;
    eprintln!("overview totals: {}", o["totals"]);
    assert_eq!(o["totals"]["visits"], 2);
    assert_eq!(o["totals"]["unique_sessions"], 1);
    assert_eq!(o["quality"]["session_link_rate"], 1.0);
    b.close().await;
}

// -------------------------------------------------------------------------------------------
// 4. A broken collector never reaches the page

/// A stand-in collector that counts `POST /v1/collect` and answers after `delay` with `status`.
async fn broken_collector(delay: Duration, status: u16) -> (u16, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    use axum::http::StatusCode;
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let handler = move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            StatusCode::from_u16(status).expect("status")
        }
    };
    let app = axum::Router::new().route("/v1/collect", axum::routing::post(handler));
    let app = if status >= 500 {
        // The failing collector fails everything, preflights included.
        app.fallback(|| async { StatusCode::INTERNAL_SERVER_ERROR })
    } else {
        app
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, hits, task)
}

/// Landing page (button works), then the registration form (navigates at once), with and
/// without sendBeacon; no error reaches the page. Returns the submit delays (page, wall) in ms.
async fn walk_broken(c: &Client, pages: u16, tracker_expected: bool) -> Vec<(i64, u128)> {
    let origin = format!("http://127.0.0.1:{pages}");
    let mut delays = Vec::new();
    for query in ["", "?nobeacon=1"] {
        c.goto(&format!("{origin}/event/summit{query}")).await.expect("landing");
        if tracker_expected {
            wait_tracker(c).await;
        } else {
            // Give the failing script load time to fail.
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(!tracker_loaded(c).await);
        }
        click(c, "#like").await;
        let out = c.find(Locator::Css("#out")).await.expect("#out").text().await.expect("text");
        assert_eq!(out, "clicked", "the page's own button handler ran");
        // The page goes on working: a client-side navigation.
        js(c, "history.pushState({}, '', '/webinar/w1' + location.search); return 1;").await;

        c.goto(&format!("{origin}/event/summit/register{query}")).await.expect("register");
        if tracker_expected {
            wait_tracker(c).await;
        } else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!tracker_loaded(c).await);
        }
        let t = Instant::now();
        click(c, "#submit").await;
        let wall = wait_path(c, "/thanks", t).await;
        let delay = js(c, "return window.submitDelay;").await.as_i64().expect("delay");
        assert!((0..1500).contains(&delay), "form submission delayed {delay} ms");
        assert!(wall < Duration::from_millis(1500), "form submission took {wall:?}");
        // Still working on the next page, and no error or rejection was ever recorded.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let errors = page_errors(c).await;
        assert!(errors.is_empty(), "errors reached the page: {errors:?}");
        delays.push((delay, wall.as_millis()));
    }
    delays
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tracker_never_blocks_or_throws_when_the_collector_fails() {
    let mut st = start_stack("tracker-broken");
    let b = Browser::start(&st.dir).await;
    let (slow_port, slow_hits, _slow) = broken_collector(Duration::from_secs(10), 202).await;
    let (err_port, err_hits, _err) = broken_collector(Duration::ZERO, 500).await;
    let down_port = free_port();

    let mut report = Vec::new();
    for (name, port) in [("down", down_port), ("slow 10 s", slow_port), ("500", err_port)] {
        let attrs = format!(r#" data-endpoint="http://127.0.0.1:{port}""#);
        let tag = tracker_tag(st.d.collector_port, &attrs);
        let (pages, server) = serve_pages(site(&tag, &tag), page("Page", "", &tag, CONTENT)).await;
        let delays = walk_broken(&b.client, pages, true).await;
        report.push((name, delays));
        server.abort();
    }
    // The stand-ins did receive the beacons (visit, visit, entry per walk at least).
    let (slow, failed) = (slow_hits.load(Ordering::SeqCst), err_hits.load(Ordering::SeqCst));
    eprintln!("beacons received: slow collector {slow}, failing collector {failed}");
    assert!(slow >= 3 && failed >= 3, "slow {slow}, failing {failed}");

    // Nothing reached the real collector: every beacon went to the broken endpoint.
    assert_eq!(accepted(&st.d).await, 0);

    // The collector is stopped: tracker.js itself cannot load (a fresh browser: no cache).
    b.close().await;
    st.collector.stop(Duration::from_secs(15));
    let b = Browser::start(&st.dir).await;
    let tag = tracker_tag(st.d.collector_port, "");
    let (pages, _server) = serve_pages(site(&tag, &tag), page("Page", "", &tag, CONTENT)).await;
    let delays = walk_broken(&b.client, pages, false).await;
    report.push(("collector stopped (no tracker.js)", delays));
    for (name, delays) in &report {
        eprintln!("form submit -> /thanks with the collector {name}: (page ms, wall ms) with sendBeacon {:?}, with fetch {:?}", delays[0], delays[1]);
    }
    assert_eq!(st.ch.number("SELECT count() FROM eventflow.facts WHERE kind != 'checkpoint'"), 0);
    b.close().await;
}

// -------------------------------------------------------------------------------------------
// 5. Attribution across a tracked redirect and a client-side navigation

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tracker_keeps_first_and_last_touch_through_redirect_and_spa_navigation() {
    let st = start_stack("tracker-utm");
    let tag = tracker_tag(st.d.collector_port, "");
    let (pages, _server) = serve_pages(site(&tag, &tag), page("Page", "", &tag, CONTENT)).await;
    let origin = format!("http://127.0.0.1:{pages}");

    let csv = st.dir.join("links.csv");
    std::fs::write(
        &csv,
        format!(
            "cid,client_id,destination,utm_source,utm_medium,utm_campaign,utm_term,utm_content\n\
             spring,acme,{origin}/event/summit,newsletter,email,spring-sale,,\n"
        ),
    )
    .expect("csv");
    let (code, out) = st.d.run(&["links", "import", csv.to_str().expect("path")]);
    assert_eq!(code, 0, "links import: {out}");
    // The collector refreshes its link cache every second.
    let r = format!("{}/r/spring", st.d.collector_url());
    eventually(Duration::from_secs(20), "the collector knows link spring", || {
        let r = r.clone();
        async move { http().get(&r).send().await.map(|x| x.status().as_u16()).ok() == Some(302) }
    })
    .await;

    let b = Browser::start(&st.dir).await;
    let c = &b.client;
    // First touch: an ad.
    c.goto(&format!("{origin}/event/summit?utm_source=google&utm_medium=cpc&utm_campaign=brand"))
        .await
        .expect("landing from the ad");
    wait_tracker(c).await;
    let sid = wait_cookie(c, "ef_sid").await;
    wait_cookie(c, "ef_utm").await;
    // Last touch: the newsletter's tracked link, redirected to the landing page.
    let t = Instant::now();
    c.goto(&r).await.expect("tracked link");
    wait_path(c, "/event/summit", t).await;
    let url = c.current_url().await.expect("url");
    assert_eq!(
        url.query(),
        Some("cid=spring&utm_source=newsletter&utm_medium=email&utm_campaign=spring-sale"),
        "{url}"
    );
    wait_tracker(c).await;
    // A client-side navigation drops the query string; then the visitor registers.
    js(c, "history.pushState({}, '', '/webinar/w1'); return 1;").await;
    assert_eq!(path(c).await, "/webinar/w1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    js(c, "eventflow.entry({entry_id: 'e-777', webinar_id: 'w1'}); return 1;").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(page_errors(c).await.is_empty(), "{:?}", page_errors(c).await);
    c.goto("about:blank").await.expect("blank");

    wait_rows(&st.ch, &facts_sql("entry"), 1).await;
    settle(&st.d).await;
    let visits = rows(&st.ch, &facts_sql("visit"));
    let entries = rows(&st.ch, &facts_sql("entry"));
    let v: Vec<(String, String, String, i64, String, i64)> = visits
        .iter()
        .map(|v| {
            (s(v, "page"), s(v, "path"), s(v, "cid"), n(v, "cid_resolved"), s(v, "utm_source"), n(v, "utm_inherited"))
        })
        .collect();
    let row = |p: &str, path: &str, cid: &str, res: i64, src: &str, inh: i64| {
        (p.into(), path.into(), cid.into(), res, src.into(), inh)
    };
    assert_eq!(
        v,
        vec![
            row("landing", "/event/summit", "", 0, "google", 0),
            row("landing", "/event/summit", "spring", 1, "newsletter", 0),
            row("webinar", "/webinar/w1", "spring", 1, "newsletter", 1),
        ]
    );
    for v in &visits {
        assert_eq!(s(v, "session_id"), sid);
    }
    assert_eq!((s(&visits[2], "utm_medium"), s(&visits[2], "utm_campaign")), ("email".into(), "spring-sale".into()));

    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!((s(e, "entry_id"), s(e, "webinar_id"), s(e, "session_id")), ("e-777".into(), "w1".into(), sid.clone()));
    assert_eq!(
        (
            s(e, "utm_source"),
            s(e, "utm_medium"),
            s(e, "utm_campaign"),
            s(e, "cid"),
            n(e, "cid_resolved"),
            n(e, "utm_inherited"),
        ),
        ("newsletter".into(), "email".into(), "spring-sale".into(), "spring".into(), 1, 1),
        "last touch"
    );
    assert_eq!(
        (s(e, "first_utm_source"), s(e, "first_utm_medium"), s(e, "first_utm_campaign")),
        ("google".into(), "cpc".into(), "brand".into()),
        "first touch"
    );
    let first_touch = n(e, "first_touch_ms");
    assert!(first_touch > 0 && first_touch <= n(&visits[1], "event_time_ms"), "first touch at {first_touch}");
    assert!((first_touch - n(&visits[0], "event_time_ms")).abs() < 5_000);

    let o = wait_overview(&st.d, "campaign spring", |o| {
        o["campaigns"].as_array().is_some_and(|c| c.iter().any(|r| r["cid"] == "spring" && r["entries"] == 1))
    })
    .await;
    eprintln!("overview campaigns: {}", o["campaigns"]);
    let spring: Vec<&Value> =
        o["campaigns"].as_array().expect("campaigns").iter().filter(|r| r["cid"] == "spring").collect();
    assert_eq!(
        spring,
        vec![&json!({"cid": "spring", "utm_source": "newsletter", "utm_medium": "email",
                     "utm_campaign": "spring-sale", "visits": 2, "entries": 1})]
    );
    assert!(o["campaigns"]
        .as_array()
        .expect("campaigns")
        .iter()
        .any(|r| { r["cid"] == "unresolved" && r["utm_source"] == "google" && r["visits"] == 1 }));
    assert_eq!(o["totals"]["linked_entries"], 1);
    b.close().await;
}

// -------------------------------------------------------------------------------------------
// 6. A page keeps its session past the session lifetime (issue 10)
//
// The collector runs with a 4-second session lifetime, so `ef_sid` expires while a page is
// open, as it does after 30 minutes in production.

const SHORT_LIFETIME: &str = "4s";
/// Longer than the lifetime: the browser has dropped `ef_sid` by then.
const PAST_LIFETIME: Duration = Duration::from_millis(6500);

/// Facts of `kind` the collector (accepted, rejected) so far, and its `missing_session_id`
/// rejections of any kind.
async fn outcomes(d: &Deployment, kind: &str) -> (f64, f64, f64) {
    let m = get_text(&format!("{}/metrics", d.collector_url())).await;
    let facts = |outcome: &str| {
        metric_value(&m, "eventflow_collector_facts_total", &[("type", kind), ("outcome", outcome)]).unwrap_or(0.0)
    };
    let missing = m
        .lines()
        .filter(|l| {
            l.starts_with("eventflow_collector_rejections_total{") && l.contains("reason=\"missing_session_id\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    (facts("accepted"), facts("rejected"), missing)
}

/// Waits until the collector has answered `n` facts of `kind` (accepted or rejected).
async fn wait_answered(d: &Deployment, kind: &str, n: f64) -> (f64, f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = outcomes(d, kind).await;
        if o.0 + o.1 >= n {
            return o;
        }
        assert!(Instant::now() < deadline, "the collector never answered {n} {kind} facts: {o:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tracker_registration_after_a_long_read_keeps_the_page_session() {
    let st =
        start_stack_with("tracker-long-read", &[("EVENTFLOW__COLLECTOR__SESSION_LIFETIME", SHORT_LIFETIME.into())]);
    let tag = tracker_tag(st.d.collector_port, "");
    let register_tag = tracker_tag(st.d.collector_port, r#" data-event-id="summit""#);
    let mut routes = site(&tag, &register_tag);
    let landing = format!(r#"<a id="to-register" href="/event/summit/register">Register</a>{CONTENT}"#);
    routes.push(("/event/summit".into(), page("Summit", "", &tag, &landing)));
    let (pages, _server) = serve_pages(routes, page("Page", "", &tag, CONTENT)).await;
    let b = Browser::start(&st.dir).await;
    let c = &b.client;

    // A fresh browser opens the landing page and reads it for longer than the session lifetime.
    c.goto(&format!("http://127.0.0.1:{pages}/event/summit")).await.expect("landing");
    wait_tracker(c).await;
    let sid = wait_cookie(c, "ef_sid").await;
    tokio::time::sleep(PAST_LIFETIME).await;
    assert_eq!(cookie(c, "ef_sid").await, None, "ef_sid has expired");
    // Then registers on that page.
    js(c, "eventflow.entry({entry_id: 'e-long-read'}); return 1;").await;
    let (accepted, rejected, missing) = wait_answered(&st.d, "entry", 1.0).await;
    assert_eq!((accepted, rejected, missing), (1.0, 0.0, 0.0), "the registration was accepted");
    assert_eq!(wait_cookie(c, "ef_sid").await, sid, "the collector renewed ef_sid with the page's session");

    // Reads again past the lifetime, then goes on to the registration page (a new page load in
    // the same tab) and registers there.
    tokio::time::sleep(PAST_LIFETIME).await;
    assert_eq!(cookie(c, "ef_sid").await, None, "ef_sid has expired again");
    let t = Instant::now();
    click(c, "#to-register").await;
    wait_path(c, "/event/summit/register", t).await;
    wait_tracker(c).await;
    let t = Instant::now();
    click(c, "#submit").await;
    wait_path(c, "/thanks", t).await;
    assert!(page_errors(c).await.is_empty(), "{:?}", page_errors(c).await);
    let (accepted, rejected, missing) = wait_answered(&st.d, "entry", 2.0).await;
    assert_eq!((accepted, rejected, missing), (2.0, 0.0, 0.0), "both registrations accepted");
    assert_eq!(cookie(c, "ef_sid").await, Some(sid.clone()), "one session for the whole visit");
    c.goto("about:blank").await.expect("blank");

    wait_rows(&st.ch, &facts_sql("entry"), 2).await;
    settle(&st.d).await;
    let visits = rows(&st.ch, &facts_sql("visit"));
    let entries = rows(&st.ch, &facts_sql("entry"));
    let v: Vec<(String, String, String)> =
        visits.iter().map(|v| (s(v, "path"), s(v, "session_id"), s(v, "session_origin"))).collect();
    assert_eq!(
        v,
        vec![
            ("/event/summit".into(), sid.clone(), "created".into()),
            ("/event/summit/register".into(), sid.clone(), "body".into()),
        ],
        "the registration page continued the tab's session"
    );
    let e: Vec<(String, String, String)> =
        entries.iter().map(|e| (s(e, "entry_id"), s(e, "event_id"), s(e, "session_id"))).collect();
    assert_eq!(
        e,
        vec![("e-long-read".into(), "summit".into(), sid.clone()), ("e-123".into(), "summit".into(), sid.clone())]
    );
    let o = wait_overview(&st.d, "two linked registrations", |o| {
        o["totals"]["entries"] == 2 && o["totals"]["linked_entries"] == 2
    })
    .await;
    eprintln!("overview totals: {}", o["totals"]);
    assert_eq!((o["totals"]["visits"].as_u64(), o["totals"]["unique_sessions"].as_u64()), (Some(2), Some(1)));
    assert_eq!(o["quality"]["session_link_rate"], 1.0);
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tracker_live_viewer_hidden_past_the_session_lifetime_counts_again() {
    let st =
        start_stack_with("tracker-long-hidden", &[("EVENTFLOW__COLLECTOR__SESSION_LIFETIME", SHORT_LIFETIME.into())]);
    let tag = tracker_tag(st.d.collector_port, "");
    let live_tag = tracker_tag(st.d.collector_port, r#" data-ping-interval="1000""#);
    let routes = vec![
        ("/webinar/w1/live".into(), page("Live w1", "", &live_tag, CONTENT)),
        // A page of the site without the tracker, to look at the site's cookies from another tab.
        ("/plain".into(), page("Plain", "", "", "<p>plain</p>")),
    ];
    let (pages, _server) = serve_pages(routes, page("Page", "", &tag, CONTENT)).await;
    let b = Browser::start(&st.dir).await;
    let c = &b.client;

    c.goto(&format!("http://127.0.0.1:{pages}/webinar/w1/live")).await.expect("live page");
    wait_tracker(c).await;
    let sid = wait_cookie(c, "ef_sid").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // The viewer switches to another tab for longer than the session lifetime.
    let main = c.window().await.expect("window");
    let other = c.new_window(true).await.expect("new tab");
    c.switch_to_window(other.handle).await.expect("switch");
    bring_to_front(c).await;
    c.goto(&format!("http://127.0.0.1:{pages}/plain")).await.expect("plain page");
    tokio::time::sleep(PAST_LIFETIME).await;
    assert_eq!(cookie(c, "ef_sid").await, None, "ef_sid has expired while the live tab was hidden");
    let (pings_before, rejected_before, _) = outcomes(&st.d, "ping").await;
    assert_eq!(rejected_before, 0.0);
    // ... and comes back.
    c.switch_to_window(main).await.expect("switch back");
    bring_to_front(c).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let log = js(c, "return window.visibilityLog;").await;
    let log = log.as_array().expect("visibility log").clone();
    assert_eq!(log.len(), 2, "hidden then visible: {log:?}");
    let visible_at = log[1][1].as_i64().expect("time");
    assert!(page_errors(c).await.is_empty(), "{:?}", page_errors(c).await);
    let (pings_after, rejected_after, missing) = outcomes(&st.d, "ping").await;
    eprintln!("pings accepted before hiding {pings_before}, after coming back {}", pings_after - pings_before);
    assert_eq!((rejected_after, missing), (0.0, 0.0), "no ping rejected after coming back");
    assert!(pings_after - pings_before >= 3.0, "pings after coming back: {}", pings_after - pings_before);
    assert_eq!(cookie(c, "ef_sid").await, Some(sid.clone()), "ef_sid renewed with the page's session");
    c.goto("about:blank").await.expect("blank");

    settle(&st.d).await;
    let pings = rows(&st.ch, &facts_sql("ping"));
    assert!(pings.iter().all(|p| s(p, "session_id") == sid), "one session: {pings:?}");
    let back = pings.iter().filter(|p| n(p, "received_at_ms") >= visible_at).count();
    assert!(back >= 3, "{back} pings stored after coming back");
    let (accepted, rejected, _) = outcomes(&st.d, "ping").await;
    assert_eq!((pings.len() as f64, rejected), (accepted, 0.0), "every ping accepted and stored");
    // The viewer is counted in the minutes after coming back as well.
    let minutes = st.ch.number(
        "SELECT uniqExact(toStartOfMinute(event_time)) FROM eventflow.facts FINAL \
         WHERE client_id = 'acme' AND kind = 'ping'",
    );
    let o = wait_overview(&st.d, "the live viewer-minutes", |o| o["live"][0]["viewer_minutes"] == minutes).await;
    assert_eq!(o["live"][0]["peak_concurrent"], 1, "{}", o["live"]);
    b.close().await;
}
