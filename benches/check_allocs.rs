//! Heap allocations per allowed Check in tollgate's handler (the loop of
//! `benches/check_cost.rs`), counted by `allocation-counter`'s allocator
//! (the system's, counted; this thread only) after a warm-up that fills the
//! cache.
//!
//! ```text
//! cargo bench --bench check_allocs                    # 10,000 Checks
//! cargo bench --bench check_allocs -- --checks 50000
//! ```
//!
//! Under `cargo test --benches` it prints a hint and exits.

use tollgate_testkit::bench;

fn main() {
    if !bench::measuring() {
        println!("check_allocs: not a test; run `cargo bench --bench check_allocs`");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let h = rt.block_on(bench::handler());
    rt.block_on(bench::run_checks(&h, 100));
    let n = bench::checks_arg(10_000);
    // The requests are built inside the count: measured alone and taken off.
    let building = allocation_counter::measure(|| {
        // As `run_checks` builds them: one request read as the server reads it, cloned (no copies).
        let view = tollgate::grpc::check_request::CheckRequestView::from_request(&bench::check_request());
        let r: Vec<_> = (0..n).map(|_| tonic::Request::new(view.clone())).collect();
        drop(r);
    });
    let mut allowed = 0;
    let info = allocation_counter::measure(|| allowed = rt.block_on(bench::run_checks(&h, n)));
    assert_eq!(allowed, n, "every Check of the bench account is allowed");
    let per = |total: u64, building: u64| total.saturating_sub(building) as f64 / n as f64;
    println!(
        "check_allocs: {n} allowed Checks; per Check: {:.2} allocations, {:.0} bytes allocated",
        per(info.count_total, building.count_total),
        per(info.bytes_total, building.bytes_total)
    );
}
