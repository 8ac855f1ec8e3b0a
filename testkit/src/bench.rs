//! What the benches serve and send: one config whose quota is never reached,
//! the Check Envoy sends for `GET /v1/search?q=x` with an API key, and
//! tollgate started in-process on them.

use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer;

use crate::{TestServer, http_check};

/// The benches' config: one account whose month quota (10^12) is never
/// reached, so every Check of `GET /v1/search` is allowed and spends one
/// counter. `STORE` becomes the `store:` mapping (see [`config`]).
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

/// Whether this bench binary should measure: like criterion, only under
/// `cargo bench` (which passes `--bench`), not when listing or testing
/// (`cargo test --benches` passes neither, `--list` lists).
pub fn measuring() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--list" || a == "--test")
}

/// [`CONFIG`] with `store_yaml` (a flow mapping) as its `store:`.
pub fn config(store_yaml: &str) -> String {
    CONFIG.replace("STORE", store_yaml)
}

/// tollgate in this process on [`config`]`(store_yaml)`, its store seeded
/// from the config's account, ready.
pub async fn start(store_yaml: &str) -> TestServer {
    TestServer::start_configured(&config(store_yaml), true).await
}

/// A Check as Envoy sends it for `GET /v1/search?q=x` with [`API_KEY`]: the
/// pseudo-headers and a curl client's headers, the peers' addresses.
pub fn check_request() -> CheckRequest {
    let headers = [
        (":path", "/v1/search?q=x"),
        (":scheme", "https"),
        ("accept", "application/json"),
        ("user-agent", "curl/8.5.0"),
        ("x-api-key", API_KEY),
        ("x-forwarded-proto", "https"),
        ("x-request-id", "7f0c2a9e-1b43-4c5d-9e8f-0a1b2c3d4e5f"),
    ];
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
    let mut request = http_check("GET", "/v1/search?q=x", &headers);
    let attributes = request.attributes.as_mut().expect("http_check sets attributes");
    attributes.source = Some(peer("10.0.0.7", 53012));
    attributes.destination = Some(peer("10.0.0.2", 8080));
    let http = attributes.request.as_mut().and_then(|r| r.http.as_mut()).expect("http_check sets the HTTP request");
    http.id = "12345678901234567890".to_owned();
    http.scheme = "https".to_owned();
    request
}

/// tollgate's authorizer on [`config`]`(memory store)`, seeded, in this
/// process without a server.
pub async fn authorizer() -> std::sync::Arc<tollgate::authorizer::Authorizer> {
    authorizer_on(&config("{ backend: memory, on_error: deny, timeout: 50ms }")).await
}

/// tollgate's authorizer on the config `yaml` (its accounts seeded), in this process.
pub async fn authorizer_on(yaml: &str) -> std::sync::Arc<tollgate::authorizer::Authorizer> {
    use std::sync::Arc;
    let config = tollgate::config::Config::parse(yaml, "bench.yaml").expect("the bench config is valid");
    let metrics = Arc::new(tollgate::metrics::Metrics::new());
    let store = tollgate::store::open(&config.store, &config.cache, metrics.cache_observer()).expect("memory store");
    tollgate::accounts::Accounts::seed(store.as_ref(), &config.accounts, &config.policy.plans).await.expect("seed");
    Arc::new(tollgate::authorizer::Authorizer::new(Arc::new(config), store, metrics))
}

/// tollgate's ext_authz handler on [`authorizer`] (for counting what one
/// Check costs the handler).
pub async fn handler() -> tollgate::grpc::ext_authz::ExtAuthz {
    tollgate::grpc::ext_authz::ExtAuthz::new(authorizer().await)
}

/// What tollgate answers [`check_request`] on [`config`]: an allow of the
/// bench account, for a floor server to answer without deciding.
pub async fn allow_answer() -> envoy_types::pb::envoy::service::auth::v3::CheckResponse {
    use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
    let answer = handler().await.check(tonic::Request::new(check_request())).await.expect("a Check answers");
    answer.into_inner()
}

/// Runs `n` Checks of [`check_request`] through `h` as tollgate's server
/// answers them: decided, then encoded (into one reused buffer, as tonic
/// reuses its own); answers how many were allowed. With `--reference` among
/// this process's arguments, each answer is built as a prost `CheckResponse`
/// and encoded by prost instead (how every Check was answered before the
/// wire encoder).
pub async fn run_checks(h: &tollgate::grpc::ext_authz::ExtAuthz, n: usize) -> usize {
    let reference = std::env::args().any(|a| a == "--reference");
    // Decoded as the server decodes a received Check (a view of its bytes), outside the measured loop.
    let view = tollgate::grpc::check_request::CheckRequestView::from_request(&check_request());
    let requests: Vec<_> = (0..n).map(|_| tonic::Request::new(view.clone())).collect();
    answer_all(h, requests, reference).await
}

/// The measured loop of [`run_checks`], requests built: what
/// `scripts/callgrind-check.sh` counts inside (a boxed future, so it stays a
/// function of its own).
fn answer_all<'a>(
    h: &'a tollgate::grpc::ext_authz::ExtAuthz,
    requests: Vec<tonic::Request<tollgate::grpc::check_request::CheckRequestView>>,
    reference: bool,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = usize> + 'a>> {
    Box::pin(async move {
        let mut buf = Vec::with_capacity(4096);
        let mut allowed = 0;
        for r in requests {
            allowed += usize::from(check_once(h, r, &mut buf, reference).await);
        }
        allowed
    })
}

/// One Check, decided and encoded into `buf`; whether it was allowed.
async fn check_once(
    h: &tollgate::grpc::ext_authz::ExtAuthz,
    request: tonic::Request<tollgate::grpc::check_request::CheckRequestView>,
    buf: &mut Vec<u8>,
    reference: bool,
) -> bool {
    use prost::Message as _;
    let outcome = h.decide(request).await.expect("a Check answers");
    let allowed = outcome.decision.is_allowed();
    buf.clear();
    let encoded = if reference {
        tollgate::grpc::ext_authz::check_response(outcome).encode(buf)
    } else {
        tollgate::grpc::answer::Answer::new(outcome).encode(buf)
    };
    encoded.expect("a Vec grows to fit");
    allowed
}

/// `--checks N` of this process's arguments, else `default`.
pub fn checks_arg(default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--checks")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_check_is_what_envoy_sends_for_a_keyed_search() {
        let request = check_request();
        let attributes = request.attributes.unwrap();
        let http = attributes.request.unwrap().http.unwrap();
        let mut names: Vec<&str> = http.headers.keys().map(String::as_str).collect();
        names.sort_unstable();
        let expected = [
            ":authority",
            ":method",
            ":path",
            ":scheme",
            "accept",
            "user-agent",
            "x-api-key",
            "x-forwarded-proto",
            "x-request-id",
        ];
        assert_eq!(names, expected);
        assert_eq!((http.headers[":authority"].as_str(), http.headers[":method"].as_str()), ("api.example.com", "GET"));
        assert_eq!(
            (http.method.as_str(), http.path.as_str(), http.host.as_str()),
            ("GET", "/v1/search?q=x", "api.example.com")
        );
        assert_eq!(
            (http.id.as_str(), http.scheme.as_str(), http.protocol.as_str()),
            ("12345678901234567890", "https", "HTTP/1.1")
        );
        assert!(attributes.source.is_some() && attributes.destination.is_some());
    }
}
