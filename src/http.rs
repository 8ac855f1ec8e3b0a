//! The HTTP port: `/healthz` (liveness), `/readyz` (readiness), `/metrics`.
//!
//! Thin axum handlers over shared state; the webhook endpoint joins them later.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::{self, Metrics};

/// What the HTTP handlers read.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// Prometheus registry.
    pub metrics: Arc<Metrics>,
    /// True while the store answers and no shutdown has begun.
    pub ready: Arc<AtomicBool>,
}

/// The router of the HTTP port.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics_text(State(s): State<HttpState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], s.metrics.encode())
}
