//! "Say it when the numbers are in doubt": when the continuous reconcile has confirmed that an
//! aggregate differs from the raw recount for a client day, the overview's `meta.doubt` names
//! that day and figure with both values and the time of the check, until a later reconcile pass
//! finds the day clean again (here: after `eventflow backfill`).
//!
//! The mismatch is real: one `daily_totals` row of acme's day is altered in ClickHouse (its
//! visits increased by 1000 on one Kafka partition). `totals`, `by_day`, `by_page` and `quality`
//! still read that table, so the overview serves the wrong visits from aggregates; only
//! `campaigns` notices the disagreement with `daily_marketing` and is recounted from raw facts.
//! Expected values: the raw recount is the 6 visits worked out by hand in
//! `api_contract::send_known_facts`, the aggregate 1006.
//!
//! The helpers are shared with the dashboard test (`dashboard.rs`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::api_contract::{send_known_facts, start_pipeline, Known, Pipeline};
use crate::harness::*;

/// What the altered row adds to acme's visits of the day.
pub const INFLATION: u64 = 1000;
/// The visits of acme's day, by hand (`send_known_facts`).
pub const RAW_VISITS: u64 = 6;

/// Restarts the processor with the continuous reconcile every second and waits until it owns
/// every partition (a processor taking partitions over rewrites their open buckets first, which
/// could undo a change made before).
pub async fn reconcile_every_second(p: &mut Pipeline) {
    p.processor.stop(Duration::from_secs(20));
    p.processor = p.d.start_with("processor", &[("EVENTFLOW__PROCESSOR__RECONCILE_INTERVAL", "1s".into())]);
    let metrics = format!("{}/metrics", p.d.processor_url());
    eventually(Duration::from_secs(60), "the restarted processor owns every partition", || async {
        get_text(&metrics).await.lines().filter(|l| l.starts_with("eventflow_processor_consumer_lag{")).count() == 9
    })
    .await;
}

/// Waits until the continuous reconcile has completed a pass that started after `since`.
pub async fn reconcile_pass_after(p: &Pipeline, since: DateTime<Utc>) {
    let metrics = format!("{}/metrics", p.d.processor_url());
    let since = since.timestamp() as f64 + 1.0;
    eventually(Duration::from_secs(90), "a continuous reconcile pass", || async {
        metric_value(&get_text(&metrics).await, "eventflow_reconcile_last_run_timestamp_seconds", &[])
            .is_some_and(|t| t > since)
    })
    .await;
}

/// Adds [`INFLATION`] visits to acme's `daily_totals` row of `day` on one Kafka partition (an
/// `ALTER TABLE ... UPDATE` mutation) and waits until the aggregate reads the altered value.
pub async fn inflate_visits(p: &Pipeline, day: &str) {
    let partition = p.ch().number(&format!(
        "SELECT kafka_partition FROM eventflow.daily_totals FINAL \
         WHERE client_id = 'acme' AND day = '{day}' AND visits > 0 ORDER BY kafka_partition LIMIT 1"
    ));
    p.ch()
        .query(&format!(
            "ALTER TABLE eventflow.daily_totals UPDATE visits = visits + {INFLATION} \
             WHERE client_id = 'acme' AND day = '{day}' AND kafka_partition = {partition}"
        ))
        .expect("mutation");
    let sum =
        format!("SELECT sum(visits) FROM eventflow.daily_totals FINAL WHERE client_id = 'acme' AND day = '{day}'");
    eventually(Duration::from_secs(30), "the altered daily_totals row", || async {
        p.ch().number(&sum) == RAW_VISITS + INFLATION
    })
    .await;
}

/// The overview of acme's default range (acme's token).
pub async fn overview(p: &Pipeline) -> Value {
    let (status, o) =
        get_json(&format!("{}/v1/clients/acme/statistics/overview", p.d.api_url()), Some(ACME_TOKEN)).await;
    assert_eq!(status, 200, "{o}");
    o
}

/// Waits until the overview's `meta.doubt` lists a day, and returns the overview.
pub async fn wait_for_doubt(p: &Pipeline) -> Value {
    let mut last = Value::Null;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while std::time::Instant::now() < deadline {
        last = overview(p).await;
        if last["meta"]["doubt"]["days"].as_array().is_some_and(|d| !d.is_empty()) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("meta.doubt never listed a day: {last}");
}

fn time(v: &Value) -> DateTime<Utc> {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{s}: {e}")).with_timezone(&Utc)
}

/// Sets up the mismatch of the module docs: returns the known facts, the overview listing the
/// day in doubt, and when the row was altered.
pub async fn pipeline_with_a_day_in_doubt(name: &str) -> (Pipeline, Known, Value, DateTime<Utc>) {
    let mut p = start_pipeline(name, "").await;
    let known = send_known_facts(&p).await;
    reconcile_every_second(&mut p).await;
    let before = Utc::now();
    reconcile_pass_after(&p, before).await;
    let o = overview(&p).await;
    assert!(o["meta"].get("doubt").is_none(), "a clean pass leaves nothing in doubt: {}", o["meta"]);

    let altered = Utc::now();
    inflate_visits(&p, &known.day).await;
    let o = wait_for_doubt(&p).await;
    (p, known, o, altered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overview_meta_names_days_in_doubt_until_a_clean_reconcile_pass() {
    let (p, known, o, altered) = pipeline_with_a_day_in_doubt("doubt").await;
    let found = Utc::now();

    // The overview still serves the altered aggregate for totals (this is why it must say so).
    assert_eq!(o["totals"]["visits"], json!(RAW_VISITS + INFLATION), "{o}");
    assert_eq!(o["meta"]["data_sources"]["totals"], "aggregated", "{o}");
    assert_eq!(o["meta"]["data_sources"]["campaigns"], "raw", "campaigns cross-check daily_totals: {o}");

    // Exactly that day and figure, with both values and when it was checked.
    let doubt = &o["meta"]["doubt"];
    let days = doubt["days"].as_array().expect("days");
    assert_eq!(days.len(), 1, "{doubt}");
    let day = &days[0];
    let checked = time(&day["checked_at"]);
    assert!(checked >= altered - chrono::Duration::seconds(1) && checked <= found, "checked at {checked}: {doubt}");
    assert_eq!(doubt["checked_at"], day["checked_at"], "{doubt}");
    let mut without_time = day.clone();
    without_time.as_object_mut().expect("object").remove("checked_at");
    assert_eq!(
        without_time,
        json!({
            "date": known.day,
            "pending_backfill": false,
            "figures_total": 1,
            "figures": [{"metric": "visits", "key": "", "aggregate": RAW_VISITS + INFLATION, "raw": RAW_VISITS}],
        }),
        "{doubt}"
    );
    // The same confirmed mismatch the processor exports.
    let page = get_text(&format!("{}/metrics", p.d.processor_url())).await;
    assert_eq!(
        metric_value(&page, "eventflow_reconcile_mismatch", &[("client", "acme"), ("metric", "visits")]),
        Some(1.0)
    );
    // Another client's overview knows nothing of acme's doubt.
    let (_, g) =
        get_json(&format!("{}/v1/clients/globex/statistics/overview", p.d.api_url()), Some(GLOBEX_TOKEN)).await;
    assert!(g["meta"].get("doubt").is_none(), "{g}");
    // A range without that day carries no doubt.
    let (_, other) = get_json(
        &format!("{}/v1/clients/acme/statistics/overview?from=2020-01-01&to=2020-01-07", p.d.api_url()),
        Some(ACME_TOKEN),
    )
    .await;
    assert!(other["meta"].get("doubt").is_none(), "{other}");

    // Backfill makes the aggregate equal the raw recount again; the next clean pass clears the doubt.
    let (code, out) = p.d.run(&["backfill", "--from", &known.day, "--to", &known.day, "--client", "acme"]);
    assert_eq!(code, 0, "backfill: {out}");
    assert_eq!(overview(&p).await["totals"]["visits"], json!(RAW_VISITS));
    wait_for_no_doubt(&p).await;
    let o = overview(&p).await;
    assert_eq!(
        (o["totals"]["visits"].clone(), o["meta"]["data_sources"]["campaigns"].clone()),
        (json!(6), json!("aggregated"))
    );
}

/// Waits until the overview's `meta` no longer carries `doubt` (a later reconcile pass found the
/// day clean).
pub async fn wait_for_no_doubt(p: &Pipeline) {
    let mut last = Value::Null;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while std::time::Instant::now() < deadline {
        last = overview(p).await;
        if last["meta"].get("doubt").is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("meta.doubt still lists a day after the backfill: {}", last["meta"]);
}
