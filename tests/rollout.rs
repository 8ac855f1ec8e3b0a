//! Rolling a paywall out (issue 12) through the ext_authz gRPC API and the
//! internal API: soft quotas (overage up to a ceiling, counted alike by two
//! replicas on the memory store's one process, on Redis and in lease mode)
//! and shadow mode (decided in full, let through, made visible). Through a
//! real Envoy, with a reload, in `tests/envoy.rs`.

use tollgate::grpc::pb::tollgate_client::TollgateClient;
use tollgate::grpc::pb::{
    AccountRequest, AuthorizeRequest, Entitlement, PutEntitlementRequest, QuotaOverride, RouteTarget, UsageRequest,
    authorize_request,
};
use tollgate_testkit::redis::RedisServer;
use tollgate_testkit::{Answer, TestServer, http_check, metric, rollout_config};
use tonic::Request;

const TOKEN: &str = "admin-token-0123456789abcdef0123456789";

fn config(store: &str) -> String {
    format!("{}server: {{ admin_tokens: [{TOKEN}] }}\nstore: {store}\n", rollout_config())
}

async fn get(s: &TestServer, path: &str, headers: &[(&str, &str)]) -> Answer {
    Answer::of(&s.check(http_check("GET", path, headers)).await)
}

fn admin<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

/// Limit 10, ceiling 15, the requests spread over `servers` (replicas of one
/// store): 1–10 plain, 11–15 allowed with the client's warning and the
/// upstream's overage header, 16 denied with the overage in its body; every
/// replica's answers are exact, and the units past the limit are counted once.
async fn soft_limit(servers: &[TestServer]) {
    let key = [("x-api-key", "soft-key")];
    for n in 1..=15u64 {
        let a = get(&servers[n as usize % servers.len()], "/v1/search", &key).await;
        assert!(a.allowed, "request {n}: {a:?}");
        let ratelimit = &a.client_headers["ratelimit"];
        assert!(ratelimit.starts_with("\"requests-month\";r="), "{ratelimit}");
        assert!(ratelimit.contains(&format!(";r={};", 10u64.saturating_sub(n))), "request {n}: {ratelimit}");
        if n <= 10 {
            assert!(!a.client_headers.contains_key("x-tollgate-billing-warning"), "request {n}: {a:?}");
            assert!(!a.upstream_headers.contains_key("x-tollgate-overage"), "request {n}: {a:?}");
            assert!(a.upstream_remove.contains(&"x-tollgate-overage".to_owned()), "a forged copy never passes");
            continue;
        }
        let over = n - 10;
        let warning = format!("quota_overage; policy=\"requests-month\"; limit=10; overage={over}; ceiling=15");
        assert_eq!(a.client_headers["x-tollgate-billing-warning"], warning, "request {n}");
        assert_eq!(a.upstream_headers["x-tollgate-billing-warning"], warning, "request {n}");
        assert_eq!(a.upstream_headers["x-tollgate-overage"], format!("\"requests-month\";units=1;overage={over}"));
        assert_eq!(a.metadata["decision"], "allowed", "overage is an allow like any other");
    }
    let a = get(&servers[0], "/v1/search", &key).await;
    assert!(!a.allowed && a.http_status == 402, "{a:?}");
    assert_eq!(a.code(), "quota_exhausted");
    let q = &a.body["quota"];
    assert_eq!((q["limit"].as_u64(), q["used"].as_u64(), q["remaining"].as_u64()), (Some(10), Some(15), Some(0)));
    assert_eq!((q["overage"].as_u64(), q["ceiling"].as_u64()), (Some(5), Some(15)), "{}", a.body);
    assert_eq!(a.body["detail"], "Plan soft includes 10 requests per month and 5 more as overage; all are used.");

    let mut overage = 0.0;
    for s in servers {
        overage += metric(s.http, "tollgate_overage_units_total{policy=\"requests-month\"}").await;
    }
    assert_eq!(overage, 5.0, "each unit past the limit counted once, by the replica that let it through");
    let usage = TollgateClient::new(servers[1 % servers.len()].channel().await)
        .get_usage(admin(UsageRequest { account_id: "acct_soft".into(), meter: "requests".into() }))
        .await
        .unwrap()
        .into_inner();
    let q = &usage.quotas[0];
    assert_eq!((q.limit, q.used, q.remaining, q.overage, q.soft, q.ceiling), (10, 15, 0, 5, true, Some(15)));
}

#[tokio::test]
async fn a_soft_limit_on_the_memory_store() {
    let s = TestServer::start(&config("{ backend: memory }")).await;
    soft_limit(std::slice::from_ref(&s)).await;
    s.stop().await;
}

#[tokio::test]
async fn a_soft_limit_on_redis_with_two_replicas() {
    let redis = RedisServer::start();
    let yaml = config(&format!("{{ backend: redis, url: \"{}\" }}", redis.url()));
    let servers = [TestServer::start_configured(&yaml, true).await, TestServer::start_configured(&yaml, false).await];
    soft_limit(&servers).await;
    for s in servers {
        s.stop().await;
    }
}

#[tokio::test]
async fn a_soft_limit_in_lease_mode_with_two_replicas() {
    let redis = RedisServer::start();
    let yaml = config(&format!("{{ backend: redis, url: \"{}\", counting: lease }}", redis.url()));
    let servers = [TestServer::start_configured(&yaml, true).await, TestServer::start_configured(&yaml, false).await];
    soft_limit(&servers).await;
    for s in servers {
        s.stop().await;
    }
}

#[tokio::test]
async fn an_account_in_grace_past_its_soft_limit_gets_both_warnings() {
    let s = TestServer::start(&config("{ backend: memory }")).await;
    let key = [("x-api-key", "soft-grace-key")];
    for _ in 0..10 {
        let a = get(&s, "/v1/search", &key).await;
        assert!(a.client_headers["x-tollgate-billing-warning"].starts_with("payment_overdue; grace_ends_at="));
    }
    let a = get(&s, "/v1/search", &key).await;
    let warning = &a.client_headers["x-tollgate-billing-warning"];
    assert!(warning.starts_with("payment_overdue; grace_ends_at=\""), "{warning}");
    assert!(
        warning.ends_with(", quota_overage; policy=\"requests-month\"; limit=10; overage=1; ceiling=15"),
        "{warning}"
    );
    assert_eq!(a.metadata["decision"], "grace");
    assert!(a.client_headers["link"].contains("acct_soft_grace"), "the way to pay is offered");
    s.stop().await;
}

#[tokio::test]
async fn a_shadowed_route_lets_would_be_denials_through_and_shows_them() {
    let s = TestServer::start(&config("{ backend: memory }")).await;
    let free = [("x-api-key", "free-key")];
    // The enforced route spends the free plan's 5 requests, then denies.
    for _ in 0..5 {
        assert!(get(&s, "/v1/search", &free).await.allowed);
    }
    assert_eq!(get(&s, "/v1/search", &free).await.code(), "quota_exhausted");

    // Next to it, the shadowed one: over quota, without the feature, out of credits: all pass.
    for (path, key, would_be) in [
        ("/v1/trial", "free-key", "quota_exhausted"),
        ("/v1/trial-export", "free-key", "feature_not_in_plan"),
        ("/v1/trial", "broke-key", "insufficient_credits"),
    ] {
        let a = get(&s, path, &[("x-api-key", key)]).await;
        assert!(a.allowed, "{path} {key}: {a:?}");
        assert_eq!(a.upstream_headers["x-tollgate-shadow"], would_be);
        assert_eq!((a.metadata["decision"].as_str(), a.metadata["shadow"].as_str()), ("allowed", would_be));
    }
    // Usage is real: the shadowed requests were counted, and credits did not move.
    let mut api = TollgateClient::new(s.channel().await);
    let usage = |id: &str| UsageRequest { account_id: id.into(), meter: "requests".into() };
    let free_usage = api.get_usage(admin(usage("acct_free"))).await.unwrap().into_inner();
    assert_eq!(free_usage.quotas[0].used, 7, "5 enforced + 2 shadowed");
    let broke = api.get_usage(admin(usage("acct_broke"))).await.unwrap().into_inner();
    assert_eq!(broke.credits, Some(0));
    // Nothing would have denied: allowed, no header.
    let a = get(&s, "/v1/trial", &[("x-api-key", "pro-key")]).await;
    assert!(a.allowed && !a.upstream_headers.contains_key("x-tollgate-shadow"));
    assert!(a.upstream_remove.contains(&"x-tollgate-shadow".to_owned()), "a forged copy never passes");

    // Security denials stay enforced.
    let a = get(&s, "/v1/trial", &[("x-api-key", "no-such-key")]).await;
    assert_eq!((a.allowed, a.code()), (false, "credentials_invalid"));
    assert_eq!(get(&s, "/v1/trial", &[]).await.code(), "credentials_missing");
    assert_eq!(get(&s, "/v1/trial", &[("x-api-key", "banned-key")]).await.code(), "account_blocked");

    // The internal API's Authorize answers the same, with the would-be code.
    let route = |path: &str| {
        Some(authorize_request::Target::Route(RouteTarget {
            path: path.into(),
            method: "GET".into(),
            host: String::new(),
        }))
    };
    let r = api
        .authorize(admin(AuthorizeRequest {
            subject: Some(authorize_request::Subject::ApiKey("free-key".into())),
            target: route("/v1/trial"),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.allowed, r.code.as_str(), r.shadow_code.as_str()), (true, "allowed", "quota_exhausted"));

    let m = |line: &'static str| metric(s.http, line);
    assert_eq!(m("tollgate_shadow_decisions_total{status=\"402\",code=\"quota_exhausted\"}").await, 2.0);
    assert_eq!(m("tollgate_shadow_decisions_total{status=\"402\",code=\"feature_not_in_plan\"}").await, 1.0);
    assert_eq!(m("tollgate_shadow_decisions_total{status=\"402\",code=\"insufficient_credits\"}").await, 1.0);
    assert_eq!(m("tollgate_shadow_decisions_total{status=\"200\",code=\"allowed\"}").await, 1.0);
    assert_eq!(m("tollgate_shadow_decisions_total{status=\"401\",code=\"credentials_invalid\"}").await, 1.0);
    // The real outcomes: the shadowed requests were allowed.
    assert_eq!(m("tollgate_decisions_total{status=\"402\",code=\"quota_exhausted\"}").await, 1.0);
    s.stop().await;
}

#[tokio::test]
async fn shadow_mode_by_plan_and_globally_and_the_security_opt_out() {
    // The free plan in shadow mode; the search route enforced for everyone else.
    let yaml = config("{ backend: memory }").replacen(
        "  free:\n    features: [search]\n",
        "  free:\n    shadow: true\n    features: [search]\n",
        1,
    );
    let s = TestServer::start(&yaml).await;
    for _ in 0..7 {
        assert!(get(&s, "/v1/search", &[("x-api-key", "free-key")]).await.allowed, "the plan is shadowed");
    }
    let a = get(&s, "/v1/ai", &[("x-api-key", "free-key")]).await;
    assert_eq!((a.allowed, a.upstream_headers["x-tollgate-shadow"].as_str()), (true, "feature_not_in_plan"));
    assert_eq!(get(&s, "/v1/ai", &[("x-api-key", "broke-key")]).await.code(), "insufficient_credits");
    s.stop().await;

    // Everything in shadow mode, credentials too (the operator opted out).
    let yaml = format!("{}shadow: true\nshadow_security: true\n", config("{ backend: memory }"));
    let s = TestServer::start(&yaml).await;
    let a = get(&s, "/v1/search", &[("x-api-key", "no-such-key")]).await;
    assert_eq!((a.allowed, a.upstream_headers["x-tollgate-shadow"].as_str()), (true, "credentials_invalid"));
    assert!(!a.upstream_headers.contains_key("x-tollgate-account"), "no account was identified");
    let a = get(&s, "/v1/ai", &[("x-api-key", "banned-key")]).await;
    assert_eq!((a.allowed, a.upstream_headers["x-tollgate-shadow"].as_str()), (true, "account_blocked"));
    // A malformed request is never let through.
    let a = get(&s, "/v1/search/../ai", &[("x-api-key", "pro-key")]).await;
    assert_eq!((a.allowed, a.code()), (false, "request_invalid"));
    s.stop().await;
}

#[tokio::test]
async fn an_account_override_can_be_soft_and_round_trips_through_the_api() {
    let s = TestServer::start(&config("{ backend: memory }")).await;
    let mut api = TollgateClient::new(s.channel().await);
    let soft = QuotaOverride {
        meter: "requests".into(),
        limit: 2,
        period: "month".into(),
        soft: true,
        ceiling: Some(3),
        ..Default::default()
    };
    let e = Entitlement {
        account_id: "acct_pro".into(),
        plan: "pro".into(),
        status: "active".into(),
        quota_overrides: vec![soft.clone()],
        ..Default::default()
    };
    api.put_entitlement(admin(PutEntitlementRequest { entitlement: Some(e) })).await.unwrap();
    let got = api.get_entitlement(admin(AccountRequest { account_id: "acct_pro".into() })).await.unwrap().into_inner();
    assert_eq!(got.quota_overrides, vec![soft]);
    let key = [("x-api-key", "pro-key")];
    let overage = |a: &Answer| a.upstream_headers.get("x-tollgate-overage").cloned();
    for (n, want) in [(1, None), (2, None), (3, Some("\"requests-month\";units=1;overage=1"))] {
        let a = get(&s, "/v1/search", &key).await;
        assert_eq!((a.allowed, overage(&a).as_deref()), (true, want), "request {n}");
    }
    assert_eq!(get(&s, "/v1/search", &key).await.code(), "quota_exhausted");
    s.stop().await;
}
