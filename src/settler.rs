//! Settles charges as Envoy's access log reports their responses: the I/O
//! around the pure [`settlement`](crate::settlement) functions.
//!
//! Each entry that carries a charge is verified with the store's key, turned
//! into an adjustment by [`settlement::settle`] with the live
//! `billing.charge_on`, and applied by the store once per charge id. Bad
//! entries are counted and logged (the first of each kind at `warn`, the rest
//! at `debug`), never applied, never fatal. A store fault is retried briefly;
//! after that the reservation stands (the request stays charged what the
//! route costs) and the entry counts as `failed`.
//!
//! May use: `settlement`, `authorizer` (live config, key, timed store calls), `store`, `metrics`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;

use crate::authorizer::Authorizer;
use crate::config::Config;
use crate::entitlement::Window;
use crate::settlement::{self, Bad, Charge, Served};
use crate::store::StoreError;
use crate::usage::{Adjustment, Mark, Settled};

/// Store attempts per adjustment, and the pause before the first retry (quadrupled after).
const ATTEMPTS: u32 = 3;
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// Entries of one message settled at once.
const IN_FLIGHT: usize = 32;

/// The response headers an access-log entry logged: looked up by name only
/// for a charge with a cost header, so an entry need not decode them first.
pub trait LoggedHeaders: std::fmt::Debug + Sync {
    /// The value logged under `name` (Envoy logs names as configured, so
    /// one in another case counts too).
    fn header(&self, name: &str) -> Option<&str>;
}

/// What settlement reads of one access-log entry.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// The charge from the Check's metadata.
    pub charge: &'a str,
    /// The response status; 0 when none was sent.
    pub code: u32,
    /// The response headers Envoy logged.
    pub headers: &'a dyn LoggedHeaders,
}

/// Runs a store call, retrying transient failures twice (100 ms, then 400 ms later).
async fn retry<T, F: Future<Output = Result<T, StoreError>>>(mut call: impl FnMut() -> F) -> Result<T, StoreError> {
    let mut pause = FIRST_RETRY;
    let mut attempt = 1;
    loop {
        match call().await {
            Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                tokio::time::sleep(pause).await;
                pause *= 4;
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// Charge ids to record for one (account, remember-until: one per slot of
/// issue): an issue instant of that slot, and the ids.
type Recorded = (DateTime<Utc>, Vec<String>);

/// Turns access-log entries into settled charges.
pub struct Settler {
    authorizer: Arc<Authorizer>,
    /// Reasons already logged at `warn`.
    warned: Mutex<HashSet<Bad>>,
}

impl std::fmt::Debug for Settler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settler").finish_non_exhaustive()
    }
}

impl Settler {
    /// A settler over the authorizer's store, config and metrics.
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        Self { authorizer, warned: Mutex::new(HashSet::new()) }
    }

    /// Settles the charges of one message's entries. Charges whose response
    /// costs the reservation, with events off, have nothing to move: their
    /// ids are recorded in one store call per account and slot of issue.
    /// The others are settled with one store call per account (per group of
    /// windows, by the store), up to [`IN_FLIGHT`] accounts at once.
    pub async fn settle_all(&self, entries: &[Entry<'_>]) {
        let metrics = self.authorizer.metrics();
        let config = self.authorizer.config();
        let mut refreshed = false;
        let mut key = match self.authorizer.charge_key(config.store.timeout).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "cannot settle: no key to verify charges with");
                for _ in entries {
                    metrics.record_settlement("failed");
                }
                return;
            }
        };
        let now = Utc::now();
        let mut record: HashMap<(String, DateTime<Utc>), Recorded> = HashMap::new();
        let mut work = Vec::new();
        for e in entries {
            let charge = match self.open(e.charge, &mut key, &mut refreshed, &config).await {
                Ok(c) => c,
                Err(bad) => {
                    self.bad(bad, e.code, None);
                    continue;
                }
            };
            let header = charge.cost_header.as_deref().and_then(|h| e.headers.header(h));
            let served = Served { code: e.code, cost_header: header };
            let adjustment = match settlement::settle(&charge, served, config.billing.charge_on, now) {
                Ok(a) => a,
                Err(bad) => {
                    self.bad(bad, e.code, Some(&charge.account));
                    continue;
                }
            };
            if adjustment.delta == 0 && !config.events.enabled() {
                let group = (adjustment.account, adjustment.remember_until);
                record.entry(group).or_insert_with(|| (adjustment.issued, Vec::new())).1.push(adjustment.charge);
            } else {
                work.push((charge, e.code, adjustment));
            }
        }
        for ((account, until), (issued, ids)) in record {
            let store = self.authorizer.store();
            let n = ids.len() as u64;
            let call =
                || self.authorizer.call(config.store.timeout, store.record_settled(&account, issued, &ids, until));
            match retry(call).await {
                Ok(()) => (0..n).for_each(|_| metrics.record_settlement("unchanged")),
                Err(e) => {
                    tracing::warn!(account = %account, error = %e, "recording settled charges failed");
                    (0..n).for_each(|_| metrics.record_settlement("failed"));
                }
            }
        }
        // With events, each charge gets its usage event and threshold marks;
        // then one store call (per group of windows) settles an account's charges.
        let mut by_account: HashMap<String, Vec<Adjustment>> = HashMap::new();
        for (charge, code, mut adjustment) in work {
            if config.events.enabled() {
                let events = &config.events;
                // Both within 0..=MAX_COST: the final cost is the reservation moved by the delta.
                let units = charge.cost.saturating_add_signed(adjustment.delta);
                adjustment.event = Some(crate::events::usage(&events.source, &charge, code, units));
                adjustment.marks = self.marks(&config, &charge, now).await;
                adjustment.outbox_limit = events.outbox_limit;
            }
            by_account.entry(adjustment.account.clone()).or_default().push(adjustment);
        }
        futures_util::stream::iter(by_account.into_values())
            .for_each_concurrent(IN_FLIGHT, |adjustments| self.apply(&config, adjustments))
            .await;
    }

    /// Settles one account's charges that move counters or make events.
    async fn apply(&self, config: &Config, adjustments: Vec<Adjustment>) {
        let metrics = self.authorizer.metrics();
        let store = self.authorizer.store();
        let answers = match retry(|| self.authorizer.call(config.store.timeout, store.settle_many(&adjustments))).await
        {
            Ok(a) => a,
            Err(e) => {
                let account = adjustments.first().map_or("-", |a| a.account.as_str());
                tracing::warn!(account, charges = adjustments.len(), error = %e, "settlement failed; the reservations stand");
                adjustments.iter().for_each(|_| metrics.record_settlement("failed"));
                return;
            }
        };
        for (adjustment, answer) in adjustments.iter().zip(answers) {
            match answer {
                Settled::Applied { unpaid, queued, dropped } => {
                    metrics.record_events("queued", u64::from(queued));
                    metrics.record_events("dropped", u64::from(dropped));
                    if dropped > 0 {
                        tracing::warn!(account = %adjustment.account, dropped, "outbox full: events dropped");
                    }
                    metrics.record_settlement(if adjustment.delta == 0 { "unchanged" } else { "applied" });
                    let units = adjustment.delta.unsigned_abs();
                    metrics.record_settled_units(if adjustment.delta < 0 { "refunded" } else { "overage" }, units);
                    metrics.record_settled_units("unpaid", unpaid);
                    if unpaid > 0 {
                        tracing::info!(account = %adjustment.account, unpaid, "overage beyond the credit balance");
                    }
                }
                Settled::Duplicate => metrics.record_settlement("duplicate"),
            }
        }
    }

    /// Opens a charge with the current key, else the previous one (the
    /// store's key changed), else — once per message, and not within 5 s of
    /// the last read — with the key read again from the store (another
    /// replica made a new one after it was lost).
    async fn open(
        &self,
        token: &str,
        key: &mut [u8; 32],
        refreshed: &mut bool,
        config: &Config,
    ) -> Result<Charge, Bad> {
        let r = Charge::open(token, key);
        if r != Err(Bad::Signature) {
            return r;
        }
        if let Some(previous) = self.authorizer.previous_charge_key()
            && let Ok(c) = Charge::open(token, &previous)
        {
            return Ok(c);
        }
        let stale = self.authorizer.charge_key_age().is_none_or(|age| age > Duration::from_secs(5));
        if *refreshed || !stale {
            return r;
        }
        *refreshed = true;
        match self.authorizer.refresh_charge_key(config.store.timeout).await {
            Ok(k) if k != *key => {
                *key = k;
                Charge::open(token, key)
            }
            _ => r,
        }
    }

    /// The threshold marks for `charge`: the levels of the account's plan on
    /// the limits its quotas have now (an account that cannot be read gets none).
    async fn marks(&self, config: &Config, charge: &Charge, now: DateTime<Utc>) -> Vec<Mark> {
        if !config.events.levels_for_any() {
            return Vec::new();
        }
        let store = self.authorizer.store();
        let account = match self.authorizer.call_lazy(config.store.timeout, || store.account(&charge.account)).await {
            Ok(Some(a)) => a,
            _ => return Vec::new(),
        };
        let Some(plan) = config.policy.plans.get(&*account.plan) else { return Vec::new() };
        let quotas = account.quotas_for(plan, &charge.meter);
        let limits: Vec<Option<u64>> = charge
            .periods
            .iter()
            .map(|p| quotas.iter().find(|q| q.window == Window::Calendar(*p)).map(|q| q.limit))
            .collect();
        crate::events::marks(&config.events.source, charge, &limits, config.events.levels(&account.plan), now)
    }

    fn bad(&self, bad: Bad, code: u32, account: Option<&str>) {
        self.authorizer.metrics().record_bad_entry(bad);
        let first = self.warned.lock().unwrap_or_else(|e| e.into_inner()).insert(bad);
        // The account is named only once the signature proved tollgate wrote it.
        let account = account.unwrap_or("-");
        if first {
            tracing::warn!(reason = %bad, account, code, "access-log entry refused (further ones of this kind log at debug)");
        } else {
            tracing::debug!(reason = %bad, account, code, "access-log entry refused");
        }
    }
}
