//! End-to-end load through a real Envoy (a bench, not a test): what does
//! putting tollgate in front of an API cost, compared with no ext_authz at all
//! and with an ext_authz server that does nothing?
//!
//! ```text
//! a         Envoy -> app                        (deploy/envoy/envoy.yaml without ext_authz)
//! b         Envoy -Check-> noop_authz -> app    (benches/noop_authz.rs: every Check OK; the floor)
//! b-shaped  Envoy -Check-> noop_authz --shaped  (opt-in: tollgate's allow answer, nothing decided)
//! b-small   b-shaped in DATA frames under h2's chaining threshold, so it leaves in one
//!           write as tollgate's answers do (`--small-frames`; opt-in)
//! b-nometa, b-meta1, b-norl, b-norm, b-lean  b-small without the dynamic metadata, with the
//!           decision alone in it, without the client RateLimit headers, without the header
//!           removals, with the upstream headers alone (opt-in: where Envoy's cost of applying
//!           the answer goes; compared with b-small)
//! c-mem     Envoy -Check-> tollgate (memory store) -> app
//! c-lean    c-mem with `server.dynamic_metadata: lean`: plain allows carry no metadata (opt-in)
//! c-min     c-lean with `server.remove_own_headers: seen`: an allow removes only the
//!           headers the Check showed (the key), not every own header it does not set
//!           (opt-in; since the shipped config says it shows them all, `tollgate-own-headers:
//!           shown`, c-mem's and c-lean's default `auto` removes the same)
//! c-noplan  c-mem with route by plan off (`clear_route_cache: false`: Envoy does not
//!           match the routes again after an allowed Check; opt-in)
//! c-redis   Envoy -Check-> tollgate (Redis store) -> app
//! c-lease   Envoy -Check-> tollgate (Redis store, `store.counting: lease`) -> app (opt-in)
//! c-settle  c-redis with `billing.charge_on: [2xx, 3xx, 4xx]`: every request's
//!           access-log entry streamed back to tollgate and settled (opt-in)
//! c-events  c-settle with usage and threshold events to an HTTP sink (opt-in)
//! c-trace1  c-mem with OpenTelemetry traces to an OTLP collector, 1 % of Checks sampled (opt-in)
//! c-trace100 c-trace1 with every Check sampled (opt-in)
//! c-http    Envoy -GET /envoy/..-> tollgate's HTTP door (memory store) -> app
//!           (deploy/envoy/envoy-http-authz.yaml; opt-in; compare with c-mem)
//! n-alone   nginx -> app (deploy/nginx/tollgate.conf without auth_request; opt-in)
//! n-tollgate nginx -auth_request-> tollgate's HTTP door (memory store) -> app (opt-in)
//! ```
//!
//! ```text
//! scripts/bench-envoy.sh [ARGS]              # installs wrk/Envoy/Redis when missing, then:
//! cargo bench --bench envoy -- [ARGS]        # --help lists the knobs (also BENCH_* variables)
//! ```
//!
//! Every Envoy is the test kit's ([`tollgate_testkit::envoy`]): its config comes
//! from `deploy/envoy/envoy.yaml` through `config_from` (ports rewritten, all on
//! 127.0.0.1; the health-check interval and the Check's timeout put back to
//! the shipped 5 s and 0.25 s), it runs
//! with `--concurrency 1 --disable-hot-restart`, and its per-request access log
//! goes to /dev/null (it costs the same in every variant). The app is
//! `examples/upstream.rs` and the floor `benches/noop_authz.rs`, built here with
//! `cargo build --release` and run as processes, as is the tollgate binary:
//! `config/demo.yaml` plus a `bench` plan (a month quota of 10^12, no rate quota)
//! and one account, so every request is allowed and spends one counter.
//!
//! Load: `wrk -t1 -c32 -d10s --latency` on `GET /v1/search?q=x` with the bench
//! account's `x-api-key`, variants interleaved (a, b, c-mem, c-redis, then
//! again, each round starting one variant later, so no variant always runs
//! in the same place of a round), each run preceded by a 2 s warm-up. Prints markdown: req/s and p99 per
//! round and their medians; the ratios c/b and c/a against the targets (memory
//! ≥ 0.9 b, Redis ≥ 0.8 b); the conditions (cores, load average); CPU per
//! request of each process from /proc (with Envoy on one worker, Envoy's CPU per
//! request bounds the throughput when that worker is saturated) and the CPU
//! used by processes that are not ours; Envoy's view of both hops and its
//! non-2xx and ext_authz counters; and a spend check (tollgate allowed a Check
//! for every request wrk completed). Fails when any variant answers more than
//! 0.1% non-2xx or socket errors, or is not wired as claimed.
//!
//! Needs envoy, redis-server, redis-cli, wrk and (for n-*) nginx, found as the kit finds tools
//! (`ENVOY_BIN`, `TOLLGATE_REDIS_SERVER`, `TOLLGATE_REDIS_CLI`, `WRK_BIN`, `NGINX_BIN`, else
//! PATH, else `.tools/bin`, where `scripts/tools.sh` installs them). All traffic stays on
//! 127.0.0.1; every wait and every load run is bounded, and the whole run after
//! the build by `--deadline`.
//!
//! Under `cargo test --benches` (no `--bench` argument) it prints a hint and
//! exits, as it needs minutes and external tools.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use tollgate_testkit::bench::{self, API_KEY};
use tollgate_testkit::cpu::{self, child_pids, clock_ticks, loadavg, machine_ticks, reaped_children_ticks};
use tollgate_testkit::envoy::{self, Envoy, Options};
use tollgate_testkit::load::median;
use tollgate_testkit::nginx::{self, Nginx};
use tollgate_testkit::noop::Shape;
use tollgate_testkit::process::{KillOnDrop, TollgateProcess, free_addr, temp_dir, wait_child};
use tollgate_testkit::redis::RedisServer;
use tollgate_testkit::wrk::{Wrk, WrkOutput};

/// This package's root: the configs read and where cargo builds the helpers.
/// Not the kit's `repo_root()`: with a target directory shared between
/// checkouts, a fresh-looking kit may have been compiled in another one.
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// What wrk asks for: a metered route of the demo config.
const TARGET_PATH: &str = "/v1/search?q=x";

/// The knobs; each flag also reads a `BENCH_*` variable (the names the shell
/// version of this bench read).
#[derive(Debug, Parser)]
#[command(name = "envoy bench", about = "Load through a real Envoy: no ext_authz, a do-nothing ext_authz, tollgate")]
struct Args {
    /// Variants in run order, separated by spaces or commas (the module doc lists them).
    #[arg(long, env = "BENCH_VARIANTS", default_value = "a b c-mem c-redis")]
    variants: String,
    /// Rounds of all variants, interleaved.
    #[arg(long, env = "BENCH_ROUNDS", default_value_t = 2)]
    rounds: usize,
    /// Seconds of each measured wrk run.
    #[arg(long, env = "BENCH_DURATION", default_value_t = 10)]
    duration: u64,
    /// Seconds of the unmeasured wrk run before each measured one.
    #[arg(long, env = "BENCH_WARMUP", default_value_t = 2)]
    warmup: u64,
    /// wrk's connections (`-c`).
    #[arg(long, env = "BENCH_CONNECTIONS", default_value_t = 32)]
    connections: u32,
    /// Seconds for everything after the build; a run that would pass it fails instead.
    #[arg(long, env = "BENCH_DEADLINE", default_value_t = 290)]
    deadline: u64,
    /// Keep the work directory (wrk's raw output, logs) after a successful run.
    #[arg(long, env = "BENCH_KEEP", value_parser = clap::builder::BoolishValueParser::new())]
    keep: bool,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One way of putting Envoy in front of the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Variant {
    A,
    B,
    /// The floor answering tollgate's allow, cut to a shape.
    BShaped(Shape),
    /// b-shaped in small DATA frames.
    BSmall,
    CMem,
    /// c-mem with `server.dynamic_metadata: lean`.
    CLean,
    /// c-lean with `server.remove_own_headers: seen`.
    CMin,
    CNoPlan,
    CRedis,
    CLease,
    CSettle,
    CEvents,
    CTrace1,
    CTrace100,
    CHttp,
    NAlone,
    NTollgate,
}

impl Variant {
    fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "a" => Self::A,
            "b" => Self::B,
            "b-shaped" => Self::BShaped(Shape::Full),
            "b-nometa" => Self::BShaped(Shape::NoMetadata),
            "b-meta1" => Self::BShaped(Shape::DecisionOnly),
            "b-norl" => Self::BShaped(Shape::NoRateLimit),
            "b-norm" => Self::BShaped(Shape::NoRemovals),
            "b-lean" => Self::BShaped(Shape::Lean),
            "b-small" => Self::BSmall,
            "c-mem" => Self::CMem,
            "c-lean" => Self::CLean,
            "c-min" => Self::CMin,
            "c-noplan" => Self::CNoPlan,
            "c-redis" => Self::CRedis,
            "c-lease" => Self::CLease,
            "c-settle" => Self::CSettle,
            "c-events" => Self::CEvents,
            "c-trace1" => Self::CTrace1,
            "c-trace100" => Self::CTrace100,
            "c-http" => Self::CHttp,
            "n-alone" => Self::NAlone,
            "n-tollgate" => Self::NTollgate,
            _ => {
                return Err(format!(
                    "unknown variant {s} (a, b, b-shaped, b-nometa, b-meta1, b-norl, b-norm, b-lean, b-small, c-mem, c-lean, c-min, c-noplan, c-redis, c-lease, c-settle, c-events, c-trace1, \
                     c-trace100, c-http, n-alone, n-tollgate)"
                ));
            }
        })
    }

    fn id(self) -> &'static str {
        match self {
            Self::A => "a",
            Self::B => "b",
            Self::BShaped(Shape::Full) => "b-shaped",
            Self::BShaped(Shape::NoMetadata) => "b-nometa",
            Self::BShaped(Shape::DecisionOnly) => "b-meta1",
            Self::BShaped(Shape::NoRateLimit) => "b-norl",
            Self::BShaped(Shape::NoRemovals) => "b-norm",
            Self::BShaped(Shape::Lean) => "b-lean",
            Self::BSmall => "b-small",
            Self::CMem => "c-mem",
            Self::CLean => "c-lean",
            Self::CMin => "c-min",
            Self::CNoPlan => "c-noplan",
            Self::CRedis => "c-redis",
            Self::CLease => "c-lease",
            Self::CSettle => "c-settle",
            Self::CEvents => "c-events",
            Self::CTrace1 => "c-trace1",
            Self::CTrace100 => "c-trace100",
            Self::CHttp => "c-http",
            Self::NAlone => "n-alone",
            Self::NTollgate => "n-tollgate",
        }
    }

    /// The row title in the tables.
    fn title(self) -> &'static str {
        match self {
            Self::A => "a: no ext_authz",
            Self::B => "b: noop ext_authz (floor)",
            Self::BShaped(Shape::Full) => "b-shaped: noop, tollgate's answer",
            Self::BShaped(Shape::NoMetadata) => "b-nometa: noop, b-small without metadata",
            Self::BShaped(Shape::DecisionOnly) => "b-meta1: noop, b-small with the decision alone in metadata",
            Self::BShaped(Shape::NoRateLimit) => "b-norl: noop, b-small without RateLimit",
            Self::BShaped(Shape::NoRemovals) => "b-norm: noop, b-small without removals",
            Self::BShaped(Shape::Lean) => "b-lean: noop, tollgate's upstream headers only, one write",
            Self::BSmall => "b-small: noop, tollgate's answer in small frames",
            Self::CMem => "c: tollgate, memory store",
            Self::CLean => "c: tollgate, memory store, no metadata on plain allows",
            Self::CMin => "c: tollgate, memory store, no metadata on plain allows, seen removals only",
            Self::CNoPlan => "c: tollgate, memory store, no route by plan",
            Self::CRedis => "c: tollgate, Redis store",
            Self::CLease => "c: tollgate, Redis store, lease mode",
            Self::CSettle => "c: tollgate, Redis store, settling every response",
            Self::CEvents => "c: tollgate, Redis store, settling, usage events to a sink",
            Self::CTrace1 => "c: tollgate, memory store, traces (1 % sampled) to a collector",
            Self::CTrace100 => "c: tollgate, memory store, traces (all sampled) to a collector",
            Self::CHttp => "c: tollgate over Envoy's HTTP ext_authz, memory store",
            Self::NAlone => "n: nginx, no auth_request",
            Self::NTollgate => "n: nginx auth_request to tollgate, memory store",
        }
    }

    /// nginx in front instead of Envoy.
    fn is_nginx(self) -> bool {
        matches!(self, Self::NAlone | Self::NTollgate)
    }
}

type Fallible<T> = Result<T, String>;

/// The variants where tollgate answers.
const TOLLGATES: [Variant; 12] = [
    Variant::CMem,
    Variant::CLean,
    Variant::CMin,
    Variant::CNoPlan,
    Variant::CRedis,
    Variant::CLease,
    Variant::CSettle,
    Variant::CEvents,
    Variant::CTrace1,
    Variant::CTrace100,
    Variant::CHttp,
    Variant::NTollgate,
];

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if !bench::measuring() {
        println!("envoy bench: not a test; run `cargo bench --bench envoy` or scripts/bench-envoy.sh");
        return;
    }
    // A signal drops `run`'s future, and with it every process it started
    // (each waits asynchronously, so none holds the signal up for long).
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).expect("a SIGINT handler");
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    let (outcome, code) = tokio::select! {
        r = run(Args::parse()) => (r, 1),
        _ = int.recv() => (Err("interrupted (SIGINT)".to_owned()), 130),
        _ = term.recv() => (Err("interrupted (SIGTERM)".to_owned()), 143),
    };
    if let Err(e) = outcome {
        eprintln!("bench-envoy: FAILED: {e}");
        std::process::exit(code);
    }
}

async fn run(args: Args) -> Fallible<()> {
    let variants =
        args.variants.split([' ', ',']).filter(|s| !s.is_empty()).map(Variant::parse).collect::<Fallible<Vec<_>>>()?;
    if variants.is_empty() || args.rounds == 0 || args.duration == 0 {
        return Err("nothing to measure: give variants, --rounds ≥ 1 and --duration ≥ 1".into());
    }
    let mut work = WorkDir::new(args.keep);
    let helpers = Helpers::build(&work.path).await?;
    let started = Instant::now();
    let mut stack = Stack::start(&variants, &helpers, &work.path).await?;
    stack.check_wiring(&variants).await?;
    log(&format!("all variants ready and wired ({}s)", started.elapsed().as_secs()));

    let allowed_before = stack.allowed().await?;
    let load_before = loadavg();
    let (runs, sent) = measure(&args, &variants, &mut stack, &work.path, started).await?;
    let load_after = loadavg();

    // Every request through c-* was a Check that tollgate allowed (and so spent one counter).
    let allowed_after = stack.allowed().await?;
    let mut spent = Vec::new();
    for v in TOLLGATES {
        let Some(&n_sent) = sent.get(&v) else { continue };
        let n =
            allowed_after.get(&v).copied().unwrap_or(0).saturating_sub(allowed_before.get(&v).copied().unwrap_or(0));
        spent.push(format!("{}: {n} Checks allowed by tollgate for {n_sent} requests wrk completed", v.id()));
        if n < n_sent {
            return Err(format!("{}: tollgate allowed {n} Checks but wrk completed {n_sent} requests", v.id()));
        }
    }
    for v in [Variant::CTrace1, Variant::CTrace100] {
        let Some(t) = stack.tollgate(v) else { continue };
        // Spans leave within a batching second.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let m = envoy::request(t.http, "GET", "/metrics", &[]).await.map(|r| r.body).unwrap_or_default();
        let get = |name: &str| tollgate_testkit::http::metric_in(&m, name);
        spent.push(format!(
            "{}: spans exported {}, dropped {}, failed {} for {} requests (the collector holds {} from both trace variants)",
            v.id(),
            get("tollgate_trace_spans_total{result=\"exported\"}"),
            get("tollgate_trace_spans_total{result=\"dropped\"}"),
            get("tollgate_trace_spans_total{result=\"failed\"}"),
            sent.get(&v).copied().unwrap_or(0),
            stack.collector.as_ref().map_or(0, |c| c.spans().len()),
        ));
    }
    for v in [Variant::CSettle, Variant::CEvents] {
        let Some(t) = stack.tollgate(v) else { continue };
        // Entries arrive within Envoy's flush interval, events within a delivery round.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let m = envoy::request(t.http, "GET", "/metrics", &[]).await.map(|r| r.body).unwrap_or_default();
        let get = |name: &str| tollgate_testkit::http::metric_in(&m, name);
        let settled = get("tollgate_settlements_total{result=\"unchanged\"}")
            + get("tollgate_settlements_total{result=\"applied\"}");
        let mut line = format!(
            "{}: {settled} charges settled for {} requests (failed {}, bad {})",
            v.id(),
            sent.get(&v).copied().unwrap_or(0),
            get("tollgate_settlements_total{result=\"failed\"}"),
            get("tollgate_settlements_total{result=\"bad\"}"),
        );
        if v == Variant::CEvents {
            let received = stack.sink.as_ref().map_or(0, |s| s.unique().len());
            write!(
                line,
                "; events queued {}, delivered {}, dropped {}, the sink holds {received} distinct",
                get("tollgate_events_total{result=\"queued\"}"),
                get("tollgate_events_total{result=\"delivered\"}"),
                get("tollgate_events_total{result=\"dropped\"}"),
            )
            .unwrap();
        }
        spent.push(line);
    }
    spent.extend(stack.redis.as_ref().and_then(|r| r.cli(&["DBSIZE"])).map(|n| format!("Redis DBSIZE {}", n.trim())));
    let mut hops = Vec::new();
    for &v in &variants {
        hops.push(format!("{}: {}", v.id(), stack.envoy_view(v).await));
    }

    let report = Report {
        variants: &variants,
        rounds: args.rounds,
        runs: &runs,
        clk: clock_ticks(),
        conditions: format!(
            "wrk -t1 -c{} -d{}s --latency (after a {}s warm-up per run), GET {TARGET_PATH} with x-api-key, {} rounds \
             interleaved {} (each round starting one variant later); Envoy {} --concurrency 1 from deploy/envoy/envoy.yaml (its per-request access log \
             written to /dev/null){}; wrk, the proxies, tollgate, noop_authz, redis-server and the upstream all on \
             this machine, on 127.0.0.1",
            args.connections,
            args.duration,
            args.warmup,
            args.rounds,
            variants.iter().map(|v| v.id()).collect::<Vec<_>>().join(" "),
            envoy_version(),
            if variants.iter().any(|v| v.is_nginx()) {
                format!(
                    "; nginx {} with one worker process from deploy/nginx/tollgate.conf (no access log)",
                    nginx_version()
                )
            } else {
                String::new()
            },
        ),
        load_before,
        load_after,
        hops,
        spent,
    };
    print!("{}", report.render());
    drop(stack);
    work.succeeded();
    Ok(())
}

/// The interleaved rounds: per variant a warm-up, then a measured wrk run
/// with /proc CPU samples around it. Returns the measured runs and, per
/// variant, every request wrk completed (warm-ups included).
async fn measure(
    args: &Args,
    variants: &[Variant],
    stack: &mut Stack,
    work: &Path,
    started: Instant,
) -> Fallible<(Runs, HashMap<Variant, u64>)> {
    let wrk = Wrk::find(args.connections);
    let key_header = format!("x-api-key: {API_KEY}");
    let deadline = Duration::from_secs(args.deadline);
    let mut runs = BTreeMap::new();
    let mut sent: HashMap<Variant, u64> = HashMap::new();
    for round in 1..=args.rounds {
        // A variant's place in a round moved its figures by a few µs
        // (what ran just before it): each round starts one variant later.
        let order = variants.iter().cycle().skip((round - 1) % variants.len()).take(variants.len());
        for &v in order {
            let load1 = loadavg().split(' ').next().unwrap_or("?").to_owned();
            let url = stack.url(v);
            for (secs, measured) in [(args.warmup, false), (args.duration, true)] {
                if secs == 0 {
                    continue;
                }
                if started.elapsed() + Duration::from_secs(secs + 5) > deadline {
                    return Err(format!("the run would exceed the deadline of {}s", args.deadline));
                }
                stack.all_alive()?;
                let name = format!("wrk-{}-{round}{}.txt", v.id(), if measured { "" } else { "-warmup" });
                let before = stack.cpu_sample();
                let calls_before = stack.redis_calls();
                let out = wrk
                    .run(&url, &[&key_header], secs, &work.join(name))
                    .await
                    .map_err(|e| format!("{}: {e}", v.id()))?;
                let cpu = stack.cpu_sample().since(&before, stack.roles(v));
                let redis_calls = match (calls_before, stack.redis_calls()) {
                    (Some(b), Some(a)) if out.requests > 0 => a
                        .iter()
                        .filter_map(|(cmd, n)| {
                            let d = n.saturating_sub(b.get(cmd).copied().unwrap_or(0));
                            (d > 0).then(|| (cmd.clone(), d as f64 / out.requests as f64))
                        })
                        .collect(),
                    _ => BTreeMap::new(),
                };
                *sent.entry(v).or_default() += out.requests;
                if !measured {
                    continue;
                }
                log(&format!(
                    "round {round} {}: {:.1} req/s, p99 {:.3} ms ({} requests, {} non-2xx, load1 {load1})",
                    v.id(),
                    out.rps,
                    out.p99_ms,
                    out.requests,
                    out.non2xx
                ));
                runs.insert((v, round), Run { wrk: out, load1: load1.clone(), cpu, redis_calls });
            }
        }
    }
    Ok((runs, sent))
}

fn log(msg: &str) {
    eprintln!("bench-envoy: {msg}");
}

// ---------------------------------------------------------------- the processes

/// The built executables the kit does not start itself.
struct Helpers {
    tollgate: PathBuf,
    upstream: PathBuf,
    noop: PathBuf,
}

impl Helpers {
    /// `cargo build --release` of the app and the floor server (the tollgate
    /// binary is built by `cargo bench` itself); their paths from cargo's JSON.
    async fn build(work: &Path) -> Fallible<Self> {
        log("building release binaries (examples/upstream, benches/noop_authz)");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
        let mut build = Command::new(cargo);
        build
            .args(["build", "--release", "--locked", "--example", "upstream", "--bench", "noop_authz"])
            .args(["--message-format=json-render-diagnostics"])
            .arg("--manifest-path")
            .arg(Path::new(ROOT).join("Cargo.toml"))
            .stdout(create(&work.join("cargo-build.json"))?)
            .stderr(Stdio::inherit());
        // What cargo sets for the bench it runs would differ from a build
        // started in a shell and mark build scripts that read it dirty (ring
        // tracks CARGO_MANIFEST_DIR): everything above them would rebuild.
        const SET_FOR_THIS_BENCH: [&str; 6] = [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_CRATE_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "OUT_DIR",
        ];
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_") || SET_FOR_THIS_BENCH.contains(&name.as_ref()) {
                build.env_remove(name.as_ref());
            }
        }
        let mut cargo = KillOnDrop(build.spawn().map_err(|e| format!("cargo build: {e}"))?);
        if !wait_child("cargo build", &mut cargo, Duration::from_secs(1200)).await?.success() {
            return Err("cargo build failed".into());
        }
        let mut found: HashMap<(String, String), PathBuf> = HashMap::new();
        for line in std::fs::read_to_string(work.join("cargo-build.json")).unwrap_or_default().lines() {
            let Ok(m) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            let (Some(exe), Some(name)) = (m["executable"].as_str(), m["target"]["name"].as_str()) else { continue };
            for kind in m["target"]["kind"].as_array().into_iter().flatten().filter_map(|k| k.as_str()) {
                found.insert((kind.to_owned(), name.to_owned()), PathBuf::from(exe));
            }
        }
        let mut take = |kind: &str, name: &str| {
            found.remove(&(kind.to_owned(), name.to_owned())).ok_or_else(|| format!("cargo built no {kind} {name}"))
        };
        Ok(Self {
            tollgate: env!("CARGO_BIN_EXE_tollgate").into(),
            upstream: take("example", "upstream")?,
            noop: take("bench", "noop_authz")?,
        })
    }
}

/// A process this bench spawned itself (the app, the floor); killed on drop.
struct Spawned {
    name: &'static str,
    child: KillOnDrop,
    stderr: PathBuf,
}

impl Spawned {
    fn start(name: &'static str, exe: &Path, args: &[&str], work: &Path) -> Fallible<Self> {
        let stderr = work.join(format!("{name}.err"));
        let child = Command::new(exe)
            .args(args)
            .stdout(Stdio::null())
            .stderr(create(&stderr)?)
            .spawn()
            .map_err(|e| format!("{name}: cannot start {}: {e}", exe.display()))?;
        Ok(Self { name, child: KillOnDrop(child), stderr })
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    fn alive(&mut self) -> Fallible<()> {
        match self.child.0.try_wait() {
            Ok(None) => Ok(()),
            _ => Err(format!("{} exited early: {}", self.name, tail(&self.stderr))),
        }
    }
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A new file for a child's output.
fn create(path: &Path) -> Fallible<std::fs::File> {
    std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// What a process does in a variant's run, for the CPU table.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Envoy or nginx.
    Proxy,
    Authz,
    Upstream,
    Redis,
}

/// Everything the variants need, started once and shared by all rounds.
struct Stack {
    upstream: (Spawned, SocketAddr),
    noop: Option<(Spawned, SocketAddr)>,
    /// The floor answering tollgate's allow, one process per shape.
    shaped: BTreeMap<Variant, (Spawned, SocketAddr)>,
    redis: Option<RedisServer>,
    redis_pid: Option<u32>,
    /// The tollgate each `c-*`/`n-tollgate` variant asks (one process each).
    tollgates: BTreeMap<Variant, TollgateProcess>,
    /// The HTTP door (`server.authz_http_listen`) of c-http's and n-tollgate's tollgate.
    doors: BTreeMap<Variant, SocketAddr>,
    /// c-events' sink (in this process).
    sink: Option<tollgate_testkit::sink::Sink>,
    /// The c-trace variants' OTLP collector (in this process).
    collector: Option<tollgate_testkit::otlp::Collector>,
    /// Each Envoy variant's Envoy with its process id.
    envoys: BTreeMap<Variant, (Envoy, u32)>,
    /// Each nginx variant's nginx with its process id.
    nginxes: BTreeMap<Variant, (Nginx, u32)>,
}

impl Stack {
    async fn start(variants: &[Variant], helpers: &Helpers, work: &Path) -> Fallible<Self> {
        let has = |v| variants.contains(&v);
        log("starting upstream, noop_authz, redis-server, tollgate on 127.0.0.1");
        let serve = |name: &'static str, exe: &Path, flags: &[&str]| -> Fallible<(Spawned, SocketAddr)> {
            let addr = free_addr();
            let addr_arg = addr.to_string();
            let args: Vec<&str> = [&["--serve", addr_arg.as_str()] as &[&str], flags].concat();
            Ok((Spawned::start(name, exe, &args, work)?, addr))
        };
        let addr = free_addr();
        let upstream = (Spawned::start("upstream", &helpers.upstream, &[&addr.to_string()], work)?, addr);
        // Variant a's Envoy keeps the ext_authz cluster (pointed at the floor) but not the filter.
        let noop = (has(Variant::A) || has(Variant::B)).then(|| serve("noop", &helpers.noop, &[])).transpose()?;
        let mut shaped = BTreeMap::new();
        for shape in Shape::ALL.into_iter().filter(|&s| has(Variant::BShaped(s))) {
            let flag = format!("--shaped={}", shape.name());
            // The cut answers leave in one write, as tollgate's do: what is left
            // to compare (with b-small) is what their parts cost.
            let flags: &[&str] =
                if shape == Shape::Full { &[flag.as_str()] } else { &[flag.as_str(), "--small-frames"] };
            shaped.insert(Variant::BShaped(shape), serve("noop-shaped", &helpers.noop, flags)?);
        }
        if has(Variant::BSmall) {
            let flags = ["--shaped", "--small-frames"];
            shaped.insert(Variant::BSmall, serve("noop-small-frames", &helpers.noop, &flags)?);
        }
        let mut stack = Self {
            upstream,
            noop,
            shaped,
            redis: None,
            redis_pid: None,
            tollgates: BTreeMap::new(),
            doors: BTreeMap::new(),
            sink: None,
            collector: None,
            envoys: BTreeMap::new(),
            nginxes: BTreeMap::new(),
        };
        let tollgate = helpers.tollgate.to_str().ok_or("tollgate path is not UTF-8")?;
        let on_redis = [Variant::CRedis, Variant::CLease, Variant::CSettle, Variant::CEvents];
        if on_redis.iter().any(|v| has(*v)) {
            let (redis, pid) = new_child(async { RedisServer::start() }).await?;
            let port = redis.port;
            let p = TollgateProcess::start(tollgate, &[], |g, h| tollgate_config("redis", g, h, port)).await;
            if has(Variant::CLease) {
                let lease = |g, h| {
                    tollgate_config("redis", g, h, port)
                        .replace("  on_error: deny ", "  counting: lease\n  on_error: deny ")
                };
                stack.tollgates.insert(Variant::CLease, TollgateProcess::start(tollgate, &[], lease).await);
            }
            let settling = |g, h| {
                tollgate_config("redis", g, h, port)
                    .replace("\nbilling:\n", "\nbilling:\n  charge_on: [2xx, 3xx, 4xx]\n")
            };
            if has(Variant::CSettle) {
                stack.tollgates.insert(Variant::CSettle, TollgateProcess::start(tollgate, &[], settling).await);
            }
            if has(Variant::CEvents) {
                let sink = tollgate_testkit::sink::Sink::start().await;
                let url = sink.url();
                let events = move |g, h| {
                    settling(g, h)
                        + &format!("events:\n  sink: {{ url: \"{url}\" }}\n  thresholds: {{ quota: [0.8, 1.0] }}\n")
                };
                stack.tollgates.insert(Variant::CEvents, TollgateProcess::start(tollgate, &[], events).await);
                stack.sink = Some(sink);
            }
            let log = work.join("seed.out");
            let seed = Command::new(tollgate)
                .args(["seed", "--config"])
                .arg(&p.file)
                .env_remove("TOLLGATE_REDIS_URL")
                .stdout(create(&log)?)
                .stderr(create(&log)?)
                .spawn()
                .map_err(|e| format!("tollgate seed: {e}"))?;
            if !wait_child("tollgate seed", &mut KillOnDrop(seed), Duration::from_secs(30)).await?.success() {
                return Err(format!("tollgate seed failed: {}", tail(&log)));
            }
            if has(Variant::CRedis) {
                stack.tollgates.insert(Variant::CRedis, p);
            }
            (stack.redis, stack.redis_pid) = (Some(redis), Some(pid));
        }
        for v in [Variant::CMem, Variant::CNoPlan].into_iter().filter(|v| has(*v)) {
            let p = TollgateProcess::start(tollgate, &[], |g, h| tollgate_config("memory", g, h, 6379)).await;
            stack.tollgates.insert(v, p);
        }
        for (v, server) in [
            (Variant::CLean, "dynamic_metadata: lean"),
            (Variant::CMin, "dynamic_metadata: lean\n  remove_own_headers: seen"),
        ] {
            if !has(v) {
                continue;
            }
            let lean = |g: SocketAddr, h| {
                tollgate_config("memory", g, h, 6379)
                    .replace(&format!("grpc_listen: {g}"), &format!("grpc_listen: {g}\n  {server}"))
            };
            stack.tollgates.insert(v, TollgateProcess::start(tollgate, &[], lean).await);
        }
        for v in [Variant::CHttp, Variant::NTollgate].into_iter().filter(|v| has(*v)) {
            let door = free_addr();
            let with_door = |g: SocketAddr, h| {
                tollgate_config("memory", g, h, 6379)
                    .replace(&format!("grpc_listen: {g}"), &format!("grpc_listen: {g}\n  authz_http_listen: {door}"))
            };
            stack.tollgates.insert(v, TollgateProcess::start(tollgate, &[], with_door).await);
            stack.doors.insert(v, door);
        }
        if has(Variant::CTrace1) || has(Variant::CTrace100) {
            let collector = tollgate_testkit::otlp::Collector::start().await;
            let at = collector.addr;
            let traced = move |ratio: f64| {
                move |g, h| {
                    tollgate_config("memory", g, h, 6379)
                        + &format!("tracing: {{ otlp_endpoint: \"http://{at}\", sample_ratio: {ratio} }}\n")
                }
            };
            if has(Variant::CTrace1) {
                stack.tollgates.insert(Variant::CTrace1, TollgateProcess::start(tollgate, &[], traced(0.01)).await);
            }
            if has(Variant::CTrace100) {
                stack.tollgates.insert(Variant::CTrace100, TollgateProcess::start(tollgate, &[], traced(1.0)).await);
            }
            stack.collector = Some(collector);
        }
        stack.wait_servers().await?;

        for &v in variants {
            if v.is_nginx() {
                let door = stack.doors.get(&v).copied().unwrap_or_else(free_addr);
                let upstream = stack.upstream.1;
                let config = move |listen| nginx_config(v, door, upstream, listen);
                stack.nginxes.insert(v, new_child(Nginx::start(config)).await?);
                continue;
            }
            let authz = stack.authz_addr(v).ok_or("no ext_authz server")?;
            let config = envoy_config(v, authz, stack.doors.get(&v).copied(), stack.upstream.1)?;
            let (envoy, pid) = new_child(Envoy::start(&config)).await?;
            if v != Variant::A {
                envoy.wait_cluster_healthy("tollgate").await;
            }
            stack.envoys.insert(v, (envoy, pid));
        }
        Ok(stack)
    }

    /// The app and the floor servers answer (tollgate's processes are ready once started).
    async fn wait_servers(&mut self) -> Fallible<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut addrs = vec![("upstream", self.upstream.1)];
        addrs.extend(self.noop.as_ref().map(|n| ("noop_authz", n.1)));
        addrs.extend(self.shaped.values().map(|n| ("noop_authz --shaped", n.1)));
        for (name, addr) in addrs {
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                self.all_alive()?;
                if Instant::now() > deadline {
                    return Err(format!("{name} not ready after 15s"));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// The gRPC server an Envoy variant's ext_authz cluster points at (for
    /// c-http: only its health checks).
    fn authz_addr(&self, v: Variant) -> Option<SocketAddr> {
        match v {
            Variant::A | Variant::B => self.noop.as_ref().map(|n| n.1),
            Variant::BShaped(_) | Variant::BSmall => self.shaped.get(&v).map(|n| n.1),
            _ => self.tollgate(v).map(|t| t.grpc),
        }
    }

    fn tollgate(&self, v: Variant) -> Option<&TollgateProcess> {
        self.tollgates.get(&v)
    }

    /// Where clients talk to variant `v`'s proxy.
    fn front(&self, v: Variant) -> SocketAddr {
        self.nginxes.get(&v).map_or_else(|| self.envoys[&v].0.addr, |n| n.0.addr)
    }

    fn url(&self, v: Variant) -> String {
        format!("http://{}{TARGET_PATH}", self.front(v))
    }

    /// Each variant is wired as claimed: 200 with the key; tollgate answers 401
    /// without it and tells the upstream the account; a and b do neither;
    /// b-shaped tells the upstream the account but lets anyone in.
    async fn check_wiring(&self, variants: &[Variant]) -> Fallible<()> {
        for &v in variants {
            let addr = self.front(v);
            // Under valgrind (scripts/callgrind-envoy.sh) Envoy's first
            // requests can outlast its 0.25 s ext_authz timeout: a 503 is
            // asked again, a few times, before it counts as miswired.
            let mut with =
                envoy::request(addr, "GET", TARGET_PATH, &[("x-api-key", API_KEY)]).await.map_err(|e| e.to_string())?;
            for _ in 0..5 {
                if with.status != 503 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                with = envoy::request(addr, "GET", TARGET_PATH, &[("x-api-key", API_KEY)])
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let without = envoy::request(addr, "GET", TARGET_PATH, &[]).await.map_err(|e| e.to_string())?;
            let id = v.id();
            if with.status != 200 {
                return Err(format!(
                    "{id}: GET {TARGET_PATH} with the key answered {}: {:.500}",
                    with.status, with.body
                ));
            }
            let told = with.body.lines().any(|l| l == "  x-tollgate-account: acct_bench");
            let (want_told, want_without) = match v {
                Variant::CMem
                | Variant::CLean
                | Variant::CMin
                | Variant::CNoPlan
                | Variant::CRedis
                | Variant::CLease
                | Variant::CSettle
                | Variant::CEvents
                | Variant::CTrace1
                | Variant::CTrace100
                | Variant::CHttp
                | Variant::NTollgate => (true, 401),
                Variant::BShaped(_) | Variant::BSmall => (true, 200),
                Variant::A | Variant::B | Variant::NAlone => (false, 200),
            };
            if told != want_told {
                let saw = if told { "saw" } else { "did not see" };
                return Err(format!("{id}: the upstream {saw} x-tollgate-account"));
            }
            if without.status != want_without {
                return Err(format!("{id}: without a key expected {want_without}, got {}", without.status));
            }
        }
        Ok(())
    }

    /// Fails when a process we started has exited.
    fn all_alive(&mut self) -> Fallible<()> {
        self.upstream.0.alive()?;
        for s in self.noop.iter_mut().chain(self.shaped.values_mut()) {
            s.0.alive()?;
        }
        for (v, t) in &mut self.tollgates {
            if !matches!(t.child.try_wait(), Ok(None)) {
                return Err(format!("{}: the tollgate process exited early", v.id()));
            }
        }
        for (v, (envoy, pid)) in &self.envoys {
            if cpu::ticks(*pid).is_none() {
                return Err(format!("envoy-{} exited early:\n{}", v.id(), envoy.log()));
            }
        }
        for (v, (nginx, pid)) in &self.nginxes {
            if cpu::ticks(*pid).is_none() {
                return Err(format!("nginx-{} exited early:\n{}", v.id(), nginx.log()));
            }
        }
        if self.redis_pid.is_some_and(|p| cpu::ticks(p).is_none()) {
            return Err("redis-server exited early".into());
        }
        Ok(())
    }

    /// Every process of ours with what it is in variant `v`'s run.
    fn roles(&self, v: Variant) -> Vec<(u32, Option<Role>)> {
        let mut out = vec![(self.upstream.0.pid(), Some(Role::Upstream))];
        let authz = |hit: bool| hit.then_some(Role::Authz);
        if let Some((s, _)) = &self.noop {
            out.push((s.pid(), authz(v == Variant::B)));
        }
        for (&w, (s, _)) in &self.shaped {
            out.push((s.pid(), authz(v == w)));
        }
        for (&w, t) in &self.tollgates {
            out.push((t.child.id(), authz(v == w)));
        }
        out.extend(self.redis_pid.map(|p| (p, Some(Role::Redis))));
        let proxies = self.envoys.iter().map(|(w, e)| (w, e.1)).chain(self.nginxes.iter().map(|(w, n)| (w, n.1)));
        for (&w, pid) in proxies {
            out.push((pid, (w == v).then_some(Role::Proxy)));
        }
        out
    }

    fn cpu_sample(&self) -> CpuSample {
        let mut pids: Vec<u32> = vec![self.upstream.0.pid()];
        pids.extend(self.noop.iter().chain(self.shaped.values()).map(|s| s.0.pid()));
        pids.extend(self.tollgates.values().map(|t| t.child.id()));
        pids.extend(self.redis_pid);
        pids.extend(self.envoys.values().map(|e| e.1));
        pids.extend(self.nginxes.values().map(|n| n.1));
        CpuSample::take(&pids)
    }

    /// Calls per command so far (`INFO commandstats`), when Redis runs.
    fn redis_calls(&self) -> Option<BTreeMap<String, u64>> {
        let info = self.redis.as_ref()?.cli(&["INFO", "commandstats"])?;
        Some(
            info.lines()
                .filter_map(|l| {
                    let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                    let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?.parse().ok()?;
                    // The bench's own INFO calls are not tollgate's.
                    (name != "info").then(|| (name.to_owned(), calls))
                })
                .collect(),
        )
    }

    /// `tollgate_decisions_total{status="200",code="allowed"}` of each tollgate.
    async fn allowed(&self) -> Fallible<HashMap<Variant, u64>> {
        let mut out = HashMap::new();
        for v in TOLLGATES {
            let Some(t) = self.tollgate(v) else { continue };
            let r = envoy::request(t.http, "GET", "/metrics", &[])
                .await
                .map_err(|e| format!("{}: /metrics: {e}", v.id()))?;
            let n: f64 = r
                .body
                .lines()
                .filter(|l| l.starts_with("tollgate_decisions_total{"))
                .filter(|l| l.contains("status=\"200\"") && l.contains("code=\"allowed\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            out.insert(v, n as u64);
        }
        Ok(out)
    }

    /// Envoy's own view of the two hops (cumulative over warm-ups and runs;
    /// Envoy's default histogram buckets, so coarse): the Check (cluster
    /// tollgate) and the app; then its non-2xx and ext_authz counters (the
    /// wiring check sent one request without a key).
    async fn envoy_view(&self, v: Variant) -> String {
        let Some((envoy, _)) = self.envoys.get(&v) else { return "nginx: no such stats".to_owned() };
        let admin = envoy.admin;
        let stats = envoy::request(admin, "GET", "/stats?usedonly", &[]).await.map(|r| r.body).unwrap_or_default();
        let mut hops = Vec::new();
        let mut counters = Vec::new();
        for line in stats.lines() {
            let Some((name, value)) = line.split_once(": ") else { continue };
            let cluster = name.strip_prefix("cluster.").and_then(|n| n.strip_suffix(".upstream_rq_time"));
            // `cluster.app.upstream_rq_time`, not its `.internal`/`.external` splits.
            if let Some(cluster) = cluster.filter(|c| !c.contains('.')) {
                let q = |p: &str| percentile(value, p).map_or("?".to_owned(), |x| format!("{x:.1}"));
                let cluster = if cluster == "tollgate" { "Check" } else { cluster };
                hops.push(format!("{cluster} P50 {} ms, P99 {} ms", q("50"), q("99")));
            }
            if let Some(counter) = name.strip_prefix("http.ingress.") {
                let wanted = counter.starts_with("ext_authz.")
                    || ["downstream_rq_3xx", "downstream_rq_4xx", "downstream_rq_5xx"].contains(&counter);
                if wanted && value.parse::<u64>().is_ok_and(|n| n > 0) {
                    counters.push(format!("{counter} {value}"));
                }
            }
        }
        hops.sort();
        let hops = if hops.is_empty() { "no stats".to_owned() } else { hops.join("; ") };
        let counters = if counters.is_empty() { "none".to_owned() } else { counters.join(", ") };
        format!("{hops}; counters: {counters}")
    }
}

/// The cumulative `P<p>(interval,cumulative)` value of an Envoy histogram line.
fn percentile(value: &str, p: &str) -> Option<f64> {
    let rest = value.split_whitespace().find_map(|q| q.strip_prefix(&format!("P{p}(")))?;
    rest.trim_end_matches(')').split(',').nth(1)?.parse().ok()
}

/// Runs `start`, which spawns one long-lived child process of ours, and
/// returns its result with that process's id (the kit keeps its children private).
async fn new_child<T>(start: impl Future<Output = T>) -> Fallible<(T, u32)> {
    let before = child_pids();
    let value = start.await;
    let new: Vec<u32> = child_pids().difference(&before).copied().collect();
    match new[..] {
        [pid] => Ok((value, pid)),
        _ => Err(format!("expected one new child process, found {new:?}")),
    }
}

/// tollgate's config: `config/demo.yaml` with our ports, `backend`, and a
/// `bench` plan and account.
fn tollgate_config(backend: &str, grpc: SocketAddr, http: SocketAddr, redis_port: u16) -> String {
    let mut c = std::fs::read_to_string(Path::new(ROOT).join("config/demo.yaml")).unwrap();
    let mut sub = |old: &str, new: &str| {
        assert_eq!(c.matches(old).count(), 1, "config/demo.yaml changed: {old:?} not found exactly once");
        c = c.replace(old, new);
    };
    sub("grpc_listen: 0.0.0.0:9191", &format!("grpc_listen: {grpc}"));
    sub("http_listen: 0.0.0.0:9090", &format!("http_listen: {http}"));
    sub("  backend: memory ", &format!("  backend: {backend} "));
    sub("  url: redis://127.0.0.1:6379", &format!("  url: redis://127.0.0.1:{redis_port}"));
    sub(
        "\nplans:\n",
        "\nplans:\n  bench:\n    features: [search]\n    quotas:\n      - { meter: requests, limit: 1000000000000, period: month }\n",
    );
    sub("\naccounts:\n", &format!("\naccounts:\n  - {{ id: acct_bench, plan: bench, api_keys: [{API_KEY}] }}\n"));
    c
}

/// Envoy's config for variant `v`: the kit's rewrite of the shipped file
/// (`envoy-http-authz.yaml` asking the HTTP door `door` for c-http), with the shipped
/// health-check interval and Check timeout (the kit changes both for tests); variant a without
/// the ext_authz filter.
fn envoy_config(v: Variant, authz: SocketAddr, door: Option<SocketAddr>, upstream: SocketAddr) -> Fallible<String> {
    let mut c = match door {
        Some(door) => envoy::http_door_config(authz, door, upstream, Options::default()),
        None => {
            // An absolute path, which the kit's `root.join(file)` keeps.
            let shipped = Path::new(ROOT).join("deploy/envoy/envoy.yaml");
            envoy::config_from(&shipped.to_string_lossy(), authz, upstream, Options::default())
        }
    };
    if c.matches("interval: 0.2s").count() != 1 {
        return Err("the kit's Envoy config no longer sets `interval: 0.2s` once".into());
    }
    c = c.replace("interval: 0.2s", "interval: 5s");
    let (shipped, kit) = envoy::EXT_AUTHZ_TIMEOUT;
    if c.matches(kit).count() != 1 {
        return Err(format!("the kit's Envoy config no longer sets `{kit}` once"));
    }
    c = c.replace(kit, shipped);
    if v == Variant::CNoPlan {
        if c.matches("clear_route_cache: true").count() != 1 {
            return Err("deploy/envoy/envoy.yaml no longer ships `clear_route_cache: true` once".into());
        }
        c = c.replace("clear_route_cache: true", "clear_route_cache: false");
    }
    if v == Variant::A {
        let start = c.find("                  - name: envoy.filters.http.ext_authz\n");
        let end = c.find("                  - name: envoy.filters.http.router\n");
        let (Some(start), Some(end)) = (start, end) else {
            return Err("deploy/envoy/envoy.yaml changed: no ext_authz filter before the router".into());
        };
        c.replace_range(start..end, "");
    }
    Ok(c)
}

/// nginx's config for variant `v`: the kit's rewrite of the shipped
/// `deploy/nginx/tollgate.conf`; n-alone without its `auth_request` (the same
/// header work on empty values, no question asked).
fn nginx_config(v: Variant, door: SocketAddr, upstream: SocketAddr, listen: SocketAddr) -> String {
    let c = nginx::config(door, upstream, listen);
    if v == Variant::NAlone {
        assert_eq!(c.matches("        auth_request /_tollgate;\n").count(), 1, "deploy/nginx/tollgate.conf changed");
        return c.replace("        auth_request /_tollgate;\n", "");
    }
    c
}

/// `nginx -v`'s version, e.g. `1.22.1`.
fn nginx_version() -> String {
    let out = Command::new(nginx::nginx_bin()).arg("-v").output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default();
    text.split("nginx/").nth(1).map_or("?", str::trim).to_owned()
}

/// `envoy --version`'s release, e.g. `1.40.0`.
fn envoy_version() -> String {
    let out = Command::new(envoy::envoy_bin()).arg("--version").output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    text.split("version: ").nth(1).and_then(|v| v.split('/').nth(1)).unwrap_or("?").to_owned()
}

// ---------------------------------------------------------------- CPU by role

/// CPU counters at one instant.
struct CpuSample {
    per_pid: HashMap<u32, u64>,
    children: u64,
    busy: u64,
    total: u64,
}

/// CPU ticks spent during one measured run, by role.
#[derive(Clone, Copy, Default)]
struct RunCpu {
    /// Envoy or nginx.
    proxy: u64,
    authz: u64,
    upstream: u64,
    redis: u64,
    wrk: u64,
    /// Our processes that play no part in this variant (the other Envoys, servers).
    idle: u64,
    /// Ticks of the machine not spent by our processes.
    other: u64,
    busy: u64,
    total: u64,
}

impl CpuSample {
    fn take(pids: &[u32]) -> Self {
        let per_pid = pids.iter().filter_map(|&p| Some((p, cpu::ticks(p)?))).collect();
        let (busy, total) = machine_ticks();
        Self { per_pid, children: reaped_children_ticks(), busy, total }
    }

    fn since(&self, before: &Self, roles: Vec<(u32, Option<Role>)>) -> RunCpu {
        let mut cpu = RunCpu { wrk: self.children - before.children, ..RunCpu::default() };
        let mut ours = cpu.wrk;
        for (pid, role) in roles {
            let d = self.per_pid.get(&pid).copied().unwrap_or(0) - before.per_pid.get(&pid).copied().unwrap_or(0);
            ours += d;
            match role {
                Some(Role::Proxy) => cpu.proxy += d,
                Some(Role::Authz) => cpu.authz += d,
                Some(Role::Upstream) => cpu.upstream += d,
                Some(Role::Redis) => cpu.redis += d,
                None => cpu.idle += d,
            }
        }
        cpu.busy = self.busy - before.busy;
        cpu.total = self.total - before.total;
        cpu.other = cpu.busy.saturating_sub(ours);
        cpu
    }
}

// ---------------------------------------------------------------- the report

/// The measured runs by variant and round (from 1).
type Runs = BTreeMap<(Variant, usize), Run>;

/// One measured run.
struct Run {
    wrk: WrkOutput,
    load1: String,
    cpu: RunCpu,
    /// Redis commands per request during the run, by command (every tollgate shares one Redis; the others are idle).
    redis_calls: BTreeMap<String, f64>,
}

struct Report<'a> {
    variants: &'a [Variant],
    rounds: usize,
    runs: &'a Runs,
    clk: u64,
    conditions: String,
    load_before: String,
    load_after: String,
    hops: Vec<String>,
    /// Allowed Checks against completed requests, and Redis's key count.
    spent: Vec<String>,
}

/// `12,345` (rounded to a whole number, thousands separated).
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < -0.5 { format!("-{out}") } else { out }
}

impl Report<'_> {
    fn per_round<T>(&self, v: Variant, f: impl Fn(&Run) -> T) -> Vec<T> {
        (1..=self.rounds).map(|n| f(&self.runs[&(v, n)])).collect()
    }

    fn median_rps(&self, v: Variant) -> f64 {
        median(self.per_round(v, |r| r.wrk.rps))
    }

    /// Median over rounds of one process's CPU per request, µs.
    fn cpu_us(&self, v: Variant, part: fn(&RunCpu) -> u64) -> f64 {
        median(self.per_round(v, |r| part(&r.cpu) as f64 / self.clk as f64 / r.wrk.requests as f64 * 1e6))
    }

    /// Issue 16's three targets against the floor (b) for each memory-store
    /// variant run with it, judged on the medians of rounds as the README
    /// reports them; the spread of the rounds' own ratios says how far one
    /// run can be trusted (a machine that moves a round by ±20 % cannot
    /// show a 5 % difference).
    fn floor_targets(&self, o: &mut String) {
        use Variant::{B, CLean, CMem, CMin};
        let shown: Vec<Variant> = [CMem, CLean, CMin]
            .into_iter()
            .filter(|v| self.variants.contains(v) && self.variants.contains(&B))
            .collect();
        if shown.is_empty() {
            return;
        }
        writeln!(
            o,
            "\nAgainst the floor (b), medians of rounds: tollgate's CPU per Check / the do-nothing server's \
             (≤ 1.3), Envoy's CPU per request (≤ 1.1), throughput (≥ 0.95); the rounds' own throughput ratios, \
             lowest to highest:\n\n| variant | authz CPU | Envoy CPU | req/s | rounds' req/s ratios |\n|---|---|---|---|---|"
        )
        .unwrap();
        // Four places: 1.101 is over 1.1 and 0.9499 under 0.95; fewer would print them as met values missed.
        let judged = |x: f64, ok: bool| format!("{x:.4} {}", if ok { "met" } else { "MISSED" });
        for v in shown {
            let authz = self.cpu_us(v, |c| c.authz) / self.cpu_us(B, |c| c.authz);
            let envoy = self.cpu_us(v, |c| c.proxy) / self.cpu_us(B, |c| c.proxy);
            let rps = self.median_rps(v) / self.median_rps(B);
            let mut per: Vec<f64> = self.per_round(v, |r| r.wrk.rps);
            for (x, b) in per.iter_mut().zip(self.per_round(B, |r| r.wrk.rps)) {
                *x /= b;
            }
            let (lo, hi) = per.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            writeln!(
                o,
                "| {} | {} | {} | {} | {lo:.2}–{hi:.2} |",
                v.id(),
                judged(authz, authz <= 1.3),
                judged(envoy, envoy <= 1.1),
                judged(rps, rps >= 0.95)
            )
            .unwrap();
        }
    }

    fn render(&self) -> String {
        let mut o = String::new();
        let rounds = 1..=self.rounds;
        let cols = |f: &dyn Fn(usize) -> String| rounds.clone().map(f).collect::<Vec<_>>().join(" | ");

        let head = format!(
            "| variant | {} | median req/s | median p50 ms | median p99 ms |",
            cols(&|n| format!("round {n} req/s | round {n} p99 ms"))
        );
        writeln!(o, "\n{head}\n|{}", "---|".repeat(head.matches('|').count() - 1)).unwrap();
        for &v in self.variants {
            let cells = cols(&|n| {
                let r = &self.runs[&(v, n)].wrk;
                format!("{} | {:.2}", thousands(r.rps), r.p99_ms)
            });
            let p50 = median(self.per_round(v, |r| r.wrk.p50_ms));
            let p99 = median(self.per_round(v, |r| r.wrk.p99_ms));
            writeln!(o, "| {} | {cells} | {} | {p50:.2} | {p99:.2} |", v.title(), thousands(self.median_rps(v)))
                .unwrap();
        }

        writeln!(o, "\n| ratio (req/s) | {} | median | target |", cols(&|n| format!("round {n}"))).unwrap();
        writeln!(o, "|---|{}", "---|".repeat(self.rounds + 2)).unwrap();
        use Variant::*;
        let mut ratios = vec![
            // Issue 16's target for the memory store (the Envoy bench's first was 0.9).
            (CMem, B, Some(0.95)),
            (CMem, A, None),
            (CLean, B, Some(0.95)),
            (CLean, CMem, None),
            (CMin, B, Some(0.95)),
            (CMin, CLean, None),
            (CNoPlan, CMem, None),
            (CRedis, B, Some(0.8)),
            (CRedis, A, None),
            (CLease, B, Some(0.9)),
            (CLease, A, None),
            (CSettle, CRedis, Some(0.9)),
            (CEvents, CRedis, Some(0.9)),
            (CHttp, CMem, Some(0.9)),
            (CHttp, A, None),
            (NTollgate, NAlone, None),
        ];
        let full = BShaped(Shape::Full);
        if self.variants.contains(&full) {
            ratios.extend([(full, B, None), (CMem, full, None), (CRedis, full, None)]);
        }
        ratios.push((BSmall, full, None));
        ratios.extend(Shape::ALL[1..].iter().map(|&s| (BShaped(s), BSmall, None)));
        for (c, base, target) in ratios {
            if !self.variants.contains(&c) || !self.variants.contains(&base) {
                continue;
            }
            let per = cols(&|n| format!("{:.2}", self.runs[&(c, n)].wrk.rps / self.runs[&(base, n)].wrk.rps));
            let m = self.median_rps(c) / self.median_rps(base);
            let t = target.map_or(String::new(), |t| format!("≥ {t}: {}", if m >= t { "met" } else { "MISSED" }));
            writeln!(o, "| {}/{} | {per} | {m:.2} | {t} |", c.id(), base.id()).unwrap();
        }

        let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown CPU", |(_, m)| m.trim());
        let loads = rounds
            .clone()
            .flat_map(|n| self.variants.iter().map(move |&v| (v, n)))
            .map(|(v, n)| format!("{} r{n} {}", v.id(), self.runs[&(v, n)].load1))
            .collect::<Vec<_>>()
            .join(", ");
        writeln!(
            o,
            "\nConditions: {nproc} cores ({model}); {}. Load average (1/5/15 min) before: {}, after: {}; \
             1-min load before each run: {loads}.",
            self.conditions, self.load_before, self.load_after
        )
        .unwrap();

        let clk = self.clk as f64;
        writeln!(o, "\nCPU per request during the measured runs, µs (median of rounds; /proc ticks of 1/{clk} s):\n")
            .unwrap();
        writeln!(
            o,
            "| variant | proxy (Envoy or nginx) | authz server | upstream | redis-server | wrk | our idle processes | sum | \
             other processes (cores) | machine busy |\n|---|{}",
            "---|".repeat(9)
        )
        .unwrap();
        let parts: [fn(&RunCpu) -> u64; 6] =
            [|c| c.proxy, |c| c.authz, |c| c.upstream, |c| c.redis, |c| c.wrk, |c| c.idle];
        for &v in self.variants {
            let us: Vec<f64> = parts.iter().map(|&part| self.cpu_us(v, part)).collect();
            let other = median(self.per_round(v, |r| r.cpu.other as f64 / r.cpu.total as f64 * nproc as f64));
            let busy = median(self.per_round(v, |r| r.cpu.busy as f64 / r.cpu.total as f64));
            let cells = us.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(" | ");
            let sum: f64 = us.iter().sum();
            writeln!(o, "| {} | {cells} | {sum:.1} | {other:.2} | {:.0}% |", v.title(), busy * 100.0).unwrap();
        }

        self.floor_targets(&mut o);

        let on_redis: Vec<Variant> = self
            .variants
            .iter()
            .copied()
            .filter(|&v| self.per_round(v, |r| !r.redis_calls.is_empty()).contains(&true))
            .collect();
        if !on_redis.is_empty() {
            writeln!(
                o,
                "\nRedis commands per request during the measured runs (`INFO commandstats`; median of rounds):\n"
            )
            .unwrap();
            for v in on_redis {
                let mut cmds: Vec<String> = self.runs[&(v, 1)].redis_calls.keys().cloned().collect();
                for n in 2..=self.rounds {
                    cmds.extend(self.runs[&(v, n)].redis_calls.keys().cloned());
                }
                cmds.sort();
                cmds.dedup();
                let cells: Vec<String> = cmds
                    .iter()
                    .map(|c| {
                        let per = median(self.per_round(v, |r| r.redis_calls.get(c).copied().unwrap_or(0.0)));
                        format!("{c} {per:.3}")
                    })
                    .collect();
                writeln!(o, "- {}: {}", v.id(), cells.join(", ")).unwrap();
            }
        }
        writeln!(
            o,
            "\nEnvoy's upstream_rq_time (cumulative over warm-ups and runs, coarse buckets) and non-zero counters:"
        )
        .unwrap();
        for line in &self.hops {
            writeln!(o, "- {line}").unwrap();
        }
        writeln!(o, "\nSpend check: {}.", self.spent.join("; ")).unwrap();
        o
    }
}

// ---------------------------------------------------------------- the work directory

/// Where wrk's raw output and our processes' stderr go; removed after a
/// successful run unless kept, kept (and named) after a failure.
struct WorkDir {
    path: PathBuf,
    keep: bool,
    ok: bool,
}

impl WorkDir {
    fn new(keep: bool) -> Self {
        Self { path: temp_dir("bench-envoy"), keep, ok: false }
    }

    fn succeeded(&mut self) {
        self.ok = true;
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.ok && !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        } else {
            log(&format!("work directory kept: {}", self.path.display()));
        }
    }
}
