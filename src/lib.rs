//! tollgate: an Envoy/Istio external-authorization server that turns billing
//! state into access decisions.
//!
//! # Layout
//!
//! | module | role | may use |
//! |---|---|---|
//! | [`entitlement`] | plans, accounts, quotas (built and bounded by `Quota::new`), calendar windows | nothing of ours |
//! | [`usage`] | what a request spends and what the counters answer | `entitlement` |
//! | [`bounds`] | the bounds on every input (ids, names, windows, dates, accounts, spends) | `entitlement`, `usage` |
//! | [`route`] | the route table and matching | `x402` (a route's price) |
//! | [`identity`] | identity sources, API-key hashing | nothing of ours |
//! | [`decision`] | the decision table as a pure function | `entitlement`, `usage` |
//! | [`settlement`] | charges (signed, in Check metadata) and what a response makes of them, as pure functions | `entitlement`, `usage` |
//! | [`x402`] | the x402 payment challenge, payments read and checked (pure); the facilitator's verify and settle | `decision`, `outbound` |
//! | [`outbound`] | the pooled HTTP(S) client for calls out (events sink, facilitator) | nothing of ours |
//! | [`config`] | YAML → validated domain types | domain modules |
//! | [`problem`] | decisions → problem bodies and headers (x402 challenge and receipt included) | `decision`, `entitlement`, `identity`, `config` |
//! | [`store`] | the `Store` trait; memory and Redis backends; the moka cache; lease mode | `entitlement`, `usage`, `bounds`, `identity`, `config` (settings) |
//! | [`metrics`] | Prometheus registry | `decision` (labels), `usage` (lease totals) |
//! | [`authorizer`] | route → identify → store → decide → render; the timed store call | all of the above |
//! | [`events`] | CloudEvents for settled charges and thresholds (pure); the delivery loop to the sink | `settlement`, `usage`, `entitlement`, `config`; `authorizer` (delivery) |
//! | [`settler`] | access-log entries → settled charges: the signing key, store calls, metrics | `settlement`, `authorizer`, `store`, `metrics` |
//! | [`accounts`] | entitlement, credit, API-key and usage changes; seeding | `entitlement`, `usage`, `bounds`, `identity`, `decision` (quota state), `store`, `config` (plans, seed accounts), `authorizer` (live config, timed store calls) |
//! | [`grpc`] | ext_authz and `tollgate.v1` translations; errors → statuses; ready services and health | `authorizer`, `accounts`, `config` (tokens), the domain types they name |
//! | [`stripe`] | webhook signatures, events → account changes | `entitlement`, `bounds`, `accounts`, `config` (Stripe settings) |
//! | [`telemetry`] | OpenTelemetry spans: the caller's trace context, the bounded export queue, per-request stats | `config` (tracing settings) |
//! | [`http`] | `/healthz`, `/readyz`, `/metrics`, `/webhooks/stripe` | `metrics`, `stripe`, `accounts`, `authorizer`, `listener`, `config` (limits), `store` (lease totals for metrics) |
//! | [`http_authz`] | the HTTP authorization door: Envoy's HTTP ext_authz, Traefik ForwardAuth, nginx auth_request | `authorizer`, `decision`, `identity`, `metrics`, `problem`, `route`, `settlement` |
//! | [`listener`] | accepting within bounds: connection cap, handshake deadline | `config` (limits) |
//! | [`reload`] | config reloads (SIGHUP, file watch) | `config`, `authorizer` |
//! | [`server`] | wiring, health, graceful shutdown | everything |
//!
//! Envoy, prost and generated tonic types stop at [`grpc`]. Locks are
//! `std::sync` ones: none is ever held across an `.await`, and each guards a
//! few assignments (the exceptions are tokio mutexes: the cluster connection's
//! first connect, and lease mode's per-account Redis lock, held across the
//! Redis calls for that account's leases so a take and a give-back never
//! interleave; a Check paid from held units takes only a std lock).

pub mod accounts;
pub mod authorizer;
pub mod bounds;
pub mod config;
pub mod decision;
pub mod entitlement;
pub mod events;
pub mod grpc;
pub mod http;
pub mod http_authz;
pub mod identity;
pub mod listener;
pub mod metrics;
pub mod outbound;
pub mod problem;
pub mod reload;
pub mod route;
pub mod server;
pub mod settlement;
pub mod settler;
pub mod store;
pub mod stripe;
pub mod telemetry;
pub mod usage;
pub mod x402;

/// The maps a Check reads, hashed with foldhash (seeded per process) rather
/// than SipHash: their keys are the config's names, account ids and meters
/// from records, and key hashes (SHA-256 outputs). None can be chosen to
/// collide by a caller, who only looks them up.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
