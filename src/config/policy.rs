//! The billing side of the config: the billing provider and portal, problem
//! body texts, and the accounts to seed a store with. (Plans, the grace period
//! and the unmatched-route rule are [`crate::decision::Policy`] itself.)
//!
//! May use the domain modules (`entitlement`, `decision`) and
//! [`super::secrets`]; never the store or the transports.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::secrets::Secrets;
use crate::decision::Code;
use crate::entitlement::Account;
use crate::settlement::ChargeOn;

/// `billing.stripe:`.
#[derive(Debug, Clone)]
pub struct StripeConfig {
    /// Environment variable with comma-separated signing secrets.
    pub webhook_secrets_env: String,
    /// Signing secrets: `webhook_secrets` plus those in `webhook_secrets_env`, read at (re)load.
    pub webhook_secrets: Secrets,
    /// Maximum age of a signed event.
    pub tolerance: Duration,
    /// `customer`, or `metadata:<key>` on the subscription.
    pub account_from: String,
    /// Stripe price id → plan name.
    pub prices: BTreeMap<String, String>,
    /// Stripe entitlement feature lookup key → tollgate feature (unmapped keys are used as-is).
    pub features: BTreeMap<String, String>,
}

/// `billing:`.
#[derive(Debug, Clone)]
pub struct BillingConfig {
    /// Billing portal; `{account}` is replaced by the account id.
    pub portal_url: Option<String>,
    /// Stripe webhook settings.
    pub stripe: Option<StripeConfig>,
    /// The response classes charged (`charge_on`); others are refunded on settlement.
    pub charge_on: ChargeOn,
}

impl BillingConfig {
    /// The portal link for `account`, if a portal is configured.
    pub fn portal_for(&self, account: &str) -> Option<String> {
        self.portal_url.as_ref().map(|u| u.replace("{account}", account))
    }
}

/// A per-code override of a problem body's texts; `{placeholders}` are filled in.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProblemOverride {
    /// Replaces the title.
    pub title: Option<String>,
    /// Replaces the detail.
    pub detail: Option<String>,
    /// Replaces the link (and the `Link` header).
    pub link: Option<String>,
}

/// `problems:`.
#[derive(Debug, Clone)]
pub struct ProblemsConfig {
    /// The `type` URI is this plus the code in kebab case.
    pub type_base: String,
    /// Per-code overrides.
    pub overrides: HashMap<Code, ProblemOverride>,
}

/// An account from `accounts:` with its secrets and balance, for seeding a store.
#[derive(Clone, PartialEq, Eq)]
pub struct SeedAccount {
    /// The entitlement.
    pub account: Account,
    /// Plain API keys; hashed before they reach any store.
    pub api_keys: Vec<String>,
    /// Initial prepaid credits.
    pub credits: u64,
}

impl fmt::Debug for SeedAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeedAccount")
            .field("account", &self.account)
            .field("api_keys", &format_args!("<{} redacted>", self.api_keys.len()))
            .field("credits", &self.credits)
            .finish()
    }
}
