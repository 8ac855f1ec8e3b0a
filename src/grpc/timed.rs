//! `server.limits.request_timeout` per service: every call of a wrapped
//! service ends with CANCELLED ("Timeout expired", as tonic's own server-wide
//! timeout answers) once it has run that long. The access-log stream is not
//! wrapped: Envoy holds it open for as long as it runs, and cutting it would
//! lose the entries in flight.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;
use tower::Service;

/// A service whose calls are bounded by a timeout.
#[derive(Debug, Clone)]
pub struct Timed<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Timed<S> {
    /// `inner`, each call ended after `timeout`.
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout }
    }
}

impl<S: NamedService> NamedService for Timed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for Timed<S>
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
        let call = self.inner.call(req);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, call).await {
                Ok(r) => r,
                Err(_) => Ok(tonic::Status::cancelled("Timeout expired").into_http()),
            }
        })
    }
}
