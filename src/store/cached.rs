//! A moka cache in front of a shared store: entitlements and API-key lookups.
//!
//! Concurrent misses for one key make one backend read (moka's `try_get_with`
//! coalesces them). Unknown keys and accounts are cached for `negative_ttl`,
//! so a flood of made-up keys costs the backend one read per key per
//! `negative_ttl`. Changes arrive as [`Invalidation`]s (pub/sub on Redis); the
//! TTL is the backstop when a message is lost. Counters and credits are never
//! cached: `spend` always goes to the backend.
//!
//! Memory is bounded in bytes, not entries (`cache.max_bytes`, half for each
//! cache): every entry is weighed by the lengths of its strings plus a fixed
//! overhead, and the least recently used are evicted past the budget. An
//! account id that [`is_valid_account_id`] rejects is answered `None` without
//! a lookup, so it is neither stored nor sent to the backend.
//!
//! May use: the [`Store`] trait and [`Invalidation`] of `store`, `entitlement`,
//! `identity`, `usage`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::Expiry;
use moka::future::Cache;

use super::{Invalidation, Reply, Store, StoreError};
use chrono::{DateTime, Utc};

use crate::entitlement::{Account, Quota, is_valid_account_id};
use crate::identity::{KeyHash, KeyMeta};
use crate::usage::{Adjustment, OutboxEvent, Settled, Spend, SpendAnswer};

/// Called with `true` on a hit and `false` on a miss (metrics).
pub type LookupObserver = Arc<dyn Fn(bool) + Send + Sync>;

/// Positive answers live `ttl`, negative ones `negative_ttl`.
struct TtlByAnswer {
    ttl: Duration,
    negative_ttl: Duration,
}

impl<K, V> Expiry<K, Option<V>> for TtlByAnswer {
    fn expire_after_create(&self, _: &K, value: &Option<V>, _: Instant) -> Option<Duration> {
        Some(if value.is_some() { self.ttl } else { self.negative_ttl })
    }
}

/// A caching [`Store`] wrapper.
pub struct CachedStore {
    inner: Arc<dyn Store>,
    keys: Cache<KeyHash, Option<Arc<str>>>,
    accounts: Cache<String, Option<Arc<Account>>>,
    observe: LookupObserver,
    /// The invalidation listener, stopped when the cache goes away.
    listener: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for CachedStore {
    fn drop(&mut self) {
        if let Some(task) = self.listener.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

impl std::fmt::Debug for CachedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedStore").field("keys", &self.keys.entry_count()).finish_non_exhaustive()
    }
}

/// What one cache entry costs beyond the strings it holds: moka's entry and
/// its indexes (deque nodes, hash table slot, timer wheel), roughly.
const ENTRY_OVERHEAD: usize = 160;

/// The approximate bytes of a key-cache entry: a key hash and an account id.
fn key_entry_weight(_key: &KeyHash, account: &Option<Arc<str>>) -> u32 {
    // The id's bytes and the two counts of its shared allocation.
    let size = size_of::<KeyHash>() + size_of::<Option<Arc<str>>>() + account.as_ref().map_or(0, |a| 16 + a.len());
    saturate(ENTRY_OVERHEAD + size)
}

/// The approximate bytes of an account-cache entry: the id twice (key and
/// value) and every string and quota the entitlement holds.
fn account_entry_weight(id: &str, account: &Option<Arc<Account>>) -> u32 {
    let value = account.as_deref().map_or(0, |a| {
        // A BTreeSet spends about a pointer or two per element beyond the string.
        let features: usize = a.extra_features.iter().map(|f| size_of::<String>() + 16 + f.len()).sum();
        let quotas: usize = a.quota_overrides.iter().map(|q| size_of::<Quota>() + q.meter.len()).sum();
        size_of::<Account>()
            + a.id.len()
            + a.plan.len()
            + a.stripe_customer.as_ref().map_or(0, String::len)
            + features
            + quotas
    });
    saturate(ENTRY_OVERHEAD + size_of::<String>() + id.len() + size_of::<Option<Arc<Account>>>() + value)
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl CachedStore {
    /// Caches `inner`'s lookups for `ttl` (found) and `negative_ttl` (not
    /// found), in at most about `max_bytes` (half for API keys, half for accounts).
    pub fn new(
        inner: Arc<dyn Store>,
        ttl: Duration,
        negative_ttl: Duration,
        max_bytes: u64,
        observe: LookupObserver,
    ) -> Self {
        let build = || TtlByAnswer { ttl, negative_ttl };
        let half = max_bytes / 2;
        Self {
            inner,
            keys: Cache::builder().max_capacity(half).weigher(key_entry_weight).expire_after(build()).build(),
            accounts: Cache::builder()
                .max_capacity(max_bytes - half)
                .weigher(|id: &String, account: &Option<Arc<Account>>| account_entry_weight(id, account))
                .expire_after(build())
                .build(),
            observe,
            listener: std::sync::Mutex::new(None),
        }
    }

    /// Ties an invalidation listener's lifetime to this cache.
    pub fn set_listener(&self, task: tokio::task::JoinHandle<()>) {
        if let Some(old) = self.listener.lock().unwrap_or_else(|e| e.into_inner()).replace(task) {
            old.abort();
        }
    }

    /// Drops what `inv` names.
    pub async fn invalidate(&self, inv: &Invalidation) {
        match inv {
            Invalidation::Account(id) => self.accounts.invalidate(id).await,
            Invalidation::Key(k) => self.keys.invalidate(k).await,
            // Counters and credits are never cached here.
            Invalidation::Usage(_) => {}
        }
    }

    /// Drops everything (after a lost subscription: messages may have been missed).
    pub fn invalidate_all(&self) {
        self.keys.invalidate_all();
        self.accounts.invalidate_all();
    }
}

#[async_trait]
impl Store for CachedStore {
    fn account_for_key<'a>(&'a self, key: &'a KeyHash) -> Reply<'a, Result<Option<Arc<str>>, StoreError>> {
        Reply::later(async move {
            // A plain get first: the backend read (a boxed future) is built on misses only.
            if let Some(hit) = self.keys.get(key).await {
                (self.observe)(true);
                return Ok(hit);
            }
            let entry = self
                .keys
                .entry(*key)
                .or_try_insert_with(self.inner.account_for_key(key))
                .await
                .map_err(|e: Arc<StoreError>| clone_error(&e))?;
            (self.observe)(!entry.is_fresh());
            Ok(entry.into_value())
        })
    }

    fn account<'a>(&'a self, id: &'a str) -> Reply<'a, Result<Option<Arc<Account>>, StoreError>> {
        Reply::later(async move {
            // No such account can exist: not worth a backend read nor a cache slot.
            if !is_valid_account_id(id) {
                return Ok(None);
            }
            if let Some(hit) = self.accounts.get(id).await {
                (self.observe)(true);
                return Ok(hit);
            }
            let entry = self
                .accounts
                .entry_by_ref(id)
                .or_try_insert_with(self.inner.account(id))
                .await
                .map_err(|e: Arc<StoreError>| clone_error(&e))?;
            (self.observe)(!entry.is_fresh());
            Ok(entry.into_value())
        })
    }

    fn spend<'a>(&'a self, spend: &'a Spend) -> Reply<'a, Result<SpendAnswer, StoreError>> {
        self.inner.spend(spend)
    }

    async fn put_account(&self, account: &Account) -> Result<(), StoreError> {
        self.inner.put_account(account).await?;
        self.accounts.invalidate(&*account.id).await;
        Ok(())
    }

    async fn put_account_if_newer(&self, account: &Account) -> Result<bool, StoreError> {
        let written = self.inner.put_account_if_newer(account).await?;
        self.accounts.invalidate(&*account.id).await;
        Ok(written)
    }

    async fn account_for_customer(&self, customer: &str) -> Result<Option<String>, StoreError> {
        self.inner.account_for_customer(customer).await
    }

    async fn put_key(&self, key: &KeyHash, account: &str, meta: &KeyMeta) -> Result<(), StoreError> {
        self.inner.put_key(key, account, meta).await?;
        self.keys.invalidate(key).await;
        Ok(())
    }

    async fn revoke_key(&self, account: &str, key: &KeyHash) -> Result<bool, StoreError> {
        let revoked = self.inner.revoke_key(account, key).await?;
        self.keys.invalidate(key).await;
        Ok(revoked)
    }

    async fn list_keys(&self, account: &str) -> Result<Vec<(KeyHash, KeyMeta)>, StoreError> {
        self.inner.list_keys(account).await
    }

    async fn set_credits(&self, account: &str, credits: u64) -> Result<(), StoreError> {
        self.inner.set_credits(account, credits).await
    }

    async fn credits(&self, account: &str) -> Result<u64, StoreError> {
        self.inner.credits(account).await
    }

    async fn add_credits(&self, account: &str, delta: i64) -> Result<Option<u64>, StoreError> {
        self.inner.add_credits(account, delta).await
    }

    async fn reset_usage(&self, account: &str, quotas: &[Quota], now: DateTime<Utc>) -> Result<(), StoreError> {
        self.inner.reset_usage(account, quotas, now).await
    }

    async fn remember_event(&self, id: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.inner.remember_event(id, ttl).await
    }

    async fn forget_event(&self, id: &str) -> Result<(), StoreError> {
        self.inner.forget_event(id).await
    }

    async fn settle(&self, adjustment: &Adjustment) -> Result<Settled, StoreError> {
        self.inner.settle(adjustment).await
    }

    async fn settle_many(&self, adjustments: &[Adjustment]) -> Result<Vec<Settled>, StoreError> {
        self.inner.settle_many(adjustments).await
    }

    async fn record_settled(
        &self,
        account: &str,
        issued: DateTime<Utc>,
        ids: &[String],
        until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.inner.record_settled(account, issued, ids, until).await
    }

    async fn charge_key(&self) -> Result<[u8; 32], StoreError> {
        self.inner.charge_key().await
    }

    async fn outbox_claim(
        &self,
        consumer: &str,
        max: usize,
        reclaim_after: Duration,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        self.inner.outbox_claim(consumer, max, reclaim_after).await
    }

    async fn outbox_ack(&self, events: &[OutboxEvent]) -> Result<(), StoreError> {
        self.inner.outbox_ack(events).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    async fn release(&self) {
        self.inner.release().await
    }

    fn lease_stats(&self) -> Option<crate::usage::LeaseTotals> {
        self.inner.lease_stats()
    }
}

/// moka shares one error among coalesced callers; each gets its own copy.
fn clone_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::Timeout(d) => StoreError::Timeout(*d),
        StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
    }
}

#[cfg(test)]
mod tests;
