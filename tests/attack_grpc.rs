//! Attacks straight on the gRPC port (no proxy in front): path confusion,
//! forged identity and headers, the open `Authorize`, wrapping costs, dates
//! and windows that used to panic, oversized ids and keys. Each test asserts
//! what an attacker must never get: a paid route decided as another one, a
//! spend or a disclosure without the right token, a header the upstream
//! trusts, a panic. The same attacks through a real Envoy are in
//! `attack_envoy.rs`; against the stores' arithmetic in `attack_store.rs`.

use envoy_types::ext_authz::v3::pb::CheckResponse;
use prost::bytes::Bytes;
use tollgate::config::Config;
use tollgate::grpc::check_request::{Attributes, CheckRequestView, HeaderEntry, HttpView, MAX_ENTRIES, RequestView};
use tollgate::grpc::pb::authorize_request::{Subject, Target};
use tollgate::grpc::pb::tollgate_client::TollgateClient;
use tollgate::grpc::pb::{
    AccountRequest, AuthorizeRequest, Entitlement, FeatureTarget, PutEntitlementRequest, QuotaOverride, RouteTarget,
    UsageRequest,
};
use tollgate_testkit::raw::{self, Raw};
use tollgate_testkit::{Answer, TestServer, http_check, spec_config, with_jwt};
use tonic::{Code, Request};

const ADMIN: &str = "admin-0123456789abcdef0123456789abcdef";
const SERVICE: &str = "service-0123456789abcdef0123456789abcdef";

fn tokens() -> String {
    format!("server: {{ admin_tokens: [{ADMIN}], service_tokens: [{SERVICE}] }}\n")
}

fn bearer<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

async fn used(s: &TestServer, account: &str) -> u64 {
    let mut c = TollgateClient::new(s.channel().await);
    let u = c
        .get_usage(bearer(UsageRequest { account_id: account.into(), meter: "requests".into() }, Some(ADMIN)))
        .await
        .unwrap()
        .into_inner();
    u.quotas.iter().filter(|q| !q.rate).map(|q| q.used).sum()
}

async fn ask(s: &TestServer, path: &str, headers: &[(&str, &str)]) -> Answer {
    Answer::of(&s.check(http_check("GET", path, headers)).await)
}

/// Every way of writing a paid path as another one is refused before routing.
#[tokio::test]
async fn confusable_paths_are_refused_and_spend_nothing() {
    let s = TestServer::start(&(spec_config() + &tokens())).await;
    let variants = [
        "/public/../v1/ai/chat",
        "/public/%2e%2e/v1/ai/chat",
        "/public/%2E%2E/v1/ai/chat",
        "/public%2f..%2fv1%2fai%2fchat",
        "/public%2F..%2Fv1%2Fai%2Fchat",
        "/public/..%5cv1/ai/chat",
        "/public/..\\v1/ai/chat",
        "/public/..;/v1/ai/chat",
        "/public/./../v1/ai/chat",
        "//v1/ai/chat",
        "/public//../v1/ai/chat",
        "/v1/%61i/chat",
        "/public#/../v1/ai/chat",
        "/public/%00/../v1/ai",
        "/healthz/../v1/ai/chat",
        "/v1/search/../ai/chat",
        "/v1/search/%2e%2e/ai/chat?q=1",
    ];
    for path in variants {
        for headers in [&[][..], &[("x-api-key", "free-key")][..], &[("x-api-key", "pro-key")][..]] {
            let a = ask(&s, path, headers).await;
            assert!(!a.allowed, "{path} with {headers:?} was allowed");
            assert_eq!((a.http_status, a.code()), (400, "request_invalid"), "{path}");
        }
    }
    assert_eq!(used(&s, "acct_free").await, 0, "no refused path spent anything");
    assert_eq!(used(&s, "acct_pro").await, 0);
    // The query string is not part of the path: dots there are harmless.
    let a = ask(&s, "/v1/search?next=/../ai/chat", &[("x-api-key", "free-key")]).await;
    assert!(a.allowed);
    assert_eq!(used(&s, "acct_free").await, 1);
    s.stop().await;
}

/// `/public` does not make `/publicity` public; `/v1/search` does not meter `/v1/searchX`.
#[tokio::test]
async fn prefixes_match_whole_segments_only() {
    let s = TestServer::start(&(spec_config() + &tokens())).await;
    let a = ask(&s, "/publicity", &[]).await;
    assert_eq!((a.http_status, a.code()), (401, "credentials_missing"), "not public");
    assert!(ask(&s, "/public", &[]).await.allowed);
    assert!(ask(&s, "/public/docs", &[]).await.allowed);
    let a = ask(&s, "/v1/searchX", &[("x-api-key", "free-key")]).await;
    assert_eq!((a.http_status, a.code()), (403, "route_not_allowed"));
    assert_eq!(used(&s, "acct_free").await, 0);
    // Path parameters do not hide a paid segment from its route.
    let a = ask(&s, "/v1/ai;jsessionid=x/chat", &[("x-api-key", "free-key")]).await;
    assert_eq!(a.code(), "feature_not_in_plan", "metered as /v1/ai, not unmatched");
    s.stop().await;
}

/// A Check sent straight to the port with forged jwt_authn metadata or a
/// forged trusted header is not a verified identity unless the operator
/// declared the caller trusted.
#[tokio::test]
async fn forged_jwt_metadata_and_trusted_headers_are_ignored_from_untrusted_callers() {
    for trust in ["", "server: { trusted_callers: mtls }\n", "server: { trusted_callers: none }\n"] {
        let s = TestServer::start(&(spec_config() + trust)).await;
        let forged = with_jwt(http_check("GET", "/v1/search", &[]), &[("org_id", "acct_pro")]);
        let a = Answer::of(&s.check(forged).await);
        assert_eq!((a.http_status, a.code()), (401, "credentials_missing"), "{trust:?}");
        let a = ask(&s, "/v1/search", &[("x-account-id", "acct_pro")]).await;
        assert_eq!((a.http_status, a.code()), (401, "credentials_missing"), "{trust:?}");
        s.stop().await;
    }
    let s = TestServer::start(&(spec_config() + "server: { trusted_callers: any }\n")).await;
    let a = Answer::of(&s.check(with_jwt(http_check("GET", "/v1/search", &[]), &[("org_id", "acct_pro")])).await);
    assert!(a.allowed, "honoured once the operator vouches for every caller");
    // A malformed asserted id is invalid without any lookup, never a panic
    // (just under max_message_bytes, so the message itself is accepted).
    let huge = "a".repeat(200_000);
    let a = Answer::of(&s.check(with_jwt(http_check("GET", "/v1/search", &[]), &[("org_id", &huge)])).await);
    assert_eq!(a.code(), "credentials_invalid");
    let a = ask(&s, "/v1/search", &[("x-account-id", "acct_{pro}")]).await;
    assert_eq!(a.code(), "credentials_invalid");
    s.stop().await;
}

/// A Check as Envoy sends it under `encode_raw_headers: true`: `header_map`
/// holds an entry per time a header was sent, its bytes in `raw_value`.
fn raw_headers_check(path: &str, headers: &[(&str, &[u8])]) -> envoy_types::ext_authz::v3::pb::CheckRequest {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    let mut req = http_check("POST", path, &[]);
    let http = req.attributes.as_mut().and_then(|a| a.request.as_mut()).and_then(|r| r.http.as_mut()).unwrap();
    http.headers.clear();
    let entry =
        |(k, v): &(&str, &[u8])| HeaderValue { key: k.to_string(), raw_value: v.to_vec(), ..Default::default() };
    http.header_map = Some(HeaderMap { headers: headers.iter().map(entry).collect() });
    req
}

/// `header_map` is read as Envoy would have put it in `headers`: a
/// credential sent twice is one value (joined by `,`) that no key or
/// account id has, never its first copy; bytes that are not UTF-8 are a
/// value (U+FFFD), never an absent header, so the header is still judged
/// and removed. Read first-wins, two keys paid with the first, and a
/// trusted header the client sent ahead of the proxy's copy was the
/// account; an unreadable credential was skipped and left to the upstream.
#[tokio::test]
async fn raw_headers_are_read_as_envoy_joins_them() {
    let server = format!("server: {{ trusted_callers: any, admin_tokens: [{ADMIN}] }}\n");
    let s = TestServer::start(&(spec_config() + &server)).await;
    let ask_raw =
        async |headers: &[(&str, &[u8])]| Answer::of(&s.check(raw_headers_check("/v1/ai/chat", headers)).await);

    let a = ask_raw(&[("x-api-key", b"pro-key")]).await;
    assert!(a.allowed, "a key sent once is read from header_map: {a:?}");
    assert_eq!(a.upstream_headers.get("x-tollgate-account").map(String::as_str), Some("acct_pro"));
    assert!(a.upstream_remove.iter().any(|h| h == "x-api-key"), "{a:?}");

    let spent = used(&s, "acct_pro").await;
    for (what, headers) in [
        ("two keys", &[("x-api-key", &b"pro-key"[..]), ("x-api-key", b"free-key")][..]),
        ("one key twice", &[("x-api-key", b"pro-key"), ("x-api-key", b"pro-key")]),
        ("two Bearer keys", &[("authorization", b"Bearer pro-key"), ("authorization", b"Bearer free-key")]),
        ("a trusted header twice", &[("x-account-id", b"acct_pro"), ("x-account-id", b"acct_free")]),
        ("an unreadable first credential", &[("x-api-key", b"\xff"), ("authorization", b"Bearer pro-key")]),
    ] {
        let a = ask_raw(headers).await;
        assert_eq!((a.http_status, a.code()), (401, "credentials_invalid"), "{what}: {a:?}");
    }
    assert_eq!((used(&s, "acct_pro").await, used(&s, "acct_free").await), (spent, 0), "nothing spent on them");

    // A credential the first source does not decide is still removed before the upstream.
    for (what, headers) in [
        ("bytes that are not UTF-8", &[("x-api-key", &b"pro-key"[..]), ("authorization", b"Bearer \xff")][..]),
        (
            "Basic, then Bearer",
            &[("x-api-key", b"pro-key"), ("authorization", b"Basic Zm9v"), ("authorization", b"Bearer free-key")],
        ),
    ] {
        let a = ask_raw(headers).await;
        assert!(a.allowed, "{what}: {a:?}");
        assert!(a.upstream_remove.iter().any(|h| h == "authorization"), "{what}: {a:?}");
    }
    // The same, as Envoy sends the last one by default (`headers`, joined).
    let joined =
        http_check("POST", "/v1/ai/chat", &[("x-api-key", "pro-key"), ("authorization", "Basic Zm9v,Bearer free-key")]);
    let a = Answer::of(&s.check(joined).await);
    assert!(a.allowed && a.upstream_remove.iter().any(|h| h == "authorization"), "{a:?}");
    assert_eq!(used(&s, "acct_free").await, 0);
    s.stop().await;
}

/// `Authorize` naming an account, or spending, needs a token; a dry run with
/// an API key is as open as a Check with it.
#[tokio::test]
async fn authorize_by_account_or_spending_needs_a_token() {
    let s = TestServer::start(&(spec_config() + &tokens())).await;
    let mut c = TollgateClient::new(s.channel().await);
    let feature = || Some(Target::Feature(FeatureTarget { feature: "search".into(), meter: "requests".into() }));
    let by_account = |dry_run| AuthorizeRequest {
        subject: Some(Subject::AccountId("acct_free".into())),
        target: feature(),
        cost: 1,
        dry_run,
    };
    let by_key = |dry_run| AuthorizeRequest {
        subject: Some(Subject::ApiKey("free-key".into())),
        target: feature(),
        cost: 1,
        dry_run,
    };
    for (msg, token) in [
        (by_account(false), None),
        (by_account(true), None),
        (by_account(false), Some("wrong-0123456789abcdef0123456789abcdef")),
        (by_account(false), Some(&ADMIN[..ADMIN.len() - 1])),
        (by_key(false), None),
    ] {
        let err = c.authorize(bearer(msg.clone(), token)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{msg:?} with {token:?}");
        assert!(!err.message().contains("acct_free"), "nothing about the account is disclosed");
    }
    assert_eq!(used(&s, "acct_free").await, 0, "no refused call spent");

    let r = c.authorize(bearer(by_key(true), None)).await.unwrap().into_inner();
    assert!(r.allowed, "a dry run with the key itself is open");
    assert_eq!(used(&s, "acct_free").await, 0);
    for token in [SERVICE, ADMIN] {
        assert!(c.authorize(bearer(by_account(false), Some(token))).await.unwrap().into_inner().allowed);
    }
    assert_eq!(used(&s, "acct_free").await, 2);

    // A service token does nothing else.
    let err = c.block_account(bearer(AccountRequest { account_id: "acct_free".into() }, Some(SERVICE))).await;
    assert_eq!(err.unwrap_err().code(), Code::Unauthenticated);
    let err = c.get_entitlement(bearer(AccountRequest { account_id: "acct_free".into() }, Some(SERVICE))).await;
    assert_eq!(err.unwrap_err().code(), Code::Unauthenticated);

    // Every refusal is counted; the token never appears in the metrics.
    let (_, _, metrics) = tollgate_testkit::http_get(s.http, "/metrics").await.unwrap();
    assert!(metrics.contains(r#"tollgate_auth_failures_total{rpc="Authorize",reason="missing"} 3"#), "{metrics}");
    assert!(metrics.contains(r#"tollgate_auth_failures_total{rpc="Authorize",reason="invalid"} 2"#), "{metrics}");
    assert!(metrics.contains(r#"tollgate_auth_failures_total{rpc="BlockAccount",reason="invalid"} 1"#));
    assert!(!metrics.contains(SERVICE) && !metrics.contains("wrong-0123"));
    s.stop().await;
}

/// Costs, ids and keys are bounded before anything is looked up or spent.
#[tokio::test]
async fn authorize_inputs_are_bounded() {
    let s = TestServer::start(&(spec_config() + &tokens())).await;
    let mut c = TollgateClient::new(s.channel().await);
    let feature = || Some(Target::Feature(FeatureTarget { feature: "search".into(), meter: "requests".into() }));
    let cases = [
        (Subject::AccountId("acct_free".into()), u64::MAX, "cost"),
        (Subject::AccountId("acct_free".into()), tollgate::usage::MAX_COST + 1, "cost"),
        // Under max_message_bytes (256 KiB), so the id itself is what is refused.
        (Subject::AccountId("a".repeat(200_000)), 1, "account_id"),
        (Subject::AccountId("acct_{free}".into()), 1, "account_id"),
        (Subject::ApiKey("k".repeat(100_000)), 1, "api_key"),
        (Subject::ApiKey("free key".into()), 1, "api_key"),
    ];
    for (subject, cost, field) in cases {
        let msg = AuthorizeRequest { subject: Some(subject), target: feature(), cost, dry_run: false };
        let err = c.authorize(bearer(msg, Some(SERVICE))).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(err.message().starts_with(field), "{}", err.message());
    }
    assert_eq!(used(&s, "acct_free").await, 0);
    // A message over max_message_bytes is refused before it is decoded.
    let msg = AuthorizeRequest {
        subject: Some(Subject::AccountId("a".repeat(1 << 20))),
        target: feature(),
        cost: 1,
        dry_run: false,
    };
    assert_eq!(c.authorize(bearer(msg, Some(SERVICE))).await.unwrap_err().code(), Code::OutOfRange);
    // A route target goes through the same normal-form check as a Check.
    let msg = AuthorizeRequest {
        subject: Some(Subject::ApiKey("pro-key".into())),
        target: Some(Target::Route(RouteTarget {
            method: "GET".into(),
            path: "/public/../v1/ai/chat".into(),
            host: String::new(),
        })),
        cost: 0,
        dry_run: true,
    };
    let r = c.authorize(bearer(msg, None)).await.unwrap().into_inner();
    assert_eq!((r.allowed, r.http_status, r.code.as_str()), (false, 400, "request_invalid"));
    s.stop().await;
}

/// Forged `x-tollgate-*` headers and every configured credential header are
/// removed before the upstream on public and metered routes; tollgate's own
/// are overwritten, never removed.
#[tokio::test]
async fn forged_tollgate_headers_and_credentials_never_reach_the_upstream() {
    let s = TestServer::start(&spec_config()).await;
    let forged = [
        ("x-tollgate-account", "acct_pro"),
        ("x-tollgate-plan", "enterprise"),
        ("x-tollgate-degraded", "store_unavailable"),
        ("x-tollgate-billing-warning", "none"),
        ("x-tollgate-anything", "1"),
        ("X-Tollgate-Mixed-Case", "1"),
        // Spellings CGI-style upstreams read as x-tollgate-account and -plan.
        ("x-tollgate_account", "acct_forged"),
        ("x_tollgate-plan", "enterprise"),
        ("X_TOLLGATE_DEGRADED", "1"),
    ];
    let mut on_public: Vec<(&str, &str)> = forged.to_vec();
    on_public.extend([("x-api-key", "pro-key"), ("authorization", "Bearer pro-key"), ("x-account-id", "acct_pro")]);
    let a = ask(&s, "/public/docs", &on_public).await;
    assert!(a.allowed);
    for h in [
        "x-tollgate-account",
        "x-tollgate-plan",
        "x-tollgate-degraded",
        "x-tollgate-billing-warning",
        "x-tollgate-anything",
        "x-tollgate-mixed-case",
        "x-tollgate_account",
        "x_tollgate-plan",
        "x_tollgate_degraded",
        "x-api-key",
        "authorization",
        "x-account-id",
    ] {
        assert!(a.upstream_remove.iter().any(|r| r == h), "{h} not removed on a public route: {:?}", a.upstream_remove);
    }
    assert!(a.upstream_headers.is_empty(), "nothing set on a public route: {:?}", a.upstream_headers);

    // Metered: both credentials go, whichever identified the caller.
    let mut metered: Vec<(&str, &str)> = forged.to_vec();
    metered.extend([("x-api-key", "free-key"), ("authorization", "Bearer pro-key")]);
    let a = ask(&s, "/v1/search", &metered).await;
    assert!(a.allowed);
    assert_eq!(a.upstream_headers.get("x-tollgate-account").map(String::as_str), Some("acct_free"));
    assert_eq!(a.upstream_headers.get("x-tollgate-plan").map(String::as_str), Some("free"));
    for h in [
        "x-api-key",
        "authorization",
        "x-tollgate-degraded",
        "x-tollgate-billing-warning",
        "x-tollgate-anything",
        "x-tollgate_account",
        "x_tollgate-plan",
    ] {
        assert!(a.upstream_remove.iter().any(|r| r == h), "{h}: {:?}", a.upstream_remove);
    }
    for h in ["x-tollgate-account", "x-tollgate-plan"] {
        assert!(!a.upstream_remove.iter().any(|r| r == h), "{h} is set, so it must not also be removed");
    }
    // An `authorization` header in another scheme is the upstream's business.
    let a = ask(&s, "/public", &[("authorization", "Basic dXNlcjpwdw==")]).await;
    assert!(!a.upstream_remove.iter().any(|r| r == "authorization"));
    s.stop().await;
}

/// Dates and windows that once panicked in time arithmetic are refused at
/// the door; the ones accepted cannot overflow, and the account keeps working.
#[tokio::test]
async fn extreme_dates_and_windows_are_refused_or_harmless() {
    let s = TestServer::start(&(spec_config() + &tokens())).await;
    let mut c = TollgateClient::new(s.channel().await);
    let put = |e: Entitlement| bearer(PutEntitlementRequest { entitlement: Some(e) }, Some(ADMIN));
    let base = || Entitlement { account_id: "acct_pro".into(), plan: "pro".into(), ..Default::default() };
    let ts = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    let with_quota = |q: QuotaOverride| Entitlement { quota_overrides: vec![q], ..base() };
    let quota = |limit, period: &str| QuotaOverride {
        meter: "requests".into(),
        limit,
        period: period.into(),
        ..Default::default()
    };
    let per = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
    let refused = [
        Entitlement { status: "past_due".into(), past_due_since: ts(8_000_000_000_000), ..base() },
        Entitlement { status: "past_due".into(), past_due_since: ts(-62_000_000_000), ..base() },
        Entitlement { expires_at: ts(i64::MAX), ..base() },
        with_quota(QuotaOverride { per: per(i64::MAX), ..quota(10, "") }),
        // Soft quotas: a ceiling at or below the limit or past 10^15, one without
        // `soft`, a soft rate limit.
        with_quota(QuotaOverride { soft: true, ceiling: Some(10), ..quota(10, "month") }),
        with_quota(QuotaOverride { soft: true, ceiling: Some(u64::MAX), ..quota(10, "month") }),
        with_quota(QuotaOverride { ceiling: Some(20), ..quota(10, "month") }),
        with_quota(QuotaOverride { soft: true, per: per(1), ..quota(10, "") }),
        with_quota(quota(u64::MAX, "month")),
    ];
    for e in refused {
        let err = c.put_entitlement(put(e.clone())).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{e:?}");
    }
    assert!(ask(&s, "/v1/ai/chat", &[("x-api-key", "pro-key")]).await.allowed, "account unchanged and working");

    // The latest date accepted: a payment "failing" in 9999 counts from now, so grace applies once.
    let e = Entitlement {
        status: "past_due".into(),
        past_due_since: ts(253_402_300_799), // 9999-12-31T23:59:59Z
        ..base()
    };
    c.put_entitlement(put(e)).await.unwrap();
    let a = ask(&s, "/v1/ai/chat", &[("x-api-key", "pro-key")]).await;
    assert_eq!(a.metadata.get("decision").map(String::as_str), Some("grace"));
    let (status, _, _) = tollgate_testkit::http_get(s.http, "/healthz").await.unwrap();
    assert_eq!(status, 200, "still alive");
    s.stop().await;
}

/// Header names with multi-byte characters where `x-tollgate-` would end
/// (found by the `check` fuzz target: slicing the name panicked) are
/// answered, and the server keeps serving.
#[tokio::test]
async fn header_names_with_multibyte_characters_do_not_crash_the_check() {
    let s = TestServer::start(&spec_config()).await;
    for name in ["x-tollgate\u{e9}", "\u{1f600}\u{1f600}\u{1f600}", "x-tollgate-\u{e9}", "é"] {
        let a = ask(&s, "/public", &[(name, "1")]).await;
        assert!(a.allowed, "{name:?}");
    }
    assert!(ask(&s, "/v1/search", &[("x-api-key", "free-key")]).await.allowed, "still serving");
    s.stop().await;
}

/// Oversized or odd credentials are invalid without a lookup and never crash.
#[tokio::test]
async fn oversized_credentials_are_invalid_not_fatal() {
    let s = TestServer::start(&spec_config()).await;
    let long = "k".repeat(64 * 1024);
    for key in [long.as_str(), "tab\tkey", "\u{7f}"] {
        let a = ask(&s, "/v1/search", &[("x-api-key", key)]).await;
        assert_eq!((a.http_status, a.code()), (401, "credentials_invalid"), "{}", key.len());
        assert!(!a.raw_body.contains(key), "the key is never echoed");
    }
    assert!(ask(&s, "/v1/search", &[("x-api-key", "free-key")]).await.allowed);
    s.stop().await;
}

/// Admin and service tokens shorter than 32 characters, or the documented
/// placeholder, are refused at load, naming the field but not the token.
#[test]
fn short_or_placeholder_tokens_are_refused_at_load() {
    let short = "server: { admin_tokens: [short-token] }\n";
    let err = Config::parse(&(spec_config() + short), "t.yaml").unwrap_err().to_string();
    assert!(err.contains("server.admin_tokens") && err.contains("at least 32"), "{err}");
    assert!(!err.contains("short-token"), "the token is not echoed: {err}");
    let placeholder = format!("server: {{ service_tokens: [{}] }}\n", tollgate::config::PLACEHOLDER_TOKEN);
    let err = Config::parse(&(spec_config() + &placeholder), "t.yaml").unwrap_err().to_string();
    assert!(err.contains("server.service_tokens") && err.contains("placeholder"), "{err}");
    assert!(Config::parse(&(spec_config() + &tokens()), "t.yaml").is_ok());
}

/// Routes, costs, limits, windows and dates out of range are config errors.
#[test]
fn config_bounds_every_number_and_date() {
    let bad = [
        ("routes:\n  - { match: { path_prefix: /a/../b }, public: true }\n", "routes[0].match.path_prefix"),
        ("routes:\n  - { match: { path_prefix: \"/a%2fb\" }, public: true }\n", "routes[0].match.path_prefix"),
        ("routes:\n  - { match: { path_prefix: /v1 }, cost: 1000000001 }\n", "routes[0].cost"),
        ("plans: { p: { quotas: [ { meter: m, limit: 10, per: 400d } ] } }\n", "plans.p.quotas[0].per"),
        (
            "plans: { p: { quotas: [ { meter: m, limit: 2000000000000000, period: day } ] } }\n",
            "plans.p.quotas[0].limit",
        ),
        ("billing: { grace_period: 500d }\n", "billing.grace_period"),
    ];
    let base = "plans: { p: { features: [f] } }\n";
    for (yaml, field) in bad {
        let text = if yaml.starts_with("plans:") { yaml.to_owned() } else { format!("{base}{yaml}") };
        let err = Config::parse(&text, "t.yaml").unwrap_err().to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
    let past = "accounts:\n  - { id: a, plan: p, status: past_due, past_due_since: \"+200000-01-01T00:00:00Z\" }\n";
    let err = Config::parse(&format!("{base}{past}"), "t.yaml").unwrap_err().to_string();
    assert!(err.contains("accounts[0].past_due_since") || err.contains("accounts[0]"), "{err}");
}

/// `check-config`'s warnings name routes an earlier route makes unreachable.
#[test]
fn shadowed_routes_are_warned_about() {
    let yaml = "plans: { p: { features: [f] } }\nroutes:\n  - { match: { path_prefix: /v1 }, feature: f }\n  - { match: { path_prefix: /v1/search, methods: [GET] }, feature: f }\n  - { match: { path_prefix: /v1x }, feature: f }\n";
    let c = Config::parse(yaml, "t.yaml").unwrap();
    let w = c.warnings();
    assert!(w.iter().any(|w| w.starts_with("routes[1]") && w.contains("routes[0]")), "{w:?}");
    assert!(!w.iter().any(|w| w.starts_with("routes[2]")), "/v1 does not cover /v1x: {w:?}");
}

/// A host route is only as good as the proxy's routing by host: the
/// shipped Envoy configs send every host to one upstream, where a client
/// picking `Host: docs.example.com` would pick a public route. `check-config`
/// says so, naming the routes, and says nothing when no route matches on host.
#[test]
fn routes_matching_on_host_are_warned_about() {
    let routes = "plans: { p: { features: [f] } }\nroutes:\n  - { match: { host: docs.example.com, path_prefix: / }, public: true }\n  - { match: { path_prefix: /v1 }, feature: f }\n  - { match: { host: api.example.com, path: /v2 }, feature: f }\n";
    let w = Config::parse(routes, "t.yaml").unwrap().warnings();
    let host = w
        .iter()
        .find(|w| w.starts_with("routes[0], routes[2]: match on the request's host"))
        .unwrap_or_else(|| panic!("{w:?}"));
    assert!(host.contains("domains: [\"*\"]") && host.contains("a client picks the host"), "{host}");
    let plain = "plans: { p: { features: [f] } }\nroutes:\n  - { match: { path_prefix: /v1 }, feature: f }\n";
    let w = Config::parse(plain, "t.yaml").unwrap().warnings();
    assert!(!w.iter().any(|w| w.contains("host")), "{w:?}");
}

/// Sends `view` as a Check's bytes: what no prost `CheckRequest` can carry
/// (strings that are not UTF-8; any number of entries, as a hand-made
/// client on the gRPC port may send).
async fn check_raw(s: &TestServer, view: CheckRequestView) -> Result<CheckResponse, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(s.channel().await);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<CheckRequestView, CheckResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/envoy.service.auth.v3.Authorization/Check");
    grpc.unary(Request::new(view), path, codec).await.map(tonic::Response::into_inner)
}

/// A Check of a paid route with a valid key, a header `note` and `more` extra
/// headers (empty names and values, 2 bytes each on the wire).
fn raw_check(note: &'static [u8], more: usize) -> CheckRequestView {
    let entry =
        |k: &'static [u8], v: &'static [u8]| HeaderEntry { key: Bytes::from_static(k), value: Bytes::from_static(v) };
    let mut headers = vec![entry(b"x-api-key", b"pro-key"), entry(b"x-note", note)];
    headers.extend(std::iter::repeat_with(|| entry(b"", b"")).take(more));
    let http = HttpView {
        method: Bytes::from_static(b"POST"),
        path: Bytes::from_static(b"/v1/ai/chat"),
        host: Bytes::from_static(b"api.example.com"),
        headers,
        ..Default::default()
    };
    CheckRequestView {
        attributes: Some(Attributes { request: Some(RequestView { http: Some(http) }), ..Default::default() }),
    }
}

/// A Check tollgate cannot read whole — a header that is not UTF-8, more
/// header entries than it keeps — is denied 400 `request_invalid` and
/// spends nothing: never an RPC error, which a proxy under
/// `failure_mode_allow` would let through, and never an allow.
#[tokio::test]
async fn checks_that_cannot_be_read_whole_are_denied_not_errors() {
    let s = TestServer::start(&(spec_config() + &tokens())).await;
    let before = used(&s, "acct_pro").await;
    let answer = check_raw(&s, raw_check(b"a note", MAX_ENTRIES - 2)).await.expect("answered");
    assert!(Answer::of(&answer).allowed, "{MAX_ENTRIES} entries are read: {answer:?}");
    let spent = used(&s, "acct_pro").await;
    assert!(spent > before, "the allow spent");
    for (what, view) in [
        ("a header value that is not UTF-8", raw_check(b"\xff", 0)),
        ("one entry over the bound", raw_check(b"a note", MAX_ENTRIES - 1)),
        ("ten thousand entries", raw_check(b"a note", 10_000)),
    ] {
        let answer = check_raw(&s, view).await.unwrap_or_else(|e| panic!("{what}: an RPC error {e:?}"));
        let a = Answer::of(&answer);
        assert_eq!((a.http_status, a.code()), (400, "request_invalid"), "{what}: {answer:?}");
    }
    assert_eq!(used(&s, "acct_pro").await, spent, "nothing spent on them");
    s.stop().await;
}

/// A call that always needs the admin token is refused before its message
/// is read: without it (or with a service token), a `PutEntitlement`
/// prost cannot decode (an account id that is not UTF-8) is
/// UNAUTHENTICATED, not a decode error, and so is one of 100,000 empty
/// quota overrides (2 bytes each on the wire, ~90 decoded). With the admin
/// token the same bytes reach the decoder and the handler.
#[tokio::test]
async fn admin_calls_are_refused_before_their_message_is_read() {
    let s = TestServer::start(&(spec_config() + &tokens())).await;
    const PUT: &str = "/tollgate.v1.Tollgate/PutEntitlement";
    // PutEntitlementRequest { entitlement (1): Entitlement { account_id (1): "\xff" } }.
    let unreadable = Raw(vec![0x0a, 0x03, 0x0a, 0x01, 0xff]);
    // PutEntitlementRequest { entitlement (1): Entitlement { quota_overrides (8): {} × 100,000 } }.
    let overrides: Vec<u8> = [0x42, 0x00].repeat(100_000);
    let mut big = vec![0x0a];
    prost::encoding::encode_varint(overrides.len() as u64, &mut big);
    big.extend(overrides);
    let big = Raw(big);
    for token in [None, Some(SERVICE)] {
        for message in [&unreadable, &big] {
            let err = raw::unary(s.channel().await, PUT, bearer(message.clone(), token)).await.unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        }
    }
    let err = raw::unary(s.channel().await, PUT, bearer(unreadable, Some(ADMIN))).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "decoded once the token is right: {err:?}");
    let err = raw::unary(s.channel().await, PUT, bearer(big, Some(ADMIN))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "and handled: {err:?}");
    // Refused as the handler refuses: counted under the method's name.
    let (_, _, metrics) = tollgate_testkit::http_get(s.http, "/metrics").await.unwrap();
    for reason in ["missing", "invalid"] {
        let line = format!(r#"tollgate_auth_failures_total{{rpc="PutEntitlement",reason="{reason}"}} 2"#);
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    // Every method: the eight that always need the admin token refuse a
    // message no prost type reads (field 1 holding 0xff) as the handler
    // refuses; the others read it first (`Authorize` with a key needs no
    // token; reads may be open), so prost's decode error comes back.
    let admin_only = [
        "PutEntitlement",
        "BlockAccount",
        "UnblockAccount",
        "SetCredits",
        "AddCredits",
        "CreateApiKey",
        "RevokeApiKey",
        "ResetUsage",
    ];
    for method in tollgate::grpc::API_METHODS {
        let path: &'static str = format!("/{method}").leak();
        let err = raw::unary(s.channel().await, path, Request::new(Raw(vec![0x0a, 0x01, 0xff]))).await.unwrap_err();
        if admin_only.iter().any(|m| method.ends_with(&format!("/{m}"))) {
            assert_eq!(err.code(), Code::Unauthenticated, "{method}: {err:?}");
            assert_eq!(err.message(), "this call needs authorization: Bearer <admin token>", "{method}");
        } else {
            assert_eq!(err.code(), Code::Internal, "{method} reads its message first: {err:?}");
        }
    }
}
