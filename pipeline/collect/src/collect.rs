//! `POST /v1/collect` as typed steps.
//!
//! ```text
//! admit_source ─▶ read_body ─▶ parse ─▶ validate ─▶ admit_facts ─▶ enrich ─▶ bound ─▶ spool ─▶ answer
//!  per-address     content type,  JSON     intake,    tenancy and    session,   fact size,  fsync
//!  request limit   64 KiB, time   body     fields     rate limits    cookies,   request's
//!                                                                    cid        budget
//! ```
//!
//! A step that refuses the whole request returns a [`CollectError`] (its status and body are
//! decided there); a step that refuses single facts adds them to `rejected[]` and the good facts
//! of the batch go on. The answer is `202` with `{"accepted", "rejected", "session_id"}` once the
//! spool has fsynced the accepted facts.
//!
//! Bounded cost: a request adds at most [`SPOOL_BYTES_PER_BYTE_SENT`] bytes to the spool per
//! byte it sent (request line, headers and body), and no fact's record is larger than
//! [`intake::MAX_FACT_BYTES`]; facts beyond either are rejected (`over_budget`,
//! `fact_too_large`). The budget matters because a cookie's attribution is copied into every
//! fact of the request.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body as HttpBody, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use eventflow_core::fact::{Entry, Fact, FactHeader, FactKind, Ping, SessionOrigin, Utm, Visit};
use eventflow_core::time;

use crate::error::CollectError;
use crate::http::AppState;
use crate::intake::{self, Body, FactIn, Reason, Rejection, MAX_BODY_BYTES};
use crate::logs::Failure;
use crate::session::{self, Attribution, Touch};
use crate::spool::SpoolError;

/// Bytes a request may add to the spool per byte it sent.
pub const SPOOL_BYTES_PER_BYTE_SENT: u64 = 4;

/// A request refused whole: the error, and the kind and client of its first fact when the body
/// could be read that far (they name the `*TrackFail` line).
#[derive(Debug)]
struct Refused {
    error: CollectError,
    kind: Option<FactKind>,
    client: Option<String>,
    /// Each fact already logged its own line (rate limits, spool).
    logged: bool,
}

impl From<CollectError> for Refused {
    fn from(error: CollectError) -> Self {
        Refused { error, kind: None, client: None, logged: false }
    }
}

/// The handler.
pub(crate) async fn collect(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: HttpBody,
) -> Response {
    let source = st.source.source(peer.ip(), &headers);
    let head_bytes = head_bytes(&method, &uri, &headers);
    match run(&st, source, &headers, head_bytes, body).await {
        Ok(response) => response,
        Err(refused) => {
            if !refused.logged {
                let detail = refused.error.detail();
                st.fail_log.fail(Failure {
                    kind: refused.kind.unwrap_or(FactKind::Visit),
                    reason: refused.error.code(),
                    client_id: refused.client.as_deref(),
                    index: None,
                    field: None,
                    detail: Some(&detail),
                });
            }
            refused.error.into_response()
        }
    }
}

/// Bytes of the request line and headers as sent (HTTP/1.1 framing).
fn head_bytes(method: &Method, uri: &Uri, headers: &HeaderMap) -> u64 {
    let line = method.as_str().len() + uri.to_string().len() + " HTTP/1.1\r\n".len() + 1;
    let fields: usize = headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    (line + fields + 2) as u64
}

async fn run(
    st: &AppState,
    source: IpAddr,
    headers: &HeaderMap,
    head_bytes: u64,
    body: HttpBody,
) -> Result<Response, Refused> {
    admit_source(st, source)?;
    let bytes = read_body(headers, body, st.body_timeout).await?;
    let sent = head_bytes + bytes.len() as u64;
    let values = intake::parse_body(&bytes).map_err(CollectError::from)?;
    let (kind, client) = intake::peek_identity(&values);
    let mut batch = validate(st, &values);
    admit_facts(st, source, &mut batch);
    if batch.valid.is_empty() && !batch.rejected.is_empty() && batch.rate_limited == batch.rejected.len() {
        record_rejections(st, &batch.rejected);
        let rejected = batch.rejected.iter().map(rejection_json).collect();
        return Err(Refused { error: CollectError::FactsRateLimited { rejected }, kind, client, logged: true });
    }
    let mut enriched = enrich(st, headers, batch);
    resolve_cids(st, &mut enriched.facts).await;
    bound(st, &mut enriched, sent);
    spool(st, enriched).await.map_err(|error| Refused { error, kind, client, logged: true })
}

// -------------------------------------------------------------------------------------------
// Steps

fn admit_source(st: &AppState, source: IpAddr) -> Result<(), CollectError> {
    st.limits.ip_requests.check(&source).then_some(()).ok_or(CollectError::SourceRateLimited)
}

/// The body, if its content type is one a beacon uses, it fits in 64 KiB (the limit itself is
/// `tower_http`'s, around the route) and it arrives within `timeout` in total.
async fn read_body(headers: &HeaderMap, body: HttpBody, timeout: Duration) -> Result<Bytes, CollectError> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let essence = ct.to_str().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if essence != "application/json" && essence != "text/plain" {
            return Err(CollectError::UnsupportedMediaType(essence));
        }
    }
    // A total deadline: tower-http's body timeout restarts at every frame, so a body trickled a
    // byte at a time would never reach it.
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, MAX_BODY_BYTES + 1)).await {
        Err(_) => Err(CollectError::BodyTimeout(timeout)),
        Ok(Ok(bytes)) if bytes.len() > MAX_BODY_BYTES => Err(CollectError::BodyTooLarge),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) if is_length_limit(&e) => Err(CollectError::BodyTooLarge),
        Ok(Err(e)) => Err(CollectError::UnreadableBody(e.to_string())),
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Facts that passed validation and tenancy, and the rejected ones.
#[derive(Debug, Default)]
struct Batch {
    valid: Vec<FactIn>,
    rejected: Vec<Rejection>,
    /// How many of `rejected` were refused by a rate limit.
    rate_limited: usize,
}

fn validate(st: &AppState, values: &[Value]) -> Batch {
    let mut batch = Batch::default();
    for result in intake::validate_all(values) {
        match result {
            Ok(f) if !st.clients.accepts(&f.client_id) => batch.rejected.push(Rejection {
                index: f.index,
                kind: Some(f.kind()),
                client_id: Some(f.client_id.to_string()),
                reason: Reason::UnknownClient,
            }),
            Ok(f) => batch.valid.push(f),
            Err(r) => batch.rejected.push(r),
        }
    }
    batch
}

/// Rate limits, counting facts as well as requests, per source address and per client. A fact
/// refused by its address's budget takes nothing from its client's.
fn admit_facts(st: &AppState, source: IpAddr, batch: &mut Batch) {
    let l = &st.limits;
    let mut client_request: HashMap<String, bool> = HashMap::new();
    let valid = std::mem::take(&mut batch.valid);
    for f in valid {
        let client = f.client_id.as_str();
        let request_ok =
            *client_request.entry(client.to_owned()).or_insert_with(|| l.client_requests.check(&client.to_owned()));
        if request_ok && l.ip_facts.check(&source) && l.client_facts.check(&client.to_owned()) {
            batch.valid.push(f);
        } else {
            batch.rate_limited += 1;
            batch.rejected.push(Rejection {
                index: f.index,
                kind: Some(f.kind()),
                client_id: Some(f.client_id.to_string()),
                reason: Reason::RateLimited,
            });
        }
    }
}

/// Facts with their session, attribution and event time, and what the answer sets.
#[derive(Debug)]
struct Enriched {
    facts: Vec<(usize, Fact)>,
    rejected: Vec<Rejection>,
    touches: Touches,
    cookie_sid: Option<String>,
    created_sid: Option<String>,
    received_ms: i64,
}

fn enrich(st: &AppState, headers: &HeaderMap, batch: Batch) -> Enriched {
    let Batch { valid, mut rejected, .. } = batch;
    // The cookies describe one browser: its session (`ef_sid`) and its touches (`ef_utm`).
    let cookies = || headers.get_all(header::COOKIE).into_iter().filter_map(|v| v.to_str().ok());
    let cookie_sid =
        session::cookie(cookies(), session::SESSION_COOKIE).filter(|s| session::valid_session_id(s)).map(str::to_owned);
    let cookie_utm = session::cookie(cookies(), session::UTM_COOKIE);
    let cookie_attribution = cookie_utm.map(Attribution::decode).unwrap_or_default();
    // A visit without a session creates one for the whole request (one browser), so an entry or
    // ping sent in the same batch by a browser without a cookie yet shares it.
    let creates_session =
        cookie_sid.is_none() && valid.iter().any(|f| matches!(&f.body, Body::Visit(v) if v.session_id.is_none()));
    let created_sid: Option<String> = creates_session.then(session::new_session_id);
    // A request with an EventFlow cookie comes from a browser (see `Touches`).
    let from_browser = session::cookie(cookies(), session::SESSION_COOKIE).is_some() || cookie_utm.is_some();
    let mut touches = Touches::new(cookie_attribution, from_browser);
    let received_ms = chrono::Utc::now().timestamp_millis();
    let mut facts: Vec<(usize, Fact)> = Vec::with_capacity(valid.len());
    for f in valid {
        let kind = f.kind();
        let (event_ms, skew) = time::event_time(received_ms, f.ts.as_deref(), st.allowed_lateness_ms);
        let header = FactHeader {
            spool_id: 0,
            spool_seq: 0,
            client_id: f.client_id.to_string(),
            received_at_ms: received_ms,
            event_time_ms: event_ms,
            client_ts: f.ts.clone(),
            clock_skew: skew,
        };
        let body_sid = match &f.body {
            Body::Visit(v) => v.session_id.clone(),
            Body::Entry(e) => e.session_id.clone(),
            Body::Ping(p) => p.session_id.clone(),
        };
        let (session_id, origin) = match (body_sid, &cookie_sid, &created_sid) {
            (Some(s), _, _) => (s, SessionOrigin::Body),
            (None, Some(c), _) => (c.clone(), SessionOrigin::Cookie),
            (None, None, Some(created)) => (created.clone(), SessionOrigin::Created),
            (None, None, None) => {
                rejected.push(Rejection {
                    index: f.index,
                    kind: Some(kind),
                    client_id: Some(f.client_id.to_string()),
                    reason: Reason::MissingSessionId,
                });
                continue;
            }
        };
        // `cid_resolved` is set by `resolve_cids`, once the final `cid`s (own or inherited) are
        // known.
        let fact = match f.body {
            Body::Visit(v) => {
                let (cid, utm, inherited, _) = touches.attribute(origin, v.cid, v.utm, event_ms);
                Fact::Visit(Visit {
                    header,
                    session_id,
                    session_origin: origin,
                    page: v.page,
                    event_id: v.event_id,
                    webinar_id: v.webinar_id,
                    event_uid: v.event_uid,
                    path: v.path,
                    cid,
                    cid_resolved: false,
                    utm,
                    utm_inherited: inherited,
                    referrer: v.referrer,
                })
            }
            Body::Entry(e) => {
                let (cid, utm, inherited, first) = touches.attribute(origin, e.cid, e.utm, event_ms);
                Fact::Entry(Entry {
                    header,
                    entry_id: e.entry_id,
                    session_id,
                    session_origin: origin,
                    event_id: e.event_id,
                    webinar_id: e.webinar_id,
                    cid,
                    cid_resolved: false,
                    utm,
                    utm_inherited: inherited,
                    first_touch_utm: first.as_ref().map(|t| t.utm.clone()),
                    first_touch_at_ms: first.as_ref().map(|t| t.at_ms),
                })
            }
            Body::Ping(p) => Fact::Ping(Ping { header, webinar_id: p.webinar_id, session_id, session_origin: origin }),
        };
        facts.push((f.index, fact));
    }
    Enriched { facts, rejected, touches, cookie_sid, created_sid, received_ms }
}

/// Sets `cid_resolved` of every fact: whether its `cid` (own or inherited) names a link of its
/// client. Missing links are looked up in ClickHouse (bounded, see [`crate::links`]), all of
/// the request's at once.
async fn resolve_cids(st: &AppState, facts: &mut [(usize, Fact)]) {
    let cid_of = |f: &Fact| match f {
        Fact::Visit(v) => v.cid.clone(),
        Fact::Entry(e) => e.cid.clone(),
        Fact::Ping(_) => None,
    };
    let mut cids: Vec<String> = facts.iter().filter_map(|(_, f)| cid_of(f)).collect();
    if cids.is_empty() {
        return;
    }
    cids.sort_unstable();
    cids.dedup();
    let resolved = st.links.resolve_all(cids.iter().map(String::as_str)).await;
    for (_, fact) in facts.iter_mut() {
        let client = fact.header().client_id.clone();
        let is_link =
            |cid: &Option<String>| cid.as_ref().and_then(|c| resolved.get(c)).is_some_and(|r| r.belongs_to(&client));
        match fact {
            Fact::Visit(v) => v.cid_resolved = is_link(&v.cid),
            Fact::Entry(e) => e.cid_resolved = is_link(&e.cid),
            Fact::Ping(_) => {}
        }
    }
}

/// Spool bytes of a fact's record, at most (the spool id and sequence, encoded as zero here,
/// take up to 10 bytes each as Avro longs).
fn record_bytes(st: &AppState, fact: &Fact) -> usize {
    let value = st.codec.encode(fact).map(|v| v.len()).unwrap_or(usize::MAX / 2);
    value + 20 + fact.partition_key().len() + crate::spool::RECORD_OVERHEAD
}

/// Rejects facts whose record is over [`intake::MAX_FACT_BYTES`] and, in batch order, those
/// beyond the request's budget of `SPOOL_BYTES_PER_BYTE_SENT × sent` spool bytes.
fn bound(st: &AppState, e: &mut Enriched, sent: u64) {
    let budget = sent.saturating_mul(SPOOL_BYTES_PER_BYTE_SENT);
    let mut used = 0u64;
    let facts = std::mem::take(&mut e.facts);
    for (index, fact) in facts {
        let size = record_bytes(st, &fact);
        let reason = if size > intake::MAX_FACT_BYTES {
            Some(Reason::FactTooLarge)
        } else if used + size as u64 > budget {
            Some(Reason::OverBudget)
        } else {
            None
        };
        match reason {
            None => {
                used += size as u64;
                e.facts.push((index, fact));
            }
            Some(reason) => e.rejected.push(Rejection {
                index,
                kind: Some(fact.kind()),
                client_id: Some(fact.header().client_id.clone()),
                reason,
            }),
        }
    }
}

/// Appends the accepted facts and answers once they are fsynced.
async fn spool(st: &AppState, e: Enriched) -> Result<Response, CollectError> {
    let Enriched { facts, mut rejected, touches, cookie_sid, created_sid, received_ms } = e;
    let accepted = facts.len();
    let used_sid = answer_session(facts.iter().map(|(_, f)| f));
    let kinds: Vec<(usize, FactKind, String)> =
        facts.iter().map(|(i, f)| (*i, f.kind(), f.header().client_id.clone())).collect();
    if !facts.is_empty() {
        if let Err(err) = st.spool.append(facts.into_iter().map(|(_, f)| f).collect(), received_ms).await {
            // Not acknowledged: the client may retry; nothing was stored.
            let error = match &err {
                SpoolError::Full { .. } => {
                    st.metrics.spool_refusals.with_label_values(&["full"]).inc();
                    CollectError::SpoolFull
                }
                SpoolError::ClientShare { .. } => {
                    st.metrics.spool_refusals.with_label_values(&["client_share"]).inc();
                    CollectError::SpoolClientShare
                }
                other => CollectError::SpoolUnavailable(other.to_string()),
            };
            let detail = err.to_string();
            for (index, kind, client) in &kinds {
                st.metrics.facts.with_label_values(&[kind.as_str(), "failed"]).inc();
                st.metrics.rejections.with_label_values(&[kind.as_str(), "spool_unavailable"]).inc();
                st.client_series.count(client, "failed", 1);
                st.fail_log.fail(Failure {
                    kind: *kind,
                    reason: "spool_unavailable",
                    client_id: Some(client),
                    index: Some(*index),
                    field: None,
                    detail: Some(&detail),
                });
            }
            record_rejections(st, &rejected);
            return Err(error);
        }
        for (_, kind, client) in &kinds {
            st.metrics.facts.with_label_values(&[kind.as_str(), "accepted"]).inc();
            st.client_series.count(client, "accepted", 1);
        }
    }
    record_rejections(st, &rejected);
    rejected.sort_by_key(|r| r.index);
    let mut body = json!({
        "accepted": accepted,
        "rejected": rejected.iter().map(rejection_json).collect::<Vec<_>>(),
    });
    if let Some(sid) = &used_sid {
        // The tracker keeps this session for the page's later facts (see `answer_session`).
        body["session_id"] = json!(sid);
        body["session_ttl_ms"] = json!(st.cookies.session_max_age_secs.saturating_mul(1000));
    }
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    let h = response.headers_mut();
    if let Some(sid) = cookie_session(cookie_sid.as_deref(), created_sid.as_deref(), used_sid.as_deref()) {
        if let Ok(v) = HeaderValue::from_str(&st.cookies.session(sid)) {
            h.append(header::SET_COOKIE, v);
        }
    }
    if let Some(a) = touches.changed_cookie() {
        if let Ok(v) = HeaderValue::from_str(&st.cookies.attribution(a)) {
            h.append(header::SET_COOKIE, v);
        }
    }
    Ok(response)
}

fn rejection_json(r: &Rejection) -> Value {
    let mut v = json!({"index": r.index, "reason": r.reason.code()});
    if let Reason::InvalidField { field, detail } = &r.reason {
        v["field"] = json!(field);
        v["detail"] = json!(detail);
    }
    v
}

/// Counts and logs rejected facts (one `*TrackFail` line each, within the log rate).
fn record_rejections(st: &AppState, rejected: &[Rejection]) {
    for r in rejected {
        let kind = r.kind.unwrap_or(FactKind::Visit);
        st.metrics.facts.with_label_values(&[kind.as_str(), "rejected"]).inc();
        st.metrics.rejections.with_label_values(&[kind.as_str(), r.reason.code()]).inc();
        if let Some(client) = r.client_id.as_deref().filter(|_| r.reason != Reason::UnknownClient) {
            st.client_series.count(client, "rejected", 1);
        }
        let (field, detail) = match &r.reason {
            Reason::InvalidField { field, detail } => (Some(field.as_str()), Some(detail.as_str())),
            _ => (None, None),
        };
        st.fail_log.fail(Failure {
            kind,
            reason: r.reason.code(),
            client_id: r.client_id.as_deref(),
            index: Some(r.index),
            field,
            detail,
        });
    }
}

/// The session all accepted facts of a request used, if they used one (a browser's beacon
/// always does). It is answered as `session_id`, so the tracker can name it in the body of the
/// page's later facts and keep the page's session after `ef_sid` has expired.
fn answer_session<'a>(facts: impl IntoIterator<Item = &'a Fact>) -> Option<String> {
    let mut sessions = facts.into_iter().map(Fact::session_id);
    let first = sessions.next()?;
    sessions.all(|s| s == first).then(|| first.to_owned())
}

/// The session `ef_sid` is set to: a valid cookie's own session is kept alive (sliding expiry);
/// without one, the session created for this request, else the session the request used (a
/// page that named its session after its cookie expired renews the cookie with it, so later
/// beacons of the browser, cookie-only ones included, continue that session).
fn cookie_session<'a>(cookie: Option<&'a str>, created: Option<&'a str>, used: Option<&'a str>) -> Option<&'a str> {
    cookie.or(created).or(used.filter(|s| session::valid_session_id(s)))
}

/// Attribution state of one request (docs/policies/attribution.md).
///
/// `ef_utm` describes the browser that sent the request. When the request carries an EventFlow
/// cookie it comes from a browser, so every fact is attributed from `ef_utm` and the touches of
/// the request's earlier facts, whatever named its session (the cookie, the body or a new one):
/// the same as if each fact had come alone with the cookie the previous answer set. A request
/// without cookies may be a server-side integration batching several visitors' facts: a fact
/// that names its session in the body is then attributed by its own fields only, so no visitor's
/// campaign passes to another (facts whose session the collector created for the request are one
/// new browser's and share the state). The answer's `ef_utm` records every touch of the request,
/// in order.
#[derive(Debug)]
struct Touches {
    /// `ef_utm` as the request sent it.
    before: Attribution,
    /// What the browser's facts are attributed from.
    browser: Attribution,
    /// `ef_utm` for the answer.
    answer: Attribution,
    from_browser: bool,
}

/// `(cid, utm, inherited, first touch)` of a fact.
type Attributed = (Option<String>, Utm, bool, Option<Touch>);

impl Touches {
    fn new(cookie: Attribution, from_browser: bool) -> Self {
        Self { before: cookie.clone(), browser: cookie.clone(), answer: cookie, from_browser }
    }

    /// Attribution of a fact whose session has `origin` (see [`attribute`]).
    fn attribute(&mut self, origin: SessionOrigin, cid: Option<String>, utm: Utm, at_ms: i64) -> Attributed {
        if let Some(touch) = Touch::of(&cid, &utm, at_ms) {
            self.answer.touch(touch);
        }
        let mut own = Attribution::default();
        let state = if self.from_browser || origin != SessionOrigin::Body { &mut self.browser } else { &mut own };
        let (cid, utm, inherited) = attribute(state, cid, utm, at_ms);
        (cid, utm, inherited, state.first.clone())
    }

    /// The new `ef_utm`, when the request touched a campaign.
    fn changed_cookie(&self) -> Option<&Attribution> {
        (self.answer != self.before).then_some(&self.answer)
    }
}

/// Attribution of one fact: a fact with its own `cid` or UTM is a touch; one without inherits
/// the last touch. Returns `(cid, utm, inherited)`.
fn attribute(attribution: &mut Attribution, cid: Option<String>, utm: Utm, at_ms: i64) -> (Option<String>, Utm, bool) {
    if let Some(touch) = Touch::of(&cid, &utm, at_ms) {
        attribution.touch(touch);
        return (cid, utm, false);
    }
    match &attribution.last {
        Some(last) => (last.cid.clone(), last.utm.clone(), true),
        None => (None, Utm::default(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fact_of_a_browser_is_attributed_from_its_cookie() {
        let news = Utm { source: Some("news".into()), ..Utm::default() };
        let ads = Utm { source: Some("ads".into()), ..Utm::default() };
        let mut cookie = Attribution::default();
        cookie.touch(Touch { cid: None, utm: ads.clone(), at_ms: 1 });
        cookie.touch(Touch { cid: Some("spring".into()), utm: news.clone(), at_ms: 2 });
        let mut t = Touches::new(cookie, true);
        // A fact naming its own session (body) inherits the browser's last touch and carries its
        // first touch, like a cookie-session fact.
        let (cid, utm, inherited, first) = t.attribute(SessionOrigin::Body, None, Utm::default(), 3);
        assert_eq!((cid, utm, inherited), (Some("spring".into()), news.clone(), true));
        assert_eq!(first.map(|f| (f.utm, f.at_ms)), Some((ads.clone(), 1)));
        assert_eq!(t.changed_cookie(), None, "no touch, no new ef_utm");

        // No cookie (a server-side batch of several visitors): a fact naming its session is
        // attributed by its own fields only, as if it had come alone.
        let mut t = Touches::new(Attribution::default(), false);
        assert_eq!(t.attribute(SessionOrigin::Body, None, ads.clone(), 1).1, ads);
        assert_eq!(t.attribute(SessionOrigin::Body, None, Utm::default(), 2), (None, Utm::default(), false, None));
        // ... while facts of the session the collector created for the request are one new
        // browser's and share its touches.
        t.attribute(SessionOrigin::Created, None, news.clone(), 3);
        let (_, utm, inherited, _) = t.attribute(SessionOrigin::Created, None, Utm::default(), 4);
        assert_eq!((utm, inherited), (news.clone(), true));
        // The answer's ef_utm records every touch of the request, in order.
        let cookie = t.changed_cookie().expect("touched");
        assert_eq!(cookie.first.as_ref().map(|f| &f.utm), Some(&ads));
        assert_eq!(cookie.last.as_ref().map(|l| &l.utm), Some(&news));
    }

    #[test]
    fn the_answer_names_the_session_and_renews_the_cookie() {
        let ping = |sid: &str| {
            Fact::Ping(Ping {
                header: FactHeader {
                    spool_id: 0,
                    spool_seq: 0,
                    client_id: "acme".into(),
                    received_at_ms: 0,
                    event_time_ms: 0,
                    client_ts: None,
                    clock_skew: false,
                },
                webinar_id: "w1".into(),
                session_id: sid.into(),
                session_origin: SessionOrigin::Body,
            })
        };
        assert_eq!(answer_session(&[ping("s1"), ping("s1")]), Some("s1".into()));
        assert_eq!(answer_session(&[ping("s1"), ping("s2")]), None, "a server batch of several sessions");
        assert_eq!(answer_session(&[]), None);
        // A live cookie keeps its session; without one, the created or the used session.
        assert_eq!(cookie_session(Some("c"), None, Some("s1")), Some("c"));
        assert_eq!(cookie_session(None, Some("new"), Some("new")), Some("new"));
        assert_eq!(cookie_session(None, None, Some("s1")), Some("s1"), "an expired cookie is renewed");
        assert_eq!(cookie_session(None, None, Some("not a cookie value")), None);
        assert_eq!(cookie_session(None, None, None), None);
    }

    #[test]
    fn attribution_rules() {
        let mut a = Attribution::default();
        let news = Utm { source: Some("news".into()), ..Utm::default() };
        assert_eq!(attribute(&mut a, None, Utm::default(), 1), (None, Utm::default(), false));
        assert_eq!(attribute(&mut a, Some("c1".into()), news.clone(), 2), (Some("c1".into()), news.clone(), false));
        // A later page without UTM (client-side navigation) inherits the last touch.
        assert_eq!(attribute(&mut a, None, Utm::default(), 3), (Some("c1".into()), news.clone(), true));
        let ads = Utm { source: Some("ads".into()), ..Utm::default() };
        attribute(&mut a, None, ads.clone(), 4);
        assert_eq!(a.first.as_ref().unwrap().utm, news);
        assert_eq!(a.last.as_ref().unwrap().utm, ads);
    }

    #[test]
    fn head_bytes_count_the_request_line_and_headers() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        // "POST /v1/collect HTTP/1.1\r\n" (27) + "content-type: text/plain\r\n" (26) + "\r\n" (2)
        assert_eq!(head_bytes(&Method::POST, &"/v1/collect".parse().unwrap(), &h), 27 + 26 + 2);
    }

    #[test]
    fn the_largest_ascii_fact_fits_the_record_cap() {
        use eventflow_core::avro::FactCodec;
        use eventflow_core::fact::PageKind;
        let id = "i".repeat(intake::MAX_ID_CHARS);
        let url = "u".repeat(intake::MAX_URL_CHARS);
        let u = "m".repeat(intake::MAX_UTM_CHARS);
        let utm = Utm {
            source: Some(u.clone()),
            medium: Some(u.clone()),
            campaign: Some(u.clone()),
            term: Some(u.clone()),
            content: Some(u),
        };
        let header = FactHeader {
            spool_id: u64::MAX,
            spool_seq: u64::MAX,
            client_id: "c".repeat(64),
            received_at_ms: i64::MAX,
            event_time_ms: i64::MAX,
            client_ts: Some("t".repeat(intake::MAX_TS_CHARS)),
            clock_skew: true,
        };
        let visit = Fact::Visit(Visit {
            header: header.clone(),
            session_id: id.clone(),
            session_origin: SessionOrigin::Body,
            page: PageKind::Landing,
            event_id: Some(id.clone()),
            webinar_id: Some(id.clone()),
            event_uid: Some(id.clone()),
            path: Some(url.clone()),
            cid: Some(id.clone()),
            cid_resolved: true,
            utm: utm.clone(),
            utm_inherited: true,
            referrer: Some(url),
        });
        let entry = Fact::Entry(Entry {
            header,
            entry_id: id.clone(),
            session_id: id.clone(),
            session_origin: SessionOrigin::Body,
            event_id: Some(id.clone()),
            webinar_id: Some(id.clone()),
            cid: Some(id),
            cid_resolved: true,
            utm: utm.clone(),
            utm_inherited: true,
            first_touch_utm: Some(utm),
            first_touch_at_ms: Some(i64::MAX),
        });
        let codec = FactCodec::new().unwrap();
        for fact in [visit, entry] {
            let size = codec.encode(&fact).unwrap().len() + fact.partition_key().len() + crate::spool::RECORD_OVERHEAD;
            assert!(size <= intake::MAX_FACT_BYTES, "{size}");
        }
    }
}
