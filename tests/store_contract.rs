//! The store contract: what every [`Store`] must answer alike, written once
//! and run against the memory store, the Redis store on one `redis-server`,
//! the same in lease mode, and the Redis store on a three-master Redis Cluster.
//!
//! Each case is an `async fn(&Subject)`. A subject is a fresh store (the
//! Redis ones under their own key prefix on a shared server) and the clock its
//! windows run on. The memory store counts every window by `Spend::now`, so
//! its clock is virtual and moves without sleeping; the Redis store counts
//! rolling windows by Redis `TIME`, so its clock is the wall clock, waited on.
//! Cases read rolling-window instants off the store's own answers (a spend
//! in bucket `b` shows as `resets_at` = when `b` leaves the window, see
//! `tollgate::store::rolling`), so their assertions are exact on both clocks;
//! only "is this instant now?" allows [`Clock::slack`].
//!
//! Run one case with `CONTRACT_CASE=<part of its name> cargo test --test store_contract`.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use tokio::sync::{Notify, mpsc};
use tollgate::config::LeaseConfig;
use tollgate::entitlement::{Account, Period, Quota, Status, Window};
use tollgate::identity::{KeyHash, KeyMeta};
use tollgate::store::rolling::Buckets;
use tollgate::store::{CachedStore, Invalidation, LeaseStore, MemoryStore, RedisStore, Store, StoreError};
use tollgate::usage::{Adjustment, CreditBalance, MAX_CREDITS, Mark, Settled, Spend, SpendAnswer};
use tollgate_testkit::redis::{RedisCluster, RedisServer};

const ACCT: &str = "acct_c";

/// The clock a subject's windows run on.
enum Clock {
    /// The memory store's: whatever `Spend::now` says, moved at will.
    Virtual(Mutex<DateTime<Utc>>),
    /// Redis's: the wall clock (Redis `TIME` on this machine), waited on.
    Wall,
}

impl Clock {
    fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::Virtual(t) => *t.lock().unwrap(),
            Clock::Wall => Utc::now(),
        }
    }

    async fn sleep(&self, d: Duration) {
        match self {
            Clock::Virtual(t) => {
                *t.lock().unwrap() += d;
            }
            Clock::Wall => tokio::time::sleep(d).await,
        }
    }

    /// Until `t` has passed by the store's clock.
    async fn sleep_until(&self, t: DateTime<Utc>) {
        let left = (t - self.now()).to_std().unwrap_or_default();
        // Redis reads TIME to the millisecond: one more makes sure it has passed `t` too.
        let margin = if matches!(self, Clock::Wall) { Duration::from_millis(2) } else { Duration::ZERO };
        self.sleep(left + margin).await;
    }

    /// How far the store's "now" may be from ours (a Redis round trip).
    fn slack(&self) -> chrono::Duration {
        match self {
            Clock::Virtual(_) => chrono::Duration::zero(),
            Clock::Wall => chrono::Duration::milliseconds(500),
        }
    }

    #[track_caller]
    fn assert_now(&self, t: DateTime<Utc>, what: &str) {
        let now = self.now();
        assert!((t - now).abs() <= self.slack(), "{what}: {t} is not now ({now})");
    }

    /// `t` is when the bucket of a spend made now leaves a window of `per`:
    /// a whole number of buckets, after `now + per` by at most two bucket widths.
    #[track_caller]
    fn assert_bucket_leaves(&self, t: DateTime<Utc>, per: Duration, what: &str) {
        let g = Buckets::of(per).unwrap();
        let now = self.now();
        let want = ms(g.leaves_at(g.index(now.timestamp_millis())));
        assert_eq!(t.timestamp_millis() % g.width_ms, 0, "{what}: {t} is not a bucket boundary");
        assert!((t - want).abs() <= self.slack(), "{what}: {t} is not when now's bucket leaves ({want})");
        let late = t - (now + chrono::Duration::from_std(per).unwrap());
        let bound = chrono::Duration::milliseconds(2 * g.width_ms) + self.slack();
        assert!(late > -self.slack() && late <= bound, "{what}: {late} past now + per");
    }
}

/// The instant `ms` after the epoch.
fn ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap()
}

/// One store under contract.
struct Subject {
    store: Arc<dyn Store>,
    clock: Clock,
    /// For a Redis store: the Redis store under `store`, and how to open another replica of it.
    redis: Option<(Arc<RedisStore>, String, String)>,
    /// Lease mode: a spend's `used` may be more than exact mode's (it never
    /// claims more remaining than truly remains), never less; all else alike.
    lease: bool,
}

/// Where the subjects live.
enum Backend {
    Memory,
    Redis {
        name: &'static str,
        url: String,
    },
    /// The Redis store behind a [`LeaseStore`] (`store.counting: lease`).
    Lease {
        url: String,
    },
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Redis { name, .. } => name,
            Backend::Lease { .. } => "redis lease",
        }
    }

    /// A fresh store for `case`: a new memory store, or its own key prefix on the shared Redis.
    fn subject(&self, case: &str) -> Subject {
        match self {
            Backend::Memory => Subject {
                store: Arc::new(MemoryStore::new()),
                clock: Clock::Virtual(Mutex::new(at("2099-06-15T12:00:00Z"))),
                redis: None,
                lease: false,
            },
            Backend::Redis { url, .. } => {
                let prefix = format!("{case}:");
                let store = Arc::new(RedisStore::open(url, &prefix, Duration::from_secs(5)).unwrap());
                Subject {
                    store: store.clone(),
                    clock: Clock::Wall,
                    redis: Some((store, url.clone(), prefix)),
                    lease: false,
                }
            }
            Backend::Lease { url } => {
                let prefix = format!("{case}:");
                let store = Arc::new(RedisStore::open(url, &prefix, Duration::from_secs(5)).unwrap());
                let lease = LeaseStore::new(store.clone(), LeaseConfig::default()).unwrap();
                Subject { store: lease, clock: Clock::Wall, redis: Some((store, url.clone(), prefix)), lease: true }
            }
        }
    }
}

impl Subject {
    async fn spend(&self, s: &Spend) -> SpendAnswer {
        self.store.spend(s).await.unwrap()
    }

    /// Another replica over the same data: a second Redis store on the same
    /// prefix (behind its own lease store in lease mode); on the memory
    /// store, which is one replica, the store itself.
    fn replica(&self) -> Arc<dyn Store> {
        let Some((_, url, prefix)) = &self.redis else { return self.store.clone() };
        let redis = Arc::new(RedisStore::open(url, prefix, Duration::from_secs(5)).unwrap());
        if self.lease { LeaseStore::new(redis, LeaseConfig::default()).unwrap() } else { redis }
    }

    /// A dry run of cost 0: how the quotas stand, spending nothing.
    async fn probe(&self, quotas: &[Quota], now: DateTime<Utc>) -> SpendAnswer {
        self.spend(&dry(spend(quotas, 0, None, now))).await
    }

    /// A writer and a reader behind a cache that only invalidations refresh:
    /// another replica's cache on Redis (fed by pub/sub), the store's own
    /// cache on the memory store (one replica, so every write goes through it).
    async fn writer_and_cached_reader(&self) -> (Arc<dyn Store>, Arc<CachedStore>) {
        let cache = |inner: Arc<dyn Store>| {
            let hour = Duration::from_secs(3600);
            Arc::new(CachedStore::new(inner, hour, hour, 1 << 20, Arc::new(|_| {})))
        };
        let Some((_, url, prefix)) = &self.redis else {
            let cached = cache(self.store.clone());
            return (cached.clone(), cached);
        };
        let replica = Arc::new(RedisStore::open(url, prefix, Duration::from_secs(5)).unwrap());
        let cached = cache(replica.clone());
        let (subscribed, weak) = (Arc::new(Notify::new()), Arc::downgrade(&cached));
        let on_reconnect = subscribed.clone();
        let task = replica.spawn_listener(
            move |inv| {
                let cache = weak.upgrade();
                async move {
                    if let Some(cache) = cache {
                        cache.invalidate(&inv).await;
                    }
                }
            },
            move || on_reconnect.notify_one(),
        );
        cached.set_listener(task);
        subscribed.notified().await;
        (self.store.clone(), cached)
    }
}

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn calendar(limit: u64, period: Period) -> Quota {
    Quota { meter: "requests".into(), limit, window: Window::Calendar(period), ceiling: None }
}

fn rolling(limit: u64, per: Duration) -> Quota {
    Quota { meter: "requests".into(), limit, window: Window::Rolling(per), ceiling: None }
}

fn spend(quotas: &[Quota], cost: u64, credits: Option<u64>, now: DateTime<Utc>) -> Spend {
    Spend { account: ACCT.into(), quotas: quotas.into(), cost, credits, now, dry_run: false, shadow: false }
}

fn dry(s: Spend) -> Spend {
    Spend { dry_run: true, ..s }
}

fn used(a: &SpendAnswer) -> Vec<u64> {
    a.quotas.iter().map(|q| q.used).collect()
}

fn account(plan: &str) -> Account {
    Account { id: ACCT.into(), plan: plan.into(), ..Account::default() }
}

/// Polls `$cond` until it holds, for at most a second (a pub/sub message's way).
macro_rules! eventually {
    ($what:expr, $cond:expr) => {{
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while !$cond {
            assert!(tokio::time::Instant::now() < deadline, "{} did not happen within a second", $what);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }};
}

// ---------------------------------------------------------------- spending

async fn a_spend_is_all_or_nothing_across_quotas_and_credits(s: &Subject) {
    s.store.set_credits(ACCT, 5).await.unwrap();
    let ai = Quota { meter: "ai".into(), limit: 2, window: Window::Calendar(Period::Day), ceiling: None };
    let q = [calendar(10, Period::Month), ai, rolling(100, Duration::from_secs(60))];
    let now = s.clock.now();
    for (n, balance) in [(1, 3), (2, 1)] {
        let a = s.spend(&spend(&q, 1, Some(2), now)).await;
        assert!(a.spent && a.quotas.iter().all(|q| !q.exceeded));
        assert_eq!((used(&a), a.credits), (vec![n; 3], Some(CreditBalance { balance, sufficient: true })));
    }
    // The day quota is full: nothing else moves, not the month, the rolling window or the credits.
    let a = s.spend(&spend(&q, 1, Some(1), now)).await;
    assert!(!a.spent);
    assert_eq!(a.quotas.iter().map(|q| q.exceeded).collect::<Vec<_>>(), [false, true, false], "only the full quota");
    assert_eq!((used(&a), a.credits), (vec![2; 3], Some(CreditBalance { balance: 1, sufficient: true })));
    // The credits are short: the quotas that fit do not move either.
    let a = s.spend(&spend(&[q[0].clone(), q[2].clone()], 1, Some(2), now)).await;
    assert!(!a.spent && a.quotas.iter().all(|q| !q.exceeded));
    assert_eq!((used(&a), a.credits), (vec![2; 2], Some(CreditBalance { balance: 1, sufficient: false })));
    assert_eq!(used(&s.probe(&q, now).await), [2; 3]);
    assert_eq!(s.store.credits(ACCT).await.unwrap(), 1);
    // Exactly the balance fits; a spend without credits answers none.
    let a = s.spend(&spend(&q[..1], 1, Some(1), now)).await;
    assert_eq!((a.spent, a.credits), (true, Some(CreditBalance { balance: 0, sufficient: true })));
    assert_eq!(s.spend(&spend(&q[..1], 1, None, now)).await.credits, None);
}

async fn a_dry_run_reports_how_a_spend_would_stand_and_spends_nothing(s: &Subject) {
    s.store.set_credits(ACCT, 3).await.unwrap();
    let q = [calendar(2, Period::Month), rolling(2, Duration::from_secs(60))];
    let now = s.clock.now();
    let a = s.spend(&dry(spend(&q, 2, Some(3), now))).await;
    assert!(!a.spent && a.quotas.iter().all(|q| !q.exceeded), "{a:?}");
    assert_eq!((used(&a), a.credits), (vec![0, 0], Some(CreditBalance { balance: 3, sufficient: true })));
    let a = s.spend(&dry(spend(&q, 3, Some(4), now))).await;
    assert!(!a.spent && a.quotas.iter().all(|q| q.exceeded) && a.credits.is_some_and(|c| !c.sufficient));
    let a = s.spend(&spend(&q, 2, Some(3), now)).await;
    assert!(a.spent, "the dry runs left everything in place");
    assert_eq!((used(&a), s.store.credits(ACCT).await.unwrap()), (vec![2, 2], 0));
}

async fn a_soft_quota_passes_its_limit_as_overage_up_to_its_ceiling_across_replicas(s: &Subject) {
    let soft = calendar(10, Period::Month).soften(true, Some(15)).unwrap();
    let q = [soft, rolling(1000, Duration::from_secs(60))];
    let replicas = [s.store.clone(), s.replica()];
    let now = s.clock.now();
    // Every answer is exact, in lease mode too (a soft quota is spent in Redis whole).
    for n in 1..=15u64 {
        let a = replicas[n as usize % 2].spend(&spend(&q, 1, None, now)).await.unwrap();
        assert!(a.spent && a.quotas.iter().all(|q| !q.exceeded), "spend {n}: {a:?}");
        assert_eq!(used(&a), [n, n], "spend {n}");
    }
    for r in &replicas {
        let a = r.spend(&spend(&q, 1, None, now)).await.unwrap();
        assert!(!a.spent && a.quotas[0].exceeded && !a.quotas[1].exceeded, "the ceiling stops: {a:?}");
        assert_eq!(used(&a), [15, 15]);
    }
    // Concurrent spends from both replicas: exactly the ceiling's worth pass.
    s.store.reset_usage(ACCT, &q, now).await.unwrap();
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let (r, sp) = (replicas[i % 2].clone(), spend(&q, 1, None, now));
            tokio::spawn(async move { r.spend(&sp).await.unwrap().spent })
        })
        .collect();
    let mut passed = 0;
    for t in tasks {
        passed += u64::from(t.await.unwrap());
    }
    assert_eq!(passed, 15);
    assert_eq!(used(&s.probe(&q, now).await), [15, 15]);
}

async fn a_shadow_spend_passes_every_limit_and_moves_no_credits(s: &Subject) {
    s.store.set_credits(ACCT, 5).await.unwrap();
    let q = [calendar(2, Period::Month), rolling(2, Duration::from_secs(60))];
    let now = s.clock.now();
    let shadow = |cost, credits| Spend { shadow: true, ..spend(&q, cost, credits, now) };
    for n in 1..=4u64 {
        let a = s.spend(&shadow(1, Some(1))).await;
        assert!(a.spent, "usage is real: {a:?}");
        assert_eq!(used(&a), [n, n]);
        assert_eq!(a.quotas.iter().map(|q| q.exceeded).collect::<Vec<_>>(), [n > 2, n > 2], "would-be answer {n}");
        assert_eq!(a.credits, Some(CreditBalance { balance: 5, sufficient: true }), "no money moves");
    }
    let a = s.spend(&shadow(1, Some(6))).await;
    assert_eq!((a.spent, a.credits), (true, Some(CreditBalance { balance: 5, sufficient: false })));
    // Past the limit, enforcement is back as soon as a spend is not a shadow one.
    let a = s.spend(&spend(&q, 1, Some(1), now)).await;
    assert!(!a.spent && a.quotas.iter().all(|q| q.exceeded));
    assert_eq!(used(&a), [5, 5]);
    // A dry run wins over shadow: nothing moves.
    let a = s.spend(&Spend { dry_run: true, ..shadow(1, None) }).await;
    assert!(!a.spent);
    assert_eq!((used(&s.probe(&q, now).await), s.store.credits(ACCT).await.unwrap()), (vec![5, 5], 5));
}

async fn a_calendar_window_fits_up_to_its_limit_then_resets_with_the_window(s: &Subject) {
    let q = [calendar(3, Period::Month)];
    let (now, end) = (at("2099-11-30T23:59:59Z"), at("2099-12-01T00:00:00Z"));
    let check = |a: &SpendAnswer, spent: bool, used: u64, exceeded: bool| {
        assert_eq!((a.spent, a.quotas[0].exceeded), (spent, exceeded), "{a:?}");
        if s.lease {
            assert!((used..=3).contains(&a.quotas[0].used), "never less than used, never past the limit: {a:?}");
        } else {
            assert_eq!(a.quotas[0].used, used, "{a:?}");
        }
        assert_eq!((a.quotas[0].resets_at, a.quotas[0].retry_at), (end, end), "a calendar window's end, always");
    };
    check(&s.spend(&spend(&q, 2, None, now)).await, true, 2, false);
    check(&s.spend(&spend(&q, 2, None, now)).await, false, 2, true); // more than remains
    check(&s.spend(&spend(&q, 1, None, now)).await, true, 3, false); // exactly the limit
    check(&s.spend(&spend(&q, 1, None, now)).await, false, 3, true);
    check(&s.spend(&spend(&q, 0, None, now)).await, true, 3, false); // nothing still fits
    check(&s.spend(&spend(&q, 4, None, now)).await, false, 3, true); // more than the limit
    let a = s.spend(&spend(&q, 1, None, end)).await;
    assert_eq!((a.spent, a.quotas[0].resets_at), (true, at("2100-01-01T00:00:00Z")));
    assert!(a.quotas[0].used == 1 || s.lease && a.quotas[0].used <= 3, "{a:?}");
    let day = [calendar(5, Period::Day)];
    let a = s.spend(&spend(&day, 1, None, end)).await;
    assert!(a.spent && (a.quotas[0].used == 1 || s.lease && a.quotas[0].used <= 5), "each period counts apart: {a:?}");
}

/// A replica whose clock lags the store's by minutes still counts its
/// window: it spends into a minute Redis has seen end, and its counter must
/// be there on its next spend (an expiry computed from its clock alone is in
/// the past, which deleted the counter at each spend: no limit at all).
async fn a_replica_whose_clock_lags_still_counts_its_window(s: &Subject) {
    let q = [calendar(2, Period::Minute)];
    let behind = s.clock.now() - chrono::Duration::minutes(5);
    let spent: Vec<bool> = [
        s.spend(&spend(&q, 1, None, behind)).await,
        s.spend(&spend(&q, 1, None, behind)).await,
        s.spend(&spend(&q, 1, None, behind)).await,
    ]
    .iter()
    .map(|a| a.spent)
    .collect();
    assert_eq!(spent, [true, true, false], "the limit holds on a lagging clock");
}

async fn a_rolling_window_fits_up_to_its_limit_and_retries_when_its_oldest_buckets_leave(s: &Subject) {
    // On the wall clock: every step but the sleeps takes a few ms, far less than w / 2.
    // 1 s is 16 buckets of 63 ms; w / 2 apart, two spends land in different buckets.
    let w = Duration::from_secs(1);
    let q = [rolling(3, w)];
    let go = async |cost| s.spend(&spend(&q, cost, None, s.clock.now())).await.quotas[0];

    let a = go(1).await;
    let r1 = a.resets_at; // when the first spend's bucket leaves
    s.clock.assert_bucket_leaves(r1, w, "the first spend");
    assert_eq!((a.used, a.exceeded), (1, false));
    s.clock.assert_now(a.retry_at, "a request that fits may come again at once");
    let a = go(3).await;
    assert_eq!((a.used, a.exceeded, a.resets_at, a.retry_at), (1, true, r1, r1), "more than remains");
    s.clock.sleep(w / 2).await;
    let a = go(2).await;
    let r2 = a.resets_at;
    s.clock.assert_bucket_leaves(r2, w, "the second spend");
    assert!(r2 > r1);
    assert_eq!((a.used, a.exceeded), (3, false), "exactly the limit");
    let a = go(1).await;
    assert_eq!((a.used, a.exceeded, a.resets_at, a.retry_at), (3, true, r2, r1), "once the first bucket leaves");
    let a = go(3).await;
    assert_eq!((a.exceeded, a.retry_at), (true, r2), "once both leave");
    let a = go(4).await;
    assert_eq!((a.exceeded, a.resets_at, a.retry_at), (true, r2, r2), "more than the limit: when empty");
    let lowered = s.spend(&spend(&[rolling(2, w)], 0, None, s.clock.now())).await.quotas[0];
    assert_eq!((lowered.used, lowered.exceeded, lowered.retry_at), (3, true, r1), "a limit lowered below use");

    s.clock.sleep_until(r1).await;
    let a = go(1).await;
    let r3 = a.resets_at;
    assert_eq!((a.used, a.exceeded), (3, false), "the first bucket left: its unit is free");
    let a = go(1).await;
    assert_eq!((a.used, a.exceeded, a.retry_at), (3, true, r2));
    s.clock.sleep_until(r3).await;
    let a = go(0).await;
    assert_eq!((a.used, a.exceeded), (0, false), "every bucket left");
    s.clock.assert_now(a.resets_at, "an empty window is restored now");
}

/// Bug (b): a cost-0 request adds nothing, so it must not move `resets_at`
/// (the `t` of the `RateLimit` header) to a full window from now.
async fn a_cost_0_spend_leaves_a_rolling_window_restored_when_its_newest_bucket_leaves(s: &Subject) {
    let w = Duration::from_secs(60);
    let q = [rolling(5, w)];
    for dry_run in [false, true] {
        let a = s.spend(&Spend { dry_run, ..spend(&q, 0, None, s.clock.now()) }).await;
        assert_eq!((a.spent, a.quotas[0].used, a.quotas[0].exceeded), (!dry_run, 0, false));
        s.clock.assert_now(a.quotas[0].resets_at, "an empty window is restored now (t=0), not in a full window");
        s.clock.assert_now(a.quotas[0].retry_at, "and a request may come at once");
    }
    let r1 = s.spend(&spend(&q, 1, None, s.clock.now())).await.quotas[0].resets_at;
    s.clock.assert_bucket_leaves(r1, w, "the spend");
    s.clock.sleep(Duration::from_millis(200)).await;
    for dry_run in [false, true] {
        let a = s.spend(&Spend { dry_run, ..spend(&q, 0, None, s.clock.now()) }).await;
        assert_eq!((a.spent, a.quotas[0].used), (!dry_run, 1));
        assert_eq!(a.quotas[0].resets_at, r1, "restored when the newest bucket leaves (dry run: {dry_run})");
    }
}

/// The payer's guarantee: hammered for five windows, no window of length
/// `per` holds more than `limit` allowed units. Checked twice: by the bucket
/// each allowed spend reports (any `count + 1` consecutive buckets cover a
/// window), and by time, counting only the spends surely inside the window
/// that ends with each allowed spend, since Redis's instant for a spend is
/// only known to lie between our clock before and after the call.
async fn no_rolling_window_ever_holds_more_than_its_limit(s: &Subject) {
    let (per, limit) = (Duration::from_millis(200), 7);
    let g = Buckets::of(per).unwrap();
    let q = [rolling(limit, per)];
    let end = s.clock.now() + chrono::Duration::from_std(per * 5).unwrap();
    // (bucket, started, answered, units) of every allowed spend.
    let mut allowed: Vec<(i64, DateTime<Utc>, DateTime<Utc>, u64)> = Vec::new();
    let mut step = 0u64;
    while s.clock.now() < end {
        let (cost, started) = (1 + step % 3, s.clock.now());
        let a = s.spend(&spend(&q, cost, None, started)).await.quotas[0];
        if !a.exceeded {
            let bucket = a.resets_at.timestamp_millis() / g.width_ms - g.count - 1;
            allowed.push((bucket, started, s.clock.now(), cost));
        }
        s.clock.sleep(Duration::from_millis(3 + step % 5)).await;
        step += 1;
    }
    assert!(allowed.len() as u64 > 2 * limit, "the loop spent in several windows: {}", allowed.len());
    for (b, ..) in &allowed {
        let held: u64 = allowed.iter().filter(|(j, ..)| (b - g.count..=*b).contains(j)).map(|x| x.3).sum();
        assert!(held <= limit, "buckets {}..={b} hold {held} > {limit}", b - g.count);
    }
    let per = chrono::Duration::from_std(per).unwrap();
    for (i, (_, _, answered, _)) in allowed.iter().enumerate() {
        let held: u64 = allowed[..=i].iter().filter(|(_, started, ..)| *started > *answered - per).map(|x| x.3).sum();
        assert!(held <= limit, "the window of {per} up to spend {i} holds {held} > {limit}");
    }
}

async fn reset_usage_empties_the_current_windows_of_the_quotas_named(s: &Subject) {
    let (month, rate) = (calendar(2, Period::Month), rolling(2, Duration::from_secs(60)));
    let other = Quota { meter: "ai".into(), limit: 2, window: Window::Calendar(Period::Month), ceiling: None };
    let q = [month.clone(), rate.clone(), other.clone()];
    let now = s.clock.now();
    assert!(s.spend(&spend(&q, 2, None, now)).await.spent);
    s.store.reset_usage(ACCT, &[month, rate], now).await.unwrap();
    assert_eq!(used(&s.probe(&q, now).await), [0, 0, 2], "the quota not named keeps its usage");
    s.store.reset_usage("acct_never_seen", &q, now).await.unwrap();
}

// ---------------------------------------------------------------- credits

async fn credits_are_set_added_and_kept_within_zero_and_max_credits(s: &Subject) {
    let c = &s.store;
    assert_eq!(c.credits(ACCT).await.unwrap(), 0, "never set");
    assert_eq!(c.add_credits("acct_fresh", 4).await.unwrap(), Some(4), "adding to none adds to 0");
    c.set_credits(ACCT, 10).await.unwrap();
    c.set_credits(ACCT, 3).await.unwrap();
    assert_eq!(c.credits(ACCT).await.unwrap(), 3, "set, not added");
    assert_eq!(c.add_credits(ACCT, 5).await.unwrap(), Some(8));
    assert_eq!(c.add_credits(ACCT, -8).await.unwrap(), Some(0));
    assert_eq!(c.add_credits(ACCT, -1).await.unwrap(), None, "below zero: refused");
    for too_many in [MAX_CREDITS + 1, u64::MAX] {
        assert!(matches!(c.set_credits(ACCT, too_many).await, Err(StoreError::Corrupt(_))), "{too_many}");
    }
    assert_eq!(c.credits(ACCT).await.unwrap(), 0, "the refusals changed nothing");
    c.set_credits(ACCT, MAX_CREDITS - 5).await.unwrap();
    for delta in [6, i64::MAX, i64::MIN, -(MAX_CREDITS as i64) + 4] {
        assert_eq!(c.add_credits(ACCT, delta).await.unwrap(), None, "{delta}");
    }
    assert_eq!(c.add_credits(ACCT, 5).await.unwrap(), Some(MAX_CREDITS));
    assert_eq!(c.credits(ACCT).await.unwrap(), MAX_CREDITS);
}

// ---------------------------------------------------------------- keys and accounts

async fn keys_map_to_their_account_until_revoked(s: &Subject) {
    let (k1, k2) = (KeyHash::of("contract-key-1"), KeyHash::of("contract-key-2"));
    let meta = |name: &str, at_: &str| KeyMeta::for_key("contract-key", 4, name, at(at_));
    let c = &s.store;
    assert_eq!(c.account_for_key(&k1).await.unwrap(), None);
    c.put_key(&k2, ACCT, &meta("second", "2026-02-01T00:00:00Z")).await.unwrap();
    c.put_key(&k1, ACCT, &meta("old name", "2026-01-01T00:00:00Z")).await.unwrap();
    c.put_key(&k1, ACCT, &meta("first", "2026-01-01T00:00:00Z")).await.unwrap();
    assert_eq!(c.account_for_key(&k1).await.unwrap().as_deref(), Some(ACCT));
    let listed = c.list_keys(ACCT).await.unwrap();
    let want = vec![(k1, meta("first", "2026-01-01T00:00:00Z")), (k2, meta("second", "2026-02-01T00:00:00Z"))];
    assert_eq!(listed, want, "oldest first, the later put's metadata");
    assert!(!c.revoke_key("acct_other", &k1).await.unwrap(), "not another account's to revoke");
    assert_eq!(c.account_for_key(&k1).await.unwrap().as_deref(), Some(ACCT));
    assert!(c.revoke_key(ACCT, &k1).await.unwrap());
    assert!(!c.revoke_key(ACCT, &k1).await.unwrap(), "already revoked");
    assert_eq!(c.account_for_key(&k1).await.unwrap(), None);
    assert_eq!(c.list_keys(ACCT).await.unwrap(), want[1..]);
    assert_eq!(c.list_keys("acct_none").await.unwrap(), []);
}

async fn accounts_round_trip_and_late_billing_events_never_roll_them_back(s: &Subject) {
    let c = &s.store;
    assert_eq!(c.account(ACCT).await.unwrap(), None);
    let full = Account {
        status: Status::PastDue,
        past_due_since: Some(at("2026-03-01T10:00:00.123Z")),
        expires_at: Some(at("2027-01-01T00:00:00Z")),
        extra_features: ["ai".to_string(), "export".to_string()].into(),
        quota_overrides: vec![calendar(9, Period::Day), rolling(5, Duration::from_millis(1500))],
        stripe_customer: Some("cus_C1".into()),
        billing_event_at: Some(at("2026-03-01T10:00:00.500Z")),
        ..account("pro")
    };
    c.put_account(&full).await.unwrap();
    assert_eq!(c.account(ACCT).await.unwrap().as_deref(), Some(&full));
    assert_eq!(c.account_for_customer("cus_C1").await.unwrap().as_deref(), Some(ACCT));
    assert_eq!(c.account_for_customer("cus_nobody").await.unwrap(), None);

    let event = |plan: &str, t: Option<&str>| Account { billing_event_at: t.map(at), ..account(plan) };
    let plan = async || c.account(ACCT).await.unwrap().unwrap().plan.clone();
    assert!(!c.put_account_if_newer(&event("older", Some("2026-03-01T10:00:00.499Z"))).await.unwrap());
    assert!(!c.put_account_if_newer(&event("no event", None)).await.unwrap());
    assert_eq!(&*plan().await, "pro", "late events changed nothing");
    assert!(c.put_account_if_newer(&event("same instant", Some("2026-03-01T10:00:00.500Z"))).await.unwrap());
    assert!(c.put_account_if_newer(&event("newer", Some("2026-03-02T00:00:00Z"))).await.unwrap());
    assert_eq!(&*plan().await, "newer");
    c.put_account(&account("by hand")).await.unwrap();
    assert_eq!(&*plan().await, "by hand", "put_account writes whatever is stored");
    assert!(c.put_account_if_newer(&event("any", None)).await.unwrap(), "nothing newer is stored");

    let out_of_bounds = Account { past_due_since: Some(DateTime::<Utc>::MAX_UTC), ..account("bad") };
    assert!(matches!(c.put_account(&out_of_bounds).await, Err(StoreError::Corrupt(_))));
    assert!(matches!(c.put_account_if_newer(&out_of_bounds).await, Err(StoreError::Corrupt(_))));
    assert_eq!(&*plan().await, "any", "nothing out of bounds was written");
}

async fn events_are_remembered_for_their_ttl_until_forgotten(s: &Subject) {
    let c = &s.store;
    let hour = Duration::from_secs(3600);
    assert!(c.remember_event("evt_1", hour).await.unwrap());
    assert!(!c.remember_event("evt_1", hour).await.unwrap(), "a replay");
    assert!(c.remember_event("evt_2", hour).await.unwrap());
    c.forget_event("evt_1").await.unwrap();
    assert!(c.remember_event("evt_1", hour).await.unwrap(), "forgotten, so processed again");
    assert!(c.remember_event("evt_short", Duration::from_millis(100)).await.unwrap());
    // Both stores time events by the wall clock, whatever the windows' clock.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(c.remember_event("evt_short", hour).await.unwrap(), "its TTL passed");
    c.ping().await.unwrap();
}

// ---------------------------------------------------------------- invalidation

async fn a_cached_reader_sees_every_change_to_accounts_and_keys(s: &Subject) {
    let (writer, reader) = s.writer_and_cached_reader().await;
    let key = KeyHash::of("contract-cached-key");
    let meta = KeyMeta::for_key("contract-cached-key", 4, "k", at("2026-01-01T00:00:00Z"));
    assert_eq!(reader.account(ACCT).await.unwrap(), None, "cached as unknown");
    assert_eq!(reader.account_for_key(&key).await.unwrap(), None, "cached as unknown");
    let plan = |reader: Arc<CachedStore>| async move { reader.account(ACCT).await.unwrap().map(|a| a.plan.clone()) };
    writer.put_account(&account("free")).await.unwrap();
    eventually!("the new account", plan(reader.clone()).await.as_deref() == Some("free"));
    writer.put_key(&key, ACCT, &meta).await.unwrap();
    eventually!("the new key", reader.account_for_key(&key).await.unwrap().is_some());
    writer.put_account(&account("pro")).await.unwrap();
    eventually!("the changed plan", plan(reader.clone()).await.as_deref() == Some("pro"));
    let event = Account { billing_event_at: Some(at("2026-01-01T00:00:00Z")), ..account("team") };
    writer.put_account_if_newer(&event).await.unwrap();
    eventually!("the billing event", plan(reader.clone()).await.as_deref() == Some("team"));
    writer.revoke_key(ACCT, &key).await.unwrap();
    eventually!("the revocation", reader.account_for_key(&key).await.unwrap().is_none());
}

/// Redis only: a memory store is one replica, with no one to tell.
async fn every_change_to_a_lookup_is_announced_to_other_replicas(s: &Subject) {
    let Some((redis, _, _)) = &s.redis else { return };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let subscribed = Arc::new(Notify::new());
    let on_reconnect = subscribed.clone();
    let task = redis.spawn_listener(
        move |inv| {
            let _ = tx.send(inv);
            async {}
        },
        move || on_reconnect.notify_one(),
    );
    subscribed.notified().await;
    let (c, key) = (&s.store, KeyHash::of("contract-announced-key"));
    let newer = Account { billing_event_at: Some(at("2026-05-01T00:00:00Z")), ..account("team") };
    c.put_account(&Account { billing_event_at: Some(at("2026-04-01T00:00:00Z")), ..account("pro") }).await.unwrap();
    assert!(!c.put_account_if_newer(&account("late")).await.unwrap(), "not written, so not announced");
    c.put_key(&key, ACCT, &KeyMeta::for_key("k", 1, "", at("2026-01-01T00:00:00Z"))).await.unwrap();
    c.set_credits(ACCT, 5).await.unwrap();
    s.spend(&spend(&[calendar(5, Period::Month)], 1, Some(1), s.clock.now())).await;
    c.revoke_key(ACCT, &key).await.unwrap();
    assert!(c.put_account_if_newer(&newer).await.unwrap());
    let mut heard = Vec::new();
    while let Ok(Some(inv)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        heard.push(inv);
    }
    let (acct, usage) = (Invalidation::Account(ACCT.into()), Invalidation::Usage(ACCT.into()));
    assert_eq!(heard, [acct.clone(), Invalidation::Key(key), usage, Invalidation::Key(key), acct]);
    task.abort();
}

// ---------------------------------------------------------------- settlement

async fn a_settlement_moves_the_windows_it_was_charged_in_once(s: &Subject) {
    s.store.set_credits(ACCT, 20).await.unwrap();
    let q = [calendar(100, Period::Month), calendar(50, Period::Day)];
    let now = s.clock.now();
    let adj = |charge: &str, delta: i64, issued: DateTime<Utc>| Adjustment {
        account: ACCT.into(),
        charge: charge.into(),
        issued,
        meter: "requests".into(),
        periods: vec![Period::Month, Period::Day],
        delta,
        credits: true,
        remember_until: now + chrono::Duration::hours(1),
        event: None,
        marks: Vec::new(),
        outbox_limit: 0,
    };
    assert!(s.spend(&spend(&q, 10, Some(10), now)).await.spent);
    // A refund gives back what the charge spent, once per charge id.
    assert_eq!(s.store.settle(&adj("c-1", -10, now)).await.unwrap(), applied(0));
    assert_eq!(s.store.settle(&adj("c-1", -10, now)).await.unwrap(), Settled::Duplicate);
    assert_eq!(s.store.settle(&adj("c-1", 5, now)).await.unwrap(), Settled::Duplicate, "whatever a replay says");
    if s.lease {
        // Counters hold leased units too: exact numbers are tests/lease.rs's business.
        return;
    }
    assert_eq!((used(&s.probe(&q, now).await), s.store.credits(ACCT).await.unwrap()), (vec![0, 0], 20));
    // An overage is charged past the reservation and past the limit; the balance stops at 0.
    assert!(s.spend(&spend(&q, 10, Some(10), now)).await.spent);
    assert_eq!(s.store.settle(&adj("c-2", 45, now)).await.unwrap(), applied(35));
    let a = s.probe(&q, now).await;
    assert_eq!((used(&a), s.store.credits(ACCT).await.unwrap()), (vec![55, 55], 0));
    assert!(a.quotas[1].exceeded, "the day is over its limit: the next request is refused");
    // A refund of a charge made in an earlier month and day leaves this one
    // alone (the credits, which have no window, come back).
    let earlier = now - chrono::Duration::days(40);
    assert_eq!(s.store.settle(&adj("c-3", -5, earlier)).await.unwrap(), applied(0));
    assert_eq!((used(&s.probe(&q, now).await), s.store.credits(ACCT).await.unwrap()), (vec![55, 55], 5));
    // A refund never takes a counter below 0.
    assert!(s.store.settle(&adj("c-4", -60, now)).await.is_ok());
    assert_eq!(used(&s.probe(&q, now).await), [0, 0]);
    // Charges recorded as settled at their reservation cannot be settled again.
    let until = adj("c-9", 0, now).remember_until;
    s.store.record_settled(ACCT, now, &["c-7".into(), "c-8".into()], until).await.unwrap();
    assert_eq!(
        s.store.settle(&Adjustment { remember_until: until, ..adj("c-8", -1, now) }).await.unwrap(),
        Settled::Duplicate
    );
    // The same charge id on another account is another charge.
    let other = Adjustment { account: "acct_other".into(), ..adj("c-1", -1, now) };
    assert_eq!(s.store.settle(&other).await.unwrap(), applied(0));
}

fn applied(unpaid: u64) -> Settled {
    Settled::Applied { unpaid, queued: 0, dropped: 0 }
}

async fn settled_events_wait_in_the_outbox_until_acknowledged_and_thresholds_fire_once(s: &Subject) {
    let q = [calendar(10, Period::Month)];
    let now = s.clock.now();
    let mark = |at: u64| Mark {
        counter: Some(0),
        at,
        name: format!("requests:month:{at}"),
        until: now + chrono::Duration::hours(1),
        event: format!("{{\"threshold\":{at}}}"),
    };
    let adj = |charge: &str, delta: i64, limit: u64| Adjustment {
        account: ACCT.into(),
        charge: charge.into(),
        issued: now,
        meter: "requests".into(),
        periods: vec![Period::Month],
        delta,
        credits: false,
        remember_until: now + chrono::Duration::hours(1),
        event: Some(format!("{{\"usage\":\"{charge}\"}}")),
        marks: vec![mark(2), mark(3)],
        outbox_limit: limit,
    };
    let count = |s: Settled| match s {
        Settled::Applied { queued, dropped, .. } => (queued, dropped),
        Settled::Duplicate => (0, 0),
    };
    // 2 units: the usage event and the level-2 threshold; a replay queues nothing.
    assert!(s.spend(&spend(&q, 2, None, now)).await.spent);
    assert_eq!(count(s.store.settle(&adj("e-1", 0, 100)).await.unwrap()), (2, 0));
    assert_eq!(s.store.settle(&adj("e-1", 0, 100)).await.unwrap(), Settled::Duplicate);
    // The level-2 mark is set: only level 3 fires, once.
    assert!(s.spend(&spend(&q, 1, None, now)).await.spent);
    assert_eq!(count(s.store.settle(&adj("e-2", 0, 100)).await.unwrap()), (2, 0));
    assert_eq!(count(s.store.settle(&adj("e-3", 0, 100)).await.unwrap()), (1, 0));
    // A full outbox drops (and says so), and applies the adjustment all the same.
    assert_eq!(count(s.store.settle(&adj("e-4", 0, 5)).await.unwrap()), (0, 1));
    let claimed = s.store.outbox_claim("c1", 100, Duration::from_secs(30)).await.unwrap();
    let payloads: Vec<&str> = claimed.iter().map(|e| e.payload.as_str()).collect();
    let want =
        ["{\"usage\":\"e-1\"}", "{\"threshold\":2}", "{\"usage\":\"e-2\"}", "{\"threshold\":3}", "{\"usage\":\"e-3\"}"];
    assert_eq!(payloads, want, "in order, each once");
    assert!(claimed.iter().all(|e| e.account == ACCT));
    // Unacknowledged, they are claimed again (a failed POST is retried).
    assert_eq!(s.store.outbox_claim("c1", 100, Duration::from_secs(30)).await.unwrap().len(), 5);
    s.store.outbox_ack(&claimed[..2]).await.unwrap();
    let left = s.store.outbox_claim("c1", 100, Duration::from_secs(30)).await.unwrap();
    assert_eq!(left.iter().map(|e| e.payload.as_str()).collect::<Vec<_>>(), want[2..]);
    s.store.outbox_ack(&left).await.unwrap();
    assert!(s.store.outbox_claim("c1", 100, Duration::from_secs(30)).await.unwrap().is_empty());

    // Many at once (one access-log message): the same answers, in order, a
    // replay inside the batch included; an earlier hour's charge is its own group.
    let earlier = Adjustment { issued: now - chrono::Duration::hours(2), ..adj("m-3", 0, 100) };
    let batch = [adj("m-1", -1, 100), adj("m-2", 0, 100), adj("m-1", -1, 100), earlier, adj("e-1", 0, 100)];
    let answers = s.store.settle_many(&batch).await.unwrap();
    let shape: Vec<bool> = answers.iter().map(|a| matches!(a, Settled::Applied { .. })).collect();
    assert_eq!(shape, [true, true, false, true, false], "{answers:?}");
    let queued: u32 = answers.iter().map(|a| count(*a).0).sum();
    assert_eq!(queued, 3, "one usage event per applied charge; no threshold fires again");
    assert_eq!(s.store.outbox_claim("c1", 100, Duration::from_secs(30)).await.unwrap().len(), 3);
}

// ---------------------------------------------------------------- the runs

type Case = fn(Arc<Subject>) -> BoxFuture<'static, ()>;

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        vec![$((stringify!($case), (|s: Arc<Subject>| -> BoxFuture<'static, ()> { Box::pin(async move { $case(&s).await }) }) as Case)),*]
    };
}

/// Runs every case (or those `CONTRACT_CASE` names) on a fresh subject of
/// `backend`, each in its own task so one failure does not hide the others.
async fn keeps_the_contract(backend: Backend) {
    let only = std::env::var("CONTRACT_CASE").ok();
    let mut failed = Vec::new();
    let all = cases![
        a_spend_is_all_or_nothing_across_quotas_and_credits,
        a_dry_run_reports_how_a_spend_would_stand_and_spends_nothing,
        a_soft_quota_passes_its_limit_as_overage_up_to_its_ceiling_across_replicas,
        a_shadow_spend_passes_every_limit_and_moves_no_credits,
        a_calendar_window_fits_up_to_its_limit_then_resets_with_the_window,
        a_replica_whose_clock_lags_still_counts_its_window,
        a_rolling_window_fits_up_to_its_limit_and_retries_when_its_oldest_buckets_leave,
        a_cost_0_spend_leaves_a_rolling_window_restored_when_its_newest_bucket_leaves,
        no_rolling_window_ever_holds_more_than_its_limit,
        reset_usage_empties_the_current_windows_of_the_quotas_named,
        credits_are_set_added_and_kept_within_zero_and_max_credits,
        keys_map_to_their_account_until_revoked,
        accounts_round_trip_and_late_billing_events_never_roll_them_back,
        events_are_remembered_for_their_ttl_until_forgotten,
        a_cached_reader_sees_every_change_to_accounts_and_keys,
        every_change_to_a_lookup_is_announced_to_other_replicas,
        a_settlement_moves_the_windows_it_was_charged_in_once,
        settled_events_wait_in_the_outbox_until_acknowledged_and_thresholds_fire_once,
    ];
    for (name, case) in all {
        if only.as_deref().is_some_and(|only| !name.contains(only)) {
            continue;
        }
        if tokio::spawn(case(Arc::new(backend.subject(name)))).await.is_err() {
            failed.push(name);
        }
    }
    assert!(failed.is_empty(), "the {} store breaks the contract: {failed:#?}", backend.name());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_store_keeps_the_contract() {
    keeps_the_contract(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_keeps_the_contract_on_one_server() {
    let server = RedisServer::start();
    keeps_the_contract(Backend::Redis { name: "redis", url: server.url() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_keeps_the_contract_in_lease_mode() {
    let server = RedisServer::start();
    keeps_the_contract(Backend::Lease { url: server.url() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_keeps_the_contract_on_a_cluster() {
    let cluster = RedisCluster::start();
    keeps_the_contract(Backend::Redis { name: "redis cluster", url: cluster.url() }).await;
}
