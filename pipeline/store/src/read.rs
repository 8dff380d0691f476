//! Reads of the aggregate tables (reader API, reconcile, backfill).
//!
//! Every versioned table is read with `FINAL` (highest version per key) and summed over
//! `kafka_partition`. These queries touch only aggregate rows: pages and dashboards never scan
//! raw facts unless an aggregate is missing (see the reader API's fallback rules).

use std::collections::{BTreeMap, BTreeSet};

use chrono::NaiveDate;

use eventflow_core::time;

use crate::rows::{
    DailyMarketingRow, DailyTotalsRow, DayCounters, MarketingCounters, MarketingDims, MinuteLiveRow, MinuteVisitsRow,
};
use crate::{Result, Store};

fn d(day: NaiveDate) -> String {
    time::format_day(day)
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct DayCount {
    day: u16,
    n: u64,
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct Pending {
    day: u16,
    kafka_partition: u16,
    seq: u64,
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct Progress {
    kafka_partition: u16,
    watermark_ms: i64,
    heartbeat_ms: u64,
}

/// One row of the campaign table over a range.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Deserialize)]
pub struct CampaignTotals {
    pub cid: String,
    pub utm_source: String,
    pub utm_medium: String,
    pub utm_campaign: String,
    pub visits: u64,
    pub entries: u64,
    pub linked_entries: u64,
}

/// Visits, entries and linked entries per (cid, utm_source, utm_medium, utm_campaign).
pub type CampaignSums = BTreeMap<(String, String, String, String), (u64, u64, u64)>;

/// The campaign table: most visits first, then most entries, ties in dimension order; at most
/// `limit` rows. Shared by the aggregate read and the raw recount so both rank alike.
pub fn rank_campaigns(per: CampaignSums, limit: u32) -> Vec<CampaignTotals> {
    let mut rows: Vec<CampaignTotals> = per
        .into_iter()
        .map(|((cid, utm_source, utm_medium, utm_campaign), (visits, entries, linked_entries))| CampaignTotals {
            cid,
            utm_source,
            utm_medium,
            utm_campaign,
            visits,
            entries,
            linked_entries,
        })
        .collect();
    // Stable: equal counts keep the map's (dimension) order.
    rows.sort_by(|a, b| b.visits.cmp(&a.visits).then(b.entries.cmp(&a.entries)));
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    rows
}

/// Per-day sums of the marketing table (for cross-checks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clickhouse::Row, serde::Deserialize)]
pub struct MarketingDay {
    pub day: u16,
    pub visits: u64,
    pub entries: u64,
}

/// Viewers of one webinar in one minute (all partitions).
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Deserialize)]
pub struct LiveMinute {
    pub webinar_id: String,
    pub minute: u32,
    pub viewers: u64,
}

/// Processor progress over all partitions.
#[derive(Debug, Clone, Default)]
pub struct Watermark {
    /// Lowest watermark (ms) over the partitions that reported; `None` if none did.
    pub min_ms: Option<i64>,
    /// Partitions that reported progress.
    pub reported: Vec<u16>,
    /// Most recent heartbeat (ms).
    pub last_heartbeat_ms: Option<u64>,
}

impl Store {
    /// `daily_totals` summed over partitions, per day of `[from, to]`.
    pub async fn daily_totals(
        &self,
        client: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<BTreeMap<u16, DayCounters>> {
        let rows = self.daily_totals_rows(client, from, to).await?;
        let mut out: BTreeMap<u16, DayCounters> = BTreeMap::new();
        for r in rows {
            *out.entry(r.day).or_default() += r.counters();
        }
        Ok(out)
    }

    /// Current `daily_totals` rows (one per day and partition).
    pub async fn daily_totals_rows(&self, client: &str, from: NaiveDate, to: NaiveDate) -> Result<Vec<DailyTotalsRow>> {
        self.fetch_client_days::<DailyTotalsRow>(
            "SELECT ?fields FROM daily_totals FINAL WHERE client_id = ? AND day >= ? AND day <= ?",
            client,
            from,
            to,
        )
        .await
    }

    /// Current `daily_marketing` rows (one per day, dims and partition).
    pub async fn daily_marketing_rows(
        &self,
        client: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<DailyMarketingRow>> {
        self.fetch_client_days::<DailyMarketingRow>(
            "SELECT ?fields FROM daily_marketing FINAL WHERE client_id = ? AND day >= ? AND day <= ?",
            client,
            from,
            to,
        )
        .await
    }

    /// `daily_marketing` summed over partitions per (day, dims).
    pub async fn daily_marketing(
        &self,
        client: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<BTreeMap<(u16, MarketingDims), MarketingCounters>> {
        let mut out: BTreeMap<(u16, MarketingDims), MarketingCounters> = BTreeMap::new();
        for r in self.daily_marketing_rows(client, from, to).await? {
            let m = out.entry((r.day, r.dims())).or_default();
            m.visits += r.visits;
            m.unique_sessions += r.unique_sessions;
            m.entries += r.entries;
            m.linked_entries += r.linked_entries;
        }
        Ok(out)
    }

    /// Campaign table of a range (visits and entries per campaign link and UTM source, medium
    /// and campaign, most visits first, at most `limit` rows) and the per-day sums of the same
    /// rows, which the reader cross-checks against `daily_totals`: one read of `daily_marketing`.
    pub async fn campaigns(
        &self,
        client: &str,
        from: NaiveDate,
        to: NaiveDate,
        limit: u32,
    ) -> Result<(Vec<CampaignTotals>, BTreeMap<u16, MarketingDay>)> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Row {
            day: u16,
            cid: String,
            utm_source: String,
            utm_medium: String,
            utm_campaign: String,
            visits: u64,
            entries: u64,
            linked_entries: u64,
        }
        let rows = self
            .fetch_client_days::<Row>(
                "SELECT day, cid, utm_source, utm_medium, utm_campaign, sum(visits) AS visits, \
                         sum(entries) AS entries, sum(linked_entries) AS linked_entries FROM daily_marketing FINAL \
                         WHERE client_id = ? AND day >= ? AND day <= ? \
                         GROUP BY day, cid, utm_source, utm_medium, utm_campaign",
                client,
                from,
                to,
            )
            .await?;
        let mut days: BTreeMap<u16, MarketingDay> = BTreeMap::new();
        let mut per = CampaignSums::new();
        for r in rows {
            let day = days.entry(r.day).or_insert(MarketingDay { day: r.day, ..MarketingDay::default() });
            day.visits += r.visits;
            day.entries += r.entries;
            let c = per.entry((r.cid, r.utm_source, r.utm_medium, r.utm_campaign)).or_default();
            c.0 += r.visits;
            c.1 += r.entries;
            c.2 += r.linked_entries;
        }
        Ok((rank_campaigns(per, limit), days))
    }

    /// Distinct sessions with a visit over `[from, to]`.
    pub async fn range_sessions(&self, client: &str, from: NaiveDate, to: NaiveDate) -> Result<u64> {
        Ok(self.sessions(client, from, to).await?.1)
    }

    /// Distinct sessions with a visit per day.
    pub async fn day_sessions(&self, client: &str, from: NaiveDate, to: NaiveDate) -> Result<BTreeMap<u16, u64>> {
        Ok(self.sessions(client, from, to).await?.0)
    }

    /// Distinct sessions with a visit per day and over the whole range, in one request.
    pub async fn sessions(&self, client: &str, from: NaiveDate, to: NaiveDate) -> Result<(BTreeMap<u16, u64>, u64)> {
        // Day 0 (1970-01-01) carries the range total; it is never inside a valid range. (Not
        // aliased `day`: ClickHouse aliases are visible in WHERE, which would then filter on it.)
        // A session row's latest version decides (argMax, not FINAL: 18.16 may move a condition
        // on `present` ahead of the FINAL merge).
        const PRESENT: &str = "SELECT day, session_id FROM day_sessions WHERE client_id = ? AND day >= ? AND day <= ? \
                               GROUP BY day, session_id, kafka_partition HAVING argMax(present, version) = 1";
        let sql = format!(
            "SELECT day, uniqExact(session_id) AS n FROM ({PRESENT}) GROUP BY day \
             UNION ALL SELECT toDate('1970-01-01') AS range_total, uniqExact(session_id) AS n FROM ({PRESENT})"
        );
        let rows = self
            .timed(async {
                Ok(self
                    .query(&sql)?
                    .bind(client)
                    .bind(d(from))
                    .bind(d(to))
                    .bind(client)
                    .bind(d(from))
                    .bind(d(to))
                    .fetch_all::<DayCount>()
                    .await?)
            })
            .await?;
        let mut days = BTreeMap::new();
        let mut range = 0;
        for r in rows {
            if r.day == 0 {
                range = r.n;
            } else {
                days.insert(r.day, r.n);
            }
        }
        Ok((days, range))
    }

    /// Days of `[from, to]` with stored facts (from the processor's `fact_days` markers, a
    /// primary-key read; the overview never reads the raw facts when the aggregates are
    /// complete).
    ///
    /// Each of them has a `daily_totals` row once the flush that stored the facts is written
    /// (zeros for a day of duplicates only; for a day with only late facts: once backfill folded
    /// them in, and until then the day is pending anyway); a day missing there means the
    /// aggregate is missing (deleted, lost, not rebuilt) and the reader must not trust it.
    pub async fn fact_days(&self, client: &str, from: NaiveDate, to: NaiveDate) -> Result<BTreeSet<u16>> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Day {
            day: u16,
        }
        let rows = self
            .fetch_client_days::<Day>(
                "SELECT DISTINCT day FROM fact_days WHERE client_id = ? AND day >= ? AND day <= ?",
                client,
                from,
                to,
            )
            .await?;
        Ok(rows.into_iter().map(|r| r.day).collect())
    }

    /// Viewers per webinar and minute in `[from_s, to_s)` (unix seconds), optionally of one webinar.
    pub async fn live_minutes(
        &self,
        client: &str,
        webinar: Option<&str>,
        from_s: u32,
        to_s: u32,
    ) -> Result<Vec<LiveMinute>> {
        let filter = if webinar.is_some() { " AND webinar_id = ?" } else { "" };
        let sql = format!(
            "SELECT webinar_id, toUInt32(minute) AS minute, sum(viewers) AS viewers FROM minute_live FINAL \
             WHERE client_id = ? AND minute >= toDateTime(?) AND minute < toDateTime(?){filter} \
             GROUP BY webinar_id, minute ORDER BY webinar_id, minute"
        );
        let mut q = self.query(&sql)?.bind(client).bind(from_s).bind(to_s);
        if let Some(w) = webinar {
            q = q.bind(w);
        }
        self.timed(async { Ok(q.fetch_all::<LiveMinute>().await?) }).await
    }

    /// Current `minute_visits` rows in `[from_s, to_s)`.
    pub async fn minute_visits_rows(&self, client: &str, from_s: u32, to_s: u32) -> Result<Vec<MinuteVisitsRow>> {
        self.timed(async {
            Ok(self.query("SELECT ?fields FROM minute_visits FINAL WHERE client_id = ? AND minute >= toDateTime(?) AND minute < toDateTime(?)")?
                .bind(client)
                .bind(from_s)
                .bind(to_s)
                .fetch_all::<MinuteVisitsRow>()
                .await?)
        })
        .await
    }

    /// Current `minute_live` rows in `[from_s, to_s)`.
    pub async fn minute_live_rows(&self, client: &str, from_s: u32, to_s: u32) -> Result<Vec<MinuteLiveRow>> {
        self.timed(async {
            Ok(self.query("SELECT ?fields FROM minute_live FINAL WHERE client_id = ? AND minute >= toDateTime(?) AND minute < toDateTime(?)")?
                .bind(client)
                .bind(from_s)
                .bind(to_s)
                .fetch_all::<MinuteLiveRow>()
                .await?)
        })
        .await
    }

    /// Days of `[from, to]` with late facts not yet folded in by backfill.
    pub async fn pending_late_days(&self, client: &str, from: NaiveDate, to: NaiveDate) -> Result<Vec<u16>> {
        let late = self.fetch_client_days::<Pending>("SELECT day, kafka_partition, max(seq) AS seq FROM late_facts WHERE client_id = ? AND day >= ? AND day <= ? GROUP BY day, kafka_partition", client, from, to).await?;
        if late.is_empty() {
            return Ok(Vec::new());
        }
        let covered = self.fetch_client_days::<Pending>("SELECT day, kafka_partition, max(covered_seq) AS seq FROM backfill_marks WHERE client_id = ? AND day >= ? AND day <= ? GROUP BY day, kafka_partition", client, from, to).await?;
        let covered: BTreeMap<(u16, u16), u64> =
            covered.into_iter().map(|c| ((c.day, c.kafka_partition), c.seq)).collect();
        let mut days: Vec<u16> = late
            .into_iter()
            .filter(|l| covered.get(&(l.day, l.kafka_partition)).is_none_or(|c| *c < l.seq))
            .map(|l| l.day)
            .collect();
        days.sort_unstable();
        days.dedup();
        Ok(days)
    }

    /// Client days (any client) with late facts not yet folded in, oldest first.
    pub async fn all_pending_late_days(&self) -> Result<Vec<(String, u16)>> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Row {
            client_id: String,
            day: u16,
            kafka_partition: u16,
            seq: u64,
        }
        let late = self
            .timed(async {
                Ok(self.query("SELECT client_id, day, kafka_partition, max(seq) AS seq FROM late_facts GROUP BY client_id, day, kafka_partition")?
                    .fetch_all::<Row>()
                    .await?)
            })
            .await?;
        let covered = self
            .timed(async {
                Ok(self.query("SELECT client_id, day, kafka_partition, max(covered_seq) AS seq FROM backfill_marks GROUP BY client_id, day, kafka_partition")?
                    .fetch_all::<Row>()
                    .await?)
            })
            .await?;
        let covered: BTreeMap<(String, u16, u16), u64> =
            covered.into_iter().map(|c| ((c.client_id, c.day, c.kafka_partition), c.seq)).collect();
        let mut out: Vec<(String, u16)> = late
            .into_iter()
            .filter(|l| covered.get(&(l.client_id.clone(), l.day, l.kafka_partition)).is_none_or(|c| *c < l.seq))
            .map(|l| (l.client_id, l.day))
            .collect();
        out.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        out.dedup();
        Ok(out)
    }

    /// Processor watermark over all partitions that have reported progress.
    pub async fn watermark(&self) -> Result<Watermark> {
        let rows = self
            .timed(async {
                Ok(self.query("SELECT kafka_partition, argMax(watermark_ms, heartbeat_ms) AS wm, max(heartbeat_ms) AS hb FROM processor_progress GROUP BY kafka_partition")?
                    .fetch_all::<Progress>()
                    .await?)
            })
            .await?;
        Ok(Watermark {
            min_ms: rows.iter().map(|r| r.watermark_ms).min(),
            reported: rows.iter().map(|r| r.kafka_partition).collect(),
            last_heartbeat_ms: rows.iter().map(|r| r.heartbeat_ms).max(),
        })
    }
}

impl Store {
    /// Whether any fact of `client` was stored (primary-key lookup).
    pub async fn client_has_facts(&self, client: &str) -> Result<bool> {
        self.timed(async {
            Ok(self
                .query("SELECT count() FROM (SELECT 1 FROM facts WHERE client_id = ? LIMIT 1)")?
                .bind(client)
                .fetch_one::<u64>()
                .await?
                > 0)
        })
        .await
    }
}

// -------------------------------------------------------------------------------------------
// Reconcile findings (sql/005_reconcile_findings.sql) and today's quality counters of every
// client: written by the processor's reconcile, read by the reader API.

/// One figure that differed between the aggregates and the raw recount (part of a finding's
/// JSON `detail`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DifferingFigure {
    /// Metric family (`visits`, `campaigns`, `live`, ...; see `eventflow_reconcile_mismatch`).
    pub metric: String,
    /// Which bucket of the family (empty for day totals).
    pub key: String,
    pub aggregate: u64,
    pub raw: u64,
}

/// `reconcile_findings` row: the result of one reconcile check of one client day.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct ReconcileFindingRow {
    pub client_id: String,
    pub day: u16,
    /// When the day was checked (unix ms); the newest check of a day supersedes older ones.
    pub checked_ms: u64,
    /// Differing figures (all of them; `detail` lists at most [`ReconcileFindingRow::DETAIL_MAX`]).
    pub mismatches: u32,
    /// 1 when the day has late facts not yet folded in by backfill.
    pub pending_backfill: u8,
    /// JSON array of [`DifferingFigure`].
    pub detail: String,
}

impl ReconcileFindingRow {
    /// Most figures kept in `detail` per day (a lost table can differ on every minute bucket).
    pub const DETAIL_MAX: usize = 20;

    /// The finding of one check: `figures` in report order (day totals first); the first
    /// [`Self::DETAIL_MAX`] are kept in `detail`.
    pub fn new(
        client: &str,
        day: NaiveDate,
        checked_ms: u64,
        pending_backfill: bool,
        figures: &[DifferingFigure],
    ) -> Self {
        let kept = &figures[..figures.len().min(Self::DETAIL_MAX)];
        Self {
            client_id: client.to_owned(),
            day: time::day_number(day),
            checked_ms,
            mismatches: u32::try_from(figures.len()).unwrap_or(u32::MAX),
            pending_backfill: u8::from(pending_backfill),
            // Serializing plain strings and integers cannot fail.
            detail: serde_json::to_string(kept).unwrap_or_else(|_| "[]".to_owned()),
        }
    }

    /// The figures of `detail`.
    pub fn figures(&self) -> Result<Vec<DifferingFigure>> {
        serde_json::from_str(&self.detail)
            .map_err(|e| crate::StoreError::Invalid(format!("reconcile_findings.detail of {}: {e}", self.client_id)))
    }
}

/// Today's counters of one client behind the data-quality gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QualityCounters {
    pub visits: u64,
    pub visits_utm_missing: u64,
    pub entries: u64,
    pub linked_entries: u64,
}

impl Store {
    /// Records reconcile findings (one row per client day checked).
    pub async fn record_reconcile_findings(&self, rows: &[ReconcileFindingRow]) -> Result<()> {
        self.insert("reconcile_findings", rows).await
    }

    /// The newest reconcile finding of every day of `[from, to]` that was checked, clean ones
    /// included (one primary-key range read of `reconcile_findings`; no raw facts).
    pub async fn reconcile_findings(
        &self,
        client: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<ReconcileFindingRow>> {
        self.fetch_client_days::<ReconcileFindingRow>(
            "SELECT ?fields FROM reconcile_findings FINAL WHERE client_id = ? AND day >= ? AND day <= ? ORDER BY day",
            client,
            from,
            to,
        )
        .await
    }

    /// `daily_totals` counters of the quality gauges for every client and day of `[from, to]`
    /// with a row (summed over partitions; aggregates only).
    pub async fn quality_counters(
        &self,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<(String, u16, QualityCounters)>> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Row {
            client_id: String,
            day: u16,
            visits: u64,
            visits_utm_missing: u64,
            entries: u64,
            linked_entries: u64,
        }
        let rows = self
            .timed(async {
                Ok(self
                    .query(
                        "SELECT client_id, day, sum(visits) AS visits, sum(visits_utm_missing) AS visits_utm_missing, \
                         sum(entries) AS entries, sum(linked_entries) AS linked_entries FROM daily_totals FINAL \
                         WHERE day >= ? AND day <= ? GROUP BY client_id, day ORDER BY client_id, day",
                    )?
                    .bind(d(from))
                    .bind(d(to))
                    .fetch_all::<Row>()
                    .await?)
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let c = QualityCounters {
                    visits: r.visits,
                    visits_utm_missing: r.visits_utm_missing,
                    entries: r.entries,
                    linked_entries: r.linked_entries,
                };
                (r.client_id, r.day, c)
            })
            .collect())
    }
}
