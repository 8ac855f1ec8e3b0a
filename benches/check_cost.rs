//! What one allowed Check costs tollgate's handler, in counts a shared,
//! noisy machine cannot move: heap allocations per Check (`allocation-counter`'s
//! counting allocator over the system one, this thread only) and, run under
//! callgrind by `scripts/callgrind-check.sh`, instructions per Check.
//!
//! The handler is [`tollgate::grpc::ext_authz::ExtAuthz`]'s `check` on the
//! bench config (`tollgate_testkit::bench`: the memory store, a metered
//! `/v1/search` whose quota is never reached) with the Check Envoy sends for
//! `GET /v1/search?q=x` with the bench key: decode aside (the requests are
//! built before the loop), everything from the request to the
//! `CheckResponse` — identity, cache, decision, spend, response, metadata,
//! metrics. One warm-up pass fills the cache first, so the loop measures a
//! cached account, the steady state.
//!
//! ```text
//! cargo bench --bench check_cost                    # allocations per Check
//! cargo bench --bench check_cost -- --checks 20000  # more Checks
//! scripts/callgrind-check.sh                        # instructions per Check (valgrind)
//! ```
//!
//! Under `cargo test --benches` it prints a hint and exits.

use std::sync::Arc;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use tollgate::accounts::Accounts;
use tollgate::authorizer::Authorizer;
use tollgate::config::Config;
use tollgate::grpc::ext_authz::ExtAuthz;
use tollgate::metrics::Metrics;
use tollgate::store;
use tollgate_testkit::bench::{self, check_request};

/// Checks in the measured loop, from `--checks N` (default 10,000).
fn checks() -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--checks")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000)
}

/// The handler a Check meets, on the bench config and a seeded memory store.
async fn handler() -> ExtAuthz {
    let config = Config::parse(&bench::config("{ backend: memory, on_error: deny, timeout: 50ms }"), "bench.yaml")
        .expect("the bench config is valid");
    let metrics = Arc::new(Metrics::new());
    let store = store::open(&config.store, &config.cache, metrics.cache_observer()).expect("memory store");
    Accounts::seed(store.as_ref(), &config.accounts, &config.policy.plans).await.expect("seed");
    ExtAuthz::new(Arc::new(Authorizer::new(Arc::new(config), store, metrics)))
}

/// Runs `n` Checks (built first) through `h` on `rt`, counting the
/// allocations of this thread meanwhile; answers how many were allowed.
fn run(rt: &tokio::runtime::Runtime, h: &ExtAuthz, n: usize) -> usize {
    let requests: Vec<_> = (0..n).map(|_| tonic::Request::new(check_request())).collect();
    let mut allowed = 0;
    let info = allocation_counter::measure(|| {
        rt.block_on(async {
            for r in requests {
                let answer = h.check(r).await.expect("a Check answers");
                allowed += usize::from(answer.get_ref().status.as_ref().is_none_or(|s| s.code == 0));
            }
        })
    });
    println!(
        "check_cost: {n} Checks, {allowed} allowed; per Check: {:.2} allocations, {:.0} bytes allocated",
        info.count_total as f64 / n as f64,
        info.bytes_total as f64 / n as f64
    );
    allowed
}

fn main() {
    if !bench::measuring() {
        println!("check_cost: not a test; run `cargo bench --bench check_cost` or scripts/callgrind-check.sh");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let h = rt.block_on(handler());
    // Warm: the account in the cache, the metric series made.
    run(&rt, &h, 100);
    let n = checks();
    assert_eq!(run(&rt, &h, n), n, "every Check of the bench account is allowed");
}
