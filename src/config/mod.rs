//! The YAML config of SPEC §3: parsed strictly, validated whole, then turned
//! into the domain types the rest of the server uses.
//!
//! Every error names the field path (`plans.free.quotas[0].limit`) and the
//! reason; YAML syntax and type errors also name the line. Validation runs
//! before anything binds, so a bad config exits before serving a request.
//! Depends on the domain modules (`entitlement`, `route`, `identity`,
//! `decision`), never on the store or the transports.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::decision::{Code, Policy, Unmatched};
use crate::entitlement::{Account, MAX_WINDOW, Period, Plan, Quota, Status, Window};
use crate::identity::IdentitySource;
use crate::route::{Route, RouteMatch, RouteTable};
use crate::usage::{MAX_COST, MAX_CREDITS, MAX_LIMIT};

/// The config `cargo run` uses when no `--config` is given: memory store, demo accounts.
pub const DEMO_CONFIG: &str = include_str!("../../config/demo.yaml");

/// A config that could not be loaded; the message names the place and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The path as given.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// YAML syntax or shape error (unknown field, wrong type, bad duration).
    #[error("{file}: {location}{path}: {reason}")]
    Parse {
        /// The path as given.
        file: String,
        /// `line L column C: ` where the parser knows it, else empty.
        location: String,
        /// Field path, e.g. `plans.free.quotas[0]`.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The YAML parsed but a value breaks a rule (unknown plan, zero limit, duplicate key).
    #[error("{file}: {path}: {reason}")]
    Invalid {
        /// The path as given.
        file: String,
        /// Field path.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

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

/// Secrets that must never print: admin tokens, webhook signing secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(pub Vec<String>);

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} redacted>", self.0.len())
    }
}

impl Secrets {
    /// The comma-separated values of environment variable `var` (none when unset).
    pub fn from_env(var: &str) -> Self {
        let raw = std::env::var(var).unwrap_or_default();
        Self(raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
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

/// The placeholder admin token once shipped in `deploy/k8s`; refused at load.
pub const PLACEHOLDER_TOKEN: &str = "change-me-to-a-long-random-token";

/// The shortest admin or service token accepted: 32 characters (e.g. `openssl rand -hex 32` gives 64).
pub const MIN_TOKEN_CHARS: usize = 32;

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
    /// TLS (and mTLS) on the gRPC port.
    pub tls: Option<TlsConfig>,
    /// Re-read the config file when it changes (polled every 2 s), besides SIGHUP.
    pub watch_config: bool,
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

/// `billing.stripe:`.
#[derive(Debug, Clone)]
pub struct StripeConfig {
    /// Environment variable with comma-separated signing secrets.
    pub webhook_secrets_env: String,
    /// Signing secrets: `webhook_secrets` plus those in `webhook_secrets_env`, read at (re)load.
    pub webhook_secrets: Secrets,
    /// Maximum age of a signed event.
    pub tolerance: Duration,
    /// `customer`, or `metadata:<key>` on the subscription.
    pub account_from: String,
    /// Stripe price id → plan name.
    pub prices: BTreeMap<String, String>,
    /// Stripe entitlement feature lookup key → tollgate feature (unmapped keys are used as-is).
    pub features: BTreeMap<String, String>,
}

/// `billing:`.
#[derive(Debug, Clone)]
pub struct BillingConfig {
    /// Billing portal; `{account}` is replaced by the account id.
    pub portal_url: Option<String>,
    /// Stripe webhook settings.
    pub stripe: Option<StripeConfig>,
}

impl BillingConfig {
    /// The portal link for `account`, if a portal is configured.
    pub fn portal_for(&self, account: &str) -> Option<String> {
        self.portal_url.as_ref().map(|u| u.replace("{account}", account))
    }
}

/// A per-code override of a problem body's texts; `{placeholders}` are filled in.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProblemOverride {
    /// Replaces the title.
    pub title: Option<String>,
    /// Replaces the detail.
    pub detail: Option<String>,
    /// Replaces the link (and the `Link` header).
    pub link: Option<String>,
}

/// `problems:`.
#[derive(Debug, Clone)]
pub struct ProblemsConfig {
    /// The `type` URI is this plus the code in kebab case.
    pub type_base: String,
    /// Per-code overrides.
    pub overrides: HashMap<Code, ProblemOverride>,
}

/// An account from `accounts:` with its secrets and balance, for seeding a store.
#[derive(Clone, PartialEq, Eq)]
pub struct SeedAccount {
    /// The entitlement.
    pub account: Account,
    /// Plain API keys; hashed before they reach any store.
    pub api_keys: Vec<String>,
    /// Initial prepaid credits.
    pub credits: u64,
}

impl fmt::Debug for SeedAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeedAccount")
            .field("account", &self.account)
            .field("api_keys", &format_args!("<{} redacted>", self.api_keys.len()))
            .field("credits", &self.credits)
            .finish()
    }
}

/// A validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listeners.
    pub server: ServerConfig,
    /// Store.
    pub store: StoreConfig,
    /// Cache.
    pub cache: CacheConfig,
    /// Identity sources in order.
    pub identity: Vec<IdentitySource>,
    /// Billing links and provider.
    pub billing: BillingConfig,
    /// Plans, grace period and the unmatched-route rule.
    pub policy: Policy,
    /// Route table.
    pub routes: RouteTable,
    /// What Checks without HTTP attributes get (Istio's network-level filter sends those).
    pub non_http: Unmatched,
    /// Seed accounts.
    pub accounts: Vec<SeedAccount>,
    /// Problem body settings.
    pub problems: ProblemsConfig,
}

impl Config {
    /// Things that are valid but probably not what the operator meant, one
    /// line each: logged at start and reload, printed by `check-config`.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (shadowed, by) in self.routes.shadowed() {
            let r = &self.routes.routes()[shadowed];
            let e = &self.routes.routes()[by];
            out.push(format!(
                "routes[{shadowed}] ({}) is never used: routes[{by}] ({}) matches every request it matches",
                r.name, e.name
            ));
        }
        let asserted: Vec<String> = self
            .identity
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_asserted())
            .map(|(i, _)| format!("identity[{i}]"))
            .collect();
        if !asserted.is_empty() {
            let sources = asserted.join(", ");
            match self.server.trusted_callers {
                TrustedCallers::Mtls if self.server.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) => {
                    out.push(format!(
                        "{sources}: ignored on every Check: server.trusted_callers is mtls but server.tls.client_ca \
                         is not set (set it, or trusted_callers: any behind a NetworkPolicy)"
                    ));
                }
                TrustedCallers::Any => out.push(format!(
                    "{sources}: honoured from any caller of the gRPC port (server.trusted_callers: any); \
                     make sure only the proxy can reach it"
                )),
                TrustedCallers::None => out.push(format!("{sources}: ignored (server.trusted_callers: none)")),
                TrustedCallers::Mtls => {}
            }
        }
        out
    }
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: file.clone(), source })?;
        Self::parse(&text, &file)
    }

    /// Parses and validates YAML text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let raw: raw::Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let location =
                inner.location().map(|l| format!("line {} column {}: ", l.line(), l.column())).unwrap_or_default();
            let reason = strip_location(&inner.to_string());
            // serde_yaml prefixes its own (coarser) path; ours is the one printed.
            let reason = match reason.split_once(": ") {
                Some((head, rest)) if !head.contains(char::is_whitespace) => rest.to_owned(),
                _ => reason,
            };
            ConfigError::Parse { file: file.to_owned(), location, path, reason }
        })?;
        raw.validate().map_err(|(path, reason)| ConfigError::Invalid { file: file.to_owned(), path, reason })
    }

    /// A one-screen summary for `check-config`.
    pub fn summary(&self) -> String {
        let mut plans: Vec<&Plan> = self.policy.plans.values().collect();
        plans.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out = format!(
            "store: {:?} {}\nlisten: grpc {} http {}\nplans ({}):\n",
            self.store.backend,
            if self.store.backend == Backend::Redis { self.store.url.redacted() } else { String::new() },
            self.server.grpc_listen,
            self.server.http_listen,
            plans.len()
        );
        for p in plans {
            let quotas: Vec<String> = p.quotas.iter().map(|q| format!("{}={}", q.policy_name(), q.limit)).collect();
            let features: Vec<&str> = p.features.iter().map(String::as_str).collect();
            out += &format!(
                "  {}: features [{}] quotas [{}]{}\n",
                p.name,
                features.join(", "),
                quotas.join(", "),
                if p.prepaid { " prepaid" } else { "" }
            );
        }
        out += &format!("routes ({}):\n", self.routes.routes().len());
        for r in self.routes.routes() {
            let what = if r.public {
                "public".to_owned()
            } else {
                format!(
                    "feature {} meter {} cost {}",
                    r.feature.as_deref().unwrap_or("-"),
                    r.meter.as_deref().unwrap_or("-"),
                    r.cost
                )
            };
            let methods = if r.matcher.methods.is_empty() { "ANY".to_owned() } else { r.matcher.methods.join(",") };
            out += &format!("  [{}] {} {}: {}\n", r.index, methods, r.name, what);
        }
        out += &format!("default: {:?}\naccounts: {}\n", self.policy.unmatched, self.accounts.len());
        out
    }
}

/// serde_yaml puts "at line L column C" in its messages; we print the location once, up front.
fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

/// Parses `72h`, `50ms`, `1s`, `1m30s` (humantime syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e} (use e.g. 50ms, 30s, 72h)"))
}

/// The YAML shapes, exactly as written; turned into [`Config`] by `validate`.
mod raw {
    use super::*;

    fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map_err(serde::de::Error::custom)
    }

    fn opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        duration(d).map(Some)
    }

    type Invalid = (String, String);

    fn invalid(path: impl Into<String>, reason: impl Into<String>) -> Invalid {
        (path.into(), reason.into())
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Config {
        #[serde(default)]
        server: Server,
        #[serde(default)]
        store: Store,
        #[serde(default)]
        cache: Cache,
        identity: Option<Vec<Identity>>,
        #[serde(default)]
        billing: Billing,
        #[serde(default)]
        plans: BTreeMap<String, PlanDef>,
        #[serde(default)]
        routes: Vec<RouteDef>,
        #[serde(default)]
        default: Unmatched2,
        #[serde(default)]
        non_http: Unmatched2,
        #[serde(default)]
        accounts: Vec<AccountDef>,
        #[serde(default)]
        problems: Problems,
    }

    #[derive(Deserialize, Default, Clone, Copy)]
    #[serde(rename_all = "snake_case")]
    enum Unmatched2 {
        #[default]
        Deny,
        Allow,
    }

    impl From<Unmatched2> for Unmatched {
        fn from(u: Unmatched2) -> Self {
            match u {
                Unmatched2::Deny => Unmatched::Deny,
                Unmatched2::Allow => Unmatched::Allow,
            }
        }
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Server {
        grpc_listen: Option<String>,
        http_listen: Option<String>,
        admin_tokens_env: Option<String>,
        #[serde(default)]
        admin_tokens: Vec<String>,
        service_tokens_env: Option<String>,
        #[serde(default)]
        service_tokens: Vec<String>,
        #[serde(default)]
        read_access: ReadAccess,
        #[serde(default)]
        trusted_callers: TrustedCallers,
        tls: Option<Tls>,
        #[serde(default)]
        watch_config: bool,
        #[serde(default, deserialize_with = "opt_duration")]
        drain_delay: Option<Duration>,
        #[serde(default, deserialize_with = "opt_duration")]
        drain_timeout: Option<Duration>,
        #[serde(default)]
        limits: LimitsDef,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct LimitsDef {
        max_concurrent_streams: Option<u32>,
        max_message_bytes: Option<usize>,
        max_header_list_bytes: Option<u32>,
        max_connections: Option<usize>,
        #[serde(default, deserialize_with = "opt_duration")]
        handshake_timeout: Option<Duration>,
        #[serde(default, deserialize_with = "opt_duration")]
        request_timeout: Option<Duration>,
        #[serde(default, deserialize_with = "opt_duration")]
        keepalive_interval: Option<Duration>,
        #[serde(default, deserialize_with = "opt_duration")]
        keepalive_timeout: Option<Duration>,
        #[serde(default, deserialize_with = "opt_duration")]
        max_connection_age: Option<Duration>,
        max_body_bytes: Option<usize>,
        max_inflight_requests: Option<usize>,
    }

    /// A bounded setting, shown in errors as it is written in YAML.
    trait Bounded: PartialOrd + Copy {
        fn show(self) -> String;
    }

    macro_rules! bounded_number {
        ($($t:ty),*) => { $(impl Bounded for $t { fn show(self) -> String { self.to_string() } })* };
    }
    bounded_number!(u32, u64, usize);

    impl Bounded for Duration {
        fn show(self) -> String {
            humantime::format_duration(self).to_string()
        }
    }

    /// `value` (or `default`) if it lies in `min..=max`.
    fn bounded<T: Bounded>(value: Option<T>, default: T, min: T, max: T, path: &str) -> Result<T, Invalid> {
        let v = value.unwrap_or(default);
        if v < min || v > max {
            return Err(invalid(path, format!("must be between {} and {}, got {}", min.show(), max.show(), v.show())));
        }
        Ok(v)
    }

    impl LimitsDef {
        fn validate(&self) -> Result<Limits, Invalid> {
            let d = Limits::default();
            let p = |f: &str| format!("server.limits.{f}");
            let (ms, hour) = (Duration::from_millis(1), Duration::from_secs(3600));
            Ok(Limits {
                max_concurrent_streams: bounded(
                    self.max_concurrent_streams,
                    d.max_concurrent_streams,
                    1,
                    65_536,
                    &p("max_concurrent_streams"),
                )?,
                max_message_bytes: bounded(
                    self.max_message_bytes,
                    d.max_message_bytes,
                    1024,
                    16 << 20,
                    &p("max_message_bytes"),
                )?,
                max_header_list_bytes: bounded(
                    self.max_header_list_bytes,
                    d.max_header_list_bytes,
                    1024,
                    1 << 20,
                    &p("max_header_list_bytes"),
                )?,
                max_connections: bounded(self.max_connections, d.max_connections, 1, 1 << 20, &p("max_connections"))?,
                handshake_timeout: bounded(
                    self.handshake_timeout,
                    d.handshake_timeout,
                    ms,
                    hour,
                    &p("handshake_timeout"),
                )?,
                request_timeout: bounded(self.request_timeout, d.request_timeout, ms, hour, &p("request_timeout"))?,
                keepalive_interval: bounded(
                    self.keepalive_interval,
                    d.keepalive_interval,
                    Duration::from_secs(1),
                    hour,
                    &p("keepalive_interval"),
                )?,
                keepalive_timeout: bounded(
                    self.keepalive_timeout,
                    d.keepalive_timeout,
                    ms,
                    hour,
                    &p("keepalive_timeout"),
                )?,
                max_connection_age: bounded(
                    self.max_connection_age,
                    d.max_connection_age,
                    Duration::from_secs(1),
                    Duration::from_secs(7 * 24 * 3600),
                    &p("max_connection_age"),
                )?,
                max_body_bytes: bounded(self.max_body_bytes, d.max_body_bytes, 1024, 64 << 20, &p("max_body_bytes"))?,
                max_inflight_requests: bounded(
                    self.max_inflight_requests,
                    d.max_inflight_requests,
                    1,
                    1 << 20,
                    &p("max_inflight_requests"),
                )?,
            })
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Tls {
        cert: String,
        key: String,
        client_ca: Option<String>,
    }

    fn pem(path: &str, field: &str) -> Result<Vec<u8>, Invalid> {
        let bytes = std::fs::read(path).map_err(|e| invalid(field, format!("cannot read {path:?}: {e}")))?;
        if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
            return Err(invalid(field, format!("{path:?} is not a PEM file")));
        }
        Ok(bytes)
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Store {
        #[serde(default)]
        backend: Backend,
        url: Option<String>,
        #[serde(default)]
        on_error: OnError,
        #[serde(default, deserialize_with = "opt_duration")]
        timeout: Option<Duration>,
        key_prefix: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Cache {
        #[serde(default, deserialize_with = "opt_duration")]
        ttl: Option<Duration>,
        #[serde(default, deserialize_with = "opt_duration")]
        negative_ttl: Option<Duration>,
        max_bytes: Option<u64>,
    }

    /// One of the three keys; a struct rather than an enum so YAML needs no tags.
    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Identity {
        api_key: Option<ApiKey>,
        jwt_claim: Option<JwtClaim>,
        trusted_header: Option<TrustedHeader>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ApiKey {
        header: String,
        scheme: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct JwtClaim {
        namespace: String,
        #[serde(default = "default_jwt_field")]
        field: String,
        claim: String,
    }

    fn default_jwt_field() -> String {
        "jwt_payload".to_owned()
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TrustedHeader {
        header: String,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Billing {
        portal_url: Option<String>,
        #[serde(default, deserialize_with = "opt_duration")]
        grace_period: Option<Duration>,
        stripe: Option<Stripe>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Stripe {
        webhook_secrets_env: Option<String>,
        #[serde(default)]
        webhook_secrets: Vec<String>,
        #[serde(default)]
        features: BTreeMap<String, String>,
        #[serde(default, deserialize_with = "opt_duration")]
        tolerance: Option<Duration>,
        account_from: Option<String>,
        #[serde(default)]
        prices: BTreeMap<String, String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct PlanDef {
        #[serde(default)]
        features: Vec<String>,
        #[serde(default)]
        quotas: Vec<QuotaDef>,
        #[serde(default)]
        prepaid: bool,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct QuotaDef {
        meter: String,
        limit: i64,
        period: Option<Period>,
        #[serde(default, deserialize_with = "opt_duration")]
        per: Option<Duration>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RouteDef {
        #[serde(rename = "match")]
        matcher: MatchDef,
        #[serde(default)]
        public: bool,
        feature: Option<String>,
        meter: Option<String>,
        cost: Option<i64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct MatchDef {
        path_prefix: Option<String>,
        string_prefix: Option<String>,
        path: Option<String>,
        #[serde(default)]
        methods: Vec<String>,
        host: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct AccountDef {
        id: String,
        plan: String,
        #[serde(default)]
        api_keys: Vec<String>,
        #[serde(default)]
        status: Status,
        past_due_since: Option<DateTime<Utc>>,
        expires_at: Option<DateTime<Utc>>,
        #[serde(default)]
        blocked: bool,
        #[serde(default)]
        credits: i64,
        #[serde(default)]
        features: Vec<String>,
        #[serde(default)]
        quotas: Vec<QuotaDef>,
        stripe_customer: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Problems {
        type_base: Option<String>,
        #[serde(default)]
        overrides: BTreeMap<String, ProblemOverride>,
    }

    /// The tokens of `listed` plus those in environment variable `env`; each
    /// must be long and not the documented placeholder (never echoed).
    fn tokens(listed: &[String], env: &str, path: &str) -> Result<Secrets, Invalid> {
        let mut all = Secrets::from_env(env);
        let from_env = all.0.len();
        all.0.extend(listed.iter().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()));
        for (i, t) in all.0.iter().enumerate() {
            let place = if i < from_env { format!("{env} (environment), token {}", i + 1) } else { path.to_owned() };
            if t == PLACEHOLDER_TOKEN {
                return Err(invalid(place, "is the documented placeholder; generate one (openssl rand -hex 32)"));
            }
            if t.chars().count() < MIN_TOKEN_CHARS {
                return Err(invalid(place, format!("tokens must be at least {MIN_TOKEN_CHARS} characters")));
            }
            if !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(place, "tokens must be visible ASCII without spaces"));
            }
        }
        Ok(all)
    }

    fn listen(value: &Option<String>, default: &str, path: &str) -> Result<SocketAddr, Invalid> {
        let s = value.as_deref().unwrap_or(default);
        s.parse().map_err(|_| invalid(path, format!("{s:?} is not a socket address (want e.g. 0.0.0.0:9191)")))
    }

    /// A rolling window: 1ms to [`MAX_WINDOW`] (windows are kept in whole milliseconds).
    fn window(d: Duration, path: &str) -> Result<Duration, Invalid> {
        if d > MAX_WINDOW {
            return Err(invalid(path, "must be at most 366d"));
        }
        if !crate::bounds::is_valid_window(d) {
            return Err(invalid(path, "must be at least 1ms"));
        }
        Ok(d)
    }

    /// A date inside what every way in accepts.
    fn date(t: Option<DateTime<Utc>>, path: &str) -> Result<Option<DateTime<Utc>>, Invalid> {
        match t {
            Some(t) if !crate::entitlement::is_valid_time(t) => {
                Err(invalid(path, "must be between 1970-01-01 and 9999-12-31"))
            }
            t => Ok(t),
        }
    }

    /// A plan, meter or feature name: 1-128 bytes, no control characters (names become Redis key parts).
    fn name(value: &str, path: &str) -> Result<(), Invalid> {
        if !crate::bounds::is_valid_name(value) {
            return Err(invalid(
                path,
                format!("must be 1-{} bytes without control characters", crate::bounds::MAX_NAME),
            ));
        }
        Ok(())
    }

    fn positive(d: Duration, path: &str) -> Result<Duration, Invalid> {
        if d.is_zero() { Err(invalid(path, "must be greater than zero")) } else { Ok(d) }
    }

    fn header_name(h: &str, path: &str) -> Result<String, Invalid> {
        let h = h.trim().to_ascii_lowercase();
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if h.is_empty() || !h.bytes().all(token) {
            return Err(invalid(path, format!("{h:?} is not a valid HTTP header name")));
        }
        Ok(h)
    }

    fn account_id(id: &str, path: &str) -> Result<(), Invalid> {
        if !crate::entitlement::is_valid_account_id(id) {
            return Err(invalid(path, format!("{id:?} is not a valid account id (1-128 of A-Z a-z 0-9 _ - . : @)")));
        }
        Ok(())
    }

    fn quotas(defs: &[QuotaDef], path: &str) -> Result<Vec<Quota>, Invalid> {
        let mut out: Vec<Quota> = Vec::with_capacity(defs.len());
        for (i, q) in defs.iter().enumerate() {
            let p = format!("{path}[{i}]");
            if q.meter.trim().is_empty() {
                return Err(invalid(format!("{p}.meter"), "must not be empty"));
            }
            name(&q.meter, &format!("{p}.meter"))?;
            if q.limit < 1 || q.limit as u64 > MAX_LIMIT {
                return Err(invalid(
                    format!("{p}.limit"),
                    format!("must be between 1 and {MAX_LIMIT}, got {}", q.limit),
                ));
            }
            let window = match (q.period, q.per) {
                (Some(period), None) => Window::Calendar(period),
                (None, Some(per)) => Window::Rolling(window(per, &format!("{p}.per"))?),
                (Some(_), Some(_)) => {
                    return Err(invalid(p, "set either period (a paid allowance) or per (a rate limit), not both"));
                }
                (None, None) => return Err(invalid(p, "needs period (minute|hour|day|month) or per (a duration)")),
            };
            let quota = Quota { meter: q.meter.clone(), limit: q.limit as u64, window };
            if out.iter().any(|o| o.meter == quota.meter && o.window == quota.window) {
                return Err(invalid(p, format!("duplicate quota {}", quota.policy_name())));
            }
            out.push(quota);
        }
        Ok(out)
    }

    impl Config {
        pub fn validate(self) -> Result<super::Config, Invalid> {
            let admin_env = self.server.admin_tokens_env.clone().unwrap_or_else(|| "TOLLGATE_ADMIN_TOKENS".into());
            let service_env =
                self.server.service_tokens_env.clone().unwrap_or_else(|| "TOLLGATE_SERVICE_TOKENS".into());
            let server = ServerConfig {
                grpc_listen: listen(&self.server.grpc_listen, "0.0.0.0:9191", "server.grpc_listen")?,
                http_listen: listen(&self.server.http_listen, "0.0.0.0:9090", "server.http_listen")?,
                admin_tokens: tokens(&self.server.admin_tokens, &admin_env, "server.admin_tokens")?,
                admin_tokens_env: admin_env.clone(),
                service_tokens: tokens(&self.server.service_tokens, &service_env, "server.service_tokens")?,
                service_tokens_env: service_env.clone(),
                read_access: self.server.read_access,
                trusted_callers: self.server.trusted_callers,
                tls: match &self.server.tls {
                    None => None,
                    Some(t) => Some(TlsConfig {
                        cert: pem(&t.cert, "server.tls.cert")?,
                        key: pem(&t.key, "server.tls.key")?,
                        client_ca: t.client_ca.as_deref().map(|c| pem(c, "server.tls.client_ca")).transpose()?,
                    }),
                },
                watch_config: self.server.watch_config,
                drain_delay: self.server.drain_delay.unwrap_or(Duration::ZERO),
                drain_timeout: self.server.drain_timeout.unwrap_or(Duration::from_secs(30)),
                limits: self.server.limits.validate()?,
            };

            let url = self.store.url.unwrap_or_default();
            if self.store.backend == Backend::Redis {
                if url.is_empty() {
                    return Err(invalid("store.url", "required when store.backend is redis"));
                }
                let scheme = url.split("://").next().unwrap_or("");
                if !["redis", "rediss", "redis+cluster", "rediss+cluster"].contains(&scheme) || !url.contains("://") {
                    return Err(invalid(
                        "store.url",
                        "must start with redis://, rediss://, redis+cluster:// or rediss+cluster://",
                    ));
                }
            }
            let store = StoreConfig {
                backend: self.store.backend,
                url: StoreUrl(url),
                on_error: self.store.on_error,
                timeout: positive(self.store.timeout.unwrap_or(Duration::from_millis(50)), "store.timeout")?,
                key_prefix: self.store.key_prefix.unwrap_or_else(|| "tollgate:".into()),
            };
            let cache = CacheConfig {
                ttl: self.cache.ttl.unwrap_or(Duration::from_secs(30)),
                negative_ttl: self.cache.negative_ttl.unwrap_or(Duration::from_secs(5)),
                max_bytes: bounded(self.cache.max_bytes, 64 << 20, 1 << 20, 1 << 40, "cache.max_bytes")?,
            };

            let identity_defs = self.identity.unwrap_or_else(|| {
                vec![
                    Identity {
                        api_key: Some(ApiKey { header: "x-api-key".into(), scheme: None }),
                        ..Default::default()
                    },
                    Identity {
                        api_key: Some(ApiKey { header: "authorization".into(), scheme: Some("Bearer".into()) }),
                        ..Default::default()
                    },
                ]
            });
            let mut identity = Vec::with_capacity(identity_defs.len());
            for (i, def) in identity_defs.into_iter().enumerate() {
                let p = format!("identity[{i}]");
                identity.push(match (def.api_key, def.jwt_claim, def.trusted_header) {
                    (Some(a), None, None) => {
                        if let Some(s) = &a.scheme
                            && (s.trim().is_empty() || s.contains(' '))
                        {
                            return Err(invalid(format!("{p}.api_key.scheme"), "must be one word, e.g. Bearer"));
                        }
                        IdentitySource::ApiKey {
                            header: header_name(&a.header, &format!("{p}.api_key.header"))?,
                            scheme: a.scheme,
                        }
                    }
                    (None, Some(j), None) => {
                        for (name, v) in [("namespace", &j.namespace), ("field", &j.field), ("claim", &j.claim)] {
                            if v.trim().is_empty() {
                                return Err(invalid(format!("{p}.jwt_claim.{name}"), "must not be empty"));
                            }
                        }
                        IdentitySource::JwtClaim { namespace: j.namespace, field: j.field, claim: j.claim }
                    }
                    (None, None, Some(t)) => IdentitySource::TrustedHeader {
                        header: header_name(&t.header, &format!("{p}.trusted_header.header"))?,
                    },
                    _ => return Err(invalid(p, "needs exactly one of api_key, jwt_claim, trusted_header")),
                });
            }

            if self.plans.is_empty() {
                return Err(invalid("plans", "at least one plan is needed"));
            }
            let mut plans = HashMap::new();
            for (name, def) in &self.plans {
                let p = format!("plans.{name}");
                self::name(name, &p)?;
                let mut features = BTreeSet::new();
                for (i, f) in def.features.iter().enumerate() {
                    if f.trim().is_empty() {
                        return Err(invalid(format!("{p}.features[{i}]"), "must not be empty"));
                    }
                    self::name(f, &format!("{p}.features[{i}]"))?;
                    features.insert(f.clone());
                }
                let plan = Plan {
                    name: name.clone(),
                    features,
                    quotas: quotas(&def.quotas, &format!("{p}.quotas"))?,
                    prepaid: def.prepaid,
                };
                plans.insert(name.clone(), plan);
            }

            let mut accounts = Vec::with_capacity(self.accounts.len());
            let mut ids = HashSet::new();
            let mut keys = HashSet::new();
            for (i, a) in self.accounts.iter().enumerate() {
                let p = format!("accounts[{i}]");
                account_id(&a.id, &format!("{p}.id"))?;
                if !ids.insert(a.id.as_str()) {
                    return Err(invalid(format!("{p}.id"), format!("duplicate account {:?}", a.id)));
                }
                if !plans.contains_key(&a.plan) {
                    return Err(invalid(format!("{p}.plan"), unknown("plan", &a.plan, plans.keys())));
                }
                for (k, key) in a.api_keys.iter().enumerate() {
                    if !crate::identity::is_valid_key(key) {
                        return Err(invalid(
                            format!("{p}.api_keys[{k}]"),
                            format!(
                                "must be 1-{} visible ASCII characters, without spaces",
                                crate::identity::MAX_KEY_BYTES
                            ),
                        ));
                    }
                    if !keys.insert(key.as_str()) {
                        // Never echo the key itself.
                        return Err(invalid(format!("{p}.api_keys[{k}]"), "duplicate API key (already used above)"));
                    }
                }
                if a.status == Status::PastDue && a.past_due_since.is_none() {
                    return Err(invalid(format!("{p}.past_due_since"), "required when status is past_due"));
                }
                if a.credits < 0 || a.credits as u64 > MAX_CREDITS {
                    return Err(invalid(format!("{p}.credits"), format!("must be between 0 and {MAX_CREDITS}")));
                }
                for (k, f) in a.features.iter().enumerate() {
                    name(f, &format!("{p}.features[{k}]"))?;
                }
                if a.features.len() > crate::bounds::MAX_ITEMS || a.quotas.len() > crate::bounds::MAX_ITEMS {
                    return Err(invalid(p, format!("at most {} features and quotas", crate::bounds::MAX_ITEMS)));
                }
                date(a.past_due_since, &format!("{p}.past_due_since"))?;
                if let Some(c) = a.stripe_customer.as_deref().filter(|c| !crate::bounds::is_valid_customer_id(c)) {
                    return Err(invalid(
                        format!("{p}.stripe_customer"),
                        format!("{c:?} is not 1-255 of A-Z a-z 0-9 _"),
                    ));
                }
                date(a.expires_at, &format!("{p}.expires_at"))?;
                accounts.push(SeedAccount {
                    account: Account {
                        id: a.id.clone(),
                        plan: a.plan.clone(),
                        status: a.status,
                        past_due_since: a.past_due_since,
                        expires_at: a.expires_at,
                        blocked: a.blocked,
                        extra_features: a.features.iter().cloned().collect(),
                        quota_overrides: quotas(&a.quotas, &format!("{p}.quotas"))?,
                        stripe_customer: a.stripe_customer.clone(),
                        billing_event_at: None,
                    },
                    api_keys: a.api_keys.clone(),
                    credits: a.credits as u64,
                });
            }

            let known_features: BTreeSet<&str> = plans
                .values()
                .flat_map(|p| p.features.iter())
                .chain(accounts.iter().flat_map(|a| a.account.extra_features.iter()))
                .map(String::as_str)
                .collect();
            let mut routes = Vec::with_capacity(self.routes.len());
            for (i, r) in self.routes.into_iter().enumerate() {
                let p = format!("routes[{i}]");
                let m = r.matcher;
                for (name, v) in
                    [("path_prefix", &m.path_prefix), ("path", &m.path), ("string_prefix", &m.string_prefix)]
                {
                    if let Some(v) = v
                        && let Err(e) = crate::route::check_path(v)
                    {
                        // A route in another form could never match: tollgate refuses such paths.
                        return Err(invalid(
                            format!("{p}.match.{name}"),
                            format!("{v:?}: {e} (routes match normal paths)"),
                        ));
                    }
                }
                if [&m.path_prefix, &m.path, &m.string_prefix].iter().filter(|v| v.is_some()).count() > 1 {
                    return Err(invalid(format!("{p}.match"), "set one of path_prefix, path, string_prefix"));
                }
                if m.path_prefix.is_none() && m.path.is_none() && m.string_prefix.is_none() && m.host.is_none() {
                    return Err(invalid(
                        format!("{p}.match"),
                        "needs path_prefix, path, string_prefix or host (path_prefix: / matches all)",
                    ));
                }
                let mut methods = Vec::with_capacity(m.methods.len());
                for (k, method) in m.methods.iter().enumerate() {
                    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
                        return Err(invalid(
                            format!("{p}.match.methods[{k}]"),
                            format!("{method:?} is not an HTTP method"),
                        ));
                    }
                    methods.push(method.to_ascii_uppercase());
                }
                if r.public && (r.feature.is_some() || r.meter.is_some() || r.cost.is_some()) {
                    return Err(invalid(p, "a public route takes no feature, meter or cost"));
                }
                if let Some(f) = &r.feature
                    && !known_features.contains(f.as_str())
                {
                    return Err(invalid(format!("{p}.feature"), unknown("feature", f, known_features.iter())));
                }
                let cost = r.cost.unwrap_or(1);
                if cost < 0 || cost as u64 > MAX_COST {
                    return Err(invalid(format!("{p}.cost"), format!("must be between 0 and {MAX_COST}")));
                }
                let matcher = RouteMatch {
                    path_prefix: m.path_prefix,
                    string_prefix: m.string_prefix,
                    path: m.path,
                    methods,
                    host: m.host.map(|h| h.to_ascii_lowercase()),
                };
                routes.push(Route::new(i, matcher, r.public, r.feature, r.meter, cost as u64));
            }

            let stripe = match self.billing.stripe {
                None => None,
                Some(s) => {
                    for (price, plan) in &s.prices {
                        if !plans.contains_key(plan) {
                            return Err(invalid(
                                format!("billing.stripe.prices.{price}"),
                                unknown("plan", plan, plans.keys()),
                            ));
                        }
                    }
                    let account_from = s.account_from.unwrap_or_else(|| "customer".into());
                    if account_from != "customer" && account_from.strip_prefix("metadata:").is_none_or(|k| k.is_empty())
                    {
                        return Err(invalid("billing.stripe.account_from", "must be customer or metadata:<key>"));
                    }
                    let env = s.webhook_secrets_env.unwrap_or_else(|| "TOLLGATE_STRIPE_WEBHOOK_SECRETS".into());
                    let mut secrets = Secrets::from_env(&env);
                    secrets.0.extend(s.webhook_secrets.iter().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()));
                    Some(StripeConfig {
                        webhook_secrets_env: env,
                        webhook_secrets: secrets,
                        features: s.features,
                        tolerance: positive(
                            s.tolerance.unwrap_or(Duration::from_secs(300)),
                            "billing.stripe.tolerance",
                        )?,
                        account_from,
                        prices: s.prices,
                    })
                }
            };

            let mut overrides = HashMap::new();
            for (code, o) in self.problems.overrides {
                let Some(c) = Code::parse(&code) else {
                    let codes: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
                    return Err(invalid(
                        format!("problems.overrides.{code}"),
                        format!("unknown code (known: {})", codes.join(", ")),
                    ));
                };
                overrides.insert(c, o);
            }

            Ok(super::Config {
                server,
                store,
                cache,
                identity,
                billing: BillingConfig { portal_url: self.billing.portal_url, stripe },
                policy: Policy {
                    plans,
                    grace_period: match self.billing.grace_period {
                        Some(g) if g > MAX_WINDOW => {
                            return Err(invalid("billing.grace_period", "must be at most 366d"));
                        }
                        g => g.unwrap_or(Duration::from_secs(72 * 3600)),
                    },
                    unmatched: self.default.into(),
                },
                routes: RouteTable::new(routes),
                non_http: self.non_http.into(),
                accounts,
                problems: ProblemsConfig {
                    type_base: self.problems.type_base.unwrap_or_else(|| "urn:tollgate:problem:".into()),
                    overrides,
                },
            })
        }
    }

    fn unknown<'a>(what: &str, name: &str, known: impl Iterator<Item = impl AsRef<str> + 'a>) -> String {
        let mut known: Vec<String> = known.map(|k| k.as_ref().to_owned()).collect();
        known.sort();
        format!("unknown {what} {name:?} (known: {})", known.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_is_valid() {
        let c = Config::parse(DEMO_CONFIG, "demo.yaml").unwrap();
        assert_eq!(c.store.backend, Backend::Memory);
        assert!(c.policy.plans.contains_key("payg"));
        assert!(!c.accounts.is_empty());
    }

    #[test]
    fn store_url_hides_password() {
        let u = StoreUrl("redis://user:hunter2@h:6379/0".into());
        assert_eq!(u.redacted(), "redis://user:***@h:6379/0");
        assert!(!format!("{u:?}").contains("hunter2"));
        assert_eq!(StoreUrl("redis://h:1".into()).redacted(), "redis://h:1");
    }

    #[test]
    fn seed_accounts_never_debug_keys() {
        let c = Config::parse(DEMO_CONFIG, "demo.yaml").unwrap();
        assert!(!format!("{c:?}").contains("demo-free-key"));
    }
}
