//! A gRPC service of one method whose requests tollgate decodes as views of
//! their bytes ([`check_request`](super::check_request),
//! [`log_message`](super::log_message)) instead of the types tonic
//! generates: what a generated server does, with the method's own codec.
//!
//! May use: nothing of tollgate's.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::body::Body;
use tonic::codec::Codec;
use tonic::codegen::{Body as HttpBody, StdError, http};
use tonic::server::{Grpc, NamedService};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The one method a [`Server`] serves.
pub trait Method: Clone + Send + 'static {
    /// The service's name: the generated server's, so health statuses and
    /// routes keyed by it cannot drift.
    const SERVICE: &'static str;
    /// The method's path, `/<service>/<method>`; any other is UNIMPLEMENTED.
    const PATH: &'static str;
    /// Encodes the answers and decodes the requests (as views).
    type Codec: Codec + Default + Send + 'static;

    /// Serves one call on `grpc` (unary or streaming, as the method is).
    fn serve<B>(
        self,
        grpc: &mut Grpc<Self::Codec>,
        req: http::Request<B>,
    ) -> impl Future<Output = http::Response<Body>> + Send
    where
        B: HttpBody + Send + 'static,
        B::Error: Into<StdError> + Send + 'static;
}

/// The service of one [`Method`], refusing messages over a size either way.
#[derive(Debug, Clone)]
pub struct Server<M> {
    method: M,
    max_message: usize,
}

impl<M> Server<M> {
    /// Serves `method`, refusing messages over `max_message` bytes either way.
    pub fn new(method: M, max_message: usize) -> Self {
        Self { method, max_message }
    }
}

impl<M: Method> NamedService for Server<M> {
    const NAME: &'static str = M::SERVICE;
}

impl<M, B> tower::Service<http::Request<B>> for Server<M>
where
    M: Method,
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != M::PATH {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let (method, max) = (self.method.clone(), self.max_message);
        Box::pin(async move {
            let mut grpc = Grpc::new(M::Codec::default()).apply_max_message_size_config(Some(max), Some(max));
            Ok(method.serve(&mut grpc, req).await)
        })
    }
}
