//! Writes structure-aware seeds for the `check` target into `seeds/check/`:
//! realistic CheckRequests (demo keys, public and paid routes, confusable
//! paths, forged `x-tollgate-*` headers, raw header maps, JWT metadata).
//!
//! Not a fuzz target: built with them (so it reuses their dependencies) and
//! run from `fuzz/`: `cargo +nightly fuzz build gen_check_seeds &&
//! target/x86_64-unknown-linux-gnu/release/gen_check_seeds`.

use std::collections::HashMap;

use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use prost::Message;

fn http(method: &str, path: &str, headers: &[(&str, &str)]) -> HttpRequest {
    HttpRequest {
        method: method.into(),
        path: path.into(),
        host: "api.example.com".into(),
        headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    }
}

fn check(http: HttpRequest) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request { http: Some(http), ..Default::default() }),
            ..Default::default()
        }),
    }
}

fn jwt(org: &str) -> Metadata {
    let s = |v: &str| Value { kind: Some(Kind::StringValue(v.into())) };
    let payload = Struct { fields: HashMap::from([("org_id".to_string(), s(org)), ("sub".to_string(), s("user-1"))]) };
    let field = Struct {
        fields: HashMap::from([("jwt_payload".to_string(), Value { kind: Some(Kind::StructValue(payload)) })]),
    };
    Metadata {
        filter_metadata: HashMap::from([("envoy.filters.http.jwt_authn".to_string(), field)]),
        ..Default::default()
    }
}

fn main() -> std::io::Result<()> {
    let free = [("x-api-key", "demo-free-key")];
    let pro = [("x-api-key", "demo-pro-key")];
    let mut seeds: Vec<(&str, CheckRequest)> = vec![
        ("search_free", check(http("GET", "/v1/search?q=1", &free))),
        ("public", check(http("GET", "/public/x", &[]))),
        ("ai_bearer", check(http("POST", "/v1/ai/chat", &[("authorization", "Bearer demo-pro-key")]))),
        ("dotdot", check(http("GET", "/public/../v1/ai/chat", &pro))),
        ("encoded_dot", check(http("GET", "/public/%2e%2e/v1/ai/chat", &pro))),
        ("params", check(http("GET", "/v1/ai;jsessionid=1/chat", &pro))),
        (
            "forged_headers",
            check(http(
                "GET",
                "/v1/export/x",
                &[("x-api-key", "demo-pro-key"), ("x-tollgate-account", "acct_other"), ("X-Tollgate-Plan", "gold")],
            )),
        ),
        ("forged_public", check(http("GET", "/public", &[("x-tollgate-degraded", "no"), ("x-api-key", "k")]))),
        ("late", check(http("GET", "/v1/search", &[("x-api-key", "demo-late-key")]))),
        ("canceled", check(http("GET", "/v1/search", &[("x-api-key", "demo-canceled-key")]))),
        ("wallet", check(http("POST", "/v1/ai/x", &[("x-api-key", "demo-wallet-key")]))),
        ("banned", check(http("GET", "/v1/search", &[("x-api-key", "demo-banned-key")]))),
        ("unmatched", check(http("GET", "/admin", &pro))),
        ("feature_missing", check(http("GET", "/v1/export", &free))),
        ("empty", CheckRequest::default()),
    ];
    let mut raw = http("GET", "/v1/search", &[]);
    raw.header_map = Some(HeaderMap {
        headers: vec![
            HeaderValue { key: "x-api-key".into(), raw_value: b"demo-pro-key".to_vec(), ..Default::default() },
            HeaderValue { key: "x-tollgate-billing-warning".into(), value: "none".into(), ..Default::default() },
        ],
    });
    seeds.push(("raw_header_map", check(raw)));
    // A Bearer key after a Basic one: the key is ours to remove, in either encoding.
    let raw_value = |k: &str, v: &[u8]| HeaderValue { key: k.into(), raw_value: v.to_vec(), ..Default::default() };
    let mut twice = http("GET", "/v1/search", &[]);
    twice.header_map = Some(HeaderMap {
        headers: vec![
            raw_value("x-api-key", b"demo-pro-key"),
            raw_value("authorization", b"Basic eA=="),
            raw_value("authorization", b"Bearer demo-free-key"),
        ],
    });
    seeds.push(("raw_basic_then_bearer", check(twice)));
    let joined = [("x-api-key", "demo-pro-key"), ("authorization", "Basic eA==,Bearer demo-free-key")];
    seeds.push(("joined_basic_then_bearer", check(http("GET", "/v1/search", &joined))));
    let mut claimed = check(http("GET", "/v1/ai/chat", &[]));
    if let Some(a) = claimed.attributes.as_mut() {
        a.metadata_context = Some(jwt("acct_pro"));
    }
    seeds.push(("jwt", claimed));
    let network = CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer { principal: "spiffe://cluster.local/ns/a/sa/b".into(), ..Default::default() }),
            ..Default::default()
        }),
    };
    seeds.push(("network", network));

    std::fs::create_dir_all("seeds/check")?;
    for (name, req) in &seeds {
        std::fs::write(format!("seeds/check/{name}.pb"), req.encode_to_vec())?;
    }
    println!("wrote {} seeds to seeds/check/", seeds.len());
    Ok(())
}
