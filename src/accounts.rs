//! The accounts service: every change to an account's entitlement, credits,
//! API keys and usage, for the internal API (`grpc::api`), Stripe webhooks
//! (`stripe`) and seeding.
//!
//! The rules live here; the transports translate. Inputs are checked before
//! any store call (`input.rs`, pure), and a refusal is an [`Invalid`] naming
//! the field relative to what the operation takes (`plan`,
//! `quota_overrides[0].limit`), which the caller roots at its own message
//! (`entitlement.plan`). A new quota is built by [`Quota::new`], the
//! constructor config uses. Each operation reads
//! one config snapshot, so a plan is looked up once and a reload never lands
//! halfway. Usage is reported by [`decision::settle`], the code that reports
//! it on a Check.
//!
//! Store calls go through `Authorizer::call`, as the Check path's do: the
//! same `store.timeout`, the same latency and error metrics. A failure is
//! [`AccountsError::Store`], which every transport maps the way the Check
//! path maps a store fault (see `grpc::status`).
//!
//! May use: `entitlement`, `usage`, `bounds`, `identity` (key hashes),
//! `decision` (quota state), `store`, `config` (plans, seed accounts) and
//! `authorizer` (the live config and its timed store calls).

mod input;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::authorizer::Authorizer;
use crate::config::{Config, SeedAccount};
use crate::decision::{self, AllowKind, Decision, QuotaState};
use crate::entitlement::{Account, Plan, Quota};
use crate::identity::{KeyHash, KeyMeta};
use crate::store::{Store, StoreError};
use crate::usage::{MAX_CREDITS, Spend};

pub use input::{EntitlementEdit, Invalid, QuotaEdit, check_account_id, check_optional_name};

/// Why an accounts operation did nothing.
#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    /// An input is out of bounds or unknown; nothing was looked up or changed.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// No account has this id.
    #[error("account {0:?} does not exist")]
    NotFound(String),
    /// The account names a plan the config does not define (an operator error).
    #[error("plan {0:?} is not configured")]
    PlanUnknown(String),
    /// Adding the delta would take the balance below zero or above [`MAX_CREDITS`].
    #[error("delta: the balance would go below zero or above {MAX_CREDITS}; nothing changed")]
    BalanceOutOfRange,
    /// The OS had no randomness for a new API key.
    #[error("no randomness available")]
    NoRandomness,
    /// The store failed, timed out, or answered with data it cannot read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AccountsError {
    /// Roots an [`Invalid`]'s field at `parent`; other errors are unchanged.
    pub fn under(self, parent: &str) -> Self {
        match self {
            AccountsError::Invalid(i) => AccountsError::Invalid(i.under(parent)),
            e => e,
        }
    }
}

/// An account's entitlement with its balance, as `GetEntitlement` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountState {
    /// The entitlement.
    pub account: Arc<Account>,
    /// The prepaid balance.
    pub credits: u64,
}

/// An account's quotas in their current windows, as a Check reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The account.
    pub account: String,
    /// Its plan.
    pub plan: String,
    /// Each quota (of the meter asked about, or all), with used and remaining units.
    pub quotas: Vec<QuotaState>,
    /// The balance, on a prepaid plan.
    pub credits: Option<u64>,
}

/// A key just created: the key itself is shown this once and never stored.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// The key: `tg_` and 40 hex digits.
    pub key: String,
    /// Its id, the SHA-256 the store keeps.
    pub hash: KeyHash,
    /// What operators may see of it.
    pub meta: KeyMeta,
}

/// The accounts service. Cheap to clone; share it in an `Arc` all the same.
#[derive(Debug, Clone)]
pub struct Accounts {
    /// The live config (plans, `store.timeout`), the store and the metrics,
    /// and [`Authorizer::call`], which times and counts every store call.
    authorizer: Arc<Authorizer>,
}

impl Accounts {
    /// A service over `authorizer`'s config and store.
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        Self { authorizer }
    }

    /// Writes config `accounts:` into `store`: entitlements, key hashes (never
    /// the keys) and balances. Idempotent: usage is not touched and credits
    /// are set, not added. Every seed's plan must be one of `plans`; nothing
    /// is written otherwise.
    ///
    /// Runs before any service exists (start-up, `tollgate seed`), so its
    /// calls are not timed: the first one to Redis connects, which may take
    /// longer than `store.timeout`, and a batch has no client waiting.
    pub async fn seed(
        store: &dyn Store,
        seeds: &[SeedAccount],
        plans: &crate::decision::Plans,
    ) -> Result<usize, AccountsError> {
        if let Some(s) = seeds.iter().find(|s| !plans.contains_key(&*s.account.plan)) {
            return Err(AccountsError::PlanUnknown(s.account.plan.to_string()));
        }
        let now = Utc::now();
        for s in seeds {
            store.put_account(&s.account).await?;
            for key in &s.api_keys {
                // Seeded keys are chosen by people: show less of them than of generated ones.
                let meta = KeyMeta::for_key(key, 4, "seeded", now);
                store.put_key(&KeyHash::of(key), &s.account.id, &meta).await?;
            }
            store.set_credits(&s.account.id, s.credits).await?;
        }
        Ok(seeds.len())
    }

    /// Runs one store call with the Check path's timeout and metrics; a
    /// failure is logged with its cause (the client sees only that the store failed).
    async fn call<T>(
        &self,
        timeout: Duration,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, AccountsError> {
        self.call_lazy(timeout, move || f).await
    }

    /// [`Self::call`] for a call made by `make` once the clock runs (see `Authorizer::call_lazy`).
    async fn call_lazy<T, F: Future<Output = Result<T, StoreError>>>(
        &self,
        timeout: Duration,
        make: impl FnOnce() -> F,
    ) -> Result<T, AccountsError> {
        self.authorizer.call_lazy(timeout, make).await.map_err(|e| {
            tracing::warn!(error = %e, transient = e.is_transient(), "store call failed in the accounts service");
            AccountsError::Store(e)
        })
    }

    /// The timeout of a single call, from the config in force now.
    fn timeout(&self) -> Duration {
        self.authorizer.config().store.timeout
    }

    fn store(&self) -> &dyn Store {
        self.authorizer.store().as_ref()
    }

    /// The account `id` names: checked, then looked up.
    async fn load(&self, config: &Config, id: &str) -> Result<Arc<Account>, AccountsError> {
        check_account_id(id, "account_id")?;
        self.call_lazy(config.store.timeout, || self.store().account(id))
            .await?
            .ok_or_else(|| AccountsError::NotFound(id.to_owned()))
    }

    async fn state(&self, config: &Config, account: Arc<Account>) -> Result<AccountState, AccountsError> {
        let credits = self.call(config.store.timeout, self.store().credits(&account.id)).await?;
        Ok(AccountState { account, credits })
    }

    /// An account's entitlement and balance.
    pub async fn get(&self, id: &str) -> Result<AccountState, AccountsError> {
        let config = self.authorizer.config();
        let account = self.load(&config, id).await?;
        self.state(&config, account).await
    }

    /// Creates or replaces an account's entitlement (not its keys, credits or
    /// usage); the `billing_event_at` of the stored one is kept.
    pub async fn put(&self, edit: EntitlementEdit) -> Result<AccountState, AccountsError> {
        let config = self.authorizer.config();
        let mut account = edit.into_account(&config.policy.plans)?;
        let timeout = config.store.timeout;
        let previous = self.call_lazy(timeout, || self.store().account(&account.id)).await?;
        account.billing_event_at = previous.and_then(|p| p.billing_event_at);
        self.call(timeout, self.store().put_account(&account)).await?;
        tracing::info!(account = %account.id, plan = %account.plan, status = %account.status, "entitlement put");
        self.state(&config, Arc::new(account)).await
    }

    /// Blocks (or unblocks) an account for a reason other than billing.
    pub async fn set_blocked(&self, id: &str, blocked: bool) -> Result<AccountState, AccountsError> {
        let config = self.authorizer.config();
        let mut account = (*self.load(&config, id).await?).clone();
        account.blocked = blocked;
        self.call(config.store.timeout, self.store().put_account(&account)).await?;
        tracing::info!(account = %account.id, blocked, "account block changed");
        self.state(&config, Arc::new(account)).await
    }

    /// Sets an account's prepaid balance; returns it.
    pub async fn set_credits(&self, id: &str, credits: u64) -> Result<u64, AccountsError> {
        if credits > MAX_CREDITS {
            return Err(Invalid::new("credits", format!("must be at most {MAX_CREDITS}")).into());
        }
        let config = self.authorizer.config();
        let account = self.load(&config, id).await?;
        self.call(config.store.timeout, self.store().set_credits(&account.id, credits)).await?;
        Ok(credits)
    }

    /// Adds `delta` (which may be negative) to a balance atomically; returns the new balance.
    pub async fn add_credits(&self, id: &str, delta: i64) -> Result<u64, AccountsError> {
        if delta.unsigned_abs() > MAX_CREDITS {
            return Err(Invalid::new("delta", format!("must be within ±{MAX_CREDITS}")).into());
        }
        let config = self.authorizer.config();
        let account = self.load(&config, id).await?;
        self.call(config.store.timeout, self.store().add_credits(&account.id, delta))
            .await?
            .ok_or(AccountsError::BalanceOutOfRange)
    }

    /// Creates an API key for an account; only its hash is stored.
    pub async fn create_key(&self, id: &str, name: &str) -> Result<NewKey, AccountsError> {
        check_optional_name(name, "name")?;
        let config = self.authorizer.config();
        let account = self.load(&config, id).await?;
        let key = new_api_key()?;
        let hash = KeyHash::of(&key);
        let meta = KeyMeta::for_key(&key, 11, name, Utc::now());
        self.call(config.store.timeout, self.store().put_key(&hash, &account.id, &meta)).await?;
        tracing::info!(account = %account.id, key_id = %hash.to_hex(), "API key created");
        Ok(NewKey { key, hash, meta })
    }

    /// Revokes one of an account's keys, named by its id (the SHA-256 in hex);
    /// false when the account has no such key.
    pub async fn revoke_key(&self, id: &str, key_id: &str) -> Result<bool, AccountsError> {
        check_account_id(id, "account_id")?;
        let hash = KeyHash::from_hex(key_id)
            .ok_or_else(|| Invalid::new("key_id", "must be the key's SHA-256 as 64 hex digits"))?;
        let revoked = self.call(self.timeout(), self.store().revoke_key(id, &hash)).await?;
        tracing::info!(account = %id, key_id = %key_id, revoked, "API key revoked");
        Ok(revoked)
    }

    /// An account's keys: ids and metadata, never the keys.
    pub async fn list_keys(&self, id: &str) -> Result<Vec<(KeyHash, KeyMeta)>, AccountsError> {
        check_account_id(id, "account_id")?;
        self.call(self.timeout(), self.store().list_keys(id)).await
    }

    /// An account's quotas (of `meter`, or all when it is empty) in their current windows.
    pub async fn usage(&self, id: &str, meter: &str) -> Result<Usage, AccountsError> {
        check_optional_name(meter, "meter")?;
        let config = self.authorizer.config();
        let account = self.load(&config, id).await?;
        let plan = plan_of(&config, &account)?;
        self.report(&config, &account, plan, quotas_of(&account, plan, meter), Utc::now()).await
    }

    /// Zeroes an account's current windows (of `meter`, or all), then reports them.
    pub async fn reset_usage(&self, id: &str, meter: &str) -> Result<Usage, AccountsError> {
        check_optional_name(meter, "meter")?;
        let config = self.authorizer.config();
        let account = self.load(&config, id).await?;
        let plan = plan_of(&config, &account)?;
        let now = Utc::now();
        let quotas = quotas_of(&account, plan, meter);
        self.call(config.store.timeout, self.store().reset_usage(&account.id, &quotas, now)).await?;
        tracing::info!(account = %account.id, meter = %meter, "usage reset");
        self.report(&config, &account, plan, quotas, now).await
    }

    /// A zero-cost dry run over the quotas, settled as a Check's spend is.
    async fn report(
        &self,
        config: &Config,
        account: &Account,
        plan: &Plan,
        quotas: Vec<Quota>,
        now: DateTime<Utc>,
    ) -> Result<Usage, AccountsError> {
        let spend = Spend {
            account: account.id.clone(),
            quotas: quotas.into(),
            cost: 0,
            credits: plan.prepaid.then_some(0),
            now,
            dry_run: true,
            shadow: false,
        };
        let answer = self.call_lazy(config.store.timeout, || self.store().spend(&spend)).await?;
        let settled = decision::settle(&spend, &answer, Decision::allow(AllowKind::Allowed));
        Ok(Usage {
            account: account.id.to_string(),
            plan: account.plan.to_string(),
            quotas: settled.quotas.into_vec(),
            credits: settled.credits,
        })
    }

    /// The account whose `stripe_customer` is `customer`.
    pub async fn account_for_customer(&self, customer: &str) -> Result<Option<String>, AccountsError> {
        self.call(self.timeout(), self.store().account_for_customer(customer)).await
    }

    /// An account, or `None` when there is no such account.
    pub async fn find(&self, id: &str) -> Result<Option<Arc<Account>>, AccountsError> {
        self.call_lazy(self.timeout(), || self.store().account(id)).await
    }

    /// Writes a billing change unless a newer one was applied already
    /// (atomically, so late events never roll an account back); returns whether it was written.
    pub async fn put_if_newer(&self, account: &Account) -> Result<bool, AccountsError> {
        self.call(self.timeout(), self.store().put_account_if_newer(account)).await
    }

    /// Records a billing event id for `ttl`; false when it was recorded already (a replay).
    pub async fn remember_event(&self, id: &str, ttl: Duration) -> Result<bool, AccountsError> {
        self.call(self.timeout(), self.store().remember_event(id, ttl)).await
    }

    /// Forgets a billing event id, so the provider's retry of it is processed.
    pub async fn forget_event(&self, id: &str) -> Result<(), AccountsError> {
        self.call(self.timeout(), self.store().forget_event(id)).await
    }
}

/// The account's plan in `config`.
fn plan_of<'c>(config: &'c Config, account: &Account) -> Result<&'c Plan, AccountsError> {
    config.policy.plans.get(&*account.plan).ok_or_else(|| AccountsError::PlanUnknown(account.plan.to_string()))
}

/// The account's quotas of `meter` (all when it is empty), as a Check counts them.
fn quotas_of(account: &Account, plan: &Plan, meter: &str) -> Vec<Quota> {
    account.all_quotas(plan).into_iter().filter(|q| meter.is_empty() || *q.meter == *meter).collect()
}

/// A new API key: `tg_` and 40 hex digits from the OS's CSPRNG.
fn new_api_key() -> Result<String, AccountsError> {
    let mut bytes = [0u8; 20];
    getrandom::fill(&mut bytes).map_err(|_| AccountsError::NoRandomness)?;
    Ok(format!("tg_{}", hex::encode(bytes)))
}

#[cfg(test)]
mod tests;
