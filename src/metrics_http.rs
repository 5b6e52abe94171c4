//! The HTTP endpoint for monitoring: `GET /metrics` in Prometheus' text format and
//! `GET /health` for load balancers and orchestrators.

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::metrics;

/// Content type of Prometheus' text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Reports whether the daemon is healthy (for `/health`).
pub type HealthCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// Serves `/metrics` and `/health` on `listener` until `shutdown` completes.
///
/// `/health` answers 200 `ok` while `health()` returns true and 503 otherwise.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: HealthCheck,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics endpoint listening");
    }
    axum::serve(listener, router(health))
        .with_graceful_shutdown(shutdown)
        .await
}

fn router(health: HealthCheck) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/health", get(report_health))
        .with_state(health)
}

async fn render_metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
        metrics().render(),
    )
}

async fn report_health(State(health): State<HealthCheck>) -> impl IntoResponse {
    if health() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
    }
}
