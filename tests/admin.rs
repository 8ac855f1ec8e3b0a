//! The `tollgate.v1` control plane: admin tokens (none, wrong, right,
//! rotated), read access, every RPC's effect on real Checks, input
//! validation, and changes reaching another replica through Redis.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::config::Config;
use tollgate::grpc::pb::tollgate_client::TollgateClient;
use tollgate::grpc::pb::{
    AccountRequest, AddCreditsRequest, CreateApiKeyRequest, Entitlement, PutEntitlementRequest, QuotaOverride,
    RevokeApiKeyRequest, SetCreditsRequest, UsageRequest,
};
use tollgate_testkit::redis::RedisServer;
use tollgate_testkit::{Answer, TestServer, eventually, http_check, spec_config};
use tonic::transport::Channel;
use tonic::{Code, Request};

const TOKENS: &str =
    "server: { admin_tokens: [old-token-0123456789abcdef0123456789, new-token-0123456789abcdef0123456789] }\n";

fn with<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn admin<T>(msg: T) -> Request<T> {
    with(msg, Some("new-token-0123456789abcdef0123456789"))
}

fn account(id: &str) -> AccountRequest {
    AccountRequest { account_id: id.into() }
}

async fn api(s: &TestServer) -> TollgateClient<Channel> {
    TollgateClient::new(s.channel().await)
}

async fn search(s: &TestServer, key: &str) -> Answer {
    Answer::of(&s.check(http_check("GET", "/v1/search", &[("x-api-key", key)])).await)
}

#[tokio::test]
async fn mutating_calls_need_an_admin_token_and_rotation_works() {
    let s = TestServer::start(&(spec_config() + TOKENS)).await;
    let mut c = api(&s).await;
    let err = c.block_account(with(account("acct_pro"), None)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = c.block_account(with(account("acct_pro"), Some("wrong-token"))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err =
        c.block_account(with(account("acct_pro"), Some("new-token-0123456789abcdef012345678"))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "a prefix of a token is not the token");
    assert!(search(&s, "pro-key").await.allowed, "nothing changed");

    assert!(
        c.block_account(with(account("acct_pro"), Some("old-token-0123456789abcdef0123456789")))
            .await
            .unwrap()
            .into_inner()
            .blocked
    );
    assert!(!c.unblock_account(admin(account("acct_pro"))).await.unwrap().into_inner().blocked);
    let mut lower = Request::new(account("acct_pro"));
    lower.metadata_mut().insert("authorization", "bearer new-token-0123456789abcdef0123456789".parse().unwrap());
    assert!(c.block_account(lower).await.is_ok(), "the scheme is case-insensitive");

    // Rotation: the old token is removed from config; it stops working at once.
    let rotated = spec_config() + "server: { admin_tokens: [new-token-0123456789abcdef0123456789] }\n";
    s.handle.authorizer.replace_config(Arc::new(Config::parse(&rotated, "t").unwrap()));
    let err =
        c.unblock_account(with(account("acct_pro"), Some("old-token-0123456789abcdef0123456789"))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(c.unblock_account(admin(account("acct_pro"))).await.is_ok());
    s.stop().await;
}

#[tokio::test]
async fn with_no_admin_token_configured_every_mutation_is_refused() {
    let s = TestServer::start(&spec_config()).await;
    let err = api(&s).await.block_account(with(account("acct_pro"), Some(""))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    s.stop().await;
}

#[tokio::test]
async fn reads_need_a_token_unless_read_access_is_open() {
    let s = TestServer::start(&(spec_config() + TOKENS)).await;
    let mut c = api(&s).await;
    assert_eq!(c.get_entitlement(with(account("acct_pro"), None)).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(c.list_api_keys(with(account("acct_pro"), None)).await.unwrap_err().code(), Code::Unauthenticated);
    let e = c.get_entitlement(admin(account("acct_pro"))).await.unwrap().into_inner();
    assert_eq!((e.plan.as_str(), e.status.as_str()), ("pro", "active"));
    s.stop().await;

    let open = spec_config() + "server: { admin_tokens: [t-0123456789abcdef0123456789abcdef], read_access: open }\n";
    let s = TestServer::start(&open).await;
    let mut c = api(&s).await;
    assert!(c.get_entitlement(with(account("acct_pro"), None)).await.is_ok());
    assert!(
        c.get_usage(with(UsageRequest { account_id: "acct_pro".into(), meter: String::new() }, None)).await.is_ok()
    );
    assert_eq!(c.block_account(with(account("acct_pro"), None)).await.unwrap_err().code(), Code::Unauthenticated);
    s.stop().await;
}

fn entitlement(id: &str, plan: &str) -> Entitlement {
    Entitlement { account_id: id.into(), plan: plan.into(), ..Default::default() }
}

#[tokio::test]
async fn entitlements_and_keys_drive_checks() {
    let s = TestServer::start(&(spec_config() + TOKENS)).await;
    let mut c = api(&s).await;
    let mut e = entitlement("acct_new", "free");
    e.quota_overrides = vec![QuotaOverride {
        meter: "requests".into(),
        limit: 2,
        period: "month".into(),
        per: None,
        ..Default::default()
    }];
    e.extra_features = vec!["ai".into()];
    let put = c.put_entitlement(admin(PutEntitlementRequest { entitlement: Some(e) })).await.unwrap().into_inner();
    assert_eq!((put.plan.as_str(), put.credits), ("free", 0));

    let created = c
        .create_api_key(admin(CreateApiKeyRequest { account_id: "acct_new".into(), name: "ci".into() }))
        .await
        .unwrap()
        .into_inner();
    let key = created.api_key.clone();
    let info = created.key.unwrap();
    assert!(key.starts_with("tg_") && key.len() == 43, "{key}");
    assert_eq!(info.id, tollgate::identity::KeyHash::of(&key).to_hex());
    assert!(info.prefix.starts_with("tg_") && key.starts_with(info.prefix.trim_end_matches('…')));
    assert!(info.prefix.chars().count() < 16, "the prefix is not the key");

    let listed = c.list_api_keys(admin(account("acct_new"))).await.unwrap().into_inner().keys;
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].id.as_str(), listed[0].name.as_str()), (info.id.as_str(), "ci"));

    // The override caps the month at 2; the extra feature opens /v1/ai on a free plan.
    let a = search(&s, &key).await;
    assert_eq!(a.upstream_headers["x-tollgate-account"], "acct_new");
    assert!(a.client_headers["ratelimit-policy"].contains("\"requests-month\";q=2;"));
    let ai = Answer::of(&s.check(http_check("POST", "/v1/ai/x", &[("x-api-key", &key)])).await);
    assert_eq!(ai.code(), "quota_exhausted", "ai costs 10 > the remaining 1: the feature passed, the quota did not");

    let usage =
        c.get_usage(admin(UsageRequest { account_id: "acct_new".into(), meter: "requests".into() })).await.unwrap();
    let month = usage.into_inner().quotas.into_iter().find(|q| q.policy == "requests-month").unwrap();
    assert_eq!((month.used, month.remaining), (1, 1));
    let reset =
        c.reset_usage(admin(UsageRequest { account_id: "acct_new".into(), meter: String::new() })).await.unwrap();
    assert!(reset.into_inner().quotas.iter().all(|q| q.used == 0));

    c.block_account(admin(account("acct_new"))).await.unwrap();
    assert_eq!(search(&s, &key).await.code(), "account_blocked");
    c.unblock_account(admin(account("acct_new"))).await.unwrap();
    assert!(search(&s, &key).await.allowed);

    let revoked = c
        .revoke_api_key(admin(RevokeApiKeyRequest { account_id: "acct_new".into(), key_id: info.id.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked);
    assert_eq!(search(&s, &key).await.code(), "credentials_invalid");
    let again = c.revoke_api_key(admin(RevokeApiKeyRequest { account_id: "acct_new".into(), key_id: info.id })).await;
    assert!(!again.unwrap().into_inner().revoked);
    s.stop().await;
}

#[tokio::test]
async fn credits_are_set_and_added_atomically_and_never_go_negative() {
    let s = TestServer::start(&(spec_config() + TOKENS)).await;
    let mut c = api(&s).await;
    let set = c.set_credits(admin(SetCreditsRequest { account_id: "acct_wallet".into(), credits: 10 })).await.unwrap();
    assert_eq!(set.into_inner().credits, 10);
    let add = |delta| admin(AddCreditsRequest { account_id: "acct_wallet".into(), delta });
    assert_eq!(c.add_credits(add(-4)).await.unwrap().into_inner().credits, 6);
    let err = c.add_credits(add(-7)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(c.get_entitlement(admin(account("acct_wallet"))).await.unwrap().into_inner().credits, 6);
    assert_eq!(search(&s, "wallet-key").await.metadata["decision"], "allowed");
    assert_eq!(c.add_credits(add(100)).await.unwrap().into_inner().credits, 105);

    // Concurrent adds all land.
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move {
                c.add_credits(admin(AddCreditsRequest { account_id: "acct_wallet".into(), delta: 2 })).await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(c.get_entitlement(admin(account("acct_wallet"))).await.unwrap().into_inner().credits, 205);
    let missing = c.set_credits(admin(SetCreditsRequest { account_id: "acct_ghost".into(), credits: 1 })).await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);
    s.stop().await;
}

#[tokio::test]
async fn invalid_input_is_rejected_naming_the_field() {
    let s = TestServer::start(&(spec_config() + TOKENS)).await;
    let mut c = api(&s).await;
    let put = |e: Entitlement| admin(PutEntitlementRequest { entitlement: Some(e) });
    let cases: Vec<(Request<PutEntitlementRequest>, &str)> = vec![
        (admin(PutEntitlementRequest { entitlement: None }), "entitlement: required"),
        (put(entitlement("", "pro")), "entitlement.account_id"),
        (put(entitlement("acct{1}", "pro")), "entitlement.account_id"),
        (put(entitlement("acct_x", "gold")), "entitlement.plan: unknown plan \"gold\""),
        (put(Entitlement { status: "late".into(), ..entitlement("acct_x", "pro") }), "entitlement.status"),
        (put(Entitlement { status: "past_due".into(), ..entitlement("acct_x", "pro") }), "entitlement.past_due_since"),
        (
            put(Entitlement {
                quota_overrides: vec![QuotaOverride {
                    meter: "requests".into(),
                    limit: 0,
                    period: "day".into(),
                    per: None,
                    ..Default::default()
                }],
                ..entitlement("acct_x", "pro")
            }),
            "entitlement.quota_overrides[0].limit",
        ),
        (
            put(Entitlement {
                quota_overrides: vec![QuotaOverride {
                    meter: "requests".into(),
                    limit: 1,
                    period: "week".into(),
                    per: None,
                    ..Default::default()
                }],
                ..entitlement("acct_x", "pro")
            }),
            "entitlement.quota_overrides[0].period",
        ),
        (
            put(Entitlement {
                quota_overrides: vec![QuotaOverride {
                    meter: "requests".into(),
                    limit: 10,
                    period: "month".into(),
                    soft: true,
                    ceiling: Some(5),
                    ..Default::default()
                }],
                ..entitlement("acct_x", "pro")
            }),
            "entitlement.quota_overrides[0].ceiling",
        ),
        (
            put(Entitlement {
                quota_overrides: vec![QuotaOverride {
                    meter: "requests".into(),
                    limit: 10,
                    per: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
                    soft: true,
                    ..Default::default()
                }],
                ..entitlement("acct_x", "pro")
            }),
            "entitlement.quota_overrides[0].soft",
        ),
    ];
    for (req, want) in cases {
        let err = c.put_entitlement(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{want}");
        assert!(err.message().contains(want), "{:?} lacks {want:?}", err.message());
    }
    let err =
        c.revoke_api_key(admin(RevokeApiKeyRequest { account_id: "acct_pro".into(), key_id: "xyz".into() })).await;
    assert!(err.unwrap_err().message().starts_with("key_id:"));
    let err = c.get_entitlement(admin(account("acct_ghost"))).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_one_replica_reach_the_other_within_a_second() {
    let redis = RedisServer::start();
    let yaml =
        spec_config() + TOKENS + &format!("store: {{ backend: redis, url: \"{}\", timeout: 1s }}\n", redis.url());
    let a = TestServer::start_configured(&yaml, true).await;
    let b = TestServer::start_configured(&yaml, false).await;
    let mut ca = api(&a).await;
    let created = ca
        .create_api_key(admin(CreateApiKeyRequest { account_id: "acct_free".into(), name: String::new() }))
        .await
        .unwrap()
        .into_inner();
    assert!(search(&b, &created.api_key).await.allowed, "a new key works on the other replica at once");
    assert_eq!(search(&b, "pro-key").await.upstream_headers["x-tollgate-plan"], "pro", "b's cache is warm");

    let t = Instant::now();
    ca.revoke_api_key(admin(RevokeApiKeyRequest { account_id: "acct_free".into(), key_id: created.key.unwrap().id }))
        .await
        .unwrap();
    ca.put_entitlement(admin(PutEntitlementRequest { entitlement: Some(entitlement("acct_pro", "free")) }))
        .await
        .unwrap();
    eventually("revocation on b", Duration::from_secs(1).saturating_sub(t.elapsed()), async || {
        search(&b, &created.api_key).await.code() == "credentials_invalid"
    })
    .await;
    eventually("plan change on b", Duration::from_secs(1), async || {
        search(&b, "pro-key").await.upstream_headers.get("x-tollgate-plan").map(String::as_str) == Some("free")
    })
    .await;
    a.stop().await;
    b.stop().await;
}
