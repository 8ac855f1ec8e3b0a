//! Process settings: how this replica listens, whom it lets in, how it reaches
//! its store and how much it caches (ratelimit's `settings/`, kept apart from
//! the billing rules in `policy`).
//!
//! Plain validated values; may use [`super::secrets`] (the redacted token
//! lists) and nothing else of ours.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::secrets::Secrets;

/// Where the store lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// In-process; seeded from `accounts:`; for demos, tests and single replicas.
    #[default]
    Memory,
    /// Redis or Redis Cluster; shared by all replicas.
    Redis,
}

/// How the Redis store counts calendar (`period:`) quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Counting {
    /// Every allowed Check spends in Redis: one round trip each.
    #[default]
    Exact,
    /// Replicas take blocks of units from Redis and spend them locally
    /// (`store::lease`); never over a limit, under-use bounded.
    Lease,
}

/// `store.lease:`: the lease mode's knobs (see `store::lease` for what they bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The largest block one replica takes at once.
    pub max_block: u64,
    /// How many replicas share an account's traffic, roughly: a block is at
    /// most `free / (2 · replicas)`, so blocks shrink to 1 near the limit.
    pub replicas: u64,
    /// A lease unused this long goes back to Redis; a "known exhausted" mark
    /// is re-checked after this long.
    pub idle: Duration,
    /// The most accounts one replica holds leases for; past it, spends are exact.
    pub max_accounts: usize,
    /// How long a lease may be spent from after a take (Redis time); renewed
    /// at half of it. Bounds how long an expired record can be counted.
    pub lifetime: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            max_block: 100,
            replicas: 4,
            idle: Duration::from_secs(2),
            max_accounts: 100_000,
            lifetime: Duration::from_secs(30),
        }
    }
}

/// What a Check gets when the store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// 503 `store_unavailable` problem body (fail closed).
    #[default]
    Deny,
    /// Allowed, marked by a header and a metric (fail open).
    Allow,
    /// The Check RPC fails with UNAVAILABLE, so Envoy's `failure_mode_allow` decides.
    Error,
}

/// A store URL whose `Debug` and `Display` hide the password.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct StoreUrl(pub String);

impl StoreUrl {
    /// The URL with any `user:password@` reduced to `user:***@`.
    pub fn redacted(&self) -> String {
        let s = &self.0;
        let Some(scheme_end) = s.find("://").map(|i| i + 3) else { return s.clone() };
        let rest = &s[scheme_end..];
        match rest.rfind('@') {
            Some(at) => {
                let user = rest[..at].split(':').next().unwrap_or("");
                format!("{}{}:***{}", &s[..scheme_end], user, &rest[at..])
            }
            None => s.clone(),
        }
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreUrl({})", self.redacted())
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Who may call the read-only RPCs of `tollgate.v1` (GetEntitlement, ListApiKeys, GetUsage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReadAccess {
    /// Anyone who can reach the gRPC port.
    Open,
    /// Only callers with an admin token.
    #[default]
    Token,
}

/// Which Check answers carry Envoy dynamic metadata (`server.dynamic_metadata`).
/// Envoy spends a few µs per request taking a metadata Struct in and
/// formatting it into the access log; on a plain allow the upstream already
/// gets the account and plan as `x-tollgate-*` request headers, which the
/// access log can print instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DynamicMetadata {
    /// Every answer carries account, plan and decision (SPEC §5).
    #[default]
    Full,
    /// A plain allow (`allowed`, `public`; no shadow code, no charge)
    /// carries none; every other answer carries it all.
    Lean,
}

/// Which of tollgate's own `x-tollgate-*` request headers an allow asks the
/// proxy to remove (`server.remove_own_headers`). A client's forged copy
/// must never reach the upstream, but a proxy may not show it to tollgate
/// (Envoy's `allowed_headers`), so unless the proxy says it does, an allow
/// removes every one it does not set; each removal costs Envoy a scan of
/// the request's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RemoveOwnHeaders {
    /// `seen` on a Check whose proxy says it shows tollgate every
    /// `x-tollgate-*` header or removes them first (the
    /// [`OWN_HEADERS_SHOWN`] gRPC metadata, which the shipped Envoy configs
    /// send), `always` on every other.
    #[default]
    Auto,
    /// Every own header the answer does not set, seen or not.
    Always,
    /// Those the Check request carried, and `x-tollgate-account`/`-plan`
    /// (routes match on them: see `problem::ROUTED_HEADERS`): for a proxy
    /// that shows tollgate every `x-tollgate-*` header or strips them itself
    /// (the shipped Envoy configs do both).
    Seen,
}

/// The gRPC metadata (name, value) by which a proxy says, on every Check,
/// that it shows tollgate every `x-tollgate-*` header a client sends or
/// removes them before the Check (Envoy's ext_authz `initial_metadata`).
/// It rides on the proxy's own call, never in the client's request, so a
/// client cannot send it; see [`RemoveOwnHeaders::Auto`].
pub const OWN_HEADERS_SHOWN: (&str, &str) = ("tollgate-own-headers", "shown");

/// Who may assert an identity on a Check (`server.trusted_callers`): JWT
/// claims from Envoy's metadata and trusted headers are the caller's word,
/// and anyone who reaches the gRPC port can send a Check with forged ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TrustedCallers {
    /// Only peers with a client certificate the server verified (`server.tls.client_ca`).
    #[default]
    Mtls,
    /// Any caller: the operator vouches that only the proxy reaches the port
    /// (a NetworkPolicy, a loopback-only listener).
    Any,
    /// Nobody: asserted identities are never honoured.
    None,
}

/// `server.tls`: PEM files read at load, so a missing file fails before binding.
#[derive(Clone)]
pub struct TlsConfig {
    /// Server certificate chain (PEM).
    pub cert: Vec<u8>,
    /// Server private key (PEM).
    pub key: Vec<u8>,
    /// CA that client certificates must chain to; set for mTLS.
    pub client_ca: Option<Vec<u8>>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig").field("mtls", &self.client_ca.is_some()).finish_non_exhaustive()
    }
}

/// `server.limits:`: bounds on what a caller can make a replica hold, on both ports.
///
/// Defaults fit a Check (Envoy sends no body; headers are capped by Envoy at
/// 60 KiB) with room to spare, and keep one replica far below a 256 MiB pod
/// limit under a flood of unfinished streams or silent connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// HTTP/2 streams one gRPC connection may have open at once (advertised in SETTINGS).
    pub max_concurrent_streams: u32,
    /// Largest gRPC message accepted (decoded), in bytes.
    pub max_message_bytes: usize,
    /// Largest HTTP/2 header list (gRPC metadata) accepted, in bytes.
    pub max_header_list_bytes: u32,
    /// Open connections per port; further ones are closed at once.
    pub max_connections: usize,
    /// How long a new connection may take to finish its TLS handshake and
    /// send its first request headers (HTTP/1) or HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// Upper bound on one request (a gRPC call, an HTTP request).
    pub request_timeout: Duration,
    /// HTTP/2 keepalive ping interval on the gRPC port.
    pub keepalive_interval: Duration,
    /// After this, a gRPC connection is asked to go away (GOAWAY; in-flight
    /// calls get `request_timeout` to finish): idle or long-lived connections,
    /// and streams such as health `Watch`, cannot hold slots forever.
    pub max_connection_age: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Largest HTTP request body (webhooks), in bytes.
    pub max_body_bytes: usize,
    /// Requests in flight at once per port, over all connections; more are
    /// refused at once (gRPC RESOURCE_EXHAUSTED, HTTP 503). Bounds the message
    /// buffers a replica holds (`max_inflight_requests × max_message_bytes`).
    pub max_inflight_requests: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 128,
            max_message_bytes: 256 * 1024,
            max_header_list_bytes: 64 * 1024,
            max_connections: 2048,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(15),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(600),
            max_body_bytes: 1024 * 1024,
            max_inflight_requests: 256,
        }
    }
}

/// `server:`: listeners and admin credentials.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// ext_authz, health and `tollgate.v1`.
    pub grpc_listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`, webhooks.
    pub http_listen: SocketAddr,
    /// The HTTP authorization door (Envoy HTTP ext_authz, Traefik ForwardAuth); `None`: off.
    pub authz_http_listen: Option<SocketAddr>,
    /// Environment variable holding comma-separated admin tokens.
    pub admin_tokens_env: String,
    /// Admin tokens: `server.admin_tokens` plus those in `admin_tokens_env`, read at (re)load.
    pub admin_tokens: Secrets,
    /// Environment variable holding comma-separated service tokens.
    pub service_tokens_env: String,
    /// Service tokens: may call `Authorize` by account id or with spending,
    /// nothing else. `server.service_tokens` plus those in `service_tokens_env`.
    pub service_tokens: Secrets,
    /// Who may call the read-only internal RPCs.
    pub read_access: ReadAccess,
    /// Who may assert identity (JWT metadata, trusted headers) on a Check.
    pub trusted_callers: TrustedCallers,
    /// Which Check answers carry Envoy dynamic metadata; reloadable.
    pub dynamic_metadata: DynamicMetadata,
    /// Which own headers an allow removes when it does not set them; reloadable.
    pub remove_own_headers: RemoveOwnHeaders,
    /// TLS (and mTLS) on the gRPC port.
    pub tls: Option<TlsConfig>,
    /// Re-read the config file when it changes (polled every 2 s), besides SIGHUP.
    pub watch_config: bool,
    /// Serve gRPC server reflection (`grpc.reflection.v1`/`v1alpha`); fixed at start.
    pub reflection: bool,
    /// After SIGTERM, how long health reports NOT_SERVING before listeners close,
    /// so load balancers stop sending first.
    pub drain_delay: Duration,
    /// Upper bound on waiting for in-flight requests after the listeners close.
    pub drain_timeout: Duration,
    /// Connection, stream, message and time bounds on both ports.
    pub limits: Limits,
}

/// `store:`.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Memory or Redis.
    pub backend: Backend,
    /// Redis URL (ignored by the memory store).
    pub url: StoreUrl,
    /// Fail closed, open, or to Envoy.
    pub on_error: OnError,
    /// Per store call.
    pub timeout: Duration,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// Exact (a Redis call per allowed Check) or lease counting.
    pub counting: Counting,
    /// Lease mode's knobs (defaults when `counting` is `exact`).
    pub lease: LeaseConfig,
}

/// `cache:`.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Entitlement cache lifetime.
    pub ttl: Duration,
    /// Lifetime of "no such API key" answers.
    pub negative_ttl: Duration,
    /// Upper bound on the cache's memory, in bytes (entries are weighed by size).
    pub max_bytes: u64,
}

/// `tracing:`: OpenTelemetry traces over OTLP/gRPC (see `telemetry`). Fixed at start.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// The collector (`http://otel-collector:4317`); `None`: the standard
    /// `OTEL_EXPORTER_OTLP_*` variables decide, and without them tracing is off.
    pub otlp_endpoint: Option<String>,
    /// Root spans sampled at this ratio (0–1); a parent's sampled flag is
    /// followed. `None`: the SDK's default (`OTEL_TRACES_SAMPLER`, else parent-based always-on).
    pub sample_ratio: Option<f64>,
    /// The `service.name` resource (`OTEL_SERVICE_NAME` wins).
    pub service_name: String,
    /// Ended spans waiting for export; beyond it they are dropped and counted.
    pub queue_size: usize,
    /// Bound on one export call.
    pub export_timeout: Duration,
}
