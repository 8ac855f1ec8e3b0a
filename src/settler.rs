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

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;

use crate::authorizer::Authorizer;
use crate::entitlement::Window;
use crate::settlement::{self, Bad, Charge, Served};
use crate::usage::{Mark, Settled};

/// Store attempts per adjustment, and the pause before the first retry (quadrupled after).
const ATTEMPTS: u32 = 3;
const FIRST_RETRY: Duration = Duration::from_millis(100);

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

    /// Settles the charge of one entry: `charge` is its metadata string,
    /// `code` the response status (0 for none), `header` looks up a logged
    /// response header by lower-case name.
    pub async fn settle<'a>(&self, charge: &str, code: u32, header: impl Fn(&str) -> Option<&'a str>) {
        let metrics = self.authorizer.metrics();
        let config = self.authorizer.config();
        let timeout = config.store.timeout;
        let key = match self.authorizer.charge_key(timeout).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "cannot settle: no key to verify charges with");
                metrics.record_settlement("failed");
                return;
            }
        };
        let charge = match Charge::open(charge, &key) {
            Ok(c) => c,
            Err(bad) => return self.bad(bad, code, None),
        };
        let served = Served { code, cost_header: charge.cost_header.as_deref().and_then(header) };
        let now = Utc::now();
        let mut adjustment = match settlement::settle(&charge, served, config.billing.charge_on, now) {
            Ok(a) => a,
            Err(bad) => return self.bad(bad, code, Some(&charge.account)),
        };
        if config.events.enabled() {
            let events = &config.events;
            // Both within 0..=MAX_COST: the final cost is the reservation moved by the delta.
            let units = charge.cost.saturating_add_signed(adjustment.delta);
            adjustment.events.push(crate::events::usage(&events.source, &charge, code, units));
            adjustment.marks = self.marks(&config, &charge, now).await;
            adjustment.outbox_limit = events.outbox_limit;
        }
        let mut pause = FIRST_RETRY;
        for attempt in 1..=ATTEMPTS {
            let store = self.authorizer.store();
            match self.authorizer.call(timeout, store.settle(&adjustment)).await {
                Ok(Settled::Applied { unpaid, queued, dropped }) => {
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
                    return;
                }
                Ok(Settled::Duplicate) => return metrics.record_settlement("duplicate"),
                Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                }
                Err(e) => {
                    tracing::warn!(account = %adjustment.account, error = %e, "settlement failed; the reservation stands");
                    return metrics.record_settlement("failed");
                }
            }
        }
    }

    /// The threshold marks for `charge`: the levels of the account's plan on
    /// the limits its quotas have now (an account that cannot be read gets none).
    async fn marks(&self, config: &crate::config::Config, charge: &Charge, now: chrono::DateTime<Utc>) -> Vec<Mark> {
        if !config.events.levels_for_any() {
            return Vec::new();
        }
        let store = self.authorizer.store();
        let account = match self.authorizer.call(config.store.timeout, store.account(&charge.account)).await {
            Ok(Some(a)) => a,
            _ => return Vec::new(),
        };
        let Some(plan) = config.policy.plans.get(&account.plan) else { return Vec::new() };
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
