//! The processor's small HTTP listener: `/metrics`, `/healthz`, `/readyz`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::processor::ProcessorStatus;

#[derive(Debug, Clone)]
struct HealthState {
    registry: prometheus::Registry,
    status: Arc<ProcessorStatus>,
}

/// Serves health and metrics until `shutdown`. Ready while the loop runs and ClickHouse writes
/// succeed; live as long as the process is.
pub async fn serve(
    listener: TcpListener,
    registry: prometheus::Registry,
    status: Arc<ProcessorStatus>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(HealthState { registry, status });
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}

async fn metrics(State(st): State<HealthState>) -> Response {
    let (body, content_type) = eventflow_core::metrics::render(&st.registry);
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn readyz(State(st): State<HealthState>) -> Response {
    let running = st.status.running.load(Ordering::Acquire);
    let healthy = st.status.healthy.load(Ordering::Acquire);
    if running && healthy {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, if running { "clickhouse writes failing" } else { "not running" })
            .into_response()
    }
}
