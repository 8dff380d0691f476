//! `eventflow backfill`: recompute aggregates of a date range (a client, or one campaign link)
//! from raw facts. Idempotent, and safe while the processor runs.
//!
//! For each Kafka partition the recount is written with `version` = that partition's checkpoint
//! sequence, read *before* the facts: every fact up to that sequence is in the recount, so the
//! rows are at least as complete as any processor row with a lower version, and any processor
//! row written later (higher version) wins again. Keys that exist in the aggregates but not in
//! the recount are overwritten with zeros (repair). Late facts are folded in this way, and the
//! backfill marks record which sequence each client day is complete up to.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{NaiveDate, Utc};
use tracing::info;

use eventflow_core::time;
use eventflow_store::recount::{Recount, Scope};
use eventflow_store::rows::{
    BackfillMarkRow, DailyMarketingRow, DailyTotalsRow, DayCounters, MarketingCounters, MinuteLiveRow, MinuteVisitsRow,
};
use eventflow_store::{Store, StoreError};

/// What a backfill covers.
#[derive(Debug, Clone)]
pub struct BackfillRequest {
    pub from: NaiveDate,
    pub to: NaiveDate,
    /// One client, or every client with facts in the range.
    pub client: Option<String>,
    /// Only the marketing rows of this campaign link.
    pub cid: Option<String>,
    /// Days recounted per step (bounds memory and query size).
    pub chunk_days: u32,
}

/// Counts of one backfill.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BackfillReport {
    pub client_days: u64,
    pub rows_written: u64,
    pub rows_zeroed: u64,
    /// Stored facts attributed to the campaign link of `--cid` that were stored unresolved
    /// (the link was imported after they arrived) and now resolve to it.
    pub facts_reattributed: u64,
}

/// Progress callback: (client days done, total).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Runs a backfill. `clients` resolves time zones.
pub async fn run(
    store: &Store,
    clients: &eventflow_core::ClientDirectory,
    req: &BackfillRequest,
    progress: Progress<'_>,
) -> Result<BackfillReport, StoreError> {
    let client_ids = match &req.client {
        Some(c) => vec![c.clone()],
        None => store.clients_with_facts(req.from, req.to).await?,
    };
    let days = (req.to - req.from).num_days().max(0) as u64 + 1;
    let total = days * client_ids.len() as u64;
    let mut report = BackfillReport::default();
    let mut done = 0;
    // A campaign backfill first re-attributes facts stored before the link was imported.
    let link_owner = match &req.cid {
        Some(cid) => store.campaign_link(cid).await?.map(|l| l.client_id),
        None => None,
    };
    let mut reattributed_partitions = BTreeSet::new();
    progress(0, total);
    for client in &client_ids {
        let tz = clients.timezone(client);
        let mut from = req.from;
        while from <= req.to {
            let to = (from + chrono::Duration::days(i64::from(req.chunk_days.max(1)) - 1)).min(req.to);
            let mut scope = Scope { client_id: client.clone(), from, to, tz, cid: req.cid.clone() };
            if let (Some(cid), Some(owner)) = (&req.cid, &link_owner) {
                if owner == client {
                    let moved = reattribute(store, &scope, cid).await?;
                    report.facts_reattributed += moved.len() as u64;
                    if !moved.is_empty() {
                        // Their unresolved buckets and quality counters change too: recount the
                        // whole days, not only the link's rows.
                        reattributed_partitions.extend(moved);
                        scope.cid = None;
                    }
                }
            }
            let r = backfill_scope(store, &scope).await?;
            report.rows_written += r.rows_written;
            report.rows_zeroed += r.rows_zeroed;
            let n = (to - from).num_days() as u64 + 1;
            report.client_days += n;
            done += n;
            progress(done, total);
            from = to + chrono::Duration::days(1);
        }
    }
    if !reattributed_partitions.is_empty() {
        // The processors rebuild those partitions' open days from the re-attributed facts, so
        // the stream does not write the old attribution back.
        let partitions: Vec<u16> = reattributed_partitions.into_iter().collect();
        store.request_rebuild(&partitions, "backfill --cid re-attributed stored facts").await?;
    }
    info!(?report, from = %req.from, to = %req.to, client = ?req.client, cid = ?req.cid, "backfill finished");
    Ok(report)
}

/// Stores again, resolved, the facts of `scope` that carry `cid` (a link of the scope's client)
/// but were stored unresolved; returns the Kafka partitions of those facts (one per fact).
async fn reattribute(store: &Store, scope: &Scope, cid: &str) -> Result<Vec<u16>, StoreError> {
    let mut rows = store.unresolved_facts_of_link(scope, cid).await?;
    for row in &mut rows {
        row.cid_resolved = 1;
        // ReplacingMergeTree(seq): the resolved row replaces the stored one.
        row.seq += 1;
    }
    for chunk in rows.chunks(crate::sink::MAX_FACT_ROWS_PER_INSERT) {
        store.insert("facts", chunk).await?;
    }
    Ok(rows.iter().map(|r| r.kafka_partition).collect())
}

/// Backfills one client and range.
pub async fn backfill_scope(store: &Store, scope: &Scope) -> Result<BackfillReport, StoreError> {
    // Checkpoints first: the recount below then includes at least every fact up to them.
    let checkpoints = store.all_checkpoints().await?;
    let version = |p: u16| checkpoints.get(&p).map_or(0, |c| c.seq);
    // The dedup index and the sessions' first visits are written by the processor ahead of
    // the facts; rebuild them from the facts so the recount can rely on them.
    store.backfill_fact_indexes(scope).await?;
    let recount = store.recount(scope, true).await?;
    let c = scope.client_id.as_str();
    let mut report = BackfillReport::default();

    let marketing_rows = store.daily_marketing_rows(c, scope.from, scope.to).await?;
    let mut marketing: Vec<DailyMarketingRow> = Vec::new();
    let mut seen = BTreeSet::new();
    for ((day, dims, p), m) in &recount.marketing {
        if scope.cid.as_ref().is_some_and(|cid| &dims.cid != cid) {
            continue;
        }
        seen.insert((*day, dims.clone(), *p));
        marketing.push(DailyMarketingRow::new(c.to_owned(), *day, dims, *p, version(*p), *m));
    }
    for r in marketing_rows {
        if scope.cid.as_ref().is_some_and(|cid| &r.cid != cid) {
            continue;
        }
        if !seen.contains(&(r.day, r.dims(), r.kafka_partition)) {
            marketing.push(DailyMarketingRow::new(
                c.to_owned(),
                r.day,
                &r.dims(),
                r.kafka_partition,
                version(r.kafka_partition),
                MarketingCounters::default(),
            ));
            report.rows_zeroed += 1;
        }
    }
    report.rows_written += marketing.len() as u64;
    store.insert("daily_marketing", &marketing).await?;

    if scope.cid.is_some() {
        // A campaign backfill recomputes only that campaign's marketing rows.
        return Ok(report);
    }

    let (totals, zeroed) = totals_rows(store, scope, &recount, &version).await?;
    report.rows_zeroed += zeroed;
    report.rows_written += totals.len() as u64;
    store.insert("daily_totals", &totals).await?;

    let (start_ms, _) = time::day_bounds_ms(scope.from, scope.tz);
    let (_, end_ms) = time::day_bounds_ms(scope.to, scope.tz);
    let (from_s, to_s) =
        (u32::try_from(start_ms / 1000).unwrap_or(0), u32::try_from(end_ms / 1000).unwrap_or(u32::MAX));
    let mut minutes: Vec<MinuteVisitsRow> = recount
        .minutes
        .iter()
        .map(|((minute, page, p), visits)| MinuteVisitsRow {
            client_id: c.to_owned(),
            minute: *minute,
            page: *page,
            kafka_partition: *p,
            version: version(*p),
            visits: *visits,
        })
        .collect();
    let keys: BTreeSet<(u32, i8, u16)> = recount.minutes.keys().copied().collect();
    for r in store.minute_visits_rows(c, from_s, to_s).await? {
        if !keys.contains(&(r.minute, r.page, r.kafka_partition)) {
            minutes.push(MinuteVisitsRow { version: version(r.kafka_partition), visits: 0, ..r });
            report.rows_zeroed += 1;
        }
    }
    report.rows_written += minutes.len() as u64;
    store.insert("minute_visits", &minutes).await?;

    let mut live: Vec<MinuteLiveRow> = recount
        .live
        .iter()
        .map(|((w, minute, p), viewers)| MinuteLiveRow {
            client_id: c.to_owned(),
            webinar_id: w.clone(),
            minute: *minute,
            kafka_partition: *p,
            version: version(*p),
            viewers: *viewers,
        })
        .collect();
    let keys: BTreeSet<(String, u32, u16)> = recount.live.keys().cloned().collect();
    for r in store.minute_live_rows(c, from_s, to_s).await? {
        if !keys.contains(&(r.webinar_id.clone(), r.minute, r.kafka_partition)) {
            live.push(MinuteLiveRow { version: version(r.kafka_partition), viewers: 0, ..r });
            report.rows_zeroed += 1;
        }
    }
    report.rows_written += live.len() as u64;
    store.insert("minute_live", &live).await?;

    let versions: BTreeMap<u16, u64> = checkpoints.iter().map(|(p, c)| (*p, c.seq)).collect();
    store.backfill_day_sessions(scope, &versions).await?;

    let now = u32::try_from(Utc::now().timestamp()).unwrap_or(0);
    let mut marks = Vec::new();
    for day in eventflow_store::recount::days(scope) {
        for (p, cp) in &checkpoints {
            marks.push(BackfillMarkRow {
                client_id: c.to_owned(),
                day: time::day_number(day),
                kafka_partition: *p,
                covered_seq: cp.seq,
                finished_at: now,
            });
        }
    }
    store.insert("backfill_marks", &marks).await?;
    Ok(report)
}

async fn totals_rows(
    store: &Store,
    scope: &Scope,
    recount: &Recount,
    version: &impl Fn(u16) -> u64,
) -> Result<(Vec<DailyTotalsRow>, u64), StoreError> {
    let c = scope.client_id.as_str();
    let mut rows: Vec<DailyTotalsRow> = recount
        .totals
        .iter()
        .map(|((day, p), t)| DailyTotalsRow::new(c.to_owned(), *day, *p, version(*p), *t))
        .collect();
    let keys: BTreeMap<(u16, u16), ()> = recount.totals.keys().map(|k| (*k, ())).collect();
    let mut zeroed = 0;
    for r in store.daily_totals_rows(c, scope.from, scope.to).await? {
        if !keys.contains_key(&(r.day, r.kafka_partition)) {
            rows.push(DailyTotalsRow::new(
                c.to_owned(),
                r.day,
                r.kafka_partition,
                version(r.kafka_partition),
                DayCounters::default(),
            ));
            zeroed += 1;
        }
    }
    Ok((rows, zeroed))
}
