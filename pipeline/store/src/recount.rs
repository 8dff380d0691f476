//! Recount of raw facts: the truth every aggregate is compared with.
//!
//! Used by the reader API's raw fallback, by `eventflow reconcile` and by `eventflow backfill`.
//! The rules are the contract's (CONTRACT.md §1, §4) and the processor's (`state/mod.rs`); the
//! one definition is in `docs/architecture.md` ("Counting rules"):
//! - a visit counts once per `(client_id, event_uid)` within the dedup horizon: copies are
//!   ordered by `(received_at_ms, spool_id, spool_seq)` (`fact_copies` indexes every copy by
//!   key); a copy counts unless the copy just before it was received at most
//!   `DEDUP_HORIZON_MS` earlier; every visit without `event_uid` counts; `FINAL` folds a fact
//!   stored twice;
//! - unique sessions are distinct sessions of counted visits;
//! - an entry counts once per `(client_id, entry_id)`, by the same rule, and is linked
//!   when a visit of its session is at or before its event time (`session_first_visits` holds
//!   each session's earliest visit; computed in Rust: no JOIN on 18.16);
//! - live viewers of a minute are distinct pinging sessions;
//! - labels: an empty or literal `unknown` UTM field is `unknown` (a visit whose source is
//!   `unknown` counts as UTM-missing); a campaign link id is itself when the collector resolved
//!   it to a link of the client, else `unresolved`;
//! - days are calendar days in the client's CURRENT time zone, computed from the event time (the
//!   stored `day` column, in the zone of the time of processing, only narrows the read).
//!
//! With `by_partition`, every figure is also split by Kafka partition, which is what backfill
//! writes (rows are per partition, see `sql/002_aggregates.sql`).

use std::collections::{BTreeMap, HashMap};

use chrono::NaiveDate;
use chrono_tz::Tz;

use eventflow_core::fact::DEDUP_HORIZON_MS;
use eventflow_core::time;

use crate::rows::{DayCounters, MarketingCounters, MarketingDims};
use crate::{bind_all, in_placeholders, Result, Store};

/// Days around a range read for facts whose stored day (zone at processing) differs from their
/// day in the client's current zone: zone offsets differ by at most 26 hours.
const ZONE_MARGIN_DAYS: i64 = 2;

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

/// Labels of the marketing dimensions; the one definition (see the module documentation).
const LABELS: &str = "if(cid_resolved = 1 AND cid != '', cid, 'unresolved') AS cid_label, \
    if(utm_source = '', 'unknown', utm_source) AS src, if(utm_medium = '', 'unknown', utm_medium) AS med, \
    if(utm_campaign = '', 'unknown', utm_campaign) AS camp";

impl Scope {
    fn day(d: NaiveDate) -> String {
        time::format_day(d)
    }

    /// Stored days to read: the range widened by the zone margin.
    fn stored_days(&self) -> (String, String) {
        (
            Self::day(self.from - chrono::Duration::days(ZONE_MARGIN_DAYS)),
            Self::day(self.to + chrono::Duration::days(ZONE_MARGIN_DAYS)),
        )
    }

    /// `client_id = ? AND <stored day margin> AND toDate(event_time, tz) in range` with its
    /// arguments: the facts of the scope's client days.
    fn facts_of_days(&self, args: &mut Vec<Arg>) -> &'static str {
        let (lo, hi) = self.stored_days();
        args.extend([
            Arg::Str(self.client_id.clone()),
            Arg::Str(lo),
            Arg::Str(hi),
            Arg::Str(self.tz.name().to_owned()),
            Arg::Str(Self::day(self.from)),
            Arg::Str(Self::day(self.to)),
        ]);
        "client_id = ? AND day >= ? AND day <= ? AND toDate(event_time, ?) BETWEEN toDate(?) AND toDate(?)"
    }

    /// `toDate(event_time, tz) AS cday` with its argument: a fact's day in the current zone.
    fn client_day(&self, args: &mut Vec<Arg>) -> &'static str {
        args.push(Arg::Str(self.tz.name().to_owned()));
        "toDate(event_time, ?) AS cday"
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

    /// `AND (<uid column> = '' OR (<uid column>, copy key) IN (counted copies))`: keeps a fact
    /// of kind `kind` when it has no dedup key or is a counted copy of its key: the first copy
    /// by `(received_at_ms, spool_id, spool_seq)`, or one received more than the dedup horizon
    /// after the copy just before it. The copies of a key come from `fact_copies`, sorted in
    /// an array; each is compared with its predecessor (the first with a zero sentinel).
    /// `GLOBAL IN`: on a cluster the subqueries read Distributed tables and run once, not once
    /// per shard (a plain IN over a Distributed table inside a Distributed query is refused).
    fn counted_copy_filter(&self, kind: &str, uid_col: &str, args: &mut Vec<Arg>) -> String {
        let mut days = Vec::new();
        let facts = self.facts_of_days(&mut days);
        args.push(Arg::Str(self.client_id.clone()));
        args.extend(days);
        let horizon = DEDUP_HORIZON_MS;
        format!(
            " AND ({uid_col} = '' OR ({uid_col}, received_at_ms, spool_id, spool_seq) GLOBAL IN \
             (SELECT uid, tupleElement(c, 1), tupleElement(c, 2), tupleElement(c, 3) FROM \
             (SELECT uid, arrayJoin(arrayFilter((x, p) -> tupleElement(p, 1) = 0 OR \
             tupleElement(x, 1) - tupleElement(p, 1) > {horizon}, s, \
             arrayPushFront(arrayPopBack(s), tuple(toInt64(0), toUInt64(0), toUInt64(0))))) AS c FROM \
             (SELECT uid, arraySort(groupUniqArray(tuple(received_at_ms, spool_id, spool_seq))) AS s \
             FROM fact_copies WHERE client_id = ? AND kind = '{kind}' AND uid GLOBAL IN \
             (SELECT {uid_col} FROM facts WHERE {facts} AND kind = '{kind}' AND {uid_col} != '') GROUP BY uid))))"
        )
    }

    /// Counted visits of the scope, with `cday` (client day) and the columns recounts need.
    fn counted_visits(&self, args: &mut Vec<Arg>) -> String {
        let mut sql = format!(
            "SELECT {}, kafka_partition, page, session_id, event_time, event_id, webinar_id, cid, cid_resolved, \
             utm_source, utm_medium, utm_campaign FROM facts FINAL WHERE ",
            self.client_day(args)
        );
        sql.push_str(self.facts_of_days(args));
        sql.push_str(" AND kind = 'visit'");
        sql.push_str(self.cid_filter(args));
        let first = self.counted_copy_filter("visit", "event_uid", args);
        sql.push_str(&first);
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

fn bind(q: clickhouse::query::Query, args: Vec<Arg>) -> clickhouse::query::Query {
    args.into_iter().fold(q, |q, a| match a {
        Arg::Str(s) => q.bind(s),
    })
}

impl Store {
    async fn fetch_args<T>(&self, sql: &str, args: Vec<Arg>) -> Result<Vec<T>>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        self.timed(async { Ok(bind(self.query(sql)?, args).fetch_all::<T>().await?) }).await
    }

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
            "SELECT cday AS day, {part} AS kafka_partition, page, event_id, webinar_id, {LABELS}, count() AS visits, uniqExact(session_id) AS sessions \
             FROM ({{visits}}) GROUP BY day, kafka_partition, page, event_id, webinar_id, cid_label, src, med, camp"
        ));
        // Distinct sessions per day (and partition) and over the range.
        let (day_sql, day_args) = visit_query(&format!(
            "SELECT cday AS day, {part} AS kafka_partition, uniqExact(session_id) AS sessions FROM ({{visits}}) GROUP BY day, kafka_partition"
        ));
        let (all_day_sql, all_day_args) = visit_query(
            "SELECT cday AS day, toUInt16(0) AS kafka_partition, uniqExact(session_id) AS sessions FROM ({visits}) GROUP BY day",
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
            "SELECT cday AS day, {part} AS kafka_partition, toInt8(0) AS page, event_id, webinar_id, {LABELS}, count() AS visits, uniqExact(session_id) AS sessions \
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
            self.fetch_args::<VisitGroup>(&groups_sql, groups_args),
            self.fetch_args::<DaySessions>(&day_sql, day_args),
            self.fetch_args::<DaySessions>(&all_day_sql, all_day_args),
            self.timed(async { Ok(bind(self.query(&range_sql)?, range_args).fetch_one::<u64>().await?) }),
            self.fetch_args::<MinuteGroup>(&minutes_sql, minutes_args),
            self.fetch_args::<VisitGroup>(&marketing_sql, marketing_args),
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

    /// Counted entries of `scope` (the counted copies of each `entry_id`) and the earliest visit of
    /// each of their sessions (any day: a visit long before the range still links).
    async fn entries_with_first_visits(&self, scope: &Scope) -> Result<(Vec<EntryWinner>, HashMap<String, i64>)> {
        let mut args = Vec::new();
        let mut sql = format!(
            "SELECT cday AS day, kafka_partition, session_id, event_time_ms, event_id, webinar_id, {LABELS} FROM (\
             SELECT {}, kafka_partition, session_id, event_time_ms, event_id, webinar_id, cid, cid_resolved, \
             utm_source, utm_medium, utm_campaign FROM facts FINAL WHERE ",
            scope.client_day(&mut args)
        );
        sql.push_str(scope.facts_of_days(&mut args));
        sql.push_str(" AND kind = 'entry'");
        sql.push_str(scope.cid_filter(&mut args));
        let first = scope.counted_copy_filter("entry", "entry_id", &mut args);
        sql.push_str(&first);
        sql.push(')');
        let entries: Vec<EntryWinner> = self.fetch_args(&sql, args).await?;
        let sessions: Vec<String> = {
            let mut s: Vec<String> = entries.iter().map(|e| e.session_id.clone()).collect();
            s.sort();
            s.dedup();
            s
        };
        let mut first_visit: HashMap<String, i64> = HashMap::new();
        for chunk in sessions.chunks(1000) {
            // The earliest visit of each session, kept by the processor (a primary-key read, not
            // a scan of the client's history).
            let sql = format!(
                "SELECT session_id, min(first_visit_ms) AS first FROM session_first_visits \
                 WHERE client_id = ? AND session_id IN {} GROUP BY session_id",
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
        let mut args = Vec::new();
        let cday = scope.client_day(&mut args);
        let facts = scope.facts_of_days(&mut args);
        let sql = format!("SELECT DISTINCT cday AS day, {part} AS kafka_partition FROM (SELECT {cday}, kafka_partition FROM facts WHERE {facts} AND kind != 'checkpoint')");
        self.fetch_args(&sql, args).await
    }

    /// Live viewers per (day, partition, webinar, minute). Pings carry no campaign: a
    /// campaign-scoped recount has none.
    async fn live_groups(&self, scope: &Scope, part: &str) -> Result<Vec<LiveGroup>> {
        if scope.cid.is_some() {
            return Ok(Vec::new());
        }
        let mut args = Vec::new();
        let cday = scope.client_day(&mut args);
        let facts = scope.facts_of_days(&mut args);
        let sql = format!(
            "SELECT cday AS day, {part} AS kafka_partition, webinar_id, toUInt32(toStartOfMinute(event_time)) AS minute, uniqExact(session_id) AS viewers \
             FROM (SELECT {cday}, kafka_partition, webinar_id, event_time, session_id FROM facts WHERE {facts} AND kind = 'ping') \
             GROUP BY day, kafka_partition, webinar_id, minute"
        );
        self.fetch_args(&sql, args).await
    }

    /// Rewrites the `day_sessions` rows of `scope` from the recount, server-side (the sessions
    /// never leave ClickHouse): every session with a counted visit is present, every other
    /// session the table holds for those days is taken out. `versions` are the processing
    /// sequences to write per Kafka partition (see backfill).
    pub async fn backfill_day_sessions(&self, scope: &Scope, versions: &BTreeMap<u16, u64>) -> Result<()> {
        let parts: Vec<String> = versions.keys().map(u16::to_string).collect();
        let seqs: Vec<String> = versions.values().map(u64::to_string).collect();
        let version = format!("transform(kafka_partition, [{}], [{}], toUInt64(0))", parts.join(", "), seqs.join(", "));
        let version = if versions.is_empty() { "toUInt64(0)".to_owned() } else { version };
        let mut args = vec![Arg::Str(scope.client_id.clone())];
        let visits = scope.counted_visits(&mut args);
        let present = format!(
            "INSERT INTO day_sessions (client_id, day, session_id, kafka_partition, version, present) \
             SELECT ?, cday, session_id, kafka_partition, {version}, toUInt8(1) FROM ({visits}) \
             GROUP BY cday, session_id, kafka_partition"
        );
        let mut absent_args =
            vec![Arg::Str(scope.client_id.clone()), Arg::Str(Scope::day(scope.from)), Arg::Str(Scope::day(scope.to))];
        let visits = scope.counted_visits(&mut absent_args);
        // (The NOT IN sits in an outer WHERE: 18.16 cannot resolve it inside HAVING.)
        let absent = format!(
            "INSERT INTO day_sessions (client_id, day, session_id, kafka_partition, version, present) \
             SELECT client_id, day, session_id, kafka_partition, {version}, toUInt8(0) FROM \
             (SELECT client_id, day, session_id, kafka_partition FROM day_sessions \
             WHERE client_id = ? AND day >= ? AND day <= ? GROUP BY client_id, day, session_id, kafka_partition \
             HAVING argMax(present, version) = 1) \
             WHERE (day, session_id, kafka_partition) GLOBAL NOT IN (SELECT cday, session_id, kafka_partition FROM ({visits}))"
        );
        // Absent first: a session both in the table and in the recount is written present last.
        self.timed(async { Ok(bind(self.query(&absent)?, absent_args).execute().await?) }).await?;
        self.timed(async { Ok(bind(self.query(&present)?, args).execute().await?) }).await
    }

    /// Rebuilds the dedup index (`fact_copies`), the earliest visits of sessions
    /// (`session_first_visits`) and the fact-day markers (`fact_days`, in the client's current
    /// zone) from the stored facts of `scope`'s days: the processor writes them ahead of the
    /// facts, and recounts and readers rely on them.
    pub async fn backfill_fact_indexes(&self, scope: &Scope) -> Result<()> {
        let mut copy_args = Vec::new();
        let facts = scope.facts_of_days(&mut copy_args);
        let copies = format!(
            "INSERT INTO fact_copies (client_id, kind, uid, received_at_ms, spool_id, spool_seq, kafka_partition, day) \
             SELECT client_id, if(kind = 'visit', 'visit', 'entry'), if(kind = 'visit', event_uid, entry_id), \
             received_at_ms, spool_id, spool_seq, kafka_partition, day FROM facts FINAL \
             WHERE {facts} AND ((kind = 'visit' AND event_uid != '') OR kind = 'entry')"
        );
        let mut first_args = Vec::new();
        let facts = scope.facts_of_days(&mut first_args);
        let first = format!(
            "INSERT INTO session_first_visits (client_id, session_id, first_visit_ms, version) \
             SELECT client_id, session_id, min(event_time_ms) AS first, toUInt64(18446744073709551615) - toUInt64(greatest(first, 0)) \
             FROM facts WHERE {facts} AND kind = 'visit' GROUP BY client_id, session_id"
        );
        let mut day_args = Vec::new();
        let cday = scope.client_day(&mut day_args);
        let facts = scope.facts_of_days(&mut day_args);
        let days = format!(
            "INSERT INTO fact_days (client_id, day, kafka_partition) \
             SELECT DISTINCT client_id, cday, kafka_partition FROM (SELECT client_id, {cday}, kafka_partition FROM facts \
             WHERE {facts} AND kind != 'checkpoint')"
        );
        self.timed(async { Ok(bind(self.query(&copies)?, copy_args).execute().await?) }).await?;
        self.timed(async { Ok(bind(self.query(&first)?, first_args).execute().await?) }).await?;
        self.timed(async { Ok(bind(self.query(&days)?, day_args).execute().await?) }).await
    }
}

impl Store {
    /// Stored visits and entries of `scope`'s days that carry campaign link id `cid` but were
    /// stored unresolved (the link did not exist, or was not known to the collector, when they
    /// arrived).
    pub async fn unresolved_facts_of_link(&self, scope: &Scope, cid: &str) -> Result<Vec<crate::rows::FactRow>> {
        let mut args = Vec::new();
        let facts = scope.facts_of_days(&mut args);
        args.push(Arg::Str(cid.to_owned()));
        let sql = format!(
            "SELECT ?fields FROM facts FINAL WHERE {facts} AND kind IN ('visit', 'entry') AND cid = ? AND cid_resolved = 0"
        );
        self.fetch_args(&sql, args).await
    }

    /// Viewers per minute of one webinar, recounted from raw pings of `[from, to]`.
    pub async fn raw_live_minutes(
        &self,
        client: &str,
        webinar: &str,
        from: NaiveDate,
        to: NaiveDate,
        tz: Tz,
    ) -> Result<Vec<crate::read::LiveMinute>> {
        let scope = Scope { client_id: client.to_owned(), from, to, tz, cid: None };
        let mut args = Vec::new();
        let facts = scope.facts_of_days(&mut args);
        args.push(Arg::Str(webinar.to_owned()));
        let sql = format!(
            "SELECT webinar_id, toUInt32(toStartOfMinute(event_time)) AS minute, uniqExact(session_id) AS viewers FROM facts \
             WHERE {facts} AND kind = 'ping' AND webinar_id = ? GROUP BY webinar_id, minute ORDER BY minute"
        );
        self.fetch_args(&sql, args).await
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
