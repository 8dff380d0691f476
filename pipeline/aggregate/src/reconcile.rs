//! `eventflow reconcile`: compare every aggregate with a recount of the raw facts.
//!
//! Compared per client day: the `daily_totals` counters, every `daily_marketing` row, distinct
//! sessions of `daily_sessions`, visits per minute and page, and live viewers per webinar and
//! minute. A difference on a day with late facts awaiting backfill is reported as such (the
//! fix is `eventflow backfill`); any other difference is a bug or lost aggregate rows.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::NaiveDate;

use eventflow_core::time;
use eventflow_store::read::{DifferingFigure, ReconcileFindingRow};
use eventflow_store::recount::Scope;
use eventflow_store::rows::DayCounters;
use eventflow_store::{Store, StoreError};

/// One figure that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub client: String,
    pub day: NaiveDate,
    /// Metric family: `visits`, `unique_sessions`, `entries`, `linked_entries`, `by_page`,
    /// `quality`, `viewer_minutes`, `campaigns`, `sessions`, `minute_visits`, `live`.
    pub metric: &'static str,
    /// Which bucket (empty for day totals).
    pub key: String,
    pub aggregate: u64,
    pub raw: u64,
    /// The day has late facts not yet folded in: run backfill.
    pub pending_backfill: bool,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = if self.key.is_empty() { String::new() } else { format!(" [{}]", self.key) };
        let diff = self.aggregate as i128 - self.raw as i128;
        write!(
            f,
            "{} {} {}{}: aggregate {} raw {} ({diff:+}){}",
            self.client,
            time::format_day(self.day),
            self.metric,
            key,
            self.aggregate,
            self.raw,
            if self.pending_backfill { "  (late facts pending: run eventflow backfill)" } else { "" }
        )
    }
}

/// Every metric family reconcile reports on (so gauges can be reset to 0).
pub const METRICS: [&str; 11] = [
    "visits",
    "unique_sessions",
    "entries",
    "linked_entries",
    "by_page",
    "quality",
    "viewer_minutes",
    "campaigns",
    "sessions",
    "minute_visits",
    "live",
];

fn day_fields(c: &DayCounters) -> [(&'static str, &'static str, u64); 10] {
    [
        ("visits", "", c.visits),
        ("unique_sessions", "", c.unique_sessions),
        ("entries", "", c.entries),
        ("linked_entries", "", c.linked_entries),
        ("by_page", "landing", c.visits_landing),
        ("by_page", "webinar", c.visits_webinar),
        ("by_page", "live", c.visits_live),
        ("quality", "visits_utm_missing", c.visits_utm_missing),
        ("quality", "visits_cid_unresolved", c.visits_cid_unresolved),
        ("viewer_minutes", "", c.viewer_minutes),
    ]
}

/// Reconciles one client over `[from, to]`.
pub async fn client(
    store: &Store,
    client: &str,
    tz: chrono_tz::Tz,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<Vec<Mismatch>, StoreError> {
    let scope = Scope { client_id: client.to_owned(), from, to, tz, cid: None };
    let pending: BTreeSet<u16> = store.pending_late_days(client, from, to).await?.into_iter().collect();
    // Aggregates first, then raw: a fact flushed in between shows up in raw only, and a
    // continuous reconcile confirms differences on a second pass before reporting them.
    let agg_days = store.daily_totals(client, from, to).await?;
    let agg_marketing = store.daily_marketing(client, from, to).await?;
    let agg_sessions = store.day_sessions(client, from, to).await?;
    let (start_ms, _) = time::day_bounds_ms(from, tz);
    let (_, end_ms) = time::day_bounds_ms(to, tz);
    let (from_s, to_s) =
        (u32::try_from(start_ms / 1000).unwrap_or(0), u32::try_from(end_ms / 1000).unwrap_or(u32::MAX));
    let mut agg_minutes: BTreeMap<(u32, i8), u64> = BTreeMap::new();
    for r in store.minute_visits_rows(client, from_s, to_s).await? {
        *agg_minutes.entry((r.minute, r.page)).or_default() += r.visits;
    }
    let mut agg_live: BTreeMap<(String, u32), u64> = BTreeMap::new();
    for r in store.minute_live_rows(client, from_s, to_s).await? {
        *agg_live.entry((r.webinar_id, r.minute)).or_default() += r.viewers;
    }
    let raw = store.recount(&scope, false).await?;

    let mut out = Vec::new();
    let mut push = |day: u16, metric: &'static str, key: String, aggregate: u64, raw: u64| {
        if aggregate != raw {
            out.push(Mismatch {
                client: client.to_owned(),
                day: time::day_from_number(day),
                metric,
                key,
                aggregate,
                raw,
                pending_backfill: pending.contains(&day),
            });
        }
    };
    let raw_days: BTreeMap<u16, DayCounters> = raw.totals.iter().map(|((d, _), c)| (*d, *c)).collect();
    let days: BTreeSet<u16> = agg_days.keys().chain(raw_days.keys()).copied().collect();
    for day in &days {
        let a = agg_days.get(day).copied().unwrap_or_default();
        let r = raw_days.get(day).copied().unwrap_or_default();
        for ((metric, key, av), (_, _, rv)) in day_fields(&a).into_iter().zip(day_fields(&r)) {
            push(*day, metric, key.to_owned(), av, rv);
        }
    }
    let raw_marketing: BTreeMap<_, _> =
        raw.marketing.iter().map(|((d, dims, _), m)| ((*d, dims.clone()), *m)).collect();
    let keys: BTreeSet<_> = agg_marketing.keys().chain(raw_marketing.keys()).cloned().collect();
    for key in keys {
        let a = agg_marketing.get(&key).copied().unwrap_or_default();
        let r = raw_marketing.get(&key).copied().unwrap_or_default();
        let d = &key.1;
        let label = format!(
            "event={} webinar={} cid={} source={} medium={} campaign={}",
            d.event_id, d.webinar_id, d.cid, d.utm_source, d.utm_medium, d.utm_campaign
        );
        for (name, av, rv) in [
            ("visits", a.visits, r.visits),
            ("unique_sessions", a.unique_sessions, r.unique_sessions),
            ("entries", a.entries, r.entries),
            ("linked_entries", a.linked_entries, r.linked_entries),
        ] {
            push(key.0, "campaigns", format!("{label} {name}"), av, rv);
        }
    }
    let keys: BTreeSet<u16> = agg_sessions.keys().chain(raw.day_sessions.keys()).copied().collect();
    for day in keys {
        push(
            day,
            "sessions",
            String::new(),
            agg_sessions.get(&day).copied().unwrap_or(0),
            raw.day_sessions.get(&day).copied().unwrap_or(0),
        );
    }
    let raw_minutes: BTreeMap<(u32, i8), u64> = raw.minutes.iter().map(|((m, p, _), v)| ((*m, *p), *v)).collect();
    let keys: BTreeSet<(u32, i8)> = agg_minutes.keys().chain(raw_minutes.keys()).copied().collect();
    for (minute, page) in keys {
        let day = time::day_number(time::client_day(i64::from(minute) * 1000, tz));
        let page_name = eventflow_store::rows::page_from_code(page).map_or("none", |p| p.as_str());
        push(
            day,
            "minute_visits",
            format!("{} {page_name}", time::format_in_tz(i64::from(minute) * 1000, tz)),
            agg_minutes.get(&(minute, page)).copied().unwrap_or(0),
            raw_minutes.get(&(minute, page)).copied().unwrap_or(0),
        );
    }
    let raw_live: BTreeMap<(String, u32), u64> = raw.live.iter().map(|((w, m, _), v)| ((w.clone(), *m), *v)).collect();
    let keys: BTreeSet<(String, u32)> = agg_live.keys().chain(raw_live.keys()).cloned().collect();
    for (webinar, minute) in keys {
        let day = time::day_number(time::client_day(i64::from(minute) * 1000, tz));
        push(
            day,
            "live",
            format!("{webinar} {}", time::format_in_tz(i64::from(minute) * 1000, tz)),
            agg_live.get(&(webinar.clone(), minute)).copied().unwrap_or(0),
            raw_live.get(&(webinar, minute)).copied().unwrap_or(0),
        );
    }
    Ok(out)
}

/// Mismatch counts per metric family (every family present, zeros included).
pub fn counts(mismatches: &[Mismatch]) -> BTreeMap<&'static str, u64> {
    let mut out: BTreeMap<&'static str, u64> = METRICS.iter().map(|m| (*m, 0)).collect();
    for m in mismatches {
        *out.entry(m.metric).or_default() += 1;
    }
    out
}

/// The findings to record for a check of `client` over `[from, to]` at `checked_ms`: one row per
/// day, with that day's differing figures in report order (a row without figures for a clean
/// day, which ends an earlier doubt).
pub fn findings(
    client: &str,
    from: NaiveDate,
    to: NaiveDate,
    checked_ms: u64,
    mismatches: &[Mismatch],
) -> Vec<ReconcileFindingRow> {
    let mut out = Vec::new();
    let mut day = from;
    while day <= to {
        let of_day: Vec<&Mismatch> = mismatches.iter().filter(|m| m.day == day).collect();
        let figures: Vec<DifferingFigure> = of_day
            .iter()
            .map(|m| DifferingFigure {
                metric: m.metric.to_owned(),
                key: m.key.clone(),
                aggregate: m.aggregate,
                raw: m.raw,
            })
            .collect();
        let pending = of_day.iter().any(|m| m.pending_backfill);
        out.push(ReconcileFindingRow::new(client, day, checked_ms, pending, &figures));
        day += chrono::Duration::days(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mismatch(day: NaiveDate, metric: &'static str, key: &str, aggregate: u64, raw: u64, pending: bool) -> Mismatch {
        Mismatch { client: "acme".into(), day, metric, key: key.into(), aggregate, raw, pending_backfill: pending }
    }

    #[test]
    fn findings_have_a_row_per_day_clean_days_included() {
        let day = |d: u32| NaiveDate::from_ymd_opt(2026, 11, d).expect("date");
        let found = [
            mismatch(day(24), "visits", "", 1660, 1011, false),
            mismatch(day(24), "by_page", "landing", 700, 51, false),
            mismatch(day(25), "live", "w1 2026-11-25T10:05:00+09:00", 0, 3, true),
        ];
        let rows = findings("acme", day(23), day(26), 1_795_654_800_000, &found);
        let summary: Vec<(u16, u32, u8, &str)> =
            rows.iter().map(|r| (r.day, r.mismatches, r.pending_backfill, r.detail.as_str())).collect();
        let n = |d: u32| time::day_number(day(d));
        assert_eq!(
            summary,
            vec![
                (n(23), 0, 0, "[]"),
                (
                    n(24),
                    2,
                    0,
                    r#"[{"metric":"visits","key":"","aggregate":1660,"raw":1011},{"metric":"by_page","key":"landing","aggregate":700,"raw":51}]"#
                ),
                (n(25), 1, 1, r#"[{"metric":"live","key":"w1 2026-11-25T10:05:00+09:00","aggregate":0,"raw":3}]"#),
                (n(26), 0, 0, "[]"),
            ]
        );
        assert!(rows.iter().all(|r| r.client_id == "acme" && r.checked_ms == 1_795_654_800_000));
        assert_eq!(rows[1].figures().expect("detail")[0].aggregate, 1660);
    }

    #[test]
    fn findings_keep_at_most_twenty_figures_but_count_all() {
        let day = NaiveDate::from_ymd_opt(2026, 11, 24).expect("date");
        let found: Vec<Mismatch> =
            (0..50).map(|i| mismatch(day, "minute_visits", &format!("m{i}"), 0, 1, false)).collect();
        let rows = findings("acme", day, day, 1, &found);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].mismatches, 50);
        let figures = rows[0].figures().expect("detail");
        assert_eq!(figures.len(), 20);
        assert_eq!((figures[0].key.as_str(), figures[19].key.as_str()), ("m0", "m19"));
    }
}
