use super::*;

fn config() -> StripeConfig {
    StripeConfig {
        webhook_secrets_env: "X".into(),
        webhook_secrets: crate::config::Secrets(vec![]),
        tolerance: Duration::from_secs(300),
        account_from: "customer".into(),
        prices: [("price_pro".to_string(), "pro".to_string())].into(),
        features: [("ai-access".to_string(), "ai".to_string())].into(),
    }
}

fn event(kind: &str, created: i64, object: Value) -> Event {
    Event { id: "evt_1".into(), kind: kind.into(), created, data: EventData { object } }
}

#[test]
fn signatures_verify_with_any_secret_and_any_v1() {
    let body = br#"{"id":"evt_1"}"#;
    let secrets = vec!["whsec_old".to_string(), "whsec_new".to_string()];
    let good = sign(body, "whsec_new", 1000);
    assert_eq!(verify(&good, body, &secrets, Duration::from_secs(300), 1100), Ok(()));
    let two = format!("{},v1={}", sign(body, "whsec_other", 1000), good.split("v1=").nth(1).unwrap());
    assert_eq!(verify(&two, body, &secrets, Duration::from_secs(300), 1000), Ok(()));
    assert_eq!(verify(&good, b"{}", &secrets, Duration::from_secs(300), 1000), Err(SignatureError::Mismatch));
    assert_eq!(verify(&good, body, &secrets, Duration::from_secs(300), 1301), Err(SignatureError::Stale));
    assert_eq!(verify("v1=abcd", body, &secrets, Duration::from_secs(300), 1000), Err(SignatureError::Malformed));
    assert_eq!(verify(&good, body, &[], Duration::from_secs(300), 1000), Err(SignatureError::NoSecret));
}

#[test]
fn subscription_updates_set_status_and_plan() {
    let a = Account { id: "a".into(), plan: "free".into(), ..Account::default() };
    let e = event(
        "customer.subscription.updated",
        1_700_000_000,
        serde_json::json!({"status": "past_due", "items": {"data": [{"price": {"id": "price_pro"}}]}}),
    );
    let b = apply(&e, &a, &config()).unwrap();
    assert_eq!((&*b.plan, b.status), ("pro", Status::PastDue));
    assert_eq!(b.past_due_since, e.created_at());
    assert_eq!(b.billing_event_at, e.created_at());
    let later = event("customer.subscription.updated", 1_700_000_100, serde_json::json!({"status": "past_due"}));
    assert_eq!(
        apply(&later, &b, &config()).unwrap().past_due_since,
        e.created_at(),
        "grace counts from the first failure"
    );
    let paid = event("invoice.paid", 1_700_000_200, serde_json::json!({}));
    let c = apply(&paid, &b, &config()).unwrap();
    assert_eq!((c.status, c.past_due_since), (Status::Active, None));
}

#[test]
fn every_stripe_status_maps() {
    for (s, want) in [
        ("active", Status::Active),
        ("trialing", Status::Trialing),
        ("past_due", Status::PastDue),
        ("canceled", Status::Canceled),
        ("unpaid", Status::Unpaid),
        ("incomplete", Status::Unpaid),
        ("incomplete_expired", Status::Expired),
        ("paused", Status::Paused),
    ] {
        assert_eq!(status_of(s), Some(want), "{s}");
    }
    assert_eq!(status_of("weird"), None);
}

#[test]
fn entitlement_summaries_replace_extra_features() {
    let a = Account { extra_features: ["old".to_string()].into(), ..Account::default() };
    let e = event(
        "entitlements.active_entitlement_summary.updated",
        1,
        serde_json::json!({"entitlements": {"data": [{"lookup_key": "ai-access"}, {"lookup_key": "export"}]}}),
    );
    let b = apply(&e, &a, &config()).unwrap();
    assert_eq!(b.extra_features, ["ai".to_string(), "export".to_string()].into());
}

#[test]
fn signature_timestamps_at_the_ends_of_i64_are_stale_not_a_panic() {
    let body = br#"{"id":"evt_1"}"#;
    let secrets = vec!["whsec".to_string()];
    for (t, now) in [(i64::MIN, i64::MAX), (i64::MAX, i64::MIN), (i64::MIN, 0), (i64::MAX, -1), (-1, i64::MAX)] {
        let r = verify(&sign(body, "whsec", t), body, &secrets, Duration::from_secs(300), now);
        assert_eq!(r, Err(SignatureError::Stale), "t={t} now={now}");
    }
}

#[test]
fn only_the_first_signatures_of_a_header_are_tried() {
    let body = br#"{"id":"evt_1"}"#;
    let secrets = vec!["whsec".to_string()];
    let good = sign(body, "whsec", 1000);
    let junk = ",v1=00".repeat(MAX_SIGNATURES);
    let late = format!("t=1000{junk},{}", good.split(',').nth(1).unwrap());
    assert_eq!(verify(&late, body, &secrets, Duration::from_secs(300), 1000), Err(SignatureError::Mismatch));
}

#[test]
fn events_created_out_of_range_change_nothing_and_do_not_panic() {
    let a = Account { id: "a".into(), plan: "free".into(), ..Account::default() };
    for created in [i64::MIN, i64::MAX, -1, 253_402_300_800, 8_210_266_876_799] {
        let e = event("invoice.payment_failed", created, serde_json::json!({"customer": "cus_1"}));
        assert_eq!(e.created_at(), None, "{created}");
        assert!(e.check().is_err(), "{created}");
        assert_eq!(apply(&e, &a, &config()), None, "{created}");
    }
    let last = event("invoice.payment_failed", 253_402_300_799, serde_json::json!({"customer": "cus_1"}));
    assert!(last.check().is_ok() && apply(&last, &a, &config()).is_some(), "max_time itself is fine");
}

#[test]
fn events_with_unbounded_fields_are_refused() {
    let ok = event("customer.subscription.updated", 1_700_000_000, serde_json::json!({"customer": "cus_1"}));
    assert_eq!(ok.check(), Ok(()));
    let with = |f: &dyn Fn(&mut Event)| {
        let mut e = ok.clone();
        f(&mut e);
        e.check()
    };
    assert!(with(&|e| e.id = "evt_".to_string() + &"x".repeat(300)).is_err());
    assert!(with(&|e| e.id = "evt 1".into()).is_err());
    assert!(with(&|e| e.id = String::new()).is_err());
    assert!(with(&|e| e.kind = "invoice.paid\n".into()).is_err());
    assert!(with(&|e| e.data.object = serde_json::json!({"customer": "cus_{x}"})).is_err());
    assert!(with(&|e| e.data.object = serde_json::json!({"customer": "c".repeat(256)})).is_err());
    let many: Vec<Value> = (0..=MAX_ITEMS).map(|i| serde_json::json!({"lookup_key": format!("f{i}")})).collect();
    assert!(with(&|e| e.data.object = serde_json::json!({"entitlements": {"data": many.clone()}})).is_err());
    let long = serde_json::json!({"entitlements": {"data": [{"lookup_key": "k".repeat(129)}]}});
    assert!(with(&|e| e.data.object = long.clone()).is_err());
}
