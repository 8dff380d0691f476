//! The EventFlow edge collector.
//!
//! A beacon arrives at [`http`]'s server, is admitted by its [`source`] address's rate limits
//! ([`ratelimit`]), read, parsed and validated by [`collect`] and [`intake`], enriched with the
//! session and attribution cookies of [`session`] and campaign links of [`links`], appended to
//! the fsynced [`spool`] (that is when it is acknowledged), and drained to the Kafka fact topics
//! in order by [`drain`]. Clicks on known campaign links are counted per link and minute by
//! [`clicks`] and written to ClickHouse every few seconds. A request refused whole is an [`error::CollectError`]; failures are
//! logged through [`logs`], within a rate.

pub mod clicks;
pub mod collect;
pub mod config;
pub mod drain;
pub mod error;
pub mod http;
pub mod intake;
pub mod links;
pub mod logs;
pub mod metrics;
pub mod ratelimit;
pub mod session;
pub mod source;
pub mod spool;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use eventflow_core::avro::FactCodec;
use eventflow_core::ClientDirectory;
use eventflow_store::Store;
use eventflow_topics::KafkaConfig;

pub use config::CollectorConfig;
pub use metrics::CollectorMetrics;

use crate::clicks::{ClickSink, LinkClicks};
use crate::http::{AppState, Limits, ServerLimits};
use crate::links::{LinkMetrics, LinkSource, Links, LookupLimits};
use crate::logs::FailLog;
use crate::metrics::ClientSeries;
use crate::ratelimit::RateLimiter;
use crate::session::CookiePolicy;
use crate::source::SourcePolicy;
use crate::spool::{Spool, SpoolOptions};

/// Errors starting or running the collector.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error("spool: {0}")]
    Spool(#[from] spool::SpoolError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("http server: {0}")]
    Http(#[from] std::io::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("codec: {0}")]
    Codec(#[from] eventflow_core::avro::CodecError),
}

/// Everything the collector needs.
#[derive(Debug, Clone)]
pub struct CollectorDeps {
    pub config: CollectorConfig,
    pub kafka: KafkaConfig,
    pub clients: Arc<ClientDirectory>,
    /// Source of campaign links; `None` runs without link resolution (every cid unresolved).
    pub store: Option<Store>,
    pub registry: prometheus::Registry,
    /// Allowed lateness of client timestamps (the processor's `allowed_lateness`).
    pub allowed_lateness_ms: i64,
}

pub(crate) fn render_metrics(registry: &prometheus::Registry) -> Response {
    let (body, content_type) = eventflow_core::metrics::render(registry);
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Serves the collector on `listener` until `shutdown`, then stops accepting, drains what it can
/// to Kafka within `shutdown_grace` and returns (the rest stays in the spool).
pub async fn serve(
    listener: TcpListener,
    deps: CollectorDeps,
    shutdown: CancellationToken,
) -> Result<(), CollectorError> {
    let c = &deps.config;
    c.validate().map_err(CollectorError::Config)?;
    let links_refresh = c.links_refresh.get();
    let grace = c.shutdown_grace.get();
    let codec = FactCodec::new()?;
    let metrics = CollectorMetrics::new(&deps.registry)?;
    let spool = Spool::open(
        SpoolOptions {
            dir: PathBuf::from(&c.spool_dir),
            max_bytes: c.spool_max_bytes.get(),
            client_share: c.spool_client_share,
            segment_bytes: c.spool_segment_bytes.get(),
            fsync_seconds: Some(metrics.spool_fsync.clone()),
        },
        codec.clone(),
    )?;
    let stop_drainer = Arc::new(AtomicBool::new(false));
    let drainer = drain::Drainer {
        shared: spool.shared().clone(),
        kafka: deps.kafka.clone(),
        codec: codec.clone(),
        metrics: metrics.clone(),
        stop: stop_drainer.clone(),
        grace,
    }
    .spawn()?;
    let link_metrics = LinkMetrics { lookups: metrics.link_lookups.clone(), cached: metrics.links_cached.clone() };
    let source = deps.store.clone().map(|s| Arc::new(s) as Arc<dyn LinkSource>);
    let limits = LookupLimits {
        timeout: c.links_lookup_timeout.get(),
        concurrency: c.links_lookup_concurrency,
        rate: c.links_lookup_rate,
        negative_ttl: c.links_negative_ttl.get(),
        negative_entries: c.links_negative_entries,
    };
    let links = Links::new(source.clone().map(|s| (s, limits)), Some(link_metrics));
    let background = CancellationToken::new();
    if let Some(source) = source {
        tokio::spawn(links.clone().refresh_loop(source, links_refresh, background.clone()));
    }
    // Clicks are recorded per link where links come from; a new boot id per process makes a
    // restarted collector's counts add to the old ones (sql/007_link_clicks.sql).
    let clicks = deps.store.clone().map(|store| {
        let clicks = LinkClicks::new(rand::random(), c.link_clicks_max_entries, metrics.link_click_metrics.clone());
        let sink: Arc<dyn ClickSink> = Arc::new(store);
        let task = tokio::spawn(clicks.clone().flush_loop(sink, c.link_clicks_flush.get(), background.clone()));
        (clicks, task)
    });
    metrics.spool_max_bytes.set(i64::try_from(c.spool_max_bytes.get()).unwrap_or(i64::MAX));
    let keys = c.rate_limit_keys;
    let state = Arc::new(AppState {
        spool,
        links,
        clicks: clicks.as_ref().map(|(c, _)| c.clone()),
        clients: deps.clients.clone(),
        client_series: ClientSeries::new(&metrics, c.max_client_series, deps.clients.clients().map(|c| c.as_str())),
        fail_log: FailLog::new(metrics.log_lines_suppressed.clone()),
        metrics: metrics.clone(),
        registry: deps.registry.clone(),
        codec,
        limits: Limits {
            ip_requests: RateLimiter::new(c.rate_limit_per_ip, keys),
            ip_facts: RateLimiter::new(c.fact_rate_limit_per_ip, keys),
            client_facts: RateLimiter::new(c.rate_limit_per_client, keys),
            client_requests: RateLimiter::new(c.request_rate_limit_per_client, keys),
        },
        source: SourcePolicy { trust_forwarded_for: c.trust_forwarded_for, trusted_proxies: c.trusted_proxies.clone() },
        cookies: CookiePolicy {
            domain: c.cookie_domain.clone(),
            secure: c.cookie_secure,
            session_max_age_secs: c.session_lifetime.get().as_secs(),
        },
        allowed_origins: c.allowed_origins.clone(),
        allowed_lateness_ms: deps.allowed_lateness_ms,
        body_timeout: c.body_timeout.get(),
        accepting: AtomicBool::new(true),
    });
    info!(addr = %listener.local_addr()?, spool = %c.spool_dir, "collector listening");
    let app = http::router(state.clone());
    let stopping = state.clone();
    let server_shutdown = CancellationToken::new();
    let stop_server = server_shutdown.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        // Readiness turns 503 first, then in-flight requests finish.
        stopping.accepting.store(false, Ordering::Release);
        stop_server.cancel();
    });
    let limits = ServerLimits {
        max_header_bytes: usize::try_from(c.max_header_bytes.get()).unwrap_or(usize::MAX),
        header_timeout: c.header_timeout.get(),
        max_connections: c.max_connections,
    };
    let served = http::serve_connections(listener, app, limits, metrics, server_shutdown).await;
    background.cancel();
    if let Some((_, task)) = clicks {
        // The last flush of the click counts (bounded by the ClickHouse request timeout).
        if tokio::time::timeout(grace, task).await.is_err() {
            error!("the last write of link clicks did not finish within the shutdown grace");
        }
    }
    stop_drainer.store(true, Ordering::Release);
    let joined = tokio::task::spawn_blocking(move || drainer.join()).await;
    if !matches!(joined, Ok(Ok(()))) {
        error!("spool drainer ended abnormally");
    }
    info!(spooled = state.spool.shared().pending_facts(), "collector stopped");
    served.map_err(CollectorError::Http)
}
