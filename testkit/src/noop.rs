//! The floor: an `envoy.service.auth.v3.Authorization` server that answers
//! every Check with a fixed OK and decides nothing, so a measurement of it
//! is the cost of the ext_authz hop itself (tonic's unary round trip, or
//! Envoy → server → Envoy).
//!
//! It answers `grpc.health.v1` too (SERVING for the Authorization service),
//! as tollgate does, so Envoy's active health check passes; accepted
//! connections get TCP_NODELAY, like tonic's `Server::serve` and tollgate.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, HeaderAppendAction, HeaderValue,
    HeaderValueOption, HttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;

/// An `Authorization` service with no logic: every Check gets the same answer.
#[derive(Clone, Debug)]
pub struct Noop {
    response: CheckResponse,
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
        }
    }

    /// Answers what tollgate answers when it allows the bench account (fixed
    /// values): `x-tollgate-account` and `x-tollgate-plan` for the upstream,
    /// `x-api-key` removed, `RateLimit-Policy` and `RateLimit` for the
    /// client, and `account`/`plan`/`decision` dynamic metadata. That
    /// separates what Envoy spends applying such an answer from what tollgate
    /// spends deciding it.
    pub fn shaped() -> Self {
        let header = |key: &str, value: &str| HeaderValueOption {
            header: Some(HeaderValue { key: key.to_owned(), value: value.to_owned(), ..Default::default() }),
            append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
            ..Default::default()
        };
        let string = |s: &str| Value { kind: Some(Kind::StringValue(s.to_owned())) };
        let meta: HashMap<String, Value> = [("account", "acct_bench"), ("plan", "bench"), ("decision", "allowed")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), string(v)))
            .collect();
        let bare = Self::bare().response;
        Self {
            response: CheckResponse {
                dynamic_metadata: Some(Struct { fields: meta }),
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                    headers: vec![header("x-tollgate-account", "acct_bench"), header("x-tollgate-plan", "bench")],
                    headers_to_remove: vec!["x-api-key".to_owned()],
                    response_headers_to_add: vec![
                        header("ratelimit-policy", "\"requests-month\";q=1000000000000;w=2592000"),
                        header("ratelimit", "\"requests-month\";r=999999000000;t=604800"),
                    ],
                    ..Default::default()
                })),
                ..bare
            },
        }
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
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(AuthorizationServer::new(noop))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
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
