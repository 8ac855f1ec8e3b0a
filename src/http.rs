//! The HTTP port: `/healthz` (liveness), `/readyz` (readiness), `/metrics`,
//! and `POST /webhooks/stripe`. Thin axum handlers over shared state, served
//! by [`serve`]'s own HTTP/1 accept loop so that `server.limits` apply:
//!
//! - connections: at most `max_connections`, each with a handshake deadline
//!   ([`LimitedIncoming`]);
//! - request heads: hyper's header read timeout (`handshake_timeout`, from
//!   the first byte a head is awaited, so it also closes idle keep-alive
//!   connections and slow-loris heads) and at most `max_header_list_bytes`
//!   per head (a larger head is refused with 431);
//! - request bodies: read in full within `request_timeout` (else 408) and at
//!   most `max_body_bytes` (else 413) before any handler runs.
//!
//! Handlers themselves are not cut off by a timer: cancelling a webhook
//! between `remember_event` and applying it would make Stripe's retry look
//! like a replay and lose the event. Their store calls are each bounded by
//! `store.timeout`.
//!
//! May use: `metrics`, `stripe`, `accounts`, `authorizer`, `listener`, `config` (limits).

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self as axum_middleware, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::watch;

use crate::accounts::Accounts;
use crate::authorizer::Authorizer;
use crate::config::Limits;
use crate::listener::LimitedIncoming;
use crate::metrics::{self, Metrics};
use crate::stripe::{self, Outcome};

/// What the HTTP handlers read.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// Prometheus registry.
    pub metrics: Arc<Metrics>,
    /// True while the store answers and no shutdown has begun.
    pub ready: Arc<AtomicBool>,
    /// The live config, for webhooks.
    pub authorizer: Arc<Authorizer>,
    /// Where webhooks apply their account changes.
    pub accounts: Arc<Accounts>,
}

/// The smallest read buffer hyper accepts for HTTP/1 (it panics below its own minimum).
const MIN_HEAD_BUFFER: usize = 8192;

/// The router of the HTTP port, with `limits`' body size and body time bounds.
pub fn router(state: HttpState, limits: &Limits) -> Router {
    let body = BodyBounds {
        max_bytes: limits.max_body_bytes,
        timeout: limits.request_timeout,
        inflight: Arc::new(tokio::sync::Semaphore::new(limits.max_inflight_requests)),
    };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/webhooks/stripe", post(stripe_webhook))
        .with_state(state)
        .layer(axum_middleware::from_fn_with_state(body, receive_body))
        // The bodies `receive_body` passes on are within the bound already; the
        // extractors' own default (2 MB) must not be lower than ours.
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
}

/// How much of a request body is read, for how long, and how many at once.
#[derive(Debug, Clone)]
struct BodyBounds {
    max_bytes: usize,
    timeout: Duration,
    /// Requests in flight over all connections (`max_inflight_requests`):
    /// bounds the bodies held at once, whatever the number of connections.
    inflight: Arc<tokio::sync::Semaphore>,
}

/// Reads the whole body within the bounds before the handler runs: a body
/// that is too large is refused with 413 (at once when its `Content-Length`
/// says so, so a client that sent `Expect: 100-continue` never sends it), one
/// that arrives too slowly with 408; beyond `max_inflight_requests` at once, 503.
async fn receive_body(State(bounds): State<BodyBounds>, request: Request, next: Next) -> Response {
    // Probes and scrapes (GET, HEAD) carry no body we read: never counted, so
    // a webhook flood cannot fail liveness.
    if request.method() == Method::GET || request.method() == Method::HEAD {
        let (parts, _) = request.into_parts();
        return next.run(Request::from_parts(parts, Body::empty())).await;
    }
    // Held until the handler is done: the body lives that long.
    let Ok(_permit) = bounds.inflight.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], "too many requests in flight\n")
            .into_response();
    };
    let too_large = || (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n").into_response();
    let (parts, body) = request.into_parts();
    if HttpBody::size_hint(&body).lower() > bounds.max_bytes as u64 {
        return too_large();
    }
    let collected = tokio::time::timeout(bounds.timeout, Limited::new(body, bounds.max_bytes).collect()).await;
    let bytes = match collected {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<LengthLimitError>() => return too_large(),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "request body unreadable");
            return (StatusCode::BAD_REQUEST, "request body unreadable\n").into_response();
        }
        Err(_) => return (StatusCode::REQUEST_TIMEOUT, "request body not received in time\n").into_response(),
    };
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

/// Serves `router` over HTTP/1 on `incoming` until `shutdown` resolves; then
/// closes the listener, lets each connection finish its request in flight
/// (idle ones close at once) and returns when all are closed.
pub async fn serve(
    mut incoming: LimitedIncoming,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let max_head = usize::try_from(limits.max_header_list_bytes).unwrap_or(usize::MAX);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout)
        // The exact bound on a head (431 beyond it), and on the read buffer that holds it.
        .max_header_size(max_head)
        .max_buf_size(max_head.max(MIN_HEAD_BUFFER));
    // Every connection task holds a receiver; `closed()` is when the last is gone.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let io = tokio::select! {
            _ = &mut shutdown => break,
            io = incoming.accept() => io,
        };
        let connection = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(router.clone()));
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut connection = pin!(connection);
            let result = tokio::select! {
                r = connection.as_mut() => r,
                _ = async { stop.wait_for(|stop| *stop).await.is_ok() } => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
            drop(stop);
        });
    }
    drop(incoming);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    stop_tx.closed().await;
    Ok(())
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
    if let Some(totals) = s.authorizer.store().lease_stats() {
        s.metrics.record_lease(totals);
    }
    s.metrics.record_traces(crate::telemetry::totals());
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
    let outcome = stripe::handle(&s.accounts, stripe_config, &stripe_config.webhook_secrets.0, signature, &body).await;
    s.metrics.record_webhook(match &outcome {
        Outcome::Applied { .. } => "applied",
        Outcome::Ignored(_) => "ignored",
        Outcome::BadSignature => "signature",
        Outcome::Rejected(_) => "rejected",
        Outcome::Unavailable => "unavailable",
    });
    match outcome {
        Outcome::Applied { account } => {
            json(StatusCode::OK, serde_json::json!({ "received": true, "applied": true, "account": account }))
        }
        Outcome::Ignored(why) => {
            json(StatusCode::OK, serde_json::json!({ "received": true, "applied": false, "reason": why }))
        }
        Outcome::BadSignature => json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": "invalid signature" })),
        Outcome::Rejected(why) => json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": why })),
        Outcome::Unavailable => {
            json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({ "error": "store unavailable; retry" }))
        }
    }
}
