//! HTTP endpoints of the collector (CONTRACT.md §2).
//!
//! `POST /v1/collect` turns a body into facts: parse and validate ([`crate::intake`]), apply
//! tenancy and rate limits, enrich (session, attribution, campaign link, event time), append to
//! the spool and answer `202` once the spool has fsynced them; the answer names the session the
//! request used (`session_id`), which the tracker keeps for the page's later facts. Failures
//! never reach the page as anything but a status code: the tracker reads nothing else from
//! responses.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tracing::warn;

use eventflow_core::fact::{Entry, Fact, FactHeader, FactKind, Ping, SessionOrigin, Utm, Visit};
use eventflow_core::{time, ClientDirectory};

use crate::intake::{self, Body, FactIn, Reason, Rejection};
use crate::links::{Links, Resolved};
use crate::metrics::CollectorMetrics;
use crate::ratelimit::RateLimiter;
use crate::session::{self, Attribution, CookiePolicy, Touch};
use crate::spool::{Spool, SpoolError};

/// Largest accepted body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    pub spool: Spool,
    pub links: Links,
    pub clients: Arc<ClientDirectory>,
    pub metrics: CollectorMetrics,
    pub registry: prometheus::Registry,
    pub ip_limiter: RateLimiter<String>,
    pub client_limiter: RateLimiter<String>,
    pub cookies: CookiePolicy,
    pub allowed_origins: Vec<String>,
    pub trust_forwarded_for: bool,
    pub allowed_lateness_ms: i64,
    /// False once shutdown starts (readiness turns 503 first).
    pub accepting: AtomicBool,
}

/// The collector's router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/collect", post(collect).options(preflight))
        .route("/r/{cid}", get(redirect))
        .route("/v1/tracker.js", get(tracker_js))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Request count and latency by route template (never the raw URI).
async fn observe(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let response = next.run(req).await;
    st.metrics.request_duration.with_label_values(&[&route]).observe(started.elapsed().as_secs_f64());
    st.metrics.requests.with_label_values(&[&route, response.status().as_str()]).inc();
    response
}

fn error(status: StatusCode, code: &str, detail: impl Into<String>) -> Response {
    (status, Json(json!({"error": code, "detail": detail.into()}))).into_response()
}

fn log_request_failure(code: &str, detail: &str) {
    // No fact could be read from the body, so its kind is unknown: logged as a failed visit
    // (the default beacon) with the request-level error as reason.
    warn!(event = "VisitTrackFail", reason = code, client_id = "", detail, "beacon request rejected");
}

fn client_ip(st: &AppState, headers: &HeaderMap, peer: SocketAddr) -> String {
    if st.trust_forwarded_for {
        if let Some(first) =
            headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()).and_then(|v| v.split(',').next())
        {
            return first.trim().to_owned();
        }
    }
    peer.ip().to_string()
}

/// CORS: beacons carry cookies, so the allowed origin is echoed (never `*`) with credentials.
fn cors(st: &AppState, headers: &HeaderMap, response: &mut Response) {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return;
    };
    let allowed = st.allowed_origins.iter().any(|a| a == "*" || a == origin);
    if allowed {
        if let Ok(v) = HeaderValue::from_str(origin) {
            let h = response.headers_mut();
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
            h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
            h.append(header::VARY, HeaderValue::from_static("Origin"));
        }
    }
}

async fn preflight(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    cors(&st, &headers, &mut r);
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("POST, OPTIONS"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("content-type"));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    r
}

fn rejection_json(r: &Rejection) -> Value {
    let mut v = json!({"index": r.index, "reason": r.reason.code()});
    if let Reason::InvalidField { field, detail } = &r.reason {
        v["field"] = json!(field);
        v["detail"] = json!(detail);
    }
    v
}

fn record_rejection(st: &AppState, r: &Rejection) {
    let kind = r.kind.unwrap_or(FactKind::Visit);
    st.metrics.facts.with_label_values(&[kind.as_str(), "rejected"]).inc();
    st.metrics.rejections.with_label_values(&[kind.as_str(), r.reason.code()]).inc();
    let client = r.client_id.as_deref().unwrap_or("");
    match &r.reason {
        Reason::InvalidField { field, detail } => {
            warn!(event = kind.fail_event(), reason = r.reason.code(), client_id = client, index = r.index, field = %field, detail = %detail, "fact rejected")
        }
        reason => warn!(
            event = kind.fail_event(),
            reason = reason.code(),
            client_id = client,
            index = r.index,
            "fact rejected"
        ),
    }
}

async fn collect(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut response = collect_inner(&st, peer, &method, &headers, body).await;
    cors(&st, &headers, &mut response);
    response
}

async fn collect_inner(
    st: &AppState,
    peer: SocketAddr,
    _method: &Method,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let now = Instant::now();
    if !st.ip_limiter.try_take(&client_ip(st, headers, peer), 1.0, now) {
        log_request_failure("rate_limited", "too many requests from this address");
        let mut r = error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many requests from this address");
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let essence = ct.to_str().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if essence != "application/json" && essence != "text/plain" {
            log_request_failure("unsupported_media_type", &essence);
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("content type {essence:?}; send application/json or text/plain"),
            );
        }
    }
    let bytes = match body {
        Ok(b) => b,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            log_request_failure("body_too_large", "body exceeds 64 KiB");
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("body exceeds {MAX_BODY_BYTES} bytes"),
            );
        }
        Err(rejection) => {
            log_request_failure("unreadable_body", &rejection.body_text());
            return error(StatusCode::BAD_REQUEST, "unreadable_body", rejection.body_text());
        }
    };
    let values = match intake::parse_body(&bytes) {
        Ok(v) => v,
        Err(e) => {
            log_request_failure(e.code(), &e.to_string());
            let status = if matches!(e, intake::BodyError::TooManyFacts(_)) {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            return error(status, e.code(), e.to_string());
        }
    };

    let mut rejected: Vec<Rejection> = Vec::new();
    let mut valid: Vec<FactIn> = Vec::new();
    for result in intake::validate_all(&values) {
        match result {
            Ok(f) if !st.clients.accepts(&f.client_id) => rejected.push(Rejection {
                index: f.index,
                kind: Some(f.kind()),
                client_id: Some(f.client_id.to_string()),
                reason: Reason::UnknownClient,
            }),
            Ok(f) => valid.push(f),
            Err(r) => rejected.push(r),
        }
    }
    let mut rate_limited = 0usize;
    valid.retain(|f| {
        if st.client_limiter.try_take(&f.client_id.to_string(), 1.0, now) {
            true
        } else {
            rate_limited += 1;
            rejected.push(Rejection {
                index: f.index,
                kind: Some(f.kind()),
                client_id: Some(f.client_id.to_string()),
                reason: Reason::RateLimited,
            });
            false
        }
    });

    // Enrichment. The cookies describe one browser: its session (`ef_sid`) and its touches
    // (`ef_utm`).
    let cookie_header = headers.get(header::COOKIE).and_then(|v| v.to_str().ok());
    let cookie_sid = session::cookie(cookie_header, session::SESSION_COOKIE)
        .filter(|s| session::valid_session_id(s))
        .map(str::to_owned);
    let cookie_attribution =
        session::cookie(cookie_header, session::UTM_COOKIE).map(Attribution::decode).unwrap_or_default();
    // A visit without a session creates one for the whole request (one browser), so an entry or
    // ping sent in the same batch by a browser without a cookie yet shares it.
    let creates_session =
        cookie_sid.is_none() && valid.iter().any(|f| matches!(&f.body, Body::Visit(v) if v.session_id.is_none()));
    let created_sid: Option<String> = creates_session.then(session::new_session_id);
    // A request with an EventFlow cookie comes from a browser (see `Touches`).
    let from_browser = session::cookie(cookie_header, session::SESSION_COOKIE).is_some()
        || session::cookie(cookie_header, session::UTM_COOKIE).is_some();
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
        let (session_id, origin) = match (body_sid, &cookie_sid) {
            (Some(s), _) => (s, SessionOrigin::Body),
            (None, Some(c)) => (c.clone(), SessionOrigin::Cookie),
            (None, None) if created_sid.is_some() => (created_sid.clone().unwrap_or_default(), SessionOrigin::Created),
            (None, None) => {
                rejected.push(Rejection {
                    index: f.index,
                    kind: Some(kind),
                    client_id: Some(f.client_id.to_string()),
                    reason: Reason::MissingSessionId,
                });
                continue;
            }
        };
        // `cid_resolved` is set below, once the final `cid`s (own or inherited) are known.
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
    resolve_cids(st, &mut facts).await;

    let accepted = facts.len();
    let used_sid = answer_session(facts.iter().map(|(_, f)| f));
    let mut status = StatusCode::ACCEPTED;
    let mut retry_after = None;
    if !facts.is_empty() {
        let kinds: Vec<(usize, FactKind, String)> =
            facts.iter().map(|(i, f)| (*i, f.kind(), f.header().client_id.clone())).collect();
        match st.spool.append(facts.into_iter().map(|(_, f)| f).collect(), received_ms).await {
            Ok(_) => {
                for (_, kind, _) in &kinds {
                    st.metrics.facts.with_label_values(&[kind.as_str(), "accepted"]).inc();
                }
            }
            Err(e) => {
                // Not acknowledged: the client may retry; nothing was stored.
                let full = matches!(e, SpoolError::Full { .. });
                for (index, kind, client) in kinds {
                    st.metrics.facts.with_label_values(&[kind.as_str(), "failed"]).inc();
                    st.metrics.rejections.with_label_values(&[kind.as_str(), "spool_unavailable"]).inc();
                    warn!(event = kind.fail_event(), reason = "spool_unavailable", client_id = %client, index, error = %e, "fact not stored");
                }
                for r in &rejected {
                    record_rejection(st, r);
                }
                let mut r = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    if full { "spool_full" } else { "spool_unavailable" },
                    format!("{e}; retry later"),
                );
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                return r;
            }
        }
    } else if rate_limited > 0 && rejected.len() == rate_limited {
        status = StatusCode::TOO_MANY_REQUESTS;
        retry_after = Some("1");
    }
    for r in &rejected {
        record_rejection(st, r);
    }
    rejected.sort_by_key(|r| r.index);
    let mut body = json!({
        "accepted": if status == StatusCode::ACCEPTED { accepted } else { 0 },
        "rejected": rejected.iter().map(rejection_json).collect::<Vec<_>>(),
    });
    if let Some(sid) = &used_sid {
        // The tracker keeps this session for the page's later facts (see `answer_session`).
        body["session_id"] = json!(sid);
        body["session_ttl_ms"] = json!(st.cookies.session_max_age_secs.saturating_mul(1000));
    }
    let mut response = (status, Json(body)).into_response();
    let h = response.headers_mut();
    if let Some(ra) = retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static(ra));
    }
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
    response
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

/// `GET /r/{cid}`: a tracked campaign link.
async fn redirect(State(st): State<Arc<AppState>>, Path(cid): Path<String>, headers: HeaderMap) -> Response {
    // An id no import could have written is not worth a lookup.
    let plausible = cid.chars().count() <= intake::MAX_ID_CHARS && !cid.chars().any(char::is_control);
    let resolved = if plausible { st.links.resolve(&cid).await } else { Resolved::Unknown };
    let link = match resolved {
        Resolved::Link(link) => link,
        Resolved::Unknown => {
            st.metrics.link_clicks.with_label_values(&["unknown"]).inc();
            warn!(event = "VisitTrackFail", reason = "unknown_link", client_id = "", cid = %cid, "click on an unknown campaign link");
            return error(StatusCode::NOT_FOUND, "unknown_link", "no campaign link with this id");
        }
        Resolved::Unavailable => {
            // Not in the cache and not looked up (lookup limits, ClickHouse failing): the link
            // may exist, so this is not a 404.
            st.metrics.link_clicks.with_label_values(&["unavailable"]).inc();
            warn!(event = "VisitTrackFail", reason = "link_lookup_unavailable", client_id = "", cid = %cid, "campaign link could not be looked up");
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "link_lookup_unavailable",
                "the campaign link could not be looked up; retry later",
            );
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
    };
    st.metrics.link_clicks.with_label_values(&["redirected"]).inc();
    let cookie_header = headers.get(header::COOKIE).and_then(|v| v.to_str().ok());
    let mut attribution =
        session::cookie(cookie_header, session::UTM_COOKIE).map(Attribution::decode).unwrap_or_default();
    attribution.touch(Touch {
        cid: Some(cid.clone()),
        utm: link.utm.clone(),
        at_ms: chrono::Utc::now().timestamp_millis(),
    });
    let location = with_utm(&link.destination, &cid, &link.utm);
    let mut r = StatusCode::FOUND.into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&st.cookies.attribution(&attribution)) {
        h.append(header::SET_COOKIE, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `destination` with the link's `cid` and UTM parameters appended (before any `#fragment`).
pub fn with_utm(destination: &str, cid: &str, utm: &Utm) -> String {
    let (base, fragment) = match destination.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (destination, None),
    };
    let mut params = vec![("cid", cid.to_owned())];
    for (k, v) in [
        ("utm_source", &utm.source),
        ("utm_medium", &utm.medium),
        ("utm_campaign", &utm.campaign),
        ("utm_term", &utm.term),
        ("utm_content", &utm.content),
    ] {
        if let Some(v) = v {
            params.push((k, v.clone()));
        }
    }
    let mut url = base.to_owned();
    for (i, (k, v)) in params.iter().enumerate() {
        url.push(if i == 0 && !base.contains('?') { '?' } else { '&' });
        url.push_str(k);
        url.push('=');
        url.push_str(&percent_encode(v));
    }
    if let Some(f) = fragment {
        url.push('#');
        url.push_str(f);
    }
    url
}

const TRACKER_JS: &str = include_str!("../assets/tracker.js");

async fn tracker_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/javascript; charset=utf-8")),
            (header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300")),
        ],
        TRACKER_JS,
    )
        .into_response()
}

async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    let shared = st.spool.shared();
    let accepting = st.accepting.load(Ordering::Acquire);
    let body = json!({
        "accepting": accepting,
        "spool_writer": shared.writer_alive(),
        "spool_full": shared.is_full(),
        "spool_facts": shared.pending_facts(),
    });
    let ready = accepting && shared.writer_alive() && !shared.is_full();
    (if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body)).into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let shared = st.spool.shared();
    st.metrics.spool_facts.set(shared.pending_facts() as i64);
    st.metrics.spool_bytes.set(shared.pending_bytes() as i64);
    crate::render_metrics(&st.registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_urls_keep_query_and_fragment() {
        let utm = Utm { source: Some("news letter".into()), campaign: Some("fall&win".into()), ..Utm::default() };
        assert_eq!(
            with_utm("https://x.test/event/a", "c1", &utm),
            "https://x.test/event/a?cid=c1&utm_source=news%20letter&utm_campaign=fall%26win"
        );
        assert_eq!(
            with_utm("https://x.test/e?lang=ko#top", "c1", &Utm::default()),
            "https://x.test/e?lang=ko&cid=c1#top"
        );
    }

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
}
