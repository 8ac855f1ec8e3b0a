//! Lease mode (`store.counting: lease`, `tollgate::store::lease`) on a real
//! `redis-server`: several [`LeaseStore`]s over one Redis stand for several
//! replicas. Never over a limit, under-use within the stated bound
//! `R · (max_block + max(max_block / 4, cost) − 1)`, exactly the limit once leases go back; then
//! whole servers in lease mode (shutdown gives leases back; Redis calls per Check).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tollgate::config::{Backend, CacheConfig, Counting, LeaseConfig, OnError, StoreConfig, StoreUrl};
use tollgate::entitlement::{Period, Quota, Window};
use tollgate::store::{self, LeaseStore, RedisStore, Store, StoreError};
use tollgate::usage::Spend;
use tollgate_testkit::process::TollgateProcess;
use tollgate_testkit::redis::RedisServer;
use tollgate_testkit::{Answer, TestServer, allowed_else, eventually, http_check, http_get, spec_config, spread};

const ACCT: &str = "acct_lease";

fn month(limit: u64) -> Quota {
    Quota { meter: "requests".into(), limit, window: Window::Calendar(Period::Month), ceiling: None }
}

fn spend(quotas: &[Quota], cost: u64, now: DateTime<Utc>) -> Spend {
    Spend { account: ACCT.into(), quotas: quotas.into(), cost, credits: None, now, dry_run: false, shadow: false }
}

fn config(max_block: u64, replicas: u64, idle: Duration) -> LeaseConfig {
    LeaseConfig { max_block, replicas, idle, max_accounts: 1000, lifetime: Duration::from_secs(300) }
}

fn redis(url: &str, prefix: &str) -> Arc<RedisStore> {
    Arc::new(RedisStore::open(url, prefix, Duration::from_secs(5)).unwrap())
}

/// `n` replicas in lease mode over one Redis, under `prefix`.
fn replicas(url: &str, prefix: &str, n: usize, lease: LeaseConfig) -> Vec<Arc<LeaseStore>> {
    (0..n).map(|_| LeaseStore::new(redis(url, prefix), lease).unwrap()).collect()
}

/// The counter (spent + leased) Redis holds for `q` now.
fn counter(server: &RedisServer, prefix: &str, q: &Quota, now: DateTime<Utc>) -> u64 {
    let key = redis(&server.url(), prefix).counter_key(ACCT, q, now).unwrap();
    server.cli(&["GET", &key]).unwrap().trim().parse().unwrap_or(0)
}

/// `n` concurrent spends of `cost`, spread round-robin over `stores`; how many units were allowed.
async fn burst(stores: &[Arc<LeaseStore>], quotas: &[Quota], cost: u64, n: usize) -> u64 {
    burst_of(stores, &spend(quotas, cost, Utc::now()), cost, n).await
}

/// `n` concurrent copies of `s`, each worth `units`, spread round-robin over
/// `stores`; how many units were allowed.
async fn burst_of(stores: &[Arc<LeaseStore>], s: &Spend, units: u64, n: usize) -> u64 {
    let allowed = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (store, allowed, s) = (stores[i % stores.len()].clone(), allowed.clone(), s.clone());
            tokio::spawn(async move {
                if store.spend(&s).await.unwrap().spent {
                    allowed.fetch_add(units, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    allowed.load(Ordering::Relaxed)
}

/// Gives every lease back and bursts again (at most five rounds: a burst can
/// end with a replica holding units its share of requests did not use) until
/// `want` units went; never past it. The total allowed.
async fn until_given_back(stores: &[Arc<LeaseStore>], q: &[Quota], cost: u64, mut total: u64, want: u64) -> u64 {
    for _ in 0..5 {
        for s in stores {
            s.release().await;
        }
        total += burst(stores, q, cost, 300).await;
        assert!(total <= want, "{total} went, more than {want}");
        if total == want {
            break;
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_never_allow_more_than_the_limit_and_reach_it_exactly_once_leases_go_back() {
    let server = RedisServer::start();
    let (max_block, r) = (50, 3);
    let stores = replicas(&server.url(), "three:", r, config(max_block, r as u64, Duration::from_secs(60)));
    let q = [month(1000)];
    let allowed = burst(&stores, &q, 1, 3000).await;
    let bound = r as u64 * (max_block + max_block / 4);
    assert!(allowed <= 1000, "allowed {allowed} > the limit");
    assert!(allowed >= 1000 - bound, "allowed {allowed}: under-use above the bound {bound}");
    assert_eq!(counter(&server, "three:", &q[0], Utc::now()), 1000, "spent + leased is the limit");
    let total = until_given_back(&stores, &q, 1, allowed, 1000).await;
    assert_eq!(total, 1000, "the given-back units went exactly");
    assert_eq!(counter(&server, "three:", &q[0], Utc::now()), 1000);
    let stats = stores[0].stats();
    assert!(stats.redis_calls < stats.spends, "leases save Redis calls: {stats:?}");
}

/// A spend of `credits` credits and no quota.
fn credit_spend(credits: u64) -> Spend {
    Spend {
        account: ACCT.into(),
        quotas: Default::default(),
        cost: 1,
        credits: Some(credits),
        now: Utc::now(),
        dry_run: false,
        shadow: false,
    }
}

/// The free balance Redis holds (credits neither spent nor leased).
fn balance(server: &RedisServer, prefix: &str) -> i64 {
    let key = redis(&server.url(), prefix).credits_key(ACCT).unwrap();
    server.cli(&["GET", &key]).unwrap().trim().parse().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_spend_credits_never_below_zero_and_exactly_to_zero_once_leases_go_back() {
    let server = RedisServer::start();
    let (max_block, r) = (50, 3);
    let stores = replicas(&server.url(), "wallet:", r, config(max_block, r as u64, Duration::from_secs(60)));
    stores[0].set_credits(ACCT, 1000).await.unwrap();
    let allowed = burst_of(&stores, &credit_spend(1), 1, 3000).await;
    let bound = r as u64 * (max_block + max_block / 4);
    assert!(allowed <= 1000, "spent {allowed} of 1000 credits");
    assert!(allowed >= 1000 - bound, "spent {allowed}: under-use above the bound {bound}");
    assert!(balance(&server, "wallet:") >= 0);
    let mut total = allowed;
    for _ in 0..5 {
        for s in &stores {
            s.release().await;
        }
        total += burst_of(&stores, &credit_spend(1), 1, 300).await;
        assert!(total <= 1000, "{total} spent");
        if total == 1000 {
            break;
        }
    }
    assert_eq!(total, 1000, "every credit went, none twice");
    for s in &stores {
        s.release().await;
    }
    assert_eq!(balance(&server, "wallet:"), 0, "exactly 0 at the end");
    assert_eq!(stores[1].credits(ACCT).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_credits_counts_what_replicas_hold_so_the_account_gets_at_most_the_new_credits() {
    let server = RedisServer::start();
    let stores = replicas(&server.url(), "set:", 2, config(40, 1, Duration::from_secs(60)));
    stores[0].set_credits(ACCT, 500).await.unwrap();
    let spent = burst_of(&stores, &credit_spend(1), 1, 20).await;
    assert_eq!(spent, 20);
    assert!(stores.iter().all(|s| s.stats().outstanding > 0), "both replicas hold credits");
    // Set on replica 0 while replica 1 still holds a lease (it hears nothing:
    // no subscription here), then spend everything there is.
    stores[0].set_credits(ACCT, 100).await.unwrap();
    assert_eq!(stores[0].credits(ACCT).await.unwrap(), 100, "what replica 1 holds counts among the 100");
    let mut total = 0;
    for _ in 0..5 {
        total += burst_of(&stores, &credit_spend(1), 1, 150).await;
        assert!(total <= 100, "{total} spent after setting 100");
        for s in &stores {
            s.release().await;
        }
    }
    // Replica 1's record overstates what it held by what it had spent since
    // its take: those units count among the 100 (under-use, never over).
    assert!(total >= 100 - 40, "{total}: at most one block is lost");
    assert_eq!(balance(&server, "set:"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_shrink_near_the_limit_so_costs_above_one_go_exactly_too() {
    let server = RedisServer::start();
    let stores = replicas(&server.url(), "cost:", 2, config(1000, 2, Duration::from_secs(60)));
    let q = [month(997)];
    let allowed = burst(&stores, &q, 3, 600).await;
    assert!(allowed <= 997, "allowed {allowed}");
    let total = until_given_back(&stores, &q, 3, allowed, 996).await;
    assert_eq!(total, 996, "every whole cost of 3 that fits in 997");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_leases_go_back_by_themselves() {
    let server = RedisServer::start();
    let stores = replicas(&server.url(), "idle:", 1, config(100, 1, Duration::from_millis(200)));
    let q = [month(1000)];
    assert!(stores[0].spend(&spend(&q, 1, Utc::now())).await.unwrap().spent);
    assert!(counter(&server, "idle:", &q[0], Utc::now()) > 1, "a block was leased");
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while counter(&server, "idle:", &q[0], Utc::now()) != 1 {
        assert!(std::time::Instant::now() < deadline, "the idle lease never went back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stores[0].stats().outstanding, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_strands_at_most_its_lease_until_the_window_ends() {
    let server = RedisServer::start();
    let lease = config(40, 2, Duration::from_secs(60));
    let q = [month(100)];
    let now = Utc::now();
    let killed = LeaseStore::new(redis(&server.url(), "kill:"), lease).unwrap();
    assert!(killed.spend(&spend(&q, 1, now)).await.unwrap().spent);
    let stranded = counter(&server, "kill:", &q[0], now) - 1;
    assert!((1..=40).contains(&stranded), "it held one block: {stranded}");
    drop(killed); // no give-back, as after SIGKILL
    let other = replicas(&server.url(), "kill:", 1, lease);
    let allowed = burst(&other, &q, 1, 200).await;
    assert_eq!(allowed, 100 - 1 - stranded, "only the killed replica's lease is stranded");
    // A new window is a new counter: everything is back.
    let next = "2099-01-01T00:00:00Z".parse().unwrap();
    let mut fresh = 0;
    for _ in 0..150 {
        fresh += u64::from(other[0].spend(&spend(&q, 1, next)).await.unwrap().spent);
    }
    assert_eq!(fresh, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spend_answer_never_claims_more_remaining_than_truly_remains() {
    let server = RedisServer::start();
    let stores = replicas(&server.url(), "honest:", 2, config(100, 1, Duration::from_secs(60)));
    let q = [month(300)];
    let now = Utc::now();
    for i in 0..50 {
        let a = stores[i % 2].spend(&spend(&q, 1, now)).await.unwrap();
        assert!(a.spent);
        // Truly remaining: the free units plus every replica's unspent lease.
        let free = 300 - counter(&server, "honest:", &q[0], now);
        let held: u64 = stores.iter().map(|s| s.stats().outstanding).sum();
        assert!(300 - a.quotas[0].used <= free + held, "claims {} remaining", 300 - a.quotas[0].used);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_0_spend_fits_like_in_exact_mode_and_reports_the_true_usage() {
    let server = RedisServer::start();
    let stores = replicas(&server.url(), "zero:", 1, config(100, 1, Duration::from_secs(60)));
    let q = [month(10)];
    let now = Utc::now();
    let a = stores[0].spend(&spend(&q, 0, now)).await.unwrap();
    assert!(a.spent && !a.quotas[0].exceeded && a.quotas[0].used == 0, "{a:?}");
    assert!(stores[0].spend(&spend(&q, 1, now)).await.unwrap().spent);
    let a = stores[0].spend(&spend(&q, 0, now)).await.unwrap();
    assert!(a.spent && a.quotas[0].used >= 1, "spent + leased, never less than spent: {a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_a_replica_answers_from_its_lease_then_fails() {
    let mut server = RedisServer::start();
    let stores = replicas(&server.url(), "down:", 1, config(10, 1, Duration::from_secs(60)));
    let q = [month(1000)];
    let now = Utc::now();
    assert!(stores[0].spend(&spend(&q, 1, now)).await.unwrap().spent);
    let held = stores[0].stats().outstanding;
    assert!(held > 0);
    server.kill();
    let calls = stores[0].stats().redis_calls;
    for _ in 0..held {
        assert!(stores[0].spend(&spend(&q, 1, now)).await.unwrap().spent, "served from the lease");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Running low asked for the next block once; after it failed, no more.
    assert!(stores[0].stats().redis_calls - calls <= 1, "{:?}", stores[0].stats());
    let err = stores[0].spend(&spend(&q, 1, now)).await.unwrap_err();
    assert!(err.is_transient(), "then store.on_error applies: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_lease_record_is_a_store_error_not_a_grant() {
    let server = RedisServer::start();
    let stores = replicas(&server.url(), "corrupt:", 1, config(10, 1, Duration::from_secs(60)));
    let q = [month(1000)];
    let now = Utc::now();
    let key = redis(&server.url(), "corrupt:").counter_key(ACCT, &q[0], now).unwrap();
    server.cli(&["HSET", &format!("{key}:leases"), "someone", "lots"]).unwrap();
    server.cli(&["SET", &key, "12"]).unwrap();
    // The other holder's record is not read on a take; our own is.
    assert!(stores[0].spend(&spend(&q, 1, now)).await.unwrap().spent);
    server.cli(&["DEL", &format!("{key}:leases")]).unwrap();
    server.cli(&["SET", &key, "x"]).unwrap();
    for _ in 0..10 {
        match stores[0].spend(&spend(&q, 1, now)).await {
            Ok(a) => assert!(a.spent, "from the lease held"),
            Err(e) => {
                assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
                return;
            }
        }
    }
    panic!("a corrupt counter was never reported");
}

fn store_config(url: &str, prefix: &str, lease: LeaseConfig) -> StoreConfig {
    StoreConfig {
        backend: Backend::Redis,
        url: StoreUrl(url.into()),
        on_error: OnError::Deny,
        timeout: Duration::from_secs(5),
        key_prefix: prefix.into(),
        counting: Counting::Lease,
        lease,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_on_one_replica_lets_a_request_through_on_another_within_a_second() {
    let server = RedisServer::start();
    // Marks live a minute: only the published change can clear them in time.
    let c = store_config(&server.url(), "topup:", config(5, 2, Duration::from_secs(60)));
    let cache = CacheConfig { ttl: Duration::from_secs(60), negative_ttl: Duration::from_secs(60), max_bytes: 1 << 20 };
    let a = store::open(&c, &cache, Arc::new(|_| {})).unwrap();
    let b = store::open(&c, &cache, Arc::new(|_| {})).unwrap();
    let q = [month(20)];
    let now = Utc::now();
    let mut allowed = 0;
    for i in 0..60 {
        let s = if i % 2 == 0 { &a } else { &b };
        allowed += u64::from(s.spend(&spend(&q, 1, now)).await.unwrap().spent);
    }
    assert_eq!(allowed, 20);
    assert!(!b.spend(&spend(&q, 1, now)).await.unwrap().spent, "b knows the quota is exhausted");
    // Let both subscriptions settle before the change is published.
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.reset_usage(ACCT, &q, now).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while !b.spend(&spend(&q, 1, now)).await.unwrap().spent {
        assert!(tokio::time::Instant::now() < deadline, "the reset did not reach b within a second");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- whole servers

/// The spec config on Redis in lease mode, the pro plan's month quota at `limit`.
fn lease_yaml(url: &str, limit: u64) -> String {
    spec_config().replace(
        "{ meter: requests, limit: 1000000, period: month }",
        &format!("{{ meter: requests, limit: {limit}, period: month }}"),
    ) + &format!(
        "store: {{ backend: redis, url: \"{url}\", timeout: 5s, counting: lease, lease: {{ max_block: 10, replicas: 2 }} }}\n"
    )
}

fn month_counter(server: &RedisServer) -> u64 {
    let (start, _) = Period::Month.bounds(Utc::now());
    let key = format!("tollgate:{{acct_pro}}:q:requests:month:{}", start.timestamp_millis());
    server.cli(&["GET", &key]).unwrap().trim().parse().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_lease_servers_allow_at_most_the_limit_and_give_leases_back_on_shutdown() {
    let redis = RedisServer::start();
    let yaml = lease_yaml(&redis.url(), 100);
    let first = TestServer::start_configured(&yaml, true).await;
    assert!(Answer::of(&first.check(http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await).allowed);
    assert_eq!(month_counter(&redis), 10, "a block of max_block was leased");
    first.stop().await;
    assert_eq!(month_counter(&redis), 1, "SIGTERM gave back all but the unit spent");
    let a = TestServer::start_configured(&yaml, false).await;
    let b = TestServer::start_configured(&yaml, false).await;
    let channels = [a.channel().await, b.channel().await];
    let answers = spread(&channels, 300, http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await;
    let allowed = allowed_else(&answers, "quota_exhausted") as u64;
    assert!(
        (99 - 22..=99).contains(&allowed),
        "allowed {allowed} of 99 (bound R · (max_block + max(max_block / 4, 1) − 1) = 22)"
    );
    a.stop().await;
    b.stop().await;
    assert_eq!(month_counter(&redis), 1 + allowed, "after SIGTERM the counter holds exactly what was spent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_lease_mode_fifty_checks_cost_a_handful_of_redis_calls() {
    let redis = RedisServer::start();
    let s = TestServer::start_configured(&lease_yaml(&redis.url(), 1_000_000), true).await;
    assert!(Answer::of(&s.check(http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await).allowed);
    let monitor = redis.monitor();
    let mut client = s.client().await;
    for _ in 0..50 {
        let r = client.check(http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await.unwrap();
        assert!(Answer::of(r.get_ref()).allowed);
    }
    let sent: Vec<String> = monitor.stop().into_iter().filter(|c| c != "ping").collect();
    assert!(sent.len() <= 5, "blocks of 10: {sent:?}");
    let (_, _, body) = http_get(s.http, "/metrics").await.unwrap();
    for needle in ["tollgate_lease_spends_total 51", "tollgate_leases_total{result=\"taken\"} 6"] {
        assert!(body.contains(needle), "{needle} in {body}");
    }
    s.stop().await;
}

// ---------------------------------------------------------------- the script

/// `EVAL script numkeys keys... args...` through redis-cli; the reply as text.
fn eval(r: &RedisServer, keys: &[&str], args: &[&str]) -> String {
    let n = keys.len().to_string();
    let mut argv = vec!["EVAL", tollgate::store::redis::lua::LEASE, &n];
    argv.extend(keys);
    argv.extend(args);
    r.cli(&argv).unwrap_or_default()
}

#[tokio::test]
async fn the_lease_script_refuses_bad_arguments_and_corrupt_records_before_writing() {
    let r = RedisServer::start();
    let (counter, leases) = ("t:{acct_x}:q:requests:month:0", "t:{acct_x}:q:requests:month:0:leases");
    let keys = [counter, leases];
    r.cli(&["SET", counter, "5"]).unwrap();
    let end = (Utc::now() + chrono::Duration::days(1)).timestamp_millis().to_string();
    let take = ["take", "q", "me", "100", "1", "10", "2", end.as_str(), "0", "30000"];
    let words = |reply: String| reply.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(words(eval(&r, &keys, &take)), ["10", "15", "0"], "a good take grants");
    let record = r.cli(&["HGET", leases, "me"]).unwrap();
    assert!(record.trim().starts_with("10:"), "units:deadline, {record}");
    assert_eq!(words(eval(&r, &keys, &["give", "q", "me", "10"])), ["10", "5", "0"], "a give takes it back");
    assert_eq!(words(eval(&r, &keys, &["give", "q", "me", "10"])), ["0", "5", "0"], "once");
    for bad in ["1.5", "-1", "1e3", " 1", "", "18446744073709551615", "nan"] {
        for i in 3..10 {
            let mut args = take;
            args[i] = bad;
            let reply = eval(&r, &keys, &args);
            assert!(reply.contains("TOLLGATE_BADARG"), "{args:?}: {reply}");
        }
        assert!(eval(&r, &keys, &["give", "q", "me", bad]).contains("TOLLGATE_BADARG"));
        assert!(eval(&r, &keys, &["reset", bad]).contains("TOLLGATE_BADARG"));
        assert!(eval(&r, &keys, &["cset", bad]).contains("TOLLGATE_BADARG"));
    }
    let (mut no_divisor, mut no_lifetime, mut no_kind) = (take, take, take);
    no_divisor[6] = "0";
    no_lifetime[9] = "0";
    no_kind[1] = "x";
    let long = "h".repeat(65);
    let mut long_holder = take;
    long_holder[2] = &long;
    for args in [
        &["take", "q", "", "100", "1", "10", "2", &end, "0", "30000"][..],
        &no_divisor,
        &no_lifetime,
        &no_kind,
        &long_holder,
        &["take", "q", "me"],
        &["lend", "me", "1"],
        &["give", "q", "", "1"],
    ] {
        let reply = eval(&r, &keys, args);
        assert!(reply.contains("TOLLGATE_BADARG"), "{args:?}: {reply}");
    }
    // Claiming more than the live record: forfeit (kept 0), never granted.
    let mut holds_more = take;
    holds_more[8] = "3";
    assert_eq!(words(eval(&r, &keys, &holds_more)), ["10", "15", "0"], "the claim is not kept");
    assert_eq!(words(eval(&r, &keys, &["give", "q", "me", "10"])), ["10", "5", "0"]);
    // A record above its counter, or one that is not units:deadline: corrupt.
    let far = format!("7:{end}");
    r.cli(&["HSET", leases, "me", &far]).unwrap();
    assert!(eval(&r, &keys, &["give", "q", "me", "7"]).contains("TOLLGATE_CORRUPT"));
    for junk in ["lots", "5", "5:", ":5", "-5:9", "5:9:9"] {
        r.cli(&["HSET", leases, "me", junk]).unwrap();
        assert!(eval(&r, &keys, &take).contains("TOLLGATE_CORRUPT"), "{junk}");
        assert!(eval(&r, &keys, &["give", "q", "me", "1"]).contains("TOLLGATE_CORRUPT"), "{junk}");
        assert!(eval(&r, &keys, &["reset", &end]).contains("TOLLGATE_CORRUPT"), "{junk}");
    }
    assert_eq!(r.cli(&["GET", counter]).unwrap().trim(), "5", "nothing was written");
    assert_eq!(r.cli(&["HGET", leases, "me"]).unwrap().trim(), "5:9:9");
    // A balance: a take moves credits out of it, cset counts live leases.
    let (credits, cleases) = ("t:{acct_x}:credits", "t:{acct_x}:credits:leases");
    let ckeys = [credits, cleases];
    r.cli(&["SET", credits, "100"]).unwrap();
    let ctake = ["take", "c", "me", "0", "1", "30", "2", "0", "0", "30000"];
    assert_eq!(words(eval(&r, &ckeys, &ctake)), ["30", "70", "0"]);
    assert_eq!(words(eval(&r, &ckeys, &["cget"])), ["30", "70", "0"]);
    assert_eq!(words(eval(&r, &ckeys, &["cset", "50"])), ["30", "20", "0"], "50 in all, 30 of them leased");
    assert_eq!(words(eval(&r, &ckeys, &["give", "c", "me", "30"])), ["30", "50", "0"], "back to the balance");
    assert_eq!(words(eval(&r, &ckeys, &ctake)), ["25", "25", "0"]);
    // Setting less than the leases hold voids them: their give-backs return nothing.
    assert_eq!(words(eval(&r, &ckeys, &["cset", "10"])), ["0", "10", "0"], "the leases are void");
    assert_eq!(words(eval(&r, &ckeys, &["give", "c", "me", "25"])), ["0", "10", "0"], "so exactly 10 remain");
    // A renewal (need 0) tops a holder up to one block at most; max block 0 takes nothing.
    let mut renew = ctake;
    renew[4] = "0";
    renew[5] = "0";
    assert_eq!(words(eval(&r, &ckeys, &renew)), ["0", "10", "0"]);
    r.cli(&["SET", credits, "-3"]).unwrap();
    assert!(eval(&r, &ckeys, &ctake).contains("TOLLGATE_CORRUPT"), "a negative balance");
}

/// An expired record gives nothing back and is not counted: a crashed
/// holder's units stay spent (never over), and a reset or SetCredits stops
/// counting them once their lifetime is over.
#[tokio::test]
async fn expired_lease_records_are_forfeit_and_no_longer_counted() {
    let r = RedisServer::start();
    let (credits, cleases) = ("t:{acct_x}:credits", "t:{acct_x}:credits:leases");
    let ckeys = [credits, cleases];
    r.cli(&["SET", credits, "100"]).unwrap();
    let words = |reply: String| reply.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    let ctake =
        |holder: &'static str, lifetime: &'static str| ["take", "c", holder, "0", "1", "30", "2", "0", "0", lifetime];
    assert_eq!(words(eval(&r, &ckeys, &ctake("dead", "200"))), ["30", "70", "0"]);
    assert_eq!(words(eval(&r, &ckeys, &ctake("live", "60000"))), ["30", "40", "0"]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(words(eval(&r, &ckeys, &["cget"])), ["30", "40", "0"], "only the live lease counts");
    assert_eq!(words(eval(&r, &ckeys, &["give", "c", "dead", "30"])), ["0", "40", "0"], "nothing comes back");
    let mut renew = ctake("dead", "60000");
    renew[8] = "30";
    assert_eq!(words(eval(&r, &ckeys, &renew)), ["20", "20", "0"], "a late renewal keeps nothing, takes anew");
    assert_eq!(words(eval(&r, &ckeys, &["cset", "100"])), ["50", "50", "0"], "set counts the live leases");
}

/// Give-backs churning under spends (invalidations, releases) leave the
/// counter exactly what was spent and no lease record behind, so nothing is
/// stranded and a reset cannot forget units a replica still holds. (The
/// take/give-back interleaving the account lock now prevents did not show
/// here on one multiplexed connection, which keeps commands in order; this
/// pins the outcome, not the race.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn give_backs_racing_spends_leave_the_counter_exact() {
    let server = RedisServer::start();
    let prefix = "race";
    let q = [month(1_000_000)];
    let stores = replicas(&server.url(), prefix, 1, config(50, 1, Duration::from_secs(60)));
    let store = stores[0].clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && n < 2_000 {
                store.invalidate(&store::Invalidation::Account(ACCT.into())).await;
                store.release().await;
                n += 1;
                tokio::task::yield_now().await;
            }
        })
    };
    let mut spent = 0;
    for _ in 0..10 {
        spent += burst(&stores, &q, 1, 200).await;
    }
    stop.store(true, Ordering::Relaxed);
    churn.await.unwrap();
    store.release().await;
    let now = Utc::now();
    assert_eq!(spent, 2_000, "far from the limit, every spend goes");
    assert_eq!(counter(&server, prefix, &q[0], now), spent, "the counter is exactly what was spent");
    let key = redis(&server.url(), prefix).counter_key(ACCT, &q[0], now).unwrap();
    assert_eq!(server.cli(&["HLEN", &format!("{key}:leases")]).unwrap().trim(), "0", "no lease record is left");
}

fn config_lifetime(max_block: u64, lifetime: Duration) -> LeaseConfig {
    LeaseConfig { lifetime, ..config(max_block, 1, Duration::from_secs(60)) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_renewed_while_in_use_and_forfeit_once_its_record_expired() {
    let server = RedisServer::start();
    // Renewed: a spend past half the lifetime (but before 9/10 of it) pays at
    // once and renews in the background, keeping what it holds.
    let renewing = replicas(&server.url(), "renew:", 1, config_lifetime(20, Duration::from_secs(2))).remove(0);
    renewing.set_credits(ACCT, 1000).await.unwrap();
    assert!(renewing.spend(&credit_spend(1)).await.unwrap().spent);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let calls = renewing.stats().redis_calls;
    assert!(renewing.spend(&credit_spend(1)).await.unwrap().spent);
    eventually("the renewal", Duration::from_secs(2), async || renewing.stats().redis_calls == calls + 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(renewing.stats().redis_calls, calls + 1, "one renewal");
    assert_eq!(renewing.stats().expired, 0, "nothing was forfeit");
    assert_eq!(renewing.stats().outstanding, 20, "topped up to one block (20), not by one more block");
    renewing.release().await;
    assert_eq!(balance(&server, "renew:"), 998, "exactly the two spent are gone");

    // Expired: the record outlived, the units it held are forfeit (never spent twice).
    let stores = replicas(&server.url(), "expire:", 2, config_lifetime(20, Duration::from_secs(1)));
    stores[0].set_credits(ACCT, 1000).await.unwrap();
    for s in &stores {
        assert!(s.spend(&credit_spend(1)).await.unwrap().spent);
    }
    // stores[1] is never used again: as if killed, its lease is never given back.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(stores[0].spend(&credit_spend(1)).await.unwrap().spent);
    assert_eq!(stores[0].stats().expired, 1, "its own expired lease was forfeit");
    stores[0].release().await;
    assert_eq!(
        stores[0].credits(ACCT).await.unwrap(),
        u64::try_from(balance(&server, "expire:")).unwrap(),
        "expired records are not counted"
    );
    assert_eq!(balance(&server, "expire:"), 1000 - 3 - 19 - 19, "three spent, two blocks' rest forfeit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_on_one_replica_lets_a_credit_spend_through_on_another_within_a_second() {
    let server = RedisServer::start();
    let c = store_config(&server.url(), "credit-topup:", config(5, 2, Duration::from_secs(60)));
    let cache = CacheConfig { ttl: Duration::from_secs(60), negative_ttl: Duration::from_secs(60), max_bytes: 1 << 20 };
    let a = store::open(&c, &cache, Arc::new(|_| {})).unwrap();
    let b = store::open(&c, &cache, Arc::new(|_| {})).unwrap();
    a.set_credits(ACCT, 6).await.unwrap();
    let mut spent = 0;
    for i in 0..30 {
        let s = if i % 2 == 0 { &a } else { &b };
        spent += u64::from(s.spend(&credit_spend(1)).await.unwrap().spent);
    }
    assert!(spent <= 6, "{spent}");
    let refused = b.spend(&credit_spend(1)).await.unwrap();
    assert!(!refused.spent && refused.credits.is_some_and(|c| !c.sufficient), "b knows the balance is short");
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.add_credits(ACCT, 10).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while !b.spend(&credit_spend(1)).await.unwrap().spent {
        assert!(tokio::time::Instant::now() < deadline, "the top-up did not reach b within a second");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The spec config on Redis in lease mode with the pro plan's quota at
/// `limit` per minute, listening where `TollgateProcess` says.
fn minute_yaml(url: &str, limit: u64) -> String {
    lease_yaml(url, limit)
        .replace(&format!("limit: {limit}, period: month"), &format!("limit: {limit}, period: minute"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_replica_strands_at_most_its_block_and_the_units_come_back_with_the_next_window() {
    let redis = RedisServer::start();
    // A minute quota; start early in a minute so the steps below fit in it.
    let into_minute = Utc::now().timestamp() % 60;
    if into_minute > 40 {
        tokio::time::sleep(Duration::from_secs(61 - into_minute as u64)).await;
    }
    let minute = Utc::now().timestamp() / 60;
    let yaml = minute_yaml(&redis.url(), 100);
    let survivor = TestServer::start_configured(&yaml, true).await;
    let bin = env!("CARGO_BIN_EXE_tollgate");
    let mut killed = TollgateProcess::start(bin, &[], |grpc, http| {
        yaml.clone() + &format!("server: {{ grpc_listen: \"{grpc}\", http_listen: \"{http}\" }}\n")
    })
    .await;
    let pro = || http_check("GET", "/v1/search", &[("x-api-key", "pro-key")]);
    let mut client = AuthorizationClient::new(tollgate_testkit::server::channel(killed.grpc).await);
    assert!(Answer::of(client.check(pro()).await.unwrap().get_ref()).allowed);
    let counter = || {
        let (start, _) = Period::Minute.bounds(Utc::now());
        let key = format!("tollgate:{{acct_pro}}:q:requests:minute:{}", start.timestamp_millis());
        redis.cli(&["GET", &key]).unwrap().trim().parse::<u64>().unwrap_or(0)
    };
    let stranded = counter() - 1;
    assert!((1..=10).contains(&stranded), "it holds the rest of one block (max_block 10): {stranded}");
    killed.child.kill().unwrap(); // SIGKILL: no give-back
    killed.child.wait().unwrap();
    let channels = [survivor.channel().await];
    let allowed = spread(&channels, 150, pro()).await.into_iter().filter(|a| a.allowed).count() as u64;
    assert_eq!(Utc::now().timestamp() / 60, minute, "the test ran over a minute boundary");
    assert_eq!(allowed, 100 - 1 - stranded, "only the killed replica's block is missing");
    // The next window is a new counter: all 100 are back.
    let next_ms = (minute + 1) * 60_000;
    tokio::time::sleep(Duration::from_millis(
        u64::try_from(next_ms - Utc::now().timestamp_millis()).unwrap_or(0) + 200,
    ))
    .await;
    let allowed = spread(&channels, 150, pro()).await.into_iter().filter(|a| a.allowed).count();
    assert_eq!(allowed, 100, "the stranded units came back with the window");
    survivor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_and_top_ups_never_hold_more_than_the_stated_bound() {
    let server = RedisServer::start();
    let max_block = 20;
    let store = replicas(&server.url(), "bound:", 1, config_lifetime(max_block, Duration::from_millis(1000))).remove(0);
    store.set_credits(ACCT, 100_000).await.unwrap();
    let q = [month(100_000)];
    let both = |now| Spend { credits: Some(1), ..spend(&q, 1, now) };
    // Two leases per spend (the quota's and the credits'), renewals every
    // 500 ms, top-ups below a quarter block: each lease stays within
    // max_block + max(max_block / 4, need) − 1.
    let bound = 2 * (max_block + max_block / 4 - 1);
    for i in 0..150 {
        assert!(store.spend(&both(Utc::now())).await.unwrap().spent, "spend {i}");
        tokio::time::sleep(Duration::from_millis(10)).await;
        let held = store.stats().outstanding;
        assert!(held <= bound, "spend {i}: {held} held, above {bound}");
    }
    assert!(store.stats().taken > 10, "renewals and top-ups happened: {:?}", store.stats());
}
