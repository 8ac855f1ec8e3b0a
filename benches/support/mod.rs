//! What the bench binaries share: the config they serve, the in-process
//! tollgate they start and the Check request they send.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tollgate::accounts::Accounts;
use tollgate::config::Config;
use tollgate::metrics::Metrics;
use tollgate::server::{self, Listeners};
use tollgate::store;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

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

/// A tollgate running in this process.
pub struct Tollgate {
    /// A client on one HTTP/2 channel.
    pub client: AuthorizationClient<Channel>,
    /// Send to begin shutdown.
    pub stop: oneshot::Sender<()>,
    /// The server task.
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts tollgate with `store_yaml` as its `store:`, seeded from the config's accounts, and waits until SERVING.
pub async fn start_tollgate(store_yaml: &str) -> Tollgate {
    let yaml = CONFIG.replace("STORE", store_yaml);
    let config = Arc::new(Config::parse(&yaml, "<bench config>").expect("bench config"));
    let metrics = Arc::new(Metrics::new());
    let m = metrics.clone();
    let observe: store::LookupObserver = Arc::new(move |hit| m.record_cache(hit));
    let store = store::open(&config.store, &config.cache, observe).expect("open store");
    let seeded = Accounts::seed(store.as_ref(), &config.accounts, &config.policy.plans).await.expect("seed");
    assert_eq!(seeded, 1);

    let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let addr = grpc.local_addr().expect("grpc addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        server::run(metrics, config, store, Listeners { grpc, http }, shutdown, |_| {}).await.expect("tollgate server");
    });
    let channel = connect(addr).await;
    let mut health = HealthClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = health.check(HealthCheckRequest { service: String::new() }).await.map(|r| r.into_inner().status);
        if status.ok() == Some(ServingStatus::Serving as i32) {
            break;
        }
        assert!(Instant::now() < deadline, "tollgate did not become SERVING");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Tollgate { client: AuthorizationClient::new(channel), stop, task }
}

async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect")
}
