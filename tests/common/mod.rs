//! Test harness: runs tollgate in-process on ephemeral loopback ports and
//! builds CheckRequests as Envoy sends them (lower-case header keys, the query
//! string inside `path`).

#![allow(dead_code, missing_docs)]

pub mod envoy;
pub mod process;
pub mod redis;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request as AttrRequest};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tollgate::accounts::Accounts;
use tollgate::config::Config;
use tollgate::server::{self, Handle, Listeners};
use tollgate::store::{self, MemoryStore, Store};
use tonic::transport::Channel;

/// A tollgate running in this process.
pub struct TestServer {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub handle: Handle,
    pub store: Arc<dyn Store>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), server::ServerError>>,
}

impl TestServer {
    /// Starts on the memory store seeded from the config's accounts.
    pub async fn start(yaml: &str) -> Self {
        let config = Config::parse(yaml, "test.yaml").expect("test config is valid");
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        Accounts::seed(store.as_ref(), &config.accounts, &config.policy.plans).await.expect("seed");
        Self::start_with(config, store).await
    }

    /// Starts on the store the config names (Redis behind the cache), seeding
    /// it from the config's accounts when `seed` is set.
    pub async fn start_configured(yaml: &str, seed: bool) -> Self {
        let config = Config::parse(yaml, "test.yaml").expect("test config is valid");
        let metrics = Arc::new(tollgate::metrics::Metrics::new());
        let m = metrics.clone();
        let observe: store::LookupObserver = Arc::new(move |hit| m.record_cache(hit));
        let store = store::open(&config.store, &config.cache, observe).expect("open store");
        if seed {
            Accounts::seed(store.as_ref(), &config.accounts, &config.policy.plans).await.expect("seed");
        }
        Self::start_full(metrics, config, store).await
    }

    /// Starts over a given store.
    pub async fn start_with(config: Config, store: Arc<dyn Store>) -> Self {
        Self::start_full(Arc::new(tollgate::metrics::Metrics::new()), config, store).await
    }

    async fn start_full(metrics: Arc<tollgate::metrics::Metrics>, config: Config, store: Arc<dyn Store>) -> Self {
        // TOLLGATE_TEST_LOG=debug shows the server's logs in failing tests.
        if let Ok(filter) = std::env::var("TOLLGATE_TEST_LOG") {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        }
        let grpc_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc, http) = (grpc_l.local_addr().unwrap(), http_l.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let (handle_tx, handle_rx) = oneshot::channel();
        let task = tokio::spawn(server::run(
            metrics,
            Arc::new(config),
            store.clone(),
            Listeners { grpc: grpc_l, http: http_l },
            async move {
                let _ = stopped.await;
            },
            move |h| {
                let _ = handle_tx.send(h);
            },
        ));
        let handle = handle_rx.await.expect("server started");
        let server = Self { grpc, http, handle, store, stop: Some(stop), task };
        server.wait_ready().await;
        server
    }

    /// Waits until `/readyz` answers 200 (bounded).
    pub async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Ok((200, _, _)) = http_get(self.http, "/readyz").await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("tollgate did not become ready");
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc)).unwrap().connect().await.unwrap()
    }

    pub async fn client(&self) -> AuthorizationClient<Channel> {
        AuthorizationClient::new(self.channel().await)
    }

    /// Sends one Check.
    pub async fn check(&self, req: CheckRequest) -> CheckResponse {
        self.client().await.check(req).await.expect("Check RPC succeeds").into_inner()
    }

    /// Begins shutdown and waits for the server to exit.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task).await.expect("server exits").unwrap().unwrap();
    }

    /// Begins shutdown without waiting.
    pub fn begin_stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Polls `f` every 10 ms until it holds; fails the test after `within`.
pub async fn eventually(what: &str, within: Duration, mut f: impl AsyncFnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f().await {
        assert!(start.elapsed() < within, "{what} did not happen within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A CheckRequest for an HTTP request.
pub fn http_check(method: &str, path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain([(":authority".to_string(), "api.example.com".to_string()), (":method".to_string(), method.to_string())])
        .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    id: "req-1".into(),
                    method: method.into(),
                    path: path.into(),
                    host: "api.example.com".into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// Adds a verified JWT payload to a CheckRequest's metadata, as jwt_authn + ext_authz forward it.
pub fn with_jwt(mut req: CheckRequest, claims: &[(&str, &str)]) -> CheckRequest {
    let payload = Struct {
        fields: claims
            .iter()
            .map(|(k, v)| (k.to_string(), Value { kind: Some(Kind::StringValue(v.to_string())) }))
            .collect(),
    };
    let ns = Struct {
        fields: [("jwt_payload".to_string(), Value { kind: Some(Kind::StructValue(payload)) })].into_iter().collect(),
    };
    let attrs = req.attributes.as_mut().unwrap();
    attrs.metadata_context = Some(Metadata {
        filter_metadata: [("envoy.filters.http.jwt_authn".to_string(), ns)].into_iter().collect(),
        ..Default::default()
    });
    req
}

/// What a CheckResponse says, flattened for assertions.
#[derive(Debug)]
pub struct Answer {
    pub rpc_code: i32,
    pub allowed: bool,
    pub http_status: u16,
    pub body: serde_json::Value,
    pub raw_body: String,
    /// Deny: headers to the client. Allow: `response_headers_to_add`.
    pub client_headers: HashMap<String, String>,
    pub upstream_headers: HashMap<String, String>,
    pub upstream_remove: Vec<String>,
    pub metadata: HashMap<String, String>,
}

impl Answer {
    pub fn of(r: &CheckResponse) -> Self {
        let rpc_code = r.status.as_ref().map_or(0, |s| s.code);
        let metadata = r
            .dynamic_metadata
            .as_ref()
            .map(|m| {
                m.fields
                    .iter()
                    .filter_map(|(k, v)| match &v.kind {
                        Some(Kind::StringValue(s)) => Some((k.clone(), s.clone())),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let hv = |h: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption]| -> HashMap<String, String> {
            h.iter().filter_map(|o| o.header.as_ref()).map(|h| (h.key.clone(), h.value.clone())).collect()
        };
        match &r.http_response {
            Some(HttpResponse::DeniedResponse(d)) => Answer {
                rpc_code,
                allowed: false,
                http_status: d.status.as_ref().map_or(0, |s| s.code as u16),
                body: serde_json::from_str(&d.body).unwrap_or(serde_json::Value::Null),
                raw_body: d.body.clone(),
                client_headers: hv(&d.headers),
                upstream_headers: HashMap::new(),
                upstream_remove: vec![],
                metadata,
            },
            Some(HttpResponse::OkResponse(ok)) => Answer {
                rpc_code,
                allowed: true,
                http_status: 200,
                body: serde_json::Value::Null,
                raw_body: String::new(),
                client_headers: hv(&ok.response_headers_to_add),
                upstream_headers: hv(&ok.headers),
                upstream_remove: ok.headers_to_remove.clone(),
                metadata,
            },
            other => panic!("unexpected http_response {other:?}"),
        }
    }

    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

/// A minimal HTTP/1.1 GET over loopback: (status, headers, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, head.to_string(), body.to_string()))
}

/// RFC 3339 timestamp `offset` from now.
pub fn ago(offset: chrono::Duration) -> String {
    (chrono::Utc::now() - offset).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The config most tests use: the spec's example shape, on the memory store.
pub fn spec_config() -> String {
    format!(
        r#"
billing:
  portal_url: "https://billing.example.com/accounts/{{account}}/billing"
  grace_period: 72h
identity:
  - api_key: {{ header: x-api-key }}
  - api_key: {{ header: authorization, scheme: Bearer }}
  - jwt_claim: {{ namespace: envoy.filters.http.jwt_authn, field: jwt_payload, claim: org_id }}
  - trusted_header: {{ header: x-account-id }}
plans:
  free:
    features: [search]
    quotas:
      - {{ meter: requests, limit: 5, period: month }}
      - {{ meter: requests, limit: 100, per: 1s }}
  tiny_rate:
    features: [search]
    quotas:
      - {{ meter: requests, limit: 1000, period: month }}
      - {{ meter: requests, limit: 2, per: 1h }}
  pro:
    features: [search, export, ai]
    quotas:
      - {{ meter: requests, limit: 1000000, period: month }}
  payg:
    features: [search, ai]
    prepaid: true
routes:
  - {{ match: {{ path_prefix: /public }}, public: true }}
  - {{ match: {{ path_prefix: /v1/search, methods: [GET] }}, feature: search, meter: requests, cost: 1 }}
  - {{ match: {{ path_prefix: /v1/ai }}, feature: ai, meter: requests, cost: 10 }}
default: deny
accounts:
  - {{ id: acct_free, plan: free, api_keys: [free-key] }}
  - {{ id: acct_rate, plan: tiny_rate, api_keys: [rate-key] }}
  - {{ id: acct_pro, plan: pro, api_keys: [pro-key] }}
  - {{ id: acct_grace, plan: pro, api_keys: [grace-key], status: past_due, past_due_since: {grace} }}
  - {{ id: acct_late, plan: pro, api_keys: [late-key], status: past_due, past_due_since: {late} }}
  - {{ id: acct_canceled, plan: pro, api_keys: [canceled-key], status: canceled }}
  - {{ id: acct_wallet, plan: payg, api_keys: [wallet-key], credits: 15 }}
  - {{ id: acct_banned, plan: pro, api_keys: [banned-key], blocked: true }}
problems:
  type_base: "https://docs.example.com/problems/"
"#,
        grace = ago(chrono::Duration::hours(1)),
        late = ago(chrono::Duration::hours(73)),
    )
}
