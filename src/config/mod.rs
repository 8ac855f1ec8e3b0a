//! The YAML config of SPEC §3: parsed strictly, validated whole, then turned
//! into the domain types the rest of the server uses.
//!
//! Every error names the field path (`plans.free.quotas[0].limit`) and the
//! reason; YAML syntax and type errors also name the line. Validation runs
//! before anything binds, so a bad config exits before serving a request.
//! Depends on the domain modules (`entitlement`, `route`, `identity`,
//! `decision`, `bounds`, `usage`), never on the store or the transports.
//!
//! # Layout
//!
//! | file | holds | may use |
//! |---|---|---|
//! | `mod.rs` | [`Config`], [`ConfigError`], load, parse, summary, warnings | the files below |
//! | `settings.rs` | process settings: listeners, limits, TLS, store, cache | `secrets` |
//! | `secrets.rs` | [`Secrets`], the token constants, the one env-and-YAML merge | nothing of ours |
//! | `events.rs` | `events:` (sink, outbox, thresholds) and its validation | `schema`, `validate`, `secrets` |
//! | `policy.rs` | billing side: Stripe, portal, problem texts, seed accounts | `secrets`, domain modules |
//! | `schema.rs` | the raw serde shapes, exactly as written | `settings`, `policy` (types read as they are), domain enums |
//! | `validate.rs` | raw → [`Config`], section by section in a fixed order; shared field rules | `schema`, `policy`, the `validate_*` files |
//! | `validate_settings.rs` | `server` (listeners, tokens, `tls`, `limits`), `store`, `cache`, `identity` | `schema`, `settings`, `secrets`, `validate`, `identity` |
//! | `validate_policy.rs` | `plans`, `accounts`, `routes`, `billing`, `problems` | `schema`, `policy`, `secrets`, `validate`, `validate_quotas`, domain modules |
//! | `validate_quotas.rs` | a quota list, in one function | `schema`, `validate`, `entitlement`, `usage`, `bounds` |

use std::path::Path;
use std::time::Duration;

use crate::decision::{Policy, Unmatched};
use crate::entitlement::Plan;
use crate::identity::IdentitySource;
use crate::route::RouteTable;

mod events;
mod policy;
mod schema;
mod secrets;
mod settings;
mod validate;
mod validate_policy;
mod validate_quotas;
mod validate_settings;
mod x402;

pub use events::{EventsConfig, Levels, Secret, SinkConfig};
pub use policy::{BillingConfig, ProblemOverride, ProblemsConfig, SeedAccount, StripeConfig};
pub use secrets::{MIN_TOKEN_CHARS, PLACEHOLDER_TOKEN, Secrets};
pub use settings::{
    Backend, CacheConfig, Counting, DynamicMetadata, LeaseConfig, Limits, OWN_HEADERS_SHOWN, OnError, ReadAccess,
    RemoveOwnHeaders, ServerConfig, StoreConfig, StoreUrl, TlsConfig, TracingConfig, TrustedCallers,
};

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
    /// Usage and threshold events.
    pub events: EventsConfig,
    /// OpenTelemetry traces.
    pub tracing: TracingConfig,
    /// x402 payments (`x402:`); `None`: no challenge, no paid retries.
    pub x402: Option<std::sync::Arc<crate::x402::Settings>>,
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
        let by_host: Vec<String> = self
            .routes
            .routes()
            .iter()
            .filter(|r| r.matcher.host.is_some())
            .map(|r| format!("routes[{}]", r.index))
            .collect();
        if !by_host.is_empty() {
            out.push(format!(
                "{}: match on the request's host, which is the client's word unless the proxy routes each host \
                 apart (a virtual host and upstream of its own; the shipped Envoy configs send every host to one \
                 upstream, domains: [\"*\"]): otherwise a client picks the host, and with it the route",
                by_host.join(", ")
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
        let raw: schema::Config = serde_path_to_error::deserialize(de).map_err(|e| {
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
            let quotas: Vec<String> = p
                .quotas
                .iter()
                .map(|q| {
                    let soft = match (q.is_soft(), q.ceiling_set()) {
                        (false, _) => String::new(),
                        (true, None) => " soft".to_owned(),
                        (true, Some(c)) => format!(" soft ceiling {c}"),
                    };
                    format!("{}={}{soft}", q.policy_name(), q.limit)
                })
                .collect();
            let features: Vec<&str> = p.features.iter().map(String::as_str).collect();
            out += &format!(
                "  {}: features [{}] quotas [{}]{}{}\n",
                p.name,
                features.join(", "),
                quotas.join(", "),
                if p.prepaid { " prepaid" } else { "" },
                p.shadow.map_or(String::new(), |s| format!(" shadow {s}"))
            );
        }
        out += &format!("routes ({}):\n", self.routes.routes().len());
        for r in self.routes.routes() {
            let what = if r.public {
                "public".to_owned()
            } else {
                format!(
                    "feature {} meter {} cost {}{}",
                    r.feature.as_deref().unwrap_or("-"),
                    r.meter.as_deref().unwrap_or("-"),
                    r.cost,
                    r.cost_from_response.as_ref().map_or(String::new(), |h| format!(" (reserved; charged from {h})")),
                )
            };
            let methods = if r.matcher.methods.is_empty() { "ANY".to_owned() } else { r.matcher.methods.join(",") };
            let shadow = r.shadow.map_or(String::new(), |s| format!(" shadow {s}"));
            out += &format!("  [{}] {} {}: {}{shadow}\n", r.index, methods, r.name, what);
        }
        out += &format!("default: {:?}\naccounts: {}\n", self.policy.unmatched, self.accounts.len());
        out += &format!(
            "shadow: {}{}\n",
            self.policy.shadow,
            if self.policy.shadow_security { " (credentials, blocked and route denials too)" } else { "" }
        );
        out += &format!("charge_on: {}\n", self.billing.charge_on.describe());
        // The sink's host only: a URL may carry credentials.
        let sink = self
            .events
            .sink
            .as_ref()
            .and_then(|s| s.url.parse::<hyper::Uri>().ok())
            .map(|u| format!("{}://{}", u.scheme_str().unwrap_or("?"), u.authority().map_or("?", |a| a.host())));
        out += &format!("events: {}\n", sink.unwrap_or_else(|| "off".to_owned()));
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

#[cfg(test)]
mod tests;
