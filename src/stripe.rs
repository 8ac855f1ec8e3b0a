//! Stripe webhooks: subscription and payment events become entitlement changes.
//!
//! Pure parts (signature check, event → account change) are functions of
//! their inputs; [`handle`] does the I/O, through the [`Accounts`] service
//! (so every store call has the Check path's timeout and metrics): verify
//! the raw body first (nothing is parsed before the signature holds), drop
//! replays by event id, find the account, and write it only if no newer
//! event was applied already, so Stripe's out-of-order and repeated
//! deliveries never roll an account back.
//!
//! An event moves an account only when the event's customer is the account's
//! `stripe_customer`, however the account was found (`account_from: customer`
//! or `metadata:<key>`): subscription metadata is writable by whoever can edit
//! the subscription, so it may name an account but never bind a customer to
//! it. An account without a `stripe_customer` is never bound implicitly; the
//! operator sets it (`PutEntitlement`, config `accounts:`). Every field read
//! from an event is bounded before it reaches the store (SPEC §10).
//!
//! May use: `accounts`, `entitlement`, `bounds`, `config` (the Stripe settings).

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;

use crate::accounts::{Accounts, AccountsError};
use crate::bounds::{MAX_ITEMS, is_valid_customer_id, is_valid_name};
use crate::config::StripeConfig;
use crate::entitlement::{Account, Status, is_valid_account_id, is_valid_time};

/// How long event ids are remembered: Stripe retries a delivery for up to three days.
pub const REMEMBER_EVENTS: Duration = Duration::from_secs(72 * 3600);

/// The most `v1=` signatures read from one header: Stripe sends one per
/// active secret; more is someone making us compute HMACs.
const MAX_SIGNATURES: usize = 8;

/// The longest event id or type accepted (Stripe's are ~30 characters).
const MAX_EVENT_FIELD: usize = 255;

/// Why a signature was rejected (the response says only "invalid signature").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `Stripe-Signature` header, or one without `t=` and `v1=`.
    #[error("Stripe-Signature header missing or malformed")]
    Malformed,
    /// The signed timestamp is outside the tolerance.
    #[error("signature timestamp outside the tolerance")]
    Stale,
    /// No `v1` matched any configured secret.
    #[error("no v1 signature matches a configured secret")]
    Mismatch,
    /// No secret is configured: every event is rejected.
    #[error("no webhook signing secret is configured")]
    NoSecret,
}

/// Checks `Stripe-Signature` (`t=…,v1=…[,v1=…]`) over `t.payload` with every
/// secret (rotation), in constant time per comparison.
pub fn verify(
    header: &str,
    payload: &[u8],
    secrets: &[String],
    tolerance: Duration,
    now: i64,
) -> Result<(), SignatureError> {
    if secrets.is_empty() {
        return Err(SignatureError::NoSecret);
    }
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) if v1.len() < MAX_SIGNATURES => v1.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let (Some(t), false) = (t, v1.is_empty()) else { return Err(SignatureError::Malformed) };
    // `t` is the sender's: a far one must not overflow the subtraction.
    if now.checked_sub(t).is_none_or(|age| age.unsigned_abs() > tolerance.as_secs()) {
        return Err(SignatureError::Stale);
    }
    for secret in secrets {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { continue };
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(payload);
        for sig in &v1 {
            if mac.clone().verify_slice(sig).is_ok() {
                return Ok(());
            }
        }
    }
    Err(SignatureError::Mismatch)
}

/// The `Stripe-Signature` header value for `payload` (tests and local tooling).
pub fn sign(payload: &[u8], secret: &str, t: i64) -> String {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!());
    mac.update(format!("{t}.").as_bytes());
    mac.update(payload);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The parts of a Stripe event we read.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    /// `evt_…`, unique per event (not per delivery).
    pub id: String,
    /// e.g. `customer.subscription.updated`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Unix seconds when Stripe created the event: the ordering key.
    pub created: i64,
    /// `data.object`: the subscription, invoice or entitlement summary.
    pub data: EventData,
}

/// `data` of an event.
#[derive(Debug, Clone, Deserialize)]
pub struct EventData {
    /// The object the event is about.
    pub object: Value,
}

impl Event {
    /// When the event was created; `None` outside the instants tollgate stores
    /// ([`is_valid_time`]), so no later date arithmetic can overflow.
    pub fn created_at(&self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(self.created, 0).filter(|t| is_valid_time(*t))
    }

    /// Why the event cannot be processed: the first field out of bounds. Run
    /// before anything of it reaches the store.
    pub fn check(&self) -> Result<(), String> {
        let id_ok = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if self.id.is_empty() || self.id.len() > MAX_EVENT_FIELD || !id_ok(&self.id) {
            return Err("event id is not a Stripe id".into());
        }
        let kind_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._".contains(&b);
        if self.kind.is_empty() || self.kind.len() > MAX_EVENT_FIELD || !self.kind.bytes().all(kind_ok) {
            return Err("event type is not a Stripe event type".into());
        }
        if self.created_at().is_none() {
            return Err(format!("event created {} is out of range", self.created));
        }
        if self.data.object.get("customer").and_then(Value::as_str).is_some_and(|c| !is_valid_customer_id(c)) {
            return Err("customer is not a Stripe customer id".into());
        }
        if let Some(list) = self.data.object.pointer("/entitlements/data").and_then(Value::as_array) {
            let key_ok = |e: &Value| e.get("lookup_key").and_then(Value::as_str).is_none_or(is_valid_name);
            if list.len() > MAX_ITEMS || !list.iter().all(key_ok) {
                return Err(format!("entitlements: more than {MAX_ITEMS}, or a lookup_key that is not a name"));
            }
        }
        Ok(())
    }

    fn object_str(&self, field: &str) -> Option<&str> {
        self.data.object.get(field).and_then(Value::as_str)
    }

    /// The Stripe customer the event is about.
    pub fn customer(&self) -> Option<&str> {
        self.object_str("customer")
    }

    /// `metadata[key]` of the subscription (or, for invoices, of the subscription it bills).
    pub fn metadata(&self, key: &str) -> Option<&str> {
        let o = &self.data.object;
        [
            o.get("metadata"),
            o.pointer("/parent/subscription_details/metadata"),
            o.pointer("/subscription_details/metadata"),
        ]
        .into_iter()
        .flatten()
        .find_map(|m| m.get(key).and_then(Value::as_str))
    }
}

/// Maps a Stripe subscription status to ours.
pub fn status_of(stripe: &str) -> Option<Status> {
    Some(match stripe {
        "active" => Status::Active,
        "trialing" => Status::Trialing,
        "past_due" => Status::PastDue,
        "canceled" => Status::Canceled,
        "unpaid" | "incomplete" => Status::Unpaid,
        "incomplete_expired" => Status::Expired,
        "paused" => Status::Paused,
        _ => return None,
    })
}

/// What an event does to an account; `None` for events that change nothing we
/// track (and for events whose `created` is out of range, which [`Event::check`] refuses).
pub fn apply(event: &Event, account: &Account, config: &StripeConfig) -> Option<Account> {
    let mut a = account.clone();
    let at = event.created_at()?;
    let set_status = |a: &mut Account, status: Status| {
        if status == Status::PastDue {
            // Keep the first failure's date: grace counts from there.
            if a.status != Status::PastDue || a.past_due_since.is_none() {
                a.past_due_since = Some(at);
            }
        } else {
            a.past_due_since = None;
        }
        a.status = status;
    };
    match event.kind.as_str() {
        "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.paused"
        | "customer.subscription.resumed" => {
            let status = event.object_str("status").and_then(status_of)?;
            set_status(&mut a, status);
            let prices = event.data.object.pointer("/items/data").and_then(Value::as_array);
            let plan = prices.into_iter().flatten().find_map(|item| {
                let price = item.pointer("/price/id").and_then(Value::as_str)?;
                config.prices.get(price)
            });
            if let Some(plan) = plan {
                a.plan = plan.as_str().into();
            }
        }
        "customer.subscription.deleted" => set_status(&mut a, Status::Canceled),
        "invoice.payment_failed" => set_status(&mut a, Status::PastDue),
        "invoice.paid" | "invoice.payment_succeeded" => {
            if matches!(a.status, Status::PastDue | Status::Unpaid) {
                set_status(&mut a, Status::Active);
            }
        }
        "entitlements.active_entitlement_summary.updated" => {
            let list = event.data.object.pointer("/entitlements/data").and_then(Value::as_array)?;
            a.extra_features = list
                .iter()
                .filter_map(|e| e.get("lookup_key").and_then(Value::as_str))
                .map(|k| config.features.get(k).cloned().unwrap_or_else(|| k.to_owned()))
                .collect();
        }
        _ => return None,
    }
    a.billing_event_at = Some(at);
    Some(a)
}

/// The outcome of one delivery, as the HTTP layer reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The account was updated.
    Applied {
        /// Which account.
        account: String,
    },
    /// Accepted, nothing to do (with why: replay, unknown account, older than applied, ignored type).
    Ignored(&'static str),
    /// Rejected: a missing or wrong signature (400; Stripe shows it in the dashboard).
    BadSignature,
    /// Rejected: a body that is not a valid event (400).
    Rejected(String),
    /// The store failed; Stripe should retry (503).
    Unavailable,
}

/// Verifies, de-duplicates and applies one delivery through `accounts`.
pub async fn handle(
    accounts: &Accounts,
    config: &StripeConfig,
    secrets: &[String],
    signature: Option<&str>,
    body: &[u8],
) -> Outcome {
    let now = Utc::now().timestamp();
    if let Err(e) = verify(signature.unwrap_or(""), body, secrets, config.tolerance, now) {
        tracing::warn!(reason = %e, "stripe webhook rejected");
        return Outcome::BadSignature;
    }
    let event: Event = match serde_json::from_slice(body) {
        Ok(e) => e,
        Err(e) => return Outcome::Rejected(format!("not a Stripe event: {e}")),
    };
    if let Err(why) = event.check() {
        tracing::warn!(reason = %why, "stripe event refused");
        return Outcome::Rejected(why);
    }
    match accounts.remember_event(&event.id, REMEMBER_EVENTS).await {
        Ok(true) => {}
        Ok(false) => return Outcome::Ignored("duplicate event"),
        Err(e) => return unavailable(e),
    }
    let outcome = apply_event(accounts, config, &event).await;
    if outcome == Outcome::Unavailable {
        // Let Stripe's retry of this event be processed.
        let _ = accounts.forget_event(&event.id).await;
    }
    tracing::info!(event = %event.id, kind = %event.kind, outcome = ?outcome, "stripe event");
    outcome
}

/// A store failure: Stripe retries. The accounts service logged the cause;
/// [`handle`] logs the outcome with the event.
fn unavailable(_: AccountsError) -> Outcome {
    Outcome::Unavailable
}

async fn apply_event(accounts: &Accounts, config: &StripeConfig, event: &Event) -> Outcome {
    let by_metadata = config.account_from.strip_prefix("metadata:").and_then(|key| event.metadata(key));
    let id = match by_metadata {
        Some(id) if is_valid_account_id(id) => Some(id.to_owned()),
        Some(_) => return Outcome::Rejected("subscription metadata names no valid account id".into()),
        None => match event.customer() {
            Some(c) => match accounts.account_for_customer(c).await {
                Ok(id) => id,
                Err(e) => return unavailable(e),
            },
            None => None,
        },
    };
    let Some(id) = id else { return Outcome::Ignored("no account for this customer") };
    let account = match accounts.find(&id).await {
        Ok(Some(a)) => a,
        Ok(None) => return Outcome::Ignored("no such account"),
        Err(e) => return unavailable(e),
    };
    // Metadata (or a stale index) may name any account: only its own customer moves it.
    if account.stripe_customer.is_none() || account.stripe_customer.as_deref() != event.customer() {
        tracing::warn!(
            event = %event.id,
            account = %id,
            customer = event.customer().unwrap_or("-"),
            "stripe event's customer is not the account's stripe_customer; not applied"
        );
        return Outcome::Ignored("customer does not match the account");
    }
    let Some(created) = event.created_at() else { return Outcome::Rejected("event created is out of range".into()) };
    if account.billing_event_at.is_some_and(|applied| created < applied) {
        return Outcome::Ignored("older than the last applied event");
    }
    let Some(updated) = apply(event, &account, config) else { return Outcome::Ignored("event type not used") };
    match accounts.put_if_newer(&updated).await {
        Ok(true) => Outcome::Applied { account: id },
        Ok(false) => Outcome::Ignored("older than the last applied event"),
        Err(e) => unavailable(e),
    }
}

#[cfg(test)]
mod tests;
