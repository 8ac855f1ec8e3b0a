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
//!
//! With `--shaped` it still decides nothing, but answers what tollgate answers
//! when it allows the bench account (fixed values): `x-tollgate-account` and
//! `x-tollgate-plan` for the upstream, `x-api-key` removed, `RateLimit-Policy`
//! and `RateLimit` for the client, and `account`/`plan`/`decision` dynamic
//! metadata. That separates what Envoy spends applying such an answer from
//! what tollgate spends deciding it.
//!
//! Without `--serve ADDR` (e.g. under a plain `cargo bench`) it prints a hint
//! and exits; other arguments (cargo passes `--bench`) are ignored.

use std::collections::HashMap;

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, HeaderAppendAction, HeaderValue,
    HeaderValueOption, HttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

/// An `Authorization` service with no logic: every Check is allowed with `response`.
#[derive(Debug)]
struct Noop {
    response: CheckResponse,
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

/// A bare OK.
fn bare() -> CheckResponse {
    CheckResponse {
        status: Some(rpc::Status { code: 0, message: String::new(), details: Vec::new() }),
        dynamic_metadata: None,
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
    }
}

/// An OK shaped like tollgate's allow of the bench account.
fn shaped() -> CheckResponse {
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
    CheckResponse {
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
        ..bare()
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
    let response = if std::env::args().any(|a| a == "--shaped") { shaped() } else { bare() };
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
            .add_service(AuthorizationServer::new(Noop { response }))
            .serve_with_incoming(incoming)
            .await?;
        Ok(())
    })
}
