//! Clicks per tracked campaign link: `GET /r/{cid}` on the real collector, counted per link and
//! minute, written to ClickHouse 18.16 (`link_clicks`) every `collector.link_clicks_flush`,
//! and read back through the reader API's overview (`link_clicks`). The collector is killed
//! with SIGKILL midway: what it had written stays, what it had not is lost (documented), and
//! the restarted collector's clicks add to the old ones; a graceful stop writes what it counted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::collector::{click, import_links, random_cid};
use crate::harness::*;

/// Short enough for a quick test, long enough that the clicks sent right after a flush are
/// still unwritten when the collector is killed (see `kill_between_flushes`).
const FLUSH: Duration = Duration::from_secs(3);

fn collector_env() -> Vec<(&'static str, String)> {
    vec![
        ("EVENTFLOW__COLLECTOR__LINK_CLICKS_FLUSH", format!("{}ms", FLUSH.as_millis())),
        // Links imported later are found by reading through, not by a refresh.
        ("EVENTFLOW__COLLECTOR__LINKS_REFRESH", "1h".into()),
        ("EVENTFLOW__COLLECTOR__LINKS_LOOKUP_TIMEOUT", "10s".into()),
    ]
}

fn gauge(page: &str, metric: &str) -> f64 {
    metric_value(page, metric, &[]).unwrap_or(f64::NAN)
}

const UNWRITTEN: &str = "eventflow_collector_link_clicks_unwritten";
const LAST_FLUSH: &str = "eventflow_collector_link_click_last_flush_timestamp_seconds";

/// Clicks `cid` `n` times; returns how many were answered `302`.
async fn clicks(url: &str, cid: &str, n: u32) -> u64 {
    let mut redirected = 0;
    for _ in 0..n {
        if click(url, cid, None).await.0 == 302 {
            redirected += 1;
        }
    }
    redirected
}

/// Waits until the collector has written every click it counted (a successful flush that
/// started after this call).
async fn wait_written(collector: &str) {
    let metrics = format!("{collector}/metrics");
    let since = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    eventually(FLUSH * 4, "every counted click written to ClickHouse", || {
        let metrics = metrics.clone();
        async move {
            let page = get_text(&metrics).await;
            gauge(&page, UNWRITTEN) == 0.0 && gauge(&page, LAST_FLUSH) > since
        }
    })
    .await;
}

/// Clicks per cid in the overview of `client` (default range: the last 7 days, today included).
async fn overview_clicks(d: &Deployment, client: &str, token: &str) -> (BTreeMap<String, u64>, Value) {
    let (status, o) = get_json(&format!("{}/v1/clients/{client}/statistics/overview", d.api_url()), Some(token)).await;
    assert_eq!(status, 200, "{o}");
    let rows = o["link_clicks"].as_array().unwrap_or_else(|| panic!("no link_clicks: {o}"));
    let per = rows.iter().map(|r| (r["cid"].as_str().unwrap().to_owned(), r["clicks"].as_u64().unwrap())).collect();
    (per, o)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clicks_per_link_survive_a_collector_crash_up_to_the_last_flush() {
    let dir = TestDir::new("link-clicks");
    let ch = ClickHouse::start(&dir);
    let broker = Tansu::start(&dir);
    let d = Deployment::new(&dir, &ch.url(), &broker.brokers(), 1, "");
    d.migrate();
    import_links(
        &d,
        &dir,
        "before.csv",
        "spring,acme,https://site.test/event/spring,news,email,spring,,\n\
         g1,globex,https://globex.test/e,,,,,\n",
    );
    let mut collector = d.start_with("collector", &collector_env());
    let _api = d.start("api");
    let c = d.collector_url();

    // Expected clicks per link, counted here from the answers: a click counts when it was
    // answered 302 and written before the crash, or sent after the restart.
    let mut want: BTreeMap<(&str, &str), u64> = BTreeMap::new();

    // ---- Phase 1: clicks on two acme links (one imported after the collector started, found
    // by reading through), a globex link, and unknown cids. All written. ----
    import_links(&d, &dir, "after.csv", "fall,acme,https://site.test/event/fall,ads,cpc,fall,,\n");
    *want.entry(("acme", "spring")).or_default() += clicks(&c, "spring", 7).await;
    *want.entry(("acme", "fall")).or_default() += clicks(&c, "fall", 4).await;
    *want.entry(("globex", "g1")).or_default() += clicks(&c, "g1", 2).await;
    let unknown = random_cid("nope");
    for cid in [unknown.as_str(), unknown.as_str(), &random_cid("nope"), "bad%20cid", &"x".repeat(200)] {
        assert_eq!(click(&c, cid, None).await.0, 404, "{cid}");
    }
    assert_eq!(want.values().sum::<u64>(), 13, "every known link answered 302: {want:?}");
    wait_written(&c).await;

    // ---- Phase 2: right after a flush, more clicks, then SIGKILL before the next flush. ----
    let metrics = format!("{c}/metrics");
    let before = gauge(&get_text(&metrics).await, LAST_FLUSH);
    eventually(FLUSH * 3, "the next flush", || {
        let metrics = metrics.clone();
        async move { gauge(&get_text(&metrics).await, LAST_FLUSH) > before }
    })
    .await;
    let flushed_at = Instant::now();
    let lost = clicks(&c, "spring", 3).await + clicks(&c, "fall", 2).await;
    assert_eq!(lost, 5);
    let page = get_text(&metrics).await;
    let elapsed = flushed_at.elapsed();
    assert!(elapsed < FLUSH / 2, "the clicks took {elapsed:?}; the next flush may have written them");
    assert_eq!(gauge(&page, UNWRITTEN), 5.0, "counted, not yet written");
    collector.kill9();
    eprintln!("killed {elapsed:?} after a flush, with {lost} clicks unwritten");

    // ---- Phase 3: a new collector process; its clicks add to the old ones. ----
    let mut collector = d.start_with("collector", &collector_env());
    *want.entry(("acme", "spring")).or_default() += clicks(&c, "spring", 2).await;
    *want.entry(("acme", "fall")).or_default() += clicks(&c, "fall", 1).await;
    *want.entry(("globex", "g1")).or_default() += clicks(&c, "g1", 1).await;
    assert_eq!(click(&c, &unknown, None).await.0, 404);
    let page = get_text(&metrics).await;
    assert_eq!(
        metric_value(&page, "eventflow_collector_link_clicks_total", &[("outcome", "redirected")]),
        Some(4.0),
        "the new process counted its own redirects"
    );
    wait_written(&c).await;

    // Worked out by hand: spring 7 + 2 = 9, fall 4 + 1 = 5 (the 5 unwritten clicks are lost),
    // g1 2 + 1 = 3; unknown cids are nowhere.
    let acme: BTreeMap<String, u64> =
        want.iter().filter(|((c, _), _)| *c == "acme").map(|((_, cid), n)| ((*cid).to_owned(), *n)).collect();
    assert_eq!(acme, BTreeMap::from([("fall".to_owned(), 5), ("spring".to_owned(), 9)]));
    let (got, o) = overview_clicks(&d, "acme", ACME_TOKEN).await;
    assert_eq!(got, acme, "{o}");
    assert_eq!(o["link_clicks"][0], json!({"cid": "spring", "clicks": 9}), "most clicks first: {o}");
    assert_eq!(o["meta"]["data_sources"]["link_clicks"], "aggregated", "{o}");
    let (got, o) = overview_clicks(&d, "globex", GLOBEX_TOKEN).await;
    assert_eq!(got, BTreeMap::from([("g1".to_owned(), want[&("globex", "g1")])]), "{o}");
    assert_eq!(want[&("globex", "g1")], 3);

    // ---- Phase 4: a graceful stop (SIGTERM) writes what was counted since the last flush. ----
    let page = get_text(&metrics).await;
    let before = gauge(&page, LAST_FLUSH);
    assert_eq!(clicks(&c, "fall", 2).await, 2);
    assert!(collector.stop(Duration::from_secs(30)).is_some_and(|s| s.success()), "the collector stopped by itself");
    let stopped_at = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    assert!(stopped_at - before < FLUSH.as_secs_f64() * 2.0, "stopped within the interval");
    *want.entry(("acme", "fall")).or_default() += 2;
    let (got, o) = overview_clicks(&d, "acme", ACME_TOKEN).await;
    assert_eq!(got, BTreeMap::from([("fall".to_owned(), 7), ("spring".to_owned(), 9)]), "{o}");
    let _collector = d.start_with("collector", &collector_env());

    // The table holds both processes' counts, under two boot ids, and only known links.
    let rows = ch.json_rows(
        "SELECT cid, uniqExact(boot_id) AS boots FROM eventflow.link_clicks WHERE client_id = 'acme' \
         GROUP BY cid ORDER BY cid",
    );
    let boots: Vec<(String, String)> = rows.iter().map(|r| (col(r, "cid"), col(r, "boots"))).collect();
    assert_eq!(boots, [("fall".to_owned(), "2".to_owned()), ("spring".to_owned(), "2".to_owned())]);
    assert_eq!(ch.number("SELECT count() FROM eventflow.link_clicks WHERE cid NOT IN ('spring', 'fall', 'g1')"), 0);

    // ClickHouse down: the section is error with no rows, the response still 200; the
    // collector keeps redirecting, counts the failed flushes and keeps the clicks unwritten.
    drop(ch);
    let (status, o) = get_json(&format!("{}/v1/clients/acme/statistics/overview", d.api_url()), Some(ACME_TOKEN)).await;
    assert_eq!(status, 200, "{o}");
    assert_eq!(
        (o["meta"]["data_sources"]["link_clicks"].clone(), o["link_clicks"].clone()),
        (json!("error"), json!([]))
    );
    assert_eq!(click(&c, "spring", None).await.0, 302, "a cached link redirects without ClickHouse");
    eventually(FLUSH * 4, "a failed flush counted", || {
        let metrics = metrics.clone();
        async move {
            let page = get_text(&metrics).await;
            gauge(&page, "eventflow_collector_link_click_flush_errors_total") >= 1.0 && gauge(&page, UNWRITTEN) == 1.0
        }
    })
    .await;
}
