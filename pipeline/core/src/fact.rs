//! The three raw facts as they travel from the collector to the processor.
//!
//! These are the *enriched* facts: what the beacon said plus what the collector added (identity
//! in its spool, receive time, event time, session origin, campaign-link resolution). Their wire
//! form is the Avro schemas in `schemas/`; see [`crate::avro`].

use std::fmt;

use serde::{Deserialize, Serialize};

/// The three kinds of raw fact (CONTRACT.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FactKind {
    Visit,
    Entry,
    Ping,
}

impl FactKind {
    pub const ALL: [FactKind; 3] = [FactKind::Visit, FactKind::Entry, FactKind::Ping];

    pub fn as_str(self) -> &'static str {
        match self {
            FactKind::Visit => "visit",
            FactKind::Entry => "entry",
            FactKind::Ping => "ping",
        }
    }

    /// Name of the structured log event written when a fact of this kind fails.
    pub fn fail_event(self) -> &'static str {
        match self {
            FactKind::Visit => "VisitTrackFail",
            FactKind::Entry => "EntryTrackFail",
            FactKind::Ping => "PingTrackFail",
        }
    }

    /// Suffix of the kind's Kafka topic (`<prefix>.<suffix>`).
    pub fn topic_suffix(self) -> &'static str {
        match self {
            FactKind::Visit => "visits",
            FactKind::Entry => "entries",
            FactKind::Ping => "pings",
        }
    }
}

impl fmt::Display for FactKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Page kind of a visit. A live page load is its own kind, never folded into `webinar`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PageKind {
    /// `/event/{path}` welcome/landing page.
    Landing,
    /// `/webinar/{id}` info page.
    Webinar,
    /// `/webinar/{id}/live` live-viewing page.
    Live,
}

impl PageKind {
    pub const ALL: [PageKind; 3] = [PageKind::Landing, PageKind::Webinar, PageKind::Live];

    pub fn as_str(self) -> &'static str {
        match self {
            PageKind::Landing => "landing",
            PageKind::Webinar => "webinar",
            PageKind::Live => "live",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "landing" => Some(PageKind::Landing),
            "webinar" => Some(PageKind::Webinar),
            "live" => Some(PageKind::Live),
            _ => None,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Where a fact's `session_id` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionOrigin {
    /// Sent in the fact body.
    Body,
    /// Taken from the `ef_sid` cookie.
    Cookie,
    /// Created by the collector (and set as `ef_sid`).
    Created,
}

impl SessionOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionOrigin::Body => "body",
            SessionOrigin::Cookie => "cookie",
            SessionOrigin::Created => "created",
        }
    }
}

/// UTM campaign parameters. Missing fields aggregate under `"unknown"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Utm {
    pub source: Option<String>,
    pub medium: Option<String>,
    pub campaign: Option<String>,
    pub term: Option<String>,
    pub content: Option<String>,
}

/// How far apart two copies of a visit (`event_uid`) or registration (`entry_id`) may be
/// received for the later one not to count (CONTRACT.md §1; `docs/architecture.md`, counting
/// rules): a copy counts unless the copy just before it, by receive time then spool identity,
/// was received at most this long before it. The stream and the raw recount both apply it.
pub const DEDUP_HORIZON_MS: i64 = 72 * 3_600_000;

/// Aggregation label of a missing UTM field.
pub const UNKNOWN: &str = "unknown";
/// Aggregation label of a missing or unknown campaign link id.
pub const UNRESOLVED: &str = "unresolved";

impl Utm {
    pub fn is_empty(&self) -> bool {
        self.source.is_none()
            && self.medium.is_none()
            && self.campaign.is_none()
            && self.term.is_none()
            && self.content.is_none()
    }

    /// The value a dimension aggregates under: the field, or `"unknown"`.
    pub fn label(field: &Option<String>) -> &str {
        field.as_deref().unwrap_or(UNKNOWN)
    }
}

/// Fields every fact carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FactHeader {
    /// Random id of the collector spool that acknowledged the fact.
    pub spool_id: u64,
    /// Position of the fact in that spool. `(spool_id, spool_seq)` is the fact's identity.
    pub spool_seq: u64,
    pub client_id: String,
    pub received_at_ms: i64,
    pub event_time_ms: i64,
    /// `ts` as sent, for audit.
    pub client_ts: Option<String>,
    pub clock_skew: bool,
}

impl FactHeader {
    /// Stable, printable identity of the fact: `<spool id hex>-<spool seq>`.
    pub fn fact_id(&self) -> String {
        format!("{:016x}-{}", self.spool_id, self.spool_seq)
    }
}

/// A page view on a tracked page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Visit {
    pub header: FactHeader,
    pub session_id: String,
    pub session_origin: SessionOrigin,
    pub page: PageKind,
    pub event_id: Option<String>,
    pub webinar_id: Option<String>,
    pub event_uid: Option<String>,
    pub path: Option<String>,
    pub cid: Option<String>,
    pub cid_resolved: bool,
    pub utm: Utm,
    /// `utm` and `cid` came from the last touch in the `ef_utm` cookie, not from the fact.
    pub utm_inherited: bool,
    pub referrer: Option<String>,
}

/// A registration (sign-up).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub header: FactHeader,
    pub entry_id: String,
    pub session_id: String,
    pub session_origin: SessionOrigin,
    pub event_id: Option<String>,
    pub webinar_id: Option<String>,
    pub cid: Option<String>,
    pub cid_resolved: bool,
    /// Last-touch UTM.
    pub utm: Utm,
    /// `utm` and `cid` came from the last touch in the `ef_utm` cookie, not from the fact.
    pub utm_inherited: bool,
    pub first_touch_utm: Option<Utm>,
    pub first_touch_at_ms: Option<i64>,
}

/// A live-viewing presence heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    pub header: FactHeader,
    pub webinar_id: String,
    pub session_id: String,
    pub session_origin: SessionOrigin,
}

/// Any raw fact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Fact {
    Visit(Visit),
    Entry(Entry),
    Ping(Ping),
}

impl Fact {
    pub fn kind(&self) -> FactKind {
        match self {
            Fact::Visit(_) => FactKind::Visit,
            Fact::Entry(_) => FactKind::Entry,
            Fact::Ping(_) => FactKind::Ping,
        }
    }

    pub fn header(&self) -> &FactHeader {
        match self {
            Fact::Visit(v) => &v.header,
            Fact::Entry(e) => &e.header,
            Fact::Ping(p) => &p.header,
        }
    }

    pub fn header_mut(&mut self) -> &mut FactHeader {
        match self {
            Fact::Visit(v) => &mut v.header,
            Fact::Entry(e) => &mut e.header,
            Fact::Ping(p) => &mut p.header,
        }
    }

    pub fn session_id(&self) -> &str {
        match self {
            Fact::Visit(v) => &v.session_id,
            Fact::Entry(e) => &e.session_id,
            Fact::Ping(p) => &p.session_id,
        }
    }

    /// Kafka message key. All facts of one session share it, so they land in the same
    /// partition of every fact topic (the topics have equal partition counts): per-partition
    /// distinct session counts then add up exactly, and visit/entry linkage is partition-local.
    pub fn partition_key(&self) -> String {
        partition_key(&self.header().client_id, self.session_id())
    }
}

/// Kafka message key of a fact of `client_id` in `session_id`.
pub fn partition_key(client_id: &str, session_id: &str) -> String {
    let mut key = String::with_capacity(client_id.len() + session_id.len() + 1);
    key.push_str(client_id);
    key.push('/');
    key.push_str(session_id);
    key
}
