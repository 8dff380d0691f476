//! HTTP endpoints of the collector (CONTRACT.md §2) and the server that runs them.
//!
//! `POST /v1/collect` is [`crate::collect`]; this module holds the router (tower-http's CORS and
//! body limit around it), the tracked-link redirect, the tracker script, health and metrics, and
//! the connection loop: hyper's HTTP/1 server with a limit on the request head
//! (`collector.max_header_bytes`, else `431`), a deadline for it that also closes idle
//! keep-alive connections (`collector.header_timeout`), and at most `collector.max_connections`
//! connections: a new one beyond closes the oldest (at once when idle, after its request
//! otherwise), so idle or slow connections cannot keep a visitor out. Failures never reach the
//! page as anything but a status code: the tracker reads nothing else from responses.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tracing::{debug, warn};

use eventflow_core::avro::FactCodec;
use eventflow_core::fact::{FactKind, Utm};
use eventflow_core::ClientDirectory;

use crate::clicks::LinkClicks;
use crate::error::CollectError;
use crate::intake::{self, MAX_BODY_BYTES};
use crate::links::{Links, Resolved};
use crate::logs::{FailLog, Failure};
use crate::metrics::{ClientSeries, CollectorMetrics};
use crate::ratelimit::RateLimiter;
use crate::session::{self, Attribution, CookiePolicy, Touch};
use crate::source::SourcePolicy;
use crate::spool::Spool;

/// The rate limits (see `collector.rate_limit_*` and `*_rate_limit_*`).
#[derive(Debug)]
pub struct Limits {
    /// Requests per source address.
    pub ip_requests: RateLimiter<IpAddr>,
    /// Facts per source address.
    pub ip_facts: RateLimiter<IpAddr>,
    /// Facts per client.
    pub client_facts: RateLimiter<String>,
    /// Requests per client.
    pub client_requests: RateLimiter<String>,
}

impl Limits {
    fn report(&self, m: &CollectorMetrics) {
        for (name, keys) in [
            ("ip_requests", self.ip_requests.len()),
            ("ip_facts", self.ip_facts.len()),
            ("client_facts", self.client_facts.len()),
            ("client_requests", self.client_requests.len()),
        ] {
            m.rate_limiter_keys.with_label_values(&[name]).set(i64::try_from(keys).unwrap_or(i64::MAX));
        }
    }
}

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    pub spool: Spool,
    pub links: Links,
    /// Clicks per known link (`None` without ClickHouse).
    pub clicks: Option<LinkClicks>,
    pub clients: Arc<ClientDirectory>,
    pub metrics: CollectorMetrics,
    pub registry: prometheus::Registry,
    /// Encodes facts to measure them against the spool budget.
    pub codec: FactCodec,
    pub limits: Limits,
    pub source: SourcePolicy,
    pub cookies: CookiePolicy,
    pub allowed_origins: Vec<String>,
    pub allowed_lateness_ms: i64,
    /// Total time a request's body may take (`collector.body_timeout`).
    pub body_timeout: Duration,
    pub fail_log: FailLog,
    pub client_series: ClientSeries,
    /// False once shutdown starts (readiness turns 503 first).
    pub accepting: AtomicBool,
}

/// The collector's router.
pub fn router(state: Arc<AppState>) -> Router {
    let collect = post(crate::collect::collect)
        .options(|| async { StatusCode::NO_CONTENT })
        .layer::<_, Infallible>(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .layer::<_, Infallible>(axum::middleware::map_response_with_state(state.clone(), contract_413))
        .layer::<_, Infallible>(cors(&state.allowed_origins));
    Router::new()
        .route("/v1/collect", collect)
        .route("/r/{cid}", get(redirect))
        .route("/v1/tracker.js", get(tracker_js))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// CORS: beacons carry cookies, so an allowed origin is echoed (never `*`) with credentials;
/// `"*"` allows any origin but `null` (sandboxed frames, `file:` pages).
fn cors(allowed: &[String]) -> CorsLayer {
    let any = allowed.iter().any(|a| a == "*");
    let allowed: Vec<HeaderValue> = allowed.iter().filter_map(|a| HeaderValue::from_str(a).ok()).collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin: &HeaderValue, _| {
            origin != "null" && (any || allowed.contains(origin))
        }))
        .allow_credentials(true)
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers([header::CONTENT_TYPE])
        .max_age(Duration::from_secs(600))
}

/// tower-http answers a declared body over the limit with a bare `413`; the contract wants its
/// error body, and the refusal its log line.
async fn contract_413(State(st): State<Arc<AppState>>, response: Response) -> Response {
    let bare = response.status() == StatusCode::PAYLOAD_TOO_LARGE
        && response.headers().get(header::CONTENT_TYPE).is_none_or(|ct| ct != "application/json");
    if !bare {
        return response;
    }
    let error = CollectError::BodyTooLarge;
    let detail = error.detail();
    st.fail_log.fail(Failure {
        kind: FactKind::Visit,
        reason: error.code(),
        client_id: None,
        index: None,
        field: None,
        detail: Some(&detail),
    });
    error.into_response()
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

/// `GET /r/{cid}`: a tracked campaign link.
async fn redirect(State(st): State<Arc<AppState>>, Path(cid): Path<String>, headers: HeaderMap) -> Response {
    // An id no import could have written is not worth a lookup.
    let resolved = if intake::valid_cid(&cid) { st.links.resolve(&cid).await } else { Resolved::Unknown };
    let link = match resolved {
        Resolved::Link(link) => link,
        Resolved::Unknown => {
            st.metrics.link_clicks.with_label_values(&["unknown"]).inc();
            return link_failure(&st, CollectError::UnknownLink, &cid);
        }
        Resolved::Unavailable => {
            // Not in the cache and not looked up (lookup limits, ClickHouse failing): the link
            // may exist, so this is not a 404.
            st.metrics.link_clicks.with_label_values(&["unavailable"]).inc();
            return link_failure(&st, CollectError::LinkLookupUnavailable, &cid);
        }
    };
    st.metrics.link_clicks.with_label_values(&["redirected"]).inc();
    // Per link only for known links: the keys stay bounded by the imported links.
    if let Some(clicks) = &st.clicks {
        clicks.record(&link.client_id, &cid);
    }
    let cookies = headers.get_all(header::COOKIE).into_iter().filter_map(|v| v.to_str().ok());
    let mut attribution = session::cookie(cookies, session::UTM_COOKIE).map(Attribution::decode).unwrap_or_default();
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

fn link_failure(st: &AppState, error: CollectError, cid: &str) -> Response {
    let detail = format!("cid {cid}");
    st.fail_log.fail(Failure {
        kind: FactKind::Visit,
        reason: error.code(),
        client_id: None,
        index: None,
        field: None,
        detail: Some(&detail),
    });
    error.into_response()
}

/// `destination` with the link's `cid` and UTM parameters appended to its query (before any
/// `#fragment`). A destination that is not an absolute URL is left as it is.
pub fn with_utm(destination: &str, cid: &str, utm: &Utm) -> String {
    let Ok(mut url) = url::Url::parse(destination) else {
        return destination.to_owned();
    };
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("cid", cid);
        for (k, v) in [
            ("utm_source", &utm.source),
            ("utm_medium", &utm.medium),
            ("utm_campaign", &utm.campaign),
            ("utm_term", &utm.term),
            ("utm_content", &utm.content),
        ] {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
    }
    url.into()
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
    st.limits.report(&st.metrics);
    if let Some(clicks) = &st.clicks {
        clicks.report();
    }
    crate::render_metrics(&st.registry)
}

// -------------------------------------------------------------------------------------------
// Connections

/// Limits of the connection loop.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    pub max_connections: usize,
}

/// Open connections, oldest first, each with the token that closes it.
#[derive(Debug, Default)]
struct Connections {
    next_id: u64,
    open: BTreeMap<u64, CancellationToken>,
}

/// Serves `app` on `listener` until `shutdown`; then stops accepting, lets every connection
/// finish its request, and returns once they are closed.
pub async fn serve_connections(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    metrics: CollectorMetrics,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let http = Arc::new(http);
    let conns = Arc::new(Mutex::new(Connections::default()));
    let closing = CancellationToken::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let token = closing.child_token();
        let id = {
            let mut c = conns.lock().unwrap_or_else(PoisonError::into_inner);
            let id = c.next_id;
            c.next_id += 1;
            c.open.insert(id, token.clone());
            // The oldest connection makes room: at once when idle, after its request otherwise.
            while c.open.len() > limits.max_connections {
                if let Some((_, oldest)) = c.open.pop_first() {
                    oldest.cancel();
                    metrics.connections_closed.with_label_values(&["evicted"]).inc();
                }
            }
            id
        };
        metrics.connections.inc();
        let service = app.clone().map_request(move |mut req: Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            req
        });
        let service = hyper_util::service::TowerToHyperService::new(service);
        let (http, conns, metrics) = (http.clone(), conns.clone(), metrics.clone());
        tokio::spawn(async move {
            let conn = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let mut ending = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            debug!(error = %e, %peer, "connection closed");
                            metrics.connections_closed.with_label_values(&["error"]).inc();
                        }
                        break;
                    }
                    _ = token.cancelled(), if !ending => {
                        conn.as_mut().graceful_shutdown();
                        ending = true;
                    }
                }
            }
            conns.lock().unwrap_or_else(PoisonError::into_inner).open.remove(&id);
            metrics.connections.dec();
        });
    }
    drop(listener);
    closing.cancel();
    // In-flight requests finish (their facts are being spooled); idle connections close now.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !conns.lock().unwrap_or_else(PoisonError::into_inner).open.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_urls_keep_query_and_fragment() {
        let utm = Utm { source: Some("news letter".into()), campaign: Some("fall&win".into()), ..Utm::default() };
        assert_eq!(
            with_utm("https://x.test/event/a", "c1", &utm),
            "https://x.test/event/a?cid=c1&utm_source=news+letter&utm_campaign=fall%26win"
        );
        assert_eq!(
            with_utm("https://x.test/e?lang=ko#top", "c1", &Utm::default()),
            "https://x.test/e?lang=ko&cid=c1#top"
        );
        assert_eq!(with_utm("/relative", "c1", &utm), "/relative");
    }
}
