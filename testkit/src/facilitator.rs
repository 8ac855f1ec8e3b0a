//! A stand-in x402 facilitator (the public ones cannot be reached from
//! here): a real HTTP server on loopback with the v2 shapes of `POST /verify`
//! (`{isValid, invalidReason?, payer}`), `POST /settle` (`{success,
//! errorReason?, payer, transaction, network}`) and `GET /supported`.
//!
//! It checks what a real one checks that matters to tollgate: the payload
//! pays the requirement's amount to its `payTo`, and a nonce settles once
//! (as on chain). What the payment's `payload.signature` says decides the
//! rest: `0xvalid` verifies and settles, `0xbad` is invalid, `0xbroke`
//! verifies but fails to settle, `0xslow` answers after 2 s, `0xslowsettle`
//! verifies at once and settles after 2 s, `0xjunk` answers with text that
//! is not JSON.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

#[derive(Default)]
struct Book {
    verified: u64,
    settled: Vec<String>,
    nonces: HashSet<String>,
}

/// The running facilitator; stops with the test's runtime.
#[derive(Clone)]
pub struct Facilitator {
    /// Where it listens.
    pub addr: SocketAddr,
    book: Arc<Mutex<Book>>,
}

/// The payer every valid payment names.
pub const PAYER: &str = "0x857b06519E91e3A54538791bDbb0E22373e36b66";

impl Facilitator {
    /// Starts it on a free loopback port.
    pub async fn start() -> Self {
        let book = Arc::new(Mutex::new(Book::default()));
        let app = axum::Router::new()
            .route("/verify", post(verify))
            .route("/settle", post(settle))
            .route("/supported", get(supported))
            .with_state(book.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, book }
    }

    /// Its base URL (`x402.facilitator.url`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Payments verified as valid so far.
    pub fn verified(&self) -> u64 {
        self.book.lock().unwrap().verified
    }

    /// Transactions settled so far, in order.
    pub fn settled(&self) -> Vec<String> {
        self.book.lock().unwrap().settled.clone()
    }
}

/// What the payment asks of the facilitator, and whether it pays the requirement.
fn read(body: &Value) -> (String, String, bool) {
    let payload = &body["paymentPayload"];
    let req = &body["paymentRequirements"];
    let signature = payload["payload"]["signature"].as_str().unwrap_or_default().to_owned();
    let nonce = payload["payload"]["authorization"]["nonce"].as_str().unwrap_or_default().to_owned();
    let pays = body["x402Version"] == 2
        && payload["accepted"]["amount"] == req["amount"]
        && payload["accepted"]["payTo"] == req["payTo"]
        && req["amount"].as_str().is_some_and(|a| !a.is_empty());
    (signature, nonce, pays)
}

async fn verify(State(book): State<Arc<Mutex<Book>>>, Json(body): Json<Value>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (signature, _, pays) = read(&body);
    match signature.as_str() {
        "0xslow" => tokio::time::sleep(Duration::from_secs(2)).await,
        "0xjunk" => return "surely not json".into_response(),
        _ => {}
    }
    let valid = pays && signature != "0xbad";
    if valid {
        book.lock().unwrap().verified += 1;
        Json(json!({ "isValid": true, "payer": PAYER })).into_response()
    } else {
        Json(json!({ "isValid": false, "invalidReason": "invalid_exact_evm_payload_signature", "payer": PAYER }))
            .into_response()
    }
}

async fn settle(State(book): State<Arc<Mutex<Book>>>, Json(body): Json<Value>) -> Json<Value> {
    let (signature, nonce, pays) = read(&body);
    if signature == "0xslowsettle" {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let network = body["paymentRequirements"]["network"].clone();
    let mut b = book.lock().unwrap();
    let fail = |reason: &str| json!({ "success": false, "errorReason": reason, "payer": PAYER, "transaction": "", "network": network });
    if !pays || signature == "0xbroke" {
        return Json(fail("insufficient_funds"));
    }
    if !b.nonces.insert(nonce) {
        return Json(fail("nonce_already_used"));
    }
    let transaction = format!("0x{:064x}", b.settled.len() + 1);
    b.settled.push(transaction.clone());
    Json(json!({ "success": true, "payer": PAYER, "transaction": transaction, "network": network }))
}

async fn supported() -> Json<Value> {
    Json(json!({ "kinds": [ { "x402Version": 2, "scheme": "exact", "network": "eip155:84532" } ] }))
}

/// A client's `PAYMENT-SIGNATURE` for the challenge `required` (a
/// `PAYMENT-REQUIRED` value): its first requirement accepted as is, with
/// `signature` (see the module doc) and `nonce`.
pub fn pay(required: &str, signature: &str, nonce: &str) -> String {
    let challenge: Value = serde_json::from_slice(&STANDARD.decode(required).unwrap()).unwrap();
    let accepted = challenge["accepts"][0].clone();
    pay_with(&challenge, accepted, signature, nonce)
}

/// [`pay`] with `accepted` as given (to pay less, or someone else). `nonce`
/// is a hex number, padded to EIP-3009's 32 bytes.
pub fn pay_with(challenge: &Value, accepted: Value, signature: &str, nonce: &str) -> String {
    let nonce = format!("0x{:0>64}", nonce.trim_start_matches("0x"));
    let payload = json!({
        "x402Version": 2,
        "resource": challenge["resource"],
        "accepted": accepted,
        "payload": {
            "signature": signature,
            "authorization": {
                "from": PAYER,
                "to": accepted["payTo"],
                "value": accepted["amount"],
                "validAfter": "0",
                "validBefore": "9999999999",
                "nonce": nonce,
            },
        },
    });
    STANDARD.encode(payload.to_string())
}

/// A `PAYMENT-REQUIRED` or `PAYMENT-RESPONSE` value decoded.
pub fn decode(header: &str) -> Value {
    serde_json::from_slice(&STANDARD.decode(header).expect("base64")).expect("JSON")
}
