//! Instructions per allowed Check in tollgate's handler, counted by callgrind
//! (`scripts/callgrind-check.sh` runs this binary under valgrind): a count a
//! shared, noisy machine cannot move, for before/after comparisons.
//!
//! The handler is [`tollgate::grpc::ext_authz::ExtAuthz`]'s `decide` and the
//! answer's encoding, as the server runs them (`tollgate_testkit::bench::run_checks`),
//! on the bench config (the memory store, a metered `/v1/search` whose quota
//! is never reached) with the Check Envoy sends for `GET /v1/search?q=x`
//! with the bench key: everything from the decoded request to the encoded
//! answer — identity, cache, decision, spend, response, metadata, metrics.
//! With `--reference` the answer is a prost `CheckResponse`, encoded by prost
//! (the way before the wire encoder). The binary's allocator is tollgate's
//! (mimalloc). Allocations per Check: `benches/check_allocs.rs`.
//!
//! ```text
//! scripts/callgrind-check.sh                        # instructions per Check
//! scripts/callgrind-check.sh --reference            # the same, answered the prost way
//! cargo bench --bench check_cost -- --checks 20000  # the same loop, untimed
//! ```
//!
//! Under `cargo test --benches` it prints a hint and exits.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use tollgate_testkit::bench;

fn main() {
    if !bench::measuring() {
        println!("check_cost: not a test; run scripts/callgrind-check.sh");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let n = bench::checks_arg(2000);
    rt.block_on(async {
        let h = bench::handler().await;
        // Warm: the account in the cache, the metric series made.
        bench::run_checks(&h, 100).await;
        assert_eq!(bench::run_checks(&h, n).await, n, "every Check of the bench account is allowed");
    });
    println!("check_cost: {} Checks allowed", n + 100);
}
