//! Config reloads: on SIGHUP and, with `server.watch_config`, when the file's
//! content changes (polled, which also sees Kubernetes' ConfigMap symlink swaps).
//!
//! A valid config is swapped in atomically; Checks already running finish on
//! the one they started with. An invalid one is logged with its reason and
//! counted (`tollgate_config_reloads_total{result="error"}`); the old stays.
//! Listeners, TLS and the store backend are fixed at start-up: a change to
//! them is reported and takes effect on restart.
//!
//! May use: `config`, `authorizer`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::authorizer::Authorizer;
use crate::config::{Backend, Config, ConfigError, DEMO_CONFIG, StoreUrl};

/// How often a watched config file is re-read.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Loads the config the CLI names: a file, or the bundled demo; `redis_url`
/// (from `--redis-url`) switches the store to Redis at that URL.
pub fn load(path: Option<&Path>, redis_url: Option<&str>) -> Result<Config, ConfigError> {
    let mut config = match path {
        Some(p) => Config::load(p)?,
        None => Config::parse(DEMO_CONFIG, "<bundled demo config>")?,
    };
    if let Some(url) = redis_url {
        config.store.backend = Backend::Redis;
        config.store.url = StoreUrl(url.to_owned());
    }
    Ok(config)
}

/// Re-reads one config source into a running authorizer.
#[derive(Debug, Clone)]
pub struct Reloader {
    path: Option<PathBuf>,
    redis_url: Option<String>,
    authorizer: Arc<Authorizer>,
}

impl Reloader {
    /// A reloader for the config at `path` (the bundled demo when `None`).
    pub fn new(path: Option<PathBuf>, redis_url: Option<String>, authorizer: Arc<Authorizer>) -> Self {
        Self { path, redis_url, authorizer }
    }

    /// Loads and, if valid, swaps in the config; the old one stays on error.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let metrics = self.authorizer.metrics();
        match load(self.path.as_deref(), self.redis_url.as_deref()) {
            Ok(new) => {
                let old = self.authorizer.config();
                for (what, changed) in [
                    ("server.grpc_listen", old.server.grpc_listen != new.server.grpc_listen),
                    ("server.http_listen", old.server.http_listen != new.server.http_listen),
                    ("server.authz_http_listen", old.server.authz_http_listen != new.server.authz_http_listen),
                    ("server.reflection", old.server.reflection != new.server.reflection),
                    ("tracing", old.tracing != new.tracing),
                    (
                        "store",
                        old.store.backend != new.store.backend
                            || old.store.url != new.store.url
                            || old.store.counting != new.store.counting
                            || old.store.lease != new.store.lease,
                    ),
                ] {
                    if changed {
                        tracing::warn!(field = what, "changed in the config; takes effect on restart");
                    }
                }
                for w in new.warnings() {
                    tracing::warn!("config: {w}");
                }
                self.authorizer.replace_config(Arc::new(new));
                // Lease mode gives its leases back: limits may have changed.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let store = self.authorizer.store().clone();
                    rt.spawn(async move { store.release().await });
                }
                metrics.record_reload("ok");
                tracing::info!("config reloaded");
                Ok(())
            }
            Err(e) => {
                metrics.record_reload("error");
                tracing::error!(error = %e, "config reload rejected; keeping the old config");
                Err(e)
            }
        }
    }

    /// Reloads on every SIGHUP.
    #[cfg(unix)]
    pub fn spawn_on_sighup(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                tracing::warn!("cannot listen for SIGHUP; reload by file watching only");
                return;
            };
            while hup.recv().await.is_some() {
                let _ = self.reload();
            }
        })
    }

    /// Reloads whenever the file's content changes.
    pub fn spawn_watch(self, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let Some(path) = self.path.clone() else { return };
            let digest = |p: &Path| std::fs::read(p).ok().map(|b| Sha256::digest(&b));
            let mut last = digest(&path);
            loop {
                tokio::time::sleep(interval).await;
                let now = digest(&path);
                if now.is_some() && now != last {
                    last = now;
                    let _ = self.reload();
                }
            }
        })
    }
}
