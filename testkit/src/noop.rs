//! The floor: an `envoy.service.auth.v3.Authorization` server that answers
//! every Check with a fixed OK and decides nothing, so a measurement of it
//! is the cost of the ext_authz hop itself (tonic's unary round trip, or
//! Envoy → server → Envoy).
//!
//! It answers `grpc.health.v1` too (SERVING for the Authorization service),
//! as tollgate does, so Envoy's active health check passes; accepted
//! connections get TCP_NODELAY, like tonic's `Server::serve` and tollgate.

use std::future::Future;
use std::net::SocketAddr;

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, HttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::rpc;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;

/// An `Authorization` service with no logic: every Check gets the same answer.
#[derive(Clone, Debug)]
pub struct Noop {
    response: CheckResponse,
    /// Answers in DATA frames under h2's chaining threshold (tollgate's
    /// `grpc::frames`), as tollgate's server does.
    small_frames: bool,
}

impl Noop {
    /// Answers a bare OK.
    pub fn bare() -> Self {
        Self {
            response: CheckResponse {
                status: Some(rpc::Status { code: 0, message: String::new(), details: Vec::new() }),
                dynamic_metadata: None,
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            },
            small_frames: false,
        }
    }

    /// Answers `answer` (tollgate's own allow, see [`crate::bench::allow_answer`])
    /// cut to `shape`: what Envoy spends applying that answer, apart from
    /// what tollgate spends deciding it.
    pub fn shaped(mut answer: CheckResponse, shape: Shape) -> Self {
        let ok = match answer.http_response.as_mut() {
            Some(HttpResponse::OkResponse(ok)) => Some(ok),
            _ => None,
        };
        match (shape, ok) {
            (Shape::Full, _) | (_, None) => {}
            (Shape::NoMetadata, _) => answer.dynamic_metadata = None,
            (Shape::DecisionOnly, _) => {
                if let Some(meta) = answer.dynamic_metadata.as_mut() {
                    meta.fields.retain(|k, _| k == "decision");
                }
            }
            (Shape::NoRateLimit, Some(ok)) => ok.response_headers_to_add.clear(),
            (Shape::NoRemovals, Some(ok)) => ok.headers_to_remove.clear(),
            (Shape::Lean, Some(ok)) => {
                ok.response_headers_to_add.clear();
                ok.headers_to_remove.clear();
                answer.dynamic_metadata = None;
            }
        }
        Self { response: answer, small_frames: false }
    }

    /// Answers in small DATA frames, as tollgate's server does.
    pub fn in_small_frames(mut self) -> Self {
        self.small_frames = true;
        self
    }
}

/// Which parts of tollgate's allow answer a shaped [`Noop`] keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    /// All of it: upstream headers, header removals, client RateLimit headers, dynamic metadata.
    Full,
    /// No dynamic metadata.
    NoMetadata,
    /// Dynamic metadata with the decision alone (no account, no plan).
    DecisionOnly,
    /// No client (RateLimit) headers.
    NoRateLimit,
    /// No header removals.
    NoRemovals,
    /// The upstream headers alone.
    Lean,
}

impl Shape {
    /// Every shape, in the order the bench shows them.
    pub const ALL: [Shape; 6] =
        [Shape::Full, Shape::NoMetadata, Shape::DecisionOnly, Shape::NoRateLimit, Shape::NoRemovals, Shape::Lean];

    /// The name `noop_authz --shaped=NAME` takes.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Full => "full",
            Shape::NoMetadata => "no-metadata",
            Shape::DecisionOnly => "decision-only",
            Shape::NoRateLimit => "no-ratelimit",
            Shape::NoRemovals => "no-removals",
            Shape::Lean => "lean",
        }
    }

    /// The shape called `name`.
    pub fn parse(name: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|s| s.name() == name)
    }
}

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(
        &self,
        _request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.response.clone()))
    }
}

/// Serves `noop` (and health) on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    noop: Noop,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<AuthorizationServer<Noop>>().await;
    let builder = tonic::transport::Server::builder().add_service(health);
    if noop.small_frames {
        let service = tollgate::grpc::frames::SmallFramesService::new(AuthorizationServer::new(noop));
        builder.add_service(service).serve_with_incoming_shutdown(incoming, shutdown).await
    } else {
        builder.add_service(AuthorizationServer::new(noop)).serve_with_incoming_shutdown(incoming, shutdown).await
    }
}

/// A [`Noop`] server in this process on `127.0.0.1:0`.
pub struct NoopServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl NoopServer {
    /// Binds and starts serving `noop`.
    pub async fn start(noop: Noop) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind noop");
        let addr = listener.local_addr().expect("noop addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, noop, async {
            let _ = stopped.await;
        }));
        Self { addr, stop, task }
    }

    /// Begins shutdown and waits (bounded) for the server to exit.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let exited = tokio::time::timeout(std::time::Duration::from_secs(10), self.task).await;
        exited.expect("noop server exits").expect("noop task").expect("noop server");
    }
}
