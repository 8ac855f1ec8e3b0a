//! Adversarial spends, balances and stored records against both stores (the
//! memory store and a real `redis-server`), through the public `Store` trait:
//! costs that would wrap, balances that would overflow or turn into floats,
//! partly exhausted multi-quota spends, records and counters written by
//! someone else, and the Lua scripts called directly with bad arguments.
//! Nothing may wrap, panic, reset a quota, or write half of anything.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tollgate::entitlement::{Period, Quota, Window};
use tollgate::store::redis::lua;
use tollgate::store::{MemoryStore, RedisStore, Store, StoreError};
use tollgate::usage::{MAX_COST, MAX_CREDITS, MAX_LIMIT, Spend, SpendAnswer};
use tollgate_testkit::redis::RedisServer;

/// One store under attack; `redis` is set for the Redis one (to look at its keys).
struct Backend {
    name: &'static str,
    store: Arc<dyn Store>,
    redis: Option<RedisServer>,
}

impl Backend {
    fn memory() -> Self {
        Self { name: "memory", store: Arc::new(MemoryStore::new()), redis: None }
    }

    fn redis() -> Self {
        let server = RedisServer::start();
        let store = RedisStore::open(&server.url(), "tollgate:", Duration::from_secs(5)).expect("open redis store");
        Self { name: "redis", store: Arc::new(store), redis: Some(server) }
    }

    fn both() -> [Self; 2] {
        [Self::memory(), Self::redis()]
    }

    /// `redis-cli GET key` (trimmed), on the Redis backend only.
    fn get(&self, key: &str) -> Option<String> {
        self.redis.as_ref().map(|r| r.cli(&["GET", key]).unwrap_or_default().trim().to_owned())
    }
}

fn month() -> Quota {
    Quota { meter: "requests".into(), limit: 3, window: Window::Calendar(Period::Month), ceiling: None }
}

fn rate(limit: u64) -> Quota {
    Quota { meter: "requests".into(), limit, window: Window::Rolling(Duration::from_secs(3600)), ceiling: None }
}

fn spend(quotas: &[Quota], cost: u64, credits: Option<u64>) -> Spend {
    Spend {
        account: "acct_x".into(),
        quotas: quotas.into(),
        cost,
        credits,
        now: Utc::now(),
        dry_run: false,
        shadow: false,
    }
}

/// How the quotas and balance stand, read with a dry run of cost 0 (which spends nothing).
async fn state(b: &Backend, quotas: &[Quota]) -> (Vec<u64>, u64) {
    let mut probe = spend(quotas, 0, Some(0));
    probe.dry_run = true;
    let a = b.store.spend(&probe).await.unwrap_or_else(|e| panic!("{}: {e}", b.name));
    (a.quotas.iter().map(|q| q.used).collect(), a.credits.map_or(0, |c| c.balance))
}

async fn try_spend(b: &Backend, s: &Spend) -> SpendAnswer {
    b.store.spend(s).await.unwrap_or_else(|e| panic!("{}: {e}", b.name))
}

const HUGE_COSTS: [u64; 6] = [u64::MAX, u64::MAX - 2, MAX_COST + 1, i64::MAX as u64, 1 << 63, (1 << 53) + 1];

#[tokio::test]
async fn huge_costs_never_wrap_and_never_reset_an_exhausted_quota() {
    for b in Backend::both() {
        for quota in [month(), rate(3)] {
            let q = [quota.clone()];
            assert!(try_spend(&b, &spend(&q, 3, None)).await.spent, "{}", b.name);
            for cost in HUGE_COSTS {
                let a = try_spend(&b, &spend(&q, cost, None)).await;
                assert!(!a.spent && a.quotas[0].exceeded, "{}: cost {cost} fit {quota:?}", b.name);
            }
            assert_eq!(state(&b, &q).await.0, vec![3], "{}: a huge cost reset {quota:?}", b.name);
            let a = try_spend(&b, &spend(&q, 1, None)).await;
            assert!(!a.spent && a.quotas[0].used == 3, "{}: still exhausted", b.name);
        }
    }
}

#[tokio::test]
async fn a_cost_of_exactly_max_cost_still_fits_a_big_enough_quota() {
    for b in Backend::both() {
        let q = [Quota { limit: MAX_LIMIT, ..month() }, Quota { limit: MAX_LIMIT, ..rate(0) }];
        let a = try_spend(&b, &spend(&q, MAX_COST, None)).await;
        assert!(a.spent, "{}", b.name);
        assert_eq!(state(&b, &q).await.0, vec![MAX_COST, MAX_COST], "{}", b.name);
        if let Some(r) = &b.redis {
            let fields = r.cli(&["--raw", "HGETALL", "tollgate:{acct_x}:rb:requests:3600000"]).unwrap();
            let parts: Vec<&str> = fields.split_whitespace().collect();
            assert!(
                parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit())),
                "rolling bucket written with integer formatting: {parts:?}"
            );
            assert_eq!(parts[1], MAX_COST.to_string());
        }
    }
}

#[tokio::test]
async fn huge_credit_costs_are_insufficient_and_never_skip_the_balance() {
    for b in Backend::both() {
        b.store.set_credits("acct_x", 10).await.unwrap();
        let q = [Quota { limit: 100, ..month() }];
        for cost in HUGE_COSTS {
            let a = try_spend(&b, &spend(&q, 1, Some(cost))).await;
            assert!(!a.spent, "{}: credit cost {cost} was skipped", b.name);
            assert_eq!(a.credits.map(|c| c.sufficient), Some(false), "{}: {cost}", b.name);
        }
        assert_eq!(state(&b, &q).await, (vec![0], 10), "{}: nothing moved", b.name);
        assert_eq!(b.store.credits("acct_x").await.unwrap(), 10);
    }
}

#[tokio::test]
async fn credits_stay_integers_near_max_credits() {
    for b in Backend::both() {
        let s = &b.store;
        assert!(matches!(s.set_credits("acct_x", 9_000_000_000_000_000_000).await, Err(StoreError::Corrupt(_))));
        assert!(matches!(s.set_credits("acct_x", MAX_CREDITS + 1).await, Err(StoreError::Corrupt(_))));
        s.set_credits("acct_x", MAX_CREDITS - 1).await.unwrap();
        assert_eq!(s.add_credits("acct_x", 1).await.unwrap(), Some(MAX_CREDITS), "{}", b.name);
        assert_eq!(s.add_credits("acct_x", 1).await.unwrap(), None, "{}: past MAX_CREDITS", b.name);
        assert_eq!(s.add_credits("acct_x", 9_000_000_000_000_000_000).await.unwrap(), None, "{}", b.name);
        assert_eq!(s.credits("acct_x").await.unwrap(), MAX_CREDITS, "{}", b.name);
        let a = try_spend(&b, &spend(&[], 1, Some(MAX_COST))).await;
        assert!(a.spent, "{}", b.name);
        assert_eq!(s.credits("acct_x").await.unwrap(), MAX_CREDITS - MAX_COST, "{}", b.name);
        if let Some(v) = b.get("tollgate:{acct_x}:credits") {
            assert!(!v.is_empty() && v.bytes().all(|c| c.is_ascii_digit()), "credits stored as {v:?}");
            assert_eq!(v, (MAX_CREDITS - MAX_COST).to_string());
        }
    }
}

#[tokio::test]
async fn add_credits_overflow_and_underflow_are_refused_with_no_change() {
    for b in Backend::both() {
        let s = &b.store;
        s.set_credits("acct_x", 5).await.unwrap();
        for delta in [i64::MAX, i64::MIN, -6, MAX_CREDITS as i64, -(MAX_CREDITS as i64) - 1] {
            assert_eq!(s.add_credits("acct_x", delta).await.unwrap(), None, "{}: delta {delta}", b.name);
        }
        assert_eq!(s.credits("acct_x").await.unwrap(), 5, "{}", b.name);
        assert_eq!(b.get("tollgate:{acct_x}:credits").as_deref().unwrap_or("5"), "5");
        assert_eq!(s.add_credits("acct_x", -5).await.unwrap(), Some(0), "{}", b.name);
    }
}

#[tokio::test]
async fn a_multi_quota_spend_with_one_quota_exhausted_moves_nothing() {
    for b in Backend::both() {
        b.store.set_credits("acct_x", 50).await.unwrap();
        let tokens = Quota { meter: "tokens".into(), limit: 100, window: Window::Calendar(Period::Day), ceiling: None };
        let q = [Quota { limit: 100, ..month() }, rate(2), tokens];
        assert!(try_spend(&b, &spend(&q, 2, Some(7))).await.spent, "{}", b.name);
        let before = state(&b, &q).await;
        assert_eq!(before, (vec![2, 2, 2], 43), "{}", b.name);
        for (cost, credits) in [(1, Some(1)), (1, None), (u64::MAX, Some(1)), (1, Some(u64::MAX))] {
            let a = try_spend(&b, &spend(&q, cost, credits)).await;
            assert!(!a.spent, "{}: cost {cost}", b.name);
            assert_eq!(state(&b, &q).await, before, "{}: cost {cost} moved something", b.name);
        }
        // Only the credits short: the quotas stay put too.
        let roomy = [Quota { limit: 100, ..month() }];
        assert!(!try_spend(&b, &spend(&roomy, 1, Some(44))).await.spent);
        assert_eq!(state(&b, &q).await, before, "{}", b.name);
    }
}

#[tokio::test]
async fn spends_at_impossible_times_or_windows_are_refused_not_panics() {
    for b in Backend::both() {
        let q = [month()];
        for now in [DateTime::<Utc>::MAX_UTC, DateTime::<Utc>::MIN_UTC] {
            let r = b.store.spend(&Spend { now, ..spend(&q, 1, None) }).await;
            assert!(matches!(r, Err(StoreError::Corrupt(_))), "{}: {now}: {r:?}", b.name);
        }
        for bad in [
            Quota { window: Window::Rolling(Duration::MAX), ..month() },
            Quota { window: Window::Rolling(Duration::from_millis(1 << 63)), ..month() },
            Quota { limit: u64::MAX, ..month() },
        ] {
            let r = b.store.spend(&spend(&[month(), bad.clone()], 1, None)).await;
            assert!(matches!(r, Err(StoreError::Corrupt(_))), "{}: {bad:?}: {r:?}", b.name);
        }
        // One counter named twice would be checked once and spent twice.
        for twice in [[month(), month()], [rate(5), Quota { limit: 9, ..rate(5) }]] {
            let r = b.store.spend(&spend(&twice, 1, None)).await;
            assert!(matches!(r, Err(StoreError::Corrupt(_))), "{}: {twice:?}: {r:?}", b.name);
        }
        assert_eq!(state(&b, &q).await.0, vec![0], "{}: nothing moved", b.name);
    }
}

/// Account records as someone with access to Redis might write them.
const CORRUPT_RECORDS: [&str; 12] = [
    // A soft quota's ceiling at or below its limit, past the largest limit, or on a rate.
    r#"{"plan":"pro","quotas":[{"meter":"requests","limit":5,"period":"month","ceiling":5}]}"#,
    r#"{"plan":"pro","quotas":[{"meter":"requests","limit":5,"period":"month","ceiling":18446744073709551615}]}"#,
    r#"{"plan":"pro","quotas":[{"meter":"requests","limit":5,"per_ms":1000,"ceiling":10}]}"#,
    r#"{"plan":"pro","quotas":[{"meter":"requests","limit":5,"period":"month","ceiling":-1}]}"#,
    r#"{"plan":"pro","quotas":[{"meter":"requests","limit":5,"per_ms":9223372036854775808}]}"#,
    r#"{"plan":"pro","quotas":[{"meter":"requests","limit":5,"per_ms":0}]}"#,
    r#"{"plan":"pro","quotas":[{"meter":"requests","limit":18446744073709551615,"period":"month"}]}"#,
    r#"{"plan":"pro","quotas":[{"meter":"requests","limit":1000000000000000001,"period":"month"}]}"#,
    r#"{"plan":"pro","past_due_since":"+200000-01-01T00:00:00Z","status":"past_due"}"#,
    r#"{"plan":"pro","past_due_since":"-0100-01-01T00:00:00Z","status":"past_due"}"#,
    r#"{"plan":"pro","expires_at":"1960-01-01T00:00:00Z"}"#,
    r#"{"plan":"pro","billing_event_ms":-9223372036854775808}"#,
];

#[tokio::test]
async fn corrupt_or_huge_stored_records_read_as_corrupt_not_panics() {
    let b = Backend::redis();
    let r = b.redis.as_ref().unwrap();
    for json in CORRUPT_RECORDS {
        r.cli(&["SET", "tollgate:{acct_x}:account", json]).unwrap();
        let got = b.store.account("acct_x").await;
        assert!(matches!(got, Err(StoreError::Corrupt(_))), "{json}: {got:?}");
    }
    r.cli(&["SET", "tollgate:{acct_x}:account", r#"{"plan":"pro"}"#]).unwrap();
    assert_eq!(&*b.store.account("acct_x").await.unwrap().unwrap().plan, "pro");
}

#[tokio::test]
async fn corrupt_counters_and_balances_fail_the_spend_before_anything_is_written() {
    let b = Backend::redis();
    let r = b.redis.as_ref().unwrap();
    let q = [Quota { limit: 100, ..month() }, rate(100)];
    b.store.set_credits("acct_x", 50).await.unwrap();
    assert!(try_spend(&b, &spend(&q, 1, Some(1))).await.spent);
    let (month_key, buckets_key) = {
        let start = Period::Month.bounds(Utc::now()).0.timestamp_millis();
        (format!("tollgate:{{acct_x}}:q:requests:month:{start}"), "tollgate:{acct_x}:rb:requests:3600000".to_owned())
    };
    let snapshot = || {
        [
            r.cli(&["GET", &month_key]).unwrap(),
            r.cli(&["HGETALL", &buckets_key]).unwrap(),
            r.cli(&["GET", "tollgate:{acct_x}:credits"]).unwrap(),
        ]
    };
    // Buckets of the current window that the real spend is not in (an hour's
    // buckets are 225 s wide: the window holds the current one and the 16 before).
    let now_bucket = Utc::now().timestamp_millis() / 225_000;
    let (bucket, older) = ((now_bucket - 2).to_string(), (now_bucket - 3).to_string());
    // Each corruption, then the spend: refused as Corrupt with every other key untouched.
    let corruptions: [(&[&str], &[&str]); 9] = [
        (&["SET", "tollgate:{acct_x}:credits", "1.8e+19"], &["SET", "tollgate:{acct_x}:credits", "49"]),
        (&["SET", "tollgate:{acct_x}:credits", "-5"], &["SET", "tollgate:{acct_x}:credits", "49"]),
        (&["SET", &month_key, "1.5"], &["SET", &month_key, "1"]),
        (&["HSET", &buckets_key, &bucket, "1e3"], &["HDEL", &buckets_key, &bucket]),
        (&["HSET", &buckets_key, &bucket, "-1"], &["HDEL", &buckets_key, &bucket]),
        (&["HSET", &buckets_key, "used", "1"], &["HDEL", &buckets_key, "used"]),
        (&["HSET", &buckets_key, "-7", "1"], &["HDEL", &buckets_key, "-7"]),
        // One value past MAX_LIMIT, then two whose sum is: counting them would lose exactness.
        (&["HSET", &buckets_key, &bucket, "1000000000000001"], &["HDEL", &buckets_key, &bucket]),
        (
            &["HSET", &buckets_key, &bucket, "600000000000000", &older, "600000000000000"],
            &["HDEL", &buckets_key, &bucket, &older],
        ),
    ];
    for (corrupt, repair) in corruptions {
        r.cli(corrupt).unwrap();
        let before = snapshot();
        let got = b.store.spend(&spend(&q, 1, Some(1))).await;
        assert!(matches!(got, Err(StoreError::Corrupt(_))), "{corrupt:?}: {got:?}");
        assert_eq!(snapshot(), before, "{corrupt:?}: the failed spend wrote something");
        r.cli(repair).unwrap();
    }
    assert!(matches!(b.store.credits("acct_x").await, Ok(49)));
    r.cli(&["SET", "tollgate:{acct_x}:credits", "1.8e+19"]).unwrap();
    assert!(matches!(b.store.credits("acct_x").await, Err(StoreError::Corrupt(_))));
    assert!(matches!(b.store.add_credits("acct_x", 1).await, Err(StoreError::Corrupt(_))));
    assert_eq!(r.cli(&["GET", "tollgate:{acct_x}:credits"]).unwrap().trim(), "1.8e+19", "add_credits wrote nothing");
}

/// `EVAL script numkeys keys... args...` through redis-cli; the reply as text.
fn eval(r: &RedisServer, script: &str, keys: &[&str], args: &[&str]) -> String {
    let n = keys.len().to_string();
    let mut argv = vec!["EVAL", script, &n];
    argv.extend(keys);
    argv.extend(args);
    r.cli(&argv).unwrap_or_default()
}

#[tokio::test]
async fn lua_scripts_called_with_bad_arguments_write_nothing() {
    let b = Backend::redis();
    let r = b.redis.as_ref().unwrap();
    r.cli(&["SET", "tollgate:{acct_x}:credits", "10"]).unwrap();
    let (counter, credits) = ("tollgate:{acct_x}:q:requests:month:0", "tollgate:{acct_x}:credits");
    let end = (Utc::now() + chrono::Duration::days(1)).timestamp_millis().to_string();
    let bad_numbers = ["1.5", "-1", "1e3", "0x10", " 1", "", "18446744073709551615", "9007199254740993", "inf", "nan"];
    for bad in bad_numbers {
        // cost, credit cost, limit and window end, one at a time.
        for (i, args) in [
            [bad, "1", "0", "1", "c", "100", end.as_str()],
            ["1", bad, "0", "1", "c", "100", end.as_str()],
            ["1", "1", "0", "1", "c", bad, end.as_str()],
            ["1", "1", "0", "1", "c", "100", bad],
        ]
        .into_iter()
        .enumerate()
        {
            if bad.is_empty() && i == 1 {
                continue; // an empty credit cost means "no credits": not an error
            }
            let reply = eval(r, lua::SPEND, &[counter, credits], &args);
            assert!(reply.contains("TOLLGATE_BADARG"), "{args:?}: {reply}");
        }
    }
    for args in [&["1", "1", "3", "1", "c", "100", &end][..], &["1", "1", "0", "1", "x", "100", &end], &["1", "1", "0"]]
    {
        let reply = eval(r, lua::SPEND, &[counter, credits], args);
        assert!(reply.contains("TOLLGATE_BADARG"), "{args:?}: {reply}");
    }
    assert_eq!(r.cli(&["EXISTS", counter]).unwrap().trim(), "0", "no counter was written");
    assert_eq!(r.cli(&["GET", credits]).unwrap().trim(), "10", "no credit was spent");

    for bad in ["1.5", "-1e3", "9000000000000000000", "1000000000000001", "--1", "+1", ""] {
        let reply = eval(r, lua::ADD_CREDITS, &[credits], &[bad]);
        assert!(reply.contains("TOLLGATE_BADARG"), "{bad}: {reply}");
    }
    assert_eq!(eval(r, lua::ADD_CREDITS, &[credits], &["1000000000000000"]).trim(), "-2", "past MAX_CREDITS");
    assert_eq!(eval(r, lua::ADD_CREDITS, &[credits], &["-11"]).trim(), "-1", "below zero");
    assert_eq!(r.cli(&["GET", credits]).unwrap().trim(), "10");

    let account = "tollgate:{acct_x}:account";
    for bad in ["1.5", "-5", "1e12", "99999999999999999"] {
        let reply = eval(r, lua::PUT_IF_NEWER, &[account], &[r#"{"plan":"pro"}"#, bad]);
        assert!(reply.contains("TOLLGATE_BADARG"), "{bad}: {reply}");
    }
    assert_eq!(r.cli(&["EXISTS", account]).unwrap().trim(), "0", "no record was written");
}

/// A client hammering a large rolling quota far past its limit: the window's
/// key stays a handful of buckets (issue 10: an exact log held one entry per
/// request, 3.5 MB at `limit: 30000, per: 1h`), and a denied spend does the
/// same fixed work at limit 1,000 as at 100,000: Redis `TIME`, one `HGETALL`
/// of at most 17 fields, nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_window_hammered_past_its_limit_keeps_bounded_state_and_bounded_deny_work() {
    let b = Backend::redis();
    let r = b.redis.as_ref().unwrap();
    let mut per_deny = Vec::new();
    for (limit, cost) in [(1_000u64, 1u64), (100_000, 10)] {
        let account = format!("acct_h{limit}");
        let q = [rate(limit)];
        // Twice the limit in units, from 8 clients at once.
        let calls = 2 * limit / cost;
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (store, s) = (b.store.clone(), Spend { account: account.as_str().into(), ..spend(&q, cost, None) });
                tokio::spawn(async move {
                    let mut allowed = 0;
                    for _ in (i..calls).step_by(8) {
                        allowed += u64::from(store.spend(&Spend { now: Utc::now(), ..s.clone() }).await.unwrap().spent);
                    }
                    allowed
                })
            })
            .collect();
        let mut allowed = 0;
        for t in tasks {
            allowed += t.await.unwrap();
        }
        assert_eq!(allowed * cost, limit, "exactly the limit fits in one window");
        let key = format!("tollgate:{{{account}}}:rb:requests:3600000");
        let fields: usize = r.cli(&["HLEN", &key]).unwrap().trim().parse().unwrap();
        let bytes: u64 = r.cli(&["MEMORY", "USAGE", &key]).unwrap().trim().parse().unwrap();
        assert!((1..=17).contains(&fields), "limit {limit}: {fields} buckets");
        assert!(bytes <= 256, "limit {limit}: the key holds {bytes} bytes");

        r.cli(&["CONFIG", "RESETSTAT"]).unwrap();
        for _ in 0..100 {
            let a = b.store.spend(&Spend { account: account.as_str().into(), ..spend(&q, cost, None) }).await.unwrap();
            assert!(!a.spent && a.quotas[0].exceeded && a.quotas[0].used == limit);
        }
        let mut stats = r.commandstats();
        stats.retain(|name, _| !name.starts_with("config") && name != "info");
        let usec = r.cli(&["INFO", "commandstats"]).unwrap_or_default();
        let usec = usec.lines().find(|l| l.starts_with("cmdstat_evalsha:")).unwrap_or("").to_owned();
        eprintln!("limit {limit}: {fields} buckets, MEMORY USAGE {bytes} B; 100 denied spends: {usec}");
        per_deny.push(stats);
    }
    let want: std::collections::HashMap<String, u64> =
        [("evalsha", 100), ("time", 100), ("hgetall", 100)].map(|(c, n)| (c.to_owned(), n)).into();
    assert_eq!(per_deny, [want.clone(), want], "a denied spend: TIME, one HGETALL of ≤ 17 fields, no write");
}

/// Buckets that fall out of the window are deleted by the next spend, so a
/// rolling window's key never holds more than `count + 1` fields however long
/// it is hammered (here 1.6 s: 16 buckets of 100 ms, hammered for 3.5 s), and
/// it expires when its newest bucket leaves the window.
#[tokio::test]
async fn a_rolling_windows_key_never_holds_more_than_seventeen_buckets_and_expires_with_its_newest() {
    let b = Backend::redis();
    let r = b.redis.as_ref().unwrap();
    let q = [Quota { window: Window::Rolling(Duration::from_millis(1600)), ..rate(1_000_000) }];
    let key = "tollgate:{acct_x}:rb:requests:1600";
    let (end, mut most) = (std::time::Instant::now() + Duration::from_millis(3500), 0);
    while std::time::Instant::now() < end {
        let a = try_spend(&b, &spend(&q, 1, None)).await;
        assert!(a.spent);
        let fields: usize = r.cli(&["HLEN", key]).unwrap().trim().parse().unwrap();
        assert!(fields <= 17, "{fields} buckets");
        most = most.max(fields);
        let expires: i64 = r.cli(&["PEXPIRETIME", key]).unwrap().trim().parse().unwrap();
        assert_eq!(expires, a.quotas[0].resets_at.timestamp_millis(), "expires when its newest bucket leaves");
    }
    assert!(most >= 15, "the window turned over its buckets ({most} at most)");
}
