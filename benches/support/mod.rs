//! What the bench binaries share: the config they serve and the Check request they send.

use std::collections::HashMap;

use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request as AttrRequest};

/// The config of both servers; `STORE` becomes the `store:` mapping.
pub const CONFIG: &str = r#"
store: STORE
cache:
  ttl: 30s
  negative_ttl: 5s
identity:
  - api_key: { header: x-api-key }
  - api_key: { header: authorization, scheme: Bearer }
billing:
  portal_url: "https://billing.example.com/accounts/{account}/billing"
  grace_period: 72h
plans:
  bench:
    features: [search]
    quotas:
      - { meter: requests, limit: 1000000000000, period: month }
routes:
  - { match: { path_prefix: /public }, public: true }
  - { match: { path_prefix: /v1/search, methods: [GET] }, feature: search, meter: requests, cost: 1 }
default: deny
non_http: deny
accounts:
  - { id: acct_bench, plan: bench, api_keys: [bench-key-0123456789] }
problems:
  type_base: "https://docs.example.com/problems/"
"#;

/// The API key of the bench account in every bench config.
pub const API_KEY: &str = "bench-key-0123456789";

/// A Check as Envoy sends it for `GET /v1/search?q=x` with an API key.
pub fn check_request() -> CheckRequest {
    let headers: HashMap<String, String> = [
        (":authority", "api.example.com"),
        (":method", "GET"),
        (":path", "/v1/search?q=x"),
        (":scheme", "https"),
        ("accept", "application/json"),
        ("user-agent", "curl/8.5.0"),
        ("x-api-key", API_KEY),
        ("x-forwarded-proto", "https"),
        ("x-request-id", "7f0c2a9e-1b43-4c5d-9e8f-0a1b2c3d4e5f"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let peer = |ip: &str, port: u32| Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.to_owned(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer("10.0.0.7", 53012)),
            destination: Some(peer("10.0.0.2", 8080)),
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    id: "12345678901234567890".to_owned(),
                    method: "GET".to_owned(),
                    headers,
                    path: "/v1/search?q=x".to_owned(),
                    host: "api.example.com".to_owned(),
                    scheme: "https".to_owned(),
                    protocol: "HTTP/1.1".to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}
