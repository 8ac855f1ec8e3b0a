//! Reaching Redis: one server or a cluster, plain or TLS (`rediss://`), with
//! reconnection, the pub/sub subscription for cache invalidations, and the
//! mapping of redis-rs errors to [`StoreError`]s.
//!
//! Nothing here connects when the store is opened: tollgate starts, NOT_SERVING,
//! while Redis is still down, and the first call (or readiness probe) connects.
//! Depends on [`Invalidation`] and [`StoreError`] only; knows no keys or records.

use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use tokio::sync::Mutex;

use crate::store::{Invalidation, StoreError};

/// A connection to one Redis or a Redis Cluster; cheap to clone.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        p: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(p, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(p, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// How to reach the server(s).
enum Target {
    /// A `ConnectionManager`: multiplexed, reconnects by itself, connects lazily.
    Single(ConnectionManager),
    /// The cluster client connects on first use (it cannot connect lazily by
    /// itself), then keeps the connection, which follows slot moves and reconnects.
    /// A tokio mutex: the first connect is awaited while it is held.
    Cluster { client: Box<ClusterClient>, conn: Mutex<Option<ClusterConnection>> },
}

/// The connections of one store: commands, and where to subscribe.
pub(super) struct Connections {
    target: Target,
    /// Plain (non-cluster) URLs to subscribe on; pub/sub messages reach every cluster node.
    subscribe_urls: Vec<String>,
}

impl Connections {
    /// Connections for `url` (`redis://`, `rediss://`, `redis+cluster://`,
    /// `rediss+cluster://`); does no I/O.
    pub(super) fn open(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let connect_timeout = timeout.max(Duration::from_millis(250));
        if url.contains("+cluster://") {
            let nodes = cluster_nodes(url)?;
            let client = ClusterClient::builder(nodes.clone())
                .connection_timeout(connect_timeout)
                // No re-sends: the cluster client re-sends a command after an
                // I/O error (a reset after the script ran but before its reply
                // came), which would run a spend or a credit top-up twice. A
                // command that fails answers by `store.on_error`, as on one
                // server (whose connection manager never re-sends); a slot
                // that moved costs the Checks in flight, and the client
                // rebuilds its slot map on the redirect either way.
                .retries(0)
                .build()
                .map_err(unavailable)?;
            Ok(Self {
                target: Target::Cluster { client: Box::new(client), conn: Mutex::new(None) },
                subscribe_urls: nodes,
            })
        } else {
            let client = redis::Client::open(url).map_err(unavailable)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            let manager = ConnectionManager::new_lazy_with_config(client, config).map_err(unavailable)?;
            Ok(Self { target: Target::Single(manager), subscribe_urls: vec![url.to_owned()] })
        }
    }

    /// A connection to send commands on (the first call on a cluster connects).
    pub(super) async fn get(&self) -> Result<Conn, StoreError> {
        match &self.target {
            Target::Single(m) => Ok(Conn::Single(m.clone())),
            Target::Cluster { client, conn } => {
                let mut guard = conn.lock().await;
                if let Some(c) = guard.as_ref() {
                    return Ok(Conn::Cluster(c.clone()));
                }
                let c = client.get_async_connection().await.map_err(unavailable)?;
                *guard = Some(c.clone());
                Ok(Conn::Cluster(c))
            }
        }
    }

    /// Listens on `channel` for as long as the returned task lives,
    /// reconnecting by itself (to the next node, on a cluster) when the
    /// subscription drops. `on_reconnect` runs after every (re)subscription:
    /// changes made while disconnected were missed, so callers flush their cache.
    pub(super) fn spawn_listener<F, Fut>(
        &self,
        channel: String,
        on_message: F,
        on_reconnect: impl Fn() + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn(Invalidation) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let urls = self.subscribe_urls.clone();
        tokio::spawn(async move {
            let mut attempt = 0usize;
            loop {
                let url = &urls[attempt % urls.len()];
                attempt += 1;
                let subscribed = async {
                    let client = redis::Client::open(url.as_str())?;
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                };
                match tokio::time::timeout(Duration::from_secs(2), subscribed).await {
                    Ok(Ok(pubsub)) => {
                        tracing::debug!("subscribed to cache invalidations");
                        on_reconnect();
                        let mut messages = pubsub.into_on_message();
                        while let Some(msg) = messages.next().await {
                            let payload: String = msg.get_payload().unwrap_or_default();
                            if let Some(inv) = Invalidation::decode(&payload) {
                                on_message(inv).await;
                            }
                        }
                        tracing::warn!("invalidation subscription dropped; reconnecting");
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "cannot subscribe to invalidations yet"),
                    Err(_) => tracing::debug!("subscribing to invalidations timed out"),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    }
}

/// A redis-rs error as a [`StoreError`]: transient when retrying may help.
pub(super) fn unavailable(e: redis::RedisError) -> StoreError {
    // Our scripts' own refusals: a bad argument is a bug here, a bad stored value a foreign writer.
    if matches!(e.code(), Some("TOLLGATE_BADARG" | "TOLLGATE_CORRUPT")) {
        return StoreError::Corrupt(e.to_string());
    }
    if e.is_timeout() || e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        StoreError::Unavailable(e.to_string())
    } else if e.kind() == redis::ErrorKind::Parse || e.kind() == redis::ErrorKind::UnexpectedReturnType {
        StoreError::Corrupt(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

/// Splits `redis+cluster://[user:pass@]h1:7000,h2:7001[/]` into one plain URL per node.
pub(super) fn cluster_nodes(url: &str) -> Result<Vec<String>, StoreError> {
    let (scheme, rest) =
        url.split_once("://").ok_or_else(|| StoreError::Unavailable("store.url has no scheme".into()))?;
    let plain = if scheme.starts_with("rediss") { "rediss" } else { "redis" };
    let rest = rest.trim_end_matches('/');
    let (auth, hosts) = match rest.rfind('@') {
        Some(i) => (&rest[..=i], &rest[i + 1..]),
        None => ("", rest),
    };
    let nodes: Vec<String> =
        hosts.split(',').filter(|h| !h.trim().is_empty()).map(|h| format!("{plain}://{auth}{}", h.trim())).collect();
    if nodes.is_empty() {
        return Err(StoreError::Unavailable("store.url names no cluster node".into()));
    }
    Ok(nodes)
}
