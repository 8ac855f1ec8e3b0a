//! Where entitlements, API-key hashes, credits and usage counters live.
//!
//! [`Store`] is the small seam between the server and its backends: the
//! [`memory::MemoryStore`] (demo, tests, single replica) and, later, Redis.
//! Stores know the domain (`entitlement`, `usage`, `identity::KeyHash`) and
//! nothing of decisions or transports.

pub mod cached;
pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::config::{Backend, CacheConfig, StoreConfig};
use crate::entitlement::Account;
use crate::identity::KeyHash;
use crate::usage::{Spend, SpendAnswer};

pub use cached::{CachedStore, LookupObserver};
pub use memory::MemoryStore;
pub use redis::RedisStore;

/// A store call that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or refused the call.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend did not answer within the configured timeout.
    #[error("store timed out after {0:?}")]
    Timeout(Duration),
    /// The backend answered with data we cannot read: a bug or a foreign writer.
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether retrying later may succeed (a fault, not a bug).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Timeout(_))
    }
}

/// The operations the server needs from a backend.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The account an API key belongs to; `None` for unknown or revoked keys.
    async fn account_for_key(&self, key: &KeyHash) -> Result<Option<String>, StoreError>;

    /// An account's entitlement; `None` when there is no such account.
    async fn account(&self, id: &str) -> Result<Option<Arc<Account>>, StoreError>;

    /// Checks every quota and the credits of `spend` and, only if all pass and
    /// it is not a dry run, spends them all: atomically, never partly.
    async fn spend(&self, spend: &Spend) -> Result<SpendAnswer, StoreError>;

    /// Creates or replaces an account's entitlement (not its keys, credits or usage).
    async fn put_account(&self, account: &Account) -> Result<(), StoreError>;

    /// Maps an API key hash to an account.
    async fn put_key(&self, key: &KeyHash, account: &str) -> Result<(), StoreError>;

    /// Sets an account's prepaid balance.
    async fn set_credits(&self, account: &str, credits: u64) -> Result<(), StoreError>;

    /// Succeeds when the backend answers; drives readiness.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// A change other replicas must drop from their caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// An account's entitlement changed.
    Account(String),
    /// An API key was created or revoked.
    Key(KeyHash),
}

impl Invalidation {
    /// The pub/sub payload.
    pub fn encode(&self) -> String {
        match self {
            Invalidation::Account(id) => format!("account:{id}"),
            Invalidation::Key(k) => format!("key:{}", k.to_hex()),
        }
    }

    /// Parses a pub/sub payload.
    pub fn decode(s: &str) -> Option<Self> {
        if let Some(id) = s.strip_prefix("account:") {
            return Some(Invalidation::Account(id.to_owned()));
        }
        let hex = s.strip_prefix("key:")?;
        let bytes: [u8; 32] = hex::decode(hex).ok()?.try_into().ok()?;
        Some(Invalidation::Key(KeyHash(bytes)))
    }
}

/// An account as seeded from config: entitlement, plain keys and balance.
#[derive(Clone)]
pub struct Seed<'a> {
    /// The entitlement.
    pub account: &'a Account,
    /// Plain API keys; only their hashes are written.
    pub api_keys: &'a [String],
    /// Initial balance.
    pub credits: u64,
}

/// Writes `seeds` into `store`. Idempotent: running it twice leaves the same state
/// (usage counters are not touched; credits are set, not added).
pub async fn seed<'a>(store: &dyn Store, seeds: impl IntoIterator<Item = Seed<'a>>) -> Result<usize, StoreError> {
    let mut n = 0;
    for s in seeds {
        store.put_account(s.account).await?;
        for key in s.api_keys {
            store.put_key(&KeyHash::of(key), &s.account.id).await?;
        }
        store.set_credits(&s.account.id, s.credits).await?;
        n += 1;
    }
    Ok(n)
}

/// Opens the configured backend: the memory store, or Redis behind the moka
/// cache, kept fresh by pub/sub invalidation. Does no I/O: a Redis that is
/// down shows as NOT_SERVING, not as a failed start.
pub fn open(store: &StoreConfig, cache: &CacheConfig, observe: LookupObserver) -> Result<Arc<dyn Store>, StoreError> {
    match store.backend {
        Backend::Memory => Ok(Arc::new(MemoryStore::new())),
        Backend::Redis => {
            let redis = Arc::new(RedisStore::open(&store.url.0, &store.key_prefix, store.timeout)?);
            let cached = Arc::new(CachedStore::new(redis.clone(), cache.ttl, cache.negative_ttl, observe));
            let (on_message, on_reconnect) = (Arc::downgrade(&cached), Arc::downgrade(&cached));
            let task = redis.spawn_listener(
                move |inv| {
                    let cache = on_message.upgrade();
                    async move {
                        if let Some(cache) = cache {
                            cache.invalidate(&inv).await;
                        }
                    }
                },
                move || {
                    if let Some(cache) = on_reconnect.upgrade() {
                        cache.invalidate_all();
                    }
                },
            );
            cached.set_listener(task);
            Ok(cached)
        }
    }
}
