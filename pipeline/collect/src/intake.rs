//! Parsing and validating beacon bodies (CONTRACT.md §1-2).
//!
//! Pure functions from bytes to validated facts: no I/O, no clocks, so they can be property
//! tested and fuzzed. A body is one fact object or an array of up to 100; each element is
//! validated on its own, so good facts in a batch are kept when others are rejected.
//! Strings are kept verbatim (SQL or script fragments are just text); empty strings count as
//! absent; control characters, bidirectional-text controls and over-long values are rejected with
//! a named field. [`check_text`] is the one rule for every value that can reach a fact, whatever
//! carried it: the body, the `ef_utm` cookie ([`crate::session`]), the `/r/{cid}` path and
//! campaign-link metadata ([`crate::links`]).

use serde_json::{Map, Value};

use eventflow_core::fact::{FactKind, PageKind, Utm};
use eventflow_core::ClientId;

/// Largest accepted body (CONTRACT.md §2).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most facts in one request.
pub const MAX_BATCH: usize = 100;
/// Longest id (`event_id`, `webinar_id`, `entry_id`, `session_id`, `event_uid`, `cid`).
pub const MAX_ID_CHARS: usize = 128;
/// Longest UTM value.
pub const MAX_UTM_CHARS: usize = 256;
/// Longest `path` or `referrer`.
pub const MAX_URL_CHARS: usize = 2048;
/// Longest `ts`.
pub const MAX_TS_CHARS: usize = 64;
/// Largest spool record of one fact (its encoded value, key and record header). Within the field
/// limits a fact of ASCII values takes at most about 9 KiB; this cap stops what the limits in
/// characters still allow (four-byte characters everywhere). Such a fact is rejected with
/// reason `fact_too_large`.
pub const MAX_FACT_BYTES: usize = 16 * 1024;

/// Why a string value is refused (the `detail` of `invalid_field`).
pub fn check_text(value: &str, max_chars: usize) -> Result<(), &'static str> {
    if value.chars().count() > max_chars {
        return Err(match max_chars {
            MAX_ID_CHARS => "longer than 128 characters",
            MAX_UTM_CHARS => "longer than 256 characters",
            MAX_URL_CHARS => "longer than 2048 characters",
            _ => "too long",
        });
    }
    if value.chars().any(char::is_control) {
        return Err("contains control characters");
    }
    if value.chars().any(is_bidi_control) {
        return Err("contains bidirectional text controls");
    }
    Ok(())
}

/// Unicode bidirectional formatting characters (and the line and paragraph separators), which
/// can make a value display differently from what it is (Trojan Source, CVE-2021-42574).
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
}

/// Whether every field of `utm` passes [`check_text`].
pub fn valid_utm(utm: &Utm) -> bool {
    [&utm.source, &utm.medium, &utm.campaign, &utm.term, &utm.content]
        .into_iter()
        .flatten()
        .all(|v| check_text(v, MAX_UTM_CHARS).is_ok())
}

/// Whether `cid` is a campaign link id a fact may carry.
pub fn valid_cid(cid: &str) -> bool {
    !cid.is_empty() && check_text(cid, MAX_ID_CHARS).is_ok()
}

/// Why a whole request body is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("body is not valid UTF-8")]
    InvalidUtf8,
    #[error("body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("body must be a fact object or an array of fact objects")]
    NotObjectOrArray,
    #[error("batch is empty")]
    EmptyBatch,
    #[error("batch has {0} facts; at most 100 are allowed")]
    TooManyFacts(usize),
}

impl BodyError {
    /// Stable error code for responses and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            BodyError::InvalidUtf8 => "invalid_utf8",
            BodyError::MalformedJson(_) => "malformed_json",
            BodyError::NotObjectOrArray => "not_object_or_array",
            BodyError::EmptyBatch => "empty_batch",
            BodyError::TooManyFacts(_) => "too_many_facts",
        }
    }
}

/// Why one fact of a batch is rejected. The reason codes are a closed set (metric label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    NotAnObject,
    MissingType,
    UnknownType,
    MissingClientId,
    InvalidClientId,
    UnknownClient,
    MissingPage,
    InvalidPage,
    MissingEventId,
    MissingWebinarId,
    MissingEntryId,
    MissingSessionId,
    /// A field has the wrong type, is too long or holds control characters.
    InvalidField {
        field: String,
        detail: String,
    },
    RateLimited,
    /// The fact's spool record would be larger than [`MAX_FACT_BYTES`].
    FactTooLarge,
    /// Storing the fact would take the request beyond the spool bytes it may add (a multiple
    /// of the bytes it sent, [`crate::collect::SPOOL_BYTES_PER_BYTE_SENT`]).
    OverBudget,
    /// The collector could not store the fact (spool full or failing): answered 503.
    SpoolUnavailable,
}

impl Reason {
    pub fn code(&self) -> &'static str {
        match self {
            Reason::NotAnObject => "not_an_object",
            Reason::MissingType => "missing_type",
            Reason::UnknownType => "unknown_type",
            Reason::MissingClientId => "missing_client_id",
            Reason::InvalidClientId => "invalid_client_id",
            Reason::UnknownClient => "unknown_client",
            Reason::MissingPage => "missing_page",
            Reason::InvalidPage => "invalid_page",
            Reason::MissingEventId => "missing_event_id",
            Reason::MissingWebinarId => "missing_webinar_id",
            Reason::MissingEntryId => "missing_entry_id",
            Reason::MissingSessionId => "missing_session_id",
            Reason::InvalidField { .. } => "invalid_field",
            Reason::RateLimited => "rate_limited",
            Reason::FactTooLarge => "fact_too_large",
            Reason::OverBudget => "over_budget",
            Reason::SpoolUnavailable => "spool_unavailable",
        }
    }
}

/// A rejected fact: its position in the batch, its kind and client when known, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub index: usize,
    pub kind: Option<FactKind>,
    pub client_id: Option<String>,
    pub reason: Reason,
}

/// A validated visit, before enrichment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisitIn {
    pub page: PageKind,
    pub event_id: Option<String>,
    pub webinar_id: Option<String>,
    pub session_id: Option<String>,
    pub event_uid: Option<String>,
    pub path: Option<String>,
    pub cid: Option<String>,
    pub utm: Utm,
    pub referrer: Option<String>,
}

/// A validated registration, before enrichment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryIn {
    pub entry_id: String,
    pub event_id: Option<String>,
    pub webinar_id: Option<String>,
    pub session_id: Option<String>,
    pub cid: Option<String>,
    pub utm: Utm,
}

/// A validated ping, before enrichment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingIn {
    pub webinar_id: String,
    pub session_id: Option<String>,
}

/// The kind-specific part of a validated fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Visit(VisitIn),
    Entry(EntryIn),
    Ping(PingIn),
}

/// A validated fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactIn {
    pub index: usize,
    pub client_id: ClientId,
    pub ts: Option<String>,
    pub body: Body,
}

impl FactIn {
    pub fn kind(&self) -> FactKind {
        match self.body {
            Body::Visit(_) => FactKind::Visit,
            Body::Entry(_) => FactKind::Entry,
            Body::Ping(_) => FactKind::Ping,
        }
    }
}

/// Splits a body into its fact values.
pub fn parse_body(bytes: &[u8]) -> Result<Vec<Value>, BodyError> {
    let text = std::str::from_utf8(bytes).map_err(|_| BodyError::InvalidUtf8)?;
    let value: Value = serde_json::from_str(text).map_err(|e| BodyError::MalformedJson(e.to_string()))?;
    match value {
        Value::Object(_) => Ok(vec![value]),
        Value::Array(items) if items.is_empty() => Err(BodyError::EmptyBatch),
        Value::Array(items) if items.len() > MAX_BATCH => Err(BodyError::TooManyFacts(items.len())),
        Value::Array(items) => Ok(items),
        _ => Err(BodyError::NotObjectOrArray),
    }
}

/// The kind and client id of a body's first fact, as far as they can be read: names the
/// `*TrackFail` event of a request refused as a whole.
pub fn peek_identity(values: &[Value]) -> (Option<FactKind>, Option<String>) {
    let Some(Value::Object(first)) = values.first() else {
        return (None, None);
    };
    let kind = match first.get("type").and_then(Value::as_str) {
        Some("visit") => Some(FactKind::Visit),
        Some("entry") => Some(FactKind::Entry),
        Some("ping") => Some(FactKind::Ping),
        _ => None,
    };
    let client = first.get("client_id").and_then(Value::as_str).and_then(|c| ClientId::parse(c).ok());
    (kind, client.map(|c| c.to_string()))
}

/// Validates every element of a parsed body.
pub fn validate_all(values: &[Value]) -> Vec<Result<FactIn, Rejection>> {
    values.iter().enumerate().map(|(i, v)| validate(i, v)).collect()
}

fn invalid(field: &str, detail: impl Into<String>) -> Reason {
    Reason::InvalidField { field: field.to_owned(), detail: detail.into() }
}

/// An optional string field: absent, `null` and `""` are `None`.
fn opt_str(obj: &Map<String, Value>, field: &str, max_chars: usize) -> Result<Option<String>, Reason> {
    opt_str_named(obj, field, field, max_chars)
}

fn opt_str_named(obj: &Map<String, Value>, key: &str, name: &str, max_chars: usize) -> Result<Option<String>, Reason> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => {
            check_text(s, max_chars).map_err(|detail| invalid(name, detail))?;
            Ok(Some(s.clone()))
        }
        Some(_) => Err(invalid(name, "must be a string")),
    }
}

fn utm(obj: &Map<String, Value>) -> Result<Utm, Reason> {
    match obj.get("utm") {
        None | Some(Value::Null) => Ok(Utm::default()),
        Some(Value::Object(u)) => Ok(Utm {
            source: opt_str_named(u, "source", "utm.source", MAX_UTM_CHARS)?,
            medium: opt_str_named(u, "medium", "utm.medium", MAX_UTM_CHARS)?,
            campaign: opt_str_named(u, "campaign", "utm.campaign", MAX_UTM_CHARS)?,
            term: opt_str_named(u, "term", "utm.term", MAX_UTM_CHARS)?,
            content: opt_str_named(u, "content", "utm.content", MAX_UTM_CHARS)?,
        }),
        Some(_) => Err(invalid("utm", "must be an object")),
    }
}

/// Validates one fact value at `index` of its batch.
pub fn validate(index: usize, value: &Value) -> Result<FactIn, Rejection> {
    let reject = |kind, client_id: Option<String>, reason| Rejection { index, kind, client_id, reason };
    let Value::Object(obj) = value else {
        return Err(reject(None, None, Reason::NotAnObject));
    };
    let kind = match obj.get("type") {
        None | Some(Value::Null) => return Err(reject(None, None, Reason::MissingType)),
        Some(Value::String(t)) => match t.as_str() {
            "visit" => FactKind::Visit,
            "entry" => FactKind::Entry,
            "ping" => FactKind::Ping,
            _ => return Err(reject(None, None, Reason::UnknownType)),
        },
        Some(_) => return Err(reject(None, None, Reason::UnknownType)),
    };
    let client_id = match obj.get("client_id") {
        None | Some(Value::Null) => return Err(reject(Some(kind), None, Reason::MissingClientId)),
        Some(Value::String(s)) => ClientId::parse(s).map_err(|_| reject(Some(kind), None, Reason::InvalidClientId))?,
        Some(_) => return Err(reject(Some(kind), None, Reason::InvalidClientId)),
    };
    let client = Some(client_id.to_string());
    let fail = |reason| reject(Some(kind), client.clone(), reason);
    let ts = opt_str(obj, "ts", MAX_TS_CHARS).map_err(fail)?;
    let body = match kind {
        FactKind::Visit => {
            let page = match obj.get("page") {
                None | Some(Value::Null) => return Err(fail(Reason::MissingPage)),
                Some(Value::String(p)) => PageKind::parse(p).ok_or_else(|| fail(Reason::InvalidPage))?,
                Some(_) => return Err(fail(Reason::InvalidPage)),
            };
            let v = VisitIn {
                page,
                event_id: opt_str(obj, "event_id", MAX_ID_CHARS).map_err(fail)?,
                webinar_id: opt_str(obj, "webinar_id", MAX_ID_CHARS).map_err(fail)?,
                session_id: opt_str(obj, "session_id", MAX_ID_CHARS).map_err(fail)?,
                event_uid: opt_str(obj, "event_uid", MAX_ID_CHARS).map_err(fail)?,
                path: opt_str(obj, "path", MAX_URL_CHARS).map_err(fail)?,
                cid: opt_str(obj, "cid", MAX_ID_CHARS).map_err(fail)?,
                utm: utm(obj).map_err(fail)?,
                referrer: opt_str(obj, "referrer", MAX_URL_CHARS).map_err(fail)?,
            };
            match page {
                PageKind::Landing if v.event_id.is_none() => return Err(fail(Reason::MissingEventId)),
                PageKind::Webinar | PageKind::Live if v.webinar_id.is_none() => {
                    return Err(fail(Reason::MissingWebinarId))
                }
                _ => {}
            }
            Body::Visit(v)
        }
        FactKind::Entry => {
            let entry_id =
                opt_str(obj, "entry_id", MAX_ID_CHARS).map_err(fail)?.ok_or_else(|| fail(Reason::MissingEntryId))?;
            let e = EntryIn {
                entry_id,
                event_id: opt_str(obj, "event_id", MAX_ID_CHARS).map_err(fail)?,
                webinar_id: opt_str(obj, "webinar_id", MAX_ID_CHARS).map_err(fail)?,
                session_id: opt_str(obj, "session_id", MAX_ID_CHARS).map_err(fail)?,
                cid: opt_str(obj, "cid", MAX_ID_CHARS).map_err(fail)?,
                utm: utm(obj).map_err(fail)?,
            };
            if e.event_id.is_none() && e.webinar_id.is_none() {
                return Err(fail(Reason::MissingEventId));
            }
            Body::Entry(e)
        }
        FactKind::Ping => Body::Ping(PingIn {
            webinar_id: opt_str(obj, "webinar_id", MAX_ID_CHARS)
                .map_err(fail)?
                .ok_or_else(|| fail(Reason::MissingWebinarId))?,
            session_id: opt_str(obj, "session_id", MAX_ID_CHARS).map_err(fail)?,
        }),
    };
    Ok(FactIn { index, client_id, ts, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn one(v: Value) -> Result<FactIn, Rejection> {
        validate(0, &v)
    }

    fn reason(v: Value) -> String {
        one(v).unwrap_err().reason.code().to_owned()
    }

    #[test]
    fn valid_facts_of_each_kind() {
        let v = one(json!({"type": "visit", "client_id": "acme", "page": "live", "webinar_id": "w1",
            "utm": {"source": "news", "medium": ""}, "extra": 1}))
        .unwrap();
        let Body::Visit(visit) = v.body else { panic!() };
        assert_eq!(visit.page, PageKind::Live);
        assert_eq!(visit.utm, Utm { source: Some("news".into()), ..Utm::default() });
        assert!(matches!(
            one(json!({"type": "entry", "client_id": "acme", "entry_id": "e", "webinar_id": "w"})).unwrap().body,
            Body::Entry(_)
        ));
        assert!(matches!(
            one(json!({"type": "ping", "client_id": "acme", "webinar_id": "w", "session_id": "s"})).unwrap().body,
            Body::Ping(_)
        ));
    }

    #[test]
    fn each_rule_has_its_reason() {
        assert_eq!(reason(json!(3)), "not_an_object");
        assert_eq!(reason(json!({"client_id": "a"})), "missing_type");
        assert_eq!(reason(json!({"type": "click", "client_id": "a"})), "unknown_type");
        assert_eq!(reason(json!({"type": 7, "client_id": "a"})), "unknown_type");
        assert_eq!(reason(json!({"type": "visit"})), "missing_client_id");
        assert_eq!(reason(json!({"type": "visit", "client_id": "Bad Client"})), "invalid_client_id");
        assert_eq!(reason(json!({"type": "visit", "client_id": ["a"]})), "invalid_client_id");
        assert_eq!(reason(json!({"type": "visit", "client_id": "a"})), "missing_page");
        assert_eq!(reason(json!({"type": "visit", "client_id": "a", "page": "home"})), "invalid_page");
        assert_eq!(reason(json!({"type": "visit", "client_id": "a", "page": "landing"})), "missing_event_id");
        assert_eq!(reason(json!({"type": "visit", "client_id": "a", "page": "webinar"})), "missing_webinar_id");
        assert_eq!(reason(json!({"type": "entry", "client_id": "a", "event_id": "e"})), "missing_entry_id");
        assert_eq!(reason(json!({"type": "entry", "client_id": "a", "entry_id": "x"})), "missing_event_id");
        assert_eq!(reason(json!({"type": "ping", "client_id": "a"})), "missing_webinar_id");
    }

    #[test]
    fn field_errors_name_the_field() {
        let base = |extra: Value| {
            let mut v = json!({"type": "visit", "client_id": "a", "page": "landing", "event_id": "e"});
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            one(v).unwrap_err().reason
        };
        assert_eq!(base(json!({"path": 5})), invalid("path", "must be a string"));
        assert_eq!(base(json!({"utm": "x"})), invalid("utm", "must be an object"));
        assert_eq!(
            base(json!({"utm": {"source": "x".repeat(10_000)}})),
            invalid("utm.source", "longer than 256 characters")
        );
        assert_eq!(base(json!({"referrer": "a\u{0007}b"})), invalid("referrer", "contains control characters"));
        assert_eq!(
            base(json!({"utm": {"campaign": "sale\u{202E}gpj.exe"}})),
            invalid("utm.campaign", "contains bidirectional text controls")
        );
        assert_eq!(
            base(json!({"event_uid": "a\u{2066}b"})),
            invalid("event_uid", "contains bidirectional text controls")
        );
        assert_eq!(base(json!({"ts": 1_700_000_000})), invalid("ts", "must be a string"));
    }

    #[test]
    fn injection_strings_are_kept_verbatim() {
        let nasty = "'); DROP TABLE facts; -- <script>alert(1)</script> \" \\ ∑";
        let v = one(json!({"type": "visit", "client_id": "a", "page": "landing", "event_id": nasty, "path": nasty,
            "utm": {"campaign": nasty}}))
        .unwrap();
        let Body::Visit(visit) = v.body else { panic!() };
        assert_eq!(visit.event_id.as_deref(), Some(nasty));
        assert_eq!(visit.utm.campaign.as_deref(), Some(nasty));
    }

    #[test]
    fn body_level_errors() {
        assert_eq!(parse_body(b"\xff\xfe").unwrap_err().code(), "invalid_utf8");
        assert_eq!(parse_body(b"{nope").unwrap_err().code(), "malformed_json");
        assert_eq!(parse_body(b"\"x\"").unwrap_err().code(), "not_object_or_array");
        assert_eq!(parse_body(b"[]").unwrap_err().code(), "empty_batch");
        let batch = format!("[{}]", vec!["{}"; 101].join(","));
        assert_eq!(parse_body(batch.as_bytes()).unwrap_err(), BodyError::TooManyFacts(101));
        let deep = "[".repeat(10_000);
        assert_eq!(parse_body(deep.as_bytes()).unwrap_err().code(), "malformed_json");
        assert_eq!(parse_body(b"[1, {\"type\": \"visit\"}]").unwrap().len(), 2);
    }

    /// Every string a validated fact carries, with its limit.
    fn strings(f: &FactIn) -> Vec<(String, usize)> {
        let mut out = vec![(f.client_id.to_string(), 64)];
        let ids: Vec<&Option<String>>;
        let mut urls: Vec<&Option<String>> = Vec::new();
        let mut utm: Option<&Utm> = None;
        match &f.body {
            Body::Visit(v) => {
                ids = vec![&v.event_id, &v.webinar_id, &v.session_id, &v.event_uid, &v.cid];
                urls = vec![&v.path, &v.referrer];
                utm = Some(&v.utm);
            }
            Body::Entry(e) => {
                out.push((e.entry_id.clone(), MAX_ID_CHARS));
                ids = vec![&e.event_id, &e.webinar_id, &e.session_id, &e.cid];
                utm = Some(&e.utm);
            }
            Body::Ping(p) => {
                out.push((p.webinar_id.clone(), MAX_ID_CHARS));
                ids = vec![&p.session_id];
            }
        }
        let mut push = |v: &Option<String>, max: usize| out.extend(v.iter().map(|s| (s.clone(), max)));
        push(&f.ts, MAX_TS_CHARS);
        ids.into_iter().for_each(|v| push(v, MAX_ID_CHARS));
        urls.into_iter().for_each(|v| push(v, MAX_URL_CHARS));
        if let Some(u) = utm {
            for v in [&u.source, &u.medium, &u.campaign, &u.term, &u.content] {
                push(v, MAX_UTM_CHARS);
            }
        }
        out
    }

    /// The bounds, checked independently of `check_text`.
    fn within_bounds(value: &str, max: usize) -> bool {
        value.chars().count() <= max
            && !value.is_empty()
            && value.chars().all(|c| {
                let cp = u32::from(c);
                cp >= 0x20
                    && !(0x7f..=0x9f).contains(&cp)
                    && ![0x061c, 0x200e, 0x200f, 0x2028, 0x2029].contains(&cp)
                    && !(0x202a..=0x202e).contains(&cp)
                    && !(0x2066..=0x2069).contains(&cp)
            })
    }

    proptest! {
        // Arbitrary bytes never panic the parser, and every outcome is either a body error or
        // one result per element.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(values) = parse_body(&bytes) {
                prop_assert!(!values.is_empty() && values.len() <= MAX_BATCH);
                prop_assert_eq!(validate_all(&values).len(), values.len());
            }
        }

        // Facts built from arbitrary strings (any Unicode, controls and bidi included, up to
        // 300 characters): whatever is accepted is within the validation bounds.
        #[test]
        fn accepted_values_are_within_bounds(
            values in proptest::collection::vec(any::<String>(), 12),
            long in proptest::collection::vec("[a-z\u{202e}\u{0}]{250,260}", 3),
            kind in 0usize..3,
        ) {
            let pick = |i: usize| if i % 4 == 3 { long[i % 3].clone() } else { values[i % values.len()].clone() };
            let fact = match kind {
                0 => json!({"type": "visit", "client_id": "acme", "page": "landing", "event_id": pick(0),
                    "session_id": pick(1), "event_uid": pick(2), "path": pick(3), "cid": pick(4), "referrer": pick(5),
                    "ts": pick(6), "utm": {"source": pick(7), "medium": pick(8), "campaign": pick(9), "term": pick(10), "content": pick(11)}}),
                1 => json!({"type": "entry", "client_id": "acme", "entry_id": pick(0), "event_id": pick(1),
                    "session_id": pick(2), "cid": pick(3), "utm": {"source": pick(7), "campaign": pick(11)}}),
                _ => json!({"type": "ping", "client_id": "acme", "webinar_id": pick(0), "session_id": pick(3)}),
            };
            let body = serde_json::to_vec(&fact).unwrap();
            let values = parse_body(&body).unwrap();
            if let Ok(f) = validate(0, &values[0]) {
                for (v, max) in strings(&f) {
                    prop_assert!(within_bounds(&v, max), "{:?} (max {})", v, max);
                }
            }
        }

        // Arbitrary JSON structures: a valid fact mixed into a batch is always kept, and every
        // rejection points at its own index.
        #[test]
        fn good_facts_survive_bad_neighbours(junk in proptest::collection::vec(arb_json(), 0..20), at in 0usize..20) {
            let good = json!({"type": "visit", "client_id": "acme", "page": "landing", "event_id": "e1"});
            let mut items = junk.clone();
            let at = at.min(items.len());
            items.insert(at, good);
            let body = serde_json::to_vec(&Value::Array(items)).unwrap();
            let values = parse_body(&body).unwrap();
            let results = validate_all(&values);
            prop_assert!(results[at].is_ok());
            for (i, r) in results.iter().enumerate() {
                if let Err(rej) = r { prop_assert_eq!(rej.index, i); }
            }
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[a-z\\x00-\\x1f'\";<>]{0,12}".prop_map(Value::String),
            prop_oneof![Just("visit"), Just("entry"), Just("ping"), Just("landing"), Just("live"), Just("acme")]
                .prop_map(|s| Value::String(s.to_owned())),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("type"),
                        Just("client_id"),
                        Just("page"),
                        Just("event_id"),
                        Just("webinar_id"),
                        Just("utm"),
                        Just("source"),
                        Just("session_id"),
                        Just("entry_id"),
                        Just("ts")
                    ]
                    .prop_map(str::to_owned),
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
