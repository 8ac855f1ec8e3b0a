//! Load: ext_authz `Check` throughput and latency on the memory store vs the
//! Redis store, plus what one allowed Check costs Redis.
//!
//! One run of `cargo bench --bench load`:
//! 1. starts its own `redis-server` on an ephemeral loopback port (`--save ""
//!    --appendonly no`), from `TOLLGATE_REDIS_SERVER` or `PATH` (killed at the end);
//! 2. starts two tollgate servers in-process on `127.0.0.1:0`, one on the
//!    memory store and one on the Redis store (behind its cache), both seeded
//!    with one account whose month quota (10^12) is never reached, so every
//!    Check of `GET /v1/search` is allowed and spends one counter;
//! 3. drives Checks at concurrency 64 over one HTTP/2 channel per server,
//!    interleaved memory, redis, memory, redis, recording each call's latency;
//! 4. counts Redis round trips per allowed Check from `INFO commandstats`
//!    (`evalsha` delta over the measured redis runs), and every top-level
//!    command of a short sample with `redis-cli MONITOR`;
//! 5. replays the exact `EVALSHA` one Check sends (taken from the MONITOR
//!    sample) with `redis-benchmark`, unpipelined and with `-P 16`.
//!
//! Client, both servers and their Redis client share one 2-worker tokio
//! runtime; redis-server and redis-benchmark are separate processes on the
//! same machine. Traffic stays on loopback; every loop is bounded in count and time.

mod support;

/// The binary's allocator, so the figures are the binary's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use support::check_request;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tonic::transport::Channel;

/// Checks per measured run.
const CHECKS_PER_RUN: usize = 30_000;
/// Checks in flight during a run.
const CONCURRENCY: usize = 64;
/// Rounds of (memory, redis).
const ROUNDS: usize = 2;
/// Upper bound on one run; a slower run stops early and reports what it did.
const RUN_DEADLINE: Duration = Duration::from_secs(60);
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

// ---------------------------------------------------------------- redis-server

/// A Redis tool: `$env`, else next to `$TOLLGATE_REDIS_SERVER`, else on `PATH`,
/// else in the crate's `.tools/bin` (where `scripts/test.sh` installs it).
fn tool(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let sibling = std::env::var_os("TOLLGATE_REDIS_SERVER")
        .and_then(|s| PathBuf::from(s).parent().map(|d| d.join(name)))
        .filter(|p| p.is_file());
    let on_path =
        || std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()));
    let tools = || Some(Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin").join(name)).filter(|p| p.is_file());
    sibling
        .or_else(on_path)
        .or_else(tools)
        .unwrap_or_else(|| panic!("{name} not found: set {env}, put it on PATH, or run scripts/test.sh once"))
}

/// Waits for `child` at most `deadline`, killing it when late; true when it exited successfully.
fn wait_bounded(child: &mut Child, deadline: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status.success();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// Our redis-server, killed on drop.
struct Redis {
    port: u16,
    dir: PathBuf,
    server: PathBuf,
    cli: PathBuf,
    child: Option<Child>,
}

impl Redis {
    fn start() -> Self {
        let server = tool("TOLLGATE_REDIS_SERVER", "redis-server");
        let cli = tool("TOLLGATE_REDIS_CLI", "redis-cli");
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let dir = std::env::temp_dir().join(format!("tollgate-bench-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("redis dir");
            let child = Command::new(&server)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--dir", dir.to_str().expect("utf-8 temp dir")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            let mut redis = Self { port, dir, server: server.clone(), cli: cli.clone(), child: Some(child) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if redis.cli(&["PING"]).trim() == "PONG" {
                    return redis;
                }
                if let Some(Ok(Some(_))) = redis.child.as_mut().map(Child::try_wait) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(redis);
        }
        panic!("could not start redis-server");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs redis-cli against this server; its stdout ("" when it fails).
    fn cli(&self, args: &[&str]) -> String {
        let mut child = Command::new(&self.cli)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-cli");
        let mut stdout = child.stdout.take().expect("stdout");
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
            s
        });
        let ok = wait_bounded(&mut child, Duration::from_secs(10));
        let out = reader.join().unwrap_or_default();
        if ok && !out.starts_with("Could not connect") { out } else { String::new() }
    }

    /// `INFO commandstats`: calls per command.
    fn commandstats(&self) -> HashMap<String, u64> {
        self.cli(&["INFO", "commandstats"])
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(":calls=")?;
                Some((name.to_owned(), rest.split(',').next()?.parse().ok()?))
            })
            .collect()
    }

    /// redis-server's CPU seconds so far (user + sys, from `INFO cpu`).
    fn cpu_seconds(&self) -> f64 {
        self.cli(&["INFO", "cpu"])
            .lines()
            .filter_map(|l| l.strip_prefix("used_cpu_user:").or_else(|| l.strip_prefix("used_cpu_sys:")))
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .sum()
    }

    /// `redis-server --version`, first line.
    fn version(&self) -> String {
        let out = Command::new(&self.server).arg("--version").output().map(|o| o.stdout).unwrap_or_default();
        String::from_utf8_lossy(&out).lines().next().unwrap_or("?").to_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `redis-cli MONITOR`, writing into a file.
struct Monitor {
    child: Child,
    out: PathBuf,
}

impl Monitor {
    fn start(redis: &Redis) -> Self {
        let out = redis.dir.join("monitor.log");
        let file = std::fs::File::create(&out).expect("monitor log");
        let child = Command::new(&redis.cli)
            .args(["-h", "127.0.0.1", "-p", &redis.port.to_string(), "MONITOR"])
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-cli MONITOR");
        let mut monitor = Self { child, out };
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&monitor.out).map(|s| !s.contains("OK")).unwrap_or(true) {
            if Instant::now() > deadline {
                monitor.kill();
                panic!("MONITOR did not start");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        monitor
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops; returns each top-level command (script-internal ones, tagged `lua`, left out) as its arguments.
    fn stop(mut self) -> Vec<Vec<String>> {
        std::thread::sleep(Duration::from_millis(300));
        self.kill();
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .filter(|l| !l.contains(" lua]"))
            .filter_map(|l| l.split_once("] ").map(|(_, rest)| monitor_args(rest)))
            .filter(|args| !args.is_empty())
            .collect()
    }
}

/// Splits a MONITOR line's `"ARG" "ARG" ...` into its arguments (undoing `\"`, `\\`, `\xHH`).
fn monitor_args(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut bytes = Vec::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('x') => {
                        let hex: String = chars.by_ref().take(2).collect();
                        bytes.push(u8::from_str_radix(&hex, 16).unwrap_or(b'?'));
                    }
                    Some('n') => bytes.push(b'\n'),
                    Some('r') => bytes.push(b'\r'),
                    Some('t') => bytes.push(b'\t'),
                    Some(other) => bytes.extend(other.to_string().as_bytes()),
                    None => break,
                },
                other => bytes.extend(other.to_string().as_bytes()),
            }
        }
        args.push(String::from_utf8_lossy(&bytes).into_owned());
    }
    args
}

/// One `redis-benchmark` result.
struct BenchResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs `redis-benchmark ... -P pipeline --csv <command>`; `None` when it fails.
fn redis_benchmark(redis: &Redis, pipeline: usize, command: &[String]) -> Option<BenchResult> {
    let bin = tool("TOLLGATE_REDIS_BENCHMARK", "redis-benchmark");
    let out_path = redis.dir.join(format!("benchmark-P{pipeline}.csv"));
    let out = std::fs::File::create(&out_path).expect("benchmark output");
    let (port, n, c, p) =
        (redis.port.to_string(), BENCHMARK_REQUESTS.to_string(), BENCHMARK_CLIENTS.to_string(), pipeline.to_string());
    let mut child = Command::new(bin)
        .args(["-h", "127.0.0.1", "-p", &port, "-c", &c, "-n", &n, "-P", &p, "-q", "--csv"])
        .args(command)
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-benchmark");
    let ok = wait_bounded(&mut child, CHILD_DEADLINE);
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    // CSV: "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let row = text.lines().rev().find(|l| !l.starts_with("\"test\"") && l.matches(',').count() >= 7)?;
    let fields: Vec<f64> = row.rsplit(',').take(7).map(|f| f.trim_matches('"').parse().unwrap_or(f64::NAN)).collect();
    // Reversed: max, p99, p95, p50, min, avg, rps.
    ok.then_some(BenchResult { rps: fields[6], p50_ms: fields[3], p99_ms: fields[1] })
}

// ---------------------------------------------------------------- tollgate

// ---------------------------------------------------------------- load

/// What one run did.
#[derive(Debug, Default)]
struct Run {
    allowed: usize,
    denied: usize,
    errors: usize,
    elapsed: Duration,
    /// Per-call latencies in ns, sorted.
    latencies: Vec<u64>,
}

impl Run {
    fn calls(&self) -> usize {
        self.allowed + self.denied + self.errors
    }

    fn rate(&self) -> f64 {
        self.calls() as f64 / self.elapsed.as_secs_f64()
    }

    /// Nearest-rank percentile in ms.
    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((p * self.latencies.len() as f64).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[rank - 1] as f64 / 1e6
    }
}

/// Runs up to `calls` Checks with `CONCURRENCY` in flight, each timed.
async fn run_load(client: &AuthorizationClient<Channel>, request: &CheckRequest, calls: usize) -> Run {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (mut client, request, next) = (client.clone(), request.clone(), next.clone());
            tokio::spawn(async move {
                let mut run = Run { latencies: Vec::with_capacity(calls / CONCURRENCY + 1), ..Run::default() };
                while next.fetch_add(1, Ordering::Relaxed) < calls && started.elapsed() < RUN_DEADLINE {
                    let t = Instant::now();
                    let answer = client.check(request.clone()).await;
                    run.latencies.push(t.elapsed().as_nanos() as u64);
                    match answer.map(|r| r.into_inner().status.map_or(-1, |s| s.code)) {
                        Ok(0) => run.allowed += 1,
                        Ok(_) => run.denied += 1,
                        Err(_) => run.errors += 1,
                    }
                }
                run
            })
        })
        .collect();
    let mut total = Run::default();
    for w in workers {
        let run = w.await.expect("load worker");
        total.allowed += run.allowed;
        total.denied += run.denied;
        total.errors += run.errors;
        total.latencies.extend(run.latencies);
    }
    total.elapsed = started.elapsed();
    total.latencies.sort_unstable();
    total
}

/// This process's CPU seconds so far (user + sys from `/proc/self/stat`, in 1/100 s ticks); NaN off Linux.
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<f64>().ok());
    match (ticks(14), ticks(15)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

/// The median of `xs` (mean of the middle two for an even count).
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Medians over rounds: (checks/s, p50 ms, p99 ms).
fn medians(runs: &[Run]) -> (f64, f64, f64) {
    (
        median(runs.iter().map(Run::rate).collect()),
        median(runs.iter().map(|r| r.percentile_ms(0.50)).collect()),
        median(runs.iter().map(|r| r.percentile_ms(0.99)).collect()),
    )
}

fn delta(after: &HashMap<String, u64>, before: &HashMap<String, u64>, name: &str) -> u64 {
    after.get(name).copied().unwrap_or(0).saturating_sub(before.get(name).copied().unwrap_or(0))
}

fn main() {
    // Like criterion: measure only under `cargo bench` (which passes `--bench`), not when listing or testing.
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--list" || a == "--test") {
        println!("load: nothing to do without --bench (run `cargo bench --bench load`)");
        return;
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());

    let redis = Redis::start();
    println!("load: {} on 127.0.0.1:{} ({})", redis.server.display(), redis.port, redis.version());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let memory = rt.block_on(support::start_tollgate("{ backend: memory, on_error: deny, timeout: 200ms }"));
    let redis_store = format!("{{ backend: redis, url: \"{}\", on_error: deny, timeout: 200ms }}", redis.url());
    let on_redis = rt.block_on(support::start_tollgate(&redis_store));
    let request = check_request();
    let mut redis_allowed_total = 0usize;

    // Warm-up: a few sequential Checks fill the cache (and load the script), then one unmeasured run each.
    for (name, server) in [("memory", &memory), ("redis", &on_redis)] {
        for _ in 0..5 {
            let answer = rt.block_on(server.client.clone().check(request.clone())).expect("warm-up check").into_inner();
            assert_eq!(answer.status.map_or(-1, |s| s.code), 0, "{name}: the warm-up Check must be allowed");
        }
        let warm = rt.block_on(run_load(&server.client, &request, WARMUP_CHECKS));
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
        for (name, server) in [("memory", &memory), ("redis", &on_redis)] {
            let (redis_cpu, own_cpu) = (redis.cpu_seconds(), process_cpu_seconds());
            let run = rt.block_on(run_load(&server.client, &request, CHECKS_PER_RUN));
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
    let monitor = Monitor::start(&redis);
    let sample = rt.block_on(run_load(&on_redis.client, &request, MONITOR_CHECKS));
    let seen = monitor.stop();
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
    let counter = replay.as_ref().and_then(|a| a.get(3)).map(|key| redis.cli(&["GET", key]).trim().to_owned());

    // redis-benchmark: the same EVALSHA (it spends on the same counter; the quota is never reached).
    let bench = replay.as_ref().map(|cmd| (redis_benchmark(&redis, 1, cmd), redis_benchmark(&redis, 16, cmd)));

    // Stop everything.
    let support::Tollgate { client: c1, stop: s1, task: t1 } = memory;
    let support::Tollgate { client: c2, stop: s2, task: t2 } = on_redis;
    drop((c1, c2));
    let _ = (s1.send(()), s2.send(()));
    rt.block_on(async {
        for task in [t1, t2] {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    });
    drop(rt);

    // Report.
    let (m_rate, m_p50, m_p99) = medians(&memory_runs);
    let (r_rate, r_p50, r_p99) = medians(&redis_runs);
    let checks_redis: usize = redis_runs.iter().map(Run::calls).sum();
    let fmt_bench = |r: &Option<BenchResult>| match r {
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
