//! What the store writes into Redis values, and the checks on what it reads back.
//!
//! A value read from Redis may have been written by another writer (or by
//! hand) and may hold anything; what is read here later feeds time and counter
//! arithmetic, so every field is checked against [`bounds`] and a value out of
//! bounds is [`StoreError::Corrupt`], never a panic or a wrapped number.
//! Depends on `entitlement`, `identity`, `usage`, `bounds` and [`super::keys`]
//! (the millisecond forms).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::keys::{from_millis, millis, window_ms};
use crate::bounds;
use crate::entitlement::{Account, MAX_WINDOW, Period, Quota, Status, Window};
use crate::identity::{KeyHash, KeyMeta};
use crate::store::StoreError;
use crate::usage::MAX_CREDITS;

/// An entitlement as stored under `P{acct}:account` (JSON). The id is the key's, not a field.
#[derive(Serialize, Deserialize)]
pub(super) struct AccountRecord {
    plan: String,
    #[serde(default)]
    status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    past_due_since: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    blocked: bool,
    #[serde(default)]
    features: Vec<String>,
    #[serde(default)]
    quotas: Vec<QuotaRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stripe_customer: Option<String>,
    /// Milliseconds, so the put-if-newer script can compare without parsing dates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    billing_event_ms: Option<i64>,
}

/// A quota override: exactly one of `period` (calendar) and `per_ms` (rolling).
#[derive(Serialize, Deserialize)]
struct QuotaRecord {
    meter: String,
    limit: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    period: Option<Period>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    per_ms: Option<u64>,
    /// A soft quota's ceiling (`MAX_LIMIT` for a soft quota without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ceiling: Option<u64>,
}

impl AccountRecord {
    pub(super) fn of(a: &Account) -> Self {
        Self {
            plan: a.plan.to_string(),
            status: a.status,
            past_due_since: a.past_due_since,
            expires_at: a.expires_at,
            blocked: a.blocked,
            features: a.extra_features.iter().cloned().collect(),
            quotas: a
                .quota_overrides
                .iter()
                .map(|q| QuotaRecord {
                    meter: q.meter.to_string(),
                    limit: q.limit,
                    period: match q.window {
                        Window::Calendar(p) => Some(p),
                        Window::Rolling(_) => None,
                    },
                    per_ms: match q.window {
                        Window::Rolling(d) => Some(window_ms(d)),
                        Window::Calendar(_) => None,
                    },
                    ceiling: q.ceiling,
                })
                .collect(),
            stripe_customer: a.stripe_customer.clone(),
            billing_event_ms: a.billing_event_at.map(millis),
        }
    }

    /// The account, if every field is within [`bounds`].
    pub(super) fn into_account(self, id: &str) -> Result<Account, StoreError> {
        let corrupt = |why: String| StoreError::Corrupt(format!("account {id}: {why}"));
        if self.quotas.len() > bounds::MAX_ITEMS || self.features.len() > bounds::MAX_ITEMS {
            return Err(corrupt(format!("more than {} features or quotas", bounds::MAX_ITEMS)));
        }
        let mut quotas = Vec::with_capacity(self.quotas.len());
        for q in self.quotas {
            let window = match (q.period, q.per_ms) {
                (Some(p), None) => Window::Calendar(p),
                (None, Some(ms)) if (1..=window_ms(MAX_WINDOW)).contains(&ms) => {
                    Window::Rolling(Duration::from_millis(ms))
                }
                _ => return Err(corrupt(format!("quota {:?} has no valid window", q.meter))),
            };
            quotas.push(Quota { meter: q.meter.into(), limit: q.limit, window, ceiling: q.ceiling });
        }
        let billing_event_at = match self.billing_event_ms {
            Some(ms) => Some(from_millis(ms).ok_or_else(|| corrupt(format!("billing_event_ms {ms} is out of range")))?),
            None => None,
        };
        let account = Account {
            id: id.into(),
            plan: self.plan.into(),
            status: self.status,
            past_due_since: self.past_due_since,
            expires_at: self.expires_at,
            blocked: self.blocked,
            extra_features: self.features.into_iter().collect(),
            quota_overrides: quotas,
            stripe_customer: self.stripe_customer,
            billing_event_at,
        };
        bounds::check_account(&account).map_err(StoreError::Corrupt)?;
        Ok(account)
    }
}

/// The JSON stored for `account`, which must be within [`bounds`]: nothing out of bounds is written.
pub(super) fn encode_account(account: &Account) -> Result<String, StoreError> {
    bounds::check_account(account).map_err(StoreError::Corrupt)?;
    serde_json::to_string(&AccountRecord::of(account)).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Reads a stored entitlement: JSON, then bounds.
pub(super) fn decode_account(id: &str, json: &str) -> Result<Account, StoreError> {
    let record: AccountRecord =
        serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("account {id}: {e}")))?;
    record.into_account(id)
}

/// The put-if-newer script's event argument: ms, or `''` when the account carries none.
/// (`encode_account` keeps the event time within `min_time..=max_time`: never negative.)
pub(super) fn billing_event_arg(account: &Account) -> String {
    account.billing_event_at.map_or_else(String::new, |t| millis(t).to_string())
}

/// What operators may see of a key, as stored in `P{acct}:keys`.
pub(super) fn encode_key_meta(meta: &KeyMeta) -> Result<String, StoreError> {
    serde_json::to_string(meta).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// One field of `P{acct}:keys`: the key id (hex) and its metadata.
pub(super) fn decode_key(hex: &str, meta: &str) -> Result<(KeyHash, KeyMeta), StoreError> {
    let hash = KeyHash::from_hex(hex).ok_or_else(|| StoreError::Corrupt(format!("key id {hex:?}")))?;
    let meta = serde_json::from_str(meta).map_err(|e| StoreError::Corrupt(format!("key {hex}: {e}")))?;
    Ok((hash, meta))
}

/// A stored balance: digits only, at most [`MAX_CREDITS`]. A float, a sign or
/// a larger number was not written by us.
pub(super) fn decode_credits(account: &str, v: &str) -> Result<u64, StoreError> {
    v.parse::<u64>()
        .ok()
        .filter(|c| v.bytes().all(|b| b.is_ascii_digit()) && *c <= MAX_CREDITS)
        .ok_or_else(|| StoreError::Corrupt(format!("account {account}: credits {v:?}")))
}
