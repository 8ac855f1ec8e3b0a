//! The YAML shapes, exactly as written: strict (`deny_unknown_fields`), with
//! defaults only where absence means "the default". No rule is checked here
//! beyond types and durations; `validate` turns a [`Config`] into the public
//! [`super::Config`].
//!
//! The type names show in serde's messages ("expected struct LimitsDef"), so
//! renaming one changes an error message. May use the public config types
//! whose YAML form is their serde form ([`super::settings`],
//! [`super::policy::ProblemOverride`]) and the domain enums (`Status`,
//! `Period`, `Unmatched`).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::parse_duration;
use super::policy::ProblemOverride;
use super::settings::{Backend, Counting, DynamicMetadata, OnError, ReadAccess, RemoveOwnHeaders, TrustedCallers};
use crate::decision::Unmatched;
use crate::entitlement::{Period, Status};

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Config {
    #[serde(default)]
    pub(super) server: Server,
    #[serde(default)]
    pub(super) store: Store,
    #[serde(default)]
    pub(super) cache: Cache,
    pub(super) identity: Option<Vec<Identity>>,
    #[serde(default)]
    pub(super) billing: Billing,
    #[serde(default)]
    pub(super) plans: BTreeMap<String, PlanDef>,
    #[serde(default)]
    pub(super) routes: Vec<RouteDef>,
    #[serde(default)]
    pub(super) default: Unmatched2,
    #[serde(default)]
    pub(super) non_http: Unmatched2,
    #[serde(default)]
    pub(super) accounts: Vec<AccountDef>,
    #[serde(default)]
    pub(super) problems: Problems,
    #[serde(default)]
    pub(super) events: Events,
    #[serde(default)]
    pub(super) shadow: bool,
    #[serde(default)]
    pub(super) shadow_security: bool,
    #[serde(default)]
    pub(super) tracing: Tracing,
    pub(super) x402: Option<X402Def>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct X402Def {
    pub(super) facilitator: FacilitatorDef,
    pub(super) scheme: Option<String>,
    pub(super) network: String,
    pub(super) asset: String,
    pub(super) pay_to: String,
    pub(super) max_timeout_seconds: Option<u64>,
    #[serde(default)]
    pub(super) extra: BTreeMap<String, String>,
    pub(super) on_facilitator_error: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FacilitatorDef {
    pub(super) url: String,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) timeout: Option<Duration>,
}

/// A price: digits in a string (as x402 writes amounts) or a YAML integer.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub(super) enum PriceDef {
    Text(String),
    Number(i64),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PlanX402Def {
    pub(super) price: PriceDef,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RouteX402Def {
    pub(super) price: Option<PriceDef>,
    #[serde(default)]
    pub(super) payable: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Events {
    pub(super) sink: Option<Sink>,
    pub(super) source: Option<String>,
    pub(super) outbox_limit: Option<u64>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) reclaim_after: Option<Duration>,
    #[serde(default)]
    pub(super) thresholds: Levels,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Sink {
    pub(super) url: Option<String>,
    pub(super) token_env: Option<String>,
    pub(super) signing_secret_env: Option<String>,
    pub(super) batch: Option<usize>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) timeout: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Levels {
    #[serde(default)]
    pub(super) quota: Vec<f64>,
    pub(super) credits_below: Option<i64>,
    #[serde(default)]
    pub(super) plans: BTreeMap<String, Levels>,
}

/// `default:` and `non_http:`; the domain's `Unmatched` has no serde form.
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub(super) enum Unmatched2 {
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
pub(super) struct Server {
    pub(super) grpc_listen: Option<String>,
    pub(super) http_listen: Option<String>,
    pub(super) authz_http_listen: Option<String>,
    pub(super) admin_tokens_env: Option<String>,
    #[serde(default)]
    pub(super) admin_tokens: Vec<String>,
    pub(super) service_tokens_env: Option<String>,
    #[serde(default)]
    pub(super) service_tokens: Vec<String>,
    #[serde(default)]
    pub(super) read_access: ReadAccess,
    #[serde(default)]
    pub(super) trusted_callers: TrustedCallers,
    #[serde(default)]
    pub(super) dynamic_metadata: DynamicMetadata,
    #[serde(default)]
    pub(super) remove_own_headers: RemoveOwnHeaders,
    pub(super) tls: Option<Tls>,
    #[serde(default)]
    pub(super) watch_config: bool,
    pub(super) reflection: Option<bool>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) drain_delay: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) drain_timeout: Option<Duration>,
    #[serde(default)]
    pub(super) limits: LimitsDef,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitsDef {
    pub(super) max_concurrent_streams: Option<u32>,
    pub(super) max_message_bytes: Option<usize>,
    pub(super) max_header_list_bytes: Option<u32>,
    pub(super) max_connections: Option<usize>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) handshake_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) request_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) keepalive_interval: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) keepalive_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) max_connection_age: Option<Duration>,
    pub(super) max_body_bytes: Option<usize>,
    pub(super) max_inflight_requests: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Tls {
    pub(super) cert: String,
    pub(super) key: String,
    pub(super) client_ca: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Store {
    #[serde(default)]
    pub(super) backend: Backend,
    pub(super) url: Option<String>,
    #[serde(default)]
    pub(super) on_error: OnError,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) timeout: Option<Duration>,
    pub(super) key_prefix: Option<String>,
    #[serde(default)]
    pub(super) counting: Counting,
    #[serde(default)]
    pub(super) lease: Lease,
}

/// `store.lease:`, read only when `store.counting` is `lease`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Lease {
    pub(super) max_block: Option<u64>,
    pub(super) replicas: Option<u64>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) idle: Option<Duration>,
    pub(super) max_accounts: Option<usize>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) lifetime: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Tracing {
    pub(super) otlp_endpoint: Option<String>,
    pub(super) sample_ratio: Option<f64>,
    pub(super) service_name: Option<String>,
    pub(super) queue_size: Option<usize>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) export_timeout: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Cache {
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) ttl: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) negative_ttl: Option<Duration>,
    pub(super) max_bytes: Option<u64>,
}

/// One of the three keys; a struct rather than an enum so YAML needs no tags.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Identity {
    pub(super) api_key: Option<ApiKey>,
    pub(super) jwt_claim: Option<JwtClaim>,
    pub(super) trusted_header: Option<TrustedHeader>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ApiKey {
    pub(super) header: String,
    pub(super) scheme: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JwtClaim {
    pub(super) namespace: String,
    #[serde(default = "default_jwt_field")]
    pub(super) field: String,
    pub(super) claim: String,
}

fn default_jwt_field() -> String {
    "jwt_payload".to_owned()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TrustedHeader {
    pub(super) header: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Billing {
    pub(super) portal_url: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) grace_period: Option<Duration>,
    pub(super) stripe: Option<Stripe>,
    pub(super) charge_on: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Stripe {
    pub(super) webhook_secrets_env: Option<String>,
    #[serde(default)]
    pub(super) webhook_secrets: Vec<String>,
    #[serde(default)]
    pub(super) features: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) tolerance: Option<Duration>,
    pub(super) account_from: Option<String>,
    #[serde(default)]
    pub(super) prices: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct PlanDef {
    #[serde(default)]
    pub(super) features: Vec<String>,
    #[serde(default)]
    pub(super) quotas: Vec<QuotaDef>,
    #[serde(default)]
    pub(super) prepaid: bool,
    pub(super) shadow: Option<bool>,
    pub(super) x402: Option<PlanX402Def>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct QuotaDef {
    pub(super) meter: String,
    pub(super) limit: i64,
    pub(super) period: Option<Period>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) per: Option<Duration>,
    #[serde(default)]
    pub(super) soft: bool,
    pub(super) ceiling: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RouteDef {
    #[serde(rename = "match")]
    pub(super) matcher: MatchDef,
    #[serde(default)]
    pub(super) public: bool,
    pub(super) feature: Option<String>,
    pub(super) meter: Option<String>,
    pub(super) cost: Option<i64>,
    pub(super) cost_from_response: Option<String>,
    pub(super) shadow: Option<bool>,
    pub(super) x402: Option<RouteX402Def>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct MatchDef {
    pub(super) path_prefix: Option<String>,
    pub(super) string_prefix: Option<String>,
    pub(super) path: Option<String>,
    #[serde(default)]
    pub(super) methods: Vec<String>,
    pub(super) host: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AccountDef {
    pub(super) id: String,
    pub(super) plan: String,
    #[serde(default)]
    pub(super) api_keys: Vec<String>,
    #[serde(default)]
    pub(super) status: Status,
    pub(super) past_due_since: Option<DateTime<Utc>>,
    pub(super) expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub(super) blocked: bool,
    #[serde(default)]
    pub(super) credits: i64,
    #[serde(default)]
    pub(super) features: Vec<String>,
    #[serde(default)]
    pub(super) quotas: Vec<QuotaDef>,
    pub(super) stripe_customer: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Problems {
    pub(super) type_base: Option<String>,
    #[serde(default)]
    pub(super) overrides: BTreeMap<String, ProblemOverride>,
}
