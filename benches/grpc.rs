//! End-to-end ext_authz `Check` over gRPC on loopback, client in the same process.
//!
//! Two servers run in-process on one 2-worker tokio runtime:
//! - `echo`: the kit's `noop` server, a bare tonic `Authorization` service whose
//!   `check` returns an OK `CheckResponse` with no logic (the floor: tonic unary
//!   round trip), accepting connections as tonic's `Server::serve` does by
//!   default (TCP_NODELAY on);
//! - `tollgate-memory`: [`tollgate::server::run`] with the memory store, the
//!   kit's bench config (quotas never reached, a metered `/v1/search` route),
//!   started in-process as the kit's `TestServer`.
//!
//! Measures (a) sequential latency per call with criterion, and (b) throughput
//! at concurrency 32: a bounded custom loop of N calls per run, interleaved
//! echo, tollgate, echo, tollgate, …, printing `throughput <name>: <n> req/s`
//! and the process's CPU time per call (client and servers: what tollgate
//! adds to it is what it costs). The throughput client reads only each
//! answer's status (`load::Verdict`): decoding all of tollgate's ~400-byte
//! answer would charge the server for the client's work (Envoy's cost of
//! the answer is measured through Envoy, `benches/envoy.rs`).
//! Run with `cargo bench --bench grpc`.
//!
//! With `--only echo|tollgate --checks N` it makes N Checks of that server at
//! concurrency 32 after the same warm-up, and nothing else: what
//! `scripts/callgrind-grpc.sh` counts instructions on (the whole process,
//! client, server and runtime, minus a run of 0 calls).

/// The binary's allocator, so the figures are the binary's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

use criterion::Criterion;
use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tokio::runtime::Runtime;
use tollgate_testkit::TestServer;
use tollgate_testkit::bench::{self, check_request};
use tollgate_testkit::cpu::process_cpu_seconds;
use tollgate_testkit::load::{Run, median, run_load};
use tollgate_testkit::noop::{Noop, NoopServer};
use tollgate_testkit::server::channel;
use tonic::transport::Channel;

/// Calls per throughput run.
const THROUGHPUT_CALLS: usize = 20_000;
/// Calls in flight during a throughput run.
const CONCURRENCY: usize = 32;
/// Rounds of (echo, tollgate).
const ROUNDS: usize = 5;

/// The servers and one client channel to each.
struct Servers {
    echo: Channel,
    tollgate: Channel,
    echo_server: NoopServer,
    tollgate_server: TestServer,
}

async fn start() -> Servers {
    // The floor: a tonic `Authorization` service with no logic at all.
    let echo_server = NoopServer::start(Noop::bare()).await;
    // tollgate with the memory store, seeded like `tollgate seed` does.
    let tollgate_server = bench::start("{ backend: memory, on_error: deny, timeout: 50ms }").await;
    Servers {
        echo: channel(echo_server.addr).await,
        tollgate: tollgate_server.channel().await,
        echo_server,
        tollgate_server,
    }
}

/// One Check, its answer decoded whole; panics unless it is an OK (allow).
async fn check_ok(channel: &Channel, request: CheckRequest) {
    let response = AuthorizationClient::new(channel.clone()).check(request).await.expect("check rpc").into_inner();
    let code = response.status.as_ref().map_or(-1, |s| s.code);
    assert_eq!(code, 0, "expected an allow, got {response:?}");
}

/// Up to `calls` Checks with `CONCURRENCY` in flight; panics unless every one was allowed.
fn run_allowed(rt: &Runtime, name: &str, client: &Channel, request: &CheckRequest, calls: usize) -> Run {
    let run = rt.block_on(run_load(client, request, calls, CONCURRENCY));
    assert_eq!(run.allowed, run.calls(), "{name}: every Check must be allowed: {run:?}");
    run
}

/// The throughput comparison: echo, tollgate, echo, tollgate at concurrency 32.
fn throughput(rt: &Runtime, servers: &Servers, request: &CheckRequest) {
    let targets = [("echo", &servers.echo), ("tollgate-memory", &servers.tollgate)];
    println!(
        "throughput: {THROUGHPUT_CALLS} calls per run, concurrency {CONCURRENCY}, {ROUNDS} rounds interleaved, \
         one HTTP/2 channel per server, client and servers on one 2-worker runtime"
    );
    // Warm up connections, allocators and the store's counters.
    for (name, client) in targets {
        run_allowed(rt, name, client, request, 2_000);
    }
    let mut totals = [(0usize, Duration::ZERO); 2];
    let mut cpu_per_call = [Vec::new(), Vec::new()];
    for round in 1..=ROUNDS {
        for (i, (name, client)) in targets.iter().enumerate() {
            let cpu = process_cpu_seconds();
            let run = run_allowed(rt, name, client, request, THROUGHPUT_CALLS);
            let cpu = process_cpu_seconds() - cpu;
            let (done, elapsed) = (run.calls(), run.elapsed);
            println!(
                "  round {round} {name}: {done} calls in {:.3}s = {:.0} req/s; process CPU {:.2} cores, {:.1} µs per call",
                elapsed.as_secs_f64(),
                done as f64 / elapsed.as_secs_f64(),
                cpu / elapsed.as_secs_f64(),
                cpu * 1e6 / done as f64,
            );
            cpu_per_call[i].push(cpu * 1e6 / done as f64);
            totals[i].0 += done;
            totals[i].1 += elapsed;
        }
    }
    let rate = |(done, elapsed): (usize, Duration)| done as f64 / elapsed.as_secs_f64();
    let (echo, tollgate) = (rate(totals[0]), rate(totals[1]));
    println!("throughput echo: {echo:.0} req/s");
    println!("throughput tollgate-memory: {tollgate:.0} req/s (ratio {:.2})", tollgate / echo);
    let [echo_cpu, tollgate_cpu] = cpu_per_call.map(median);
    println!(
        "CPU per call (median of {ROUNDS} rounds): echo {echo_cpu:.1} µs, tollgate-memory {tollgate_cpu:.1} µs \
         (echo / tollgate {:.2})",
        echo_cpu / tollgate_cpu
    );
}

/// Sequential latency: one call at a time, criterion-timed.
fn sequential(c: &mut Criterion, rt: &Runtime, servers: &Servers, request: &CheckRequest) {
    let mut g = c.benchmark_group("grpc_check_sequential");
    for (name, client) in [("echo", &servers.echo), ("tollgate-memory", &servers.tollgate)] {
        g.bench_function(name, |b| {
            b.to_async(rt).iter(|| {
                let (client, request) = (client.clone(), request.clone());
                async move { check_ok(&client, request).await }
            })
        });
    }
    g.finish();
}

/// `--only NAME` of this process's arguments: the one server to call.
fn only_arg() -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let servers = rt.block_on(start());
    let request = check_request();
    // Both servers answer an allow before anything is measured.
    rt.block_on(check_ok(&servers.echo, request.clone()));
    rt.block_on(check_ok(&servers.tollgate, request.clone()));

    if let Some(name) = only_arg() {
        let client = match name.as_str() {
            "echo" => &servers.echo,
            "tollgate" => &servers.tollgate,
            _ => panic!("--only echo|tollgate, got {name}"),
        };
        run_allowed(&rt, &name, client, &request, 2_000);
        let calls = bench::checks_arg(0);
        if calls > 0 {
            run_allowed(&rt, &name, client, &request, calls);
        }
        println!("grpc --only {name}: {calls} calls after 2000 warm-up");
        return;
    }

    let mut criterion = Criterion::default().configure_from_args();
    sequential(&mut criterion, &rt, &servers, &request);
    criterion.final_summary();

    if bench::measuring() {
        throughput(&rt, &servers, &request);
    }

    let Servers { echo, tollgate, echo_server, tollgate_server } = servers;
    drop((echo, tollgate));
    rt.block_on(async {
        echo_server.stop().await;
        tollgate_server.stop().await;
    });
}
