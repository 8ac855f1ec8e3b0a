//! The Redis store with real `redis-server` processes, through whole tollgate
//! servers: exact quotas across replicas, all-or-nothing spending as Checks
//! see it, cache invalidation over pub/sub, the negative cache, faults and
//! recovery, Redis Cluster, and `tollgate seed`. What the store itself answers
//! (spends, windows, credits, keys, accounts, invalidations), alike with the
//! memory store, is `tests/store_contract.rs`.

use std::time::{Duration, Instant};

use tollgate::entitlement::Period;
use tollgate::identity::KeyHash;
use tollgate_testkit::redis::{RedisCluster, RedisServer};
use tollgate_testkit::{Answer, TestServer, allowed_else, eventually, http_check, http_get, spec_config, spread};

/// The spec config on Redis, plus a plan that is prepaid *and* quota'd.
fn redis_config(url: &str, on_error: &str) -> String {
    spec_config().replace(
        "  payg:\n    features: [search, ai]\n    prepaid: true\n",
        "  payg:\n    features: [search, ai]\n    prepaid: true\n  metered_payg:\n    features: [search, ai]\n    prepaid: true\n    quotas:\n      - { meter: requests, limit: 12, period: month }\n",
    ) + &format!(
        "store: {{ backend: redis, url: \"{url}\", on_error: {on_error}, timeout: 1s }}\n"
    ) + "cache: { ttl: 30s, negative_ttl: 30s }\n"
}

fn add_account(yaml: String, line: &str) -> String {
    yaml.replace("accounts:\n", &format!("accounts:\n  - {line}\n"))
}

fn month_key(account: &str) -> String {
    let (start, _) = Period::Month.bounds(chrono::Utc::now());
    format!("tollgate:{{{account}}}:q:requests:month:{}", start.timestamp_millis())
}

async fn search(s: &TestServer, key: &str) -> Answer {
    Answer::of(&s.check(http_check("GET", "/v1/search", &[("x-api-key", key)])).await)
}

async fn exactly_limit_allowed_across_two_replicas(url: &str, read_counter: impl Fn() -> Option<String>) {
    // A generous timeout: this pins atomicity, not latency (a call that times
    // out after its script ran has spent, and would blur the count).
    let yaml = redis_config(url, "deny")
        .replace("{ meter: requests, limit: 1000000, period: month }", "{ meter: requests, limit: 100, period: month }")
        .replace("timeout: 1s", "timeout: 5s");
    let a = TestServer::start_configured(&yaml, true).await;
    let b = TestServer::start_configured(&yaml, false).await;
    let channels = [a.channel().await, b.channel().await];
    let answers = spread(&channels, 500, http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await;
    let allowed = allowed_else(&answers, "quota_exhausted");
    assert_eq!(allowed, 100);
    assert_eq!(read_counter().as_deref().map(str::trim), Some("100"));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sharing_one_redis_allow_exactly_the_limit() {
    let redis = RedisServer::start();
    exactly_limit_allowed_across_two_replicas(&redis.url(), || redis.cli(&["GET", &month_key("acct_pro")])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_allows_exactly_the_limit() {
    let cluster = RedisCluster::start();
    let key = month_key("acct_pro");
    exactly_limit_allowed_across_two_replicas(&cluster.url(), || {
        cluster.nodes.iter().find_map(|n| n.cli(&["-c", "GET", &key]).filter(|v| !v.trim().is_empty()))
    })
    .await;
}

#[tokio::test]
async fn denied_requests_spend_neither_credits_nor_quota() {
    let redis = RedisServer::start();
    let yaml = add_account(
        redis_config(&redis.url(), "deny"),
        "{ id: acct_mp, plan: metered_payg, api_keys: [mp-key], credits: 15 }",
    );
    let s = TestServer::start_configured(&yaml, true).await;
    let state = || {
        (
            redis.cli(&["GET", "tollgate:{acct_mp}:credits"]).unwrap().trim().to_owned(),
            redis.cli(&["GET", &month_key("acct_mp")]).unwrap().trim().to_owned(),
        )
    };
    async fn ai(s: &TestServer) -> Answer {
        Answer::of(&s.check(http_check("POST", "/v1/ai/x", &[("x-api-key", "mp-key")])).await)
    }
    assert!(ai(&s).await.allowed);
    assert_eq!(state(), ("5".into(), "10".into()));
    assert_eq!(ai(&s).await.code(), "insufficient_credits", "credits are checked before quotas");
    assert_eq!(state(), ("5".into(), "10".into()), "the denied request spent nothing");
    assert!(search(&s, "mp-key").await.allowed);
    assert!(search(&s, "mp-key").await.allowed);
    assert_eq!(state(), ("3".into(), "12".into()));
    let a = search(&s, "mp-key").await;
    assert_eq!(a.code(), "quota_exhausted");
    assert_eq!(a.body["quota"]["used"], 12);
    assert_eq!(state(), ("3".into(), "12".into()), "the quota denial spent no credits");
    s.stop().await;
}

#[tokio::test]
async fn rolling_windows_count_in_bounded_buckets_in_redis() {
    let redis = RedisServer::start();
    let s = TestServer::start_configured(&redis_config(&redis.url(), "deny"), true).await;
    assert!(search(&s, "rate-key").await.allowed);
    assert!(search(&s, "rate-key").await.allowed);
    let a = search(&s, "rate-key").await;
    assert_eq!(a.code(), "rate_limited");
    // `per: 1h` is 16 buckets of 225 s: the first spend's bucket leaves the
    // window at least an hour and at most an hour and a bucket after it.
    let retry: u64 = a.client_headers["retry-after"].parse().unwrap();
    assert!((3600..=3825).contains(&retry), "{retry}");
    let key = "tollgate:{acct_rate}:rb:requests:3600000";
    let fields = redis.cli(&["--raw", "HVALS", key]).unwrap();
    let units: u64 = fields.split_whitespace().map(|u| u.parse::<u64>().unwrap()).sum();
    assert_eq!(units, 2, "two units, in one bucket or two: {fields:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_reaches_every_replica_within_a_second() {
    let redis = RedisServer::start();
    let yaml = redis_config(&redis.url(), "deny");
    let a = TestServer::start_configured(&yaml, true).await;
    let b = TestServer::start_configured(&yaml, false).await;
    for s in [&a, &b] {
        assert_eq!(search(s, "free-key").await.upstream_headers["x-tollgate-plan"], "free", "caches are warm");
    }
    let mut account = (*a.store.account("acct_free").await.unwrap().unwrap()).clone();
    account.plan = "pro".into();
    let changed = Instant::now();
    a.handle.authorizer.store().put_account(&account).await.unwrap();
    for (name, s) in [("a", &a), ("b", &b)] {
        loop {
            if search(s, "free-key").await.upstream_headers.get("x-tollgate-plan").map(String::as_str) == Some("pro") {
                break;
            }
            assert!(changed.elapsed() < Duration::from_secs(1), "replica {name} still answers by the old plan");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_flood_of_one_unknown_key_costs_redis_a_handful_of_reads() {
    let redis = RedisServer::start();
    let s = TestServer::start_configured(&redis_config(&redis.url(), "deny"), true).await;
    let before = redis.calls("get");
    let mut client = s.client().await;
    for _ in 0..1000 {
        let r = client.check(http_check("GET", "/v1/search", &[("x-api-key", "ghost-key")])).await.unwrap();
        assert_eq!(Answer::of(r.get_ref()).code(), "credentials_invalid");
    }
    let reads = redis.calls("get") - before;
    assert!(reads <= 3, "{reads} GETs for 1000 Checks");
    s.stop().await;
}

#[tokio::test]
async fn an_allowed_check_costs_one_redis_round_trip() {
    let redis = RedisServer::start();
    let s = TestServer::start_configured(&redis_config(&redis.url(), "deny"), true).await;
    assert!(search(&s, "pro-key").await.allowed, "warm the cache");
    let monitor = redis.monitor();
    let mut client = s.client().await;
    for _ in 0..50 {
        let r = client.check(http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await.unwrap();
        assert!(Answer::of(r.get_ref()).allowed);
    }
    let sent: Vec<String> = monitor.stop().into_iter().filter(|c| c != "ping").collect();
    assert_eq!(sent.len(), 50, "{sent:?}");
    assert!(sent.iter().all(|c| c == "evalsha"), "{sent:?}");
    s.stop().await;
}

#[tokio::test]
async fn losing_redis_fails_closed_turns_unready_and_recovers_by_itself() {
    let mut redis = RedisServer::start();
    let yaml = redis_config(&redis.url(), "deny");
    let s = TestServer::start_configured(&yaml, true).await;
    assert!(search(&s, "pro-key").await.allowed);

    redis.kill();
    let a = search(&s, "pro-key").await;
    assert_eq!((a.http_status, a.code()), (503, "store_unavailable"));
    let a = search(&s, "free-key").await;
    assert_eq!((a.http_status, a.code()), (503, "store_unavailable"), "cold cache too");
    eventually("/readyz 503", Duration::from_secs(10), async || {
        http_get(s.http, "/readyz").await.is_ok_and(|r| r.0 == 503)
    })
    .await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "envoy.service.auth.v3.Authorization".into() })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::NotServing as i32);

    // Back, empty (no persistence): re-seed, as an operator would, and carry on without a restart.
    redis.restart();
    let config = tollgate::config::Config::parse(&yaml, "t").unwrap();
    let store = s.handle.authorizer.store();
    tollgate::accounts::Accounts::seed(store.as_ref(), &config.accounts, &config.policy.plans).await.unwrap();
    eventually("checks to succeed again", Duration::from_secs(10), async || search(&s, "pro-key").await.allowed).await;
    eventually("/readyz 200", Duration::from_secs(10), async || {
        http_get(s.http, "/readyz").await.is_ok_and(|r| r.0 == 200)
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn losing_redis_under_on_error_allow_passes_marked_requests() {
    let mut redis = RedisServer::start();
    let s = TestServer::start_configured(&redis_config(&redis.url(), "allow"), true).await;
    assert!(search(&s, "pro-key").await.allowed);
    redis.kill();
    let a = search(&s, "pro-key").await;
    assert!(a.allowed);
    assert_eq!(a.upstream_headers["x-tollgate-degraded"], "store_unavailable");
    assert_eq!(a.upstream_headers["x-tollgate-account"], "acct_pro", "the cached identity still goes upstream");
    let (_, _, metrics) = http_get(s.http, "/metrics").await.unwrap();
    assert!(metrics.contains("tollgate_decisions_total{status=\"200\",code=\"fail_open\"} 1"), "{metrics}");
    assert!(!metrics.contains("tollgate_store_errors_total 0"), "{metrics}");
    s.stop().await;
}

#[test]
fn seed_writes_accounts_idempotently_and_keys_only_as_hashes() {
    let redis = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("tollgate-seed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.yaml");
    std::fs::write(&file, redis_config("redis://127.0.0.1:1", "deny")).unwrap();
    for _ in 0..2 {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["seed", "--config", file.to_str().unwrap(), "--redis-url", &redis.url()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("seeded 8 accounts"));
    }
    let keys = redis.cli(&["--raw", "KEYS", "*"]).unwrap();
    let hash = KeyHash::of("free-key").to_hex();
    assert!(keys.contains(&format!("tollgate:key:{hash}")), "{keys}");
    assert_eq!(redis.cli(&["GET", &format!("tollgate:key:{hash}")]).unwrap().trim(), "acct_free");
    assert_eq!(redis.cli(&["GET", "tollgate:{acct_wallet}:credits"]).unwrap().trim(), "15");
    let dump = redis.cli(&["--raw", "MGET"]).unwrap_or_default() + &keys;
    assert!(!dump.contains("free-key"), "no plaintext key in Redis");
    for key in keys.lines().filter(|k| !k.is_empty()) {
        let value = redis.cli(&["--raw", "DUMP", key]).unwrap_or_default();
        assert!(!value.contains("free-key"), "plaintext key under {key}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_corrupt_record_in_redis_fails_closed_without_taking_the_server_down() {
    let redis = RedisServer::start();
    let s = TestServer::start_configured(&redis_config(&redis.url(), "deny"), true).await;
    // Written behind tollgate's back, before anything cached the account.
    let huge = [
        r#"{"plan":"pro","status":"past_due","past_due_since":"+200000-01-01T00:00:00Z"}"#,
        r#"{"plan":"pro","quotas":[{"meter":"requests","limit":5,"per_ms":9223372036854775808}]}"#,
        r#"{"plan":"pro","status":"past_due","past_due_since":"1960-01-01T00:00:00Z"}"#,
    ];
    let accounts = [("acct_late", "late-key"), ("acct_grace", "grace-key"), ("acct_banned", "banned-key")];
    for (json, (account, key)) in huge.into_iter().zip(accounts) {
        redis.cli(&["SET", &format!("tollgate:{{{account}}}:account"), json]).unwrap();
        let a = search(&s, key).await;
        assert_eq!((a.http_status, a.code()), (503, "store_unavailable"), "{json}");
    }
    assert!(search(&s, "pro-key").await.allowed, "other accounts are served as before");
    s.stop().await;
}

#[tokio::test]
async fn a_float_balance_in_redis_fails_closed_and_spends_nothing() {
    let redis = RedisServer::start();
    let s = TestServer::start_configured(&redis_config(&redis.url(), "deny"), true).await;
    redis.cli(&["SET", "tollgate:{acct_wallet}:credits", "1.8e+19"]).unwrap();
    let a = search(&s, "wallet-key").await;
    assert_eq!((a.http_status, a.code()), (503, "store_unavailable"));
    assert_eq!(redis.cli(&["GET", "tollgate:{acct_wallet}:credits"]).unwrap().trim(), "1.8e+19", "nothing written");
    redis.cli(&["SET", "tollgate:{acct_wallet}:credits", "15"]).unwrap();
    assert!(search(&s, "wallet-key").await.allowed);
    assert_eq!(redis.cli(&["GET", "tollgate:{acct_wallet}:credits"]).unwrap().trim(), "14");
    s.stop().await;
}
