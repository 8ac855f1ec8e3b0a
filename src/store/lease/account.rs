//! One account's leases as this replica holds them, and the steps of a spend
//! that need no Redis: paying from held units, refusing on a "known
//! exhausted" mark, and the answer. No I/O and no clock reads (the instant
//! is an argument), so it is unit-tested without Redis.
//!
//! May use: `store::redis` (lease targets), `usage`.

use std::collections::HashMap;
use std::time::Instant;

use chrono::{DateTime, Utc};

use crate::entitlement::Few;
use crate::store::redis::LeaseTarget;
use crate::usage::{CreditBalance, QuotaUsage, SpendAnswer};

/// A lease on one counter or balance, as this replica holds it.
#[derive(Debug, Clone)]
pub(super) struct Lease {
    /// Where the units came from (and go back to).
    pub(super) target: LeaseTarget,
    /// Units leased to this replica and not yet spent.
    pub(super) units: u64,
    /// The counter (spent + leased, all replicas) or the free balance at the last script call.
    pub(super) counter: u64,
    /// Refuse locally until then (set when a take found too little free)
    /// any request that needs more than `units + free`.
    pub(super) exhausted_until: Option<Instant>,
    /// The free units the refused take saw.
    pub(super) free: u64,
    /// Take again (renewing the record) at the next spend after this.
    pub(super) renew_at: Instant,
    /// After a failed take: no top-up before this.
    pub(super) backoff_until: Option<Instant>,
    /// The units may not be spent after this without a take.
    pub(super) valid_until: Instant,
}

impl Lease {
    /// A lease of nothing yet, as a first take finds it.
    pub(super) fn empty(target: LeaseTarget, at: Instant) -> Self {
        Self {
            target,
            units: 0,
            counter: 0,
            exhausted_until: None,
            free: 0,
            renew_at: at,
            backoff_until: None,
            valid_until: at,
        }
    }

    /// The window's end: after it, a quota's lease is worthless.
    pub(super) fn ends(&self) -> Option<DateTime<Utc>> {
        match self.target {
            LeaseTarget::Counter { expires, .. } => Some(expires - chrono::Duration::minutes(1)),
            LeaseTarget::Credits { .. } => None,
        }
    }

    /// What is free beside this lease, as the last call saw it.
    pub(super) fn free_seen(&self) -> u64 {
        match self.target {
            LeaseTarget::Counter { limit, .. } => limit.saturating_sub(self.counter),
            LeaseTarget::Credits { .. } => self.counter,
        }
    }

    /// The units this replica may spend at `now` without asking.
    pub(super) fn usable(&self, now: Instant) -> u64 {
        if now < self.valid_until { self.units } else { 0 }
    }

    /// Below `low_water` units while Redis had some free at the last call
    /// (and no take failed lately): worth taking the next block before this
    /// one runs out.
    pub(super) fn running_low(&self, low_water: u64, now: Instant) -> bool {
        self.units < low_water
            && self.free_seen() > 0
            && self.exhausted_until.is_none()
            && self.backoff_until.is_none_or(|t| now >= t)
    }

    /// Known to be too short for `need` at `now`: a take was refused lately.
    fn known_short(&self, need: u64, now: Instant) -> bool {
        self.exhausted_until.is_some_and(|until| now < until) && self.units.saturating_add(self.free) < need
    }

    /// A take was refused: refuse locally what needs more than is left until `until`.
    pub(super) fn mark_exhausted(&mut self, until: Instant) {
        self.exhausted_until = Some(until);
        self.free = self.free_seen();
    }
}

/// One lease a spend needs: where from, and how many units.
#[derive(Debug, Clone)]
pub(super) struct Want {
    pub(super) target: LeaseTarget,
    pub(super) need: u64,
}

/// What a spend can do without Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Local {
    /// Every lease it needs holds enough valid units; `renew` when one is
    /// due for renewal (done in the background: paying does not wait).
    Pay {
        /// A lease is past `renew_at`.
        renew: bool,
    },
    /// A lease it needs is known too short: refuse.
    Refuse,
    /// Redis must be asked (a take or a renewal).
    Ask,
}

/// One account's leases.
#[derive(Debug, Default)]
pub(super) struct AccountLeases {
    /// Counter or balance key → lease.
    pub(super) leases: HashMap<String, Lease>,
    /// The last allowed spend, for the idle give-back.
    pub(super) last_used: Option<Instant>,
}

impl AccountLeases {
    /// What a spend of `wants` can do at `now` without Redis.
    pub(super) fn local(&self, wants: &[Want], now: Instant) -> Local {
        let lease = |w: &Want| self.leases.get(w.target.key()).filter(|l| l.target == w.target);
        if wants.iter().any(|w| lease(w).is_some_and(|l| l.known_short(w.need, now))) {
            return Local::Refuse;
        }
        if !wants.iter().all(|w| lease(w).is_some_and(|l| l.usable(now) >= w.need)) {
            return Local::Ask;
        }
        Local::Pay { renew: wants.iter().any(|w| lease(w).is_some_and(|l| now >= l.renew_at)) }
    }

    /// Pays every want (the caller saw [`Local::Pay`] under the same lock);
    /// the units spent.
    pub(super) fn pay(&mut self, wants: &[Want], now: Instant) -> u64 {
        let mut spent = 0;
        for w in wants {
            if let Some(l) = self.leases.get_mut(w.target.key()) {
                let n = w.need.min(l.units);
                l.units -= n;
                spent += n;
            }
        }
        self.last_used = Some(now);
        spent
    }

    /// Whether a lease of `wants` is [running low](Lease::running_low).
    pub(super) fn running_low(&self, wants: &[Want], low_water: u64, now: Instant) -> bool {
        wants.iter().any(|w| self.leases.get(w.target.key()).is_some_and(|l| l.running_low(low_water, now)))
    }

    /// Takes `want.need` valid units of its lease aside for a spend in
    /// progress; false (nothing taken) when the lease cannot pay at `now`.
    pub(super) fn reserve(&mut self, want: &Want, now: Instant) -> bool {
        match self.leases.get_mut(want.target.key()) {
            Some(l) if l.target == want.target && l.usable(now) >= want.need => {
                l.units -= want.need;
                true
            }
            _ => false,
        }
    }

    /// Puts back what [`Self::reserve`] took aside (the spend was refused).
    pub(super) fn refund(&mut self, want: &Want) {
        if let Some(l) = self.leases.get_mut(want.target.key()) {
            l.units = l.units.saturating_add(want.need);
        }
    }

    /// Takes out the leases of windows ended at `today` (forfeit: their counters expire).
    pub(super) fn take_ended(&mut self, today: DateTime<Utc>) -> Vec<Lease> {
        let ended: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, l)| l.ends().is_some_and(|end| end <= today))
            .map(|(k, _)| k.clone())
            .collect();
        ended.into_iter().filter_map(|k| self.leases.remove(&k)).collect()
    }

    /// Takes out the leases of `wants`' keys taken under another target (another limit).
    pub(super) fn take_stale(&mut self, wants: &[Want]) -> HashMap<String, Lease> {
        let mut stale = HashMap::new();
        for w in wants {
            let key = w.target.key();
            if self.leases.get(key).is_some_and(|l| l.target != w.target)
                && let Some(l) = self.leases.remove(key)
            {
                stale.insert(key.to_owned(), l);
            }
        }
        stale
    }

    /// The store's answer for `wants` (quotas first, then credits, as
    /// [`crate::usage::Spend`] lists them), `spent` or refused. A refusal
    /// always names a reason: a quota exceeded or credits short.
    pub(super) fn answer(&self, wants: &[Want], spent: bool, now: Instant) -> SpendAnswer {
        let mut quotas = Few::with_capacity(wants.len());
        let mut credits = None;
        // Refused: its take found too little lately; otherwise (not asked,
        // because another lease was refused first) not known to be short.
        let mut short: Vec<bool> = wants
            .iter()
            .map(|w| {
                !spent
                    && self
                        .leases
                        .get(w.target.key())
                        .is_some_and(|l| l.exhausted_until.is_some() && l.usable(now) < w.need)
            })
            .collect();
        if !spent && !short.contains(&true) {
            // Never "not spent" without a reason: the first lease that cannot pay.
            let first =
                wants.iter().position(|w| self.leases.get(w.target.key()).is_none_or(|l| l.usable(now) < w.need));
            if let Some(s) = short.get_mut(first.unwrap_or(0)) {
                *s = true;
            }
        }
        for (w, short) in wants.iter().zip(short) {
            let lease = self.leases.get(w.target.key());
            match &w.target {
                LeaseTarget::Counter { limit, expires, .. } => {
                    let used = match lease {
                        Some(l) if spent => limit - l.units.min(*limit),
                        Some(l) => l.counter.max(limit.saturating_sub(l.units)).min(*limit),
                        None => *limit,
                    };
                    let end = *expires - chrono::Duration::minutes(1);
                    quotas.push(QuotaUsage { used, exceeded: short, resets_at: end, retry_at: end });
                }
                LeaseTarget::Credits { .. } => {
                    let balance = lease.map_or(0, |l| l.units.saturating_add(l.free_seen()));
                    credits = Some(CreditBalance { balance, sufficient: !short });
                }
            }
        }
        SpendAnswer { spent, quotas, credits }
    }
}

#[cfg(test)]
mod tests;
