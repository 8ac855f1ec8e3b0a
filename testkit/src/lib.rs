//! tollgate's test kit: the harness its integration tests and benches share.
//!
//! A dev-only crate (`publish = false`), a dev-dependency of the root
//! package: compiled once rather than into every test binary, with no
//! `#[allow(dead_code)]`, and the same code under `tests/` and `benches/`.
//! The library's own unit tests do not use it (it links the non-test build
//! of `tollgate`).
//!
//! # Layout
//!
//! | module | what |
//! |---|---|
//! | [`server`] | [`TestServer`]: tollgate in this process on `127.0.0.1:0` |
//! | [`check`] | [`http_check`], [`with_jwt`]: Check requests; [`Answer`]: a response flattened |
//! | [`http`] | a small HTTP/1.1 client: [`http_get`], [`http::request`] |
//! | [`process`] | tool finding, free ports, [`process::TollgateProcess`]: the real binary |
//! | [`redis`] | [`redis::RedisServer`], [`redis::RedisCluster`], MONITOR, `redis-benchmark` |
//! | [`envoy`] | [`envoy::Envoy`], the echo upstream, the shipped configs for tests, [`envoy::Stack`] |
//! | [`nginx`] | [`nginx::Nginx`] running the shipped `deploy/nginx/tollgate.conf` |
//! | [`facilitator`] | [`facilitator::Facilitator`]: a stand-in x402 facilitator; payments for a challenge |
//! | [`front`] | [`front::Front`]: a proxy clients talk to; [`front::deny_rows`]: the decision table through it |
//! | [`pki`] | [`pki::Pki`]: a CA and certificates written to a temporary folder |
//! | [`bench`] | the benches' config and the Check they send |
//! | [`load`] | load loops: [`load::run_load`], [`load::Run`], medians |
//! | [`cpu`] | CPU time from `/proc`: per process, reaped children, the machine |
//! | [`wrk`] | [`wrk::Wrk`]: one wrk run and its parsed report |
//! | [`accesslog`] | a Check's charge, Envoy-shaped access-log entries, one stream of them |
//! | [`sink`] | [`sink::Sink`]: an HTTP event sink that can be stopped and resumed |
//! | [`noop`] | an ext_authz server that allows everything (the floor) |
//!
//! Binaries: `ENVOY_BIN`, `NGINX_BIN`, `TOLLGATE_REDIS_SERVER`, `TOLLGATE_REDIS_CLI`,
//! `TOLLGATE_REDIS_BENCHMARK` when set, else `PATH`, else `.tools/bin`
//! (what `scripts/test.sh` installs); see [`process::tool`].

pub mod accesslog;
pub mod bench;
pub mod check;
pub mod cpu;
pub mod envoy;
pub mod facilitator;
pub mod front;
pub mod http;
pub mod load;
pub mod nginx;
pub mod noop;
pub mod otlp;
pub mod pki;
pub mod process;
pub mod raw;
pub mod redis;
pub mod server;
pub mod sink;
pub mod wrk;

use std::path::Path;
use std::time::Duration;

pub use check::{Answer, allowed_else, http_check, spread, with_jwt};
pub use http::{http_get, metric};
pub use server::TestServer;

/// The repository root (the `tollgate` package), where `deploy/`, `config/`
/// and `tests/fixtures/` live.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit/ sits in the repository root")
}

/// Polls `f` every 10 ms until it holds; fails the test after `within`.
pub async fn eventually(what: &str, within: Duration, mut f: impl AsyncFnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f().await {
        assert!(start.elapsed() < within, "{what} did not happen within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// RFC 3339 timestamp `offset` from now.
pub fn ago(offset: chrono::Duration) -> String {
    (chrono::Utc::now() - offset).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// [`spec_config`] with what rolling a paywall out needs: a `soft` plan
/// (requests-month: limit 10, soft, ceiling 15; key `soft-key`, and
/// `soft-grace-key` for an account of it in its grace period), a payg account
/// with no credits (`broke-key`), and two routes in shadow mode next to the
/// enforced ones: `/v1/trial` (feature search) and `/v1/trial-export`
/// (feature export), both metering requests at cost 1.
pub fn rollout_config() -> String {
    spec_config()
        .replacen(
            "plans:\n",
            "plans:\n  soft:\n    features: [search]\n    quotas:\n      - { meter: requests, limit: 10, period: month, soft: true, ceiling: 15 }\n",
            1,
        )
        .replacen(
            "routes:\n",
            "routes:\n  - { match: { path_prefix: /v1/trial }, feature: search, meter: requests, cost: 1, shadow: true }\n  - { match: { path_prefix: /v1/trial-export }, feature: export, meter: requests, cost: 1, shadow: true }\n",
            1,
        )
        .replacen(
            "accounts:\n",
            &format!(
                "accounts:\n  - {{ id: acct_soft, plan: soft, api_keys: [soft-key] }}\n  - {{ id: acct_soft_grace, plan: soft, api_keys: [soft-grace-key], status: past_due, past_due_since: {} }}\n  - {{ id: acct_broke, plan: payg, api_keys: [broke-key], credits: 0 }}\n",
                ago(chrono::Duration::hours(1))
            ),
            1,
        )
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

/// Units `account` has used in the current window of `meter`'s calendar
/// `period` quota, as `store` counts them (a dry run of cost 0: nothing moves).
pub async fn used(
    store: &dyn tollgate::store::Store,
    account: &str,
    meter: &str,
    period: tollgate::entitlement::Period,
) -> u64 {
    use tollgate::entitlement::{Quota, Window};
    let q = Quota { meter: meter.into(), limit: 1 << 40, window: Window::Calendar(period), ceiling: None };
    let probe = tollgate::usage::Spend {
        account: account.into(),
        quotas: [q].into_iter().collect(),
        cost: 0,
        credits: None,
        now: chrono::Utc::now(),
        dry_run: true,
        shadow: false,
    };
    store.spend(&probe).await.expect("a dry run answers").quotas[0].used
}

/// tollgate in this process on [`spec_config`] with its HTTP door
/// (`server.authz_http_listen` on a free port) and `redis` as its store,
/// seeded: the tollgate the proxies' HTTP-door tests put a proxy in front of.
pub async fn spec_door_on(redis: &redis::RedisServer) -> (TestServer, std::net::SocketAddr) {
    let door = process::free_addr();
    let yaml = format!(
        "{}server: {{ authz_http_listen: \"{door}\" }}\nstore: {{ backend: redis, url: \"{}\" }}\n",
        spec_config(),
        redis.url()
    );
    (TestServer::start_configured(&yaml, true).await, door)
}
