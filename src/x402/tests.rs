use super::*;

fn settings() -> Settings {
    Settings {
        facilitator: "http://127.0.0.1:1".into(),
        timeout: Duration::from_secs(1),
        scheme: "exact".into(),
        network: "eip155:84532".into(),
        asset: "0x036CbD53842c5426634e7929541eC2318f3dCF7e".into(),
        pay_to: "0x209693Bc6afc0C5328bA36FaF03C514EF312287C".into(),
        max_timeout_seconds: 60,
        extra: BTreeMap::from([("name".into(), "USDC".into()), ("version".into(), "2".into())]),
        on_facilitator_error: OnFacilitatorError::Unavailable,
        plan_prices: BTreeMap::from([("free".into(), Price::parse("5000").unwrap())]),
    }
}

fn payload(requirement: &Value, nonce: &str) -> String {
    STANDARD.encode(
        json!({
            "x402Version": 2,
            "accepted": requirement,
            "payload": { "signature": "0xabc", "authorization": {
                "from": "0x857b06519E91e3A54538791bDbb0E22373e36b66",
                "nonce": format!("0x{:0>64}", nonce.trim_start_matches("0x")),
                "value": requirement["amount"],
            } },
        })
        .to_string(),
    )
}

#[test]
fn prices_are_whole_positive_atomic_units() {
    assert_eq!(Price::parse("10000").map(|p| p.units()), Some(10_000));
    assert_eq!(Price::parse("1000000000000000000").map(|p| p.units()), Some(MAX_PRICE));
    for bad in ["", "0", "007", "-1", "1.5", "1e3", " 1", "1000000000000000001", "99999999999999999999", "١"] {
        assert_eq!(Price::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn only_denials_paying_for_the_call_cures_get_a_challenge() {
    let cured: Vec<Code> = Code::ALL.into_iter().filter(|c| curable(*c)).collect();
    assert_eq!(cured, [Code::InsufficientCredits, Code::QuotaExhausted, Code::PaymentRequired]);
    assert!(cured.iter().all(|c| c.http_status() == 402));
}

#[test]
fn a_payable_route_asks_a_caller_without_credentials_to_pay() {
    let missing = Decision::deny(Code::CredentialsMissing);
    assert_eq!(demand(missing.clone(), true).verdict, Verdict::Deny(Code::PaymentRequired));
    assert_eq!(demand(missing, false).verdict, Verdict::Deny(Code::CredentialsMissing));
    // A wrong key is not a missing one: still 401.
    let invalid = Decision::deny(Code::CredentialsInvalid);
    assert_eq!(demand(invalid, true).verdict, Verdict::Deny(Code::CredentialsInvalid));
}

#[test]
fn the_route_price_wins_over_the_plan_price() {
    let s = settings();
    let route = RouteX402 { price: Price::parse("100"), payable: false };
    assert_eq!(price_for(&s, Some(&route), Some("free")).map(Price::as_str), Some("100"));
    assert_eq!(price_for(&s, None, Some("free")).map(Price::as_str), Some("5000"));
    assert_eq!(price_for(&s, None, Some("pro")), None);
    assert_eq!(price_for(&s, None, None), None);
}

#[test]
fn the_challenge_decodes_to_the_v2_object() {
    let s = settings();
    let r = requirement(&s, &Price::parse("10000").unwrap());
    let header = challenge(&r, "https://api.example.com/v1/search", "/v1/search*", Some("invalid_signature"));
    let o: Value = serde_json::from_slice(&STANDARD.decode(header).unwrap()).unwrap();
    assert_eq!(o["x402Version"], 2);
    assert_eq!(o["error"], "invalid_signature");
    assert_eq!(o["resource"]["url"], "https://api.example.com/v1/search");
    let a = &o["accepts"][0];
    assert_eq!(
        (a["scheme"].as_str(), a["network"].as_str(), a["amount"].as_str(), a["maxTimeoutSeconds"].as_u64()),
        (Some("exact"), Some("eip155:84532"), Some("10000"), Some(60))
    );
    assert_eq!(a["payTo"], s.pay_to);
    assert_eq!(a["extra"]["name"], "USDC");
}

#[test]
fn a_payment_is_read_only_when_it_pays_exactly_what_is_asked() {
    let s = settings();
    let r = requirement(&s, &Price::parse("10000").unwrap());
    let ok = parse(&payload(&r, "0xAA"), &r).unwrap();
    // The nonce decides the replay key, whatever else differs (case folded).
    let mut other = r.clone();
    other["payTo"] = json!(s.pay_to.to_lowercase());
    assert_eq!(parse(&payload(&other, "0xaa"), &r).unwrap().replay_key, ok.replay_key);
    assert_ne!(parse(&payload(&r, "0xab"), &r).unwrap().replay_key, ok.replay_key);

    for (field, value) in [
        ("amount", json!("9999")),
        ("amount", json!(10000)),
        ("network", json!("eip155:8453")),
        ("asset", json!("0xdead")),
        ("payTo", json!("0xattacker")),
        ("scheme", json!("upto")),
    ] {
        let mut cheap = r.clone();
        cheap[field] = value.clone();
        assert_eq!(parse(&payload(&cheap, "0x1"), &r).unwrap_err(), Refusal::Mismatch, "{field} = {value}");
    }
    let v1 = STANDARD.encode(json!({ "x402Version": 1, "accepted": r }).to_string());
    assert_eq!(parse(&v1, &r).unwrap_err(), Refusal::Version);
    let long = "A".repeat(MAX_PAYLOAD + 4);
    for garbage in ["", "!!!not base64!!!", &STANDARD.encode("not json"), &STANDARD.encode("[1,2]"), &long] {
        assert_eq!(parse(garbage, &r).unwrap_err(), Refusal::Malformed, "{garbage:.40}");
    }
}

#[test]
fn facilitator_strings_are_bounded_before_they_go_anywhere() {
    assert_eq!(field(&json!("0xAbC123")), Some("0xAbC123".into()));
    assert_eq!(field(&json!("insufficient_funds")), Some("insufficient_funds".into()));
    for bad in
        [json!(""), json!("a b"), json!("x\r\nSet-Cookie: y"), json!("\"quoted\""), json!(7), json!("a".repeat(129))]
    {
        assert_eq!(field(&bad), None, "{bad}");
    }
}

#[test]
fn the_receipt_decodes_to_the_settlement() {
    let paid = Paid { payer: "0xP".into(), transaction: "0xT".into(), network: "eip155:84532".into(), amount: 5 };
    let o: Value = serde_json::from_slice(&STANDARD.decode(response(&paid)).unwrap()).unwrap();
    assert_eq!(o, json!({ "success": true, "payer": "0xP", "transaction": "0xT", "network": "eip155:84532" }));
}

#[test]
fn a_payment_s_ids_fit_the_store_s_rules() {
    let s = settings();
    let r = requirement(&s, &Price::parse("1").unwrap());
    let p = parse(&payload(&r, "0x1"), &r).unwrap();
    let event = event_id(&p);
    assert!(event.len() <= 64 && event.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'), "{event}");
    assert!(replay_id(&p).starts_with("x402:") && replay_id(&p).len() == 69);
}

#[test]
fn a_payment_without_an_eip3009_authorization_or_in_another_spelling_is_refused_or_the_same() {
    let s = settings();
    let r = requirement(&s, &Price::parse("1").unwrap());
    // No payer or nonce: a re-encoded copy could not be told apart.
    for auth in [json!({}), json!({ "nonce": format!("0x{:064}", 1) }), json!({ "from": "0x1", "nonce": "0x1" })] {
        let p = STANDARD
            .encode(json!({ "x402Version": 2, "accepted": r, "payload": { "authorization": auth } }).to_string());
        assert_eq!(parse(&p, &r).unwrap_err(), Refusal::Malformed, "{auth}");
    }
    // The same payment with spaces, another key order and an extra field: the same key.
    let p = parse(&payload(&r, "0x7"), &r).unwrap();
    let mut v: Value = serde_json::from_slice(&STANDARD.decode(payload(&r, "0x7")).unwrap()).unwrap();
    v["extra"] = json!("padding");
    let pretty = STANDARD.encode(serde_json::to_string_pretty(&v).unwrap());
    assert_eq!(parse(&pretty, &r).unwrap().replay_key, p.replay_key);
}
