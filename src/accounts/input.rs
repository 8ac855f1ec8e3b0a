//! What the accounts service takes from callers, and how it refuses it: the
//! input types, the checks on them (pure, run before any store call), and
//! [`Invalid`], which names the field at fault relative to the input, so each
//! caller roots it at its own message (`plan` → `entitlement.plan`).
//!
//! May use: `entitlement` (`Quota::new` builds every quota), `bounds`.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::bounds::{MAX_CUSTOMER_ID, MAX_ITEMS, MAX_NAME, is_valid_customer_id, is_valid_name};
use crate::entitlement::{Account, Period, Quota, QuotaError, Status, is_valid_account_id, is_valid_time};

/// An input the caller got wrong: the field, relative to what the operation
/// takes (`plan`, `quota_overrides[0].limit`; `""` for the input as a whole),
/// and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The field at fault.
    pub field: String,
    /// Why it is refused (`must be at most …`).
    pub reason: String,
}

impl Invalid {
    /// `field` is refused for `reason`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }

    /// The same refusal with its field rooted at `parent`
    /// (`plan` under `entitlement` is `entitlement.plan`).
    pub fn under(self, parent: &str) -> Self {
        let field = if self.field.is_empty() { parent.to_owned() } else { format!("{parent}.{}", self.field) };
        Self { field, ..self }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() { f.write_str(&self.reason) } else { write!(f, "{}: {}", self.field, self.reason) }
    }
}

impl std::error::Error for Invalid {}

impl From<QuotaError> for Invalid {
    fn from(e: QuotaError) -> Self {
        Invalid::new(e.field(), e.to_string())
    }
}

/// An account id as every way in takes it ([`is_valid_account_id`]).
pub fn check_account_id(id: &str, field: &str) -> Result<(), Invalid> {
    if is_valid_account_id(id) { Ok(()) } else { Err(Invalid::new(field, "must be 1-128 of A-Z a-z 0-9 _ - . : @")) }
}

/// An optional name (empty allowed): at most 128 bytes, no control characters.
pub fn check_optional_name(value: &str, field: &str) -> Result<(), Invalid> {
    if value.is_empty() || is_valid_name(value) {
        Ok(())
    } else {
        Err(Invalid::new(field, format!("at most {MAX_NAME} bytes, no control characters")))
    }
}

/// A plan, meter or feature name that must be there (the words of `Quota::new`'s meter check).
fn check_name(value: &str, field: &str) -> Result<(), Invalid> {
    if is_valid_name(value) { Ok(()) } else { Err(Invalid::new(field, QuotaError::MeterInvalid.to_string())) }
}

/// An instant inside what every way in accepts (1970 to 9999).
fn check_time(t: DateTime<Utc>, field: &str) -> Result<DateTime<Utc>, Invalid> {
    if is_valid_time(t) { Ok(t) } else { Err(Invalid::new(field, "must be between 1970-01-01 and 9999-12-31")) }
}

/// An entitlement as a client states it (`PutEntitlement`): wire names and
/// all. [`Accounts::put`](super::Accounts::put) checks every field and names the one at fault as
/// it is named here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntitlementEdit {
    /// The account; created when it does not exist.
    pub account_id: String,
    /// A configured plan.
    pub plan: String,
    /// A status's wire name ([`Status::parse`]); empty for `active`.
    pub status: String,
    /// Required when `status` is `past_due`.
    pub past_due_since: Option<DateTime<Utc>>,
    /// When access ends regardless of status.
    pub expires_at: Option<DateTime<Utc>>,
    /// Blocked by an operator.
    pub blocked: bool,
    /// Features on top of the plan's; blank ones are dropped.
    pub extra_features: Vec<String>,
    /// Quotas replacing or adding to the plan's.
    pub quota_overrides: Vec<QuotaEdit>,
    /// The Stripe customer id; empty for none.
    pub stripe_customer: String,
}

/// A quota override as a client states it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaEdit {
    /// The meter counted.
    pub meter: String,
    /// Units per window.
    pub limit: u64,
    /// A calendar period's wire name ([`Period::parse`]); empty when `per` is set.
    pub period: String,
    /// A rolling window.
    pub per: Option<Duration>,
    /// Past the limit requests pass as overage.
    pub soft: bool,
    /// A soft quota's hard stop.
    pub ceiling: Option<u64>,
}

impl QuotaEdit {
    /// The quota, built by [`Quota::new`]; fields are named relative to the override.
    fn quota(&self) -> Result<Quota, Invalid> {
        let period = match self.period.as_str() {
            "" => None,
            name => {
                Some(Period::parse(name).ok_or_else(|| Invalid::new("period", "minute|hour|day|month, or set per"))?)
            }
        };
        Ok(Quota::new(&self.meter, self.limit, period, self.per)?.soften(self.soft, self.ceiling)?)
    }
}

impl EntitlementEdit {
    /// The account this edit describes, every field checked, in the order
    /// they are listed (so the first field at fault is the one named), before
    /// any store call; `billing_event_at` is left for the caller to carry over.
    pub fn into_account(self, plans: &crate::decision::Plans) -> Result<Account, Invalid> {
        check_account_id(&self.account_id, "account_id")?;
        if !plans.contains_key(&self.plan) {
            let mut known: Vec<&str> = plans.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err(Invalid::new("plan", format!("unknown plan {:?} (known: {})", self.plan, known.join(", "))));
        }
        // A configured plan's name is a valid one: config checks it.
        let status = match self.status.as_str() {
            "" => Status::Active,
            s => Status::parse(s)
                .ok_or_else(|| Invalid::new("status", "active|trialing|past_due|canceled|unpaid|expired|paused"))?,
        };
        let past_due_since = self.past_due_since.map(|t| check_time(t, "past_due_since")).transpose()?;
        if status == Status::PastDue && past_due_since.is_none() {
            return Err(Invalid::new("past_due_since", "required when status is past_due"));
        }
        if !self.stripe_customer.is_empty() && !is_valid_customer_id(&self.stripe_customer) {
            return Err(Invalid::new("stripe_customer", format!("1-{MAX_CUSTOMER_ID} of A-Z a-z 0-9 _")));
        }
        if self.extra_features.len() > MAX_ITEMS || self.quota_overrides.len() > MAX_ITEMS {
            return Err(Invalid::new(
                "",
                format!("at most {MAX_ITEMS} extra_features and {MAX_ITEMS} quota_overrides"),
            ));
        }
        for (i, f) in self.extra_features.iter().enumerate() {
            check_name(f, &format!("extra_features[{i}]"))?;
        }
        let mut quota_overrides: Vec<Quota> = Vec::with_capacity(self.quota_overrides.len());
        for (i, q) in self.quota_overrides.iter().enumerate() {
            let at = format!("quota_overrides[{i}]");
            let q = q.quota().map_err(|e| e.under(&at))?;
            if quota_overrides.iter().any(|o| o.meter == q.meter && o.window == q.window) {
                return Err(Invalid::new(at, format!("duplicate quota {}", q.policy_name())));
            }
            quota_overrides.push(q);
        }
        let expires_at = self.expires_at.map(|t| check_time(t, "expires_at")).transpose()?;
        Ok(Account {
            id: self.account_id.into(),
            plan: self.plan.into(),
            status,
            past_due_since,
            expires_at,
            blocked: self.blocked,
            extra_features: self.extra_features.into_iter().filter(|f| !f.trim().is_empty()).collect(),
            quota_overrides,
            stripe_customer: Some(self.stripe_customer).filter(|c| !c.is_empty()),
            billing_event_at: None,
        })
    }
}
