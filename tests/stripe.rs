//! Stripe webhooks end to end: real signed payloads (built here, in the
//! shapes Stripe sends) posted to `/webhooks/stripe`, and their effect on Checks.

use std::net::SocketAddr;

use serde_json::{Value, json};
use tollgate::entitlement::Status;
use tollgate_testkit::http::request_with_body;
use tollgate_testkit::redis::RedisServer;
use tollgate_testkit::{Answer, TestServer, http_check, spec_config};

const SECRET: &str = "whsec_test_current";

fn stripe_config(extra: &str) -> String {
    spec_config().replace(
        "  grace_period: 72h\n",
        &format!(
            "  grace_period: 72h\n  stripe:\n    webhook_secrets: [whsec_test_previous, {SECRET}]\n    tolerance: 300s\n    prices: {{ price_pro_monthly: pro, price_free: free }}\n    features: {{ ai-access: ai }}\n{extra}"
        ),
    )
    .replace("{ id: acct_free, plan: free, api_keys: [free-key] }", "{ id: acct_free, plan: free, api_keys: [free-key], stripe_customer: cus_free }")
}

async fn post(addr: SocketAddr, body: &str, signature: Option<&str>) -> (u16, Value) {
    let mut headers = vec![("Content-Type", "application/json")];
    headers.extend(signature.map(|v| ("Stripe-Signature", v)));
    let r = request_with_body(addr, "POST", "/webhooks/stripe", &headers, body).await.unwrap();
    (r.status, serde_json::from_str(&r.body).unwrap_or(Value::Null))
}

/// Posts an event signed as Stripe signs it: HMAC-SHA256 over `t.payload`.
async fn deliver(s: &TestServer, event: &Value) -> (u16, Value) {
    let body = event.to_string();
    let sig = tollgate::stripe::sign(body.as_bytes(), SECRET, chrono::Utc::now().timestamp());
    post(s.http, &body, Some(&sig)).await
}

fn event(id: &str, kind: &str, created: i64, object: Value) -> Value {
    json!({
        "id": id,
        "object": "event",
        "api_version": "2024-06-20",
        "created": created,
        "livemode": false,
        "pending_webhooks": 1,
        "type": kind,
        "data": { "object": object }
    })
}

fn subscription(status: &str, price: &str) -> Value {
    json!({
        "id": "sub_1", "object": "subscription", "customer": "cus_free", "status": status,
        "metadata": { "account_id": "acct_free" },
        "items": { "object": "list", "data": [ { "id": "si_1", "object": "subscription_item",
            "price": { "id": price, "object": "price", "recurring": { "interval": "month" } } } ] }
    })
}

fn invoice() -> Value {
    json!({ "id": "in_1", "object": "invoice", "customer": "cus_free", "subscription": "sub_1",
            "parent": { "subscription_details": { "metadata": { "account_id": "acct_free" } } } })
}

async fn account(s: &TestServer) -> tollgate::entitlement::Account {
    (*s.store.account("acct_free").await.unwrap().unwrap()).clone()
}

async fn search(s: &TestServer) -> Answer {
    Answer::of(&s.check(http_check("GET", "/v1/search", &[("x-api-key", "free-key")])).await)
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test]
async fn unsigned_badly_signed_and_stale_deliveries_are_400_and_change_nothing() {
    let s = TestServer::start(&stripe_config("")).await;
    let e = event("evt_bad", "customer.subscription.updated", now(), subscription("active", "price_pro_monthly"))
        .to_string();
    assert_eq!(post(s.http, &e, None).await.0, 400);
    let wrong = tollgate::stripe::sign(e.as_bytes(), "whsec_someone_else", now());
    assert_eq!(post(s.http, &e, Some(&wrong)).await.0, 400);
    let stale = tollgate::stripe::sign(e.as_bytes(), SECRET, now() - 301);
    assert_eq!(post(s.http, &e, Some(&stale)).await.0, 400);
    let tampered = tollgate::stripe::sign(e.as_bytes(), SECRET, now());
    assert_eq!(post(s.http, &e.replace("price_pro_monthly", "price_free"), Some(&tampered)).await.0, 400);
    assert_eq!(&*account(&s).await.plan, "free", "nothing applied");
    // The previous secret still verifies (rotation).
    let old = tollgate::stripe::sign(e.as_bytes(), "whsec_test_previous", now());
    assert_eq!(post(s.http, &e, Some(&old)).await.0, 200);
    assert_eq!(&*account(&s).await.plan, "pro");
    // Counted for the alert on signature failures (deploy/monitoring).
    let metric = async |result: &str| {
        tollgate_testkit::http::metric(s.http, &format!("tollgate_webhooks_total{{result=\"{result}\"}}")).await
    };
    assert_eq!((metric("signature").await, metric("applied").await), (4.0, 1.0));
    s.stop().await;
}

#[tokio::test]
async fn subscription_events_change_plan_and_status_and_checks_follow() {
    let s = TestServer::start(&stripe_config("")).await;
    let t = now() - 60;
    let (status, body) =
        deliver(&s, &event("evt_1", "customer.subscription.updated", t, subscription("active", "price_pro_monthly")))
            .await;
    assert_eq!((status, &body["applied"]), (200, &json!(true)), "{body}");
    assert_eq!(search(&s).await.upstream_headers["x-tollgate-plan"], "pro");

    deliver(&s, &event("evt_2", "invoice.payment_failed", t + 1, invoice())).await;
    let a = account(&s).await;
    assert_eq!((a.status, a.past_due_since.map(|d| d.timestamp())), (Status::PastDue, Some(t + 1)));
    assert_eq!(search(&s).await.metadata["decision"], "grace");

    deliver(&s, &event("evt_3", "invoice.paid", t + 2, invoice())).await;
    assert_eq!(account(&s).await.status, Status::Active);
    assert_eq!(search(&s).await.metadata["decision"], "allowed");

    deliver(&s, &event("evt_4", "customer.subscription.paused", t + 3, subscription("paused", "price_pro_monthly")))
        .await;
    assert_eq!(search(&s).await.code(), "subscription_inactive");
    deliver(&s, &event("evt_5", "customer.subscription.resumed", t + 4, subscription("active", "price_pro_monthly")))
        .await;
    assert!(search(&s).await.allowed);

    deliver(&s, &event("evt_6", "customer.subscription.deleted", t + 5, subscription("canceled", "price_pro_monthly")))
        .await;
    let a = search(&s).await;
    assert_eq!((a.http_status, a.code()), (402, "subscription_inactive"));
    s.stop().await;
}

#[tokio::test]
async fn a_failed_payment_long_ago_is_past_grace() {
    let s = TestServer::start(&stripe_config("")).await;
    let four_days_ago = now() - 4 * 86400;
    deliver(&s, &event("evt_old_fail", "invoice.payment_failed", four_days_ago, invoice())).await;
    assert_eq!(search(&s).await.code(), "payment_overdue");
    s.stop().await;
}

#[tokio::test]
async fn replays_change_nothing_and_late_events_never_roll_back() {
    let s = TestServer::start(&stripe_config("")).await;
    let t = now() - 60;
    let canceled =
        event("evt_new", "customer.subscription.updated", t + 10, subscription("canceled", "price_pro_monthly"));
    let active = event("evt_older", "customer.subscription.updated", t, subscription("active", "price_pro_monthly"));
    assert_eq!(deliver(&s, &canceled).await.1["applied"], true);
    let (status, body) = deliver(&s, &active).await;
    assert_eq!((status, body["reason"].as_str()), (200, Some("older than the last applied event")));
    assert_eq!(account(&s).await.status, Status::Canceled);
    let (status, body) = deliver(&s, &canceled).await;
    assert_eq!((status, body["reason"].as_str()), (200, Some("duplicate event")));
    s.stop().await;
}

#[tokio::test]
async fn entitlement_summaries_grant_features() {
    let s = TestServer::start(&stripe_config("")).await;
    let ai = || http_check("POST", "/v1/ai/x", &[("x-api-key", "free-key")]);
    assert_eq!(Answer::of(&s.check(ai()).await).code(), "feature_not_in_plan");
    let summary = json!({ "object": "entitlements.active_entitlement_summary", "customer": "cus_free",
        "entitlements": { "object": "list", "data": [ { "id": "ent_1", "object": "entitlements.active_entitlement",
            "feature": "feat_1", "lookup_key": "ai-access" } ] } });
    deliver(&s, &event("evt_ent", "entitlements.active_entitlement_summary.updated", now(), summary)).await;
    assert_eq!(account(&s).await.extra_features, ["ai".to_string()].into());
    assert_ne!(Answer::of(&s.check(ai()).await).code(), "feature_not_in_plan");
    s.stop().await;
}

#[tokio::test]
async fn accounts_are_found_by_subscription_metadata_when_configured() {
    let s = TestServer::start(&stripe_config("    account_from: metadata:account_id\n")).await;
    let sub = subscription("active", "price_pro_monthly");
    assert_eq!(deliver(&s, &event("evt_m", "customer.subscription.created", now(), sub)).await.1["applied"], true);
    assert_eq!(&*account(&s).await.plan, "pro");
    s.stop().await;
}

#[tokio::test]
async fn metadata_naming_an_account_of_another_customer_moves_nothing() {
    let s = TestServer::start(&stripe_config("    account_from: metadata:account_id\n")).await;
    let mut sub = subscription("active", "price_pro_monthly");
    sub["customer"] = json!("cus_attacker");
    let (status, body) = deliver(&s, &event("evt_steal", "customer.subscription.created", now(), sub)).await;
    assert_eq!(
        (status, body["applied"].as_bool(), body["reason"].as_str()),
        (200, Some(false), Some("customer does not match the account")),
        "acknowledged, so Stripe stops retrying, but not applied"
    );
    let a = account(&s).await;
    assert_eq!((&*a.plan, a.stripe_customer.as_deref()), ("free", Some("cus_free")));
    let mut fail = invoice();
    fail["customer"] = json!("cus_attacker");
    deliver(&s, &event("evt_steal_2", "invoice.payment_failed", now(), fail)).await;
    assert_eq!(account(&s).await.status, Status::Active, "nor a payment failure of another customer");
    s.stop().await;
}

#[tokio::test]
async fn metadata_never_binds_a_customer_to_an_account_that_has_none() {
    let s = TestServer::start(&stripe_config("    account_from: metadata:account_id\n")).await;
    let mut sub = subscription("active", "price_pro_monthly");
    sub["customer"] = json!("cus_attacker");
    sub["metadata"] = json!({ "account_id": "acct_canceled" });
    let (status, body) = deliver(&s, &event("evt_bind", "customer.subscription.updated", now(), sub)).await;
    assert_eq!((status, body["reason"].as_str()), (200, Some("customer does not match the account")));
    let a = s.store.account("acct_canceled").await.unwrap().unwrap();
    assert_eq!((a.status, a.stripe_customer.as_deref()), (Status::Canceled, None), "still canceled, still unbound");
    assert_eq!(s.store.account_for_customer("cus_attacker").await.unwrap(), None);
    s.stop().await;
}

#[tokio::test]
async fn metadata_that_is_no_account_id_is_refused() {
    let s = TestServer::start(&stripe_config("    account_from: metadata:account_id\n")).await;
    for (i, bad) in ["{acct_free}", "acct free", &"a".repeat(129)].into_iter().enumerate() {
        let mut sub = subscription("active", "price_pro_monthly");
        sub["metadata"] = json!({ "account_id": bad });
        let (status, _) =
            deliver(&s, &event(&format!("evt_meta_{i}"), "customer.subscription.updated", now(), sub)).await;
        assert_eq!(status, 400, "{bad}");
    }
    assert_eq!(&*account(&s).await.plan, "free");
    s.stop().await;
}

#[tokio::test]
async fn events_created_out_of_range_are_refused_without_panicking() {
    let s = TestServer::start(&stripe_config("")).await;
    for (i, created) in [i64::MAX, i64::MIN, -1, 253_402_300_800, 8_210_266_876_799].into_iter().enumerate() {
        let e = event(&format!("evt_time_{i}"), "invoice.payment_failed", created, invoice());
        let (status, body) = deliver(&s, &e).await;
        assert_eq!(status, 400, "created {created}: {body}");
    }
    let a = account(&s).await;
    assert_eq!((a.status, a.past_due_since, a.billing_event_at), (Status::Active, None, None), "nothing applied");
    // The server is still up, and a sane event still applies after them.
    let e = event("evt_time_ok", "invoice.payment_failed", now(), invoice());
    assert_eq!(deliver(&s, &e).await.1["applied"], true);
    s.stop().await;
}

#[tokio::test]
async fn events_with_ids_or_customers_out_of_bounds_are_refused() {
    let s = TestServer::start(&stripe_config("")).await;
    let long_id = format!("evt_{}", "x".repeat(300));
    let (status, _) = deliver(&s, &event(&long_id, "invoice.paid", now(), invoice())).await;
    assert_eq!(status, 400);
    let mut sub = subscription("active", "price_pro_monthly");
    sub["customer"] = json!("cus_free\r\nx");
    assert_eq!(deliver(&s, &event("evt_cus", "customer.subscription.updated", now(), sub)).await.0, 400);
    assert_eq!(&*account(&s).await.plan, "free");
    s.stop().await;
}

#[tokio::test]
async fn unknown_customers_and_unused_event_types_are_acknowledged() {
    let s = TestServer::start(&stripe_config("")).await;
    let mut sub = subscription("active", "price_pro_monthly");
    sub["customer"] = json!("cus_nobody");
    let (status, body) = deliver(&s, &event("evt_u", "customer.subscription.updated", now(), sub)).await;
    assert_eq!((status, body["applied"].as_bool()), (200, Some(false)));
    let (status, body) =
        deliver(&s, &event("evt_c", "charge.refunded", now(), json!({ "customer": "cus_free" }))).await;
    assert_eq!((status, body["reason"].as_str()), (200, Some("event type not used")));
    let (status, _) = post(s.http, "not json", Some(&tollgate::stripe::sign(b"not json", SECRET, now()))).await;
    assert_eq!(status, 400);
    s.stop().await;
}

#[tokio::test]
async fn replays_are_recognised_across_replicas_through_redis() {
    let redis = RedisServer::start();
    let yaml = stripe_config("") + &format!("store: {{ backend: redis, url: \"{}\", timeout: 1s }}\n", redis.url());
    let a = TestServer::start_configured(&yaml, true).await;
    let b = TestServer::start_configured(&yaml, false).await;
    let e = event("evt_shared", "customer.subscription.updated", now(), subscription("active", "price_pro_monthly"));
    assert_eq!(deliver(&a, &e).await.1["applied"], true);
    assert_eq!(deliver(&b, &e).await.1["reason"], "duplicate event");
    assert!(redis.cli(&["EXISTS", "tollgate:event:evt_shared"]).unwrap().trim() == "1");
    let ttl: i64 = redis.cli(&["TTL", "tollgate:event:evt_shared"]).unwrap().trim().parse().unwrap();
    assert!(ttl > 300, "remembered beyond the tolerance window: {ttl}s");
    assert_eq!(search(&b).await.upstream_headers["x-tollgate-plan"], "pro");
    a.stop().await;
    b.stop().await;
}
