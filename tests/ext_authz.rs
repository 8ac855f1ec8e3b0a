//! Every row of the decision table (SPEC §4) end to end through the ext_authz
//! gRPC API, with the response formats of SPEC §5.

use std::sync::Arc;

use async_trait::async_trait;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, attribute_context::Peer};
use tollgate::config::Config;
use tollgate::entitlement::{Account, Quota};
use tollgate::identity::{KeyHash, KeyMeta};
use tollgate::store::{Reply, Store, StoreError};
use tollgate::usage::{Spend, SpendAnswer};
use tollgate_testkit::{Answer, TestServer, http_check, spec_config, with_jwt};

const UNAUTHENTICATED: i32 = 16;
const PERMISSION_DENIED: i32 = 7;
const RESOURCE_EXHAUSTED: i32 = 8;
const UNAVAILABLE: i32 = 14;
const INVALID_ARGUMENT: i32 = 3;

async fn ask(s: &TestServer, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    Answer::of(&s.check(http_check(method, path, headers)).await)
}

async fn search(s: &TestServer, key: &str) -> Answer {
    ask(s, "GET", "/v1/search?q=rust", &[("x-api-key", key)]).await
}

fn assert_problem(a: &Answer, status: u16, code: &str) {
    assert!(!a.allowed, "expected a deny, got {a:?}");
    assert_eq!(a.http_status, status, "{a:?}");
    assert_eq!(a.code(), code, "{a:?}");
    assert_eq!(a.body["status"], status);
    assert_eq!(a.body["type"], format!("https://docs.example.com/problems/{}", code.replace('_', "-")));
    assert!(a.body["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(a.body["detail"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(a.client_headers["content-type"], "application/problem+json");
    assert_eq!(a.metadata["decision"], code);
}

#[tokio::test]
async fn public_route_passes_without_credentials_and_strips_forged_identity() {
    let s = TestServer::start(&spec_config()).await;
    let a = ask(&s, "GET", "/public/docs", &[("x-tollgate-account", "acct_pro")]).await;
    assert!(a.allowed);
    assert_eq!(a.rpc_code, 0);
    assert!(a.upstream_remove.contains(&"x-tollgate-account".to_string()));
    assert!(a.upstream_remove.contains(&"x-tollgate-plan".to_string()));
    assert_eq!(a.metadata["decision"], "public");
    s.stop().await;
}

#[tokio::test]
async fn missing_credentials_are_401_with_www_authenticate() {
    let s = TestServer::start(&spec_config()).await;
    let a = ask(&s, "GET", "/v1/search", &[]).await;
    assert_problem(&a, 401, "credentials_missing");
    assert_eq!(a.rpc_code, UNAUTHENTICATED);
    let challenge = &a.client_headers["www-authenticate"];
    assert!(challenge.contains("Bearer realm=\"tollgate\""), "{challenge}");
    assert!(challenge.contains("header=\"x-api-key\""), "{challenge}");
    assert!(a.body.get("account").is_none());
    s.stop().await;
}

#[tokio::test]
async fn unknown_api_key_is_401_and_never_echoed() {
    let s = TestServer::start(&spec_config()).await;
    let a = search(&s, "sk_live_not_a_real_key").await;
    assert_problem(&a, 401, "credentials_invalid");
    assert!(!a.raw_body.contains("sk_live_not_a_real_key"));
    assert!(a.client_headers.values().all(|v| !v.contains("sk_live_not_a_real_key")));
    s.stop().await;
}

#[tokio::test]
async fn unmatched_route_is_403_under_default_deny() {
    let s = TestServer::start(&spec_config()).await;
    let a = ask(&s, "GET", "/admin", &[("x-api-key", "pro-key")]).await;
    assert_problem(&a, 403, "route_not_allowed");
    assert_eq!(a.rpc_code, PERMISSION_DENIED);
    // The method is part of the match: POST /v1/search has no route either.
    let a = ask(&s, "POST", "/v1/search", &[("x-api-key", "pro-key")]).await;
    assert_problem(&a, 403, "route_not_allowed");
    s.stop().await;
}

#[tokio::test]
async fn blocked_account_is_403() {
    let s = TestServer::start(&spec_config()).await;
    let a = search(&s, "banned-key").await;
    assert_problem(&a, 403, "account_blocked");
    assert_eq!(a.body["account"], "acct_banned");
    assert!(!a.client_headers.contains_key("link"), "paying does not fix a block");
    s.stop().await;
}

#[tokio::test]
async fn canceled_subscription_is_402_with_link_and_no_retry_after() {
    let s = TestServer::start(&spec_config()).await;
    let a = search(&s, "canceled-key").await;
    assert_problem(&a, 402, "subscription_inactive");
    assert_eq!(a.rpc_code, PERMISSION_DENIED);
    assert_eq!(a.body["account"], "acct_canceled");
    assert_eq!(a.body["plan"], "pro");
    assert_eq!(a.body["subscription_status"], "canceled");
    assert_eq!(a.body["link"], "https://billing.example.com/accounts/acct_canceled/billing");
    assert_eq!(
        a.client_headers["link"],
        "<https://billing.example.com/accounts/acct_canceled/billing>; rel=\"payment\""
    );
    assert!(!a.client_headers.contains_key("retry-after"));
    s.stop().await;
}

#[tokio::test]
async fn past_due_inside_grace_is_allowed_with_a_warning() {
    let s = TestServer::start(&spec_config()).await;
    let a = search(&s, "grace-key").await;
    assert!(a.allowed, "{a:?}");
    assert!(a.client_headers["x-tollgate-billing-warning"].starts_with("payment_overdue; grace_ends_at="));
    assert!(a.client_headers["link"].contains("acct_grace"));
    assert_eq!(a.metadata["decision"], "grace");
    s.stop().await;
}

#[tokio::test]
async fn past_due_after_grace_is_402_payment_overdue() {
    let s = TestServer::start(&spec_config()).await;
    let a = search(&s, "late-key").await;
    assert_problem(&a, 402, "payment_overdue");
    assert!(a.body["grace_ended_at"].as_str().is_some());
    assert!(!a.client_headers.contains_key("retry-after"));
    s.stop().await;
}

#[tokio::test]
async fn feature_outside_the_plan_is_402() {
    let s = TestServer::start(&spec_config()).await;
    let a = ask(&s, "POST", "/v1/ai/complete", &[("x-api-key", "free-key")]).await;
    assert_problem(&a, 402, "feature_not_in_plan");
    assert_eq!(a.body["feature"], "ai");
    assert_eq!(a.body["plan"], "free");
    assert!(a.body["link"].as_str().unwrap().contains("acct_free"));
    s.stop().await;
}

#[tokio::test]
async fn prepaid_credits_are_spent_and_too_few_is_402_spending_nothing() {
    let s = TestServer::start(&spec_config()).await;
    // 15 credits: one AI call (10) passes, the second is denied, a search (1) still passes.
    assert!(ask(&s, "POST", "/v1/ai/x", &[("x-api-key", "wallet-key")]).await.allowed);
    let a = ask(&s, "POST", "/v1/ai/x", &[("x-api-key", "wallet-key")]).await;
    assert_problem(&a, 402, "insufficient_credits");
    assert_eq!(a.body["credits"]["balance"], 5);
    assert_eq!(a.body["credits"]["cost"], 10);
    for _ in 0..5 {
        assert!(search(&s, "wallet-key").await.allowed, "the denied call spent nothing");
    }
    assert_problem(&search(&s, "wallet-key").await, 402, "insufficient_credits");
    s.stop().await;
}

#[tokio::test]
async fn exhausted_month_quota_is_402_with_the_spec_body_and_headers() {
    let s = TestServer::start(&spec_config()).await;
    for i in 1..=5u64 {
        let a = search(&s, "free-key").await;
        assert!(a.allowed, "request {i}: {a:?}");
        assert!(a.client_headers["ratelimit-policy"].contains("\"requests-month\";q=5;w="));
        assert!(a.client_headers["ratelimit-policy"].contains("\"requests-1s\";q=100;w=1"));
        assert!(a.client_headers["ratelimit"].starts_with(&format!("\"requests-month\";r={};t=", 5 - i)));
    }
    let a = search(&s, "free-key").await;
    assert_problem(&a, 402, "quota_exhausted");
    assert_eq!(a.body["title"], "Monthly quota exhausted");
    assert_eq!(a.body["detail"], "Plan free includes 5 requests per month; all are used.");
    assert_eq!(a.body["account"], "acct_free");
    assert_eq!(a.body["plan"], "free");
    assert_eq!(a.body["link"], "https://billing.example.com/accounts/acct_free/billing");
    let q = &a.body["quota"];
    assert_eq!(
        (q["meter"].as_str(), q["limit"].as_u64(), q["used"].as_u64(), q["remaining"].as_u64()),
        (Some("requests"), Some(5), Some(5), Some(0))
    );
    let resets_at: chrono::DateTime<chrono::Utc> = q["resets_at"].as_str().unwrap().parse().unwrap();
    let (_, month_end) = tollgate::entitlement::Period::Month.bounds(chrono::Utc::now());
    assert_eq!(resets_at, month_end);
    let retry: i64 = a.client_headers["retry-after"].parse().unwrap();
    assert!((retry - (month_end - chrono::Utc::now()).num_seconds()).abs() <= 2);
    assert!(a.client_headers["ratelimit"].starts_with("\"requests-month\";r=0;t="));
    assert!(a.client_headers["link"].ends_with("rel=\"payment\""));
    s.stop().await;
}

#[tokio::test]
async fn exceeded_rate_quota_is_429_with_retry_after() {
    let s = TestServer::start(&spec_config()).await;
    assert!(search(&s, "rate-key").await.allowed);
    assert!(search(&s, "rate-key").await.allowed);
    let a = search(&s, "rate-key").await;
    assert_problem(&a, 429, "rate_limited");
    assert_eq!(a.rpc_code, RESOURCE_EXHAUSTED);
    let retry: u64 = a.client_headers["retry-after"].parse().unwrap();
    // An hour is 16 buckets of 225 s: the first spend's bucket leaves at least
    // an hour and at most an hour and one bucket after it.
    assert!((3600..=3825).contains(&retry), "an hour-long window: {retry}");
    assert_eq!(a.body["quota"]["policy"], "requests-1h");
    assert!(a.client_headers["ratelimit"].starts_with("\"requests-1h\";r=0;t="));
    assert!(!a.client_headers.contains_key("link"), "waiting, not paying, lifts a rate limit");
    s.stop().await;
}

#[tokio::test]
async fn allowed_request_carries_identity_upstream_and_strips_the_key() {
    let s = TestServer::start(&spec_config()).await;
    let a = search(&s, "pro-key").await;
    assert!(a.allowed);
    assert_eq!(a.rpc_code, 0);
    assert_eq!(a.upstream_headers["x-tollgate-account"], "acct_pro");
    assert_eq!(a.upstream_headers["x-tollgate-plan"], "pro");
    assert_eq!(
        a.upstream_remove,
        [
            "x-tollgate-degraded",
            "x-tollgate-billing-warning",
            "x-tollgate-shadow",
            "x-tollgate-overage",
            "x-tollgate-payer",
            "x-tollgate-payment",
            "x-api-key"
        ]
        .map(String::from),
        "tollgate's unset headers and the key are removed; the set ones are overwritten"
    );
    assert_eq!(a.client_headers["ratelimit-policy"], "\"requests-month\";q=1000000;w=".to_string() + &month_secs());
    assert_eq!(a.metadata["account"], "acct_pro");
    assert_eq!(a.metadata["plan"], "pro");
    assert_eq!(a.metadata["decision"], "allowed");
    s.stop().await;
}

/// A Check's headers are found by comparing names when it carries few and by
/// the map's hash past that: the key is found either way, whatever else the
/// client sends (the kit adds `:authority` and `:method`: 13 others make 16
/// headers, scanned; 14 make 17, hashed), and names that only look like it
/// are not taken for it.
#[tokio::test]
async fn the_key_is_found_among_few_or_many_headers_and_lookalikes_are_not() {
    let s = TestServer::start(&spec_config()).await;
    for extra in [0, 13, 14, 15, 40, 90] {
        let names: Vec<String> = (0..extra).map(|i| format!("x-filler-{i}")).collect();
        let mut headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        headers.push(("x-api-key", "pro-key"));
        let a = ask(&s, "GET", "/v1/search?q=rust", &headers).await;
        assert!(a.allowed, "{extra} other headers: {a:?}");
        assert_eq!(a.upstream_headers["x-tollgate-account"], "acct_pro");
        assert!(a.upstream_remove.contains(&"x-api-key".to_string()), "{extra}: the key is removed");
        let mut lookalikes: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        lookalikes.extend([("x-api-key2", "pro-key"), ("x-api-ke", "pro-key"), ("x-x-api-key", "pro-key")]);
        let a = ask(&s, "GET", "/v1/search?q=rust", &lookalikes).await;
        assert_problem(&a, 401, "credentials_missing");
    }
    s.stop().await;
}

/// `server.dynamic_metadata: lean`: a plain allow carries no metadata (the
/// upstream headers name account and plan), over the wire as Envoy reads it;
/// a grace allow and a deny keep theirs (shadow and charge: the unit test in
/// `grpc::answer`). A client's forged `x-tollgate-*` headers cannot make
/// tollgate's own go missing.
#[tokio::test]
async fn lean_metadata_leaves_plain_allows_without() {
    let s = TestServer::start(&(spec_config() + "server: { dynamic_metadata: lean }\n")).await;
    let forged = [("x-api-key", "pro-key"), ("x-tollgate-account", "acct_free"), ("x-tollgate-plan", "free")];
    let a = ask(&s, "GET", "/v1/search?q=rust", &forged).await;
    assert!(a.allowed, "{a:?}");
    assert!(a.metadata.is_empty(), "{a:?}");
    assert_eq!(a.upstream_headers["x-tollgate-account"], "acct_pro");
    assert_eq!(a.upstream_headers["x-tollgate-plan"], "pro");
    let grace = search(&s, "grace-key").await;
    assert_eq!((grace.metadata["decision"].as_str(), grace.metadata["account"].as_str()), ("grace", "acct_grace"));
    let denied = search(&s, "sk_live_not_a_real_key").await;
    assert_problem(&denied, 401, "credentials_invalid");
    s.stop().await;
}

/// `server.remove_own_headers: seen`: an allow removes the credential and
/// the `x-tollgate-*` headers the Check showed (and overwrites the ones it
/// sets), but no longer asks for the removal of every own header it did not
/// see, but for account and plan; on a public route a forged account still goes.
#[tokio::test]
async fn seen_removal_removes_what_the_check_showed() {
    let s = TestServer::start(&(spec_config() + "server: { remove_own_headers: seen }\n")).await;
    let a = ask(&s, "GET", "/v1/search?q=rust", &[("x-api-key", "pro-key")]).await;
    assert!(a.allowed, "{a:?}");
    assert_eq!(a.upstream_remove, ["x-api-key"].map(String::from));
    let forged = [
        ("x-api-key", "pro-key"),
        ("x-tollgate-account", "acct_free"),
        ("x-tollgate-degraded", "1"),
        ("x-tollgate-payer", "0xforged"),
    ];
    let a = ask(&s, "GET", "/v1/search?q=rust", &forged).await;
    assert!(a.allowed, "{a:?}");
    assert_eq!(a.upstream_headers["x-tollgate-account"], "acct_pro", "a set header is overwritten");
    let mut removed = a.upstream_remove.clone();
    removed.sort();
    assert_eq!(removed, ["x-api-key", "x-tollgate-degraded", "x-tollgate-payer"].map(String::from));
    // On a public route the two headers routes match on are removed even
    // unseen: an answer changing no header would leave Envoy on the route it
    // picked before its edge filter removed a forged plan.
    for forged in [&[("x-tollgate-account", "acct_pro"), ("x-tollgate-plan", "pro")][..], &[]] {
        let a = ask(&s, "GET", "/public/docs", forged).await;
        assert!(a.allowed, "{a:?}");
        let mut removed = a.upstream_remove.clone();
        removed.sort();
        assert_eq!(removed, ["x-tollgate-account", "x-tollgate-plan"].map(String::from), "{forged:?}");
    }
    s.stop().await;
}

/// `server.remove_own_headers: auto` (the default): a Check whose proxy
/// says, in its own call's gRPC metadata, that it shows tollgate every
/// `x-tollgate-*` header (as the shipped Envoy configs do) is answered as
/// under `seen`; without it, with any other value, or with the words in the
/// client's request headers instead, as under `always`, which ignores them.
#[tokio::test]
async fn own_header_removals_follow_the_proxy_s_word_under_auto() {
    async fn removed(s: &TestServer, word: Option<&str>, headers: &[(&str, &str)]) -> Vec<String> {
        let mut req = tonic::Request::new(http_check("GET", "/v1/search?q=rust", headers));
        if let Some(w) = word {
            req.metadata_mut().insert(tollgate::config::OWN_HEADERS_SHOWN.0, w.parse().unwrap());
        }
        let a = Answer::of(&s.client().await.check(req).await.unwrap().into_inner());
        assert!(a.allowed, "{a:?}");
        let mut removed = a.upstream_remove;
        removed.sort();
        removed
    }
    let key = ("x-api-key", "pro-key");
    let set = ["x-tollgate-account", "x-tollgate-plan"];
    let mut all: Vec<String> =
        tollgate::problem::OWN_HEADERS.iter().filter(|h| !set.contains(h)).map(|h| h.to_string()).collect();
    all.push("x-api-key".into());
    all.sort();
    let s = TestServer::start(&spec_config()).await;
    assert_eq!(removed(&s, Some("shown"), &[key]).await, ["x-api-key"]);
    let forged = [key, ("x-tollgate-degraded", "1"), ("x-tollgate-account", "acct_free")];
    assert_eq!(
        removed(&s, Some("shown"), &forged).await,
        ["x-api-key", "x-tollgate-degraded"],
        "set ones are overwritten"
    );
    assert_eq!(removed(&s, None, &[key]).await, all);
    for word in ["Shown", "shown ", "no", ""] {
        assert_eq!(removed(&s, Some(word), &[key]).await, all, "{word:?}");
    }
    // A client cannot say it: its headers are the Check's attributes, not the proxy's call.
    assert_eq!(removed(&s, None, &[key, ("tollgate-own-headers", "shown")]).await, all);
    s.stop().await;
    let s = TestServer::start(&(spec_config() + "server: { remove_own_headers: always }\n")).await;
    assert_eq!(removed(&s, Some("shown"), &[key]).await, all);
    s.stop().await;
}

fn month_secs() -> String {
    let (start, end) = tollgate::entitlement::Period::Month.bounds(chrono::Utc::now());
    (end - start).num_seconds().to_string()
}

#[tokio::test]
async fn bearer_jwt_claim_and_trusted_header_identify_the_account() {
    // Asserted identities are honoured only from callers the operator vouches for.
    let s = TestServer::start(&(spec_config() + "server: { trusted_callers: any }\n")).await;
    let a = ask(&s, "GET", "/v1/search", &[("authorization", "Bearer pro-key")]).await;
    assert_eq!(a.upstream_headers["x-tollgate-account"], "acct_pro");
    assert!(a.upstream_remove.contains(&"authorization".to_string()), "{:?}", a.upstream_remove);

    let jwt = with_jwt(
        http_check("GET", "/v1/search", &[("authorization", "Bearer eyJhbGciOi.x.y")]),
        &[("org_id", "acct_pro")],
    );
    let a = Answer::of(&s.check(jwt).await);
    assert_problem(&a, 401, "credentials_invalid");

    let jwt = with_jwt(http_check("GET", "/v1/search", &[]), &[("org_id", "acct_pro")]);
    let a = Answer::of(&s.check(jwt).await);
    assert!(a.allowed, "{a:?}");
    assert_eq!(a.upstream_headers["x-tollgate-account"], "acct_pro");

    let jwt = with_jwt(http_check("GET", "/v1/search", &[]), &[("org_id", "acct_nobody")]);
    assert_problem(&Answer::of(&s.check(jwt).await), 401, "credentials_invalid");

    let a = ask(&s, "GET", "/v1/search", &[("x-account-id", "acct_free")]).await;
    assert_eq!(a.upstream_headers["x-tollgate-account"], "acct_free");
    s.stop().await;
}

#[tokio::test]
async fn routes_match_the_path_without_its_query() {
    let s = TestServer::start(&spec_config()).await;
    let a = ask(&s, "GET", "/v1/search?redirect=/public", &[("x-api-key", "pro-key")]).await;
    assert_eq!(a.metadata["decision"], "allowed");
    let a = ask(&s, "GET", "/admin?x=/public", &[]).await;
    assert_problem(&a, 401, "credentials_missing");
    s.stop().await;
}

#[tokio::test]
async fn checks_without_http_attributes_follow_the_non_http_rule() {
    let network = CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer::default()),
            destination: Some(Peer::default()),
            ..Default::default()
        }),
    };
    let s = TestServer::start(&spec_config()).await;
    let a = Answer::of(&s.check(network.clone()).await);
    assert_problem(&a, 403, "route_not_allowed");
    s.stop().await;

    let s = TestServer::start(&(spec_config() + "non_http: allow\n")).await;
    assert!(Answer::of(&s.check(network).await).allowed);
    s.stop().await;
}

#[tokio::test]
async fn empty_or_malformed_check_requests_get_a_400_problem() {
    let s = TestServer::start(&spec_config()).await;
    let a = Answer::of(&s.check(CheckRequest::default()).await);
    assert_problem(&a, 400, "request_invalid");
    assert_eq!(a.rpc_code, INVALID_ARGUMENT);
    let a = ask(&s, "GET", "", &[("x-api-key", "pro-key")]).await;
    assert_problem(&a, 400, "request_invalid");
    s.stop().await;
}

#[tokio::test]
async fn problem_texts_are_overridable_per_code() {
    let yaml = spec_config()
        + r#"  overrides:
    quota_exhausted: { title: "You have used this month's requests", detail: "{account} used {used} of {limit}.", link: "https://pay.example.com/{account}" }
"#;
    let s = TestServer::start(&yaml).await;
    for _ in 0..5 {
        search(&s, "free-key").await;
    }
    let a = search(&s, "free-key").await;
    assert_eq!(a.body["title"], "You have used this month's requests");
    assert_eq!(a.body["detail"], "acct_free used 5 of 5.");
    assert_eq!(a.body["link"], "https://pay.example.com/acct_free");
    assert_eq!(a.client_headers["link"], "<https://pay.example.com/acct_free>; rel=\"payment\"");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_never_exceed_an_exact_quota() {
    let yaml = spec_config().replace(
        "{ meter: requests, limit: 1000000, period: month }",
        "{ meter: requests, limit: 100, period: month }",
    );
    let s = TestServer::start(&yaml).await;
    let channel = s.channel().await;
    let tasks: Vec<_> = (0..500)
        .map(|_| {
            let mut client = envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(
                channel.clone(),
            );
            tokio::spawn(async move {
                let r = client.check(http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await.unwrap();
                Answer::of(r.get_ref()).allowed
            })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.unwrap() as u32;
    }
    assert_eq!(allowed, 100);
    s.stop().await;
}

fn down() -> StoreError {
    StoreError::Unavailable("connection refused".into())
}

/// A store that always fails, as an unreachable Redis would (its ping still
/// answers, so the server is ready and Checks reach it).
struct DownStore;

#[async_trait]
impl Store for DownStore {
    fn account_for_key<'a>(&'a self, _: &'a KeyHash) -> Reply<'a, Result<Option<Arc<str>>, StoreError>> {
        Reply::later(async move { Err(down()) })
    }
    fn account<'a>(&'a self, _: &'a str) -> Reply<'a, Result<Option<Arc<Account>>, StoreError>> {
        Reply::later(async move { Err(down()) })
    }
    fn spend<'a>(&'a self, _: &'a Spend) -> Reply<'a, Result<SpendAnswer, StoreError>> {
        Reply::later(async move { Err(down()) })
    }
    async fn put_account(&self, _: &Account) -> Result<(), StoreError> {
        Err(down())
    }
    async fn put_account_if_newer(&self, _: &Account) -> Result<bool, StoreError> {
        Err(down())
    }
    async fn account_for_customer(&self, _: &str) -> Result<Option<String>, StoreError> {
        Err(down())
    }
    async fn put_key(&self, _: &KeyHash, _: &str, _: &KeyMeta) -> Result<(), StoreError> {
        Err(down())
    }
    async fn revoke_key(&self, _: &str, _: &KeyHash) -> Result<bool, StoreError> {
        Err(down())
    }
    async fn list_keys(&self, _: &str) -> Result<Vec<(KeyHash, KeyMeta)>, StoreError> {
        Err(down())
    }
    async fn set_credits(&self, _: &str, _: u64) -> Result<(), StoreError> {
        Err(down())
    }
    async fn credits(&self, _: &str) -> Result<u64, StoreError> {
        Err(down())
    }
    async fn add_credits(&self, _: &str, _: i64) -> Result<Option<u64>, StoreError> {
        Err(down())
    }
    async fn reset_usage(&self, _: &str, _: &[Quota], _: chrono::DateTime<chrono::Utc>) -> Result<(), StoreError> {
        Err(down())
    }
    async fn remember_event(&self, _: &str, _: std::time::Duration) -> Result<bool, StoreError> {
        Err(down())
    }
    async fn forget_event(&self, _: &str) -> Result<(), StoreError> {
        Err(down())
    }
    async fn settle(&self, _: &tollgate::usage::Adjustment) -> Result<tollgate::usage::Settled, StoreError> {
        Err(down())
    }
    async fn record_settled(
        &self,
        _: &str,
        _: chrono::DateTime<chrono::Utc>,
        _: &[String],
        _: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), StoreError> {
        Err(down())
    }
    async fn charge_key(&self) -> Result<[u8; 32], StoreError> {
        Err(down())
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

async fn with_failing_store(on_error: &str) -> TestServer {
    let yaml = spec_config() + &format!("store: {{ backend: memory, on_error: {on_error} }}\n");
    TestServer::start_with(Config::parse(&yaml, "t").unwrap(), Arc::new(DownStore)).await
}

#[tokio::test]
async fn store_failure_fails_closed_with_503_under_on_error_deny() {
    let s = with_failing_store("deny").await;
    let a = search(&s, "pro-key").await;
    assert_problem(&a, 503, "store_unavailable");
    assert_eq!(a.rpc_code, UNAVAILABLE);
    assert!(!a.raw_body.contains("refused"), "internals stay in the log");
    let a = ask(&s, "GET", "/public/x", &[]).await;
    assert!(a.allowed, "public routes need no store");
    s.stop().await;
}

#[tokio::test]
async fn store_failure_fails_open_marked_under_on_error_allow() {
    let s = with_failing_store("allow").await;
    let a = search(&s, "pro-key").await;
    assert!(a.allowed);
    assert_eq!(a.upstream_headers["x-tollgate-degraded"], "store_unavailable");
    assert_eq!(a.metadata["decision"], "fail_open");
    assert!(a.upstream_remove.contains(&"x-api-key".to_string()), "the key is stripped even when failing open");
    assert!(
        a.upstream_remove.contains(&"x-tollgate-account".to_string()),
        "no identity was verified: none may be forged"
    );
    s.stop().await;
}

#[tokio::test]
async fn store_failure_fails_the_rpc_under_on_error_error() {
    let s = with_failing_store("error").await;
    let err = s.client().await.check(http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    s.stop().await;
}
