//! The `tollgate` binary: parse the CLI, load and validate config, start logging,
//! bind, and hand over to [`tollgate::server::run`].
//!
//! May use: the library's public API only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;
use tollgate::accounts::Accounts;
use tollgate::config::{Backend, Config};
use tollgate::metrics::Metrics;
use tollgate::reload::{self, Reloader, load};
use tollgate::server::{self, Listeners};
use tollgate::store::{self, Store};

/// mimalloc, not the system allocator: a Check allocates a few dozen small
/// objects, and with glibc malloc ~12 % of a loaded server's CPU went to
/// malloc/free; mimalloc raised Checks/s by ~40 % in `benches/grpc.rs`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a bad config or command line (EX_USAGE), before any port is bound.
const EXIT_CONFIG: i32 = 64;

#[derive(Parser, Debug)]
#[command(name = "tollgate", version, about = "Envoy ext_authz server that turns billing state into access decisions")]
struct Cli {
    /// YAML config; without it the bundled demo config (memory store, demo accounts) is used.
    #[arg(long, env = "TOLLGATE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Redis URL; sets store.backend to redis and overrides store.url.
    #[arg(long, env = "TOLLGATE_REDIS_URL", global = true)]
    redis_url: Option<String>,
    /// Log format.
    #[arg(long, env = "TOLLGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a config and print a summary; exit 0 when valid.
    CheckConfig {
        /// The config file.
        path: PathBuf,
    },
    /// Write the config's `accounts:` into the configured store (idempotent).
    Seed,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr under `TOLLGATE_LOG`/`RUST_LOG`; with `tracer`, request
/// spans also go to OpenTelemetry (whatever the log filter says: a quiet log
/// keeps its traces), and log lines inside one carry its `trace_id`.
fn init_logging(format: LogFormat, tracer: Option<opentelemetry_sdk::trace::Tracer>) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let otel = tracer.map(|t| {
        let spans = tracing_subscriber::filter::Targets::new().with_target("tollgate::trace", tracing::Level::INFO);
        tracing_opentelemetry::layer().with_tracer(t).with_filter(spans)
    });
    tracing_subscriber::registry().with(fmt.with_filter(filter)).with(otel).init();
}

fn load_or_exit(path: Option<&Path>, redis_url: Option<&str>) -> Config {
    match load(path, redis_url) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tollgate: invalid config: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    }
}

fn open_store(config: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<Arc<dyn Store>> {
    store::open(&config.store, &config.cache, metrics.cache_observer())
        .with_context(|| format!("opening the {:?} store", config.store.backend))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::CheckConfig { path }) => match load(Some(path), cli.redis_url.as_deref()) {
            Ok(c) => {
                println!("{}: valid\n{}", path.display(), c.summary());
                for w in c.warnings() {
                    println!("warning: {w}");
                }
                return Ok(());
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(EXIT_CONFIG);
            }
        },
        Some(Command::Seed) => {
            let config = load_or_exit(cli.config.as_deref(), cli.redis_url.as_deref());
            init_logging(cli.log_format, None);
            let store = open_store(&config, &Arc::new(Metrics::new()))?;
            let n = Accounts::seed(store.as_ref(), &config.accounts, &config.policy.plans).await?;
            println!("seeded {n} accounts into the {:?} store", config.store.backend);
            return Ok(());
        }
        None => {}
    }

    let config = load_or_exit(cli.config.as_deref(), cli.redis_url.as_deref());
    // Traces start before logging, so the log layer can hand spans to them.
    let traces = tollgate::telemetry::start(&config.tracing);
    let provider = traces.as_ref().ok().and_then(Option::as_ref);
    init_logging(cli.log_format, provider.map(tollgate::telemetry::tracer));
    match &traces {
        // The endpoint is not logged: a URL may carry credentials.
        Ok(Some(_)) => tracing::info!("exporting traces over OTLP/gRPC"),
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "traces are off"),
    }
    for w in config.warnings() {
        tracing::warn!("config: {w}");
    }
    let metrics = Arc::new(Metrics::new());
    let store = open_store(&config, &metrics)?;
    if config.store.backend == Backend::Memory {
        // The memory store starts empty: the config's accounts are its data.
        Accounts::seed(store.as_ref(), &config.accounts, &config.policy.plans).await?;
    }
    let grpc = TcpListener::bind(config.server.grpc_listen)
        .await
        .with_context(|| format!("binding server.grpc_listen {}", config.server.grpc_listen))?;
    let http = TcpListener::bind(config.server.http_listen)
        .await
        .with_context(|| format!("binding server.http_listen {}", config.server.http_listen))?;
    tracing::info!(
        grpc = %config.server.grpc_listen,
        http = %config.server.http_listen,
        store = ?config.store.backend,
        config = %cli.config.as_ref().map_or("<bundled demo>".into(), |p| p.display().to_string()),
        "tollgate listening"
    );
    let (path, redis_url) = (cli.config.clone(), cli.redis_url.clone());
    let watch = config.server.watch_config;
    let on_start = move |handle: server::Handle| {
        let reloader = Reloader::new(path, redis_url, handle.authorizer);
        if watch {
            reloader.clone().spawn_watch(reload::WATCH_INTERVAL);
        }
        #[cfg(unix)]
        reloader.spawn_on_sighup();
    };
    let authz_http = match config.server.authz_http_listen {
        Some(addr) => {
            Some(TcpListener::bind(addr).await.with_context(|| format!("binding server.authz_http_listen {addr}"))?)
        }
        None => None,
    };
    let listeners = Listeners { grpc, http, authz_http };
    let served = server::run(metrics, Arc::new(config), store, listeners, shutdown_signal(), on_start).await;
    if let Ok(Some(provider)) = traces {
        // Whatever is queued goes out before exit (at most 5 s: the SDK's shutdown bound).
        let _ = provider.shutdown();
    }
    served?;
    Ok(())
}
