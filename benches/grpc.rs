//! End-to-end ext_authz `Check` over gRPC on loopback, client in the same process.
//!
//! Two servers run in-process on one 2-worker tokio runtime:
//! - `echo`: a bare tonic `Authorization` service whose `check` returns an OK
//!   `CheckResponse` with no logic (the floor: tonic unary round trip), accepting
//!   connections as tonic's `Server::serve` does by default (TCP_NODELAY on);
//! - `tollgate-memory`: [`tollgate::server::run`] with the memory store, a
//!   config whose quotas are never reached, and a metered `/v1/search` route,
//!   on listeners bound here exactly as `main` binds them.
//!
//! Measures (a) sequential latency per call with criterion, and (b) throughput
//! at concurrency 32: a bounded custom loop of N calls per run, interleaved
//! echo, tollgate, echo, tollgate, printing `throughput <name>: <n> req/s`.
//! Run with `cargo bench --bench grpc`.

mod support;

/// The binary's allocator, so the figures are the binary's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use support::check_request;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, HttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::google::rpc;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::transport::server::TcpIncoming;

/// Calls per throughput run.
const THROUGHPUT_CALLS: usize = 20_000;
/// Calls in flight during a throughput run.
const CONCURRENCY: usize = 32;
/// Rounds of (echo, tollgate).
const ROUNDS: usize = 2;
/// Upper bound on one throughput run; a slower run stops early and reports what it did.
const RUN_DEADLINE: Duration = Duration::from_secs(60);

/// The floor: a tonic `Authorization` service with no logic at all.
#[derive(Debug, Default)]
struct Echo;

#[tonic::async_trait]
impl Authorization for Echo {
    async fn check(
        &self,
        _request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(CheckResponse {
            status: Some(rpc::Status { code: 0, message: String::new(), details: Vec::new() }),
            dynamic_metadata: None,
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
        }))
    }
}

/// The servers and one client channel to each.
struct Servers {
    echo: AuthorizationClient<Channel>,
    tollgate: AuthorizationClient<Channel>,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn connect(addr: SocketAddr) -> AuthorizationClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect");
    AuthorizationClient::new(channel)
}

async fn start() -> Servers {
    // The echo floor, accepting like `Server::serve` does by default (TCP_NODELAY on).
    let echo_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let echo_addr = echo_listener.local_addr().expect("echo addr");
    let echo_incoming = TcpIncoming::from(echo_listener).with_nodelay(Some(true));
    let (echo_stop, echo_rx) = oneshot::channel::<()>();
    let echo_task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(AuthorizationServer::new(Echo))
            .serve_with_incoming_shutdown(echo_incoming, async {
                let _ = echo_rx.await;
            })
            .await
            .expect("echo server");
    });

    // tollgate with the memory store, seeded like `tollgate seed` does.
    let tollgate = support::start_tollgate("{ backend: memory, on_error: deny, timeout: 50ms }").await;

    Servers {
        echo: connect(echo_addr).await,
        tollgate: tollgate.client,
        stops: vec![echo_stop, tollgate.stop],
        tasks: vec![echo_task, tollgate.task],
    }
}

/// One Check; panics unless the answer is an OK (allow).
async fn check_ok(client: &mut AuthorizationClient<Channel>, request: CheckRequest) {
    let response = client.check(request).await.expect("check rpc").into_inner();
    let code = response.status.as_ref().map_or(-1, |s| s.code);
    assert_eq!(code, 0, "expected an allow, got {response:?}");
}

/// Runs up to `calls` Checks with `CONCURRENCY` in flight; returns (calls done, elapsed).
async fn run_load(client: &AuthorizationClient<Channel>, request: &CheckRequest, calls: usize) -> (usize, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (mut client, request, next) = (client.clone(), request.clone(), next.clone());
            tokio::spawn(async move {
                let mut done = 0usize;
                while next.fetch_add(1, Ordering::Relaxed) < calls && started.elapsed() < RUN_DEADLINE {
                    check_ok(&mut client, request.clone()).await;
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut done = 0;
    for w in workers {
        done += w.await.expect("load worker");
    }
    (done, started.elapsed())
}

/// The throughput comparison: echo, tollgate, echo, tollgate at concurrency 32.
fn throughput(rt: &Runtime, servers: &Servers, request: &CheckRequest) {
    let targets = [("echo", &servers.echo), ("tollgate-memory", &servers.tollgate)];
    println!(
        "throughput: {THROUGHPUT_CALLS} calls per run, concurrency {CONCURRENCY}, {ROUNDS} rounds interleaved, \
         one HTTP/2 channel per server, client and servers on one 2-worker runtime"
    );
    // Warm up connections, allocators and the store's counters.
    for (_, client) in targets {
        rt.block_on(run_load(client, request, 2_000));
    }
    let mut totals = [(0usize, Duration::ZERO); 2];
    for round in 1..=ROUNDS {
        for (i, (name, client)) in targets.iter().enumerate() {
            let (done, elapsed) = rt.block_on(run_load(client, request, THROUGHPUT_CALLS));
            println!(
                "  round {round} {name}: {done} calls in {:.3}s = {:.0} req/s",
                elapsed.as_secs_f64(),
                done as f64 / elapsed.as_secs_f64()
            );
            totals[i].0 += done;
            totals[i].1 += elapsed;
        }
    }
    let rate = |(done, elapsed): (usize, Duration)| done as f64 / elapsed.as_secs_f64();
    let (echo, tollgate) = (rate(totals[0]), rate(totals[1]));
    println!("throughput echo: {echo:.0} req/s");
    println!("throughput tollgate-memory: {tollgate:.0} req/s (ratio {:.2})", tollgate / echo);
}

/// Sequential latency: one call at a time, criterion-timed.
fn sequential(c: &mut Criterion, rt: &Runtime, servers: &Servers, request: &CheckRequest) {
    let mut g = c.benchmark_group("grpc_check_sequential");
    for (name, client) in [("echo", &servers.echo), ("tollgate-memory", &servers.tollgate)] {
        g.bench_function(name, |b| {
            b.to_async(rt).iter(|| {
                let (mut client, request) = (client.clone(), request.clone());
                async move { check_ok(&mut client, request).await }
            })
        });
    }
    g.finish();
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let servers = rt.block_on(start());
    let request = check_request();
    // Both servers answer an allow before anything is measured.
    rt.block_on(check_ok(&mut servers.echo.clone(), request.clone()));
    rt.block_on(check_ok(&mut servers.tollgate.clone(), request.clone()));

    // Like criterion: measure only under `cargo bench` (which passes `--bench`), not when listing or testing.
    let args: Vec<String> = std::env::args().collect();
    let measuring = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--list" || a == "--test");

    let mut criterion = Criterion::default().configure_from_args();
    sequential(&mut criterion, &rt, &servers, &request);
    criterion.final_summary();

    if measuring {
        throughput(&rt, &servers, &request);
    }

    let Servers { echo, tollgate, stops, tasks } = servers;
    drop((echo, tollgate));
    for stop in stops {
        let _ = stop.send(());
    }
    rt.block_on(async {
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    });
}
