//! The in-process store: the embedded default for demos, tests and a single replica.
//!
//! Usage lives in shards, each a std `Mutex` (never held across an `.await`),
//! keyed by account, so one account's check-and-spend is atomic and different
//! accounts rarely contend. Rolling windows are an exact sliding log whose
//! length is bounded by the quota's limit (each entry holds at least one unit).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{Store, StoreError};
use crate::entitlement::{Account, Quota, Window};
use crate::identity::{KeyHash, KeyMeta};
use crate::usage::{CreditBalance, QuotaUsage, Spend, SpendAnswer};

const SHARDS: usize = 16;

/// A store that keeps everything in this process; lost on restart.
#[derive(Debug, Default)]
pub struct MemoryStore {
    accounts: RwLock<HashMap<String, Arc<Account>>>,
    keys: RwLock<Keys>,
    /// Webhook event ids with the instant they may be forgotten.
    events: Mutex<HashMap<String, Instant>>,
    /// Per-account credits and counters, sharded by account id.
    usage: [Mutex<HashMap<String, Usage>>; SHARDS],
}

/// API keys both ways: hash → account for lookups, account → keys for listing.
#[derive(Debug, Default)]
struct Keys {
    by_hash: HashMap<KeyHash, String>,
    by_account: HashMap<String, HashMap<KeyHash, KeyMeta>>,
}

/// One account's mutable balance and counters.
#[derive(Debug, Default)]
struct Usage {
    credits: u64,
    /// meter → window → counter.
    counters: HashMap<String, HashMap<Window, Counter>>,
}

#[derive(Debug)]
enum Counter {
    /// Units used in the calendar window starting at `start`; a new window resets it.
    Calendar { start: DateTime<Utc>, used: u64 },
    /// (time, units) of every spend still inside the window, oldest first.
    Rolling { log: VecDeque<(DateTime<Utc>, u64)>, used: u64 },
}

impl Counter {
    fn new(window: Window) -> Self {
        match window {
            Window::Calendar(_) => Counter::Calendar { start: DateTime::<Utc>::MIN_UTC, used: 0 },
            Window::Rolling(_) => Counter::Rolling { log: VecDeque::new(), used: 0 },
        }
    }

    /// Brings the counter to `now` and reports how `cost` more would stand.
    fn check(&mut self, quota: &Quota, cost: u64, now: DateTime<Utc>) -> QuotaUsage {
        match (self, quota.window) {
            (Counter::Calendar { start, used }, Window::Calendar(period)) => {
                let (window_start, end) = period.bounds(now);
                if *start != window_start {
                    *start = window_start;
                    *used = 0;
                }
                QuotaUsage { used: *used, exceeded: *used + cost > quota.limit, resets_at: end, retry_at: end }
            }
            (Counter::Rolling { log, used }, Window::Rolling(d)) => {
                let span = chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
                while log.front().is_some_and(|(t, _)| *t + span <= now) {
                    if let Some((_, units)) = log.pop_front() {
                        *used -= units;
                    }
                }
                let resets_at = log.back().map_or(now, |(t, _)| *t + span);
                let exceeded = *used + cost > quota.limit;
                let mut retry_at = now;
                if exceeded {
                    // The first instant enough old entries have aged out for `cost` to fit.
                    retry_at = resets_at;
                    let mut left = *used;
                    for (t, units) in log.iter() {
                        left -= units;
                        if left + cost <= quota.limit {
                            retry_at = *t + span;
                            break;
                        }
                    }
                }
                QuotaUsage { used: *used, exceeded, resets_at, retry_at }
            }
            // The map is keyed by window, so the variants always agree.
            (_, _) => QuotaUsage { used: 0, exceeded: true, resets_at: now, retry_at: now },
        }
    }

    fn add(&mut self, quota: &Quota, cost: u64, now: DateTime<Utc>, state: &mut QuotaUsage) {
        match self {
            Counter::Calendar { used, .. } => *used += cost,
            Counter::Rolling { log, used } => {
                if cost > 0 {
                    log.push_back((now, cost));
                    *used += cost;
                }
                if let Window::Rolling(d) = quota.window {
                    state.resets_at = now + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
                }
            }
        }
        state.used += cost;
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self, account: &str) -> &Mutex<HashMap<String, Usage>> {
        let mut h = DefaultHasher::new();
        account.hash(&mut h);
        &self.usage[(h.finish() as usize) % SHARDS]
    }
}

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

#[async_trait]
impl Store for MemoryStore {
    async fn account_for_key(&self, key: &KeyHash) -> Result<Option<String>, StoreError> {
        Ok(read(&self.keys).by_hash.get(key).cloned())
    }

    async fn account(&self, id: &str) -> Result<Option<Arc<Account>>, StoreError> {
        Ok(read(&self.accounts).get(id).cloned())
    }

    async fn spend(&self, spend: &Spend) -> Result<SpendAnswer, StoreError> {
        let mut shard = lock(self.shard(&spend.account));
        let usage = match shard.get_mut(&spend.account) {
            Some(u) => u,
            None => shard.entry(spend.account.clone()).or_default(),
        };
        let mut states = Vec::with_capacity(spend.quotas.len());
        for quota in &spend.quotas {
            // Look up by &str first: the meter name is cloned only the first time.
            if !usage.counters.contains_key(&quota.meter) {
                usage.counters.insert(quota.meter.clone(), HashMap::new());
            }
            let state = match usage.counters.get_mut(&quota.meter) {
                Some(windows) => windows
                    .entry(quota.window)
                    .or_insert_with(|| Counter::new(quota.window))
                    .check(quota, spend.cost, spend.now),
                // Inserted just above; were it missing, refuse rather than misalign the answer.
                None => QuotaUsage { used: 0, exceeded: true, resets_at: spend.now, retry_at: spend.now },
            };
            states.push(state);
        }
        let credits =
            spend.credits.map(|cost| CreditBalance { balance: usage.credits, sufficient: usage.credits >= cost });
        let fits = states.iter().all(|s| !s.exceeded) && credits.is_none_or(|c| c.sufficient);
        if !fits || spend.dry_run {
            return Ok(SpendAnswer { spent: false, quotas: states, credits });
        }
        for (quota, state) in spend.quotas.iter().zip(states.iter_mut()) {
            if let Some(counter) = usage.counters.get_mut(&quota.meter).and_then(|m| m.get_mut(&quota.window)) {
                counter.add(quota, spend.cost, spend.now, state);
            }
        }
        let credits = match (spend.credits, credits) {
            (Some(cost), Some(c)) => {
                usage.credits -= cost;
                Some(CreditBalance { balance: usage.credits, sufficient: c.sufficient })
            }
            _ => credits,
        };
        Ok(SpendAnswer { spent: true, quotas: states, credits })
    }

    async fn put_account(&self, account: &Account) -> Result<(), StoreError> {
        write(&self.accounts).insert(account.id.clone(), Arc::new(account.clone()));
        Ok(())
    }

    async fn put_account_if_newer(&self, account: &Account) -> Result<bool, StoreError> {
        let mut accounts = write(&self.accounts);
        let stored = accounts.get(&account.id).and_then(|a| a.billing_event_at);
        if stored.is_some_and(|s| account.billing_event_at.is_none_or(|new| new < s)) {
            return Ok(false);
        }
        accounts.insert(account.id.clone(), Arc::new(account.clone()));
        Ok(true)
    }

    async fn account_for_customer(&self, customer: &str) -> Result<Option<String>, StoreError> {
        let accounts = read(&self.accounts);
        Ok(accounts.values().find(|a| a.stripe_customer.as_deref() == Some(customer)).map(|a| a.id.clone()))
    }

    async fn put_key(&self, key: &KeyHash, account: &str, meta: &KeyMeta) -> Result<(), StoreError> {
        let mut keys = write(&self.keys);
        if let Some(old) = keys.by_hash.insert(*key, account.to_owned()) {
            keys.by_account.entry(old).or_default().remove(key);
        }
        keys.by_account.entry(account.to_owned()).or_default().insert(*key, meta.clone());
        Ok(())
    }

    async fn revoke_key(&self, account: &str, key: &KeyHash) -> Result<bool, StoreError> {
        let mut keys = write(&self.keys);
        if keys.by_hash.get(key).map(String::as_str) != Some(account) {
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

    async fn set_credits(&self, account: &str, credits: u64) -> Result<(), StoreError> {
        lock(self.shard(account)).entry(account.to_owned()).or_default().credits = credits;
        Ok(())
    }

    async fn credits(&self, account: &str) -> Result<u64, StoreError> {
        Ok(lock(self.shard(account)).get(account).map_or(0, |u| u.credits))
    }

    async fn add_credits(&self, account: &str, delta: i64) -> Result<Option<u64>, StoreError> {
        let mut shard = lock(self.shard(account));
        let usage = shard.entry(account.to_owned()).or_default();
        let Some(balance) = usage.credits.checked_add_signed(delta) else { return Ok(None) };
        usage.credits = balance;
        Ok(Some(balance))
    }

    async fn reset_usage(&self, account: &str, quotas: &[Quota], _now: DateTime<Utc>) -> Result<(), StoreError> {
        let mut shard = lock(self.shard(account));
        if let Some(usage) = shard.get_mut(account) {
            for q in quotas {
                if let Some(m) = usage.counters.get_mut(&q.meter) {
                    m.remove(&q.window);
                }
            }
        }
        Ok(())
    }

    async fn remember_event(&self, id: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut events = lock(&self.events);
        let now = Instant::now();
        if events.len() > 10_000 {
            events.retain(|_, until| *until > now);
        }
        match events.get(id) {
            Some(until) if *until > now => Ok(false),
            _ => {
                events.insert(id.to_owned(), now + ttl);
                Ok(true)
            }
        }
    }

    async fn forget_event(&self, id: &str) -> Result<(), StoreError> {
        lock(&self.events).remove(id);
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entitlement::Period;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn quota(limit: u64, window: Window) -> Quota {
        Quota { meter: "requests".into(), limit, window }
    }

    fn spend(quotas: Vec<Quota>, cost: u64, credits: Option<u64>, now: DateTime<Utc>) -> Spend {
        Spend { account: "a".into(), quotas, cost, credits, now, dry_run: false }
    }

    #[tokio::test]
    async fn calendar_quota_counts_until_limit_then_resets_with_the_window() {
        let s = MemoryStore::new();
        let q = vec![quota(3, Window::Calendar(Period::Month))];
        let now = t("2026-11-30T23:59:59Z");
        for used in 1..=3 {
            let a = s.spend(&spend(q.clone(), 1, None, now)).await.unwrap();
            assert!(a.spent);
            assert_eq!(a.quotas[0].used, used);
            assert_eq!(a.quotas[0].resets_at, t("2026-12-01T00:00:00Z"));
        }
        let a = s.spend(&spend(q.clone(), 1, None, now)).await.unwrap();
        assert!(!a.spent && a.quotas[0].exceeded);
        assert_eq!(a.quotas[0].used, 3, "a denied request spends nothing");
        let a = s.spend(&spend(q, 1, None, t("2026-12-01T00:00:00Z"))).await.unwrap();
        assert!(a.spent);
        assert_eq!(a.quotas[0].used, 1);
    }

    #[tokio::test]
    async fn rolling_window_is_an_exact_sliding_log() {
        let s = MemoryStore::new();
        let q = vec![quota(2, Window::Rolling(Duration::from_secs(10)))];
        let t0 = t("2026-11-22T00:00:00Z");
        let at = |secs: i64| t0 + chrono::Duration::seconds(secs);
        assert!(s.spend(&spend(q.clone(), 1, None, at(0))).await.unwrap().spent);
        assert!(s.spend(&spend(q.clone(), 1, None, at(5))).await.unwrap().spent);
        let denied = s.spend(&spend(q.clone(), 1, None, at(9))).await.unwrap();
        assert!(!denied.spent);
        assert_eq!(denied.quotas[0].retry_at, at(10), "the first entry ages out at t=10");
        assert_eq!(denied.quotas[0].resets_at, at(15));
        let ok = s.spend(&spend(q.clone(), 1, None, at(10))).await.unwrap();
        assert!(ok.spent);
        assert_eq!(ok.quotas[0].used, 2);
        let two = s.spend(&spend(q, 2, None, at(11))).await.unwrap();
        assert_eq!(two.quotas[0].retry_at, at(20), "both remaining entries must age out for cost 2");
    }

    #[tokio::test]
    async fn all_or_nothing_across_quotas_and_credits() {
        let s = MemoryStore::new();
        s.set_credits("a", 5).await.unwrap();
        let q = vec![quota(100, Window::Calendar(Period::Day)), quota(1, Window::Rolling(Duration::from_secs(60)))];
        let now = t("2026-11-22T00:00:00Z");
        let a = s.spend(&spend(q.clone(), 1, Some(3), now)).await.unwrap();
        assert!(a.spent);
        assert_eq!(a.credits, Some(CreditBalance { balance: 2, sufficient: true }));
        // The rate quota is full: nothing else may move.
        let b = s.spend(&spend(q.clone(), 1, Some(1), now)).await.unwrap();
        assert!(!b.spent);
        assert_eq!((b.quotas[0].used, b.credits.unwrap().balance), (1, 2));
        // Credits too low: the quotas stay put.
        let later = now + chrono::Duration::seconds(61);
        let c = s.spend(&spend(q.clone(), 1, Some(3), later)).await.unwrap();
        assert!(!c.spent && !c.credits.unwrap().sufficient);
        assert_eq!(c.quotas[0].used, 1);
    }

    #[tokio::test]
    async fn dry_run_reports_without_spending() {
        let s = MemoryStore::new();
        let q = vec![quota(1, Window::Calendar(Period::Day))];
        let now = t("2026-11-22T00:00:00Z");
        let mut dry = spend(q.clone(), 1, None, now);
        dry.dry_run = true;
        let a = s.spend(&dry).await.unwrap();
        assert!(!a.spent && !a.quotas[0].exceeded);
        assert!(s.spend(&spend(q, 1, None, now)).await.unwrap().spent);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_spends_never_exceed_the_limit() {
        let s = Arc::new(MemoryStore::new());
        let q =
            vec![quota(100, Window::Calendar(Period::Month)), quota(1000, Window::Rolling(Duration::from_secs(60)))];
        let now = t("2026-11-22T00:00:00Z");
        let tasks: Vec<_> = (0..500)
            .map(|_| {
                let (s, sp) = (s.clone(), spend(q.clone(), 1, None, now));
                tokio::spawn(async move { s.spend(&sp).await.unwrap().spent })
            })
            .collect();
        let mut allowed = 0;
        for t in tasks {
            allowed += t.await.unwrap() as u32;
        }
        assert_eq!(allowed, 100);
    }
}
