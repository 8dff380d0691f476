//! The whole data path on real services: beacons over HTTP to the collector, Kafka (tansu),
//! the processor, ClickHouse 18.16, the reader API. Every number is asserted against values
//! worked out by hand below, not against what the code printed.

use std::time::Duration;

use chrono::{DateTime, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::{json, Value};

use crate::harness::*;

/// The most recent midnight of `tz` that is at least 30 minutes in the past, and the dates of
/// the days before (D1) and after (D2) it.
fn recent_midnight(tz: Tz) -> (DateTime<Utc>, String, String) {
    let now = Utc::now();
    let local_today = now.with_timezone(&tz).date_naive();
    let mut day = local_today;
    loop {
        let m = tz.from_local_datetime(&day.and_time(NaiveTime::MIN)).earliest().expect("midnight").with_timezone(&Utc);
        if now - m >= chrono::Duration::minutes(30) {
            let d1 = (day - chrono::Duration::days(1)).format("%Y-%m-%d").to_string();
            return (m, d1, day.format("%Y-%m-%d").to_string());
        }
        day -= chrono::Duration::days(1);
    }
}

fn at(m: DateTime<Utc>, seconds: i64) -> String {
    (m + chrono::Duration::seconds(seconds)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

async fn post(url: &str, body: Value, cookie: Option<&str>) -> (u16, Value, Vec<String>) {
    let mut req = http()
        .post(format!("{url}/v1/collect"))
        .header("content-type", "text/plain;charset=UTF-8")
        .body(body.to_string());
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let resp = req.send().await.expect("POST /v1/collect");
    let status = resp.status().as_u16();
    let cookies = resp.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap_or("").to_owned()).collect();
    (status, resp.json().await.unwrap_or(Value::Null), cookies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beacons_become_exact_overview_numbers() {
    let dir = TestDir::new("pipeline");
    let ch = ClickHouse::start(&dir);
    let broker = Tansu::start(&dir);
    let d = Deployment::new(&dir, &ch.url(), &broker.brokers(), 3, "");
    d.migrate();
    let _collector = d.start("collector");
    let _processor = d.start("processor");
    let _api = d.start("api");
    let c = d.collector_url();

    // ---- acme, Asia/Seoul, around midnight M (D1 = day before, D2 = day after) -------------
    let (m, d1, d2) = recent_midnight(chrono_tz::Asia::Seoul);
    let visit = |session: &str, page: &str, t: i64, extra: Value| {
        let mut v = json!({"type": "visit", "client_id": "acme", "page": page, "session_id": session, "ts": at(m, t)});
        match page {
            "landing" => v["event_id"] = json!("summit"),
            _ => v["webinar_id"] = json!("w1"),
        }
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    };
    let entry = |session: &str, id: &str, t: i64| json!({"type": "entry", "client_id": "acme", "entry_id": id, "webinar_id": "w1", "session_id": session, "ts": at(m, t)});
    let ping = |session: &str, t: i64| json!({"type": "ping", "client_id": "acme", "webinar_id": "w1", "session_id": session, "ts": at(m, t)});

    let batch = json!([
        // D1: s1 lands from the newsletter, the beacon is retried (same event_uid), browses to
        // the webinar page and registers (linked: it visited before registering).
        visit("s1", "landing", -540, json!({"event_uid": "u1", "utm": {"source": "newsletter", "medium": "email", "campaign": "fall"}})),
        visit("s1", "landing", -480, json!({"event_uid": "u1", "utm": {"source": "newsletter", "medium": "email", "campaign": "fall"}})),
        visit("s1", "webinar", -420, json!({"event_uid": "u2"})),
        entry("s1", "e1", -360),
        // D2: s2 registers at +1 min, opens the live page at +2 min (not linked: the visit is later).
        entry("s2", "e3", 60),
        visit("s2", "live", 120, json!({"event_uid": "u3"})),
        // Live viewers: minute +2 has s2 and s3 (s2 pings twice), minute +3 has s2 and s3.
        ping("s2", 130), ping("s2", 160), ping("s3", 140), ping("s2", 190), ping("s3", 210),
        // s5 lands from an ad with a campaign link id nobody knows: unresolved.
        visit("s5", "landing", 240, json!({"cid": "no-such-link", "utm": {"source": "ads", "medium": "cpc", "campaign": "spring"}})),
        // A registration whose session never visited: not linked.
        entry("s4", "e2", 300),
        // e1 again: deduplicated by entry_id.
        entry("s1", "e1", 360),
        // Bad facts in the same batch are rejected with a reason; the good ones are kept.
        {"type": "visit", "client_id": "acme", "page": "landing"},
        {"type": "teleport", "client_id": "acme"},
        {"type": "entry", "client_id": "acme", "entry_id": "e9", "webinar_id": "w1"},
    ]);
    let (status, body, _) = post(&c, batch, None).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 14);
    let reasons: Vec<(u64, String)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["reason"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(
        reasons,
        vec![(14, "missing_event_id".into()), (15, "unknown_type".into()), (16, "missing_session_id".into())]
    );

    // ---- globex, America/New_York: sessions from the ef_sid cookie ---------------------------
    let (mn, g1, g2) = recent_midnight(chrono_tz::America::New_York);
    let (status, body, cookies) = post(
        &c,
        json!({"type": "visit", "client_id": "globex", "page": "landing", "event_id": "launch", "ts": at(mn, -300)}),
        None,
    )
    .await;
    assert_eq!((status, body["accepted"].as_u64()), (202, Some(1)));
    let sid = cookies.iter().find(|c| c.starts_with("ef_sid=")).expect("collector creates ef_sid").clone();
    assert!(sid.contains("SameSite=Lax") && sid.contains("Max-Age=1800"), "{sid}");
    let cookie = sid.split(';').next().unwrap().to_owned();
    let (status, body, _) = post(
        &c,
        json!([
            {"type": "visit", "client_id": "globex", "page": "webinar", "webinar_id": "w9", "ts": at(mn, 300)},
            {"type": "entry", "client_id": "globex", "entry_id": "g-e1", "event_id": "launch", "ts": at(mn, 360)},
        ]),
        Some(&cookie),
    )
    .await;
    assert_eq!((status, body["accepted"].as_u64()), (202, Some(2)), "{body}");

    wait_processed(&d, 14 + 3, Duration::from_secs(90)).await;

    // ---- acme overview ----------------------------------------------------------------------
    let url = format!("{}/v1/clients/acme/statistics/overview?from={d1}&to={d2}", d.api_url());
    let (status, o) = get_json(&url, Some(ACME_TOKEN)).await;
    assert_eq!(status, 200, "{o}");
    assert_eq!(
        (o["from"].as_str(), o["to"].as_str(), o["timezone"].as_str()),
        (Some(d1.as_str()), Some(d2.as_str()), Some("Asia/Seoul"))
    );
    // Visits: s1 landing (retry counted once), s1 webinar, s2 live, s5 landing = 4.
    // Sessions with visits: s1, s2, s5 = 3. Entries e1, e3, e2 = 3 (e1's retry dropped); linked: e1 only.
    assert_eq!(
        o["totals"],
        json!({"visits": 4, "unique_sessions": 3, "entries": 3, "linked_entries": 1, "conversion_rate": 1.0})
    );
    assert_eq!(o["by_page"], json!({"landing": 2, "webinar": 1, "live": 1}));
    assert_eq!(
        o["by_day"],
        json!([
            {"date": d1, "visits": 2, "unique_sessions": 1, "entries": 1},
            {"date": d2, "visits": 2, "unique_sessions": 2, "entries": 2},
        ])
    );
    assert_eq!(
        o["campaigns"],
        json!([
            {"cid": "unresolved", "utm_source": "unknown", "utm_medium": "unknown", "utm_campaign": "unknown", "visits": 2, "entries": 3},
            {"cid": "unresolved", "utm_source": "ads", "utm_medium": "cpc", "utm_campaign": "spring", "visits": 1, "entries": 0},
            {"cid": "unresolved", "utm_source": "newsletter", "utm_medium": "email", "utm_campaign": "fall", "visits": 1, "entries": 0},
        ])
    );
    let peak = (m + chrono::Duration::minutes(2))
        .with_timezone(&chrono_tz::Asia::Seoul)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, false);
    assert_eq!(
        o["live"],
        json!([{"webinar_id": "w1", "peak_concurrent": 2, "peak_minute": peak, "viewer_minutes": 4}])
    );
    // Linked 1 of 3 entries; visits without utm.source: s1 webinar, s2 live = 2 of 4; no cid resolves.
    assert_eq!(
        o["quality"],
        json!({"session_link_rate": 0.3333, "utm_missing_ratio": 0.5, "unresolved_cid_ratio": 1.0})
    );
    for section in ["totals", "by_page", "by_day", "campaigns", "live", "quality"] {
        assert_eq!(o["meta"]["data_sources"][section], "aggregated", "{section}: {o}");
    }
    assert!(o["meta"]["watermark"].is_string(), "{o}");
    assert!(o["meta"]["staleness_seconds"].as_f64().unwrap() >= 0.0);
    assert!(o["meta"]["response_time_ms"].is_u64());

    // ---- globex overview --------------------------------------------------------------------
    let url = format!("{}/v1/clients/globex/statistics/overview?from={g1}&to={g2}", d.api_url());
    let (status, o) = get_json(&url, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{o}");
    // One cookie session: landing before midnight, webinar after, then a linked registration.
    assert_eq!(
        o["totals"],
        json!({"visits": 2, "unique_sessions": 1, "entries": 1, "linked_entries": 1, "conversion_rate": 1.0})
    );
    assert_eq!(
        o["by_day"],
        json!([
            {"date": g1, "visits": 1, "unique_sessions": 1, "entries": 0},
            {"date": g2, "visits": 1, "unique_sessions": 1, "entries": 1},
        ])
    );
    assert_eq!(o["by_page"], json!({"landing": 1, "webinar": 1, "live": 0}));

    // ---- tenancy ----------------------------------------------------------------------------
    let acme = format!("{}/v1/clients/acme/statistics/overview", d.api_url());
    assert_eq!(get_json(&acme, None).await.0, 401);
    assert_eq!(get_json(&acme, Some("not-a-token-at-all-000")).await.0, 401);
    assert_eq!(get_json(&acme, Some(GLOBEX_TOKEN)).await.0, 403);

    // ---- live series ------------------------------------------------------------------------
    let (status, s) =
        get_json(&format!("{}/v1/clients/acme/statistics/live/w1?from={d1}&to={d2}", d.api_url()), Some(ACME_TOKEN))
            .await;
    assert_eq!(status, 200);
    let series: Vec<u64> = s["series"].as_array().unwrap().iter().map(|p| p["concurrent"].as_u64().unwrap()).collect();
    assert_eq!(series, vec![2, 2]);
    assert_eq!(s["meta"]["data_sources"]["live"], "aggregated");

    // ---- raw and aggregates agree -----------------------------------------------------------
    let (code, out) = d.run(&["reconcile", "--from", &d1, "--to", &d2]);
    assert_eq!(code, 0, "{out}");

    // ---- metrics ----------------------------------------------------------------------------
    let cm = get_text(&format!("{}/metrics", d.collector_url())).await;
    assert_eq!(
        metric_value(&cm, "eventflow_collector_facts_total", &[("type", "visit"), ("outcome", "accepted")]),
        Some(7.0)
    );
    assert_eq!(
        metric_value(&cm, "eventflow_collector_rejections_total", &[("reason", "missing_session_id")]),
        Some(1.0)
    );
    let pm = get_text(&format!("{}/metrics", d.processor_url())).await;
    assert_eq!(
        metric_value(&pm, "eventflow_processor_facts_total", &[("type", "visit"), ("outcome", "duplicate")]),
        Some(1.0)
    );
    assert_eq!(metric_sum(&pm, "eventflow_processor_consumer_lag"), 0.0);
    assert!(metric_sum(&pm, "eventflow_processor_watermark_seconds") > 1.7e9);
    let am = get_text(&format!("{}/metrics", d.api_url())).await;
    assert!(
        am.contains(
            "eventflow_api_request_duration_seconds_bucket{route=\"/v1/clients/{client_id}/statistics/overview\""
        ),
        "{am}"
    );
}
