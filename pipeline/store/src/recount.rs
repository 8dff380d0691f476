//! Recount of raw facts: the truth every aggregate is compared with.
//!
//! Used by the reader API's raw fallback, by `eventflow reconcile` and by `eventflow backfill`.
//! The rules are the contract's (CONTRACT.md §1, §4) and the processor's (`state.rs`):
//! - a visit counts once per `(client_id, event_uid)`: the copy processed first (lowest `seq`);
//!   every visit without `event_uid` counts; `FINAL` folds a fact stored twice;
//! - unique sessions are distinct sessions of counted visits;
//! - an entry counts once per `(client_id, entry_id)` (lowest `seq`) and is linked when any visit
//!   of its session is at or before its event time (computed in Rust: no JOIN on 18.16);
//! - live viewers of a minute are distinct pinging sessions.
//!
//! Copies of one `event_uid` / `entry_id` are looked for within 31 days around the range.
//!
//! With `by_partition`, every figure is also split by Kafka partition, which is what backfill
//! writes (rows are per partition, see `sql/002_aggregates.sql`).

use std::collections::{BTreeMap, HashMap};

use chrono::NaiveDate;
use chrono_tz::Tz;

use eventflow_core::time;

use crate::rows::{DayCounters, MarketingCounters, MarketingDims};
use crate::{bind_all, in_placeholders, Result, Store};

/// Days of copies considered around a range when deduplicating.
const DEDUP_MARGIN_DAYS: i64 = 31;

/// A client and an inclusive range of its days.
#[derive(Debug, Clone)]
pub struct Scope {
    pub client_id: String,
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub tz: Tz,
    /// Restrict to facts attributed to this campaign link id (backfill of a campaign).
    pub cid: Option<String>,
}

/// A bound value of a recount query.
#[derive(Debug, Clone)]
enum Arg {
    Str(String),
}

impl Scope {
    fn day(d: NaiveDate) -> String {
        time::format_day(d)
    }

    fn margin(&self) -> (String, String) {
        (
            Self::day(self.from - chrono::Duration::days(DEDUP_MARGIN_DAYS)),
            Self::day(self.to + chrono::Duration::days(DEDUP_MARGIN_DAYS)),
        )
    }

    fn cid_filter(&self, args: &mut Vec<Arg>) -> &'static str {
        match &self.cid {
            Some(c) => {
                // Facts attributed to this link: its own resolved cid (a cid of another client's
                // link aggregates under `unresolved`, not here).
                args.push(Arg::Str(c.clone()));
                " AND cid = ? AND cid_resolved = 1"
            }
            None => "",
        }
    }

    /// Counted visits of the scope with the columns recounts need.
    fn counted_visits(&self, args: &mut Vec<Arg>) -> String {
        let cols = "day, kafka_partition, page, session_id, event_time, event_id, webinar_id, cid, cid_resolved, utm_source, utm_medium, utm_campaign";
        let (lo, hi) = self.margin();
        let mut sql = format!(
            "SELECT {cols} FROM facts FINAL WHERE client_id = ? AND kind = 'visit' AND event_uid = '' AND day >= ? AND day <= ?"
        );
        args.extend([Arg::Str(self.client_id.clone()), Arg::Str(Self::day(self.from)), Arg::Str(Self::day(self.to))]);
        sql.push_str(self.cid_filter(args));
        let picks: Vec<String> =
            cols.split(", ").enumerate().map(|(i, c)| format!("tupleElement(w, {}) AS {c}", i + 1)).collect();
        sql.push_str(&format!(
            " UNION ALL SELECT {} FROM (SELECT argMin(tuple({cols}), seq) AS w FROM facts FINAL \
             WHERE client_id = ? AND kind = 'visit' AND day >= ? AND day <= ? AND event_uid IN \
             (SELECT event_uid FROM facts WHERE client_id = ? AND kind = 'visit' AND event_uid != '' AND day >= ? AND day <= ?) \
             GROUP BY event_uid) WHERE day >= ? AND day <= ?",
            picks.join(", ")
        ));
        args.extend([
            Arg::Str(self.client_id.clone()),
            Arg::Str(lo),
            Arg::Str(hi),
            Arg::Str(self.client_id.clone()),
            Arg::Str(Self::day(self.from)),
            Arg::Str(Self::day(self.to)),
            Arg::Str(Self::day(self.from)),
            Arg::Str(Self::day(self.to)),
        ]);
        if self.cid.is_some() {
            // The winning copy decides the attribution.
            sql.push_str(self.cid_filter(args));
        }
        sql
    }
}

/// Raw recount of one scope.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recount {
    /// Per (day, partition): counters. Partition is 0 unless `by_partition`.
    pub totals: BTreeMap<(u16, u16), DayCounters>,
    /// Per (day, dims, partition).
    pub marketing: BTreeMap<(u16, MarketingDims, u16), MarketingCounters>,
    /// Per (minute unix seconds, page code, partition): visits.
    pub minutes: BTreeMap<(u32, i8, u16), u64>,
    /// Per (webinar, minute unix seconds, partition): viewers.
    pub live: BTreeMap<(String, u32, u16), u64>,
    /// Distinct sessions with a counted visit per day (all partitions).
    pub day_sessions: BTreeMap<u16, u64>,
    /// Distinct sessions with a counted visit over the whole range.
    pub range_sessions: u64,
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct VisitGroup {
    day: u16,
    kafka_partition: u16,
    page: i8,
    event_id: String,
    webinar_id: String,
    cid_label: String,
    src: String,
    med: String,
    camp: String,
    visits: u64,
    sessions: u64,
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct DaySessions {
    day: u16,
    kafka_partition: u16,
    sessions: u64,
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct DayPartition {
    day: u16,
    kafka_partition: u16,
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct MinuteGroup {
    minute: u32,
    page: i8,
    kafka_partition: u16,
    visits: u64,
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct EntryWinner {
    day: u16,
    kafka_partition: u16,
    session_id: String,
    event_time_ms: i64,
    event_id: String,
    webinar_id: String,
    cid_label: String,
    src: String,
    med: String,
    camp: String,
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct LiveGroup {
    day: u16,
    kafka_partition: u16,
    webinar_id: String,
    minute: u32,
    viewers: u64,
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct SessionMin {
    session_id: String,
    first: i64,
}

const LABELS: &str = "if(cid_resolved = 1 AND cid != '', cid, 'unresolved') AS cid_label, \
    if(utm_source = '', 'unknown', utm_source) AS src, if(utm_medium = '', 'unknown', utm_medium) AS med, \
    if(utm_campaign = '', 'unknown', utm_campaign) AS camp";

fn bind(q: clickhouse::query::Query, args: Vec<Arg>) -> clickhouse::query::Query {
    args.into_iter().fold(q, |q, a| match a {
        Arg::Str(s) => q.bind(s),
    })
}

impl Store {
    /// Recounts `scope` from raw facts. With `by_partition` every figure is split by Kafka
    /// partition (what backfill writes); otherwise partition is 0 throughout.
    pub async fn recount(&self, scope: &Scope, by_partition: bool) -> Result<Recount> {
        let part = if by_partition { "kafka_partition" } else { "toUInt16(0)" };
        let mut out = Recount::default();

        // Every query below is independent (the first-visit lookups follow the entries query):
        // they run concurrently, so a recount takes as long as its slowest query.
        let visit_query = |select: &str| {
            let mut args = Vec::new();
            let visits = scope.counted_visits(&mut args);
            (select.replace("{visits}", &visits), args)
        };
        // Visits by day, page and marketing dimensions.
        let (groups_sql, groups_args) = visit_query(&format!(
            "SELECT day, {part} AS kafka_partition, page, event_id, webinar_id, {LABELS}, count() AS visits, uniqExact(session_id) AS sessions \
             FROM ({{visits}}) GROUP BY day, kafka_partition, page, event_id, webinar_id, cid_label, src, med, camp"
        ));
        // Distinct sessions per day (and partition) and over the range.
        let (day_sql, day_args) = visit_query(&format!(
            "SELECT day, {part} AS kafka_partition, uniqExact(session_id) AS sessions FROM ({{visits}}) GROUP BY day, kafka_partition"
        ));
        let (all_day_sql, all_day_args) = visit_query(
            "SELECT day, toUInt16(0) AS kafka_partition, uniqExact(session_id) AS sessions FROM ({visits}) GROUP BY day",
        );
        let (range_sql, range_args) = visit_query("SELECT uniqExact(session_id) FROM ({visits})");
        // Visits per minute and page.
        let (minutes_sql, minutes_args) = visit_query(&format!(
            "SELECT toUInt32(toStartOfMinute(event_time)) AS minute, page, {part} AS kafka_partition, count() AS visits \
             FROM ({{visits}}) GROUP BY minute, page, kafka_partition"
        ));
        // Marketing rows: unique sessions of a dims group over all pages needs its own distinct
        // count, so regroup without page.
        let (marketing_sql, marketing_args) = visit_query(&format!(
            "SELECT day, {part} AS kafka_partition, toInt8(0) AS page, event_id, webinar_id, {LABELS}, count() AS visits, uniqExact(session_id) AS sessions \
             FROM ({{visits}}) GROUP BY day, kafka_partition, event_id, webinar_id, cid_label, src, med, camp"
        ));
        let (
            fact_days,
            groups,
            day_sessions,
            all_day_sessions,
            range_sessions,
            minutes,
            marketing,
            (entries, first_visit),
            live,
        ) = tokio::try_join!(
            self.fact_day_partitions(scope, part),
            self.timed(async { Ok(bind(self.query(&groups_sql)?, groups_args).fetch_all::<VisitGroup>().await?) }),
            self.timed(async { Ok(bind(self.query(&day_sql)?, day_args).fetch_all::<DaySessions>().await?) }),
            self.timed(async { Ok(bind(self.query(&all_day_sql)?, all_day_args).fetch_all::<DaySessions>().await?) }),
            self.timed(async { Ok(bind(self.query(&range_sql)?, range_args).fetch_one::<u64>().await?) }),
            self.timed(async { Ok(bind(self.query(&minutes_sql)?, minutes_args).fetch_all::<MinuteGroup>().await?) }),
            self.timed(async {
                Ok(bind(self.query(&marketing_sql)?, marketing_args).fetch_all::<VisitGroup>().await?)
            }),
            self.entries_with_first_visits(scope),
            self.live_groups(scope, part),
        )?;
        out.range_sessions = range_sessions;

        // Every day with a stored fact has a totals row, zeros when all of them are duplicates
        // (the processor writes it too; the reader checks that such a row exists).
        for d in fact_days {
            out.totals.entry((d.day, d.kafka_partition)).or_default();
        }

        for g in &groups {
            let t = out.totals.entry((g.day, g.kafka_partition)).or_default();
            t.visits += g.visits;
            match g.page {
                1 => t.visits_landing += g.visits,
                2 => t.visits_webinar += g.visits,
                _ => t.visits_live += g.visits,
            }
            if g.src == "unknown" {
                t.visits_utm_missing += g.visits;
            }
            if g.cid_label == "unresolved" {
                t.visits_cid_unresolved += g.visits;
            }
        }
        for g in marketing {
            let dims = MarketingDims {
                event_id: g.event_id,
                webinar_id: g.webinar_id,
                cid: g.cid_label,
                utm_source: g.src,
                utm_medium: g.med,
                utm_campaign: g.camp,
            };
            let m = out.marketing.entry((g.day, dims, g.kafka_partition)).or_default();
            m.visits += g.visits;
            m.unique_sessions += g.sessions;
        }
        for s in day_sessions {
            out.totals.entry((s.day, s.kafka_partition)).or_default().unique_sessions = s.sessions;
        }
        for s in all_day_sessions {
            out.day_sessions.insert(s.day, s.sessions);
        }
        for m in minutes {
            *out.minutes.entry((m.minute, m.page, m.kafka_partition)).or_default() += m.visits;
        }

        for e in entries {
            let linked = first_visit.get(&e.session_id).is_some_and(|first| *first <= e.event_time_ms);
            let p = if by_partition { e.kafka_partition } else { 0 };
            let t = out.totals.entry((e.day, p)).or_default();
            t.entries += 1;
            t.linked_entries += u64::from(linked);
            let dims = MarketingDims {
                event_id: e.event_id,
                webinar_id: e.webinar_id,
                cid: e.cid_label,
                utm_source: e.src,
                utm_medium: e.med,
                utm_campaign: e.camp,
            };
            let m = out.marketing.entry((e.day, dims, p)).or_default();
            m.entries += 1;
            m.linked_entries += u64::from(linked);
        }

        for l in live {
            out.totals.entry((l.day, l.kafka_partition)).or_default().viewer_minutes += l.viewers;
            out.live.insert((l.webinar_id, l.minute, l.kafka_partition), l.viewers);
        }
        Ok(out)
    }

    /// Counted entries of `scope` (lowest `seq` per `entry_id`) and the earliest visit of each of
    /// their sessions (any day: a visit long before the range still links).
    async fn entries_with_first_visits(&self, scope: &Scope) -> Result<(Vec<EntryWinner>, HashMap<String, i64>)> {
        let (lo, hi) = scope.margin();
        let cols = "day, kafka_partition, session_id, event_time_ms, event_id, webinar_id, cid, cid_resolved, utm_source, utm_medium, utm_campaign";
        let picks: Vec<String> =
            cols.split(", ").enumerate().map(|(i, c)| format!("tupleElement(w, {}) AS {c}", i + 1)).collect();
        let mut args = vec![
            Arg::Str(scope.client_id.clone()),
            Arg::Str(lo),
            Arg::Str(hi),
            Arg::Str(scope.client_id.clone()),
            Arg::Str(Scope::day(scope.from)),
            Arg::Str(Scope::day(scope.to)),
        ];
        let mut sql = format!(
            "SELECT day, kafka_partition, session_id, event_time_ms, event_id, webinar_id, {LABELS} FROM (\
             SELECT {} FROM (SELECT argMin(tuple({cols}), seq) AS w FROM facts FINAL \
             WHERE client_id = ? AND kind = 'entry' AND day >= ? AND day <= ? AND entry_id IN \
             (SELECT entry_id FROM facts WHERE client_id = ? AND kind = 'entry' AND day >= ? AND day <= ?) GROUP BY entry_id)) \
             WHERE day >= ? AND day <= ?",
            picks.join(", ")
        );
        args.extend([Arg::Str(Scope::day(scope.from)), Arg::Str(Scope::day(scope.to))]);
        sql.push_str(scope.cid_filter(&mut args));
        let entries = self.timed(async { Ok(bind(self.query(&sql)?, args).fetch_all::<EntryWinner>().await?) }).await?;
        let sessions: Vec<String> = {
            let mut s: Vec<String> = entries.iter().map(|e| e.session_id.clone()).collect();
            s.sort();
            s.dedup();
            s
        };
        let mut first_visit: HashMap<String, i64> = HashMap::new();
        for chunk in sessions.chunks(1000) {
            let sql = format!(
                "SELECT session_id, min(event_time_ms) AS first FROM facts WHERE client_id = ? AND kind = 'visit' AND session_id IN {} GROUP BY session_id",
                in_placeholders(chunk.len())
            );
            let rows = self
                .timed(async {
                    Ok(bind_all(self.query(&sql)?.bind(&scope.client_id), chunk).fetch_all::<SessionMin>().await?)
                })
                .await?;
            first_visit.extend(rows.into_iter().map(|r| (r.session_id, r.first)));
        }
        Ok((entries, first_visit))
    }

    /// (day, partition) of every stored fact of `scope` (none for a campaign scope: it has no
    /// totals).
    async fn fact_day_partitions(&self, scope: &Scope, part: &str) -> Result<Vec<DayPartition>> {
        if scope.cid.is_some() {
            return Ok(Vec::new());
        }
        self.fetch_client_days(
            &format!(
                "SELECT DISTINCT day, {part} AS kafka_partition FROM facts WHERE client_id = ? AND day >= ? AND day <= ?"
            ),
            &scope.client_id,
            scope.from,
            scope.to,
        )
        .await
    }

    /// Live viewers per (day, partition, webinar, minute). Pings carry no campaign: a
    /// campaign-scoped recount has none.
    async fn live_groups(&self, scope: &Scope, part: &str) -> Result<Vec<LiveGroup>> {
        if scope.cid.is_some() {
            return Ok(Vec::new());
        }
        self.fetch_client_days(
            &format!(
                "SELECT day, {part} AS kafka_partition, webinar_id, toUInt32(toStartOfMinute(event_time)) AS minute, uniqExact(session_id) AS viewers \
                 FROM facts WHERE client_id = ? AND kind = 'ping' AND day >= ? AND day <= ? GROUP BY day, kafka_partition, webinar_id, minute"
            ),
            &scope.client_id,
            scope.from,
            scope.to,
        )
        .await
    }

    /// Distinct sessions with a counted visit per day of `scope`, as `daily_sessions` rows
    /// (used by backfill through `INSERT ... SELECT`, so the sessions never leave the server).
    pub async fn backfill_daily_sessions(&self, scope: &Scope) -> Result<()> {
        let mut args = Vec::new();
        let visits = scope.counted_visits(&mut args);
        let sql = format!(
            "INSERT INTO daily_sessions (client_id, day, session_id) SELECT ?, day, session_id FROM ({visits}) GROUP BY day, session_id"
        );
        let mut all = vec![Arg::Str(scope.client_id.clone())];
        all.extend(args);
        self.timed(async { Ok(bind(self.query(&sql)?, all).execute().await?) }).await
    }
}

impl Store {
    /// Viewers per minute of one webinar, recounted from raw pings of `[from, to]`.
    pub async fn raw_live_minutes(
        &self,
        client: &str,
        webinar: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<crate::read::LiveMinute>> {
        self.timed(async {
            Ok(self
                .query(
                    "SELECT webinar_id, toUInt32(toStartOfMinute(event_time)) AS minute, uniqExact(session_id) AS viewers FROM facts \
                     WHERE client_id = ? AND kind = 'ping' AND webinar_id = ? AND day >= ? AND day <= ? GROUP BY webinar_id, minute ORDER BY minute",
                )?
                .bind(client)
                .bind(webinar)
                .bind(Scope::day(from))
                .bind(Scope::day(to))
                .fetch_all::<crate::read::LiveMinute>()
                .await?)
        })
        .await
    }
}

/// Client days of `scope` (inclusive).
pub fn days(scope: &Scope) -> Vec<NaiveDate> {
    let mut out = Vec::new();
    let mut d = scope.from;
    while d <= scope.to {
        out.push(d);
        d = d.succ_opt().unwrap_or(d);
        if out.len() > 4000 {
            break;
        }
    }
    out
}
