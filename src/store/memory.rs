//! The in-process store: the embedded default for demos, tests and a single replica.
//!
//! Usage lives in shards, each a std `Mutex` (never held across an `.await`),
//! keyed by account, so one account's check-and-spend is atomic and different
//! accounts rarely contend. Rolling windows are bucketed logs of at most
//! [`BUCKETS`](super::rolling::BUCKETS) + 1 buckets (see [`super::rolling`]).
//! It answers what the Redis spend script answers, field by field (used,
//! exceeded, `resets_at`, `retry_at`), only on `Spend::now` instead of Redis
//! `TIME`: `tests/store_contract.rs` runs the same cases on both.
//!
//! Arithmetic never wraps and time arithmetic never panics (SPEC §10): sums
//! are checked (an overflowing `used + cost` is simply "exceeded"), balances
//! stay within [`MAX_CREDITS`], and instants are added with `checked_*`.
//! Accounts and spends are checked against [`crate::bounds`] before anything
//! is stored or moved.
//!
//! May use `entitlement`, `identity`, `usage`, `bounds` and the [`Store`] trait;
//! nothing of Redis or of the cache.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::rolling::Buckets;
use super::{Reply, Store, StoreError};
use crate::FastMap;
use crate::bounds;
use crate::entitlement::{Account, Few, Quota, Window};
use crate::identity::{KeyHash, KeyMeta};
use crate::usage::{
    Adjustment, CreditBalance, MAX_COST, MAX_CREDITS, MAX_LIMIT, OutboxEvent, QuotaUsage, Settled, Spend, SpendAnswer,
};

const SHARDS: usize = 16;

/// A store that keeps everything in this process; lost on restart.
#[derive(Debug, Default)]
pub struct MemoryStore {
    accounts: RwLock<FastMap<Arc<str>, Arc<Account>>>,
    keys: RwLock<Keys>,
    /// Webhook event ids with the instant they may be forgotten (`None`: never,
    /// for a TTL too long for the clock).
    events: Mutex<HashMap<String, Option<Instant>>>,
    /// The size at which `events` is next pruned.
    events_prune_at: std::sync::atomic::AtomicUsize,
    /// Per-account credits and counters, sharded by account id.
    usage: [Mutex<FastMap<Arc<str>, Usage>>; SHARDS],
    /// Picks an account's shard.
    shard_by: foldhash::fast::RandomState,
    /// Settled charges (account, charge id) with the instant they may be forgotten.
    settled: Mutex<HashMap<(String, String), DateTime<Utc>>>,
    /// The size at which `settled` is next pruned.
    settled_prune_at: std::sync::atomic::AtomicUsize,
    /// The secret charges are signed with (this process's: nothing outlives it here).
    charge_key: std::sync::OnceLock<[u8; 32]>,
    /// Events waiting for the sink (a bounded in-process queue), and thresholds fired.
    outbox: Mutex<Outbox>,
}

/// The memory store's outbox: one queue for every account, in order.
#[derive(Debug, Default)]
struct Outbox {
    next: u64,
    queue: std::collections::VecDeque<(u64, String, String)>,
    /// (account, mark name) → until when it holds.
    marks: HashMap<(String, String), DateTime<Utc>>,
    marks_prune_at: std::sync::atomic::AtomicUsize,
}

impl Outbox {
    /// Queues `event` unless the queue holds `limit`; whether it was queued.
    fn push(&mut self, account: &str, event: &str, limit: u64) -> bool {
        if self.queue.len() as u64 >= limit {
            return false;
        }
        self.next += 1;
        self.queue.push_back((self.next, account.to_owned(), event.to_owned()));
        true
    }
}

/// API keys both ways: hash → account for lookups, account → keys for listing.
#[derive(Debug, Default)]
struct Keys {
    by_hash: FastMap<KeyHash, Arc<str>>,
    by_account: HashMap<String, HashMap<KeyHash, KeyMeta>>,
}

/// One account's mutable balance and counters.
#[derive(Debug, Default)]
struct Usage {
    credits: u64,
    /// meter → window → counter.
    counters: FastMap<Arc<str>, FastMap<Window, Counter>>,
}

#[derive(Debug)]
enum Counter {
    /// Units used in the calendar window starting at `start`; a new window resets it.
    Calendar { start: DateTime<Utc>, used: u64 },
    /// Bucket index → units spent in it, for the buckets still counted
    /// (older ones are dropped at each check).
    Rolling { buckets: BTreeMap<i64, u64> },
}

/// The instant `ms` after the epoch, saturating at the last instant chrono
/// knows (never reached for bounded windows and times).
fn instant(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl Counter {
    fn new(window: Window) -> Self {
        match window {
            Window::Calendar(_) => Counter::Calendar { start: DateTime::<Utc>::MIN_UTC, used: 0 },
            Window::Rolling(_) => Counter::Rolling { buckets: BTreeMap::new() },
        }
    }

    /// Brings the counter to `now` and reports how `cost` more would stand
    /// against the quota's [hard limit](Quota::hard_limit). A cost above
    /// [`MAX_COST`], or one whose sum would overflow, never fits.
    fn check(&mut self, quota: &Quota, cost: u64, now: DateTime<Utc>) -> QuotaUsage {
        let limit = quota.hard_limit();
        let fits = |used: u64| cost <= MAX_COST && used.checked_add(cost).is_some_and(|sum| sum <= limit);
        match (self, quota.window) {
            (Counter::Calendar { start, used }, Window::Calendar(period)) => {
                let (window_start, mut end) = period.bounds(now);
                // Only forward. A spend for an older window (its Check read the
                // clock before another one moved the counter on, or the clock
                // stepped back) counts in the current window: zeroing it would
                // admit that spend and lose the newer ones.
                if window_start > *start {
                    *start = window_start;
                    *used = 0;
                } else if window_start < *start {
                    end = period.bounds(*start).1;
                }
                QuotaUsage { used: *used, exceeded: !fits(*used), resets_at: end, retry_at: end }
            }
            (Counter::Rolling { buckets }, Window::Rolling(d)) => {
                // `spend` checked the window first, so it has buckets.
                let Some(g) = Buckets::of(d) else {
                    return QuotaUsage { used: 0, exceeded: true, resets_at: now, retry_at: now };
                };
                let now_ms = now.timestamp_millis();
                *buckets = buckets.split_off(&g.oldest_live(now_ms));
                // Sums of live buckets stay at or below a limit (≤ MAX_LIMIT): saturating never clips.
                let used = buckets.values().fold(0u64, |sum, u| sum.saturating_add(*u));
                let resets_at = buckets.last_key_value().map_or(now, |(j, _)| instant(g.leaves_at(*j)));
                let exceeded = !fits(used);
                let mut retry_at = now;
                if exceeded {
                    // The first instant enough old buckets have left for `cost` to fit.
                    retry_at = resets_at;
                    let mut left = used;
                    for (j, units) in buckets.iter() {
                        left = left.saturating_sub(*units);
                        if fits(left) {
                            retry_at = instant(g.leaves_at(*j));
                            break;
                        }
                    }
                }
                QuotaUsage { used, exceeded, resets_at, retry_at }
            }
            // The map is keyed by window, so the variants always agree.
            (_, _) => QuotaUsage { used: 0, exceeded: true, resets_at: now, retry_at: now },
        }
    }

    /// Spends `cost`, which [`Counter::check`] found to fit, or which a
    /// shadow spend takes past the limit but not past [`MAX_LIMIT`]: the
    /// sums stay at or below it, so saturating never actually clips.
    fn add(&mut self, quota: &Quota, cost: u64, now: DateTime<Utc>, state: &mut QuotaUsage) {
        match self {
            Counter::Calendar { used, .. } => *used = used.saturating_add(cost),
            // A cost of 0 logs nothing, so the window is restored when it was
            // before (`now` for an empty one), as in the Redis script.
            Counter::Rolling { buckets } if cost > 0 => {
                if let Some(g) = match quota.window {
                    Window::Rolling(d) => Buckets::of(d),
                    Window::Calendar(_) => None,
                } {
                    let units = buckets.entry(g.index(now.timestamp_millis())).or_default();
                    *units = units.saturating_add(cost);
                    // The newest bucket: this one, or a later one logged before a clock step back.
                    if let Some((j, _)) = buckets.last_key_value() {
                        state.resets_at = instant(g.leaves_at(*j));
                    }
                }
            }
            Counter::Rolling { .. } => {}
        }
        state.used = state.used.saturating_add(cost);
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self, account: &str) -> &Mutex<FastMap<Arc<str>, Usage>> {
        &self.usage[(self.shard_by.hash_one(account) as usize) % SHARDS]
    }
}

/// Drops the lapsed entries of `map` once it has grown to `at` (at least
/// 100,000), and doubles `at` past what is left: pruning costs O(1) per
/// insert on average however many entries are live.
fn prune<K>(map: &mut HashMap<K, DateTime<Utc>>, at: &std::sync::atomic::AtomicUsize, now: DateTime<Utc>) {
    prune_where(map, at, 100_000, |until| *until > now);
}

/// [`prune`] for any map: keeps the entries `live` says are, once `map` has
/// grown to `at` (at least `floor`), then doubles `at` past what is left.
/// Without the doubling, a map holding `floor` live entries would be
/// scanned whole on every insert.
fn prune_where<K, V>(
    map: &mut HashMap<K, V>,
    at: &std::sync::atomic::AtomicUsize,
    floor: usize,
    live: impl Fn(&V) -> bool,
) {
    use std::sync::atomic::Ordering;
    let limit = at.load(Ordering::Relaxed).max(floor);
    if map.len() >= limit {
        map.retain(|_, v| live(v));
        at.store(map.len().saturating_mul(2).max(floor), Ordering::Relaxed);
    }
}

/// The size from which lapsed webhook event ids are dropped (see [`prune_where`]).
const EVENTS_PRUNED_FROM: usize = 10_000;

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// A poisoned lock means a panic elsewhere mid-update; the data is still
/// consistent (every update is a few plain assignments), so keep serving.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryStore {
    /// [`Store::spend`], which has nothing to wait for.
    fn spend_now(&self, spend: &Spend) -> Result<SpendAnswer, StoreError> {
        // Checked before anything moves: with these bounds no window end can overflow.
        bounds::check_spend(spend).map_err(StoreError::Corrupt)?;
        let mut shard = lock(self.shard(&spend.account));
        // The keys are the spend's own shared strings: a lookup copies nothing.
        let usage = shard.entry(spend.account.clone()).or_default();
        let mut states = Few::with_capacity(spend.quotas.len());
        for quota in &spend.quotas {
            let state = usage
                .counters
                .entry(quota.meter.clone())
                .or_default()
                .entry(quota.window)
                .or_insert_with(|| Counter::new(quota.window))
                .check(quota, spend.cost, spend.now);
            states.push(state);
        }
        let credits = spend.credits.map(|cost| CreditBalance {
            balance: usage.credits,
            sufficient: cost <= MAX_COST && usage.credits >= cost,
        });
        let fits = states.iter().all(|s| !s.exceeded) && credits.is_none_or(|c| c.sufficient);
        // A cost above MAX_COST is spent by nothing, shadow or not (Redis refuses it unread).
        if spend.dry_run || !(fits || (spend.shadow && spend.cost <= MAX_COST)) {
            return Ok(SpendAnswer { spent: false, quotas: states, credits });
        }
        for (quota, state) in spend.quotas.iter().zip(states.iter_mut()) {
            // A shadow spend goes past the limit, as far as the counters keep.
            let room = spend.cost <= MAX_COST && state.used.checked_add(spend.cost).is_some_and(|s| s <= MAX_LIMIT);
            if let Some(counter) = usage.counters.get_mut(&*quota.meter).and_then(|m| m.get_mut(&quota.window))
                && room
            {
                counter.add(quota, spend.cost, spend.now, state);
            }
        }
        if spend.shadow {
            // Shadow mode moves no money: credits were only checked.
            return Ok(SpendAnswer { spent: true, quotas: states, credits });
        }
        let credits = match (spend.credits, credits) {
            (Some(cost), Some(c)) => {
                // Sufficient means `credits >= cost`: this never clips.
                usage.credits = usage.credits.saturating_sub(cost);
                Some(CreditBalance { balance: usage.credits, sufficient: c.sufficient })
            }
            _ => credits,
        };
        Ok(SpendAnswer { spent: true, quotas: states, credits })
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn account_for_key<'a>(&'a self, key: &'a KeyHash) -> Reply<'a, Result<Option<Arc<str>>, StoreError>> {
        Reply::now(Ok(read(&self.keys).by_hash.get(key).cloned()))
    }

    fn account<'a>(&'a self, id: &'a str) -> Reply<'a, Result<Option<Arc<Account>>, StoreError>> {
        Reply::now(Ok(read(&self.accounts).get(id).cloned()))
    }

    fn spend<'a>(&'a self, spend: &'a Spend) -> Reply<'a, Result<SpendAnswer, StoreError>> {
        Reply::now(self.spend_now(spend))
    }

    async fn put_account(&self, account: &Account) -> Result<(), StoreError> {
        bounds::check_account(account).map_err(StoreError::Corrupt)?;
        write(&self.accounts).insert(account.id.clone(), Arc::new(account.clone()));
        Ok(())
    }

    async fn put_account_if_newer(&self, account: &Account) -> Result<bool, StoreError> {
        bounds::check_account(account).map_err(StoreError::Corrupt)?;
        let mut accounts = write(&self.accounts);
        let stored = accounts.get(&*account.id).and_then(|a| a.billing_event_at);
        if stored.is_some_and(|s| account.billing_event_at.is_none_or(|new| new < s)) {
            return Ok(false);
        }
        accounts.insert(account.id.clone(), Arc::new(account.clone()));
        Ok(true)
    }

    async fn account_for_customer(&self, customer: &str) -> Result<Option<String>, StoreError> {
        let accounts = read(&self.accounts);
        Ok(accounts.values().find(|a| a.stripe_customer.as_deref() == Some(customer)).map(|a| a.id.to_string()))
    }

    async fn put_key(&self, key: &KeyHash, account: &str, meta: &KeyMeta) -> Result<(), StoreError> {
        let mut keys = write(&self.keys);
        if let Some(old) = keys.by_hash.insert(*key, account.into()) {
            keys.by_account.entry(old.to_string()).or_default().remove(key);
        }
        keys.by_account.entry(account.to_owned()).or_default().insert(*key, meta.clone());
        Ok(())
    }

    async fn revoke_key(&self, account: &str, key: &KeyHash) -> Result<bool, StoreError> {
        let mut keys = write(&self.keys);
        if keys.by_hash.get(key).map(|a| &**a) != Some(account) {
            return Ok(false);
        }
        keys.by_hash.remove(key);
        keys.by_account.entry(account.to_owned()).or_default().remove(key);
        Ok(true)
    }

    async fn list_keys(&self, account: &str) -> Result<Vec<(KeyHash, KeyMeta)>, StoreError> {
        let keys = read(&self.keys);
        let mut list: Vec<(KeyHash, KeyMeta)> =
            keys.by_account.get(account).map(|m| m.iter().map(|(k, v)| (*k, v.clone())).collect()).unwrap_or_default();
        list.sort_by(|a, b| a.1.created_at.cmp(&b.1.created_at).then(a.0.0.cmp(&b.0.0)));
        Ok(list)
    }

    /// Refuses balances above [`MAX_CREDITS`]: callers validate first; this is the last line.
    async fn set_credits(&self, account: &str, credits: u64) -> Result<(), StoreError> {
        if credits > MAX_CREDITS {
            return Err(StoreError::Corrupt(format!("credits {credits} are above MAX_CREDITS ({MAX_CREDITS})")));
        }
        lock(self.shard(account)).entry(account.into()).or_default().credits = credits;
        Ok(())
    }

    async fn credits(&self, account: &str) -> Result<u64, StoreError> {
        Ok(lock(self.shard(account)).get(account).map_or(0, |u| u.credits))
    }

    async fn add_credits(&self, account: &str, delta: i64) -> Result<Option<u64>, StoreError> {
        let mut shard = lock(self.shard(account));
        let usage = shard.entry(account.into()).or_default();
        // Below zero or above MAX_CREDITS: refused, nothing changes.
        let Some(balance) = usage.credits.checked_add_signed(delta).filter(|b| *b <= MAX_CREDITS) else {
            return Ok(None);
        };
        usage.credits = balance;
        Ok(Some(balance))
    }

    async fn reset_usage(&self, account: &str, quotas: &[Quota], _now: DateTime<Utc>) -> Result<(), StoreError> {
        let mut shard = lock(self.shard(account));
        if let Some(usage) = shard.get_mut(account) {
            for q in quotas {
                if let Some(m) = usage.counters.get_mut(&*q.meter) {
                    m.remove(&q.window);
                }
            }
        }
        Ok(())
    }

    async fn remember_event(&self, id: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut events = lock(&self.events);
        let now = Instant::now();
        let live = |until: &Option<Instant>| until.is_none_or(|u| u > now);
        prune_where(&mut events, &self.events_prune_at, EVENTS_PRUNED_FROM, live);
        match events.get(id) {
            Some(until) if live(until) => Ok(false),
            _ => {
                events.insert(id.to_owned(), now.checked_add(ttl));
                Ok(true)
            }
        }
    }

    async fn forget_event(&self, id: &str) -> Result<(), StoreError> {
        lock(&self.events).remove(id);
        Ok(())
    }

    async fn settle(&self, adj: &Adjustment) -> Result<Settled, StoreError> {
        if adj.delta.unsigned_abs() > MAX_COST {
            return Err(StoreError::Corrupt(format!("adjustment of {} units is above MAX_COST", adj.delta)));
        }
        // The usage lock is taken inside the once-only lock: a replay racing
        // its original waits for it, then finds it settled.
        let mut settled = lock(&self.settled);
        let now = Utc::now();
        prune(&mut settled, &self.settled_prune_at, now);
        let id = (adj.account.clone(), adj.charge.clone());
        if settled.get(&id).is_some_and(|until| *until > now) {
            return Ok(Settled::Duplicate);
        }
        settled.insert(id, adj.remember_until);
        let mut shard = lock(self.shard(&adj.account));
        let usage = shard.entry(adj.account.as_str().into()).or_default();
        let back = adj.delta < 0;
        let units = adj.delta.unsigned_abs();
        if let Some(windows) = usage.counters.get_mut(adj.meter.as_str()) {
            for p in &adj.periods {
                // Only the window the charge was made in: one that has rolled over is left alone.
                if let Some(Counter::Calendar { start, used }) = windows.get_mut(&Window::Calendar(*p))
                    && *start == p.bounds(adj.issued).0
                {
                    // An overage stops at the largest count a counter holds (as in Redis).
                    *used = if back { used.saturating_sub(units) } else { used.saturating_add(units).min(MAX_LIMIT) };
                }
            }
        }
        let mut unpaid = 0;
        if adj.credits {
            if back {
                usage.credits = usage.credits.saturating_add(units).min(MAX_CREDITS);
            } else {
                let take = usage.credits.min(units);
                usage.credits -= take;
                unpaid = units - take;
            }
        }
        // The counters as they stand now, for the thresholds.
        let used: Vec<u64> = adj
            .periods
            .iter()
            .map(|p| match usage.counters.get(adj.meter.as_str()).and_then(|w| w.get(&Window::Calendar(*p))) {
                Some(Counter::Calendar { start, used }) if *start == p.bounds(adj.issued).0 => *used,
                _ => 0,
            })
            .collect();
        let balance = usage.credits;
        drop(shard);
        let (mut queued, mut dropped) = (0, 0);
        let mut outbox = lock(&self.outbox);
        let mut emit = |outbox: &mut Outbox, event: &str| {
            if outbox.push(&adj.account, event, adj.outbox_limit) { queued += 1 } else { dropped += 1 }
        };
        if let Some(e) = &adj.event {
            emit(&mut outbox, e);
        }
        let Outbox { marks, marks_prune_at, .. } = &mut *outbox;
        prune(marks, marks_prune_at, now);
        for m in &adj.marks {
            let crossed = match m.counter {
                None => adj.credits && balance <= m.at,
                Some(i) => used.get(i).is_some_and(|u| *u >= m.at),
            };
            let key = (adj.account.clone(), m.name.clone());
            if crossed && m.until > now && outbox.marks.get(&key).is_none_or(|until| *until <= now) {
                outbox.marks.insert(key, m.until);
                emit(&mut outbox, &m.event);
            }
        }
        Ok(Settled::Applied { unpaid, queued, dropped })
    }

    async fn outbox_claim(&self, _consumer: &str, max: usize, _: Duration) -> Result<Vec<OutboxEvent>, StoreError> {
        let outbox = lock(&self.outbox);
        Ok(outbox
            .queue
            .iter()
            .take(max)
            .map(|(id, account, payload)| OutboxEvent {
                account: account.clone(),
                id: id.to_string(),
                payload: payload.clone(),
            })
            .collect())
    }

    async fn outbox_ack(&self, events: &[OutboxEvent]) -> Result<(), StoreError> {
        let ids: std::collections::HashSet<u64> = events.iter().filter_map(|e| e.id.parse().ok()).collect();
        lock(&self.outbox).queue.retain(|(id, _, _)| !ids.contains(id));
        Ok(())
    }

    async fn record_settled(
        &self,
        account: &str,
        _issued: DateTime<Utc>,
        ids: &[String],
        until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut settled = lock(&self.settled);
        prune(&mut settled, &self.settled_prune_at, Utc::now());
        for id in ids {
            settled.entry((account.to_owned(), id.clone())).or_insert(until);
        }
        Ok(())
    }

    async fn charge_key(&self) -> Result<[u8; 32], StoreError> {
        if let Some(k) = self.charge_key.get() {
            return Ok(*k);
        }
        let mut fresh = [0u8; 32];
        getrandom::fill(&mut fresh).map_err(|e| StoreError::Unavailable(format!("no randomness: {e}")))?;
        Ok(*self.charge_key.get_or_init(|| fresh))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
