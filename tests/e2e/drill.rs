//! Live drill of the "visits stopped" alert on real scraped values.
//!
//! The pipeline runs with steady traffic for two clients; the test scrapes the processor's
//! `/metrics` once a second, stops one client's traffic, keeps scraping, and then feeds the
//! scraped `eventflow_visits_today` samples (one scrape = one minute of rule time) to
//! `promtool test rules` with the shipped rules: the alert must fire for the silent client only.

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use crate::faults::Traffic;
use crate::harness::*;

const BEFORE: usize = 40;
const AFTER: usize = 45;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visits_stopped_alert_fires_on_scraped_processor_metrics() {
    let dir = TestDir::new("drill");
    let ch = ClickHouse::start(&dir);
    let broker = Tansu::start(&dir);
    let d = Deployment::new(&dir, &ch.url(), &broker.brokers(), 3, "");
    d.migrate();
    let _collector = d.start("collector");
    let _processor = d.start("processor");
    let _api = d.start("api");

    let acme = Traffic::start(d.collector_url(), "acme", 100);
    let globex = Traffic::start(d.collector_url(), "globex", 100);
    let metrics = format!("{}/metrics", d.processor_url());
    // Let visits reach the aggregates before the first scrape.
    eventually(Duration::from_secs(60), "visits today for both clients", || {
        let m = metrics.clone();
        async move {
            let page = get_text(&m).await;
            metric_value(&page, "eventflow_visits_today", &[("client", "acme")]).unwrap_or(0.0) > 0.0
                && metric_value(&page, "eventflow_visits_today", &[("client", "globex")]).unwrap_or(0.0) > 0.0
        }
    })
    .await;

    let mut samples: Vec<(f64, f64)> = Vec::new();
    let mut acme = Some(acme);
    for i in 0..BEFORE + AFTER {
        if i == BEFORE {
            acme.take().expect("running").stop().await;
            eprintln!("acme's traffic stopped after {BEFORE} scrapes");
        }
        let page = get_text(&metrics).await;
        let value =
            |client| metric_value(&page, "eventflow_visits_today", &[("client", client)]).expect("series exported");
        samples.push((value("acme"), value("globex")));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    globex.stop().await;
    eprintln!(
        "scraped visits_today (acme, globex): first {:?}, at stop {:?}, last {:?}",
        samples[0],
        samples[BEFORE],
        samples[samples.len() - 1]
    );
    assert!(samples[BEFORE].0 - samples[0].0 >= 5.0, "acme had steady traffic before the stop");
    assert_eq!(samples[BEFORE + 5].0, samples[samples.len() - 1].0, "acme's visits stopped growing");

    let series =
        |pick: fn(&(f64, f64)) -> f64| samples.iter().map(|s| format!("{}", pick(s))).collect::<Vec<_>>().join(" ");
    let rules = repo().join("deploy/prometheus/rules.yml");
    let mut yaml = String::new();
    writeln!(yaml, "rule_files:\n  - {}\nevaluation_interval: 1m\ntests:", rules.display()).unwrap();
    for (name, eval, firing) in
        [("before the stop", BEFORE - 1, false), ("after 30 silent minutes + 5", BEFORE + 40, true)]
    {
        writeln!(yaml, "  - name: drill {name}\n    interval: 1m\n    input_series:").unwrap();
        writeln!(yaml, "      - series: 'eventflow_visits_today{{client=\"acme\",job=\"eventflow-processor\",instance=\"p1:8082\"}}'\n        values: '{}'", series(|s| s.0)).unwrap();
        writeln!(yaml, "      - series: 'eventflow_visits_today{{client=\"globex\",job=\"eventflow-processor\",instance=\"p1:8082\"}}'\n        values: '{}'", series(|s| s.1)).unwrap();
        writeln!(yaml, "    alert_rule_test:\n      - eval_time: {eval}m\n        alertname: EventflowVisitsStopped")
            .unwrap();
        if firing {
            writeln!(
                yaml,
                "        exp_alerts:\n          - exp_labels:\n              severity: warning\n              client: acme\n            exp_annotations:\n              summary: \"Visits stopped for client acme\"\n              description: \"Client acme has had no visit for 30 minutes after a steady flow (at least 5 visits in the half hour before). The tracker, the collector or the path to Kafka may have broken for this client.\"\n              runbook_url: \"https://github.com/eventflow/eventflow/blob/main/docs/runbooks/zero-visits.md#visits-stopped\""
            )
            .unwrap();
        } else {
            writeln!(yaml, "        exp_alerts: []").unwrap();
        }
    }
    let file = dir.join("drill-test.yml");
    std::fs::write(&file, &yaml).unwrap();
    let out = Command::new("promtool")
        .arg("test")
        .arg("rules")
        .arg(&file)
        .output()
        .expect("promtool (Debian package prometheus)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool on scraped values:\n{text}\n{yaml}");
    eprintln!("promtool: the alert fires for acme only\n{text}");
}
