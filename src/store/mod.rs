//! Where entitlements, API-key hashes, credits and usage counters live.
//!
//! [`Store`] is the small seam between the server and its backends: the
//! [`memory::MemoryStore`] (demo, tests, single replica) and
//! [`redis::RedisStore`] (shared by replicas), the latter behind
//! [`cached::CachedStore`], and in lease mode (`store.counting: lease`) also
//! behind [`lease::LeaseStore`], which spends blocks of calendar quota units
//! locally. Both count rolling windows in the buckets of
//! [`rolling`], so their state and work do not grow with a quota's limit.
//! Stores know the domain (`entitlement`, `usage`, `identity::KeyHash`) and
//! nothing of decisions or transports.
//!
//! May use: `entitlement`, `usage`, `bounds`, `identity`, `config` (store and
//! cache settings only).

pub mod cached;
pub mod lease;
pub mod memory;
pub mod redis;
pub mod rolling;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;

use crate::config::{Backend, CacheConfig, Counting, StoreConfig};
use chrono::{DateTime, Utc};

use crate::entitlement::{Account, Quota};
use crate::identity::{KeyHash, KeyMeta};
use crate::usage::{Adjustment, OutboxEvent, Settled, Spend, SpendAnswer};

pub use cached::{CachedStore, LookupObserver};
pub use lease::LeaseStore;
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

/// What a store answers the three calls every Check makes: at once (the
/// memory store, which has nothing to wait for: no future is boxed per
/// call) or later (a future to await, boxed as `async_trait` boxes the
/// other calls).
#[must_use = "a store's reply does nothing on most backends until it is awaited"]
pub enum Reply<'a, T> {
    /// Answered already.
    Now(std::future::Ready<T>),
    /// To be awaited.
    Later(Pin<Box<dyn Future<Output = T> + Send + 'a>>),
}

impl<'a, T> Reply<'a, T> {
    /// An answer ready now.
    pub fn now(value: T) -> Self {
        Reply::Now(std::future::ready(value))
    }

    /// An answer `future` will give.
    pub fn later(future: impl Future<Output = T> + Send + 'a) -> Self {
        Reply::Later(Box::pin(future))
    }
}

impl<T> Future for Reply<'_, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.get_mut() {
            Reply::Now(ready) => Pin::new(ready).poll(cx),
            Reply::Later(future) => future.as_mut().poll(cx),
        }
    }
}

/// The operations the server needs from a backend.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The account an API key belongs to; `None` for unknown or revoked keys.
    /// Shared: a store or cache that keeps it hands out the same string.
    fn account_for_key<'a>(&'a self, key: &'a KeyHash) -> Reply<'a, Result<Option<Arc<str>>, StoreError>>;

    /// An account's entitlement; `None` when there is no such account.
    fn account<'a>(&'a self, id: &'a str) -> Reply<'a, Result<Option<Arc<Account>>, StoreError>>;

    /// Checks every quota and the credits of `spend` and, only if all pass and
    /// it is not a dry run, spends them all: atomically, never partly.
    fn spend<'a>(&'a self, spend: &'a Spend) -> Reply<'a, Result<SpendAnswer, StoreError>>;

    /// Creates or replaces an account's entitlement (not its keys, credits or usage).
    async fn put_account(&self, account: &Account) -> Result<(), StoreError>;

    /// Writes `account` unless the stored one has a newer `billing_event_at`
    /// (atomically, so late billing events never roll an account back);
    /// returns whether it was written.
    async fn put_account_if_newer(&self, account: &Account) -> Result<bool, StoreError>;

    /// The account whose `stripe_customer` is `customer`.
    async fn account_for_customer(&self, customer: &str) -> Result<Option<String>, StoreError>;

    /// Maps an API key hash to an account, with what operators may see of it.
    async fn put_key(&self, key: &KeyHash, account: &str, meta: &KeyMeta) -> Result<(), StoreError>;

    /// Revokes one of `account`'s keys; false when it has no such key.
    async fn revoke_key(&self, account: &str, key: &KeyHash) -> Result<bool, StoreError>;

    /// The account's keys: hashes and metadata, never the keys.
    async fn list_keys(&self, account: &str) -> Result<Vec<(KeyHash, KeyMeta)>, StoreError>;

    /// Sets an account's prepaid balance.
    async fn set_credits(&self, account: &str, credits: u64) -> Result<(), StoreError>;

    /// An account's prepaid balance (0 when none was ever set).
    async fn credits(&self, account: &str) -> Result<u64, StoreError>;

    /// Adds `delta` (which may be negative) atomically; `None`, and no change,
    /// when the balance would go below zero.
    async fn add_credits(&self, account: &str, delta: i64) -> Result<Option<u64>, StoreError>;

    /// Zeroes the current windows of `quotas` (rolling windows lose every bucket).
    async fn reset_usage(&self, account: &str, quotas: &[Quota], now: DateTime<Utc>) -> Result<(), StoreError>;

    /// Records an event id for `ttl`; false when it was already recorded (a replay).
    async fn remember_event(&self, id: &str, ttl: Duration) -> Result<bool, StoreError>;

    /// Forgets an event id, so a retry of an event that failed is processed.
    async fn forget_event(&self, id: &str) -> Result<(), StoreError>;

    /// Applies a settlement's adjustment once per charge id (atomically with
    /// recording the id); a replay answers [`Settled::Duplicate`] and changes nothing.
    async fn settle(&self, adjustment: &Adjustment) -> Result<Settled, StoreError>;

    /// [`Store::settle`] for several adjustments of one account (as one
    /// access-log message brings them), in order; a store may make fewer
    /// calls. On an error none may be taken as applied (a retry is safe: the
    /// ones that were answer `Duplicate`).
    async fn settle_many(&self, adjustments: &[Adjustment]) -> Result<Vec<Settled>, StoreError> {
        let mut out = Vec::with_capacity(adjustments.len());
        for a in adjustments {
            out.push(self.settle(a).await?);
        }
        Ok(out)
    }

    /// Records charges of `account` settled at their reservation (nothing to
    /// move, no events): their ids, kept until `until`, so no later entry for
    /// them changes anything. One call for many ids, all issued in the
    /// ten-minute slot of `issued` (`settlement::SLOT_MS`).
    async fn record_settled(
        &self,
        account: &str,
        issued: DateTime<Utc>,
        ids: &[String],
        until: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// The secret charges are signed with: the same on every replica sharing
    /// this store (a charge made by one is settled by any), made on first use.
    async fn charge_key(&self) -> Result<[u8; 32], StoreError>;

    /// Claims up to `max` events from the outbox for `consumer` (a replica):
    /// its own unacknowledged ones first, then new ones, then ones another
    /// consumer has held for `reclaim_after`. A store without an outbox has none.
    async fn outbox_claim(
        &self,
        _consumer: &str,
        _max: usize,
        _reclaim_after: Duration,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        Ok(Vec::new())
    }

    /// Removes delivered events from the outbox.
    async fn outbox_ack(&self, _events: &[OutboxEvent]) -> Result<(), StoreError> {
        Ok(())
    }

    /// Succeeds when the backend answers; drives readiness.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Gives back whatever this replica holds but has not spent (lease mode's
    /// leases), on shutdown and reload; a no-op for the other stores.
    async fn release(&self) {}

    /// Lease mode's totals, for metrics; `None` for the other stores.
    fn lease_stats(&self) -> Option<crate::usage::LeaseTotals> {
        None
    }
}

/// A change other replicas must drop from their caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// An account's entitlement changed.
    Account(String),
    /// An API key was created or revoked.
    Key(KeyHash),
    /// An account's counters or credits changed by hand (`SetCredits`,
    /// `AddCredits`, `ResetUsage`): lease mode drops its "exhausted" marks.
    Usage(String),
}

impl Invalidation {
    /// The pub/sub payload.
    pub fn encode(&self) -> String {
        match self {
            Invalidation::Account(id) => format!("account:{id}"),
            Invalidation::Key(k) => format!("key:{}", k.to_hex()),
            Invalidation::Usage(id) => format!("usage:{id}"),
        }
    }

    /// Parses a pub/sub payload.
    pub fn decode(s: &str) -> Option<Self> {
        if let Some(id) = s.strip_prefix("account:") {
            return Some(Invalidation::Account(id.to_owned()));
        }
        if let Some(id) = s.strip_prefix("usage:") {
            return Some(Invalidation::Usage(id.to_owned()));
        }
        let hex = s.strip_prefix("key:")?;
        let bytes: [u8; 32] = hex::decode(hex).ok()?.try_into().ok()?;
        Some(Invalidation::Key(KeyHash(bytes)))
    }
}

/// Opens the configured backend: the memory store, or Redis behind the moka
/// cache (and, in lease mode, the [`LeaseStore`] between them), kept fresh by
/// pub/sub invalidation. Does no I/O: a Redis that is down shows as
/// NOT_SERVING, not as a failed start. Lease mode needs a Tokio runtime (its
/// idle give-back is a task).
pub fn open(store: &StoreConfig, cache: &CacheConfig, observe: LookupObserver) -> Result<Arc<dyn Store>, StoreError> {
    match store.backend {
        Backend::Memory => Ok(Arc::new(MemoryStore::new())),
        Backend::Redis => {
            let redis = Arc::new(RedisStore::open(&store.url.0, &store.key_prefix, store.timeout)?);
            let lease = match store.counting {
                Counting::Exact => None,
                Counting::Lease => Some(LeaseStore::new(redis.clone(), store.lease)?),
            };
            let inner: Arc<dyn Store> = match &lease {
                Some(lease) => lease.clone(),
                None => redis.clone(),
            };
            let cached = Arc::new(CachedStore::new(inner, cache.ttl, cache.negative_ttl, cache.max_bytes, observe));
            let (on_message, on_reconnect) = (Arc::downgrade(&cached), Arc::downgrade(&cached));
            let (lease_message, lease_reconnect) =
                (lease.as_ref().map(Arc::downgrade), lease.as_ref().map(Arc::downgrade));
            let task = redis.spawn_listener(
                move |inv| {
                    let cache = on_message.upgrade();
                    let lease = lease_message.as_ref().and_then(std::sync::Weak::upgrade);
                    async move {
                        if let Some(cache) = cache {
                            cache.invalidate(&inv).await;
                        }
                        // Off the listener: a give-back waits for the account's
                        // lock and Redis, and must not hold up other changes.
                        if let Some(lease) = lease {
                            tokio::spawn(async move { lease.invalidate(&inv).await });
                        }
                    }
                },
                move || {
                    if let Some(cache) = on_reconnect.upgrade() {
                        cache.invalidate_all();
                    }
                    // Changes published meanwhile were missed (a top-up, a
                    // voided lease, a new limit): give every lease back.
                    if let Some(lease) = lease_reconnect.as_ref().and_then(std::sync::Weak::upgrade) {
                        tokio::spawn(async move { lease.release().await });
                    }
                },
            );
            cached.set_listener(task);
            Ok(cached)
        }
    }
}
