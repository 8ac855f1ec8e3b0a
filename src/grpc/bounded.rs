//! `server.limits.request_timeout` and `max_inflight_requests` per service.
//!
//! A call is refused at once with RESOURCE_EXHAUSTED when its pool of
//! in-flight calls is full (it holds a slot until it ends), and a call that
//! runs longer than the timeout ends with CANCELLED ("Timeout expired", as
//! tonic's own server-wide timeout answers). The Check, `tollgate.v1` and
//! health services share one pool and the timeout; the access-log service
//! has a pool of its own and no timeout: Envoy holds each stream open for as
//! long as it runs (cutting it would lose the entries in flight), and
//! however many proxies stream to a replica, their streams never take the
//! slots Checks need.
//!
//! A [traced](Bounded::traced) service also opens a span per call when
//! tracing is on (see `telemetry`), child of the caller's `traceparent`, and
//! puts the call's store time and cache hits on it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;
use tower::Service;

/// A service whose calls take a slot of a shared pool and, optionally, end after a timeout.
#[derive(Debug, Clone)]
pub struct Bounded<S> {
    inner: S,
    timeout: Option<Duration>,
    slots: Arc<Semaphore>,
    /// The methods whose calls get a span (`service/Method`); empty: none.
    traced: &'static [&'static str],
}

impl<S> Bounded<S> {
    /// `inner`, each call holding one of `slots` and ended after `timeout` (if any).
    pub fn new(inner: S, timeout: Option<Duration>, slots: Arc<Semaphore>) -> Self {
        Self { inner, timeout, slots, traced: &[] }
    }

    /// Each call gets a span (when tracing is on), named after its method
    /// when it is one of `methods` (`envoy.service.auth.v3.Authorization/Check`),
    /// else `unknown`: a caller cannot name spans. For the Check and
    /// `tollgate.v1` services; not health probes, reflection or the access-log stream.
    pub fn traced(mut self, methods: &'static [&'static str]) -> Self {
        self.traced = methods;
        self
    }
}

impl<S: NamedService> NamedService for Bounded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for Bounded<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // Refused before the request is read: a call holds its message buffer while it runs.
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return Box::pin(async { Ok(tonic::Status::resource_exhausted("too many calls in flight").into_http()) });
        };
        let span = if !self.traced.is_empty() && crate::telemetry::enabled() {
            let path = req.uri().path().trim_start_matches('/');
            let name = self.traced.iter().find(|m| **m == path).copied().unwrap_or("unknown");
            crate::telemetry::request_span(name, crate::telemetry::parent_from(req.headers()))
        } else {
            tracing::Span::none()
        };
        let call = {
            // The handler's own code runs when the future is polled, inside the span.
            let _entered = span.enter();
            self.inner.call(req)
        };
        let timeout = self.timeout;
        let bounded = async move {
            let answer = match timeout {
                Some(t) => match tokio::time::timeout(t, call).await {
                    Ok(r) => r,
                    Err(_) => Ok(tonic::Status::cancelled("Timeout expired").into_http()),
                },
                None => call.await,
            };
            drop(slot);
            answer
        };
        if span.is_none() {
            return Box::pin(bounded);
        }
        Box::pin(tracing::Instrument::instrument(
            async move {
                let (answer, stats) = crate::telemetry::scope(bounded).await;
                crate::telemetry::record_stats(&tracing::Span::current(), stats);
                answer
            },
            span,
        ))
    }
}
