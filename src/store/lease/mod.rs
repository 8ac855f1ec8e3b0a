//! Lease mode (`store.counting: lease`): each replica takes blocks of units
//! ("leases") of a calendar quota or of a prepaid balance from Redis and
//! spends them locally, so most allowed Checks cost no Redis round trip.
//!
//! **The invariant.** A take moves its block out of what is free and into
//! the holder's lease record, in one script: for a quota, it adds the block to
//! the same counter an exact spend increments (the counter means "spent +
//! leased", `counter ≤ limit` as in exact mode); for credits, it takes the
//! block off the balance (the balance means "neither spent nor leased",
//! `balance ≥ 0`). The units a replica spends are units it was granted, so
//! across any number of replicas the units allowed in a window never exceed
//! its limit and credits never go below zero. Exact-mode spends by other
//! replicas stay correct against the same keys.
//!
//! **Lifetime.** A record (`…:leases`, holder → "units:deadline") lets its
//! holder spend for `store.lease.lifetime` from the take, Redis time; this
//! replica stops at 9/10 of it (its own clock, counted from before the call)
//! and renews at half of it with a take, which also reports what it still
//! holds. Only live records count where the whole must be known: ResetUsage
//! keeps a quota's live leases counted, SetCredits sets the balance to the
//! new credits minus the live leases. An expired record gives nothing back.
//!
//! **Giving back.** Unspent units go back (counter −= units, or balance +=
//! units; record deleted) when an account has been idle for `idle`, on
//! SIGTERM and on reload ([`Store::release`]), and when its entitlement,
//! credits or usage change (an [`Invalidation`]). A give-back returns at most
//! what the live record holds, so a second one returns nothing.
//!
//! **Crashes.** A replica killed without giving back strands its unspent
//! units: Redis cannot know how many of them were served, and reclaiming
//! served units would break the limit. A quota's stranded units stay counted
//! until its window ends; a balance's are lost to the account (at most one
//! block per crash). Block sizes shrink near exhaustion, so a crash near the
//! limit strands little.
//!
//! **Block size.** `min(max_block, max(need, 1, free / (2 · replicas)))`,
//! capped at `free`: large far from the limit, 1 near it, so the last units
//! go one by one. A request that needs more than `free` takes nothing.
//!
//! **Under-use.** A request is refused while units remain only when those
//! units are leased to other replicas: at most
//! `R · (max_block + max(max_block / 4, need) − 1)` units (`R` replicas
//! holding leases: one block plus less than one request's need, or plus the
//! last quarter block when a lease running low takes its next block in the
//! background), and only until their holders spend them or give them back
//! (`idle` after their last request).
//!
//! **Known exhausted.** A take that finds too little free marks the lease
//! exhausted: requests that need more than it saw free are refused locally
//! for at most `idle` (to see units other replicas gave back), until a new
//! window (a new counter), or until an [`Invalidation`] for the account
//! (`SetCredits`, `AddCredits`, `ResetUsage`, `PutEntitlement`, Stripe
//! events) arrives by pub/sub.
//!
//! **What stays exact.** Dry runs, cost-0 spends, spends with a rolling
//! (`per:`) quota go to Redis whole, as in exact mode, so they stay
//! all-or-nothing; so do shadow spends (they pass the limit) and spends with
//! a soft quota (each must know exactly whether it is overage, which a
//! replica's share of the units cannot tell). Past `store.lease.max_accounts` accounts with leases,
//! spends of further accounts are exact too.
//!
//! **Answers.** After a local spend a quota's `used` is `limit − units this
//! replica still holds`: never more remaining than truly remains (often less:
//! other replicas' and Redis's free units are not counted). A credit balance
//! is what this replica holds plus what Redis had free at its last call (other
//! replicas may have taken some since). A refusal reports what the script saw.
//!
//! May use: `store::{Store, StoreError, Invalidation}`, `store::redis`,
//! `entitlement`, `usage`, `bounds`, `identity`, `config` (the lease settings).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;

use self::account::{AccountLeases, Lease, Local, Want};
use super::redis::{BlockSize, LeaseTarget, RedisStore};
use super::{Invalidation, Reply, Store, StoreError};
use crate::config::LeaseConfig;
use crate::entitlement::{Account, Quota, Window};
use crate::identity::{KeyHash, KeyMeta};
use crate::usage::{Adjustment, LeaseTotals, MAX_COST, OutboxEvent, Settled, Spend, SpendAnswer};

mod account;

/// Counters for metrics (monotonic, except `outstanding`).
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// Leases taken (takes that granted units).
    pub taken: AtomicU64,
    /// Leases given back with units.
    pub returned: AtomicU64,
    /// Leases whose unspent units were forfeit (record expired, window ended).
    pub expired: AtomicU64,
    /// Units held by this replica, unspent (a gauge).
    pub outstanding: AtomicU64,
    /// Spends that went through this store.
    pub spends: AtomicU64,
    /// Redis calls those spends made (takes, give-backs and exact spends).
    pub redis_calls: AtomicU64,
}

/// One account's entry: its leases behind a std mutex (never held across an
/// `.await`, so a spend paid from held units never parks), and a Tokio mutex
/// that one Redis call for the account holds at a time (so concurrent Checks
/// make one take, and a take and a give-back never interleave: the record a
/// give-back deletes is the one it gives back).
#[derive(Debug, Default)]
struct Entry {
    state: Mutex<AccountLeases>,
    redis: Arc<tokio::sync::Mutex<()>>,
    /// A background renewal is on its way (one at a time).
    renewing: AtomicBool,
}

/// The lease-mode [`Store`] around the Redis store.
pub struct LeaseStore {
    /// Itself, for the tasks Redis calls run in (so a Check's timeout cannot
    /// drop a take halfway: granted units would be stranded).
    me: Weak<LeaseStore>,
    inner: Arc<RedisStore>,
    config: LeaseConfig,
    /// This replica's name in lease records: random per process.
    holder: String,
    /// Account → its entry. A std mutex: never held across an `.await`.
    accounts: Mutex<HashMap<String, Arc<Entry>>>,
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

/// Clears a flag when dropped.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// How many accounts give back at once on SIGTERM or reload.
const RELEASE_CONCURRENCY: usize = 32;

/// How many takes one lease of a spend makes at most: units a take granted
/// can go to Checks paid locally while it ran, or the record had expired.
const TAKE_ROUNDS: usize = 3;

impl LeaseStore {
    /// Leases from `inner`; starts the idle give-back (needs a Tokio runtime).
    pub fn new(inner: Arc<RedisStore>, config: LeaseConfig) -> Result<Arc<Self>, StoreError> {
        let mut id = [0u8; 12];
        getrandom::fill(&mut id).map_err(|e| StoreError::Unavailable(format!("no randomness for a lease id: {e}")))?;
        let store = Arc::new_cyclic(|me| Self {
            me: me.clone(),
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
    pub fn stats(&self) -> LeaseTotals {
        let s = &self.stats;
        LeaseTotals {
            taken: s.taken.load(Ordering::Relaxed),
            returned: s.returned.load(Ordering::Relaxed),
            expired: s.expired.load(Ordering::Relaxed),
            outstanding: s.outstanding.load(Ordering::Relaxed),
            spends: s.spends.load(Ordering::Relaxed),
            redis_calls: s.redis_calls.load(Ordering::Relaxed),
        }
    }

    /// Reacts to a change another replica published: a top-up, a reset or a
    /// new entitlement (perhaps new limits) drops the account's "exhausted"
    /// marks and gives its leases back, so the change counts them at once.
    pub async fn invalidate(&self, inv: &Invalidation) {
        let (Invalidation::Usage(id) | Invalidation::Account(id)) = inv else { return };
        let Some(entry) = lock(&self.accounts).get(id).cloned() else { return };
        self.give_back_entry(&entry).await;
    }

    /// Gives back everything `entry` holds, under its Redis lock, in a task
    /// of its own: a caller's timeout cannot stop it halfway.
    async fn give_back_entry(&self, entry: &Arc<Entry>) {
        let Some(me) = self.me.upgrade() else { return };
        let entry = entry.clone();
        let task = tokio::spawn(async move {
            let _redis = entry.redis.lock().await;
            let leases = std::mem::take(&mut lock(&entry.state).leases);
            let kept = me.give_back(leases).await;
            me.keep(&entry.state, kept);
        });
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "a give-back task failed");
        }
    }

    /// Gives back every unspent unit of `leases`; failures are logged (the
    /// units stay counted until the window ends, or are lost to the balance:
    /// under-use, never over).
    /// Answers the leases Redis could not be reached for: callers that go
    /// on serving put them back (still valid, still spendable).
    async fn give_back(&self, leases: HashMap<String, Lease>) -> HashMap<String, Lease> {
        let mut kept = HashMap::new();
        for (key, lease) in leases {
            // A spent-out lease still has a record (it overstates what the
            // holder has left): give 0 back to delete it, so a later reset
            // or SetCredits does not count units nobody holds.
            match self.inner.give_lease(&lease.target, &self.holder, lease.units).await {
                Ok(_) => {
                    self.stats.outstanding.fetch_sub(lease.units, Ordering::Relaxed);
                    self.stats.returned.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, units = lease.units, "could not give a lease back; keeping it");
                    kept.insert(key, lease);
                }
                Err(e) => {
                    tracing::warn!(error = %e, units = lease.units, "could not give a lease back");
                    self.forfeit(&lease);
                }
            }
        }
        kept
    }

    /// Puts back leases a give-back could not return (the caller holds the
    /// account's Redis lock, so no take replaced them meanwhile).
    fn keep(&self, state: &Mutex<AccountLeases>, kept: HashMap<String, Lease>) {
        let mut st = lock(state);
        for (key, lease) in kept {
            match st.leases.entry(key) {
                std::collections::hash_map::Entry::Occupied(_) => self.forfeit(&lease),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(lease);
                }
            }
        }
    }

    /// Forgets a lease's unspent units (they stay counted in Redis).
    fn forfeit(&self, lease: &Lease) {
        self.stats.outstanding.fetch_sub(lease.units, Ordering::Relaxed);
        if lease.units > 0 {
            self.stats.expired.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The entry of `account`, created unless `max_accounts` are held.
    fn entry(&self, account: &str) -> Option<Arc<Entry>> {
        let mut accounts = lock(&self.accounts);
        if let Some(e) = accounts.get(account) {
            return Some(e.clone());
        }
        if accounts.len() >= self.config.max_accounts {
            return None;
        }
        let e = Arc::new(Entry::default());
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
        let costs = |c: u64| (1..=MAX_COST).contains(&c);
        !spend.dry_run
            && !spend.shadow
            && (!spend.quotas.is_empty() || spend.credits.is_some())
            && (spend.quotas.is_empty() || costs(spend.cost))
            && spend.credits.is_none_or(costs)
            && spend.quotas.iter().all(|q| matches!(q.window, Window::Calendar(_)) && !q.is_soft())
    }

    /// The leases `spend` needs, in order (its quotas, then its credits);
    /// `None` when one cannot be leased.
    fn wants(&self, spend: &Spend) -> Option<Vec<Want>> {
        let mut wants = Vec::with_capacity(spend.quotas.len() + 1);
        for q in &spend.quotas {
            let (Some(key), Window::Calendar(period)) =
                (self.inner.counter_key(&spend.account, q, spend.now), q.window)
            else {
                return None;
            };
            // Two quotas on one counter: let the script count them.
            if wants.iter().any(|w: &Want| w.target.key() == key) {
                return None;
            }
            let expires = period.bounds(spend.now).1 + chrono::Duration::minutes(1);
            wants.push(Want { target: LeaseTarget::Counter { key, limit: q.limit, expires }, need: spend.cost });
        }
        if let Some(credits) = spend.credits {
            wants.push(Want {
                target: LeaseTarget::Credits { key: self.inner.credits_key(&spend.account)? },
                need: credits,
            });
        }
        Some(wants)
    }

    /// Below this many units (while Redis had some free at the last call) a
    /// lease takes its next block in the background, so Checks do not queue
    /// behind a take when it runs out.
    fn low_water(&self) -> u64 {
        self.config.max_block / 4
    }

    /// Pays or refuses `wants` from what `entry` holds, if that needs no
    /// Redis; starts a background take when a lease is due for renewal or
    /// running low.
    fn settle_locally(&self, entry: &Arc<Entry>, wants: &[Want], now: Instant) -> Option<SpendAnswer> {
        let mut state = lock(&entry.state);
        match state.local(wants, now) {
            Local::Pay { renew } => {
                let spent = state.pay(wants, now);
                self.stats.outstanding.fetch_sub(spent, Ordering::Relaxed);
                let answer = state.answer(wants, true, now);
                let low = state.running_low(wants, self.low_water(), now);
                drop(state);
                if renew || low {
                    self.renew_in_background(entry, wants);
                }
                Some(answer)
            }
            Local::Refuse => Some(state.answer(wants, false, now)),
            Local::Ask => None,
        }
    }

    /// Renews `wants`' leases, or tops up those running low, in a task unless
    /// one is on its way already: Checks keep paying from the still-valid
    /// units meanwhile, so a slow or unreachable Redis does not hold them up.
    fn renew_in_background(&self, entry: &Arc<Entry>, wants: &[Want]) {
        let Some(me) = self.me.upgrade() else { return };
        if entry.renewing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (entry, wants) = (entry.clone(), wants.to_vec());
        tokio::spawn(async move {
            // Cleared however the task ends (a panic included).
            let _renewing = ClearOnDrop(&entry.renewing);
            let _redis = entry.redis.lock().await;
            for w in &wants {
                let now = Instant::now();
                // Only the lease this Check paid from: one taken since under
                // another limit is not topped up with this (stale) limit.
                let due = lock(&entry.state)
                    .leases
                    .get(w.target.key())
                    .is_some_and(|l| l.target == w.target && (now >= l.renew_at || l.running_low(me.low_water(), now)));
                if due && let Err(e) = me.take(&entry.state, w).await {
                    tracing::debug!(error = %e, "could not renew a lease; spending from it while it is valid");
                }
            }
        });
    }

    async fn leased_spend(&self, spend: &Spend) -> Result<SpendAnswer, StoreError> {
        // The checks the exact path makes first, so no bad spend reaches a lease.
        crate::bounds::check_spend(spend).map_err(StoreError::Corrupt)?;
        let Some(wants) = self.wants(spend) else { return self.exact(spend).await };
        let Some(entry) = self.entry(&spend.account) else { return self.exact(spend).await };
        // Most Checks end here: paid from held units, or refused on a mark.
        if let Some(answer) = self.settle_locally(&entry, &wants, Instant::now()) {
            return Ok(answer);
        }
        // Wait for the account's Redis lock here (the Check that holds it
        // may take what this one needs), then ask Redis in a task of its
        // own, so the Check's timeout cannot drop a take whose units Redis
        // granted.
        let redis = entry.redis.clone().lock_owned().await;
        if let Some(answer) = self.settle_locally(&entry, &wants, Instant::now()) {
            return Ok(answer);
        }
        let Some(me) = self.me.upgrade() else { return Err(StoreError::Unavailable("lease store stopped".into())) };
        let today = spend.now;
        let task = tokio::spawn(async move {
            let _redis = redis;
            me.spend_asking(&entry, &wants, today).await
        });
        task.await.map_err(|e| StoreError::Unavailable(format!("lease task: {e}")))?
    }

    /// The spend of `wants` when Redis must be asked; the caller holds the
    /// account's Redis lock.
    async fn spend_asking(
        &self,
        entry: &Arc<Entry>,
        wants: &[Want],
        today: DateTime<Utc>,
    ) -> Result<SpendAnswer, StoreError> {
        let (ended, stale) = {
            let mut state = lock(&entry.state);
            (state.take_ended(today), state.take_stale(wants))
        };
        ended.iter().for_each(|l| self.forfeit(l));
        if !stale.is_empty() {
            // A lease taken under another limit goes back before anything else.
            self.stats.redis_calls.fetch_add(stale.len() as u64, Ordering::Relaxed);
            // Stale: not spendable here even if Redis could not be reached.
            self.give_back(stale).await.values().for_each(|l| self.forfeit(l));
        }
        let mut reserved = Vec::with_capacity(wants.len());
        let mut outcome = Ok(true);
        for w in wants {
            outcome = self.reserve(&entry.state, w).await;
            if !matches!(outcome, Ok(true)) {
                break;
            }
            reserved.push(w);
        }
        let mut state = lock(&entry.state);
        let now = Instant::now();
        let spent = matches!(outcome, Ok(true));
        if spent {
            state.last_used = Some(now);
        } else {
            for w in reserved {
                state.refund(w);
                self.stats.outstanding.fetch_add(w.need, Ordering::Relaxed);
            }
        }
        outcome.map(|_| state.answer(wants, spent, now))
    }

    /// Takes `want.need` units of its lease aside for this spend, taking (or
    /// renewing) from Redis first when the lease cannot pay or is due; false
    /// when Redis refused (the lease is then marked exhausted). The caller
    /// holds the account's Redis lock; Checks paid locally may use units
    /// while a take runs (the record then overstates what this replica
    /// holds, which is allowed).
    async fn reserve(&self, state: &Mutex<AccountLeases>, want: &Want) -> Result<bool, StoreError> {
        for _ in 0..TAKE_ROUNDS {
            {
                let now = Instant::now();
                let mut st = lock(state);
                let due = st.leases.get(want.target.key()).is_none_or(|l| now >= l.renew_at);
                if !due && st.reserve(want, now) {
                    self.stats.outstanding.fetch_sub(want.need, Ordering::Relaxed);
                    return Ok(true);
                }
            }
            let granted = self.take(state, want).await?;
            let now = Instant::now();
            let mut st = lock(state);
            if st.reserve(want, now) {
                self.stats.outstanding.fetch_sub(want.need, Ordering::Relaxed);
                return Ok(true);
            }
            if granted == 0 {
                if let Some(l) = st.leases.get_mut(want.target.key()) {
                    l.mark_exhausted(now + self.config.idle);
                }
                return Ok(false);
            }
        }
        // Every take's units went to Checks paid meanwhile: refused, with no
        // mark (the units were there), so the next Check asks again.
        Ok(false)
    }

    /// One take for `want`'s lease: a renewal (`renewal`: top the lease up to
    /// at most one block) or a take of what it lacks. Applies the answer to
    /// `state`; the units granted.
    async fn take(&self, state: &Mutex<AccountLeases>, want: &Want) -> Result<u64, StoreError> {
        let key = want.target.key();
        let held = match lock(state).leases.get(key) {
            // A lease under another target (another limit) is not ours to
            // top up: the caller gives it back first (or it is stale).
            Some(l) if l.target != want.target => return Ok(0),
            Some(l) => l.units,
            None => 0,
        };
        let (max, divisor) = (self.config.max_block, self.config.replicas.saturating_mul(2));
        let size = if held >= want.need {
            // A renewal or a top-up: a whole block when running low,
            // otherwise up to one block, so a lease never holds more than
            // `max_block + max(max_block / 4, need) − 1`.
            let max = if held < self.low_water() { max } else { max.saturating_sub(held) };
            BlockSize { need: 0, max, divisor }
        } else {
            BlockSize { need: want.need - held, max, divisor }
        };
        self.stats.redis_calls.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let lifetime = self.config.lifetime;
        let got = match self.inner.take_lease(&want.target, &self.holder, held, size, lifetime).await {
            Ok(got) => got,
            Err(e) => {
                let mut st = lock(state);
                if e.is_transient() {
                    // Try again a little later (no top-up either); the units
                    // stay valid until `valid_until`.
                    if let Some(l) = st.leases.get_mut(key) {
                        let later = Instant::now() + lifetime / 10;
                        l.renew_at = later;
                        l.backoff_until = Some(later);
                    }
                } else if let Some(l) = st.leases.remove(key) {
                    // A record that disagrees with us: start afresh (what we held
                    // stays counted: under-use, never over).
                    self.forfeit(&l);
                }
                return Err(e);
            }
        };
        let mut st = lock(state);
        let lease = st.leases.entry(key.to_owned()).or_insert_with(|| Lease::empty(want.target.clone(), sent));
        if got.kept < held {
            // The record had expired or was voided (SetCredits): nothing it
            // held may be spent. What Checks paid locally during the call
            // was already taken off `units`; the rest is forfeit.
            let lost = Lease { units: lease.units, ..lease.clone() };
            lease.units = 0;
            self.forfeit(&lost);
        }
        lease.counter = got.counter;
        lease.backoff_until = None;
        lease.units += got.units;
        lease.renew_at = sent + lifetime / 2;
        lease.valid_until = sent + lifetime.mul_f64(0.9);
        if got.units > 0 {
            lease.exhausted_until = None;
            self.stats.taken.fetch_add(1, Ordering::Relaxed);
            self.stats.outstanding.fetch_add(got.units, Ordering::Relaxed);
        }
        Ok(got.units)
    }

    /// Gives back the leases of accounts idle for `idle` (and forgets them),
    /// and every lease due for renewal that no Check renewed: so a lease goes
    /// back while its record lives (`idle ≤ lifetime / 4`, checked by config).
    ///
    /// Each give-back runs under the account's Redis lock with its entry
    /// still in the map, so a spend for the account that must ask Redis
    /// waits and then takes a fresh lease. The entry leaves the map only
    /// when no spend holds a handle to it.
    async fn sweep_once(&self) {
        let idle = self.config.idle;
        let entries: Vec<(String, Arc<Entry>)> =
            lock(&self.accounts).iter().map(|(id, entry)| (id.clone(), entry.clone())).collect();
        futures_util::stream::iter(entries)
            .for_each_concurrent(RELEASE_CONCURRENCY, |(id, entry)| async move {
                let now = Instant::now();
                let due = |st: &AccountLeases| {
                    let idle = st.last_used.is_none_or(|t| now.duration_since(t) >= idle);
                    (idle, st.leases.values().any(|l| now >= l.renew_at))
                };
                if due(&lock(&entry.state)) == (false, false) {
                    return;
                }
                let _redis = entry.redis.lock().await;
                let (leases, idle) = {
                    let mut st = lock(&entry.state);
                    let (idle, _) = due(&st);
                    let keys: Vec<String> =
                        st.leases.iter().filter(|(_, l)| idle || now >= l.renew_at).map(|(k, _)| k.clone()).collect();
                    let leases: HashMap<String, Lease> =
                        keys.into_iter().filter_map(|k| st.leases.remove_entry(&k)).collect();
                    (leases, idle)
                };
                let kept = self.give_back(leases).await;
                self.keep(&entry.state, kept);
                let mut accounts = lock(&self.accounts);
                // Ours and the map's: no spend is waiting for this entry.
                if idle && Arc::strong_count(&entry) == 2 && lock(&entry.state).leases.is_empty() {
                    accounts.remove(&id);
                }
            })
            .await;
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
    fn account_for_key<'a>(&'a self, key: &'a KeyHash) -> Reply<'a, Result<Option<Arc<str>>, StoreError>> {
        self.inner.account_for_key(key)
    }

    fn account<'a>(&'a self, id: &'a str) -> Reply<'a, Result<Option<Arc<Account>>, StoreError>> {
        self.inner.account(id)
    }

    fn spend<'a>(&'a self, spend: &'a Spend) -> Reply<'a, Result<SpendAnswer, StoreError>> {
        Reply::later(async move {
            self.stats.spends.fetch_add(1, Ordering::Relaxed);
            if Self::leasable(spend) { self.leased_spend(spend).await } else { self.exact(spend).await }
        })
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

    /// The new credits count the units other replicas hold on lease (this
    /// one gives its own back first): the balance becomes the rest, and the
    /// others give theirs back on the published change. The account gets at
    /// most `credits` to spend, less by what the others spent since their
    /// last take (their records overstate what they hold by that). When the
    /// leases hold more than `credits`, they are void and the balance is
    /// `credits`; their holders may spend what they held until the change
    /// reaches them (within a second).
    async fn set_credits(&self, account: &str, credits: u64) -> Result<(), StoreError> {
        self.invalidate(&Invalidation::Usage(account.to_owned())).await;
        self.inner.set_leased_credits(account, credits).await.map(|_| ())
    }

    /// The free balance plus the units in live leases (some of which their
    /// holders may have spent since their last take).
    async fn credits(&self, account: &str) -> Result<u64, StoreError> {
        let got = self.inner.leased_credits(account).await?;
        Ok(got.units.saturating_add(got.counter))
    }

    async fn add_credits(&self, account: &str, delta: i64) -> Result<Option<u64>, StoreError> {
        // The delta applies to the free balance (a debit larger than it is
        // refused although leases may hold more); the answer counts the leases.
        if self.inner.add_credits(account, delta).await?.is_none() {
            return Ok(None);
        }
        self.invalidate(&Invalidation::Usage(account.to_owned())).await;
        self.credits(account).await.map(Some)
    }

    /// This replica gives its leases back first (so what it spent since its
    /// last take is not counted as leased); the others' live records stay
    /// counted (they may spend them) until they give them back on the
    /// published change.
    async fn reset_usage(&self, account: &str, quotas: &[Quota], now: DateTime<Utc>) -> Result<(), StoreError> {
        self.invalidate(&Invalidation::Usage(account.to_owned())).await;
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

    fn lease_stats(&self) -> Option<LeaseTotals> {
        Some(self.stats())
    }

    async fn release(&self) {
        // Entries stay: a spend racing this one finds its account as before.
        let entries: Vec<_> = lock(&self.accounts).values().cloned().collect();
        futures_util::stream::iter(entries)
            .for_each_concurrent(RELEASE_CONCURRENCY, |entry| async move { self.give_back_entry(&entry).await })
            .await;
    }
}
