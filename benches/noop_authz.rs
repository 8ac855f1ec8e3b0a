//! The floor for `scripts/bench-envoy.sh`: an `envoy.service.auth.v3.Authorization`
//! server that answers every `Check` with an OK `CheckResponse` and does nothing
//! else, so Envoy → this server measures the cost of the ext_authz hop itself.
//!
//! ```text
//! cargo bench --bench noop_authz -- --serve 127.0.0.1:9191   # serve until killed
//! ```
//!
//! The server is the kit's `tollgate_testkit::noop` (which also answers
//! `grpc.health.v1`, so Envoy's active health check passes). With
//! `--shaped[=SHAPE]` it still decides nothing, but answers what tollgate
//! answers when it allows the bench account (computed once at start by an
//! in-process tollgate), whole (`full`, the default) or without parts of it
//! (`no-metadata`, `no-ratelimit`, `no-removals`, `lean`: see `noop::Shape`).
//! With `--small-frames` its answers go out as tollgate's do, in DATA frames
//! under h2's chaining threshold (`tollgate::grpc::frames`).
//!
//! Without `--serve ADDR` (e.g. under a plain `cargo bench`) it prints a hint
//! and exits; other arguments (cargo passes `--bench`) are ignored.

use tokio::net::TcpListener;
use tollgate_testkit::bench;
use tollgate_testkit::noop::{self, Noop, Shape};

/// The address after `--serve` (or `--serve=ADDR`), if any.
fn serve_addr() -> Option<String> {
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--serve" {
            return args.next();
        }
        if let Some(addr) = a.strip_prefix("--serve=") {
            return Some(addr.to_owned());
        }
    }
    None
}

/// The shape after `--shaped` (`--shaped` alone: the whole answer).
fn shape() -> Result<Option<Shape>, String> {
    for a in std::env::args().skip(1) {
        if a == "--shaped" {
            return Ok(Some(Shape::Full));
        }
        if let Some(name) = a.strip_prefix("--shaped=") {
            let names: Vec<_> = Shape::ALL.iter().map(|s| s.name()).collect();
            return Shape::parse(name).map(Some).ok_or(format!("--shaped={name}: one of {}", names.join(", ")));
        }
    }
    Ok(None)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let shape = shape()?;
    let Some(addr) = serve_addr() else {
        println!("noop_authz: not a measurement; scripts/bench-envoy.sh runs it with `--serve 127.0.0.1:PORT`");
        return Ok(());
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let noop = match shape {
        Some(shape) => Noop::shaped(rt.block_on(bench::allow_answer()), shape),
        None => Noop::bare(),
    };
    let noop = if std::env::args().any(|a| a == "--small-frames") { noop.in_small_frames() } else { noop };
    rt.block_on(async move {
        let listener = TcpListener::bind(&addr).await?;
        println!("noop_authz listening on {addr}");
        noop::serve(listener, noop, std::future::pending()).await?;
        Ok(())
    })
}
