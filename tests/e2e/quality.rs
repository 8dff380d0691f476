//! The data-quality gauges of the reader API (`eventflow_session_link_rate{client}`,
//! `eventflow_utm_missing_ratio{client}`) have a sample for every client with data today, not
//! only for configured ones, and at most `api.quality_max_clients` per-client series: the clients
//! with fewer visits beyond the cap are folded into `client="_other"`.
//!
//! Three clients that are not configured send facts now (today in Asia/Seoul, the default time
//! zone). By hand:
//! - initech: visits s1 landing (utm newsletter), s1 webinar, s2 landing = 3, 2 without
//!   utm.source; entries e1 (s1, after its visits: linked), e2 (s9, no visit) = 2, 1 linked.
//!   Link rate 1/2, UTM missing 2/3.
//! - umbrella: visits s1, s2 with utm = 2, none missing; no entry. Link rate 1 (no entries), 0.
//! - hooli: visit s1 without utm = 1; entry e1 of s2 (no visit) = 1, 0 linked. Link rate 0, 1.
//!
//! With a cap of 3, the configured acme and globex (no data: 1 and 0) and initech, the client
//! with the most visits, keep their series; umbrella and hooli are folded into `_other`:
//! visits 3 (1 without UTM), entries 1 (0 linked): link rate 0, UTM missing 1/3.

use std::time::Duration;

use chrono::{NaiveTime, Utc};
use serde_json::{json, Value};

use crate::api_contract::start_pipeline;
use crate::harness::*;

const LINK: &str = "eventflow_session_link_rate";
const UTM: &str = "eventflow_utm_missing_ratio";

/// Every `metric{client=...}` sample of a metrics page, by client.
fn by_client(page: &str, metric: &str) -> Vec<(String, f64)> {
    let prefix = format!("{metric}{{client=\"");
    let mut out: Vec<(String, f64)> = page
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (client, value) = rest.split_once("\"} ")?;
            Some((client.to_owned(), value.parse().ok()?))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn approx(actual: &[(String, f64)], expected: &[(&str, f64)]) -> bool {
    actual.len() == expected.len()
        && actual.iter().zip(expected).all(|((c, v), (ec, ev))| c == ec && (v - ev).abs() < 1e-9)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quality_gauges_cover_unconfigured_clients_up_to_the_cap() {
    // The gauges are about today (Asia/Seoul for unconfigured clients): keep the test away from
    // a day boundary.
    loop {
        let clock = Utc::now().with_timezone(&chrono_tz::Asia::Seoul).time();
        if clock > NaiveTime::from_hms_opt(0, 2, 0).expect("time")
            && clock < NaiveTime::from_hms_opt(23, 55, 0).expect("time")
        {
            break;
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    // Unknown clients are refused by default; this test is about them.
    let mut p = start_pipeline("quality-gauges", "\n[tenancy]\nallow_unknown_clients = true\n").await;
    let now = Utc::now();
    let at = |s: i64| (now - chrono::Duration::seconds(s)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let visit = |client: &str, session: &str, page: &str, utm: bool, s: i64| {
        let mut v = json!({"type": "visit", "client_id": client, "page": page, "session_id": session, "ts": at(s)});
        if page == "landing" {
            v["event_id"] = json!("e");
        } else {
            v["webinar_id"] = json!("w");
        }
        if utm {
            v["utm"] = json!({"source": "newsletter"});
        }
        v
    };
    let entry = |client: &str, session: &str, id: &str, s: i64| {
        json!({"type": "entry", "client_id": client, "entry_id": id, "webinar_id": "w", "session_id": session,
               "ts": at(s)})
    };
    let facts = vec![
        visit("initech", "s1", "landing", true, 60),
        visit("initech", "s1", "webinar", false, 50),
        visit("initech", "s2", "landing", false, 40),
        entry("initech", "s1", "e1", 30),
        entry("initech", "s9", "e2", 30),
        visit("umbrella", "s1", "landing", true, 60),
        visit("umbrella", "s2", "landing", true, 60),
        visit("hooli", "s1", "landing", false, 60),
        entry("hooli", "s2", "e1", 30),
    ];
    let n = facts.len() as u64;
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

    // Default cap (1000): every client seen today has its own samples, configured ones too.
    let metrics = format!("{}/metrics", p.d.api_url());
    let want_link = [("acme", 1.0), ("globex", 1.0), ("hooli", 0.0), ("initech", 0.5), ("umbrella", 1.0)];
    let want_utm = [("acme", 0.0), ("globex", 0.0), ("hooli", 1.0), ("initech", 2.0 / 3.0), ("umbrella", 0.0)];
    let mut page = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        page = get_text(&metrics).await;
        if approx(&by_client(&page, LINK), &want_link) && approx(&by_client(&page, UTM), &want_utm) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        (by_client(&page, LINK), by_client(&page, UTM)),
        (
            want_link.iter().map(|(c, v)| (c.to_string(), *v)).collect(),
            want_utm.iter().map(|(c, v)| (c.to_string(), *v)).collect()
        ),
        "quality gauges with the default cap"
    );
    assert_eq!(metric_value(&page, "eventflow_api_quality_clients_folded", &[]), Some(0.0));

    // A cap of 3 series: the two configured clients and initech (most visits); the rest folded.
    p.api.stop(Duration::from_secs(20));
    p.api = p.d.start_with("api", &[("EVENTFLOW__API__QUALITY_MAX_CLIENTS", "3".into())]);
    let want_link = [("_other", 0.0), ("acme", 1.0), ("globex", 1.0), ("initech", 0.5)];
    let want_utm = [("_other", 1.0 / 3.0), ("acme", 0.0), ("globex", 0.0), ("initech", 2.0 / 3.0)];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        page = get_text(&metrics).await;
        if approx(&by_client(&page, LINK), &want_link) && approx(&by_client(&page, UTM), &want_utm) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        (by_client(&page, LINK), by_client(&page, UTM)),
        (
            want_link.iter().map(|(c, v)| (c.to_string(), *v)).collect(),
            want_utm.iter().map(|(c, v)| (c.to_string(), *v)).collect()
        ),
        "quality gauges with quality_max_clients = 3"
    );
    assert_eq!(metric_value(&page, "eventflow_api_quality_clients_folded", &[]), Some(2.0));
}
