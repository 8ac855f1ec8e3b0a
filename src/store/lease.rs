//! Lease mode (`store.counting: lease`): each replica takes blocks of units
//! ("leases") of a calendar quota from Redis and spends them locally, so most
//! allowed Checks cost no Redis round trip.
//!
//! **The invariant.** A take adds its block to the same Redis counter an
//! exact spend increments and records it in the counter's lease hash
//! (`…:leases`, holder id → units the holder may not have spent yet: what
//! it still held plus the block), all in one script. So the counter always
//! means "spent + leased", `counter ≤ limit` holds as in exact mode, and the
//! units a replica spends are units it was granted: across any number of
//! replicas, the units allowed in a window never exceed its limit. Exact-mode
//! spends by other replicas stay correct against the same counter.
//!
//! **Giving back.** Unspent units go back (counter −= units, record deleted)
//! when an account has been idle for `store.lease.idle`, on SIGTERM and on
//! reload ([`Store::release`]), and when its entitlement changes. A give-back
//! returns at most what the record holds, so a second one returns nothing.
//!
//! **Crashes.** A replica killed without giving back strands its unspent
//! leased units until the window ends: Redis cannot know how many of them
//! were already served, and reclaiming served units would break the limit, so
//! an expired lease is never reclaimed (its record expires with the counter).
//!
//! **Block size.** `min(max_block, max(need, 1, free / (2 · replicas)))`,
//! capped at `free` (`free = limit − counter`): large far from the limit, 1
//! near it, so the last units go one by one. A request that needs more than
//! `free` takes nothing.
//!
//! **Under-use.** A request is refused while units remain only when those
//! units are leased to other replicas: at most `R · (max_block + cost − 1)`
//! units (`R` replicas holding leases), and only until their holders spend
//! them or give them back (`idle` after their last request); a crashed
//! replica strands at most `max_block + cost − 1` per counter until the
//! window ends.
//!
//! **Known exhausted.** A take that finds too little free marks the counter
//! exhausted: requests that need more than it saw free are refused locally for at most `idle` (to see units
//! other replicas gave back), until a new window (a new counter), or until
//! an [`Invalidation`] for the account (`SetCredits`, `AddCredits`,
//! `ResetUsage`, `PutEntitlement`, Stripe events) arrives by pub/sub.
//!
//! **What stays exact.** Dry runs, cost-0 spends, spends with credits or
//! with a rolling (`per:`) quota go to Redis whole, as in exact mode, so they
//! stay all-or-nothing. Past `store.lease.max_accounts` accounts with leases,
//! spends of further accounts are exact too.
//!
//! **RateLimit honesty.** After a local spend `used` is reported as
//! `limit − units this replica still holds`: never more remaining than truly
//! remains (often less: other replicas' and Redis's free units are not
//! counted). A refusal reports the counter the script saw.
//!
//! May use: `store::{Store, StoreError, Invalidation}`, `store::redis`,
//! `entitlement`, `usage`, `bounds`, `identity`, `config` (the lease settings).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::redis::{BlockSize, RedisStore};
use super::{Invalidation, Store, StoreError};
use crate::config::LeaseConfig;
use crate::entitlement::{Account, Quota, Window};
use crate::identity::{KeyHash, KeyMeta};
use crate::usage::{MAX_COST, QuotaUsage, Spend, SpendAnswer};

/// A lease on one calendar counter, as this replica holds it.
#[derive(Debug, Clone)]
struct Lease {
    /// Units leased to this replica and not yet spent.
    units: u64,
    /// The limit the units were leased under: a changed limit gives them back.
    limit: u64,
    /// The counter (spent + leased, all replicas) at the last script call.
    counter: u64,
    /// Refuse locally until then (set when a take found too little free)
    /// any request that needs more than `units + free`.
    exhausted_until: Option<Instant>,
    /// The free units (limit − counter) the refused take saw.
    free: u64,
    /// The window's end: after it, the lease is worthless and dropped.
    ends: DateTime<Utc>,
}

/// One account's leases; behind a Tokio mutex because a take awaits Redis
/// while holding it (so concurrent Checks of one account make one take).
#[derive(Debug, Default)]
struct AccountLeases {
    /// Counter key → lease.
    leases: HashMap<String, Lease>,
    /// The last spend, for the idle give-back.
    last_used: Option<Instant>,
}

/// Counters for metrics (monotonic, except `outstanding`).
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// Leases taken (takes that granted units).
    pub taken: AtomicU64,
    /// Leases given back with units.
    pub returned: AtomicU64,
    /// Units held by this replica, unspent (a gauge).
    pub outstanding: AtomicU64,
    /// Spends that went through this store.
    pub spends: AtomicU64,
    /// Redis calls those spends made (takes, give-backs and exact spends).
    pub redis_calls: AtomicU64,
}

/// A snapshot of [`LeaseStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSnapshot {
    /// Leases taken.
    pub taken: u64,
    /// Leases given back with units.
    pub returned: u64,
    /// Units held, unspent.
    pub outstanding: u64,
    /// Spends.
    pub spends: u64,
    /// Redis calls made by spends.
    pub redis_calls: u64,
}

/// The lease-mode [`Store`] around the Redis store.
pub struct LeaseStore {
    inner: Arc<RedisStore>,
    config: LeaseConfig,
    /// This replica's name in lease records: random per process.
    holder: String,
    /// Account → its leases. A std mutex: never held across an `.await`.
    accounts: Mutex<HashMap<String, Arc<tokio::sync::Mutex<AccountLeases>>>>,
    stats: LeaseStats,
    /// The idle give-back task, stopped when the store goes away.
    sweeper: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for LeaseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseStore").field("holder", &self.holder).field("config", &self.config).finish_non_exhaustive()
    }
}

impl Drop for LeaseStore {
    fn drop(&mut self) {
        if let Some(task) = self.sweeper.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LeaseStore {
    /// Leases from `inner`; starts the idle give-back (needs a Tokio runtime).
    pub fn new(inner: Arc<RedisStore>, config: LeaseConfig) -> Result<Arc<Self>, StoreError> {
        let mut id = [0u8; 12];
        getrandom::fill(&mut id).map_err(|e| StoreError::Unavailable(format!("no randomness for a lease id: {e}")))?;
        let store = Arc::new(Self {
            inner,
            config,
            holder: hex::encode(id),
            accounts: Mutex::new(HashMap::new()),
            stats: LeaseStats::default(),
            sweeper: Mutex::new(None),
        });
        let weak = Arc::downgrade(&store);
        let task = tokio::spawn(sweep(weak, config.idle / 2));
        *lock(&store.sweeper) = Some(task);
        Ok(store)
    }

    /// The counters behind the metrics.
    pub fn stats(&self) -> LeaseSnapshot {
        let s = &self.stats;
        LeaseSnapshot {
            taken: s.taken.load(Ordering::Relaxed),
            returned: s.returned.load(Ordering::Relaxed),
            outstanding: s.outstanding.load(Ordering::Relaxed),
            spends: s.spends.load(Ordering::Relaxed),
            redis_calls: s.redis_calls.load(Ordering::Relaxed),
        }
    }

    /// Reacts to a change another replica published: `Usage` (a top-up or a
    /// reset) drops the account's "exhausted" marks; `Account` (a new
    /// entitlement, perhaps new limits) also gives its leases back.
    pub async fn invalidate(&self, inv: &Invalidation) {
        let (id, give_back) = match inv {
            Invalidation::Usage(id) => (id, false),
            Invalidation::Account(id) => (id, true),
            Invalidation::Key(_) => return,
        };
        let Some(entry) = lock(&self.accounts).get(id).cloned() else { return };
        let mut acct = entry.lock().await;
        for lease in acct.leases.values_mut() {
            lease.exhausted_until = None;
        }
        if give_back {
            // Under the account's lock: a take racing the give-back would
            // otherwise rewrite the record the give-back then deletes.
            let leases = std::mem::take(&mut acct.leases);
            self.give_back(leases).await;
        }
    }

    /// Drops every "exhausted" mark (after a lost subscription: a top-up may have been missed).
    pub fn forget_exhausted(&self) {
        let entries: Vec<_> = lock(&self.accounts).values().cloned().collect();
        for entry in entries {
            if let Ok(mut acct) = entry.try_lock() {
                acct.leases.values_mut().for_each(|l| l.exhausted_until = None);
            }
        }
    }

    /// Gives back every unspent unit of `leases`; failures are logged (the
    /// units stay counted as spent until the window ends: under-use, never over).
    async fn give_back(&self, leases: HashMap<String, Lease>) {
        for (key, lease) in leases {
            // A spent-out lease still has a record (it overstates what the
            // holder has left): give 0 back to delete it, so a later reset
            // does not count units nobody holds.
            self.stats.outstanding.fetch_sub(lease.units, Ordering::Relaxed);
            match self.inner.give_lease(&key, &self.holder, lease.units).await {
                Ok(_) => {
                    self.stats.returned.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(error = %e, units = lease.units, "could not give a lease back"),
            }
        }
    }

    /// The entry of `account`, created unless `max_accounts` are held.
    fn entry(&self, account: &str) -> Option<Arc<tokio::sync::Mutex<AccountLeases>>> {
        let mut accounts = lock(&self.accounts);
        if let Some(e) = accounts.get(account) {
            return Some(e.clone());
        }
        if accounts.len() >= self.config.max_accounts {
            return None;
        }
        let e = Arc::new(tokio::sync::Mutex::new(AccountLeases::default()));
        accounts.insert(account.to_owned(), e.clone());
        Some(e)
    }

    /// The spend in Redis, as exact mode does it.
    async fn exact(&self, spend: &Spend) -> Result<SpendAnswer, StoreError> {
        self.stats.redis_calls.fetch_add(1, Ordering::Relaxed);
        self.inner.spend(spend).await
    }

    /// Whether lease mode applies to `spend`; the rest is exact. (A cost-0
    /// spend only reads: exact mode answers it with the true usage.)
    fn leasable(spend: &Spend) -> bool {
        !spend.dry_run
            && spend.credits.is_none()
            && !spend.quotas.is_empty()
            && (1..=MAX_COST).contains(&spend.cost)
            && spend.quotas.iter().all(|q| matches!(q.window, Window::Calendar(_)))
    }

    async fn leased_spend(&self, spend: &Spend) -> Result<SpendAnswer, StoreError> {
        // The checks the exact path makes first, so no bad spend reaches a lease.
        crate::bounds::check_spend(spend).map_err(StoreError::Corrupt)?;
        let (mut keys, mut ends) = (Vec::with_capacity(spend.quotas.len()), Vec::with_capacity(spend.quotas.len()));
        for q in &spend.quotas {
            let (Some(key), Window::Calendar(period)) =
                (self.inner.counter_key(&spend.account, q, spend.now), q.window)
            else {
                return self.exact(spend).await;
            };
            if keys.contains(&key) {
                // Two quotas on one counter: let the script count them.
                return self.exact(spend).await;
            }
            keys.push(key);
            ends.push(period.bounds(spend.now).1);
        }
        let Some(entry) = self.entry(&spend.account) else { return self.exact(spend).await };
        let mut acct = entry.lock().await;
        let now = Instant::now();
        acct.last_used = Some(now);
        // Leases of ended windows are worthless: drop them (their counters expire).
        let ended: Vec<String> =
            acct.leases.iter().filter(|(_, l)| l.ends <= spend.now).map(|(k, _)| k.clone()).collect();
        for k in ended {
            if let Some(l) = acct.leases.remove(&k) {
                self.stats.outstanding.fetch_sub(l.units, Ordering::Relaxed);
            }
        }
        // A lease taken under another limit goes back before anything else.
        let mut stale = HashMap::new();
        for (q, key) in spend.quotas.iter().zip(&keys) {
            if acct.leases.get(key).is_some_and(|l| l.limit != q.limit)
                && let Some(l) = acct.leases.remove(key)
            {
                stale.insert(key.clone(), l);
            }
        }
        if !stale.is_empty() {
            self.stats.redis_calls.fetch_add(stale.len() as u64, Ordering::Relaxed);
            self.give_back(stale).await;
        }
        let cost = spend.cost;
        let known_exhausted = spend.quotas.iter().zip(&keys).any(|(_, key)| {
            acct.leases
                .get(key)
                .is_some_and(|l| l.units + l.free < cost && l.exhausted_until.is_some_and(|until| now < until))
        });
        if !known_exhausted {
            for ((q, key), &ends) in spend.quotas.iter().zip(&keys).zip(&ends) {
                let held = acct.leases.get(key).map_or(0, |l| l.units);
                if held >= cost {
                    continue;
                }
                let size = BlockSize {
                    need: cost - held,
                    max: self.config.max_block,
                    divisor: self.config.replicas.saturating_mul(2),
                };
                self.stats.redis_calls.fetch_add(1, Ordering::Relaxed);
                // On an error, units taken for earlier quotas stay held: not lost.
                let expires = ends + chrono::Duration::minutes(1);
                let got = match self.inner.take_lease(key, &self.holder, held, q.limit, size, expires).await {
                    Ok(got) => got,
                    Err(e) => {
                        if !e.is_transient() {
                            // A record that disagrees with us: start afresh (what we held
                            // stays counted as spent: under-use, never over).
                            if let Some(l) = acct.leases.remove(key) {
                                self.stats.outstanding.fetch_sub(l.units, Ordering::Relaxed);
                            }
                        }
                        return Err(e);
                    }
                };
                let lease = acct.leases.entry(key.clone()).or_insert(Lease {
                    units: 0,
                    limit: q.limit,
                    counter: 0,
                    exhausted_until: None,
                    free: 0,
                    ends,
                });
                lease.counter = got.counter;
                if got.units == 0 {
                    lease.exhausted_until = Some(now + self.config.idle);
                    lease.free = q.limit.saturating_sub(got.counter);
                } else {
                    lease.units += got.units;
                    lease.exhausted_until = None;
                    self.stats.taken.fetch_add(1, Ordering::Relaxed);
                    self.stats.outstanding.fetch_add(got.units, Ordering::Relaxed);
                }
            }
        }
        let ok = keys.iter().all(|k| acct.leases.get(k).is_some_and(|l| l.units >= cost));
        let mut quotas = Vec::with_capacity(keys.len());
        for ((q, key), &end) in spend.quotas.iter().zip(&keys).zip(&ends) {
            let lease = acct.leases.get_mut(key);
            let (used, exceeded) = match lease {
                Some(l) if l.units >= cost => {
                    if ok {
                        l.units -= cost;
                    }
                    (q.limit - l.units.min(q.limit), false)
                }
                Some(l) => (l.counter.max(q.limit.saturating_sub(l.units)), true),
                // Not asked (another quota is known exhausted): not known to be
                // exceeded, and nothing claimed to remain.
                None => (q.limit, false),
            };
            quotas.push(QuotaUsage { used, exceeded, resets_at: end, retry_at: end });
        }
        if ok {
            self.stats.outstanding.fetch_sub(cost * keys.len() as u64, Ordering::Relaxed);
        }
        Ok(SpendAnswer { spent: ok, quotas, credits: None })
    }

    /// Gives back the leases of accounts idle for `idle` and forgets them.
    ///
    /// Each give-back runs under the account's lock with its entry still in
    /// the map, so a spend for the account waits and then takes a fresh lease
    /// (a take and a give-back of one holder never interleave: the record a
    /// give-back deletes is the one it gives back). The entry leaves the map
    /// only when no spend holds a handle to it.
    async fn sweep_once(&self) {
        let idle = self.config.idle;
        let idle_entries: Vec<(String, Arc<tokio::sync::Mutex<AccountLeases>>)> = lock(&self.accounts)
            .iter()
            .filter(|(_, entry)| entry.try_lock().is_ok_and(|acct| acct.last_used.is_none_or(|t| t.elapsed() >= idle)))
            .map(|(id, entry)| (id.clone(), entry.clone()))
            .collect();
        for (id, entry) in idle_entries {
            let mut acct = entry.lock().await;
            if acct.last_used.is_some_and(|t| t.elapsed() < idle) {
                continue;
            }
            let leases = std::mem::take(&mut acct.leases);
            self.give_back(leases).await;
            let mut accounts = lock(&self.accounts);
            // Ours and the map's: no spend is waiting for this entry.
            if Arc::strong_count(&entry) == 2 && acct.leases.is_empty() {
                accounts.remove(&id);
            }
        }
    }
}

/// Every `every`, gives back idle leases, for as long as the store lives.
async fn sweep(store: Weak<LeaseStore>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(store) = store.upgrade() else { return };
        store.sweep_once().await;
    }
}

#[async_trait]
impl Store for LeaseStore {
    async fn account_for_key(&self, key: &KeyHash) -> Result<Option<String>, StoreError> {
        self.inner.account_for_key(key).await
    }

    async fn account(&self, id: &str) -> Result<Option<Arc<Account>>, StoreError> {
        self.inner.account(id).await
    }

    async fn spend(&self, spend: &Spend) -> Result<SpendAnswer, StoreError> {
        self.stats.spends.fetch_add(1, Ordering::Relaxed);
        if Self::leasable(spend) { self.leased_spend(spend).await } else { self.exact(spend).await }
    }

    async fn put_account(&self, account: &Account) -> Result<(), StoreError> {
        self.inner.put_account(account).await
    }

    async fn put_account_if_newer(&self, account: &Account) -> Result<bool, StoreError> {
        self.inner.put_account_if_newer(account).await
    }

    async fn account_for_customer(&self, customer: &str) -> Result<Option<String>, StoreError> {
        self.inner.account_for_customer(customer).await
    }

    async fn put_key(&self, key: &KeyHash, account: &str, meta: &KeyMeta) -> Result<(), StoreError> {
        self.inner.put_key(key, account, meta).await
    }

    async fn revoke_key(&self, account: &str, key: &KeyHash) -> Result<bool, StoreError> {
        self.inner.revoke_key(account, key).await
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
        self.inner.reset_usage(account, quotas, now).await?;
        // This replica's marks go now; the others' when the published change arrives.
        self.invalidate(&Invalidation::Usage(account.to_owned())).await;
        Ok(())
    }

    async fn remember_event(&self, id: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.inner.remember_event(id, ttl).await
    }

    async fn forget_event(&self, id: &str) -> Result<(), StoreError> {
        self.inner.forget_event(id).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    fn lease_stats(&self) -> Option<LeaseSnapshot> {
        Some(self.stats())
    }

    async fn release(&self) {
        // Entries stay: a spend racing this one finds its account as before.
        let entries: Vec<_> = lock(&self.accounts).values().cloned().collect();
        for entry in entries {
            // Under the account's lock, as in `invalidate`.
            let mut acct = entry.lock().await;
            let leases = std::mem::take(&mut acct.leases);
            self.give_back(leases).await;
        }
    }
}
