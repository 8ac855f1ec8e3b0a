//! Wires the pieces and runs both ports until shutdown.
//!
//! [`run`] takes its listeners and its shutdown signal from the caller, so
//! tests start it on `127.0.0.1:0` and stop it with a oneshot. Readiness
//! (`envoy.service.auth.v3.Authorization`, `tollgate.v1.Tollgate`, `/readyz`)
//! follows the store: NOT_SERVING until the store answers, and again while it
//! does not. Liveness (`""`, `/healthz`) holds until shutdown. On shutdown
//! everything turns NOT_SERVING, then the listeners close and in-flight
//! requests drain, bounded by `server.drain_timeout`; then the store gives
//! back what it holds (lease mode), bounded by the same timeout.
//!
//! Both ports accept through [`LimitedIncoming`] (connection cap, handshake
//! deadline). On the gRPC port tonic enforces the rest of `server.limits`:
//! HTTP/2 streams per connection (advertised in SETTINGS; further streams are
//! refused), header list size, keepalive pings, a deadline per call, and the
//! message size per service, checked on the 5-byte gRPC frame prefix, before
//! any of the message is buffered. The limits, like TLS, are fixed at start-up.
//!
//! May use everything: it builds the authorizer and the accounts service and
//! hands them to the transports (`grpc::services`, `http::router`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinError;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::accounts::Accounts;
use crate::authorizer::Authorizer;
use crate::config::Config;
use crate::grpc;
use crate::http::{self, HttpState};
use crate::listener::LimitedIncoming;
use crate::metrics::Metrics;
use crate::store::Store;

/// How often readiness re-checks the store.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// A server that failed while running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The gRPC server stopped with an error.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The HTTP server stopped with an error.
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    /// A server's task panicked or was cancelled, so it returned nothing.
    #[error("{server} server task failed: {source}")]
    Task {
        /// `gRPC` or `HTTP`.
        server: &'static str,
        /// Why the task ended.
        source: JoinError,
    },
}

/// The bound listeners (bound by the caller, so tests can use port 0).
#[derive(Debug)]
pub struct Listeners {
    /// ext_authz, health and `tollgate.v1`.
    pub grpc: TcpListener,
    /// Metrics and HTTP health.
    pub http: TcpListener,
    /// The HTTP authorization door, when `server.authz_http_listen` is set.
    pub authz_http: Option<TcpListener>,
}

/// Handles a running server exposes to its caller (reloads, tests).
#[derive(Debug, Clone)]
pub struct Handle {
    /// Decides requests; `replace_config` reloads.
    pub authorizer: Arc<Authorizer>,
}

/// Runs tollgate on `listeners` until `shutdown` resolves; `on_start` receives
/// the handle once the services exist (before the first request is served).
/// `metrics` is made by the caller so the store's cache can report into it.
pub async fn run(
    metrics: Arc<Metrics>,
    config: Arc<Config>,
    store: Arc<dyn Store>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
    on_start: impl FnOnce(Handle) + Send,
) -> Result<(), ServerError> {
    let drain_delay = config.server.drain_delay;
    let drain_timeout = config.server.drain_timeout;
    // TLS and limits are fixed at start-up: a reload does not re-read certificates.
    let tls = config.server.tls.clone();
    let limits = config.server.limits;
    let reflection = config.server.reflection;
    let authorizer = Arc::new(Authorizer::new(config, store.clone(), metrics.clone()));
    let accounts = Arc::new(Accounts::new(authorizer.clone()));
    on_start(Handle { authorizer: authorizer.clone() });

    let (stop_tx, stop_rx) = watch::channel(false);
    let bounds = grpc::Bounds {
        max_message: limits.max_message_bytes,
        request_timeout: limits.request_timeout,
        max_inflight: limits.max_inflight_requests,
        stopping: stop_rx.clone(),
        tls: tls.is_some(),
    };
    let grpc::Services { routes, health } = grpc::services(authorizer.clone(), accounts.clone(), bounds, reflection);
    // Liveness (`""`) is SERVING while the process runs, NOT_SERVING only once
    // shutdown begins, so a Redis outage makes pods unready, never restarted.
    health.set_live(true).await;
    health.set_ready(false).await;
    let ready = Arc::new(AtomicBool::new(false));
    let (probe_stop_tx, probe_stop_rx) = watch::channel(false);

    // Readiness follows the store until shutdown begins.
    let probe = {
        let (health, ready, mut stop) = (health.clone(), ready.clone(), probe_stop_rx);
        let authorizer = authorizer.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let timeout = authorizer.config().store.timeout.max(Duration::from_millis(500));
                let ok = matches!(tokio::time::timeout(timeout, store.ping()).await, Ok(Ok(())));
                if last != Some(ok) {
                    if ok {
                        tracing::info!("store reachable: serving");
                    } else {
                        tracing::warn!("store unreachable: not serving");
                    }
                    ready.store(ok, Ordering::Relaxed);
                    authorizer.metrics().set_ready(ok);
                    health.set_ready(ok).await;
                    last = Some(ok);
                }
                tokio::select! {
                    _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                    _ = stop.changed() => return,
                }
            }
        })
    };

    let wait_stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let streams = limits.max_concurrent_streams;
    let mut builder = tonic::transport::Server::builder()
        // h2 refuses streams past this one (REFUSED_STREAM): no service-level
        // limit per connection is needed on top (tonic's
        // `concurrency_limit_per_connection` could never bind, and cost each
        // call a semaphore's acquire and release).
        .max_concurrent_streams(streams)
        .http2_max_header_list_size(limits.max_header_list_bytes)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        // request_timeout and max_inflight_requests are applied per service
        // (`grpc::bounded`): access-log streams live on, in a pool of their own.
        .max_connection_age(limits.max_connection_age)
        .max_connection_age_grace(limits.request_timeout);
    if let Some(tls) = &tls {
        let mut t =
            ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert, &tls.key)).timeout(limits.handshake_timeout);
        if let Some(ca) = &tls.client_ca {
            t = t.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(t)?;
    }
    let grpc = builder
        .add_routes(routes)
        // LimitedIncoming sets TCP_NODELAY (tonic only sets it on its own bind path).
        .serve_with_incoming_shutdown(
            LimitedIncoming::new(listeners.grpc, &limits).count_after_tls(tls.is_some()),
            wait_stop(stop_rx.clone()),
        );
    let state = HttpState { metrics, ready: ready.clone(), authorizer: authorizer.clone(), accounts };
    let router = http::router(state, &limits);
    let http = http::serve(LimitedIncoming::new(listeners.http, &limits), router, limits, wait_stop(stop_rx.clone()));
    // The HTTP authorization door shares the HTTP port's bounds and shutdown.
    let door = listeners.authz_http.map(|l| {
        let router = crate::http_authz::router(authorizer.clone());
        http::serve(LimitedIncoming::new(l, &limits), router, limits, wait_stop(stop_rx.clone()))
    });
    let http = async move {
        match door {
            Some(door) => {
                let (a, b) = tokio::join!(http, door);
                a.and(b)
            }
            None => http.await,
        }
    };
    // Usage and threshold events to the sink (idle while `events.sink` is unset).
    let delivery = tokio::spawn(crate::events::delivery::run(authorizer.clone(), stop_rx.clone()));
    let mut grpc = tokio::spawn(grpc);
    let mut http = tokio::spawn(http);

    tokio::select! {
        _ = shutdown => {}
        r = &mut grpc => return flatten_grpc(r),
        r = &mut http => return flatten_http(r),
    }
    tracing::info!(?drain_delay, "shutting down: health NOT_SERVING");
    let _ = probe_stop_tx.send(true);
    let _ = probe.await;
    ready.store(false, Ordering::Relaxed);
    health.set_live(false).await;
    health.set_ready(false).await;
    // Let load balancers see NOT_SERVING before the listeners close.
    tokio::time::sleep(drain_delay).await;
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(drain_timeout, async {
        let g = (&mut grpc).await;
        let h = (&mut http).await;
        (g, h)
    })
    .await;
    match drained {
        Ok((g, h)) => {
            flatten_grpc(g)?;
            flatten_http(h)?;
            tracing::info!("drained; bye");
        }
        Err(_) => tracing::warn!(?drain_timeout, "drain timed out; exiting with requests in flight"),
    }
    if tokio::time::timeout(drain_timeout, delivery).await.is_err() {
        tracing::warn!("event delivery did not stop in time; undelivered events stay in the outbox");
    }
    // Lease mode: give back what this replica holds, so other replicas can spend it.
    if tokio::time::timeout(drain_timeout, authorizer.store().release()).await.is_err() {
        tracing::warn!("giving leases back timed out; their units stay counted until their windows end");
    }
    Ok(())
}

fn flatten_grpc(r: Result<Result<(), tonic::transport::Error>, JoinError>) -> Result<(), ServerError> {
    match r {
        Ok(r) => r.map_err(ServerError::from),
        Err(source) => Err(ServerError::Task { server: "gRPC", source }),
    }
}

fn flatten_http(r: Result<Result<(), std::io::Error>, JoinError>) -> Result<(), ServerError> {
    match r {
        Ok(r) => r.map_err(ServerError::from),
        Err(source) => Err(ServerError::Task { server: "HTTP", source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn failed_task() -> JoinError {
        let task = tokio::spawn(std::future::pending::<()>());
        task.abort();
        task.await.expect_err("an aborted task fails")
    }

    #[tokio::test]
    async fn a_failed_task_is_a_task_error_naming_its_server() {
        let grpc = flatten_grpc(Err(failed_task().await)).unwrap_err();
        assert!(matches!(grpc, ServerError::Task { server: "gRPC", .. }), "{grpc:?}");
        assert!(grpc.to_string().starts_with("gRPC server task failed"), "{grpc}");
        let http = flatten_http(Err(failed_task().await)).unwrap_err();
        assert!(matches!(http, ServerError::Task { server: "HTTP", .. }), "{http:?}");
    }
}
