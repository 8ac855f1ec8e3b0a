use super::*;
use crate::store::MemoryStore;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts backend reads and makes them slow enough to overlap.
struct Counting {
    inner: MemoryStore,
    reads: AtomicUsize,
}

#[async_trait]
impl Store for Counting {
    fn account_for_key<'a>(&'a self, key: &'a KeyHash) -> Reply<'a, Result<Option<Arc<str>>, StoreError>> {
        Reply::later(async move {
            self.reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.inner.account_for_key(key).await
        })
    }
    fn account<'a>(&'a self, id: &'a str) -> Reply<'a, Result<Option<Arc<Account>>, StoreError>> {
        Reply::later(async move {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.inner.account(id).await
        })
    }
    fn spend<'a>(&'a self, s: &'a Spend) -> Reply<'a, Result<SpendAnswer, StoreError>> {
        self.inner.spend(s)
    }
    async fn put_account(&self, a: &Account) -> Result<(), StoreError> {
        self.inner.put_account(a).await
    }
    async fn put_account_if_newer(&self, a: &Account) -> Result<bool, StoreError> {
        self.inner.put_account_if_newer(a).await
    }
    async fn account_for_customer(&self, c: &str) -> Result<Option<String>, StoreError> {
        self.inner.account_for_customer(c).await
    }
    async fn put_key(&self, k: &KeyHash, a: &str, m: &KeyMeta) -> Result<(), StoreError> {
        self.inner.put_key(k, a, m).await
    }
    async fn revoke_key(&self, a: &str, k: &KeyHash) -> Result<bool, StoreError> {
        self.inner.revoke_key(a, k).await
    }
    async fn list_keys(&self, a: &str) -> Result<Vec<(KeyHash, KeyMeta)>, StoreError> {
        self.inner.list_keys(a).await
    }
    async fn set_credits(&self, a: &str, c: u64) -> Result<(), StoreError> {
        self.inner.set_credits(a, c).await
    }
    async fn credits(&self, a: &str) -> Result<u64, StoreError> {
        self.inner.credits(a).await
    }
    async fn add_credits(&self, a: &str, d: i64) -> Result<Option<u64>, StoreError> {
        self.inner.add_credits(a, d).await
    }
    async fn reset_usage(&self, a: &str, q: &[Quota], now: DateTime<Utc>) -> Result<(), StoreError> {
        self.inner.reset_usage(a, q, now).await
    }
    async fn remember_event(&self, id: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.inner.remember_event(id, ttl).await
    }
    async fn forget_event(&self, id: &str) -> Result<(), StoreError> {
        self.inner.forget_event(id).await
    }
    async fn settle(&self, a: &Adjustment) -> Result<Settled, StoreError> {
        self.inner.settle(a).await
    }
    async fn record_settled(
        &self,
        a: &str,
        i: DateTime<Utc>,
        ids: &[String],
        until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.inner.record_settled(a, i, ids, until).await
    }
    async fn charge_key(&self) -> Result<[u8; 32], StoreError> {
        self.inner.charge_key().await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[tokio::test]
async fn concurrent_misses_coalesce_and_negatives_are_cached() {
    let backend = Arc::new(Counting { inner: MemoryStore::new(), reads: AtomicUsize::new(0) });
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let cache = Arc::new(CachedStore::new(
        backend.clone(),
        Duration::from_secs(30),
        Duration::from_secs(5),
        64 << 20,
        Arc::new(move |hit| {
            if hit {
                h.fetch_add(1, Ordering::SeqCst);
            }
        }),
    ));
    let unknown = KeyHash::of("nope");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let c = cache.clone();
            tokio::spawn(async move { c.account_for_key(&unknown).await.unwrap() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), None);
    }
    assert_eq!(backend.reads.load(Ordering::SeqCst), 1, "50 concurrent misses, one read");
    assert_eq!(hits.load(Ordering::SeqCst), 49);
    // A key created later is seen once its invalidation arrives.
    let meta = KeyMeta::for_key("nope", 2, "", chrono::Utc::now());
    backend.put_key(&unknown, "acct", &meta).await.unwrap();
    assert_eq!(cache.account_for_key(&unknown).await.unwrap(), None, "still the cached negative");
    cache.invalidate(&Invalidation::Key(unknown)).await;
    assert_eq!(cache.account_for_key(&unknown).await.unwrap(), Some("acct".into()));
}

fn counting() -> Arc<Counting> {
    Arc::new(Counting { inner: MemoryStore::new(), reads: AtomicUsize::new(0) })
}

#[tokio::test]
async fn large_entries_keep_the_cache_within_its_byte_budget() {
    const BUDGET: u64 = 1 << 20;
    let backend = counting();
    let cache =
        CachedStore::new(backend.clone(), Duration::from_secs(30), Duration::from_secs(5), BUDGET, Arc::new(|_| {}));
    // 400 accounts of ~8 KiB each (64 features of 128 bytes, the longest name): about 3 MiB of entitlements for a 512 KiB half.
    for i in 0..400 {
        let account = Account {
            id: format!("acct_{i}").into(),
            plan: "pro".into(),
            extra_features: (0..64).map(|f| format!("{f:0>2}{}", "x".repeat(126))).collect(),
            ..Default::default()
        };
        backend.put_account(&account).await.unwrap();
        assert!(cache.account(&account.id).await.unwrap().is_some());
    }
    // 5,000 keys, each naming a 128-byte account id: about 1.5 MiB for the other half.
    for i in 0..5_000 {
        let key = KeyHash::of(&format!("key-{i}"));
        let meta = KeyMeta::for_key("k", 2, "", chrono::Utc::now());
        backend.inner.put_key(&key, &format!("{i:0>128}"), &meta).await.unwrap();
        cache.keys.insert(key, backend.inner.account_for_key(&key).await.unwrap()).await;
    }
    cache.accounts.run_pending_tasks().await;
    cache.keys.run_pending_tasks().await;
    let (accounts, keys) = (cache.accounts.weighted_size(), cache.keys.weighted_size());
    assert!(accounts <= BUDGET / 2, "accounts weigh {accounts} bytes");
    assert!(keys <= BUDGET / 2, "keys weigh {keys} bytes");
    assert!(accounts + keys > BUDGET / 4, "the budget is used: {accounts} + {keys}");
    let one = account_entry_weight(
        "acct_0",
        &Some(Arc::new(Account {
            extra_features: (0..64).map(|f| format!("{f:0>2}{}", "x".repeat(126))).collect(),
            ..Default::default()
        })),
    );
    assert!(one > 8 * 1024, "an entry weighs at least its strings: {one}");
}

#[tokio::test]
async fn an_invalid_account_id_never_reaches_the_backend_nor_the_cache() {
    let backend = counting();
    let cache =
        CachedStore::new(backend.clone(), Duration::from_secs(30), Duration::from_secs(5), 1 << 20, Arc::new(|_| {}));
    for id in ["x".repeat(1 << 20), String::new(), "acct/../other".into(), "acct\n".into(), "a".repeat(129)] {
        assert_eq!(cache.account(&id).await.unwrap(), None);
    }
    cache.accounts.run_pending_tasks().await;
    assert_eq!(backend.reads.load(Ordering::SeqCst), 0, "no backend read");
    assert_eq!(cache.accounts.entry_count(), 0, "nothing cached");
    assert_eq!(cache.account("acct_ok").await.unwrap(), None);
    assert_eq!(backend.reads.load(Ordering::SeqCst), 1, "a valid unknown id is looked up once");
}
