//! The bounds on every input: ids, names, windows, dates, limits, what an
//! account and a spend may hold. Config, the internal API, Stripe events and
//! both stores check against the same rules, so what one way in accepts no
//! other refuses (and a store never holds what arithmetic cannot handle).
//! Depends on `entitlement` and `usage` only.

use chrono::{DateTime, Utc};

use crate::entitlement::{Account, Quota, Window, is_valid_account_id, is_valid_time};
use crate::usage::Spend;

// A quota's own bounds live with `Quota::new`, which checks them; they are
// listed here too, so this stays the index of every bound.
pub use crate::entitlement::{MAX_LIMIT, MAX_NAME, MAX_WINDOW, MIN_WINDOW, is_valid_name, is_valid_window};

/// The longest Stripe customer id (Stripe's are `cus_` and ~14 characters).
pub const MAX_CUSTOMER_ID: usize = 255;

/// The most extra features or quota overrides one account carries.
pub const MAX_ITEMS: usize = 256;

/// Whether `id` can be a Stripe customer id: 1–255 of `A-Z a-z 0-9 _`.
/// Customer ids become Redis keys and log fields.
pub fn is_valid_customer_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_CUSTOMER_ID && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Why `q` cannot be counted: its limit or window is out of bounds. For
/// quotas already made (stored records, spends); a new one is checked by
/// [`Quota::new`], which also refuses a limit of 0 (a stored 0 is countable:
/// it never fits).
pub fn check_quota(q: &Quota) -> Result<(), String> {
    if !is_valid_name(&q.meter) {
        return Err(format!("quota meter {:?} is not a valid name", q.meter));
    }
    if q.limit > MAX_LIMIT {
        return Err(format!("quota {}: limit {} is above {MAX_LIMIT}", q.meter, q.limit));
    }
    if let Some(c) = q.ceiling
        && (q.window.is_rate() || c <= q.limit || c > MAX_LIMIT)
    {
        return Err(format!(
            "quota {}: ceiling {c} must be above the limit {} and at most {MAX_LIMIT}, on a period quota",
            q.meter, q.limit
        ));
    }
    match q.window {
        Window::Rolling(d) if !is_valid_window(d) => {
            Err(format!("quota {}: window {d:?} is outside {MIN_WINDOW:?}..={MAX_WINDOW:?}", q.meter))
        }
        _ => Ok(()),
    }
}

/// Why `a` cannot be stored: the first field out of bounds.
pub fn check_account(a: &Account) -> Result<(), String> {
    if !is_valid_account_id(&a.id) {
        return Err(format!("account id {:?} is not valid", a.id));
    }
    let id = &a.id;
    if !is_valid_name(&a.plan) {
        return Err(format!("account {id}: plan {:?} is not a valid name", a.plan));
    }
    let dates = [("past_due_since", a.past_due_since), ("expires_at", a.expires_at)];
    for (field, t) in dates.into_iter().chain([("billing_event_at", a.billing_event_at)]) {
        if let Some(t) = t.filter(|t: &DateTime<Utc>| !is_valid_time(*t)) {
            return Err(format!("account {id}: {field} {t} is out of range"));
        }
    }
    if a.extra_features.len() > MAX_ITEMS || a.quota_overrides.len() > MAX_ITEMS {
        return Err(format!("account {id}: more than {MAX_ITEMS} features or quotas"));
    }
    if let Some(f) = a.extra_features.iter().find(|f| !is_valid_name(f)) {
        return Err(format!("account {id}: feature {f:?} is not a valid name"));
    }
    for q in &a.quota_overrides {
        check_quota(q).map_err(|e| format!("account {id}: {e}"))?;
    }
    if let Some(c) = a.stripe_customer.as_deref().filter(|c| !is_valid_customer_id(c)) {
        return Err(format!("account {id}: stripe_customer {c:?} is not a valid customer id"));
    }
    Ok(())
}

/// Why `spend` cannot be carried out: its clock is outside the instants
/// any way in accepts, a quota is out of bounds, or two quotas share a
/// counter (same meter and window, rolling ones compared in whole
/// milliseconds as Redis keys them), which would spend that counter twice
/// after checking it once. Both stores check this before anything moves.
pub fn check_spend(spend: &Spend) -> Result<(), String> {
    if !is_valid_time(spend.now) {
        return Err(format!("spend instant {} is out of range", spend.now));
    }
    fn counter(q: &Quota) -> (&str, Result<u128, crate::entitlement::Period>) {
        match q.window {
            Window::Calendar(p) => (&*q.meter, Err(p)),
            Window::Rolling(d) => (&*q.meter, Ok(d.as_millis())),
        }
    }
    for (i, q) in spend.quotas.iter().enumerate() {
        check_quota(q)?;
        if spend.quotas[..i].iter().any(|earlier| counter(earlier) == counter(q)) {
            return Err(format!("quota {} appears twice in one spend", q.policy_name()));
        }
    }
    Ok(())
}
