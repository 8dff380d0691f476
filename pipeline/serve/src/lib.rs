//! The EventFlow reader API.
//!
//! Dashboards call [`overview`] per client: every section is read from the aggregates written by
//! the processor and falls back to a raw recount only when an aggregate is missing or not yet
//! complete; each response names its sources and freshness (watermark, staleness). A small
//! dashboard page (`GET /`) renders the overview for a person holding a token.

pub mod auth;
pub mod overview;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{NaiveDate, Utc};
use chrono_tz::Tz;
use prometheus::{Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use eventflow_core::metrics as names;
use eventflow_core::{time, ClientDirectory, ClientId};
use eventflow_store::read::QualityCounters;
use eventflow_store::Store;

use crate::auth::{Principal, Tokens};
use crate::overview::{Doubt, Meta, OverviewQuery, OverviewResponse, Source};

/// `[api]` configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the HTTP listener (`EVENTFLOW__API__LISTEN`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Token that may read every client (`sha256:<hex>` or plain). Admin access is off unless set.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Longest accepted range, in days.
    #[serde(default = "default_max_days")]
    pub max_range_days: u32,
    /// Most rows in the campaign table.
    #[serde(default = "default_campaign_limit")]
    pub campaign_limit: u32,
    /// How often the data-quality gauges are recomputed from aggregates.
    #[serde(default = "default_quality_refresh_secs")]
    pub quality_refresh_secs: u64,
    /// Most clients with their own series of the data-quality gauges. Configured clients always
    /// have one; the other clients with data today fill the remaining places by most visits, and
    /// the rest are folded into one series `client="_other"`.
    #[serde(default = "default_quality_max_clients")]
    pub quality_max_clients: usize,
}

fn default_listen() -> String {
    "127.0.0.1:8081".to_owned()
}
fn default_max_days() -> u32 {
    400
}
fn default_campaign_limit() -> u32 {
    100
}
fn default_quality_refresh_secs() -> u64 {
    60
}
fn default_quality_max_clients() -> usize {
    1000
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            admin_token: None,
            max_range_days: default_max_days(),
            campaign_limit: default_campaign_limit(),
            quality_refresh_secs: default_quality_refresh_secs(),
            quality_max_clients: default_quality_max_clients(),
        }
    }
}

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("http server: {0}")]
    Http(#[from] std::io::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Metrics of the reader API.
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    pub request_duration: HistogramVec,
    pub fallback: IntCounterVec,
    pub section_errors: IntCounterVec,
    pub session_link_rate: GaugeVec,
    pub utm_missing_ratio: GaugeVec,
    pub quality_clients_folded: Gauge,
}

impl ApiMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    names::API_REQUEST_DURATION_SECONDS,
                    "Reader API latency by route template and status class.",
                )
                .buckets(names::LATENCY_BUCKETS.to_vec()),
                &["route", "status"],
            )?,
            fallback: IntCounterVec::new(
                Opts::new(
                    names::API_FALLBACK_TOTAL,
                    "Overview sections served from raw facts because the aggregate was missing or incomplete.",
                ),
                &["section"],
            )?,
            section_errors: IntCounterVec::new(
                Opts::new(
                    names::API_SECTION_ERRORS_TOTAL,
                    "Overview sections that failed (served as error with their zero value).",
                ),
                &["section"],
            )?,
            session_link_rate: GaugeVec::new(
                Opts::new(
                    names::SESSION_LINK_RATE,
                    "Today's share of registrations linked to a visit of their session (client time zone).",
                ),
                &["client"],
            )?,
            utm_missing_ratio: GaugeVec::new(
                Opts::new(names::UTM_MISSING_RATIO, "Today's share of visits without utm.source (client time zone)."),
                &["client"],
            )?,
            quality_clients_folded: Gauge::new(
                names::API_QUALITY_CLIENTS_FOLDED,
                "Clients with data today whose quality gauges are folded into client=\"_other\" (beyond api.quality_max_clients).",
            )?,
        };
        for section in overview::SECTIONS {
            m.fallback.with_label_values(&[section]);
            m.section_errors.with_label_values(&[section]);
        }
        registry.register(Box::new(m.request_duration.clone()))?;
        registry.register(Box::new(m.fallback.clone()))?;
        registry.register(Box::new(m.section_errors.clone()))?;
        registry.register(Box::new(m.session_link_rate.clone()))?;
        registry.register(Box::new(m.utm_missing_ratio.clone()))?;
        registry.register(Box::new(m.quality_clients_folded.clone()))?;
        Ok(m)
    }

    /// Sets the data-quality gauges to `series` and removes the series of clients in `shown`
    /// (the previous refresh) that are no longer in it, so the label count stays bounded as
    /// clients come and go. `shown` becomes the labels of `series`.
    pub fn set_quality(&self, series: &QualitySeries, shown: &mut BTreeSet<String>) {
        for (client, sample) in &series.series {
            self.session_link_rate.with_label_values(&[client.as_str()]).set(sample.session_link_rate);
            self.utm_missing_ratio.with_label_values(&[client.as_str()]).set(sample.utm_missing_ratio);
        }
        for gone in shown.iter().filter(|c| !series.series.contains_key(*c)) {
            let _ = self.session_link_rate.remove_label_values(&[gone.as_str()]);
            let _ = self.utm_missing_ratio.remove_label_values(&[gone.as_str()]);
        }
        *shown = series.series.keys().cloned().collect();
        self.quality_clients_folded.set(series.folded as f64);
    }
}

/// Label of the quality-gauge series standing for the clients beyond `api.quality_max_clients`.
/// Not a valid client id (those start with a letter or digit), so it never names a real client.
pub const OTHER_CLIENTS: &str = "_other";

/// Today's data-quality figures of one gauge series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QualitySample {
    /// Linked entries / entries (1.0 when none).
    pub session_link_rate: f64,
    /// Visits without `utm.source` / visits (0.0 when none).
    pub utm_missing_ratio: f64,
}

impl From<QualityCounters> for QualitySample {
    fn from(c: QualityCounters) -> Self {
        Self {
            session_link_rate: if c.entries == 0 { 1.0 } else { c.linked_entries as f64 / c.entries as f64 },
            utm_missing_ratio: if c.visits == 0 { 0.0 } else { c.visits_utm_missing as f64 / c.visits as f64 },
        }
    }
}

/// The series of the data-quality gauges of one refresh.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QualitySeries {
    /// By `client` label.
    pub series: BTreeMap<String, QualitySample>,
    /// Clients folded into [`OTHER_CLIENTS`].
    pub folded: usize,
}

/// The gauge series for today's counters of every client with data (`today`): every configured
/// client (with or without data), then the other clients by most visits today (ties by id) up to
/// `max_clients` series in all; the remaining clients are summed into one [`OTHER_CLIENTS`]
/// series (their combined ratios).
pub fn quality_series(
    configured: &BTreeSet<String>,
    today: &BTreeMap<String, QualityCounters>,
    max_clients: usize,
) -> QualitySeries {
    let mut out = QualitySeries::default();
    for client in configured {
        out.series.insert(client.clone(), today.get(client).copied().unwrap_or_default().into());
    }
    let mut others: Vec<(&String, &QualityCounters)> = today.iter().filter(|(c, _)| !configured.contains(*c)).collect();
    others.sort_by(|a, b| b.1.visits.cmp(&a.1.visits).then_with(|| a.0.cmp(b.0)));
    let places = max_clients.saturating_sub(configured.len());
    let mut rest = QualityCounters::default();
    for (i, (client, c)) in others.into_iter().enumerate() {
        if i < places {
            out.series.insert(client.clone(), (*c).into());
        } else {
            rest.visits += c.visits;
            rest.visits_utm_missing += c.visits_utm_missing;
            rest.entries += c.entries;
            rest.linked_entries += c.linked_entries;
            out.folded += 1;
        }
    }
    if out.folded > 0 {
        out.series.insert(OTHER_CLIENTS.to_owned(), rest.into());
    }
    out
}

/// Everything the API needs.
#[derive(Debug, Clone)]
pub struct ApiDeps {
    pub config: ApiConfig,
    pub store: Store,
    pub clients: Arc<ClientDirectory>,
    pub registry: Registry,
    /// Partitions of the fact topics: the watermark is known once all of them reported.
    pub partitions: usize,
}

#[derive(Debug)]
struct AppState {
    deps: ApiDeps,
    tokens: Tokens,
    metrics: ApiMetrics,
    ready: AtomicBool,
    /// Unconfigured clients seen to have facts (facts are never deleted, so this only grows;
    /// bounded by the number of client ids with stored facts).
    clients_with_facts: std::sync::RwLock<std::collections::HashSet<String>>,
}

/// Serves the API on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, deps: ApiDeps, shutdown: CancellationToken) -> Result<(), ApiError> {
    let tokens = Tokens::new(deps.config.admin_token.as_deref(), &deps.clients).map_err(ApiError::Config)?;
    let metrics = ApiMetrics::new(&deps.registry)?;
    let state = Arc::new(AppState {
        deps,
        tokens,
        metrics,
        ready: AtomicBool::new(true),
        clients_with_facts: Default::default(),
    });
    tokio::spawn(quality_gauges(state.clone(), shutdown.clone()));
    info!(addr = %listener.local_addr()?, "reader API listening");
    let stopping = state.clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            shutdown.cancelled().await;
            stopping.ready.store(false, Ordering::Release);
        })
        .await?;
    Ok(())
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/clients/{client_id}/statistics/overview", get(overview))
        .route("/v1/clients/{client_id}/statistics/live/{webinar_id}", get(live_series))
        .route("/openapi.json", get(openapi))
        .route("/", get(dashboard))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn observe(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let response = next.run(req).await;
    let class = format!("{}xx", response.status().as_u16() / 100);
    st.metrics.request_duration.with_label_values(&[&route, &class]).observe(started.elapsed().as_secs_f64());
    response
}

fn error(status: StatusCode, code: &str, detail: impl Into<String>) -> Response {
    let mut r = (status, Json(json!({"error": code, "detail": detail.into()}))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// Authenticates the request and authorizes it for `client`. Returns the client's time zone.
async fn authorize(st: &AppState, headers: &HeaderMap, client: &str) -> Result<Tz, Response> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(bearer) = bearer else {
        return Err(error(StatusCode::UNAUTHORIZED, "unauthorized", "send Authorization: Bearer <token>"));
    };
    let Some(principal) = st.tokens.authenticate(bearer) else {
        return Err(error(StatusCode::UNAUTHORIZED, "unauthorized", "unknown token"));
    };
    if !principal.may_read(client) {
        return Err(error(StatusCode::FORBIDDEN, "forbidden", "this token may not read this client"));
    }
    // A client exists when it is configured, or (admin only, when unknown clients are accepted)
    // when facts of it were stored.
    let known = match ClientId::parse(client) {
        Ok(id) if st.deps.clients.is_known(&id) => true,
        Ok(id) if principal == Principal::Admin && st.deps.clients.accepts(&id) => {
            let seen = st.clients_with_facts.read().is_ok_and(|s| s.contains(client));
            seen || match st.deps.store.client_has_facts(client).await {
                Ok(true) => {
                    if let Ok(mut s) = st.clients_with_facts.write() {
                        s.insert(client.to_owned());
                    }
                    true
                }
                Ok(false) => false,
                // Cannot tell: let the request run; its sections will report the failure.
                Err(_) => true,
            }
        }
        _ => false,
    };
    if !known {
        return Err(error(StatusCode::NOT_FOUND, "unknown_client", "no such client"));
    }
    Ok(st.deps.clients.timezone(client))
}

/// Query parameters of the overview and the live series.
#[derive(Debug, Default, Deserialize)]
pub struct RangeParams {
    pub from: Option<String>,
    pub to: Option<String>,
    pub range: Option<String>,
}

/// A request's date range that cannot be served: answered with 400 and a stable error code.
#[derive(Debug, PartialEq, Eq)]
pub struct RangeError {
    pub code: &'static str,
    pub detail: String,
}

impl RangeError {
    fn new(code: &'static str, detail: impl Into<String>) -> Self {
        Self { code, detail: detail.into() }
    }
}

impl IntoResponse for RangeError {
    fn into_response(self) -> Response {
        error(StatusCode::BAD_REQUEST, self.code, self.detail)
    }
}

fn parse_day(name: &str, raw: &str) -> Result<NaiveDate, RangeError> {
    NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .ok()
        .filter(|_| raw.len() == 10)
        .ok_or_else(|| RangeError::new("invalid_date", format!("{name} must be a date like 2026-11-26")))
}

/// Resolves `from`/`to`/`range` to an inclusive range of client days (default: last 7 days).
pub fn resolve_range(
    p: &RangeParams,
    tz: Tz,
    now_ms: i64,
    max_days: u32,
) -> Result<(NaiveDate, NaiveDate), RangeError> {
    let today = time::client_day(now_ms, tz);
    let span = match p.range.as_deref() {
        None => None,
        Some("7d") => Some(7),
        Some("30d") => Some(30),
        Some(_) => return Err(RangeError::new("invalid_range", "range must be 7d or 30d")),
    };
    if span.is_some() && (p.from.is_some() || p.to.is_some()) {
        return Err(RangeError::new("invalid_range", "use either range or from/to"));
    }
    let to = match &p.to {
        Some(t) => parse_day("to", t)?,
        None => today,
    };
    let from = match &p.from {
        Some(f) => parse_day("from", f)?,
        None => to - chrono::Duration::days(span.unwrap_or(7) - 1),
    };
    if from > to {
        return Err(RangeError::new("invalid_range", "from is after to"));
    }
    if (to - from).num_days() + 1 > i64::from(max_days) {
        return Err(RangeError::new("range_too_long", format!("at most {max_days} days")));
    }
    Ok((from, to))
}

async fn meta(
    st: &AppState,
    tz: Tz,
    started: Instant,
    sources: BTreeMap<&'static str, Source>,
    doubt: Option<Doubt>,
) -> Meta {
    let now = Utc::now().timestamp_millis();
    let wm =
        st.deps.store.watermark().await.ok().filter(|w| w.reported.len() >= st.deps.partitions).and_then(|w| w.min_ms);
    Meta {
        response_time_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        generated_at: time::format_in_tz(now, tz),
        data_sources: sources,
        watermark: wm.map(|w| time::format_in_tz(w, tz)),
        staleness_seconds: wm.map(|w| (((now - w).max(0)) as f64 / 100.0).round() / 10.0),
        doubt,
    }
}

async fn overview(
    State(st): State<Arc<AppState>>,
    Path(client): Path<String>,
    headers: HeaderMap,
    params: Result<Query<RangeParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let started = Instant::now();
    let tz = match authorize(&st, &headers, &client).await {
        Ok(tz) => tz,
        Err(r) => return r,
    };
    let Ok(Query(params)) = params else {
        return error(StatusCode::BAD_REQUEST, "invalid_query", "unreadable query string");
    };
    let (from, to) = match resolve_range(&params, tz, Utc::now().timestamp_millis(), st.deps.config.max_range_days) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let q = OverviewQuery { client_id: client.clone(), from, to, tz, campaign_limit: st.deps.config.campaign_limit };
    let s = overview::sections(&st.deps.store, &q).await;
    for (section, source) in &s.sources {
        match source {
            Source::Raw => st.metrics.fallback.with_label_values(&[section]).inc(),
            Source::Error => st.metrics.section_errors.with_label_values(&[section]).inc(),
            Source::Aggregated => {}
        }
    }
    let meta = meta(&st, tz, started, s.sources, s.doubt).await;
    Json(OverviewResponse {
        client_id: client,
        from: time::format_day(from),
        to: time::format_day(to),
        timezone: tz.name().to_owned(),
        totals: s.totals,
        by_page: s.by_page,
        by_day: s.by_day,
        campaigns: s.campaigns,
        link_clicks: s.link_clicks,
        live: s.live,
        quality: s.quality,
        meta,
    })
    .into_response()
}

/// One minute of the live series.
#[derive(Debug, Serialize)]
pub struct LivePoint {
    pub minute: String,
    pub concurrent: u64,
}

async fn live_series(
    State(st): State<Arc<AppState>>,
    Path((client, webinar)): Path<(String, String)>,
    headers: HeaderMap,
    params: Result<Query<RangeParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let started = Instant::now();
    let tz = match authorize(&st, &headers, &client).await {
        Ok(tz) => tz,
        Err(r) => return r,
    };
    let Ok(Query(params)) = params else {
        return error(StatusCode::BAD_REQUEST, "invalid_query", "unreadable query string");
    };
    if webinar.is_empty() || webinar.len() > 128 || webinar.chars().any(char::is_control) {
        return error(StatusCode::BAD_REQUEST, "invalid_webinar_id", "webinar id must be 1-128 printable characters");
    }
    let (from, to) = match resolve_range(&params, tz, Utc::now().timestamp_millis(), st.deps.config.max_range_days) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let q = OverviewQuery { client_id: client.clone(), from, to, tz, campaign_limit: 0 };
    let (from_s, to_s) = q.seconds();
    let store = &st.deps.store;
    // The same completeness rules as the overview's live section: no pending late facts, and
    // minute_live agrees with daily_totals for every day of the range.
    let (pending, days, all) = tokio::join!(
        store.pending_late_days(&client, from, to),
        store.daily_totals(&client, from, to),
        store.live_minutes(&client, None, from_s, to_s),
    );
    let agg = match (pending, days, all) {
        (Ok(p), Ok(d), Ok(all)) if p.is_empty() && overview::live_agrees(&d, &all, tz) => {
            Some(all.into_iter().filter(|m| m.webinar_id == webinar).collect::<Vec<_>>())
        }
        _ => None,
    };
    let (source, minutes) = match agg {
        Some(m) => (Source::Aggregated, m),
        None => match store.raw_live_minutes(&client, &webinar, from, to, tz).await {
            Ok(m) => {
                st.metrics.fallback.with_label_values(&["live"]).inc();
                (Source::Raw, m)
            }
            Err(e) => {
                warn!(error = %e, "live series failed");
                st.metrics.section_errors.with_label_values(&["live"]).inc();
                (Source::Error, Vec::new())
            }
        },
    };
    // Zero-filled from the first to the last minute with viewers.
    let mut series = Vec::new();
    if let (Some(first), Some(last)) = (minutes.first(), minutes.last()) {
        let by_minute: BTreeMap<u32, u64> = minutes.iter().map(|m| (m.minute, m.viewers)).collect();
        let mut m = first.minute;
        while m <= last.minute {
            series.push(LivePoint {
                minute: time::format_in_tz(i64::from(m) * 1000, tz),
                concurrent: by_minute.get(&m).copied().unwrap_or(0),
            });
            m += 60;
        }
    }
    let mut sources = BTreeMap::new();
    sources.insert("live", source);
    let meta = meta(&st, tz, started, sources, None).await;
    Json(json!({
        "client_id": client,
        "webinar_id": webinar,
        "from": time::format_day(from),
        "to": time::format_day(to),
        "timezone": tz.name(),
        "series": series,
        "meta": meta,
    }))
    .into_response()
}

async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    if !st.ready.load(Ordering::Acquire) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the API is stopping");
    }
    match st.deps.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "clickhouse_unavailable", e.to_string()),
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let (body, content_type) = names::render(&st.deps.registry);
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

const OPENAPI: &str = include_str!("../assets/openapi.json");
const DASHBOARD: &str = include_str!("../assets/dashboard.html");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn dashboard() -> Response {
    let mut r = Html(DASHBOARD).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:"),
    );
    r
}

/// Recomputes today's data-quality gauges every `api.quality_refresh_secs`, for every configured
/// client and every client with a `daily_totals` row today (aggregates only, one read for all
/// clients), at most `api.quality_max_clients` series (see [`quality_series`]).
async fn quality_gauges(st: Arc<AppState>, shutdown: CancellationToken) {
    let every = Duration::from_secs(st.deps.config.quality_refresh_secs.max(1));
    let configured: BTreeSet<String> = st.deps.clients.clients().map(|c| c.to_string()).collect();
    let mut shown = BTreeSet::new();
    loop {
        match today_quality_counters(&st).await {
            Ok(today) => {
                let series = quality_series(&configured, &today, st.deps.config.quality_max_clients);
                st.metrics.set_quality(&series, &mut shown);
            }
            Err(e) => warn!(error = %e, "refreshing the data-quality gauges failed; will retry"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Today's quality counters (each client's own time zone) of every client with data today.
async fn today_quality_counters(st: &AppState) -> eventflow_store::Result<BTreeMap<String, QualityCounters>> {
    let now = Utc::now().timestamp_millis();
    // Every time zone's today lies between these two days.
    let from = time::client_day(now, chrono_tz::Etc::GMTPlus12);
    let to = time::client_day(now, chrono_tz::Etc::GMTMinus14);
    let rows = st.deps.store.quality_counters(from, to).await?;
    Ok(rows
        .into_iter()
        .filter(|(client, day, _)| time::day_number(time::client_day(now, st.deps.clients.timezone(client))) == *day)
        .map(|(client, _, c)| (client, c))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(visits: u64, utm_missing: u64, entries: u64, linked: u64) -> QualityCounters {
        QualityCounters { visits, visits_utm_missing: utm_missing, entries, linked_entries: linked }
    }

    fn sample(link: f64, missing: f64) -> QualitySample {
        QualitySample { session_link_rate: link, utm_missing_ratio: missing }
    }

    fn ids(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn quality_series_cover_every_client_with_data_up_to_the_cap() {
        let configured = ids(&["acme", "globex"]);
        let today: BTreeMap<String, QualityCounters> = [
            ("acme", counters(10, 5, 4, 3)),
            ("initech", counters(3, 2, 2, 1)),
            ("umbrella", counters(2, 0, 0, 0)),
            ("hooli", counters(1, 1, 1, 0)),
            ("aaa", counters(1, 0, 4, 4)),
        ]
        .into_iter()
        .map(|(c, v)| (c.to_owned(), v))
        .collect();
        // Room for everyone: a series per client, configured ones without data included.
        let all = quality_series(&configured, &today, 1000);
        assert_eq!(all.folded, 0);
        let want: BTreeMap<String, QualitySample> = [
            ("aaa", sample(1.0, 0.0)),
            ("acme", sample(0.75, 0.5)),
            ("globex", sample(1.0, 0.0)),
            ("hooli", sample(0.0, 1.0)),
            ("initech", sample(0.5, 2.0 / 3.0)),
            ("umbrella", sample(1.0, 0.0)),
        ]
        .into_iter()
        .map(|(c, v)| (c.to_owned(), v))
        .collect();
        assert_eq!(all.series, want);

        // 3 places: acme and globex (configured), initech (most visits of the rest); umbrella,
        // hooli and aaa (ties at 1 visit go by id) folded: visits 2+1+1 = 4 with 0+1+0 = 1
        // without UTM, entries 0+1+4 = 5 with 0+0+4 = 4 linked.
        let capped = quality_series(&configured, &today, 3);
        assert_eq!(capped.folded, 3);
        assert_eq!(
            capped.series.keys().map(String::as_str).collect::<Vec<_>>(),
            ["_other", "acme", "globex", "initech"]
        );
        assert_eq!(capped.series[OTHER_CLIENTS], sample(0.8, 0.25));
        // 4 places: umbrella (2 visits) gets its own; of hooli and aaa (1 visit each) aaa wins by id.
        let four = quality_series(&configured, &today, 4);
        assert_eq!(
            four.series.keys().map(String::as_str).collect::<Vec<_>>(),
            ["_other", "acme", "globex", "initech", "umbrella"]
        );
        assert_eq!(four.series[OTHER_CLIENTS], sample(0.8, 0.5));
        // A cap below the configured clients: they keep their series, everyone else is folded.
        let none = quality_series(&configured, &today, 1);
        assert_eq!((none.series.len(), none.folded), (3, 4));
    }

    #[test]
    fn quality_gauges_drop_series_of_clients_gone_from_the_data() {
        let registry = Registry::new();
        let m = ApiMetrics::new(&registry).expect("metrics");
        let mut shown = BTreeSet::new();
        let configured = ids(&["acme"]);
        let day1: BTreeMap<String, QualityCounters> =
            [("initech".to_owned(), counters(2, 1, 0, 0)), ("hooli".to_owned(), counters(1, 0, 0, 0))].into();
        m.set_quality(&quality_series(&configured, &day1, 2), &mut shown);
        let page = names::render(&registry).0;
        assert!(page.contains("eventflow_utm_missing_ratio{client=\"initech\"} 0.5"), "{page}");
        assert!(page.contains("eventflow_utm_missing_ratio{client=\"_other\"} 0"), "{page}");
        assert!(page.contains("eventflow_api_quality_clients_folded 1"), "{page}");
        // The next day only hooli has data: initech's and _other's series go away.
        let day2: BTreeMap<String, QualityCounters> = [("hooli".to_owned(), counters(4, 1, 0, 0))].into();
        m.set_quality(&quality_series(&configured, &day2, 2), &mut shown);
        let page = names::render(&registry).0;
        let mut series: Vec<&str> = page.lines().filter(|l| l.starts_with("eventflow_utm_missing_ratio{")).collect();
        series.sort_unstable();
        assert_eq!(
            series,
            ["eventflow_utm_missing_ratio{client=\"acme\"} 0", "eventflow_utm_missing_ratio{client=\"hooli\"} 0.25"]
        );
        assert!(page.contains("eventflow_api_quality_clients_folded 0"), "{page}");
        assert_eq!(shown, ids(&["acme", "hooli"]));
    }

    fn p(from: Option<&str>, to: Option<&str>, range: Option<&str>) -> RangeParams {
        RangeParams { from: from.map(Into::into), to: to.map(Into::into), range: range.map(Into::into) }
    }

    #[test]
    fn ranges() {
        let tz = chrono_tz::Asia::Seoul;
        // 2026-11-26 01:00 UTC = 10:00 in Seoul.
        let now = 1_795_654_800_000;
        let day = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        assert_eq!(resolve_range(&p(None, None, None), tz, now, 400).unwrap(), (day("2026-11-20"), day("2026-11-26")));
        assert_eq!(
            resolve_range(&p(None, None, Some("30d")), tz, now, 400).unwrap(),
            (day("2026-10-28"), day("2026-11-26"))
        );
        assert_eq!(
            resolve_range(&p(Some("2026-11-01"), Some("2026-11-02"), None), tz, now, 400).unwrap(),
            (day("2026-11-01"), day("2026-11-02"))
        );
        for bad in [
            p(Some("2026-13-01"), None, None),
            p(Some("yesterday"), None, None),
            p(Some("2026-11-03"), Some("2026-11-02"), None),
            p(Some("2020-01-01"), Some("2026-11-02"), None),
            p(None, None, Some("1y")),
            p(Some("2026-11-01"), None, Some("7d")),
            p(Some("2026-11-01'; DROP TABLE facts; --"), None, None),
            p(Some("2026-1-1"), None, None),
        ] {
            let err = resolve_range(&bad, tz, now, 400).unwrap_err();
            assert_eq!(err.into_response().status(), StatusCode::BAD_REQUEST);
        }
    }
}
