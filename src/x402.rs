//! x402 (v2): the payment challenge in 402 answers, and paid retries verified
//! and settled through a facilitator inside the Check.
//!
//! A 402 that paying for this one call would cure — `insufficient_credits`,
//! `quota_exhausted`, and `payment_required` (a `payable` route called with
//! no credentials) — carries `PAYMENT-REQUIRED`: base64 of the v2
//! `PaymentRequired` object (`x402Version: 2`, `resource`, `accepts[]` with
//! this route's or plan's price). A retry carrying `PAYMENT-SIGNATURE` (base64
//! of a v2 `PaymentPayload`) is checked here (size, base64, JSON, version,
//! that it pays exactly what we ask), verified (`POST /verify`), claimed once
//! in the store (the replay guard, across replicas), settled (`POST /settle`),
//! and then allowed: one payment buys one call, nothing else is spent.
//!
//! Pure parts (which denials a payment cures, the price, the objects, parsing
//! the client's payload) are functions here; the two facilitator calls are
//! [`Facilitator`]'s. `authorizer` runs the flow.
//!
//! May use: `decision` (codes, quota states), `outbound` (the HTTP client).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::decision::{Code, Decision, Verdict};

/// The challenge on a 402 (server → client).
pub const REQUIRED_HEADER: &str = "payment-required";
/// The payment on a retry (client → server).
pub const SIGNATURE_HEADER: &str = "payment-signature";
/// The settlement on a paid answer (server → client).
pub const RESPONSE_HEADER: &str = "payment-response";
/// x402 v1's payment header: not accepted (see the README).
pub const V1_HEADER: &str = "x-payment";
/// The longest `PAYMENT-SIGNATURE` read (base64 characters); an EIP-3009
/// payload is about 1.5 KiB.
pub const MAX_PAYLOAD: usize = 8 * 1024;
/// The most bytes of a facilitator's answer read.
pub const MAX_ANSWER: usize = 64 * 1024;
/// The longest facilitator string (payer, transaction, reason) passed on.
pub const MAX_FIELD: usize = 128;
/// The largest price, in the asset's atomic units (fits a u64 counter).
pub const MAX_PRICE: u64 = 1_000_000_000_000_000_000;

/// What a facilitator failure answers (`x402.on_facilitator_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFacilitatorError {
    /// 503 `payment_unavailable`: the client retries the same payment later.
    Unavailable,
    /// The 402 again, its challenge saying `facilitator_unavailable`.
    PaymentRequired,
}

/// The `x402:` section: where payments go and how they are checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The facilitator's base URL (`/verify`, `/settle` are appended).
    pub facilitator: String,
    /// The bound on each facilitator call.
    pub timeout: Duration,
    /// The scheme (`exact`).
    pub scheme: String,
    /// CAIP-2 network (`eip155:8453`).
    pub network: String,
    /// The asset's address or id on `network`.
    pub asset: String,
    /// Who is paid.
    pub pay_to: String,
    /// How long a payment authorization may take (`maxTimeoutSeconds`).
    pub max_timeout_seconds: u32,
    /// Scheme-specific extras (`name`, `version` of an EIP-712 domain).
    pub extra: BTreeMap<String, String>,
    /// What a facilitator that fails or is late answers.
    pub on_facilitator_error: OnFacilitatorError,
    /// Per-call prices by plan (`plans.<name>.x402.price`).
    pub plan_prices: BTreeMap<String, Price>,
}

/// A price in the asset's atomic units: digits, no leading zero, 1..=[`MAX_PRICE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price(Arc<str>);

impl Price {
    /// A price from config; `None` when it is not 1..=[`MAX_PRICE`] written in digits.
    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0');
        let n: u64 = if ok { s.parse().ok()? } else { return None };
        (1..=MAX_PRICE).contains(&n).then(|| Self(s.into()))
    }

    /// The digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The amount (always fits: checked at parse).
    pub fn units(&self) -> u64 {
        self.0.parse().unwrap_or(0)
    }
}

/// A route's `x402:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteX402 {
    /// The route's per-call price (wins over the plan's).
    pub price: Option<Price>,
    /// Callers without credentials may pay per call (`payment_required` instead of 401).
    pub payable: bool,
}

/// Whether paying for this one call cures a denial with `code`. Not a
/// subscription or an overdue invoice (the billing portal cures those), not
/// a feature the plan lacks (paying per call would sell around the plan), not
/// a rate limit (capacity, not money), not a bad credential or a blocked
/// account.
pub fn curable(code: Code) -> bool {
    matches!(code, Code::InsufficientCredits | Code::QuotaExhausted | Code::PaymentRequired)
}

/// Whether `d` is also held back by a rate quota (a rolling window with no
/// room for this request): paying per call buys money's worth, not capacity,
/// so no challenge is offered then.
pub fn rate_limited(d: &Decision) -> bool {
    d.quotas.iter().any(|q| q.quota.window.is_rate() && q.remaining < d.cost)
}

/// On a `payable` route, a caller without credentials is asked to pay (402
/// `payment_required`) rather than to authenticate (401).
pub fn demand(mut d: Decision, payable: bool) -> Decision {
    if payable && d.verdict == Verdict::Deny(Code::CredentialsMissing) {
        d.verdict = Verdict::Deny(Code::PaymentRequired);
    }
    d
}

/// The per-call price for a request: the route's, else its plan's.
pub fn price_for<'a>(settings: &'a Settings, route: Option<&'a RouteX402>, plan: Option<&str>) -> Option<&'a Price> {
    route.and_then(|r| r.price.as_ref()).or_else(|| plan.and_then(|p| settings.plan_prices.get(p)))
}

/// The v2 `PaymentRequirements` for one call at `price`.
pub fn requirement(s: &Settings, price: &Price) -> Value {
    let mut r = json!({
        "scheme": s.scheme,
        "network": s.network,
        "amount": price.as_str(),
        "asset": s.asset,
        "payTo": s.pay_to,
        "maxTimeoutSeconds": s.max_timeout_seconds,
    });
    if !s.extra.is_empty() {
        r["extra"] = json!(s.extra);
    }
    r
}

/// The `PAYMENT-REQUIRED` value: base64 of the v2 `PaymentRequired` object.
pub fn challenge(requirement: &Value, resource: &str, description: &str, error: Option<&str>) -> String {
    let mut o = json!({
        "x402Version": 2,
        "resource": { "url": resource, "description": description, "mimeType": "application/json" },
        "accepts": [requirement],
    });
    if let Some(e) = error {
        o["error"] = json!(e);
    }
    STANDARD.encode(o.to_string())
}

/// The `PAYMENT-RESPONSE` value: base64 of the v2 settlement response.
pub fn response(paid: &Paid) -> String {
    let o = json!({ "success": true, "payer": paid.payer, "transaction": paid.transaction, "network": paid.network });
    STANDARD.encode(o.to_string())
}

/// A client's payment, read and checked against what we ask.
#[derive(Debug, Clone)]
pub struct Payment {
    /// The decoded `PaymentPayload`, sent to the facilitator as it came.
    pub payload: Value,
    /// What the replay guard remembers: SHA-256 of the network, the asset,
    /// and the EIP-3009 authorization's `from` and `nonce` (lower-cased).
    pub replay_key: [u8; 32],
}

/// Why a payment buys nothing; the wire word goes into the challenge's `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not base64, not JSON, too long, or not an object.
    #[error("malformed")]
    Malformed,
    /// `x402Version` is not 2 (or `X-PAYMENT`, v1's header, was sent).
    #[error("unsupported_version")]
    Version,
    /// `accepted` is not the requirement we ask for (scheme, network, amount, asset, payTo).
    #[error("requirements_mismatch")]
    Mismatch,
    /// The same payment was used before.
    #[error("payment_already_used")]
    Replay,
    /// The facilitator says it is invalid (its reason, sanitized).
    #[error("{0}")]
    Invalid(String),
    /// The facilitator could not settle it (its reason, sanitized).
    #[error("{0}")]
    NotSettled(String),
}

impl Refusal {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Malformed | Refusal::Version | Refusal::Mismatch => "malformed",
            Refusal::Replay => "replayed",
            Refusal::Invalid(_) => "invalid",
            Refusal::NotSettled(_) => "not_settled",
        }
    }
}

/// Reads a `PAYMENT-SIGNATURE` value and checks it pays `requirement`.
pub fn parse(header: &str, requirement: &Value) -> Result<Payment, Refusal> {
    if header.is_empty() || header.len() > MAX_PAYLOAD {
        return Err(Refusal::Malformed);
    }
    let bytes = STANDARD.decode(header.trim()).map_err(|_| Refusal::Malformed)?;
    let payload: Value = serde_json::from_slice(&bytes).map_err(|_| Refusal::Malformed)?;
    if !payload.is_object() {
        return Err(Refusal::Malformed);
    }
    if payload["x402Version"].as_u64() != Some(2) {
        return Err(Refusal::Version);
    }
    let accepted = &payload["accepted"];
    let same = |k: &str, fold: bool| match (accepted[k].as_str(), requirement[k].as_str()) {
        (Some(a), Some(b)) => {
            if fold {
                a.eq_ignore_ascii_case(b)
            } else {
                a == b
            }
        }
        _ => false,
    };
    // Addresses compare case-blind (EIP-55 checksums are letter case).
    let pays = [("scheme", false), ("network", false), ("amount", false), ("asset", true), ("payTo", true)];
    if !pays.iter().all(|(k, fold)| same(k, *fold)) {
        return Err(Refusal::Mismatch);
    }
    // The replay key is made of what identifies the transfer on chain, in
    // one spelling: an EIP-3009 authorization's payer and 32-byte nonce
    // (the scheme `exact` on EVM networks). A payload without them cannot be
    // told apart from a re-encoded copy of itself, so it is refused.
    let auth = &payload["payload"]["authorization"];
    let hex32 = |v: &Value, len: usize| {
        v.as_str()
            .filter(|s| s.len() == 2 + len && s.starts_with("0x") && s[2..].bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_ascii_lowercase)
    };
    let (Some(from), Some(nonce)) = (hex32(&auth["from"], 40), hex32(&auth["nonce"], 64)) else {
        return Err(Refusal::Malformed);
    };
    let mut h = Sha256::new();
    for part in [
        requirement["network"].as_str().unwrap_or_default(),
        &requirement["asset"].as_str().unwrap_or_default().to_ascii_lowercase(),
        &from,
        &nonce,
    ] {
        h.update(part.as_bytes());
        h.update(b"\n");
    }
    Ok(Payment { payload, replay_key: h.finalize().into() })
}

/// The store key under which a payment is remembered (an event id: `x402:<hex>`).
pub fn replay_id(p: &Payment) -> String {
    format!("x402:{}", hex::encode(p.replay_key))
}

/// The payment's id as a charge and event id (at most 64 of `[A-Za-z0-9-]`,
/// as the settle script takes): `x402-` and 59 hex digits of the replay key.
pub fn event_id(p: &Payment) -> String {
    // 32 bytes are 64 hex digits: the slice is always in range.
    let hex = hex::encode(p.replay_key);
    format!("x402-{}", &hex[..59])
}

/// How long a used payment is remembered: past any authorization's validity.
pub fn replay_ttl(s: &Settings) -> Duration {
    Duration::from_secs(u64::from(s.max_timeout_seconds) + 7 * 24 * 3600)
}

/// A settled payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paid {
    /// Who paid (the facilitator's word).
    pub payer: String,
    /// The settlement's transaction.
    pub transaction: String,
    /// Where it settled.
    pub network: String,
    /// What was paid, in atomic units.
    pub amount: u64,
}

/// A facilitator that did not answer usably.
#[derive(Debug, thiserror::Error)]
pub enum FacilitatorError {
    /// No HTTP client could be made.
    #[error("no HTTP client")]
    NoClient,
    /// The request failed.
    #[error("unreachable: {0}")]
    Send(String),
    /// It took longer than `x402.facilitator.timeout`.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// A non-2xx status.
    #[error("answered {0}")]
    Status(u16),
    /// An answer that is not the spec's JSON.
    #[error("unreadable answer")]
    Unreadable,
}

/// A facilitator string fit for a header, a body and a log: at most
/// [`MAX_FIELD`] characters of `[A-Za-z0-9_.:-]`, else `None`.
fn field(v: &Value) -> Option<String> {
    let s = v.as_str()?;
    let ok = !s.is_empty()
        && s.len() <= MAX_FIELD
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    ok.then(|| s.to_owned())
}

/// The facilitator's two calls, over one pooled HTTP(S) client.
pub struct Facilitator {
    client: Option<crate::outbound::HttpsClient>,
}

impl Default for Facilitator {
    fn default() -> Self {
        Self::new()
    }
}

impl Facilitator {
    /// A client for every facilitator (the URL is per call: config reloads change it).
    pub fn new() -> Self {
        Self { client: crate::outbound::https_client() }
    }

    async fn post(
        &self,
        s: &Settings,
        path: &str,
        payment: &Payment,
        requirement: &Value,
    ) -> Result<Value, FacilitatorError> {
        use http_body_util::{BodyExt, Full, Limited};
        let client = self.client.as_ref().ok_or(FacilitatorError::NoClient)?;
        let body = json!({ "x402Version": 2, "paymentPayload": payment.payload, "paymentRequirements": requirement });
        let url = format!("{}{path}", s.facilitator.trim_end_matches('/'));
        let req = hyper::Request::post(url)
            .header("content-type", "application/json")
            .body(Full::new(hyper::body::Bytes::from(body.to_string())))
            .map_err(|e| FacilitatorError::Send(e.to_string()))?;
        let call = async {
            let resp = client.request(req).await.map_err(|e| FacilitatorError::Send(e.to_string()))?;
            let status = resp.status().as_u16();
            let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|_| FacilitatorError::Unreadable)?
                .to_bytes();
            if !(200..300).contains(&status) {
                return Err(FacilitatorError::Status(status));
            }
            serde_json::from_slice::<Value>(&bytes).map_err(|_| FacilitatorError::Unreadable)
        };
        tokio::time::timeout(s.timeout, call).await.map_err(|_| FacilitatorError::Timeout(s.timeout))?
    }

    /// `POST /verify`: `Ok(Err(refusal))` when the facilitator says the payment is not valid.
    pub async fn verify(
        &self,
        s: &Settings,
        payment: &Payment,
        requirement: &Value,
    ) -> Result<Result<(), Refusal>, FacilitatorError> {
        let v = self.post(s, "/verify", payment, requirement).await?;
        match v["isValid"].as_bool() {
            Some(true) => Ok(Ok(())),
            Some(false) => Ok(Err(Refusal::Invalid(field(&v["invalidReason"]).unwrap_or_else(|| "invalid".into())))),
            None => Err(FacilitatorError::Unreadable),
        }
    }

    /// `POST /settle`: the settlement, or the facilitator's reason it failed.
    pub async fn settle(
        &self,
        s: &Settings,
        payment: &Payment,
        requirement: &Value,
    ) -> Result<Result<Paid, Refusal>, FacilitatorError> {
        let v = self.post(s, "/settle", payment, requirement).await?;
        match v["success"].as_bool() {
            Some(true) => {
                // The money moved: an unreadable transaction id does not undo that.
                Ok(Ok(Paid {
                    payer: field(&v["payer"]).unwrap_or_else(|| "unknown".into()),
                    transaction: field(&v["transaction"]).unwrap_or_else(|| "unknown".into()),
                    // Ours, not the facilitator's word: it settles where we asked.
                    network: s.network.clone(),
                    amount: requirement["amount"].as_str().and_then(|a| a.parse().ok()).unwrap_or(0),
                }))
            }
            Some(false) => {
                Ok(Err(Refusal::NotSettled(field(&v["errorReason"]).unwrap_or_else(|| "settlement_failed".into()))))
            }
            None => Err(FacilitatorError::Unreadable),
        }
    }
}

#[cfg(test)]
mod tests;
