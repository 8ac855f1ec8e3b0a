//! The floor for `scripts/bench-envoy.sh`: an `envoy.service.auth.v3.Authorization`
//! server that answers every `Check` with an OK `CheckResponse` and does nothing
//! else, so Envoy → this server measures the cost of the ext_authz hop itself.
//!
//! ```text
//! cargo bench --bench noop_authz -- --serve 127.0.0.1:9191   # serve until killed
//! ```
//!
//! It also answers `grpc.health.v1` (SERVING for the Authorization service), as
//! tollgate does, so Envoy's active health check of the cluster passes. Accepted
//! connections get TCP_NODELAY, like tonic's `Server::serve` and tollgate.
//! Without `--serve ADDR` (e.g. under a plain `cargo bench`) it prints a hint
//! and exits; other arguments (cargo passes `--bench`) are ignored.

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, HttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::rpc;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

/// An `Authorization` service with no logic: every Check is allowed.
#[derive(Debug, Default)]
struct Noop;

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(
        &self,
        _request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(CheckResponse {
            status: Some(rpc::Status { code: 0, message: String::new(), details: Vec::new() }),
            dynamic_metadata: None,
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
        }))
    }
}

/// The address after `--serve` (or `--serve=ADDR`), if any.
fn serve_addr() -> Option<String> {
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--serve" {
            return args.next();
        }
        if let Some(addr) = a.strip_prefix("--serve=") {
            return Some(addr.to_owned());
        }
    }
    None
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(addr) = serve_addr() else {
        println!("noop_authz: not a measurement; scripts/bench-envoy.sh runs it with `--serve 127.0.0.1:PORT`");
        return Ok(());
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(&addr).await?;
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<AuthorizationServer<Noop>>().await;
        println!("noop_authz listening on {addr}");
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(AuthorizationServer::new(Noop))
            .serve_with_incoming(incoming)
            .await?;
        Ok(())
    })
}
