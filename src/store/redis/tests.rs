//! Unit tests of the Redis store's pure parts: URLs, records, the scripts'
//! bounds. What needs a redis-server is in `tests/store_contract.rs`,
//! `tests/attack_store.rs` and `tests/redis.rs`.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::connection::cluster_nodes;
use super::keys::{millis, window_ms};
use super::records::{AccountRecord, decode_account, encode_account};
use super::{RedisStore, lua};
use crate::entitlement::{Account, MAX_WINDOW, Period, Quota, Status, Window};
use crate::identity::KeyHash;
use crate::store::{Invalidation, StoreError};
use crate::usage::{MAX_COST, MAX_CREDITS, MAX_LIMIT};

#[test]
fn cluster_urls_split_into_nodes_keeping_credentials() {
    assert_eq!(
        cluster_nodes("redis+cluster://u:p@h1:7000,h2:7001/").unwrap(),
        vec!["redis://u:p@h1:7000".to_string(), "redis://u:p@h2:7001".to_string()]
    );
    assert_eq!(cluster_nodes("rediss+cluster://h1:7000").unwrap(), vec!["rediss://h1:7000".to_string()]);
}

#[test]
fn invalidations_round_trip() {
    for inv in [Invalidation::Account("acct_1".into()), Invalidation::Key(KeyHash::of("k"))] {
        assert_eq!(Invalidation::decode(&inv.encode()), Some(inv));
    }
    assert_eq!(Invalidation::decode("key:zz"), None);
}

#[test]
fn lua_bounds_match_the_rust_constants() {
    let want = [
        ("MAX_COST", MAX_COST),
        ("MAX_LIMIT", MAX_LIMIT),
        ("MAX_CREDITS", MAX_CREDITS),
        ("MAX_WINDOW_MS", window_ms(MAX_WINDOW)),
        ("MAX_TIME_MS", millis(crate::entitlement::max_time()) as u64),
    ];
    for script in [lua::SPEND, lua::PUT_IF_NEWER, lua::ADD_CREDITS, lua::REVOKE] {
        for (name, value) in want {
            assert!(script.contains(&format!("local {name} = {value}\n")), "{name} must be {value}");
        }
    }
}

#[test]
fn stored_records_out_of_bounds_are_corrupt_not_panics() {
    let records = [
        r#"{"plan":"pro","quotas":[{"meter":"r","limit":5,"per_ms":9223372036854775808}]}"#.to_owned(),
        r#"{"plan":"pro","quotas":[{"meter":"r","limit":5,"per_ms":18446744073709551615}]}"#.to_owned(),
        r#"{"plan":"pro","quotas":[{"meter":"r","limit":5,"per_ms":0}]}"#.to_owned(),
        r#"{"plan":"pro","quotas":[{"meter":"r","limit":5,"per_ms":-1}]}"#.to_owned(),
        r#"{"plan":"pro","quotas":[{"meter":"r","limit":5,"per_ms":1.5}]}"#.to_owned(),
        format!(r#"{{"plan":"pro","quotas":[{{"meter":"r","limit":{},"period":"day"}}]}}"#, MAX_LIMIT + 1),
        r#"{"plan":"pro","quotas":[{"meter":"r","limit":1e300,"period":"day"}]}"#.to_owned(),
        r#"{"plan":"pro","past_due_since":"+200000-01-01T00:00:00Z"}"#.to_owned(),
        r#"{"plan":"pro","past_due_since":"-0001-01-01T00:00:00Z"}"#.to_owned(),
        r#"{"plan":"pro","expires_at":"1969-12-31T23:59:59Z"}"#.to_owned(),
        r#"{"plan":"pro","billing_event_ms":9223372036854775807}"#.to_owned(),
        r#"{"plan":"pro","billing_event_ms":-9223372036854775808}"#.to_owned(),
        r#"{"plan":"pro","billing_event_ms":-1}"#.to_owned(),
        format!(r#"{{"plan":"{}"}}"#, "p".repeat(129)),
        r#"{"plan":""}"#.to_owned(),
        format!(r#"{{"plan":"pro","features":{:?}}}"#, vec!["f"; 257]),
        r#"{"plan":"pro","stripe_customer":"cus 1"}"#.to_owned(),
    ];
    for json in &records {
        assert!(matches!(decode_account("acct_x", json), Err(StoreError::Corrupt(_))), "{json} was accepted");
    }
    let max_time = r#"{"plan":"pro","past_due_since":"9999-12-31T23:59:59Z"}"#;
    assert!(decode_account("acct_x", max_time).is_ok(), "max_time itself is fine");
}

#[test]
fn accounts_out_of_bounds_are_never_written() {
    let good = Account { id: "acct_1".into(), plan: "pro".into(), ..Account::default() };
    assert!(encode_account(&good).is_ok());
    for bad in [
        Account { past_due_since: Some(DateTime::<Utc>::MAX_UTC), ..good.clone() },
        Account { billing_event_at: Some(DateTime::<Utc>::MIN_UTC), ..good.clone() },
        Account {
            quota_overrides: vec![Quota {
                meter: "r".into(),
                limit: 1,
                window: Window::Rolling(Duration::MAX),
                ceiling: None,
            }],
            ..good.clone()
        },
        Account { id: "{acct}".into(), ..good.clone() },
    ] {
        assert!(matches!(encode_account(&bad), Err(StoreError::Corrupt(_))), "{bad:?}");
    }
}

#[test]
fn account_records_round_trip() {
    let a = Account {
        id: "a".into(),
        plan: "pro".into(),
        status: Status::PastDue,
        past_due_since: Some(Utc::now()),
        quota_overrides: vec![
            Quota { meter: "r".into(), limit: 5, window: Window::Rolling(Duration::from_secs(2)), ceiling: None },
            Quota { meter: "r".into(), limit: 9, window: Window::Calendar(Period::Day), ceiling: None },
        ],
        extra_features: ["x".to_string()].into(),
        ..Account::default()
    };
    let json = serde_json::to_string(&AccountRecord::of(&a)).unwrap();
    assert_eq!(decode_account("a", &json).unwrap(), a);
}

/// Opening needs a runtime (the connection manager spawns its task) but not a server.
#[tokio::test]
async fn a_store_opens_without_connecting_and_keeps_its_url_out_of_debug() {
    let store = RedisStore::open("redis://:secret@127.0.0.1:1", "t:", Duration::from_millis(10)).unwrap();
    let debug = format!("{store:?}");
    assert!(debug.contains("\"t:\"") && !debug.contains("secret"), "{debug}");
}
