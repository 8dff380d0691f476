//! `eventflow simulate`: a realistic synthetic day of traffic, sent over HTTP like browsers do.
//!
//! Visitors arrive spread over the last hours (client timestamps in the past, within the
//! allowed lateness), some through tracked campaign links or UTM-tagged URLs, some directly.
//! They land on `/event/{path}`, browse to `/webinar/{id}` (the query string is gone, so
//! attribution comes from the `ef_utm` cookie), a share registers, and some registrants watch
//! the live page with a ping every 30 s. A few beacons are retried (same `event_uid`), and a few
//! registrations come from server-side integrations with their own session id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Collector base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub collector: String,
    /// Client ids to simulate (default: the configured clients, or acme,globex).
    #[arg(long, value_delimiter = ',')]
    pub clients: Vec<String>,
    /// Visitors per client.
    #[arg(long, default_value_t = 400)]
    pub visitors: usize,
    /// Hours of the past the visits are spread over.
    #[arg(long, default_value_t = 20)]
    pub hours: i64,
    /// Campaign link ids to use for tracked-link arrivals (`cid` of `eventflow links import`).
    #[arg(long, value_delimiter = ',')]
    pub links: Vec<String>,
    /// Random seed (same seed, same traffic).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Concurrent visitors in flight.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    facts: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    failed_requests: AtomicU64,
}

/// A browser: its cookies and the collector.
struct Browser {
    http: reqwest::Client,
    base: String,
    cookies: HashMap<String, String>,
    counters: Arc<Counters>,
}

impl Browser {
    fn cookie_header(&self) -> String {
        self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ")
    }

    fn remember(&mut self, resp: &reqwest::Response) {
        for v in resp.headers().get_all(reqwest::header::SET_COOKIE) {
            if let Some((k, rest)) = v.to_str().unwrap_or("").split_once('=') {
                let value = rest.split(';').next().unwrap_or("").to_owned();
                self.cookies.insert(k.trim().to_owned(), value);
            }
        }
    }

    async fn send(&mut self, facts: Vec<Value>) {
        let n = facts.len() as u64;
        let body = if facts.len() == 1 { facts[0].to_string() } else { Value::Array(facts).to_string() };
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.counters.facts.fetch_add(n, Ordering::Relaxed);
        let req = self
            .http
            .post(format!("{}/v1/collect", self.base))
            .header("content-type", "text/plain;charset=UTF-8")
            .header("cookie", self.cookie_header())
            .body(body);
        match req.send().await {
            Ok(resp) => {
                self.remember(&resp);
                let status = resp.status();
                let v: Value = resp.json().await.unwrap_or_default();
                if status.as_u16() == 202 {
                    self.counters.accepted.fetch_add(v["accepted"].as_u64().unwrap_or(0), Ordering::Relaxed);
                    self.counters
                        .rejected
                        .fetch_add(v["rejected"].as_array().map_or(0, |a| a.len() as u64), Ordering::Relaxed);
                } else {
                    self.counters.failed_requests.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                self.counters.failed_requests.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Follows a tracked link (`GET /r/{cid}`) without following the redirect; returns the query
    /// of the destination so the landing beacon sees the UTM parameters like a browser would.
    async fn click(&mut self, cid: &str) -> Option<String> {
        let resp =
            self.http.get(format!("{}/r/{cid}", self.base)).header("cookie", self.cookie_header()).send().await.ok()?;
        self.remember(&resp);
        let location = resp.headers().get(reqwest::header::LOCATION)?.to_str().ok()?.to_owned();
        Some(location.split_once('?').map(|(_, q)| q.to_owned()).unwrap_or_default())
    }
}

fn utm_from_query(q: &str) -> Value {
    let mut utm = serde_json::Map::new();
    let mut cid = None;
    for pair in q.split('&') {
        if let Some((k, v)) = pair.split_once('=') {
            let v = v.replace("%20", " ");
            if let Some(name) = k.strip_prefix("utm_") {
                utm.insert(name.to_owned(), json!(v));
            } else if k == "cid" {
                cid = Some(v);
            }
        }
    }
    json!({"utm": utm, "cid": cid})
}

const SOURCES: [(&str, &str, &str); 4] = [
    ("newsletter", "email", "fall-launch"),
    ("google", "cpc", "brand"),
    ("linkedin", "social", "webinar-series"),
    ("partner", "referral", "co-marketing"),
];

fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// One visitor's journey.
async fn visitor(mut b: Browser, client: String, n: usize, seed: u64, hours: i64, links: Vec<String>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let now = chrono::Utc::now().timestamp_millis();
    let mut t = now - rng.random_range(10 * 60_000..hours.max(1) * 3_600_000);
    let event = format!("{client}-summit");
    let webinar = format!("{client}-w{}", rng.random_range(1..=2));

    // Arrival: tracked link, tagged URL, or direct.
    let arrival = rng.random_range(0..100);
    let mut attribution = json!({"utm": {}, "cid": null});
    if arrival < 25 && !links.is_empty() {
        let cid = &links[rng.random_range(0..links.len())];
        if let Some(q) = b.click(cid).await {
            attribution = utm_from_query(&q);
        }
    } else if arrival < 65 {
        let (s, m, c) = SOURCES[rng.random_range(0..SOURCES.len())];
        attribution = json!({"utm": {"source": s, "medium": m, "campaign": c}, "cid": null});
    }
    let uid = format!("{client}-v{n}-landing");
    let mut landing = json!({"type": "visit", "client_id": client, "page": "landing", "event_id": event,
        "path": format!("/event/{event}"), "event_uid": uid, "ts": iso(t)});
    if !attribution["utm"].as_object().is_none_or(|u| u.is_empty()) {
        landing["utm"] = attribution["utm"].clone();
    }
    if let Some(cid) = attribution["cid"].as_str() {
        landing["cid"] = json!(cid);
    }
    b.send(vec![landing.clone()]).await;
    if rng.random_range(0..100) < 4 {
        // A retried beacon: same event_uid, counted once.
        b.send(vec![landing]).await;
    }

    // Client-side navigation to the webinar page: no query string any more.
    if rng.random_range(0..100) < 55 {
        t += rng.random_range(20_000..300_000);
        b.send(vec![json!({"type": "visit", "client_id": client, "page": "webinar", "webinar_id": webinar,
            "path": format!("/webinar/{webinar}"), "event_uid": format!("{client}-v{n}-webinar"), "ts": iso(t)})])
            .await;
        if rng.random_range(0..100) < 45 {
            t += rng.random_range(30_000..600_000);
            b.send(vec![json!({"type": "entry", "client_id": client, "entry_id": format!("{client}-e{n}"),
                "webinar_id": webinar, "ts": iso(t)})])
                .await;
            if rng.random_range(0..100) < 60 {
                // Watching live: the page view, then a ping every 30 s while visible.
                t += rng.random_range(60_000..1_800_000);
                let t_live = t.min(now - 60_000);
                b.send(vec![json!({"type": "visit", "client_id": client, "page": "live", "webinar_id": webinar,
                    "path": format!("/webinar/{webinar}/live"), "event_uid": format!("{client}-v{n}-live"), "ts": iso(t_live)})])
                .await;
                let minutes = rng.random_range(5..45);
                let pings: Vec<Value> = (0..minutes * 2)
                    .map(|i| json!({"type": "ping", "client_id": client, "webinar_id": webinar, "ts": iso((t_live + i * 30_000).min(now))}))
                    .collect();
                for chunk in pings.chunks(100) {
                    b.send(chunk.to_vec()).await;
                }
            }
        }
    }
    // Registrations from a server-side integration: their own session, often without a visit.
    if rng.random_range(0..100) < 3 {
        b.send(vec![
            json!({"type": "entry", "client_id": client, "entry_id": format!("{client}-crm-{n}"), "event_id": event,
            "session_id": format!("crm-{client}-{n}"), "ts": iso(now - rng.random_range(60_000..3_600_000))}),
        ])
        .await;
    }
}

pub async fn run(cfg: &Config, args: Args) -> anyhow::Result<()> {
    let clients: Vec<String> = if !args.clients.is_empty() {
        args.clients.clone()
    } else if !cfg.clients.is_empty() {
        cfg.clients.keys().cloned().collect()
    } else {
        vec!["acme".into(), "globex".into()]
    };
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(args.concurrency)
        .build()
        .context("http client")?;
    let counters = Arc::new(Counters::default());
    let started = std::time::Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut tasks = Vec::new();
    for (ci, client) in clients.iter().enumerate() {
        for n in 0..args.visitors {
            let permit = sem.clone().acquire_owned().await?;
            let b = Browser {
                http: http.clone(),
                base: args.collector.trim_end_matches('/').to_owned(),
                cookies: HashMap::new(),
                counters: counters.clone(),
            };
            let seed = args.seed.wrapping_mul(1_000_003).wrapping_add((ci * 1_000_000 + n) as u64);
            let client = client.clone();
            let links = args.links.clone();
            let hours = args.hours;
            tasks.push(tokio::spawn(async move {
                visitor(b, client, n, seed, hours, links).await;
                drop(permit);
            }));
        }
    }
    for t in tasks {
        t.await?;
    }
    let c = &counters;
    println!(
        "simulated {} visitors of {} clients in {:.1}s: {} requests, {} facts sent, {} accepted, {} rejected, {} failed requests",
        args.visitors * clients.len(),
        clients.len(),
        started.elapsed().as_secs_f64(),
        c.requests.load(Ordering::Relaxed),
        c.facts.load(Ordering::Relaxed),
        c.accepted.load(Ordering::Relaxed),
        c.rejected.load(Ordering::Relaxed),
        c.failed_requests.load(Ordering::Relaxed),
    );
    if c.failed_requests.load(Ordering::Relaxed) > 0 {
        anyhow::bail!("some requests failed");
    }
    Ok(())
}
