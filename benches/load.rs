//! Load: ext_authz `Check` throughput and latency on the memory store vs the
//! Redis store, plus what one allowed Check costs Redis.
//!
//! One run of `cargo bench --bench load`:
//! 1. starts its own `redis-server` (the kit's `RedisServer`: an ephemeral
//!    loopback port, `--save "" --appendonly no`, from `TOLLGATE_REDIS_SERVER`,
//!    `PATH` or `.tools/bin`; killed at the end);
//! 2. starts two tollgate servers in-process on `127.0.0.1:0` (the kit's
//!    `TestServer`), one on the memory store and one on the Redis store (behind
//!    its cache), both seeded with the kit's bench config: one account whose
//!    month quota (10^12) is never reached, so every Check of `GET /v1/search`
//!    is allowed and spends one counter;
//! 3. drives Checks at concurrency 64 over one HTTP/2 channel per server,
//!    interleaved memory, redis, memory, redis, recording each call's latency;
//! 4. counts Redis round trips per allowed Check from `INFO commandstats`
//!    (`evalsha` delta over the measured redis runs), and every top-level
//!    command of a short sample with `redis-cli MONITOR`;
//! 5. replays the exact `EVALSHA` one Check sends (taken from the MONITOR
//!    sample) with `redis-benchmark`, unpipelined and with `-P 16`;
//! 6. starts a third server on the same Redis in lease mode
//!    (`store.counting: lease`) and runs it interleaved with the memory store
//!    again (`LEASE_ROUNDS` pairs), counting its Redis calls per allowed Check.
//!
//! Client, both servers and their Redis client share one 2-worker tokio
//! runtime; redis-server and redis-benchmark are separate processes on the
//! same machine. Traffic stays on loopback; every loop is bounded in count and time.

/// The binary's allocator, so the figures are the binary's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tollgate_testkit::bench::{self, check_request};
use tollgate_testkit::cpu::process_cpu_seconds;
use tollgate_testkit::load::{Run, medians, run_load};
use tollgate_testkit::redis::{Benchmark, BenchmarkResult, RedisServer};

/// Checks per measured run.
const CHECKS_PER_RUN: usize = 30_000;
/// Checks in flight during a run.
const CONCURRENCY: usize = 64;
/// Rounds of (memory, redis).
const ROUNDS: usize = 2;
/// Rounds of the lease phase: its ratio to memory is the one with a goal
/// (0.95x), so it gets more interleaved pairs against this machine's noise.
const LEASE_ROUNDS: usize = 5;
/// Checks per server in the unmeasured warm-up run.
const WARMUP_CHECKS: usize = 2_000;
/// Checks sent to the redis server while `MONITOR` records.
const MONITOR_CHECKS: usize = 2_000;
/// `redis-benchmark -n`.
const BENCHMARK_REQUESTS: usize = 200_000;
/// `redis-benchmark -c`.
const BENCHMARK_CLIENTS: usize = 50;
/// Upper bound on any child process we wait for.
const CHILD_DEADLINE: Duration = Duration::from_secs(120);
/// Commands a Check's spend script runs inside Redis for one calendar quota (no credits).
const SCRIPT_INTERNAL: [&str; 4] = ["time", "get", "incrby", "pexpireat"];

/// `redis-benchmark` of `command` with [`BENCHMARK_CLIENTS`] clients and `pipeline`.
fn redis_benchmark(redis: &RedisServer, pipeline: usize, command: &[String]) -> Option<BenchmarkResult> {
    let run =
        Benchmark { clients: BENCHMARK_CLIENTS, requests: BENCHMARK_REQUESTS, pipeline, deadline: CHILD_DEADLINE };
    redis.benchmark(&run, command)
}

fn delta(after: &HashMap<String, u64>, before: &HashMap<String, u64>, name: &str) -> u64 {
    after.get(name).copied().unwrap_or(0).saturating_sub(before.get(name).copied().unwrap_or(0))
}

fn main() {
    if !bench::measuring() {
        println!("load: nothing to do without --bench (run `cargo bench --bench load`)");
        return;
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());

    let redis = RedisServer::start();
    println!("load: {} on 127.0.0.1:{} ({})", redis.binary().display(), redis.port, redis.version());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let memory_server = rt.block_on(bench::start("{ backend: memory, on_error: deny, timeout: 200ms }"));
    let redis_store = format!("{{ backend: redis, url: \"{}\", on_error: deny, timeout: 200ms }}", redis.url());
    let redis_server = rt.block_on(bench::start(&redis_store));
    let (memory, on_redis) = (rt.block_on(memory_server.channel()), rt.block_on(redis_server.channel()));
    let request = check_request();
    let mut redis_allowed_total = 0usize;

    // Warm-up: a few sequential Checks fill the cache (and load the script), then one unmeasured run each.
    for (name, client) in [("memory", &memory), ("redis", &on_redis)] {
        for _ in 0..5 {
            let answer = rt
                .block_on(AuthorizationClient::new(client.clone()).check(request.clone()))
                .expect("warm-up check")
                .into_inner();
            assert_eq!(answer.status.map_or(-1, |s| s.code), 0, "{name}: the warm-up Check must be allowed");
        }
        let warm = rt.block_on(run_load(client, &request, WARMUP_CHECKS, CONCURRENCY));
        assert_eq!(warm.allowed, warm.calls(), "{name}: every warm-up Check must be allowed: {warm:?}");
        if name == "redis" {
            redis_allowed_total += 5 + warm.allowed;
        }
    }

    println!(
        "load: {CHECKS_PER_RUN} checks per run, concurrency {CONCURRENCY}, {ROUNDS} rounds interleaved, \
         one HTTP/2 channel per server, client and both servers on one 2-worker runtime, {cores} cores"
    );
    let before = redis.commandstats();
    let (mut memory_runs, mut redis_runs) = (Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        for (name, client) in [("memory", &memory), ("redis", &on_redis)] {
            let (redis_cpu, own_cpu) = (redis.cpu_seconds(), process_cpu_seconds());
            let run = rt.block_on(run_load(client, &request, CHECKS_PER_RUN, CONCURRENCY));
            let secs = run.elapsed.as_secs_f64();
            let (redis_cpu, own_cpu) = (redis.cpu_seconds() - redis_cpu, process_cpu_seconds() - own_cpu);
            println!(
                "  round {round} {name:<6}: {} checks ({} allowed, {} denied, {} errors) in {:.3}s = {:.0} checks/s, \
                 p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; CPU: bench process {:.2} cores, redis-server {:.2} cores",
                run.calls(),
                run.allowed,
                run.denied,
                run.errors,
                run.elapsed.as_secs_f64(),
                run.rate(),
                run.percentile_ms(0.50),
                run.percentile_ms(0.99),
                run.percentile_ms(1.0),
                own_cpu / secs,
                redis_cpu / secs,
            );
            if name == "memory" { memory_runs.push(run) } else { redis_runs.push(run) }
        }
    }
    let after = redis.commandstats();
    let redis_allowed: usize = redis_runs.iter().map(|r| r.allowed).sum();
    redis_allowed_total += redis_allowed;

    // Round trips, from commandstats over the measured redis runs (memory runs send Redis nothing).
    let evalsha = delta(&after, &before, "evalsha");
    let (ping, info) = (delta(&after, &before, "ping"), delta(&after, &before, "info"));
    let internal: u64 = SCRIPT_INTERNAL.iter().map(|c| delta(&after, &before, c)).sum();
    let all: u64 = after.keys().map(|k| delta(&after, &before, k)).sum();
    let other_inferred = all as i64 - evalsha as i64 * (1 + SCRIPT_INTERNAL.len() as i64) - ping as i64 - info as i64;
    let mut changed: Vec<String> = after
        .keys()
        .filter(|k| delta(&after, &before, k) > 0)
        .map(|k| format!("{k} {}", delta(&after, &before, k)))
        .collect();
    changed.sort();

    // A MONITOR sample: every top-level command, and the exact EVALSHA to replay.
    let monitor = redis.monitor();
    let sample = rt.block_on(run_load(&on_redis, &request, MONITOR_CHECKS, CONCURRENCY));
    let seen = monitor.stop_commands();
    redis_allowed_total += sample.allowed;
    let mut top_level: HashMap<String, usize> = HashMap::new();
    for args in &seen {
        *top_level.entry(args[0].to_lowercase()).or_default() += 1;
    }
    let mut top_level: Vec<(String, usize)> = top_level.into_iter().collect();
    top_level.sort();
    let sample_other: usize =
        top_level.iter().filter(|(c, _)| !matches!(c.as_str(), "evalsha" | "ping" | "info")).map(|(_, n)| n).sum();
    let replay = seen.iter().find(|a| a[0].eq_ignore_ascii_case("evalsha")).cloned();

    // Sanity: the month counter holds every allowed redis Check.
    let counter = replay
        .as_ref()
        .and_then(|a| a.get(3))
        .map(|key| redis.cli(&["GET", key]).unwrap_or_default().trim().to_owned());

    // redis-benchmark: the same EVALSHA (it spends on the same counter; the quota is never reached).
    let bench = replay.as_ref().map(|cmd| (redis_benchmark(&redis, 1, cmd), redis_benchmark(&redis, 16, cmd)));

    // Lease mode (`store.counting: lease`): a third server on the same Redis
    // whose replica takes blocks of the month quota and spends them locally;
    // interleaved with the memory store again, Redis calls counted alone.
    let lease_store =
        format!("{{ backend: redis, url: \"{}\", on_error: deny, timeout: 200ms, counting: lease }}", redis.url());
    let lease_server = rt.block_on(bench::start(&lease_store));
    let on_lease = rt.block_on(lease_server.channel());
    let warm = rt.block_on(run_load(&on_lease, &request, WARMUP_CHECKS, CONCURRENCY));
    assert_eq!(warm.allowed, warm.calls(), "lease: every warm-up Check must be allowed: {warm:?}");
    let lease_before = redis.commandstats();
    let (mut lease_memory_runs, mut lease_runs) = (Vec::new(), Vec::new());
    for _ in 1..=LEASE_ROUNDS {
        lease_memory_runs.push(rt.block_on(run_load(&memory, &request, CHECKS_PER_RUN, CONCURRENCY)));
        lease_runs.push(rt.block_on(run_load(&on_lease, &request, CHECKS_PER_RUN, CONCURRENCY)));
    }
    let lease_evalsha = delta(&redis.commandstats(), &lease_before, "evalsha");
    let lease_allowed: usize = lease_runs.iter().map(|r| r.allowed).sum();
    assert_eq!(lease_allowed, lease_runs.iter().map(Run::calls).sum::<usize>(), "lease: every Check must be allowed");

    // Stop everything.
    drop((memory, on_redis, on_lease));
    rt.block_on(async {
        memory_server.stop().await;
        redis_server.stop().await;
        lease_server.stop().await;
    });
    drop(rt);

    // Report.
    let (m_rate, m_p50, m_p99) = medians(&memory_runs);
    let (r_rate, r_p50, r_p99) = medians(&redis_runs);
    let checks_redis: usize = redis_runs.iter().map(Run::calls).sum();
    let fmt_bench = |r: &Option<BenchmarkResult>| match r {
        Some(b) => format!("{:.0} req/s  (p50 {:.3} ms, p99 {:.3} ms)", b.rps, b.p50_ms, b.p99_ms),
        None => "failed".to_owned(),
    };
    println!();
    println!("commandstats deltas over the measured redis runs: {}", changed.join(", "));
    println!(
        "  note: commandstats also counts commands run inside Lua scripts: {} are the spend script's \
         internal calls, not round trips",
        SCRIPT_INTERNAL.join("/")
    );
    println!(
        "MONITOR sample ({} checks, {} allowed): top-level commands {}",
        sample.calls(),
        sample.allowed,
        top_level.iter().map(|(c, n)| format!("{c} {n}")).collect::<Vec<_>>().join(", ")
    );
    if let Some(cmd) = &replay {
        println!("replayed EVALSHA: {}", cmd.join(" "));
    }
    if let Some(c) = &counter {
        println!("month counter after all redis Checks: {c} (allowed redis Checks sent: {redis_allowed_total})");
    }
    println!();
    println!("== load: {cores}-core, client in-process, concurrency {CONCURRENCY}, {CHECKS_PER_RUN} checks/run ==");
    let rounds = |runs: &[Run]| runs.iter().map(|r| format!("{:.0}", r.rate())).collect::<Vec<_>>().join(", ");
    println!(
        "memory : {m_rate:.0} checks/s  p50 {m_p50:.2} ms  p99 {m_p99:.2} ms   (rounds: {} checks/s)",
        rounds(&memory_runs)
    );
    println!(
        "redis  : {r_rate:.0} checks/s  p50 {r_p50:.2} ms  p99 {r_p99:.2} ms   ({:.2}x memory; rounds: {} checks/s)",
        r_rate / m_rate,
        rounds(&redis_runs)
    );
    let (lm_rate, _, _) = medians(&lease_memory_runs);
    let (l_rate, l_p50, l_p99) = medians(&lease_runs);
    println!(
        "redis, lease mode: {l_rate:.0} checks/s  p50 {l_p50:.2} ms  p99 {l_p99:.2} ms   ({:.2}x memory in the same \
         interleaved rounds, memory {lm_rate:.0}; rounds: {} checks/s)",
        l_rate / lm_rate,
        rounds(&lease_runs)
    );
    println!(
        "lease mode: redis calls per allowed check {:.4} (evalsha {lease_evalsha} / {lease_allowed} allowed checks)",
        lease_evalsha as f64 / lease_allowed as f64
    );
    println!(
        "redis round trips per allowed check: {:.2} (evalsha {evalsha} / {redis_allowed} allowed checks of {checks_redis})",
        evalsha as f64 / redis_allowed as f64
    );
    println!(
        "other top-level commands: {other_inferred} in the runs (all − {}×evalsha − ping {ping} − info {info}), \
         {sample_other} in the MONITOR sample",
        1 + SCRIPT_INTERNAL.len()
    );
    println!(
        "script-internal commands per allowed check: {:.2} ({internal} in total)",
        internal as f64 / evalsha as f64
    );
    if let Some((p1, p16)) = &bench {
        println!("redis-benchmark EVALSHA -c {BENCHMARK_CLIENTS} -P 1 : {}", fmt_bench(p1));
        println!("redis-benchmark EVALSHA -c {BENCHMARK_CLIENTS} -P 16: {}", fmt_bench(p16));
    } else {
        println!("redis-benchmark: no EVALSHA seen in the MONITOR sample");
    }
}
