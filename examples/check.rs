//! Sends one ext_authz Check to a running tollgate, as Envoy would, and prints
//! the decision: the quick start's client, no grpcurl needed.
//!
//! ```text
//! cargo run --example check -- GET /v1/search?q=rust x-api-key=demo-free-key
//! cargo run --example check -- --addr http://127.0.0.1:9191 POST /v1/ai/chat authorization="Bearer demo-wallet-key"
//! ```

use std::collections::HashMap;

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut addr = "http://127.0.0.1:9191".to_owned();
    if args.first().is_some_and(|a| a == "--addr") && args.len() > 1 {
        addr = args.remove(1);
        args.remove(0);
    }
    if args.len() < 2 {
        anyhow::bail!("usage: check [--addr URL] METHOD PATH [header=value ...]");
    }
    let (method, path) = (args[0].clone(), args[1].clone());
    let mut headers: HashMap<String, String> = HashMap::new();
    for h in &args[2..] {
        let (k, v) = h.split_once('=').ok_or_else(|| anyhow::anyhow!("header {h:?} is not name=value"))?;
        headers.insert(k.to_ascii_lowercase(), v.to_owned());
    }
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest { method, path, host: "localhost".into(), headers, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let mut client = AuthorizationClient::connect(addr).await?;
    let response = client.check(request).await?.into_inner();
    let code = response.status.map_or(0, |s| s.code);
    match response.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            println!("ALLOW (grpc status {code})");
            for h in ok.headers.iter().filter_map(|h| h.header.as_ref()) {
                println!("  upstream + {}: {}", h.key, h.value);
            }
            for h in &ok.headers_to_remove {
                println!("  upstream - {h}");
            }
            for h in ok.response_headers_to_add.iter().filter_map(|h| h.header.as_ref()) {
                println!("  client   + {}: {}", h.key, h.value);
            }
        }
        Some(HttpResponse::DeniedResponse(d)) => {
            println!("DENY {} (grpc status {code})", d.status.map_or(403, |s| s.code));
            for h in d.headers.iter().filter_map(|h| h.header.as_ref()) {
                println!("  {}: {}", h.key, h.value);
            }
            let body: serde_json::Value = serde_json::from_str(&d.body)?;
            println!("{}", serde_json::to_string_pretty(&body)?);
        }
        other => println!("unexpected response: {other:?}"),
    }
    Ok(())
}
