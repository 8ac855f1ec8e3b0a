//! x402 end to end: a real Envoy (`deploy/envoy/envoy.yaml`) in front of
//! tollgate and an echo upstream, and a stand-in facilitator (a real HTTP
//! server with the v2 shapes; the public ones cannot be reached from here).
//! A 402 a payment cures carries `PAYMENT-REQUIRED`; a paid retry is settled
//! once and allowed, its replay refused; every bad payment and a late
//! facilitator get the documented answer and spend nothing; and an
//! account-less caller never gets through a payable route without a settled
//! payment, however it tries.

use tollgate_testkit::envoy::{self, Options, Response, Stack};
use tollgate_testkit::facilitator::{Facilitator, PAYER, decode, pay, pay_with};
use tollgate_testkit::{Answer, TestServer, http_check, metric};

fn config(facilitator: &Facilitator, extra: &str) -> String {
    format!(
        r#"
billing:
  portal_url: "https://billing.example.com/accounts/{{account}}/billing"
identity:
  - api_key: {{ header: x-api-key }}
plans:
  free:
    features: [search]
    quotas: [ {{ meter: requests, limit: 2, period: month }} ]
    x402: {{ price: "5000" }}
  payg:
    features: [search]
    prepaid: true
    x402: {{ price: 2000 }}
  pro:
    features: [search]
  capped:
    features: [search]
    quotas: [ {{ meter: requests, limit: 1, period: month }}, {{ meter: requests, limit: 1, per: 1h }} ]
    x402: {{ price: "5000" }}
routes:
  - {{ match: {{ path_prefix: /v1/search }}, feature: search, meter: requests, cost: 1 }}
  - {{ match: {{ path_prefix: /v1/agents }}, meter: requests, cost: 1, x402: {{ price: "10000", payable: true }} }}
default: deny
accounts:
  - {{ id: acct_free, plan: free, api_keys: [free-key] }}
  - {{ id: acct_payg, plan: payg, api_keys: [payg-key], credits: 0 }}
  - {{ id: acct_pro, plan: pro, api_keys: [pro-key] }}
  - {{ id: acct_capped, plan: capped, api_keys: [capped-key] }}
x402:
  facilitator: {{ url: "{}", timeout: 150ms }}
  network: "eip155:84532"
  asset: "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
  pay_to: "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
  extra: {{ name: USDC, version: "2" }}
{extra}"#,
        facilitator.url()
    )
}

/// An in-process Check of `GET /v1/agents`, with a `PAYMENT-SIGNATURE` when given.
async fn agents(s: &TestServer, payment: Option<&str>) -> Answer {
    let headers: Vec<(&str, &str)> = payment.map(|p| ("payment-signature", p)).into_iter().collect();
    Answer::of(&s.check(http_check("GET", "/v1/agents", &headers)).await)
}

async fn stack(facilitator: &Facilitator) -> Stack {
    Stack::start(&config(facilitator, ""), |t, u| envoy::config(t, u, Options::default())).await
}

/// The 402's problem body and its decoded `PAYMENT-REQUIRED`.
fn challenged(r: &Response, code: &str) -> serde_json::Value {
    assert_eq!(r.status, 402, "{r:?}");
    let body = r.json();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["x402"]["header"], "PAYMENT-REQUIRED", "{body}");
    decode(r.header("payment-required").unwrap_or_else(|| panic!("no PAYMENT-REQUIRED: {r:?}")))
}

#[tokio::test]
async fn an_agent_pays_once_at_the_door_and_cannot_pay_twice_with_one_payment() {
    let f = Facilitator::start().await;
    let s = stack(&f).await;

    // No credentials on a payable route: 402 with the v2 challenge.
    let r = s.get("/v1/agents/run?x=1", &[]).await;
    let c = challenged(&r, "payment_required");
    assert_eq!(c["x402Version"], 2);
    assert_eq!(c["resource"]["url"], "https://api.example.com/v1/agents/run");
    let a = &c["accepts"][0];
    assert_eq!(a["scheme"], "exact");
    assert_eq!(a["network"], "eip155:84532");
    assert_eq!(a["amount"], "10000");
    assert_eq!(a["asset"], "0x036CbD53842c5426634e7929541eC2318f3dCF7e");
    assert_eq!(a["payTo"], "0x209693Bc6afc0C5328bA36FaF03C514EF312287C");
    assert_eq!(a["maxTimeoutSeconds"], 60);
    assert_eq!(a["extra"]["name"], "USDC");
    assert_eq!(r.json()["x402"]["amount"], "10000");
    let required = r.header("payment-required").unwrap().to_owned();

    // The paid retry: allowed, the receipt to the client, payer and transaction upstream.
    let payment = pay(&required, "0xvalid", "0x01");
    let r = s.get("/v1/agents/run", &[("payment-signature", &payment)]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let receipt = decode(r.header("payment-response").expect("PAYMENT-RESPONSE"));
    assert_eq!(receipt["success"], true);
    assert_eq!(receipt["payer"], PAYER);
    assert_eq!(receipt["network"], "eip155:84532");
    let tx = f.settled();
    assert_eq!(tx.len(), 1);
    assert_eq!(receipt["transaction"], tx[0]);
    let seen = &r.json()["headers"];
    assert_eq!(seen["x-tollgate-payer"], PAYER);
    assert_eq!(seen["x-tollgate-payment"], format!("network=eip155:84532; transaction={}; amount=10000", tx[0]));
    assert!(seen.get("payment-signature").is_none(), "the payment never reaches the upstream: {seen}");
    assert!(seen.get("x-tollgate-account").is_none(), "{seen}");

    // The same payment again: refused, not settled again.
    let r = s.get("/v1/agents/run", &[("payment-signature", &payment)]).await;
    assert_eq!(challenged(&r, "payment_required")["error"], "payment_already_used");
    assert_eq!(r.json()["x402"]["error"], "payment_already_used");
    assert_eq!(f.settled().len(), 1);

    // A forged receipt header from the client is not the upstream's to trust.
    let other = pay(&required, "0xvalid", "0x02");
    let r = s.get("/v1/agents/run", &[("payment-signature", &other), ("x-tollgate-payer", "0xforged")]).await;
    assert_eq!(r.json()["headers"]["x-tollgate-payer"], PAYER);

    assert_eq!(metric(s.tollgate.http, "tollgate_x402_payments_total{result=\"settled\"}").await, 2.0);
    assert_eq!(metric(s.tollgate.http, "tollgate_x402_payments_total{result=\"replayed\"}").await, 1.0);
    assert_eq!(
        metric(
            s.tollgate.http,
            "tollgate_x402_settled_amount_total{network=\"eip155:84532\",asset=\"0x036CbD53842c5426634e7929541eC2318f3dCF7e\"}"
        )
        .await,
        20000.0
    );
    assert_eq!(
        metric(s.tollgate.http, "tollgate_decisions_total{status=\"200\",code=\"paid\"}").await,
        2.0,
        "paid calls are their own decision"
    );
    s.stop().await;
}

#[tokio::test]
async fn every_bad_payment_gets_its_answer_and_buys_nothing() {
    let f = Facilitator::start().await;
    let s = stack(&f).await;
    let required = s.get("/v1/agents", &[]).await.header("payment-required").unwrap().to_owned();
    let challenge = decode(&required);
    let mut cheap = challenge["accepts"][0].clone();
    cheap["amount"] = "1".into();
    let mut elsewhere = challenge["accepts"][0].clone();
    elsewhere["payTo"] = "0x000000000000000000000000000000000000dEaD".into();
    let v1 = pay(&required, "0xvalid", "0x10");
    let sig = "payment-signature";
    let cases: Vec<(&str, &str, String, &str)> = vec![
        ("garbage base64", sig, "%%%not-base64%%%".into(), "malformed"),
        ("base64 of text", sig, "bm90IGpzb24=".into(), "malformed"),
        ("oversized", sig, "QUFB".repeat(3000), "malformed"),
        ("paying less", sig, pay_with(&challenge, cheap, "0xvalid", "0x11"), "requirements_mismatch"),
        ("paying someone else", sig, pay_with(&challenge, elsewhere, "0xvalid", "0x12"), "requirements_mismatch"),
        ("isValid false", sig, pay(&required, "0xbad", "0x13"), "invalid_exact_evm_payload_signature"),
        ("settlement fails", sig, pay(&required, "0xbroke", "0x14"), "insufficient_funds"),
        ("x402 v1's X-PAYMENT", "x-payment", v1, "unsupported_version"),
    ];
    for (what, name, value, error) in cases {
        let r = s.get("/v1/agents", &[(name, value.as_str())]).await;
        let c = challenged(&r, "payment_required");
        assert_eq!(c["error"], error, "{what}: {r:?}");
    }
    // A facilitator that does not answer in time: 503, fail closed.
    let r = s.get("/v1/agents", &[("payment-signature", &pay(&required, "0xslow", "0x15"))]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["code"], "payment_unavailable");
    // One that answers nonsense: the same.
    let r = s.get("/v1/agents", &[("payment-signature", &pay(&required, "0xjunk", "0x16"))]).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (503, Some("payment_unavailable")), "{r:?}");
    // A settlement that does not answer in time: 503, and the payment is
    // given back, so the client can retry it.
    let r = s.get("/v1/agents", &[("payment-signature", &pay(&required, "0xslowsettle", "0x17"))]).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (503, Some("payment_unavailable")), "{r:?}");
    assert!(f.settled().is_empty(), "nothing settled");
    let again = pay(&required, "0xvalid", "0x17");
    let mut r = s.get("/v1/agents", &[("payment-signature", &again)]).await;
    for _ in 0..50 {
        // The claim is given back by a task of its own: at once, but not before the answer.
        if r.status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        r = s.get("/v1/agents", &[("payment-signature", &again)]).await;
    }
    assert_eq!(r.status, 200, "the same payment, retried: {r:?}");
    assert_eq!(f.settled().len(), 1);
    assert_eq!(metric(s.tollgate.http, "tollgate_x402_payments_total{result=\"unavailable\"}").await, 3.0);

    // An account's quota is untouched by a refused payment: free still has both calls.
    let r = s.get("/v1/search", &[("x-api-key", "free-key"), ("payment-signature", "garbage")]).await;
    assert_eq!(r.status, 200, "an allowed call ignores the payment: {r:?}");
    assert!(r.header("payment-response").is_none());
    assert_eq!(s.get("/v1/search", &[("x-api-key", "free-key")]).await.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn an_account_over_its_quota_or_out_of_credits_can_buy_the_call() {
    let f = Facilitator::start().await;
    let s = stack(&f).await;
    for _ in 0..2 {
        assert_eq!(s.get("/v1/search", &[("x-api-key", "free-key")]).await.status, 200);
    }
    // quota_exhausted: the plan's price; the body keeps its quota and link.
    let r = s.get("/v1/search", &[("x-api-key", "free-key")]).await;
    let c = challenged(&r, "quota_exhausted");
    assert_eq!(c["accepts"][0]["amount"], "5000");
    assert!(r.header("link").is_some_and(|l| l.contains("rel=\"payment\"")), "{r:?}");
    let paid = pay(r.header("payment-required").unwrap(), "0xvalid", "0x21");
    let r = s.get("/v1/search", &[("x-api-key", "free-key"), ("payment-signature", &paid)]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["headers"]["x-tollgate-account"], "acct_free");
    assert_eq!(r.json()["headers"]["x-tollgate-payer"], PAYER);
    // The paid call spent no quota: the next one is refused again, at 2 of 2.
    let r = s.get("/v1/search", &[("x-api-key", "free-key")]).await;
    assert_eq!(challenged(&r, "quota_exhausted")["accepts"][0]["amount"], "5000");
    assert_eq!(r.json()["quota"]["used"], 2);

    // insufficient_credits: the prepaid plan's price.
    let r = s.get("/v1/search", &[("x-api-key", "payg-key")]).await;
    assert_eq!(challenged(&r, "insufficient_credits")["accepts"][0]["amount"], "2000");

    // Over its quota and its rate limit at once: paying buys money's worth, not capacity.
    assert_eq!(s.get("/v1/search", &[("x-api-key", "capped-key")]).await.status, 200);
    let r = s.get("/v1/search", &[("x-api-key", "capped-key")]).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (402, Some("quota_exhausted")), "{r:?}");
    assert!(r.header("payment-required").is_none(), "no challenge while rate limited: {r:?}");

    // Not curable by paying per call: a wrong key (401), a plan without a price (no challenge).
    let r = s.get("/v1/agents", &[("x-api-key", "not-a-key")]).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(r.header("payment-required").is_none());
    s.stop().await;
}

/// With events on, each settled payment is one `com.tollgate.payment` event
/// (on Redis: through the outbox, as usage events go), for the account when
/// the caller had one, else for the payer.
#[tokio::test]
async fn a_settled_payment_is_one_payment_event() {
    let f = Facilitator::start().await;
    let redis = tollgate_testkit::redis::RedisServer::start();
    let sink = tollgate_testkit::sink::Sink::start().await;
    let extra = format!(
        "events: {{ sink: {{ url: \"{}\" }} }}\nstore: {{ backend: redis, url: \"{}\" }}\n",
        sink.url(),
        redis.url()
    );
    let s = TestServer::start_configured(&config(&f, &extra), true).await;
    let required = agents(&s, None).await.client_headers["payment-required"].clone();
    for nonce in ["0x41", "0x42"] {
        let p = pay(&required, "0xvalid", nonce);
        assert!(agents(&s, Some(&p)).await.allowed);
    }
    let mut events = Vec::new();
    tollgate_testkit::eventually("two payment events reach the sink", std::time::Duration::from_secs(15), async || {
        events = sink.unique().into_iter().filter(|e| e["type"] == "com.tollgate.payment").collect();
        events.len() == 2
    })
    .await;
    let tx = f.settled();
    for e in &events {
        assert_eq!(e["subject"], PAYER, "{e}");
        assert_eq!(e["data"]["amount"], "10000");
        assert_eq!(e["data"]["network"], "eip155:84532");
        assert_eq!(e["data"]["route"], "/v1/agents*");
        assert!(tx.iter().any(|t| e["data"]["transaction"] == *t), "{e}");
        assert!(e["data"].get("account").is_none());
    }
    assert_ne!(events[0]["id"], events[1]["id"]);
    s.stop().await;
}

/// A store that cannot claim a payment never lets it through, even under
/// `store.on_error: allow`: an unclaimed payment could be used twice.
#[tokio::test]
async fn a_store_that_cannot_claim_the_payment_answers_503_even_when_failing_open() {
    let f = Facilitator::start().await;
    let mut redis = tollgate_testkit::redis::RedisServer::start();
    let extra = format!("store: {{ backend: redis, url: \"{}\", on_error: allow, timeout: 100ms }}\n", redis.url());
    let s = TestServer::start_configured(&config(&f, &extra), true).await;
    let required = agents(&s, None).await.client_headers["payment-required"].clone();
    redis.kill();
    let p = pay(&required, "0xvalid", "0x51");
    let a = agents(&s, Some(&p)).await;
    assert!(!a.allowed, "{a:?}");
    assert_eq!((a.http_status, a.body["code"].as_str()), (503, Some("payment_unavailable")), "{a:?}");
    assert!(f.settled().is_empty());
    s.stop().await;
}

/// `on_facilitator_error: payment_required`: a late facilitator answers the
/// 402 again, its challenge saying so.
#[tokio::test]
async fn a_late_facilitator_can_answer_402_instead_of_503() {
    let f = Facilitator::start().await;
    let s = TestServer::start(&config(&f, "  on_facilitator_error: payment_required\n")).await;
    let a = agents(&s, None).await;
    let slow = pay(&a.client_headers["payment-required"], "0xslow", "0x31");
    let a = agents(&s, Some(&slow)).await;
    assert_eq!((a.http_status, a.body["code"].as_str()), (402, Some("payment_required")), "{a:?}");
    assert_eq!(decode(&a.client_headers["payment-required"])["error"], "facilitator_unavailable");
    assert!(f.settled().is_empty());
    s.stop().await;
}

/// The property: whatever an account-less caller sends — nothing, garbage,
/// v1, cheaper or misdirected payments, invalid or unsettleable ones,
/// replays of a settled one — a payable route lets it through exactly once
/// per settled payment. 300 attempts drawn from a seeded generator.
#[tokio::test]
async fn an_account_less_caller_never_gets_through_without_a_settled_payment() {
    let f = Facilitator::start().await;
    let s = TestServer::start(&config(&f, "")).await;
    let required = agents(&s, None).await.client_headers["payment-required"].clone();
    let challenge = decode(&required);
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut used: Vec<String> = Vec::new();
    let mut allowed = 0;
    for i in 0..300u64 {
        let nonce = format!("0x{i:x}");
        let header: Option<(&str, String)> = match next(9) {
            0 => None,
            1 => Some(("payment-signature", "x".repeat(next(200) as usize + 1))),
            2 => Some(("x-payment", pay(&required, "0xvalid", &nonce))),
            3 => {
                let mut a = challenge["accepts"][0].clone();
                a["amount"] = (next(10_000)).to_string().into();
                Some(("payment-signature", pay_with(&challenge, a, "0xvalid", &nonce)))
            }
            4 => Some(("payment-signature", pay(&required, "0xbad", &nonce))),
            5 => Some(("payment-signature", pay(&required, "0xbroke", &nonce))),
            6 if !used.is_empty() => {
                let k = next(used.len() as u64) as usize;
                Some(("payment-signature", used[k].clone()))
            }
            _ => {
                let p = pay(&required, "0xvalid", &nonce);
                used.push(p.clone());
                Some(("payment-signature", p))
            }
        };
        let h: Vec<(&str, &str)> = header.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let a = Answer::of(&s.check(http_check("GET", "/v1/agents", &h)).await);
        if a.allowed {
            allowed += 1;
            assert_eq!(a.upstream_headers.get("x-tollgate-payer").map(String::as_str), Some(PAYER), "{a:?}");
        } else {
            assert_eq!(a.http_status, 402, "attempt {i}: {a:?}");
        }
    }
    assert!(allowed > 10, "the generator drew too few valid payments: {allowed}");
    assert_eq!(allowed, f.settled().len(), "one call per settled payment");
    assert_eq!(f.settled().len(), used.len(), "every fresh valid payment settled once");
    s.stop().await;
}
