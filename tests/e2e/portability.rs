//! SQL portability: every migration, every processor write and read, the recount, backfill,
//! reconcile and every reader-API query run on ClickHouse 18.16 (Debian) and on a current
//! ClickHouse (chdb) and must give identical results.
//!
//! The data set goes through the processor's real windowing state and its real ClickHouse
//! writes, with two partitions, duplicates, late facts (1 h lateness), registrations with and
//! without visits, live pings and resolved and unresolved campaign links.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::NaiveDate;

use eventflow_aggregate::flush::{self, NoRetry};
use eventflow_aggregate::state::{PartitionState, WindowConfig};
use eventflow_aggregate::{backfill, reconcile, ProcessorStore};
use eventflow_core::fact::{Entry, Fact, FactHeader, PageKind, Ping, SessionOrigin, Utm, Visit};
use eventflow_core::{time, ClientDirectory, ClientSettings, TenancyConfig};
use eventflow_serve::overview::{self, OverviewQuery};
use eventflow_store::read::{DifferingFigure, ReconcileFindingRow};
use eventflow_store::recount::Scope;
use eventflow_store::rows::{CampaignLinkRow, Checkpoint, LinkClickRow, ProgressRow};
use eventflow_store::{ClickHouseConfig, Store};

use crate::harness::*;

const H: i64 = 3_600_000;
/// 2026-11-20T00:00:00Z
const T0: i64 = 1_795_132_800_000;

fn clients() -> Arc<ClientDirectory> {
    let mut map = BTreeMap::new();
    map.insert("acme".to_owned(), ClientSettings { timezone: Some("Asia/Seoul".into()), token: None });
    map.insert("globex".to_owned(), ClientSettings { timezone: Some("America/New_York".into()), token: None });
    Arc::new(ClientDirectory::new(&TenancyConfig::default(), &map).unwrap())
}

fn header(seq: u64, client: &str, t: i64, received: i64) -> FactHeader {
    FactHeader {
        spool_id: 42,
        spool_seq: seq,
        client_id: client.into(),
        received_at_ms: received,
        event_time_ms: t,
        client_ts: None,
        clock_skew: false,
    }
}

/// A deterministic data set; returns facts with their partition (2 partitions).
fn dataset() -> Vec<(u16, Fact)> {
    let mut out = Vec::new();
    let mut seq = 0u64;
    let utm = |s: &str| Utm {
        source: Some(s.into()),
        medium: Some("email".into()),
        campaign: Some("fall".into()),
        ..Utm::default()
    };
    for (ci, client) in ["acme", "globex"].iter().enumerate() {
        for i in 0..40i64 {
            let session = format!("{client}-s{}", i % 13);
            let partition = (i % 13 % 2) as u16;
            let t = T0 + i * 37 * 60_000 + ci as i64 * 5 * H;
            let mut next = || {
                seq += 1;
                seq
            };
            let page = [PageKind::Landing, PageKind::Webinar, PageKind::Live][(i % 3) as usize];
            let cid = match i % 5 {
                0 => Some("known".to_owned()),
                1 => Some("stranger".to_owned()),
                _ => None,
            };
            out.push((
                partition,
                Fact::Visit(Visit {
                    header: header(next(), client, t, t + 1000),
                    session_id: session.clone(),
                    session_origin: SessionOrigin::Cookie,
                    page,
                    event_id: (page == PageKind::Landing).then(|| "ev".to_owned()),
                    webinar_id: (page != PageKind::Landing).then(|| format!("w{}", i % 2)),
                    // Copies of one visit from other sessions (a relay, a second tab): i and
                    // i + 17 share an event_uid, and mostly a partition only by chance.
                    event_uid: Some(format!("{client}-u{}", i % 17)),
                    path: None,
                    cid_resolved: cid.as_deref() == Some("known") && *client == "acme",
                    cid,
                    // A literal "unknown" source counts like a missing one.
                    utm: match i % 8 {
                        0 => Utm::default(),
                        4 => utm("unknown"),
                        _ => utm(if i % 2 == 0 { "news" } else { "ads" }),
                    },
                    utm_inherited: false,
                    referrer: None,
                }),
            ));
            if i % 3 == 1 {
                out.push((
                    partition,
                    Fact::Entry(Entry {
                        header: header(next(), client, t + if i % 6 == 1 { -60_000 } else { 60_000 }, t + 1500),
                        entry_id: format!("{client}-e{}", i % 11),
                        session_id: session.clone(),
                        session_origin: SessionOrigin::Cookie,
                        event_id: None,
                        webinar_id: Some("w1".into()),
                        cid: None,
                        cid_resolved: false,
                        utm: utm("news"),
                        utm_inherited: true,
                        first_touch_utm: Some(utm("news")),
                        first_touch_at_ms: Some(t - 600_000),
                    }),
                ));
            }
            for k in 0..3 {
                out.push((
                    partition,
                    Fact::Ping(Ping {
                        header: header(next(), client, t + k * 30_000, t + k * 30_000 + 200),
                        webinar_id: format!("w{}", i % 2),
                        session_id: session.clone(),
                        session_origin: SessionOrigin::Cookie,
                    }),
                ));
            }
        }
        // Late: a visit for the first day arriving much later (1 h lateness in this test).
        seq += 1;
        let late_t = T0 + ci as i64 * 5 * H + 10 * 60_000;
        out.push((
            1,
            Fact::Visit(Visit {
                header: header(seq, client, late_t, T0 + 40 * H),
                session_id: format!("{client}-late"),
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
            }),
        ));
    }
    out
}

/// Processes the data set with the real windowing state and flush protocol and writes it with
/// the real store. Partition 1 runs ahead of partition 0, so copies that came first are often
/// decided after later ones: notices and retractions run too.
async fn load(store: &Store) {
    let cfg = WindowConfig::new(H);
    let mut states: Vec<PartitionState> =
        (0..2).map(|p| PartitionState::new(p, cfg, clients(), &Checkpoint::default(), 1)).collect();
    let mut offsets = [0i64; 2];
    let mut facts = dataset();
    facts.sort_by_key(|(p, _)| std::cmp::Reverse(*p));
    for (i, (p, fact)) in facts.into_iter().enumerate() {
        let s = &mut states[p as usize];
        s.apply(offsets[p as usize], fact);
        offsets[p as usize] += 1;
        if i % 17 == 0 {
            flush(store, &mut [s]).await;
        }
    }
    for _ in 0..2 {
        let mut all: Vec<&mut PartitionState> = states.iter_mut().collect();
        flush(store, &mut all).await;
    }
    // A takeover: rebuild partition 1 from what the store holds, as a new owner would.
    let (mut takeover, _) = flush::rebuild(store, &[1], cfg, &clients(), &BTreeMap::new(), &NoRetry).await.unwrap();
    flush(store, &mut [&mut takeover[0]]).await;
    store
        .heartbeat(&[ProgressRow {
            kafka_partition: 0,
            instance: "t".into(),
            watermark_ms: T0 + 40 * H,
            heartbeat_ms: 1,
        }])
        .await
        .unwrap();
    store
        .upsert_campaign_links(&[CampaignLinkRow {
            cid: "known".into(),
            client_id: "acme".into(),
            destination: "https://acme.test/event/ev".into(),
            utm_source: "news".into(),
            utm_medium: "email".into(),
            utm_campaign: "fall".into(),
            utm_term: String::new(),
            utm_content: String::new(),
            updated_at: 1,
        }])
        .await
        .unwrap();
    // Link clicks as collectors write them (sql/007_link_clicks.sql): a first write, its retry,
    // a later running count of the same key, a restarted collector (another boot id) in the same
    // minute, another client, and a minute after the snapshot's range. Separate inserts, like
    // separate flushes. Expected per link over the range: acme known 4 + 1 + 2 = 7, acme other 2,
    // globex known 5.
    let m0 = (T0 / 1000) as u32;
    let click = |client: &str, cid: &str, minute: u32, boot_id: u64, clicks: u64| LinkClickRow {
        client_id: client.into(),
        minute,
        cid: cid.into(),
        boot_id,
        clicks,
    };
    for rows in [
        vec![
            click("acme", "known", m0, 1, 3),
            click("acme", "known", m0 + 60, 1, 1),
            click("acme", "other", m0, 1, 2),
            click("globex", "known", m0, 1, 5),
        ],
        vec![click("acme", "known", m0, 1, 3)],
        vec![click("acme", "known", m0, 1, 4)],
        vec![click("acme", "known", m0, 2, 2)],
        vec![click("acme", "known", m0 + 3 * 86_400, 1, 100)],
    ] {
        store.record_link_clicks(&rows).await.unwrap();
    }
    // Reconcile findings: acme's 2026-11-20 in doubt, then found clean by a later check (the
    // later row must win), 2026-11-21 in doubt with late facts pending.
    let day = |d: u32| NaiveDate::from_ymd_opt(2026, 11, d).unwrap();
    let figure = |metric: &str, key: &str, aggregate: u64, raw: u64| DifferingFigure {
        metric: metric.into(),
        key: key.into(),
        aggregate,
        raw,
    };
    for rows in [
        vec![
            ReconcileFindingRow::new("acme", day(20), 1_000, false, &[figure("visits", "", 1660, 1011)]),
            ReconcileFindingRow::new("acme", day(21), 1_000, true, &[figure("by_page", "landing", 3, 4)]),
            ReconcileFindingRow::new("globex", day(20), 1_000, false, &[figure("live", "w1 minute", 0, 2)]),
        ],
        vec![ReconcileFindingRow::new("acme", day(20), 2_000, false, &[])],
    ] {
        store.record_reconcile_findings(&rows).await.unwrap();
    }
}

async fn flush(store: &Store, states: &mut [&mut PartitionState]) {
    flush::flush(store, states, false, &NoRetry).await.unwrap();
}

fn sorted<T: std::fmt::Debug>(v: impl IntoIterator<Item = T>) -> Vec<String> {
    let mut out: Vec<String> = v.into_iter().map(|x| format!("{x:?}")).collect();
    out.sort();
    out
}

/// Every query's result, as text.
type Snapshot = BTreeMap<&'static str, Vec<String>>;

async fn snapshot(store: &Store) -> Snapshot {
    let day = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
    let (from, to) = (day("2026-11-19"), day("2026-11-22"));
    let tz = chrono_tz::Asia::Seoul;
    let (s0, s1) = ((T0 / 1000 - 86_400) as u32, (T0 / 1000 + 3 * 86_400) as u32);
    let mut m = BTreeMap::new();
    m.insert("checkpoints", sorted(store.load_checkpoints(&[0, 1]).await.unwrap()));
    m.insert("all_checkpoints", sorted(store.all_checkpoints().await.unwrap()));
    m.insert("facts_since", sorted(store.partition_facts_since(&[0, 1], 0, 0).await.unwrap()));
    let keys: Vec<(String, i8, String)> = (0..17)
        .map(|i| ("acme".to_owned(), 1, format!("acme-u{i}")))
        .chain((0..11).map(|i| ("acme".to_owned(), 2, format!("acme-e{i}"))))
        .collect();
    let keys: Vec<(&str, i8, &str)> = keys.iter().map(|(c, k, u)| (c.as_str(), *k, u.as_str())).collect();
    m.insert("copies", sorted(store.copies_of(&keys).await.unwrap()));
    let log = store.copy_log_since(&BTreeMap::new()).await.unwrap();
    assert!(!log.is_empty(), "the data set writes the copy log");
    m.insert("copy_log", sorted(log.clone()));
    m.insert(
        "copy_log_above",
        // Above the lowest (writer, sequence): rows come in no particular order.
        sorted(
            store
                .copy_log_since(&BTreeMap::from([log
                    .iter()
                    .map(|r| (r.writer_partition, r.writer_seq))
                    .min()
                    .unwrap()]))
                .await
                .unwrap(),
        ),
    );
    m.insert("last_writer_seqs", sorted(store.last_writer_seqs(&[0, 1]).await.unwrap()));
    let notices = store.dedup_notices_since(&[0, 1], &BTreeMap::new()).await.unwrap();
    assert!(!notices.is_empty(), "the data set makes notices");
    m.insert("notices", sorted(notices.clone()));
    m.insert(
        "notices_above",
        sorted(
            store
                .dedup_notices_since(
                    &[0],
                    &BTreeMap::from([(
                        1,
                        notices.iter().filter(|n| n.writer_partition == 1).map(|n| n.writer_seq).min().unwrap_or(0),
                    )]),
                )
                .await
                .unwrap(),
        ),
    );
    let ids: Vec<(String, u16, i8, String)> = store
        .partition_facts_since(&[0, 1], 0, 0)
        .await
        .unwrap()
        .into_iter()
        .step_by(7)
        .map(|r| (r.client_id, r.day, r.kind, r.fact_id))
        .collect();
    m.insert("facts_by_id", sorted(store.facts_by_id(&ids).await.unwrap()));
    let pairs: Vec<(String, String)> = (0..13).map(|i| ("acme".to_owned(), format!("acme-s{i}"))).collect();
    m.insert("session_first_visits", sorted(store.session_first_visits(&pairs).await.unwrap()));
    m.insert("clients_with_facts", sorted(store.clients_with_facts(from, to).await.unwrap()));
    m.insert("campaign_links", sorted(store.campaign_links().await.unwrap()));
    m.insert("watermark", vec![format!("{:?}", store.watermark().await.unwrap().min_ms)]);
    m.insert("all_pending", sorted(store.all_pending_late_days().await.unwrap()));
    for client in ["acme", "globex"] {
        m.insert(
            if client == "acme" { "acme_totals" } else { "globex_totals" },
            sorted(store.daily_totals(client, from, to).await.unwrap()),
        );
    }
    m.insert("totals_rows", sorted(store.daily_totals_rows("acme", from, to).await.unwrap()));
    m.insert("marketing_rows", sorted(store.daily_marketing_rows("acme", from, to).await.unwrap()));
    m.insert("marketing", sorted(store.daily_marketing("acme", from, to).await.unwrap()));
    let (campaigns, marketing_days) = store.campaigns("acme", from, to, 100).await.unwrap();
    m.insert("campaign_totals", sorted(campaigns));
    m.insert("marketing_days", sorted(marketing_days));
    m.insert("range_sessions", vec![store.range_sessions("acme", from, to).await.unwrap().to_string()]);
    m.insert("day_sessions", sorted(store.day_sessions("acme", from, to).await.unwrap()));
    m.insert("live_minutes", sorted(store.live_minutes("acme", None, s0, s1).await.unwrap()));
    m.insert("live_minutes_w1", sorted(store.live_minutes("acme", Some("w1"), s0, s1).await.unwrap()));
    m.insert("raw_live_minutes", sorted(store.raw_live_minutes("acme", "w1", from, to, tz).await.unwrap()));
    m.insert("minute_visits", sorted(store.minute_visits_rows("acme", s0, s1).await.unwrap()));
    m.insert("minute_live", sorted(store.minute_live_rows("acme", s0, s1).await.unwrap()));
    m.insert("pending", sorted(store.pending_late_days("acme", from, to).await.unwrap()));
    m.insert("reconcile_findings", sorted(store.reconcile_findings("acme", from, to).await.unwrap()));
    m.insert("quality_counters", sorted(store.quality_counters(from, to).await.unwrap()));
    m.insert("link_clicks", sorted(store.link_clicks("acme", s0, s1).await.unwrap()));
    m.insert("link_clicks_globex", sorted(store.link_clicks("globex", s0, s1).await.unwrap()));
    for (name, by_partition, cid) in [
        ("recount", false, None),
        ("recount_by_partition", true, None),
        ("recount_cid", true, Some("known".to_owned())),
    ] {
        let scope = Scope { client_id: "acme".into(), from, to, tz, cid };
        m.insert(name, vec![format!("{:?}", store.recount(&scope, by_partition).await.unwrap())]);
    }
    let q = OverviewQuery { client_id: "acme".into(), from, to, tz, campaign_limit: 100 };
    let s = overview::sections(store, &q).await;
    m.insert("overview", vec![format!("{:?}", s)]);
    m
}

/// Loads the data set through `store`, snapshots every query, reconciles, backfills (the range,
/// then a campaign), and snapshots again; asserts the flow's invariants on the way.
async fn flow(store: &Store) -> (Snapshot, Snapshot) {
    store.ping().await.unwrap();
    load(store).await;
    let before = snapshot(store).await;
    assert!(!before["pending"].is_empty(), "the data set has late facts awaiting backfill");

    // Reconcile finds exactly the late facts; backfill folds them in; then nothing differs.
    let tz = chrono_tz::Asia::Seoul;
    let (from, to) = (NaiveDate::from_ymd_opt(2026, 11, 19).unwrap(), NaiveDate::from_ymd_opt(2026, 11, 22).unwrap());
    let mismatches = reconcile::client(store, "acme", tz, from, to).await.unwrap();
    let unexplained: Vec<_> = mismatches.iter().filter(|m| !m.pending_backfill).map(ToString::to_string).collect();
    assert!(!mismatches.is_empty() && unexplained.is_empty(), "{unexplained:#?}");
    let dir_clients = clients();
    let req = backfill::BackfillRequest { from, to, client: None, cid: None, chunk_days: 2 };
    let report = backfill::run(store, &dir_clients, &req, &mut |_, _| {}).await.unwrap();
    assert_eq!(report.client_days, 8);
    let versions = store.all_checkpoints().await.unwrap().into_iter().map(|(p, c)| (p, c.seq)).collect();
    store.backfill_day_sessions(&Scope { client_id: "acme".into(), from, to, tz, cid: None }, &versions).await.unwrap();
    for client in ["acme", "globex"] {
        let tz = dir_clients.timezone(client);
        let left = reconcile::client(store, client, tz, from, to).await.unwrap();
        assert!(left.is_empty(), "{client}: {left:#?}");
    }
    let cid_req =
        backfill::BackfillRequest { from, to, client: Some("acme".into()), cid: Some("known".into()), chunk_days: 7 };
    backfill::run(store, &dir_clients, &cid_req, &mut |_, _| {}).await.unwrap();
    let after = snapshot(store).await;
    assert!(after["pending"].is_empty());
    (before, after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_gives_the_same_answer_on_18_16_and_current_clickhouse() {
    let dir = TestDir::new("portability");
    let old = ClickHouse::start(&dir);
    let new = Chdb::start(&dir);
    assert_eq!(old.query("SELECT version()").unwrap().trim(), "18.16.1");
    let version = new.version();
    assert!(version.split('.').next().unwrap().parse::<u32>().unwrap() >= 23, "chdb embeds ClickHouse {version}");

    let mut results = Vec::new();
    for url in [old.url(), new.url()] {
        let config = ClickHouseConfig { url, database: "portability".into(), ..ClickHouseConfig::default() };
        let report = eventflow_store::migrate::apply(&config).await.expect("migrations");
        assert_eq!(report.applied.len(), eventflow_store::migrate::MIGRATIONS.len());
        // Applying again is a no-op.
        assert!(eventflow_store::migrate::apply(&config).await.unwrap().applied.is_empty());
        results.push(flow(&Store::new(&config)).await);
    }
    let (old_r, new_r) = (&results[0], &results[1]);
    for (name, value) in &old_r.0 {
        assert_eq!(Some(value), new_r.0.get(name), "before backfill, `{name}` differs between 18.16 and {version}");
    }
    for (name, value) in &old_r.1 {
        assert_eq!(Some(value), new_r.1.get(name), "after backfill, `{name}` differs between 18.16 and {version}");
    }
    // The comparison is not vacuous.
    assert!(old_r.1["acme_totals"].len() >= 2 && old_r.1["campaign_totals"].len() >= 3, "{:#?}", old_r.1);
    assert_eq!(old_r.1["reconcile_findings"].len(), 2, "the newest check of each acme day: {:#?}", old_r.1);
    assert!(old_r.1["reconcile_findings"][0].contains("mismatches: 0"), "{:#?}", old_r.1["reconcile_findings"]);
    assert!(old_r.1["overview"][0].contains("doubt: Some"), "{:#?}", old_r.1["overview"]);
    assert_eq!(
        old_r.1["link_clicks"],
        ["LinkClicks { cid: \"known\", clicks: 7 }", "LinkClicks { cid: \"other\", clicks: 2 }"],
        "retries and later counts replace, another boot adds"
    );
    assert_eq!(old_r.1["link_clicks_globex"], ["LinkClicks { cid: \"known\", clicks: 5 }"]);
    assert!(
        old_r.1["overview"][0].contains("link_clicks: [LinkClicksRow { cid: \"known\", clicks: 7 }"),
        "{:#?}",
        old_r.1["overview"]
    );
    let _ = time::MINUTE_MS;
}

/// The cluster variant of the schema (`sql/cluster/`: `T_local` tables under Distributed tables
/// with the application's names) on a current ClickHouse with a one-shard cluster: the
/// processor's flush protocol, every reader query, the recount, reconcile and backfill run
/// through the Distributed tables and give the single-server answers. (`ON CLUSTER` and the
/// Replicated engines need Keeper, which is not here: they are removed, as in
/// scripts/validate_deploy.sh.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_schema_gives_the_single_server_answers() {
    let dir = TestDir::new("portability-cluster");
    let single = Chdb::start(&dir);
    let cluster = Chdb::start_cluster(&dir, "ef_test");
    let config = ClickHouseConfig { url: single.url(), database: "portability".into(), ..ClickHouseConfig::default() };
    eventflow_store::migrate::apply(&config).await.expect("migrations");
    let want = flow(&Store::new(&config)).await;

    let config = ClickHouseConfig {
        url: cluster.url(),
        database: "ef_cluster".into(),
        cluster: Some("ef_test".into()),
        ..ClickHouseConfig::default()
    };
    let client = config.client();
    let mut tables = 0;
    for m in eventflow_store::migrate::CLUSTER_MIGRATIONS {
        let sql = m.sql.replace("{cluster}", "ef_test").replace("{database}", "ef_cluster");
        for stmt in eventflow_store::migrate::statements(&sql) {
            let stmt = without_keeper(&stmt.replace(" ON CLUSTER 'ef_test'", ""));
            tables += usize::from(stmt.contains("ENGINE = Distributed"));
            client.query(&stmt).execute().await.unwrap_or_else(|e| panic!("{stmt}: {e}"));
        }
    }
    assert!(tables >= 15, "{tables} Distributed tables");
    let got = flow(&Store::new(&config)).await;
    for (name, value) in &want.0 {
        assert_eq!(Some(value), got.0.get(name), "before backfill, `{name}` differs through Distributed tables");
    }
    for (name, value) in &want.1 {
        assert_eq!(Some(value), got.1.get(name), "after backfill, `{name}` differs through Distributed tables");
    }
    assert!(cluster.version().split('.').next().unwrap().parse::<u32>().unwrap() >= 23);
}

/// `ReplicatedXMergeTree('/path', '{replica}', args)` -> `XMergeTree(args)`.
fn without_keeper(stmt: &str) -> String {
    let Some(at) = stmt.find("Replicated") else { return stmt.to_owned() };
    let rest = &stmt[at + "Replicated".len()..];
    let open = rest.find('(').expect("engine arguments");
    let engine = &rest[..open];
    let args = &rest[open + 1..];
    let close = args.find(')').expect("engine arguments");
    let kept: Vec<&str> = args[..close].split(", ").skip(2).collect();
    format!("{}{engine}({}){}", &stmt[..at], kept.join(", "), &args[close + 1..])
}
