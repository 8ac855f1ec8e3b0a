//! The HTTP port: `/healthz` (liveness), `/readyz` (readiness), `/metrics`,
//!
//! and `POST /webhooks/stripe`. Thin axum handlers over shared state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};

use crate::authorizer::Authorizer;
use crate::metrics::{self, Metrics};
use crate::stripe::{self, Outcome};

/// What the HTTP handlers read.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// Prometheus registry.
    pub metrics: Arc<Metrics>,
    /// True while the store answers and no shutdown has begun.
    pub ready: Arc<AtomicBool>,
    /// Config and store, for webhooks.
    pub authorizer: Arc<Authorizer>,
}

/// The router of the HTTP port.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/webhooks/stripe", post(stripe_webhook))
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

/// Stripe retries anything but a 2xx: 400 for what a retry cannot fix, 503 for what it can.
async fn stripe_webhook(State(s): State<HttpState>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let config = s.authorizer.config();
    let json = |status: StatusCode, v: serde_json::Value| {
        (status, [(header::CONTENT_TYPE, "application/json")], v.to_string())
    };
    let Some(stripe_config) = config.billing.stripe.as_ref() else {
        return json(StatusCode::NOT_FOUND, serde_json::json!({ "error": "billing.stripe is not configured" }));
    };
    let signature = headers.get("stripe-signature").and_then(|v| v.to_str().ok());
    let store = s.authorizer.store().clone();
    let outcome =
        stripe::handle(store.as_ref(), stripe_config, &stripe_config.webhook_secrets.0, signature, &body).await;
    match outcome {
        Outcome::Applied { account } => {
            json(StatusCode::OK, serde_json::json!({ "received": true, "applied": true, "account": account }))
        }
        Outcome::Ignored(why) => {
            json(StatusCode::OK, serde_json::json!({ "received": true, "applied": false, "reason": why }))
        }
        Outcome::Rejected(why) => json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": why })),
        Outcome::Unavailable => {
            json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({ "error": "store unavailable; retry" }))
        }
    }
}
