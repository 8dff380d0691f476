//! The per-client overview: aggregate first, raw fallback per section, provenance and freshness.
//!
//! All aggregate reads of a request run concurrently. A section is served from aggregates only
//! when its reads succeeded, no day of the range has late facts awaiting backfill, every day with
//! counted facts has its `daily_totals` row, and the section's aggregate agrees with
//! `daily_totals` where they overlap (a missing or partly deleted aggregate shows up as a
//! disagreement). Otherwise the section is recounted from raw facts; if that fails
//! too the section is `error` with its zero value and the response is still 200.
//!
//! The cross-checks cannot see an aggregate that is wrong in the same way everywhere. What the
//! continuous reconcile found (confirmed differences between aggregates and a raw recount, per
//! client day, in `reconcile_findings`) is read with the aggregates and reported as
//! `meta.doubt`: which days, which figures, both values, when they were checked.
//!
//! `link_clicks` is not derived from facts: a click on `GET /r/{cid}` is counted by the
//! collector and written to `link_clicks` every few seconds (`collector.link_clicks_flush`).
//! The section is that table's sum over the range's minutes (`aggregated`), or `error` with no
//! rows when it cannot be read; there is no raw fallback because there are no raw clicks.

use std::collections::{BTreeMap, BTreeSet};

use chrono::NaiveDate;
use chrono_tz::Tz;
use serde::Serialize;
use tracing::warn;

use eventflow_core::time;
use eventflow_store::links::LinkClicks;
use eventflow_store::read::{
    rank_campaigns, CampaignSums, CampaignTotals, DifferingFigure, LiveMinute, MarketingDay, ReconcileFindingRow,
};
use eventflow_store::recount::{Recount, Scope};
use eventflow_store::rows::DayCounters;
use eventflow_store::{Result as StoreResult, Store};

/// Where a section's numbers came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Aggregated,
    Raw,
    Error,
}

/// The sections of the overview, in response order.
pub const SECTIONS: [&str; 7] = ["totals", "by_page", "by_day", "campaigns", "link_clicks", "live", "quality"];

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub visits: u64,
    pub unique_sessions: u64,
    pub entries: u64,
    pub linked_entries: u64,
    pub conversion_rate: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ByPage {
    pub landing: u64,
    pub webinar: u64,
    pub live: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DayRow {
    pub date: String,
    pub visits: u64,
    pub unique_sessions: u64,
    pub entries: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CampaignRow {
    pub cid: String,
    pub utm_source: String,
    pub utm_medium: String,
    pub utm_campaign: String,
    pub visits: u64,
    pub entries: u64,
}

/// Clicks on one tracked campaign link (`GET /r/{cid}` answered `302`) in the range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkClicksRow {
    pub cid: String,
    pub clicks: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LiveRow {
    pub webinar_id: String,
    pub peak_concurrent: u64,
    pub peak_minute: String,
    pub viewer_minutes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Quality {
    pub session_link_rate: f64,
    pub utm_missing_ratio: f64,
    pub unresolved_cid_ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Meta {
    pub response_time_ms: u64,
    pub generated_at: String,
    pub data_sources: BTreeMap<&'static str, Source>,
    pub watermark: Option<String>,
    pub staleness_seconds: Option<f64>,
    /// Days of the range whose newest reconcile check found the aggregates differing from the
    /// raw facts; absent when there are none (or they could not be read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub doubt: Option<Doubt>,
}

/// Days in doubt: the continuous reconcile confirmed differences between the aggregates and a
/// recount of the raw facts, and no later check found the day clean.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Doubt {
    /// The newest check among the listed days.
    pub checked_at: String,
    /// Oldest first.
    pub days: Vec<DoubtDay>,
}

/// One client day in doubt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DoubtDay {
    pub date: String,
    /// When the check that found the differences ran.
    pub checked_at: String,
    /// The day has late facts not yet folded in: the automatic backfill will fix it.
    pub pending_backfill: bool,
    /// How many figures differ (`figures` lists at most 20, day totals first).
    pub figures_total: u64,
    pub figures: Vec<DifferingFigure>,
}

/// The days of `findings` (newest check per day) that differ, in client-time-zone notation.
pub fn doubt(findings: &[ReconcileFindingRow], tz: Tz) -> Option<Doubt> {
    let at = |ms: u64| time::format_in_tz(i64::try_from(ms).unwrap_or(i64::MAX), tz);
    let mut in_doubt: Vec<&ReconcileFindingRow> = findings.iter().filter(|f| f.mismatches > 0).collect();
    in_doubt.sort_by_key(|f| f.day);
    let newest = in_doubt.iter().map(|f| f.checked_ms).max()?;
    let days = in_doubt
        .into_iter()
        .map(|f| DoubtDay {
            date: time::format_day(time::day_from_number(f.day)),
            checked_at: at(f.checked_ms),
            pending_backfill: f.pending_backfill != 0,
            figures_total: u64::from(f.mismatches),
            // An unreadable detail still names the day and how many figures differ.
            figures: f.figures().unwrap_or_default(),
        })
        .collect();
    Some(Doubt { checked_at: at(newest), days })
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OverviewResponse {
    pub client_id: String,
    pub from: String,
    pub to: String,
    pub timezone: String,
    pub totals: Totals,
    pub by_page: ByPage,
    pub by_day: Vec<DayRow>,
    pub campaigns: Vec<CampaignRow>,
    pub link_clicks: Vec<LinkClicksRow>,
    pub live: Vec<LiveRow>,
    pub quality: Quality,
    pub meta: Meta,
}

/// Rounds a ratio for presentation (4 decimals).
fn ratio(num: u64, den: u64, when_empty: f64) -> f64 {
    if den == 0 {
        return when_empty;
    }
    (num as f64 / den as f64 * 10_000.0).round() / 10_000.0
}

/// Figures of the day-based sections, from aggregates or raw facts.
#[derive(Debug, Default)]
struct DayData {
    counters: BTreeMap<u16, DayCounters>,
    range_sessions: u64,
    day_sessions: BTreeMap<u16, u64>,
}

impl DayData {
    /// The range's counters (its `unique_sessions` is not the range's: use `range_sessions`).
    fn sum(&self) -> DayCounters {
        self.counters.values().fold(DayCounters::default(), |mut a, c| {
            a += *c;
            a
        })
    }

    fn totals(&self) -> Totals {
        let s = self.sum();
        Totals {
            visits: s.visits,
            unique_sessions: self.range_sessions,
            entries: s.entries,
            linked_entries: s.linked_entries,
            conversion_rate: ratio(s.entries, self.range_sessions, 0.0),
        }
    }

    fn by_page(&self) -> ByPage {
        let s = self.sum();
        ByPage { landing: s.visits_landing, webinar: s.visits_webinar, live: s.visits_live }
    }

    fn by_day(&self, days: &[NaiveDate]) -> Vec<DayRow> {
        days.iter()
            .map(|d| {
                let n = time::day_number(*d);
                let c = self.counters.get(&n).copied().unwrap_or_default();
                DayRow {
                    date: time::format_day(*d),
                    visits: c.visits,
                    unique_sessions: self.day_sessions.get(&n).copied().unwrap_or(0),
                    entries: c.entries,
                }
            })
            .collect()
    }

    fn quality(&self) -> Quality {
        let s = self.sum();
        Quality {
            session_link_rate: ratio(s.linked_entries, s.entries, 1.0),
            utm_missing_ratio: ratio(s.visits_utm_missing, s.visits, 0.0),
            unresolved_cid_ratio: ratio(s.visits_cid_unresolved, s.visits, 0.0),
        }
    }
}

fn campaign_rows(rows: Vec<CampaignTotals>) -> Vec<CampaignRow> {
    rows.into_iter()
        .map(|r| CampaignRow {
            cid: r.cid,
            utm_source: r.utm_source,
            utm_medium: r.utm_medium,
            utm_campaign: r.utm_campaign,
            visits: r.visits,
            entries: r.entries,
        })
        .collect()
}

/// Peak, peak minute and viewer-minutes per webinar; busiest webinars first.
pub fn live_rows(minutes: &[LiveMinute], tz: Tz) -> Vec<LiveRow> {
    let mut by_webinar: BTreeMap<&str, (u64, u32, u64)> = BTreeMap::new();
    for m in minutes {
        let e = by_webinar.entry(&m.webinar_id).or_insert((0, u32::MAX, 0));
        if m.viewers > e.0 || (m.viewers == e.0 && m.minute < e.1) {
            e.0 = m.viewers;
            e.1 = m.minute;
        }
        e.2 += m.viewers;
    }
    let mut rows: Vec<LiveRow> = by_webinar
        .into_iter()
        .filter(|(_, (peak, _, _))| *peak > 0)
        .map(|(w, (peak, minute, total))| LiveRow {
            webinar_id: w.to_owned(),
            peak_concurrent: peak,
            peak_minute: time::format_in_tz(i64::from(minute) * 1000, tz),
            viewer_minutes: total,
        })
        .collect();
    rows.sort_by(|a, b| b.viewer_minutes.cmp(&a.viewer_minutes).then(a.webinar_id.cmp(&b.webinar_id)));
    rows
}

/// Whether live viewer-minutes per client day equal `daily_totals.viewer_minutes`: a missing
/// or partly deleted `minute_live` shows up as a disagreement.
pub fn live_agrees(days: &BTreeMap<u16, DayCounters>, minutes: &[LiveMinute], tz: Tz) -> bool {
    let mut per_day: BTreeMap<u16, u64> = BTreeMap::new();
    for m in minutes {
        *per_day.entry(time::day_number(time::client_day(i64::from(m.minute) * 1000, tz))).or_default() += m.viewers;
    }
    let keys: BTreeSet<u16> = days.keys().chain(per_day.keys()).copied().collect();
    keys.iter().all(|k| days.get(k).map_or(0, |c| c.viewer_minutes) == per_day.get(k).copied().unwrap_or(0))
}

/// A request for an overview.
#[derive(Debug, Clone)]
pub struct OverviewQuery {
    pub client_id: String,
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub tz: Tz,
    pub campaign_limit: u32,
}

impl OverviewQuery {
    pub fn days(&self) -> Vec<NaiveDate> {
        eventflow_store::recount::days(&Scope {
            client_id: self.client_id.clone(),
            from: self.from,
            to: self.to,
            tz: self.tz,
            cid: None,
        })
    }

    /// `[start, end)` of the range in unix seconds.
    pub fn seconds(&self) -> (u32, u32) {
        let (start, _) = time::day_bounds_ms(self.from, self.tz);
        let (_, end) = time::day_bounds_ms(self.to, self.tz);
        (u32::try_from(start / 1000).unwrap_or(0), u32::try_from(end / 1000).unwrap_or(u32::MAX))
    }
}

/// Sections with their sources, before metadata.
#[derive(Debug)]
pub struct Sections {
    pub totals: Totals,
    pub by_page: ByPage,
    pub by_day: Vec<DayRow>,
    pub campaigns: Vec<CampaignRow>,
    pub link_clicks: Vec<LinkClicksRow>,
    pub live: Vec<LiveRow>,
    pub quality: Quality,
    pub sources: BTreeMap<&'static str, Source>,
    /// For `meta.doubt`.
    pub doubt: Option<Doubt>,
}

/// Computes every section of `q` (the decision rules are in the module docs).
pub async fn sections(store: &Store, q: &OverviewQuery) -> Sections {
    let c = q.client_id.as_str();
    let (from_s, to_s) = q.seconds();
    let (days, fact_days, sessions, marketing, live, pending, findings, clicks) = tokio::join!(
        store.daily_totals(c, q.from, q.to),
        store.fact_days(c, q.from, q.to),
        store.sessions(c, q.from, q.to),
        store.campaigns(c, q.from, q.to, q.campaign_limit),
        store.live_minutes(c, None, from_s, to_s),
        store.pending_late_days(c, q.from, q.to),
        store.reconcile_findings(c, q.from, q.to),
        store.link_clicks(c, from_s, to_s),
    );
    let doubt = match findings {
        Ok(f) => doubt(&f, q.tz),
        Err(e) => {
            warn!(error = %e, client_id = %c, "reading reconcile findings failed; meta.doubt left out");
            None
        }
    };
    let complete = matches!(&pending, Ok(p) if p.is_empty());
    let list = q.days();

    // Cross-checks against daily_totals.
    let sessions_agree = match (&days, &sessions) {
        (Ok(d), Ok((s, _))) => {
            let keys: BTreeSet<u16> = d.keys().chain(s.keys()).copied().collect();
            keys.iter().all(|k| d.get(k).map_or(0, |c| c.unique_sessions) == s.get(k).copied().unwrap_or(0))
        }
        _ => false,
    };
    let marketing_agrees = match (&days, &marketing) {
        (Ok(d), Ok((_, m))) => {
            let keys: BTreeSet<u16> = d.keys().chain(m.keys()).copied().collect();
            keys.iter().all(|k| {
                let t = d.get(k).copied().unwrap_or_default();
                let md = m.get(k).copied().unwrap_or(MarketingDay::default());
                t.visits == md.visits && t.entries == md.entries
            })
        }
        _ => false,
    };
    let live_agrees = match (&days, &live) {
        (Ok(d), Ok(l)) => live_agrees(d, l, q.tz),
        _ => false,
    };

    // daily_totals is the reference of the other checks, so it is checked against the facts:
    // every day with counted facts must have its row.
    let totals_present = match (&days, &fact_days) {
        (Ok(d), Ok(f)) => f.iter().all(|day| d.contains_key(day)),
        _ => false,
    };
    let day_ok = complete && totals_present;
    let agg_day_data = match (&days, &sessions) {
        (Ok(d), Ok((s, r))) => Some(DayData { counters: d.clone(), range_sessions: *r, day_sessions: s.clone() }),
        (Ok(d), _) => Some(DayData { counters: d.clone(), ..DayData::default() }),
        _ => None,
    };
    let use_agg = [
        ("totals", day_ok && sessions_agree),
        ("by_page", day_ok),
        ("by_day", day_ok && sessions_agree),
        ("campaigns", day_ok && marketing_agrees),
        ("live", day_ok && live_agrees),
        ("quality", day_ok),
    ];

    // One raw recount serves every section that needs it.
    let mut raw: Option<StoreResult<Recount>> = None;
    if use_agg.iter().any(|(_, ok)| !ok) {
        let scope = Scope { client_id: q.client_id.clone(), from: q.from, to: q.to, tz: q.tz, cid: None };
        raw = Some(store.recount(&scope, false).await);
    }
    let raw_day_data = match &raw {
        Some(Ok(r)) => Some(DayData {
            counters: r.totals.iter().map(|((d, _), c)| (*d, *c)).collect(),
            range_sessions: r.range_sessions,
            day_sessions: r.day_sessions.clone(),
        }),
        _ => None,
    };

    let mut sources = BTreeMap::new();
    let mut pick = |name: &'static str| -> (Source, Option<&DayData>) {
        let agg = use_agg.iter().find(|(n, _)| *n == name).is_some_and(|(_, ok)| *ok);
        let (source, data) = if agg {
            (Source::Aggregated, agg_day_data.as_ref())
        } else if raw_day_data.is_some() {
            (Source::Raw, raw_day_data.as_ref())
        } else {
            (Source::Error, None)
        };
        sources.insert(name, source);
        (source, data)
    };

    let totals = pick("totals").1.map(DayData::totals).unwrap_or_default();
    let by_page = pick("by_page").1.map(DayData::by_page).unwrap_or_default();
    let by_day = pick("by_day").1.map(|d| d.by_day(&list)).unwrap_or_else(|| DayData::default().by_day(&list));
    let quality = pick("quality").1.map(DayData::quality).unwrap_or_default();
    let campaigns = match pick("campaigns").0 {
        Source::Aggregated => campaign_rows(marketing.map(|(c, _)| c).unwrap_or_default()),
        Source::Raw => raw_campaigns(raw.as_ref(), q.campaign_limit),
        Source::Error => Vec::new(),
    };
    let live = match pick("live").0 {
        Source::Aggregated => live_rows(&live.unwrap_or_default(), q.tz),
        Source::Raw => match &raw {
            Some(Ok(r)) => {
                let mut per: BTreeMap<(String, u32), u64> = BTreeMap::new();
                for ((w, m, _), v) in &r.live {
                    *per.entry((w.clone(), *m)).or_default() += v;
                }
                let minutes: Vec<LiveMinute> = per
                    .into_iter()
                    .map(|((webinar_id, minute), viewers)| LiveMinute { webinar_id, minute, viewers })
                    .collect();
                live_rows(&minutes, q.tz)
            }
            _ => Vec::new(),
        },
        Source::Error => Vec::new(),
    };
    let link_clicks = match clicks {
        Ok(rows) => {
            sources.insert("link_clicks", Source::Aggregated);
            link_click_rows(rows, q.campaign_limit)
        }
        Err(e) => {
            warn!(error = %e, client_id = %c, "reading link clicks failed");
            sources.insert("link_clicks", Source::Error);
            Vec::new()
        }
    };
    Sections { totals, by_page, by_day, campaigns, link_clicks, live, quality, sources, doubt }
}

/// The link-clicks section: most clicks first, then by cid, at most `limit` rows.
pub fn link_click_rows(mut rows: Vec<LinkClicks>, limit: u32) -> Vec<LinkClicksRow> {
    rows.retain(|r| r.clicks > 0);
    rows.sort_by(|a, b| b.clicks.cmp(&a.clicks).then_with(|| a.cid.cmp(&b.cid)));
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    rows.into_iter().map(|r| LinkClicksRow { cid: r.cid, clicks: r.clicks }).collect()
}

fn raw_campaigns(raw: Option<&StoreResult<Recount>>, limit: u32) -> Vec<CampaignRow> {
    let Some(Ok(r)) = raw else { return Vec::new() };
    let mut per = CampaignSums::new();
    for ((_, dims, _), m) in &r.marketing {
        let e = per
            .entry((dims.cid.clone(), dims.utm_source.clone(), dims.utm_medium.clone(), dims.utm_campaign.clone()))
            .or_default();
        e.0 += m.visits;
        e.1 += m.entries;
        e.2 += m.linked_entries;
    }
    campaign_rows(rank_campaigns(per, limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_peaks_take_the_earliest_busiest_minute() {
        let m = |w: &str, minute: u32, viewers: u64| LiveMinute { webinar_id: w.into(), minute, viewers };
        let rows =
            live_rows(&[m("w1", 600, 3), m("w1", 660, 5), m("w1", 720, 5), m("w2", 600, 1)], chrono_tz::Asia::Seoul);
        assert_eq!(
            rows[0],
            LiveRow {
                webinar_id: "w1".into(),
                peak_concurrent: 5,
                peak_minute: "1970-01-01T09:11:00+09:00".into(),
                viewer_minutes: 13
            }
        );
        assert_eq!(rows[1].viewer_minutes, 1);
    }

    #[test]
    fn doubt_lists_the_days_whose_newest_check_differs() {
        let day = |d: u32| time::day_number(NaiveDate::from_ymd_opt(2026, 11, d).expect("date"));
        let figure = DifferingFigure { metric: "visits".into(), key: String::new(), aggregate: 1660, raw: 1011 };
        let row = |d: u32, checked_ms: u64, mismatches: u32, pending: u8, detail: String| ReconcileFindingRow {
            client_id: "acme".into(),
            day: day(d),
            checked_ms,
            mismatches,
            pending_backfill: pending,
            detail,
        };
        let one = serde_json::to_string(&[&figure]).expect("json");
        // 2026-11-26T01:00:00Z = 10:00 in Seoul.
        let t = 1_795_654_800_000;
        let findings = [
            row(25, t + 60_000, 3, 1, one.clone()),
            row(23, t, 0, 0, "[]".into()),
            row(24, t, 1, 0, one.clone()),
            row(26, t, 2, 0, "not json".into()),
        ];
        let d = doubt(&findings, chrono_tz::Asia::Seoul).expect("days in doubt");
        assert_eq!(d.checked_at, "2026-11-26T10:01:00+09:00");
        let summary: Vec<(&str, &str, bool, u64, usize)> = d
            .days
            .iter()
            .map(|x| (x.date.as_str(), x.checked_at.as_str(), x.pending_backfill, x.figures_total, x.figures.len()))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("2026-11-24", "2026-11-26T10:00:00+09:00", false, 1, 1),
                ("2026-11-25", "2026-11-26T10:01:00+09:00", true, 3, 1),
                ("2026-11-26", "2026-11-26T10:00:00+09:00", false, 2, 0),
            ]
        );
        assert_eq!(d.days[0].figures, vec![figure]);
        let json = serde_json::to_value(&d).expect("json");
        assert_eq!(
            json["days"][0],
            serde_json::json!({"date": "2026-11-24", "checked_at": "2026-11-26T10:00:00+09:00",
                               "pending_backfill": false, "figures_total": 1,
                               "figures": [{"metric": "visits", "key": "", "aggregate": 1660, "raw": 1011}]})
        );
        // Clean days only, or nothing checked: no doubt.
        assert_eq!(doubt(&findings[1..2], chrono_tz::Asia::Seoul), None);
        assert_eq!(doubt(&[], chrono_tz::Asia::Seoul), None);
    }

    #[test]
    fn link_clicks_rank_by_clicks_then_cid_within_the_limit() {
        let r = |cid: &str, clicks: u64| LinkClicks { cid: cid.into(), clicks };
        let rows = link_click_rows(vec![r("b", 2), r("z", 0), r("c", 5), r("a", 2)], 100);
        let got: Vec<(&str, u64)> = rows.iter().map(|x| (x.cid.as_str(), x.clicks)).collect();
        assert_eq!(got, vec![("c", 5), ("a", 2), ("b", 2)]);
        assert_eq!(link_click_rows(vec![r("b", 2), r("c", 5), r("a", 2)], 2).len(), 2);
        assert_eq!(serde_json::to_value(&rows[0]).expect("json"), serde_json::json!({"cid": "c", "clicks": 5}));
    }

    #[test]
    fn ratios_and_empty_ranges() {
        let d = DayData::default();
        assert_eq!(d.totals().conversion_rate, 0.0);
        assert_eq!(d.quality().session_link_rate, 1.0);
        assert_eq!(d.quality().utm_missing_ratio, 0.0);
        assert_eq!(ratio(1, 3, 0.0), 0.3333);
    }
}
