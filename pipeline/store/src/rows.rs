//! Row types of the EventFlow tables, in `RowBinary` layout.
//!
//! ClickHouse types map as: `Date` = days since epoch (`u16`), `DateTime` = unix seconds (`u32`),
//! `Enum8` = its `i8` code. Field names are column names.

use chrono_tz::Tz;
use clickhouse::Row;
use serde::{Deserialize, Serialize};

use eventflow_core::fact::{Entry, Fact, FactHeader, FactKind, PageKind, Ping, SessionOrigin, Utm, Visit};
use eventflow_core::time;

/// `facts.kind` codes.
pub mod kind {
    pub const CHECKPOINT: i8 = 0;
    pub const VISIT: i8 = 1;
    pub const ENTRY: i8 = 2;
    pub const PING: i8 = 3;
}

/// `Enum8` code of a page kind (`0` = none).
pub fn page_code(page: Option<PageKind>) -> i8 {
    match page {
        None => 0,
        Some(PageKind::Landing) => 1,
        Some(PageKind::Webinar) => 2,
        Some(PageKind::Live) => 3,
    }
}

pub fn page_from_code(code: i8) -> Option<PageKind> {
    match code {
        1 => Some(PageKind::Landing),
        2 => Some(PageKind::Webinar),
        3 => Some(PageKind::Live),
        _ => None,
    }
}

fn origin_code(origin: SessionOrigin) -> i8 {
    match origin {
        SessionOrigin::Body => 1,
        SessionOrigin::Cookie => 2,
        SessionOrigin::Created => 3,
    }
}

fn origin_from_code(code: i8) -> SessionOrigin {
    match code {
        1 => SessionOrigin::Body,
        2 => SessionOrigin::Cookie,
        _ => SessionOrigin::Created,
    }
}

fn o(v: String) -> Option<String> {
    (!v.is_empty()).then_some(v)
}

/// A row of `facts`: one raw fact, or a processor checkpoint (`kind = checkpoint`).
#[derive(Debug, Clone, Default, PartialEq, Row, Serialize, Deserialize)]
pub struct FactRow {
    pub client_id: String,
    pub day: u16,
    pub kind: i8,
    pub fact_id: String,
    pub seq: u64,
    pub kafka_partition: u16,
    pub kafka_offset: i64,
    pub spool_id: u64,
    pub spool_seq: u64,
    pub event_time: u32,
    pub event_time_ms: i64,
    pub received_at_ms: i64,
    pub client_ts: String,
    pub clock_skew: u8,
    pub late: u8,
    pub session_id: String,
    pub session_origin: i8,
    pub page: i8,
    pub event_id: String,
    pub webinar_id: String,
    pub event_uid: String,
    pub entry_id: String,
    pub path: String,
    pub cid: String,
    pub cid_resolved: u8,
    pub utm_source: String,
    pub utm_medium: String,
    pub utm_campaign: String,
    pub utm_term: String,
    pub utm_content: String,
    pub utm_inherited: u8,
    pub first_utm_source: String,
    pub first_utm_medium: String,
    pub first_utm_campaign: String,
    pub first_utm_term: String,
    pub first_utm_content: String,
    pub first_touch_ms: i64,
    pub referrer: String,
    pub checkpoint: String,
    /// What the processor decided when it stored the fact (`dedup` codes).
    pub dedup: i8,
}

/// `facts.dedup` codes: the processor's decision about a fact when it stored it.
pub mod dedup {
    /// Stored before decisions were recorded, or not subject to dedup (pings, checkpoints).
    pub const UNDECIDED: i8 = 0;
    /// Counted: no copy of its key within the dedup horizon before it (or a fact without a key).
    pub const COUNTED: i8 = 1;
    /// A copy received at most the dedup horizon after another copy of its key.
    pub const DUPLICATE: i8 = 2;
}

/// Where a fact was read from and what the processor decided about it.
#[derive(Debug, Clone, Copy)]
pub struct Provenance {
    pub kafka_partition: u16,
    pub kafka_offset: i64,
    pub seq: u64,
    pub late: bool,
}

impl FactRow {
    fn empty() -> Self {
        FactRow {
            client_id: String::new(),
            day: 0,
            kind: kind::CHECKPOINT,
            fact_id: String::new(),
            seq: 0,
            kafka_partition: 0,
            kafka_offset: 0,
            spool_id: 0,
            spool_seq: 0,
            event_time: 0,
            event_time_ms: 0,
            received_at_ms: 0,
            client_ts: String::new(),
            clock_skew: 0,
            late: 0,
            session_id: String::new(),
            session_origin: 0,
            page: 0,
            event_id: String::new(),
            webinar_id: String::new(),
            event_uid: String::new(),
            entry_id: String::new(),
            path: String::new(),
            cid: String::new(),
            cid_resolved: 0,
            utm_source: String::new(),
            utm_medium: String::new(),
            utm_campaign: String::new(),
            utm_term: String::new(),
            utm_content: String::new(),
            utm_inherited: 0,
            first_utm_source: String::new(),
            first_utm_medium: String::new(),
            first_utm_campaign: String::new(),
            first_utm_term: String::new(),
            first_utm_content: String::new(),
            first_touch_ms: 0,
            referrer: String::new(),
            checkpoint: String::new(),
            dedup: dedup::UNDECIDED,
        }
    }

    /// The raw row of `fact`; `tz` is the client's time zone (for `day`).
    pub fn from_fact(fact: &Fact, tz: Tz, at: Provenance) -> Self {
        let day = time::day_number(time::client_day(fact.header().event_time_ms, tz));
        Self::from_owned_fact(fact.clone(), day, at)
    }

    /// The raw row of `fact` on client day `day`, moving its strings (the processor's hot path).
    pub fn from_owned_fact(fact: Fact, day: u16, at: Provenance) -> Self {
        let o = |v: Option<String>| v.unwrap_or_default();
        let (header, mut row) = match fact {
            Fact::Visit(v) => {
                let row = FactRow {
                    kind: kind::VISIT,
                    session_id: v.session_id,
                    session_origin: origin_code(v.session_origin),
                    page: page_code(Some(v.page)),
                    event_id: o(v.event_id),
                    webinar_id: o(v.webinar_id),
                    event_uid: o(v.event_uid),
                    path: o(v.path),
                    cid: o(v.cid),
                    cid_resolved: u8::from(v.cid_resolved),
                    utm_source: o(v.utm.source),
                    utm_medium: o(v.utm.medium),
                    utm_campaign: o(v.utm.campaign),
                    utm_term: o(v.utm.term),
                    utm_content: o(v.utm.content),
                    utm_inherited: u8::from(v.utm_inherited),
                    referrer: o(v.referrer),
                    ..FactRow::empty()
                };
                (v.header, row)
            }
            Fact::Entry(e) => {
                let first = e.first_touch_utm.unwrap_or_default();
                let row = FactRow {
                    kind: kind::ENTRY,
                    entry_id: e.entry_id,
                    session_id: e.session_id,
                    session_origin: origin_code(e.session_origin),
                    event_id: o(e.event_id),
                    webinar_id: o(e.webinar_id),
                    cid: o(e.cid),
                    cid_resolved: u8::from(e.cid_resolved),
                    utm_source: o(e.utm.source),
                    utm_medium: o(e.utm.medium),
                    utm_campaign: o(e.utm.campaign),
                    utm_term: o(e.utm.term),
                    utm_content: o(e.utm.content),
                    utm_inherited: u8::from(e.utm_inherited),
                    first_utm_source: o(first.source),
                    first_utm_medium: o(first.medium),
                    first_utm_campaign: o(first.campaign),
                    first_utm_term: o(first.term),
                    first_utm_content: o(first.content),
                    first_touch_ms: e.first_touch_at_ms.unwrap_or(0),
                    ..FactRow::empty()
                };
                (e.header, row)
            }
            Fact::Ping(p) => {
                let row = FactRow {
                    kind: kind::PING,
                    session_id: p.session_id,
                    session_origin: origin_code(p.session_origin),
                    webinar_id: p.webinar_id,
                    ..FactRow::empty()
                };
                (p.header, row)
            }
        };
        row.fact_id = header.fact_id();
        row.day = day;
        row.seq = at.seq;
        row.kafka_partition = at.kafka_partition;
        row.kafka_offset = at.kafka_offset;
        row.spool_id = header.spool_id;
        row.spool_seq = header.spool_seq;
        row.event_time = u32::try_from(header.event_time_ms.div_euclid(1000)).unwrap_or(0);
        row.event_time_ms = header.event_time_ms;
        row.received_at_ms = header.received_at_ms;
        row.client_ts = o(header.client_ts);
        row.clock_skew = u8::from(header.clock_skew);
        row.late = u8::from(at.late);
        row.client_id = header.client_id;
        row
    }

    /// Identity and dedup order of this fact.
    pub fn copy_key(&self) -> CopyKey {
        CopyKey { received_at_ms: self.received_at_ms, spool_id: self.spool_id, spool_seq: self.spool_seq }
    }

    /// The dedup key of this fact (`event_uid` of a visit, `entry_id` of an entry), if any.
    pub fn dedup_uid(&self) -> Option<&str> {
        match self.kind {
            kind::VISIT if !self.event_uid.is_empty() => Some(&self.event_uid),
            kind::ENTRY => Some(&self.entry_id),
            _ => None,
        }
    }

    /// Kind of a fact row (`None` for checkpoints).
    pub fn fact_kind(&self) -> Option<FactKind> {
        match self.kind {
            kind::VISIT => Some(FactKind::Visit),
            kind::ENTRY => Some(FactKind::Entry),
            kind::PING => Some(FactKind::Ping),
            _ => None,
        }
    }

    /// The fact this row stores (`None` for checkpoints).
    pub fn to_fact(&self) -> Option<Fact> {
        let header = FactHeader {
            spool_id: self.spool_id,
            spool_seq: self.spool_seq,
            client_id: self.client_id.clone(),
            received_at_ms: self.received_at_ms,
            event_time_ms: self.event_time_ms,
            client_ts: o(self.client_ts.clone()),
            clock_skew: self.clock_skew != 0,
        };
        let utm = Utm {
            source: o(self.utm_source.clone()),
            medium: o(self.utm_medium.clone()),
            campaign: o(self.utm_campaign.clone()),
            term: o(self.utm_term.clone()),
            content: o(self.utm_content.clone()),
        };
        Some(match self.fact_kind()? {
            FactKind::Visit => Fact::Visit(Visit {
                header,
                session_id: self.session_id.clone(),
                session_origin: origin_from_code(self.session_origin),
                page: page_from_code(self.page)?,
                event_id: o(self.event_id.clone()),
                webinar_id: o(self.webinar_id.clone()),
                event_uid: o(self.event_uid.clone()),
                path: o(self.path.clone()),
                cid: o(self.cid.clone()),
                cid_resolved: self.cid_resolved != 0,
                utm,
                utm_inherited: self.utm_inherited != 0,
                referrer: o(self.referrer.clone()),
            }),
            FactKind::Entry => {
                let first = Utm {
                    source: o(self.first_utm_source.clone()),
                    medium: o(self.first_utm_medium.clone()),
                    campaign: o(self.first_utm_campaign.clone()),
                    term: o(self.first_utm_term.clone()),
                    content: o(self.first_utm_content.clone()),
                };
                Fact::Entry(Entry {
                    header,
                    entry_id: self.entry_id.clone(),
                    session_id: self.session_id.clone(),
                    session_origin: origin_from_code(self.session_origin),
                    event_id: o(self.event_id.clone()),
                    webinar_id: o(self.webinar_id.clone()),
                    cid: o(self.cid.clone()),
                    cid_resolved: self.cid_resolved != 0,
                    utm,
                    utm_inherited: self.utm_inherited != 0,
                    first_touch_utm: (!first.is_empty()).then_some(first),
                    first_touch_at_ms: (self.first_touch_ms != 0).then_some(self.first_touch_ms),
                })
            }
            FactKind::Ping => Fact::Ping(Ping {
                header,
                webinar_id: self.webinar_id.clone(),
                session_id: self.session_id.clone(),
                session_origin: origin_from_code(self.session_origin),
            }),
        })
    }

    /// The checkpoint row of Kafka partition `partition`.
    pub fn checkpoint(partition: u16, checkpoint: &Checkpoint) -> Self {
        FactRow {
            fact_id: checkpoint_fact_id(partition),
            seq: checkpoint.seq,
            kafka_partition: partition,
            checkpoint: serde_json::to_string(checkpoint).unwrap_or_default(),
            ..FactRow::empty()
        }
    }
}

/// `fact_id` of the checkpoint row of `partition`.
pub fn checkpoint_fact_id(partition: u16) -> String {
    format!("p{partition}")
}

/// Next Kafka offset to consume on each fact topic of one partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicOffsets {
    pub visits: i64,
    pub entries: i64,
    pub pings: i64,
}

impl TopicOffsets {
    pub fn get(&self, kind: FactKind) -> i64 {
        match kind {
            FactKind::Visit => self.visits,
            FactKind::Entry => self.entries,
            FactKind::Ping => self.pings,
        }
    }

    pub fn set(&mut self, kind: FactKind, offset: i64) {
        match kind {
            FactKind::Visit => self.visits = offset,
            FactKind::Entry => self.entries = offset,
            FactKind::Ping => self.pings = offset,
        }
    }
}

/// Highest spool sequence seen from one collector spool in one topic partition. A spool's
/// facts reach a topic partition in spool order (one producer, in-order idempotent delivery),
/// so a redelivery after a collector crash is anything at or below the mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolMark {
    pub spool_id: u64,
    pub topic: FactKind,
    pub high_seq: u64,
    /// Watermark when this spool was last seen; marks of long-gone spools are pruned.
    pub seen_ms: i64,
}

/// Processor position in one Kafka partition, stored atomically with the facts it covers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Ownership epoch: incremented by each processor that takes the partition over.
    pub epoch: u32,
    /// Last processing sequence assigned (`epoch << 40 | counter`).
    pub seq: u64,
    /// Next offsets to consume.
    pub offsets: TopicOffsets,
    /// Highest receive time of the partition's facts processed so far.
    pub watermark_ms: i64,
    /// Watermark at the end of the last flush whose aggregate rows were all written. Bucket
    /// rows of days still open at this watermark may be missing after a crash, so a new owner
    /// recomputes and rewrites all of them (facts of days closed before it are all written).
    #[serde(default)]
    pub aggregates_watermark_ms: i64,
    /// Redelivery high-water marks per collector spool.
    pub spools: Vec<SpoolMark>,
    /// Event time up to which this partition's facts are in the aggregates: the latest event
    /// time of a written fact, never ahead of the receive-time watermark (a client clock
    /// running ahead cannot advance it).
    #[serde(default)]
    pub event_watermark_ms: i64,
    /// The latest `rebuild_requests.requested_ms` this partition's state was rebuilt for.
    #[serde(default)]
    pub rebuild_request_ms: i64,
    /// Highest `dedup_notices.writer_seq` read for this partition, per writer partition.
    #[serde(default)]
    pub notice_cursor: std::collections::BTreeMap<u16, u64>,
    /// Highest `copy_log.writer_seq` compared with this partition's copies, per writer partition.
    #[serde(default)]
    pub claim_cursor: std::collections::BTreeMap<u16, u64>,
}

/// `minute_visits` row.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct MinuteVisitsRow {
    pub client_id: String,
    pub minute: u32,
    pub page: i8,
    pub kafka_partition: u16,
    pub version: u64,
    pub visits: u64,
}

/// `minute_live` row.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct MinuteLiveRow {
    pub client_id: String,
    pub webinar_id: String,
    pub minute: u32,
    pub kafka_partition: u16,
    pub version: u64,
    pub viewers: u64,
}

/// Counters of one client day (`daily_totals` without key and version).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayCounters {
    pub visits: u64,
    pub visits_landing: u64,
    pub visits_webinar: u64,
    pub visits_live: u64,
    pub unique_sessions: u64,
    pub entries: u64,
    pub linked_entries: u64,
    pub visits_utm_missing: u64,
    pub visits_cid_unresolved: u64,
    pub viewer_minutes: u64,
}

/// Adds counters field by field. `unique_sessions` adds up exactly across the partitions of one
/// day (a session lives in one partition), not across days: distinct sessions of a range are
/// read separately.
impl std::ops::AddAssign for DayCounters {
    fn add_assign(&mut self, c: Self) {
        self.visits += c.visits;
        self.visits_landing += c.visits_landing;
        self.visits_webinar += c.visits_webinar;
        self.visits_live += c.visits_live;
        self.unique_sessions += c.unique_sessions;
        self.entries += c.entries;
        self.linked_entries += c.linked_entries;
        self.visits_utm_missing += c.visits_utm_missing;
        self.visits_cid_unresolved += c.visits_cid_unresolved;
        self.viewer_minutes += c.viewer_minutes;
    }
}

/// `daily_totals` row.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct DailyTotalsRow {
    pub client_id: String,
    pub day: u16,
    pub kafka_partition: u16,
    pub version: u64,
    pub visits: u64,
    pub visits_landing: u64,
    pub visits_webinar: u64,
    pub visits_live: u64,
    pub unique_sessions: u64,
    pub entries: u64,
    pub linked_entries: u64,
    pub visits_utm_missing: u64,
    pub visits_cid_unresolved: u64,
    pub viewer_minutes: u64,
}

impl DailyTotalsRow {
    pub fn new(client_id: String, day: u16, kafka_partition: u16, version: u64, c: DayCounters) -> Self {
        DailyTotalsRow {
            client_id,
            day,
            kafka_partition,
            version,
            visits: c.visits,
            visits_landing: c.visits_landing,
            visits_webinar: c.visits_webinar,
            visits_live: c.visits_live,
            unique_sessions: c.unique_sessions,
            entries: c.entries,
            linked_entries: c.linked_entries,
            visits_utm_missing: c.visits_utm_missing,
            visits_cid_unresolved: c.visits_cid_unresolved,
            viewer_minutes: c.viewer_minutes,
        }
    }

    pub fn counters(&self) -> DayCounters {
        DayCounters {
            visits: self.visits,
            visits_landing: self.visits_landing,
            visits_webinar: self.visits_webinar,
            visits_live: self.visits_live,
            unique_sessions: self.unique_sessions,
            entries: self.entries,
            linked_entries: self.linked_entries,
            visits_utm_missing: self.visits_utm_missing,
            visits_cid_unresolved: self.visits_cid_unresolved,
            viewer_minutes: self.viewer_minutes,
        }
    }
}

/// Dimensions of a marketing bucket (labels already applied: `unknown`, `unresolved`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MarketingDims {
    pub event_id: String,
    pub webinar_id: String,
    pub cid: String,
    pub utm_source: String,
    pub utm_medium: String,
    pub utm_campaign: String,
}

/// Counters of a marketing bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketingCounters {
    pub visits: u64,
    pub unique_sessions: u64,
    pub entries: u64,
    pub linked_entries: u64,
}

/// `daily_marketing` row.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct DailyMarketingRow {
    pub client_id: String,
    pub day: u16,
    pub event_id: String,
    pub webinar_id: String,
    pub cid: String,
    pub utm_source: String,
    pub utm_medium: String,
    pub utm_campaign: String,
    pub kafka_partition: u16,
    pub version: u64,
    pub visits: u64,
    pub unique_sessions: u64,
    pub entries: u64,
    pub linked_entries: u64,
}

impl DailyMarketingRow {
    pub fn new(
        client_id: String,
        day: u16,
        dims: &MarketingDims,
        kafka_partition: u16,
        version: u64,
        c: MarketingCounters,
    ) -> Self {
        DailyMarketingRow {
            client_id,
            day,
            event_id: dims.event_id.clone(),
            webinar_id: dims.webinar_id.clone(),
            cid: dims.cid.clone(),
            utm_source: dims.utm_source.clone(),
            utm_medium: dims.utm_medium.clone(),
            utm_campaign: dims.utm_campaign.clone(),
            kafka_partition,
            version,
            visits: c.visits,
            unique_sessions: c.unique_sessions,
            entries: c.entries,
            linked_entries: c.linked_entries,
        }
    }

    pub fn dims(&self) -> MarketingDims {
        MarketingDims {
            event_id: self.event_id.clone(),
            webinar_id: self.webinar_id.clone(),
            cid: self.cid.clone(),
            utm_source: self.utm_source.clone(),
            utm_medium: self.utm_medium.clone(),
            utm_campaign: self.utm_campaign.clone(),
        }
    }

    pub fn counters(&self) -> MarketingCounters {
        MarketingCounters {
            visits: self.visits,
            unique_sessions: self.unique_sessions,
            entries: self.entries,
            linked_entries: self.linked_entries,
        }
    }
}

/// `day_sessions` row: whether a session has a counted visit on a client day, at `version`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Row, Serialize, Deserialize)]
pub struct DaySessionRow {
    pub client_id: String,
    pub day: u16,
    pub session_id: String,
    pub kafka_partition: u16,
    pub version: u64,
    pub present: u8,
}

/// Order of the copies of one dedup key: a copy counts unless one before it is within the
/// dedup horizon (CONTRACT.md §1, ADR 0003).
/// Receive time first, then the fact's identity in the collector spool that acknowledged it,
/// so every component (stream, recount, backfill, reconcile) picks the same copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct CopyKey {
    pub received_at_ms: i64,
    pub spool_id: u64,
    pub spool_seq: u64,
}

impl CopyKey {
    pub fn of(header: &FactHeader) -> Self {
        CopyKey { received_at_ms: header.received_at_ms, spool_id: header.spool_id, spool_seq: header.spool_seq }
    }

    /// `facts.fact_id` of the fact with this identity.
    pub fn fact_id(&self) -> String {
        format!("{:016x}-{}", self.spool_id, self.spool_seq)
    }
}

/// `fact_copies` row: one stored copy of a dedup key (`kind` is a `facts.kind` code).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Row, Serialize, Deserialize)]
pub struct CopyRow {
    pub client_id: String,
    pub kind: i8,
    pub uid: String,
    pub received_at_ms: i64,
    pub spool_id: u64,
    pub spool_seq: u64,
    pub kafka_partition: u16,
    pub day: u16,
}

impl CopyRow {
    pub fn key(&self) -> CopyKey {
        CopyKey { received_at_ms: self.received_at_ms, spool_id: self.spool_id, spool_seq: self.spool_seq }
    }
}

/// `copy_log` row: a copy as partition `writer_partition` wrote it, in its order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Row, Serialize, Deserialize)]
pub struct ClaimRow {
    pub writer_partition: u16,
    pub writer_seq: u64,
    pub client_id: String,
    pub kind: i8,
    pub uid: String,
    pub received_at_ms: i64,
    pub spool_id: u64,
    pub spool_seq: u64,
    pub day: u16,
}

impl ClaimRow {
    pub fn key(&self) -> CopyKey {
        CopyKey { received_at_ms: self.received_at_ms, spool_id: self.spool_id, spool_seq: self.spool_seq }
    }

    /// The `fact_copies` row of this copy.
    pub fn copy_row(&self) -> CopyRow {
        CopyRow {
            client_id: self.client_id.clone(),
            kind: self.kind,
            uid: self.uid.clone(),
            received_at_ms: self.received_at_ms,
            spool_id: self.spool_id,
            spool_seq: self.spool_seq,
            kafka_partition: self.writer_partition,
            day: self.day,
        }
    }
}

/// `dedup_notices` row: the copy `loser` that `target_partition` holds comes after `winner`
/// (held by `writer_partition`) within the dedup horizon, so it does not count.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Row, Serialize, Deserialize)]
pub struct NoticeRow {
    pub writer_partition: u16,
    pub writer_seq: u64,
    pub target_partition: u16,
    pub client_id: String,
    pub kind: i8,
    pub uid: String,
    /// `facts.day` of the loser.
    pub day: u16,
    pub loser_received_at_ms: i64,
    pub loser_spool_id: u64,
    pub loser_spool_seq: u64,
    pub winner_received_at_ms: i64,
    pub winner_spool_id: u64,
    pub winner_spool_seq: u64,
}

impl NoticeRow {
    pub fn loser(&self) -> CopyKey {
        CopyKey {
            received_at_ms: self.loser_received_at_ms,
            spool_id: self.loser_spool_id,
            spool_seq: self.loser_spool_seq,
        }
    }
}

/// `session_first_visits` row.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct SessionFirstVisitRow {
    pub client_id: String,
    pub session_id: String,
    pub first_visit_ms: i64,
    pub version: u64,
}

impl SessionFirstVisitRow {
    pub fn new(client_id: String, session_id: String, first_visit_ms: i64) -> Self {
        // Highest version = earliest visit. Times are positive, so the subtraction cannot wrap.
        let version = u64::MAX - u64::try_from(first_visit_ms.max(0)).unwrap_or(0);
        SessionFirstVisitRow { client_id, session_id, first_visit_ms, version }
    }
}

/// `fact_days` row: the client day has stored facts in the partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Row, Serialize, Deserialize)]
pub struct FactDayRow {
    pub client_id: String,
    pub day: u16,
    pub kafka_partition: u16,
}

/// `late_facts` row.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct LateFactRow {
    pub client_id: String,
    pub day: u16,
    pub kafka_partition: u16,
    pub seq: u64,
}

/// `backfill_marks` row.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct BackfillMarkRow {
    pub client_id: String,
    pub day: u16,
    pub kafka_partition: u16,
    pub covered_seq: u64,
    pub finished_at: u32,
}

/// `processor_progress` row.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct ProgressRow {
    pub kafka_partition: u16,
    pub instance: String,
    pub watermark_ms: i64,
    pub heartbeat_ms: u64,
}

/// `campaign_links` row.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct CampaignLinkRow {
    pub cid: String,
    pub client_id: String,
    pub destination: String,
    pub utm_source: String,
    pub utm_medium: String,
    pub utm_campaign: String,
    pub utm_term: String,
    pub utm_content: String,
    pub updated_at: u32,
}

/// `link_clicks` row: one collector boot's running count of clicks on one link in one UTC
/// minute (`sql/007_link_clicks.sql`). `clicks` is also the version: a retried or later write
/// of the same key carries the same or a higher count.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Row, Serialize, Deserialize)]
pub struct LinkClickRow {
    pub client_id: String,
    /// Start of the UTC minute (unix seconds).
    pub minute: u32,
    pub cid: String,
    /// Drawn by the collector process when it starts: a restart adds rows instead of replacing.
    pub boot_id: u64,
    pub clicks: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> FactHeader {
        FactHeader {
            spool_id: u64::MAX - 5,
            spool_seq: 9,
            client_id: "acme".into(),
            received_at_ms: 1_795_600_000_123,
            event_time_ms: 1_795_600_000_100,
            client_ts: None,
            clock_skew: true,
        }
    }

    #[test]
    fn fact_rows_round_trip() {
        let utm = Utm { source: Some("s".into()), medium: None, campaign: Some("c".into()), term: None, content: None };
        let facts = vec![
            Fact::Visit(Visit {
                header: header(),
                session_id: "sess".into(),
                session_origin: SessionOrigin::Cookie,
                page: PageKind::Webinar,
                event_id: None,
                webinar_id: Some("w".into()),
                event_uid: Some("u".into()),
                path: Some("/webinar/w".into()),
                cid: Some("x".into()),
                cid_resolved: false,
                utm: utm.clone(),
                utm_inherited: true,
                referrer: Some("https://r".into()),
            }),
            Fact::Entry(Entry {
                header: header(),
                entry_id: "e".into(),
                session_id: "sess".into(),
                session_origin: SessionOrigin::Body,
                event_id: Some("ev".into()),
                webinar_id: None,
                cid: None,
                cid_resolved: false,
                utm: Utm::default(),
                utm_inherited: false,
                first_touch_utm: Some(utm),
                first_touch_at_ms: Some(1_795_000_000_000),
            }),
            Fact::Ping(Ping {
                header: header(),
                webinar_id: "w".into(),
                session_id: "sess".into(),
                session_origin: SessionOrigin::Created,
            }),
        ];
        for fact in facts {
            let row = FactRow::from_fact(
                &fact,
                chrono_tz::Asia::Seoul,
                Provenance { kafka_partition: 3, kafka_offset: 77, seq: 5, late: false },
            );
            assert_eq!(row.fact_id, format!("{:016x}-9", u64::MAX - 5));
            assert_eq!(row.to_fact(), Some(fact));
        }
    }

    #[test]
    fn first_visit_version_orders_earliest_highest() {
        let early = SessionFirstVisitRow::new("c".into(), "s".into(), 1000);
        let late = SessionFirstVisitRow::new("c".into(), "s".into(), 2000);
        assert!(early.version > late.version);
    }
}
