//! The HTTP endpoint for monitoring: `GET /metrics` in Prometheus' text format,
//! `GET /health` for load balancers and orchestrators, and `GET /status` (JSON, what
//! `sv2-tpd status` prints) when a status board is given.

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::metrics;
use crate::status::StatusBoard;

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
    serve_with_status(listener, health, None, shutdown).await
}

/// Like [`serve`], and with a `board` also `/status`: the board's snapshot as JSON, with
/// 200 while healthy and 503 otherwise.
pub async fn serve_with_status(
    listener: tokio::net::TcpListener,
    health: HealthCheck,
    board: Option<Arc<StatusBoard>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics endpoint listening");
    }
    axum::serve(listener, router(Endpoint { health, board }))
        .with_graceful_shutdown(shutdown)
        .await
}

/// What the handlers read.
#[derive(Clone)]
struct Endpoint {
    health: HealthCheck,
    board: Option<Arc<StatusBoard>>,
}

fn router(endpoint: Endpoint) -> Router {
    let router = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/health", get(report_health));
    let router = if endpoint.board.is_some() {
        router.route("/status", get(report_status))
    } else {
        router
    };
    router.with_state(endpoint)
}

async fn render_metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
        metrics().render(),
    )
}

async fn report_health(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    let code = match (endpoint.health)() {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    let word = match code {
        StatusCode::OK => "ok",
        _ => "unhealthy",
    };
    // A slow submit is no outage (templates are served), but it is said.
    match crate::status::submits_overdue() {
        0 => (code, word.to_string()),
        n => (
            code,
            format!(
                "{word}; {n} block submit(s) overdue: the node has not answered yet, still waiting"
            ),
        ),
    }
}

async fn report_status(State(endpoint): State<Endpoint>) -> axum::response::Response {
    let Some(board) = endpoint.board else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let status = board.snapshot((endpoint.health)());
    let code = if status.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    match serde_json::to_string(&status) {
        Ok(body) => (code, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
