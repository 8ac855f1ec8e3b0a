//! tollgate in this process: `server::run` on listeners bound to
//! `127.0.0.1:0`, with a oneshot to begin shutdown — the one in-process start
//! that tests and benches share.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tollgate::accounts::Accounts;
use tollgate::config::Config;
use tollgate::metrics::Metrics;
use tollgate::server::{self, Handle, Listeners};
use tollgate::store::{self, MemoryStore, Store};
use tonic::transport::Channel;

use crate::process::becomes_ready;

/// A plaintext HTTP/2 channel to a gRPC address.
pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect")
}

/// A tollgate running in this process.
pub struct TestServer {
    /// The gRPC port (ext_authz, `tollgate.v1`, health).
    pub grpc: SocketAddr,
    /// The HTTP port (`/readyz`, `/metrics`, webhooks).
    pub http: SocketAddr,
    /// What `server::run` handed out at start (the authorizer, for reloads).
    pub handle: Handle,
    /// The store it serves from.
    pub store: Arc<dyn Store>,
    /// Sends the shutdown signal; taken by the first stop.
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

    /// Starts on the store the config names (Redis behind the cache, its
    /// lookups counted in the metrics as `main` counts them), seeding it from
    /// the config's accounts when `seed` is set.
    pub async fn start_configured(yaml: &str, seed: bool) -> Self {
        let config = Config::parse(yaml, "test.yaml").expect("test config is valid");
        let metrics = Arc::new(Metrics::new());
        let store = store::open(&config.store, &config.cache, metrics.cache_observer()).expect("open store");
        if seed {
            Accounts::seed(store.as_ref(), &config.accounts, &config.policy.plans).await.expect("seed");
        }
        Self::start_full(metrics, config, store).await
    }

    /// Starts over a given store.
    pub async fn start_with(config: Config, store: Arc<dyn Store>) -> Self {
        Self::start_full(Arc::new(Metrics::new()), config, store).await
    }

    async fn start_full(metrics: Arc<Metrics>, config: Config, store: Arc<dyn Store>) -> Self {
        let grpc_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(metrics, config, store, grpc_l, http_l).await
    }

    /// Stops this server and starts another on the same addresses, with
    /// `yaml` and the store it names (Redis: a new connection, cache and key
    /// fetch, as a restarted process has; memory: `store`, kept, as no
    /// process restart could), its metrics starting from zero.
    pub async fn restart(self, yaml: &str, store: Option<Arc<dyn Store>>) -> Self {
        let (grpc, http) = (self.grpc, self.http);
        self.stop().await;
        let config = Config::parse(yaml, "test.yaml").expect("test config is valid");
        let metrics = Arc::new(Metrics::new());
        let store = match store {
            Some(s) => s,
            None => store::open(&config.store, &config.cache, metrics.cache_observer()).expect("open store"),
        };
        let grpc_l = TcpListener::bind(grpc).await.expect("rebind the gRPC address");
        let http_l = TcpListener::bind(http).await.expect("rebind the HTTP address");
        Self::start_on(metrics, config, store, grpc_l, http_l).await
    }

    async fn start_on(
        metrics: Arc<Metrics>,
        config: Config,
        store: Arc<dyn Store>,
        grpc_l: TcpListener,
        http_l: TcpListener,
    ) -> Self {
        // TOLLGATE_TEST_LOG=debug shows the server's logs in failing tests.
        if let Ok(filter) = std::env::var("TOLLGATE_TEST_LOG") {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        }
        let (grpc, http) = (grpc_l.local_addr().unwrap(), http_l.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let (handle_tx, handle_rx) = oneshot::channel();
        // The HTTP authorization door, when the config names an address (tests pick a free one).
        let authz_http = match config.server.authz_http_listen {
            Some(a) => Some(TcpListener::bind(a).await.expect("bind server.authz_http_listen")),
            None => None,
        };
        let task = tokio::spawn(server::run(
            metrics,
            Arc::new(config),
            store.clone(),
            Listeners { grpc: grpc_l, http: http_l, authz_http },
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
        assert!(becomes_ready(self.http, Duration::from_secs(5)).await, "tollgate did not become ready");
    }

    /// A new channel to the gRPC port.
    pub async fn channel(&self) -> Channel {
        channel(self.grpc).await
    }

    /// An ext_authz client on a new channel.
    pub async fn client(&self) -> AuthorizationClient<Channel> {
        AuthorizationClient::new(self.channel().await)
    }

    /// Sends one Check.
    pub async fn check(&self, req: CheckRequest) -> CheckResponse {
        self.client().await.check(req).await.expect("Check RPC succeeds").into_inner()
    }

    /// Begins shutdown and waits for the server to exit.
    pub async fn stop(mut self) {
        self.begin_stop();
        tokio::time::timeout(Duration::from_secs(10), &mut self.task).await.expect("server exits").unwrap().unwrap();
    }

    /// Begins shutdown without waiting.
    pub fn begin_stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}
