//! The decision table of SPEC §4, as a pure function.
//!
//! [`evaluate`] walks the rows that need no counters; when a request must
//! spend, it returns a [`Spend`] for the store to carry out atomically, and
//! [`settle`] turns the store's [`SpendAnswer`] into the final [`Decision`].
//! No I/O, no clock reads: `now` is an argument. Depends only on
//! `entitlement` and `usage`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::entitlement::{Account, Few, Plan, Quota, Status};
use crate::usage::{Spend, SpendAnswer};

/// Why a request was denied: the `code` of a problem body and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// No credential on a non-public route (401).
    CredentialsMissing,
    /// Unknown or revoked API key, or an identity naming no known account (401).
    CredentialsInvalid,
    /// No route matched and `default: deny` (403); also Checks without HTTP attributes under `non_http: deny`.
    RouteNotAllowed,
    /// Blocked by an operator, not for billing (403).
    AccountBlocked,
    /// Subscription canceled, unpaid, expired or paused (402).
    SubscriptionInactive,
    /// Payment failed and the grace period is over (402).
    PaymentOverdue,
    /// The plan lacks the route's feature (402).
    FeatureNotInPlan,
    /// Prepaid credits below the route's cost (402).
    InsufficientCredits,
    /// A calendar allowance would be exceeded (402).
    QuotaExhausted,
    /// A rolling rate window would be exceeded (429).
    RateLimited,
    /// The store did not answer and `on_error: deny` (503).
    StoreUnavailable,
    /// The Check carried no usable request (400).
    RequestInvalid,
    /// The account names a plan the config does not define (500): an operator error.
    PlanUnknown,
    /// A `payable` route (x402) called without credentials or a settled payment (402).
    PaymentRequired,
    /// The x402 facilitator failed or was late and `x402.on_facilitator_error: unavailable` (503).
    PaymentUnavailable,
}

impl Code {
    /// Every code, in decision-table order (for docs and exhaustive tests).
    pub const ALL: [Code; 15] = [
        Code::CredentialsMissing,
        Code::CredentialsInvalid,
        Code::RouteNotAllowed,
        Code::AccountBlocked,
        Code::SubscriptionInactive,
        Code::PaymentOverdue,
        Code::FeatureNotInPlan,
        Code::InsufficientCredits,
        Code::QuotaExhausted,
        Code::RateLimited,
        Code::StoreUnavailable,
        Code::RequestInvalid,
        Code::PlanUnknown,
        Code::PaymentRequired,
        Code::PaymentUnavailable,
    ];

    /// The HTTP status the client sees.
    pub fn http_status(self) -> u16 {
        match self {
            Code::CredentialsMissing | Code::CredentialsInvalid => 401,
            Code::RouteNotAllowed | Code::AccountBlocked => 403,
            Code::SubscriptionInactive
            | Code::PaymentOverdue
            | Code::FeatureNotInPlan
            | Code::InsufficientCredits
            | Code::QuotaExhausted
            | Code::PaymentRequired => 402,
            Code::RateLimited => 429,
            Code::StoreUnavailable | Code::PaymentUnavailable => 503,
            Code::RequestInvalid => 400,
            Code::PlanUnknown => 500,
        }
    }

    /// The wire name (`quota_exhausted`).
    pub fn as_str(self) -> &'static str {
        match self {
            Code::CredentialsMissing => "credentials_missing",
            Code::CredentialsInvalid => "credentials_invalid",
            Code::RouteNotAllowed => "route_not_allowed",
            Code::AccountBlocked => "account_blocked",
            Code::SubscriptionInactive => "subscription_inactive",
            Code::PaymentOverdue => "payment_overdue",
            Code::FeatureNotInPlan => "feature_not_in_plan",
            Code::InsufficientCredits => "insufficient_credits",
            Code::QuotaExhausted => "quota_exhausted",
            Code::RateLimited => "rate_limited",
            Code::StoreUnavailable => "store_unavailable",
            Code::RequestInvalid => "request_invalid",
            Code::PlanUnknown => "plan_unknown",
            Code::PaymentRequired => "payment_required",
            Code::PaymentUnavailable => "payment_unavailable",
        }
    }

    /// Whether shadow mode lets a request with this code through: every
    /// billing denial does; a credential, blocked-account or route denial
    /// only when `security` (the operator's explicit `shadow_security: true`);
    /// a request that could not be read or a store fault never does.
    pub fn shadowable(self, security: bool) -> bool {
        match self {
            // An account-less caller on a payable route: as unidentified as a missing credential.
            Code::CredentialsMissing
            | Code::CredentialsInvalid
            | Code::AccountBlocked
            | Code::RouteNotAllowed
            | Code::PaymentRequired => security,
            Code::RequestInvalid | Code::StoreUnavailable | Code::PaymentUnavailable => false,
            Code::SubscriptionInactive
            | Code::PaymentOverdue
            | Code::FeatureNotInPlan
            | Code::InsufficientCredits
            | Code::QuotaExhausted
            | Code::RateLimited
            | Code::PlanUnknown => true,
        }
    }

    /// Parses a wire name (config `problems.overrides` keys).
    pub fn parse(s: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request was allowed: a metric label and the `decision` in dynamic metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AllowKind {
    /// A public route: no identity, no billing.
    Public,
    /// Every check passed.
    Allowed,
    /// Allowed while a failed payment is inside its grace period.
    Grace,
    /// The store failed and `on_error: allow` let the request through.
    FailOpen,
    /// Paid for through x402 (one settled payment, one call); nothing else spent.
    Paid,
}

impl AllowKind {
    /// The label (`allowed`, `public`, `grace`, `fail_open`, `paid`).
    pub fn as_str(self) -> &'static str {
        match self {
            AllowKind::Public => "public",
            AllowKind::Allowed => "allowed",
            AllowKind::Grace => "grace",
            AllowKind::FailOpen => "fail_open",
            AllowKind::Paid => "paid",
        }
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The request passes.
    Allow(AllowKind),
    /// The request is denied with this code.
    Deny(Code),
}

impl Verdict {
    /// The HTTP status the client sees for a deny; 200 for an allow.
    pub fn http_status(self) -> u16 {
        match self {
            Verdict::Allow(_) => 200,
            Verdict::Deny(code) => code.http_status(),
        }
    }

    /// The code or allow label.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Allow(kind) => kind.as_str(),
            Verdict::Deny(code) => code.as_str(),
        }
    }
}

/// A quota as the response reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaState {
    /// The quota.
    pub quota: Quota,
    /// Units used in the current window.
    pub used: u64,
    /// Units left (`limit - used`, never negative).
    pub remaining: u64,
    /// When the window is fully restored.
    pub resets_at: DateTime<Utc>,
    /// When a request of the same cost would first fit.
    pub retry_at: DateTime<Utc>,
    /// Units used past the limit of a soft quota (0 for a hard one).
    pub overage: u64,
}

impl QuotaState {
    /// The units of a request costing `cost` that were overage: what it
    /// spent past the limit (the window's overage, up to the cost).
    pub fn overage_of(&self, cost: u64) -> u64 {
        self.overage.min(cost)
    }
}

/// The outcome of one request, with what the response needs to explain it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allow or deny, and why.
    pub verdict: Verdict,
    /// The caller's account, once known (the account record's own string).
    pub account: Option<Arc<str>>,
    /// The account's plan, once known (the account record's own string).
    pub plan: Option<Arc<str>>,
    /// Every quota the request touched (for RateLimit headers and the body).
    pub quotas: Few<QuotaState>,
    /// Index into `quotas` of the quota that denied the request.
    pub denied_quota: Option<usize>,
    /// The feature the route needs (for `feature_not_in_plan`).
    pub feature: Option<String>,
    /// The subscription status (for `subscription_inactive`).
    pub status: Option<Status>,
    /// When the grace period ends (grace allow) or ended (`payment_overdue`).
    pub grace_until: Option<DateTime<Utc>>,
    /// Units (and credits) the request costs.
    pub cost: u64,
    /// Credits left on a prepaid plan.
    pub credits: Option<u64>,
    /// Decided under shadow mode (`shadow: true` of the route, the plan or the config).
    pub shadow: bool,
    /// Under shadow mode: the code that would have denied the request, which was allowed.
    pub shadowed: Option<Code>,
}

impl Decision {
    fn new(verdict: Verdict) -> Self {
        Self {
            verdict,
            account: None,
            plan: None,
            quotas: Few::new(),
            denied_quota: None,
            feature: None,
            status: None,
            grace_until: None,
            cost: 0,
            credits: None,
            shadow: false,
            shadowed: None,
        }
    }

    /// A deny with no account context (credentials, malformed requests, store faults).
    pub fn deny(code: Code) -> Self {
        Self::new(Verdict::Deny(code))
    }

    /// An allow with no account context (public routes, fail-open).
    pub fn allow(kind: AllowKind) -> Self {
        Self::new(Verdict::Allow(kind))
    }

    /// Whether the request passes.
    pub fn is_allowed(&self) -> bool {
        matches!(self.verdict, Verdict::Allow(_))
    }

    /// The quota that denied the request (or would have, under shadow), if a quota did.
    pub fn denying_quota(&self) -> Option<&QuotaState> {
        self.denied_quota.and_then(|i| self.quotas.get(i))
    }

    /// The soft quotas this allowed request went past the limit of.
    pub fn overages(&self) -> impl Iterator<Item = &QuotaState> {
        self.quotas.iter().filter(|q| self.is_allowed() && q.overage > 0)
    }

    /// Denies with `code`, or under shadow mode, when the code may be
    /// shadowed, notes it (the first one noted is the one reported) and keeps
    /// the allow; true when the request is denied.
    fn deny_or_note(&mut self, code: Code, security: bool) -> bool {
        if self.shadow && code.shadowable(security) {
            self.shadowed.get_or_insert(code);
            false
        } else {
            self.verdict = Verdict::Deny(code);
            true
        }
    }
}

/// What to do with requests no route matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unmatched {
    /// 403 `route_not_allowed`.
    #[default]
    Deny,
    /// Allowed for any account in good standing; nothing is metered.
    Allow,
}

/// Plans by name: every Check looks its plan up three times ([`crate::FastMap`]).
pub type Plans = crate::FastMap<String, Plan>;

/// The part of config the decision reads: plans and the rules around them.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Plans by name.
    pub plans: Plans,
    /// How long a past-due account keeps access.
    pub grace_period: Duration,
    /// What unmatched routes get.
    pub unmatched: Unmatched,
    /// Shadow mode for everything (top-level `shadow:`); plans and routes may say otherwise.
    pub shadow: bool,
    /// Whether shadow mode also lets credential, blocked-account and route
    /// denials through (`shadow_security: true`); by default they stay enforced.
    pub shadow_security: bool,
}

impl Policy {
    /// Whether shadow mode applies: the route's setting, else the plan's, else the config's.
    pub fn shadow_for(&self, route: Option<bool>, plan: Option<&Plan>) -> bool {
        route.or(plan.and_then(|p| p.shadow)).unwrap_or(self.shadow)
    }
}

/// What the request targets, once routing is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// A public route.
    Public,
    /// No route matched.
    Unmatched,
    /// A route (or an `Authorize` feature target) with its feature, meter and cost.
    Metered {
        /// Feature the plan must include.
        feature: Option<&'a str>,
        /// Meter whose quotas the request spends.
        meter: Option<&'a str>,
        /// Units spent.
        cost: u64,
        /// The route's `shadow:`, when it sets one.
        shadow: Option<bool>,
    },
}

/// Who is calling, once the store was asked about the credential.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    /// No credential was presented.
    Missing,
    /// A credential was presented but names no account.
    Invalid,
    /// The caller's account.
    Known(&'a Account),
}

/// After [`evaluate`]: either decided, or waiting for the counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Decided without counters.
    Done(Decision),
    /// The store must check-and-spend this; then call [`settle`] with the partial decision.
    Spend(Spend, Decision),
}

/// Walks the rows of SPEC §4 up to the ones that need counters. Under
/// shadow mode a row that would deny (and may be shadowed) is noted in
/// `shadowed` and the walk goes on, so the request spends what it uses.
pub fn evaluate(policy: &Policy, target: Target<'_>, caller: Caller<'_>, now: DateTime<Utc>, dry_run: bool) -> Step {
    if target == Target::Public {
        return Step::Done(Decision::allow(AllowKind::Public));
    }
    let route_shadow = match target {
        Target::Metered { shadow, .. } => shadow,
        Target::Public | Target::Unmatched => None,
    };
    let security = policy.shadow_security;
    let mut d = Decision::new(Verdict::Allow(AllowKind::Allowed));
    let account = match caller {
        Caller::Known(account) => account,
        Caller::Missing | Caller::Invalid => {
            d.shadow = policy.shadow_for(route_shadow, None);
            let code =
                if matches!(caller, Caller::Missing) { Code::CredentialsMissing } else { Code::CredentialsInvalid };
            d.deny_or_note(code, security);
            return Step::Done(d);
        }
    };
    d.account = Some(account.id.clone());
    d.plan = Some(account.plan.clone());
    let plan = policy.plans.get(&*account.plan);
    d.shadow = policy.shadow_for(route_shadow, plan);

    if target == Target::Unmatched
        && policy.unmatched == Unmatched::Deny
        && d.deny_or_note(Code::RouteNotAllowed, security)
    {
        return Step::Done(d);
    }
    if account.blocked && d.deny_or_note(Code::AccountBlocked, security) {
        return Step::Done(d);
    }
    let Some(plan) = plan else {
        // Nothing more can be walked without a plan.
        d.deny_or_note(Code::PlanUnknown, security);
        return Step::Done(d);
    };
    let expired = account.expires_at.is_some_and(|at| now >= at);
    if account.status.is_inactive() || expired {
        d.status = Some(if expired { Status::Expired } else { account.status });
        if d.deny_or_note(Code::SubscriptionInactive, security) {
            return Step::Done(d);
        }
    } else if account.status == Status::PastDue {
        // A past-due account without a date has no grace to count, and one
        // whose date cannot be added to (out of any sane range: stores and
        // the API refuse such dates) has none either: overdue now.
        let until = account
            .past_due_since
            // A payment cannot fail in the future: such a date counts from now.
            .map(|since| since.min(now))
            .and_then(|since| since.checked_add_signed(chrono::Duration::from_std(policy.grace_period).ok()?))
            .unwrap_or(now);
        d.grace_until = Some(until);
        if now < until {
            d.verdict = Verdict::Allow(AllowKind::Grace);
        } else if d.deny_or_note(Code::PaymentOverdue, security) {
            return Step::Done(d);
        }
    }

    let Target::Metered { feature, meter, cost, .. } = target else {
        // Unmatched under `default: allow`: standing checked, nothing metered.
        return Step::Done(d);
    };
    if let Some(feature) = feature
        && !account.has_feature(plan, feature)
    {
        d.feature = Some(feature.to_owned());
        if d.deny_or_note(Code::FeatureNotInPlan, security) {
            return Step::Done(d);
        }
    }
    let quotas = meter.map(|m| account.quotas_for(plan, m)).unwrap_or_default();
    let credits = plan.prepaid.then_some(cost);
    d.cost = cost;
    if quotas.is_empty() && credits.is_none() {
        return Step::Done(d);
    }
    let spend = Spend { account: account.id.clone(), quotas, cost, credits, now, dry_run, shadow: d.shadow };
    Step::Spend(spend, d)
}

/// The rows that need counters: credits, then period quotas, then rate quotas.
pub fn settle(spend: &Spend, answer: &SpendAnswer, mut d: Decision) -> Decision {
    d.quotas = spend
        .quotas
        .iter()
        .zip(&answer.quotas)
        .map(|(quota, usage)| QuotaState {
            quota: quota.clone(),
            used: usage.used,
            remaining: quota.limit.saturating_sub(usage.used),
            resets_at: usage.resets_at,
            retry_at: usage.retry_at,
            overage: quota.overage(usage.used),
        })
        .collect();
    d.credits = answer.credits.map(|c| c.balance);
    // Counters' rows are billing rows: shadow mode notes them whatever
    // `shadow_security` says.
    if answer.credits.is_some_and(|c| !c.sufficient) && d.deny_or_note(Code::InsufficientCredits, false) {
        return d;
    }
    let exceeded = |rate: bool| {
        answer
            .quotas
            .iter()
            .zip(&spend.quotas)
            .position(|(usage, quota)| usage.exceeded && quota.window.is_rate() == rate)
    };
    if let Some(i) = exceeded(false) {
        d.denied_quota = Some(i);
        d.deny_or_note(Code::QuotaExhausted, false);
    } else if let Some(i) = exceeded(true) {
        d.denied_quota = Some(i);
        d.deny_or_note(Code::RateLimited, false);
    } else if !answer.spent && !spend.dry_run {
        // A store that spent nothing must say why; one that did not broke
        // its contract, and nothing was paid: never an allow. (A dry run
        // spends nothing by design.)
        d.verdict = Verdict::Deny(Code::StoreUnavailable);
    }
    d
}

#[cfg(test)]
mod tests;
