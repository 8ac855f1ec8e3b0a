//! The decision table of SPEC §4, as a pure function.
//!
//! [`evaluate`] walks the rows that need no counters; when a request must
//! spend, it returns a [`Spend`] for the store to carry out atomically, and
//! [`settle`] turns the store's [`SpendAnswer`] into the final [`Decision`].
//! No I/O, no clock reads: `now` is an argument. Depends only on
//! `entitlement` and `usage`.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::entitlement::{Account, Plan, Quota, Status};
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
}

impl Code {
    /// Every code, in decision-table order (for docs and exhaustive tests).
    pub const ALL: [Code; 13] = [
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
            | Code::QuotaExhausted => 402,
            Code::RateLimited => 429,
            Code::StoreUnavailable => 503,
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
}

impl AllowKind {
    /// The label (`allowed`, `public`, `grace`, `fail_open`).
    pub fn as_str(self) -> &'static str {
        match self {
            AllowKind::Public => "public",
            AllowKind::Allowed => "allowed",
            AllowKind::Grace => "grace",
            AllowKind::FailOpen => "fail_open",
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
}

/// The outcome of one request, with what the response needs to explain it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allow or deny, and why.
    pub verdict: Verdict,
    /// The caller's account, once known.
    pub account: Option<String>,
    /// The account's plan, once known.
    pub plan: Option<String>,
    /// Every quota the request touched (for RateLimit headers and the body).
    pub quotas: Vec<QuotaState>,
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
}

impl Decision {
    fn new(verdict: Verdict) -> Self {
        Self {
            verdict,
            account: None,
            plan: None,
            quotas: Vec::new(),
            denied_quota: None,
            feature: None,
            status: None,
            grace_until: None,
            cost: 0,
            credits: None,
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

    /// The quota that denied the request, if a quota did.
    pub fn denying_quota(&self) -> Option<&QuotaState> {
        self.denied_quota.and_then(|i| self.quotas.get(i))
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

/// The part of config the decision reads: plans and the rules around them.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Plans by name.
    pub plans: HashMap<String, Plan>,
    /// How long a past-due account keeps access.
    pub grace_period: Duration,
    /// What unmatched routes get.
    pub unmatched: Unmatched,
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

/// Walks the rows of SPEC §4 up to the ones that need counters.
pub fn evaluate(policy: &Policy, target: Target<'_>, caller: Caller<'_>, now: DateTime<Utc>, dry_run: bool) -> Step {
    if target == Target::Public {
        return Step::Done(Decision::allow(AllowKind::Public));
    }
    let account = match caller {
        Caller::Missing => return Step::Done(Decision::deny(Code::CredentialsMissing)),
        Caller::Invalid => return Step::Done(Decision::deny(Code::CredentialsInvalid)),
        Caller::Known(account) => account,
    };
    let mut d = Decision::new(Verdict::Allow(AllowKind::Allowed));
    d.account = Some(account.id.clone());
    d.plan = Some(account.plan.clone());
    let deny = |mut d: Decision, code| {
        d.verdict = Verdict::Deny(code);
        Step::Done(d)
    };

    if target == Target::Unmatched && policy.unmatched == Unmatched::Deny {
        return deny(d, Code::RouteNotAllowed);
    }
    if account.blocked {
        return deny(d, Code::AccountBlocked);
    }
    let Some(plan) = policy.plans.get(&account.plan) else {
        return deny(d, Code::PlanUnknown);
    };
    let expired = account.expires_at.is_some_and(|at| now >= at);
    if account.status.is_inactive() || expired {
        d.status = Some(if expired { Status::Expired } else { account.status });
        return deny(d, Code::SubscriptionInactive);
    }
    if account.status == Status::PastDue {
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
        if now >= until {
            return deny(d, Code::PaymentOverdue);
        }
        d.verdict = Verdict::Allow(AllowKind::Grace);
    }

    let Target::Metered { feature, meter, cost } = target else {
        // Unmatched under `default: allow`: standing checked, nothing metered.
        return Step::Done(d);
    };
    if let Some(feature) = feature
        && !account.has_feature(plan, feature)
    {
        d.feature = Some(feature.to_owned());
        return deny(d, Code::FeatureNotInPlan);
    }
    let quotas = meter.map(|m| account.quotas_for(plan, m)).unwrap_or_default();
    let credits = plan.prepaid.then_some(cost);
    d.cost = cost;
    if quotas.is_empty() && credits.is_none() {
        return Step::Done(d);
    }
    let spend = Spend { account: account.id.clone(), quotas, cost, credits, now, dry_run };
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
        })
        .collect();
    d.credits = answer.credits.map(|c| c.balance);
    if answer.credits.is_some_and(|c| !c.sufficient) {
        d.verdict = Verdict::Deny(Code::InsufficientCredits);
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
        d.verdict = Verdict::Deny(Code::QuotaExhausted);
        d.denied_quota = Some(i);
    } else if let Some(i) = exceeded(true) {
        d.verdict = Verdict::Deny(Code::RateLimited);
        d.denied_quota = Some(i);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entitlement::{Period, Window};
    use crate::usage::{CreditBalance, QuotaUsage};

    fn now() -> DateTime<Utc> {
        "2026-11-22T12:00:00Z".parse().unwrap()
    }

    fn month(limit: u64) -> Quota {
        Quota { meter: "requests".into(), limit, window: Window::Calendar(Period::Month) }
    }

    fn per_second(limit: u64) -> Quota {
        Quota { meter: "requests".into(), limit, window: Window::Rolling(Duration::from_secs(1)) }
    }

    fn policy() -> Policy {
        let plan = |name: &str, features: &[&str], quotas: Vec<Quota>, prepaid| Plan {
            name: name.into(),
            features: features.iter().map(|f| f.to_string()).collect(),
            quotas,
            prepaid,
        };
        Policy {
            plans: [
                plan("free", &["search"], vec![month(1000), per_second(10)], false),
                plan("pro", &["search", "ai"], vec![month(1_000_000)], false),
                plan("payg", &["search", "ai"], vec![], true),
                plan("flat", &["search"], vec![], false),
            ]
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect(),
            grace_period: Duration::from_secs(72 * 3600),
            unmatched: Unmatched::Deny,
        }
    }

    fn account(plan: &str) -> Account {
        Account { id: format!("acct_{plan}"), plan: plan.into(), ..Account::default() }
    }

    const SEARCH: Target<'static> = Target::Metered { feature: Some("search"), meter: Some("requests"), cost: 1 };
    const AI: Target<'static> = Target::Metered { feature: Some("ai"), meter: Some("requests"), cost: 10 };

    fn eval(target: Target<'_>, caller: Caller<'_>) -> Step {
        evaluate(&policy(), target, caller, now(), false)
    }

    fn done(step: Step) -> Decision {
        match step {
            Step::Done(d) => d,
            Step::Spend(s, _) => panic!("expected a decision, got a spend {s:?}"),
        }
    }

    fn code(step: Step) -> Option<Code> {
        match done(step).verdict {
            Verdict::Deny(c) => Some(c),
            Verdict::Allow(_) => None,
        }
    }

    fn usage(used: u64, exceeded: bool) -> QuotaUsage {
        QuotaUsage { used, exceeded, resets_at: now(), retry_at: now() }
    }

    /// Runs evaluate and, if it asks, settles with the given counters' answer.
    fn decide(target: Target<'_>, a: &Account, answer: impl FnOnce(&Spend) -> SpendAnswer) -> Decision {
        match eval(target, Caller::Known(a)) {
            Step::Done(d) => d,
            Step::Spend(spend, d) => settle(&spend, &answer(&spend), d),
        }
    }

    fn all_fit(spend: &Spend) -> SpendAnswer {
        SpendAnswer {
            spent: true,
            quotas: spend.quotas.iter().map(|_| usage(1, false)).collect(),
            credits: spend.credits.map(|_| CreditBalance { balance: 100, sufficient: true }),
        }
    }

    // One test per row of SPEC §4, in table order.

    #[test]
    fn row01_public_route_allows_without_credentials() {
        let d = done(eval(Target::Public, Caller::Missing));
        assert_eq!(d.verdict, Verdict::Allow(AllowKind::Public));
        assert_eq!(d.account, None);
    }

    #[test]
    fn row02_missing_credentials_are_401() {
        assert_eq!(code(eval(SEARCH, Caller::Missing)), Some(Code::CredentialsMissing));
        assert_eq!(Code::CredentialsMissing.http_status(), 401);
    }

    #[test]
    fn row03_invalid_credentials_are_401() {
        assert_eq!(code(eval(SEARCH, Caller::Invalid)), Some(Code::CredentialsInvalid));
        assert_eq!(Code::CredentialsInvalid.http_status(), 401);
    }

    #[test]
    fn row04_unmatched_route_is_403_under_default_deny() {
        let a = account("free");
        let d = done(eval(Target::Unmatched, Caller::Known(&a)));
        assert_eq!(d.verdict, Verdict::Deny(Code::RouteNotAllowed));
        assert_eq!(d.verdict.http_status(), 403);
        assert_eq!(d.account.as_deref(), Some("acct_free"));
    }

    #[test]
    fn row04_unmatched_route_under_default_allow_checks_standing_but_meters_nothing() {
        let mut p = policy();
        p.unmatched = Unmatched::Allow;
        let a = account("free");
        assert_eq!(
            done(evaluate(&p, Target::Unmatched, Caller::Known(&a), now(), false)).verdict,
            Verdict::Allow(AllowKind::Allowed)
        );
        let blocked = Account { blocked: true, ..account("free") };
        assert_eq!(
            code(evaluate(&p, Target::Unmatched, Caller::Known(&blocked), now(), false)),
            Some(Code::AccountBlocked)
        );
    }

    #[test]
    fn row05_blocked_account_is_403() {
        let a = Account { blocked: true, ..account("pro") };
        assert_eq!(code(eval(SEARCH, Caller::Known(&a))), Some(Code::AccountBlocked));
        assert_eq!(Code::AccountBlocked.http_status(), 403);
    }

    #[test]
    fn row06_inactive_subscriptions_are_402() {
        for status in [Status::Canceled, Status::Unpaid, Status::Expired, Status::Paused] {
            let a = Account { status, ..account("pro") };
            let d = done(eval(SEARCH, Caller::Known(&a)));
            assert_eq!(d.verdict, Verdict::Deny(Code::SubscriptionInactive), "{status}");
            assert_eq!(d.status, Some(status));
            assert_eq!(d.verdict.http_status(), 402);
        }
    }

    #[test]
    fn row06_a_passed_expiry_date_is_inactive_whatever_the_status() {
        let a = Account { expires_at: Some(now()), ..account("pro") };
        let d = done(eval(SEARCH, Caller::Known(&a)));
        assert_eq!(d.verdict, Verdict::Deny(Code::SubscriptionInactive));
        assert_eq!(d.status, Some(Status::Expired));
        let later = Account { expires_at: Some(now() + chrono::Duration::seconds(1)), ..account("flat") };
        assert!(done(eval(SEARCH, Caller::Known(&later))).is_allowed());
    }

    #[test]
    fn row07_past_due_inside_grace_is_allowed_with_grace_marker() {
        let since = now() - chrono::Duration::hours(71);
        let a = Account { status: Status::PastDue, past_due_since: Some(since), ..account("pro") };
        let d = decide(SEARCH, &a, all_fit);
        assert_eq!(d.verdict, Verdict::Allow(AllowKind::Grace));
        assert_eq!(d.grace_until, Some(since + chrono::Duration::hours(72)));
    }

    #[test]
    fn row08_past_due_after_grace_is_402_payment_overdue() {
        let since = now() - chrono::Duration::hours(72);
        let a = Account { status: Status::PastDue, past_due_since: Some(since), ..account("pro") };
        let d = done(eval(SEARCH, Caller::Known(&a)));
        assert_eq!(d.verdict, Verdict::Deny(Code::PaymentOverdue));
        assert_eq!(d.grace_until, Some(now()), "the grace period ends exactly 72h after");
        let undated = Account { status: Status::PastDue, ..account("pro") };
        assert_eq!(code(eval(SEARCH, Caller::Known(&undated))), Some(Code::PaymentOverdue));
    }

    #[test]
    fn row09_missing_feature_is_402() {
        let a = account("free");
        let d = done(eval(AI, Caller::Known(&a)));
        assert_eq!(d.verdict, Verdict::Deny(Code::FeatureNotInPlan));
        assert_eq!(d.feature.as_deref(), Some("ai"));
        let extra = Account { extra_features: ["ai".to_string()].into(), ..account("flat") };
        assert!(done(eval(AI, Caller::Known(&extra))).is_allowed(), "account extras count");
    }

    #[test]
    fn row10_insufficient_credits_is_402() {
        let a = account("payg");
        let d = decide(AI, &a, |spend| {
            assert_eq!(spend.credits, Some(10), "prepaid spends the route's cost in credits");
            SpendAnswer { spent: false, quotas: vec![], credits: Some(CreditBalance { balance: 9, sufficient: false }) }
        });
        assert_eq!(d.verdict, Verdict::Deny(Code::InsufficientCredits));
        assert_eq!(d.credits, Some(9));
        assert_eq!(d.cost, 10);
    }

    #[test]
    fn row11_period_quota_exceeded_is_402() {
        let a = account("free");
        let d = decide(SEARCH, &a, |spend| SpendAnswer {
            spent: false,
            quotas: vec![usage(1000, true), usage(3, false)],
            credits: spend.credits.map(|_| unreachable!()),
        });
        assert_eq!(d.verdict, Verdict::Deny(Code::QuotaExhausted));
        let q = d.denying_quota().unwrap();
        assert_eq!((q.quota.limit, q.used, q.remaining), (1000, 1000, 0));
    }

    #[test]
    fn row12_rate_quota_exceeded_is_429() {
        let a = account("free");
        let d = decide(SEARCH, &a, |_| SpendAnswer {
            spent: false,
            quotas: vec![usage(5, false), usage(10, true)],
            credits: None,
        });
        assert_eq!(d.verdict, Verdict::Deny(Code::RateLimited));
        assert_eq!(d.verdict.http_status(), 429);
        assert_eq!(d.denying_quota().unwrap().quota, per_second(10));
    }

    #[test]
    fn row13_store_unavailable_is_503() {
        assert_eq!(Decision::deny(Code::StoreUnavailable).verdict.http_status(), 503);
    }

    #[test]
    fn row14_otherwise_allowed_with_quota_state() {
        let a = account("free");
        let d = decide(SEARCH, &a, all_fit);
        assert_eq!(d.verdict, Verdict::Allow(AllowKind::Allowed));
        assert_eq!(d.quotas.len(), 2);
        assert_eq!(d.quotas[0].remaining, 999);
        assert_eq!(d.plan.as_deref(), Some("free"));
    }

    // Precedence: when several rows apply, the earlier wins.

    #[test]
    fn public_wins_over_everything() {
        let a = Account { blocked: true, status: Status::Canceled, ..account("free") };
        assert!(done(eval(Target::Public, Caller::Known(&a))).is_allowed());
        assert!(done(eval(Target::Public, Caller::Invalid)).is_allowed());
    }

    #[test]
    fn credentials_are_checked_before_the_route_is() {
        assert_eq!(code(eval(Target::Unmatched, Caller::Missing)), Some(Code::CredentialsMissing));
        assert_eq!(code(eval(Target::Unmatched, Caller::Invalid)), Some(Code::CredentialsInvalid));
    }

    #[test]
    fn unmatched_route_wins_over_blocked() {
        let a = Account { blocked: true, ..account("free") };
        assert_eq!(code(eval(Target::Unmatched, Caller::Known(&a))), Some(Code::RouteNotAllowed));
    }

    #[test]
    fn blocked_wins_over_billing() {
        let a = Account { blocked: true, status: Status::Canceled, ..account("free") };
        assert_eq!(code(eval(AI, Caller::Known(&a))), Some(Code::AccountBlocked));
    }

    #[test]
    fn canceled_wins_over_missing_feature_and_quota() {
        let a = Account { status: Status::Canceled, ..account("free") };
        assert_eq!(code(eval(AI, Caller::Known(&a))), Some(Code::SubscriptionInactive));
        assert_eq!(
            code(eval(SEARCH, Caller::Known(&a))),
            Some(Code::SubscriptionInactive),
            "no spend is even attempted"
        );
    }

    #[test]
    fn overdue_wins_over_missing_feature() {
        let a = Account {
            status: Status::PastDue,
            past_due_since: Some(now() - chrono::Duration::days(30)),
            ..account("free")
        };
        assert_eq!(code(eval(AI, Caller::Known(&a))), Some(Code::PaymentOverdue));
    }

    #[test]
    fn grace_still_checks_features_and_quotas() {
        let a = Account { status: Status::PastDue, past_due_since: Some(now()), ..account("free") };
        assert_eq!(code(eval(AI, Caller::Known(&a))), Some(Code::FeatureNotInPlan));
        let d = decide(SEARCH, &a, |_| SpendAnswer {
            spent: false,
            quotas: vec![usage(1000, true), usage(0, false)],
            credits: None,
        });
        assert_eq!(d.verdict, Verdict::Deny(Code::QuotaExhausted));
    }

    #[test]
    fn credits_win_over_quotas_and_quotas_over_rates() {
        let payg_with_quotas = Policy {
            plans: [(
                "payg".to_string(),
                Plan {
                    name: "payg".into(),
                    features: ["search".to_string()].into(),
                    quotas: vec![per_second(1), month(5)],
                    prepaid: true,
                },
            )]
            .into(),
            ..policy()
        };
        let a = account("payg");
        let Step::Spend(spend, d) = evaluate(&payg_with_quotas, SEARCH, Caller::Known(&a), now(), false) else {
            panic!()
        };
        let everything_fails = SpendAnswer {
            spent: false,
            quotas: vec![usage(1, true), usage(5, true)],
            credits: Some(CreditBalance { balance: 0, sufficient: false }),
        };
        assert_eq!(settle(&spend, &everything_fails, d.clone()).verdict, Verdict::Deny(Code::InsufficientCredits));
        let quotas_fail =
            SpendAnswer { credits: Some(CreditBalance { balance: 5, sufficient: true }), ..everything_fails };
        let s = settle(&spend, &quotas_fail, d);
        assert_eq!(
            s.verdict,
            Verdict::Deny(Code::QuotaExhausted),
            "the period quota is reported though it comes second"
        );
        assert_eq!(s.denied_quota, Some(1));
    }

    #[test]
    fn spend_covers_every_quota_of_the_meter_and_nothing_else() {
        let a = Account { quota_overrides: vec![month(5)], ..account("free") };
        let Step::Spend(spend, _) = eval(SEARCH, Caller::Known(&a)) else { panic!() };
        assert_eq!(spend.quotas, vec![month(5), per_second(10)], "the override keeps the plan quota's place");
        assert_eq!((spend.cost, spend.credits, spend.now, spend.dry_run), (1, None, now(), false));
        let other = Target::Metered { feature: None, meter: Some("tokens"), cost: 1 };
        assert!(done(eval(other, Caller::Known(&a))).is_allowed(), "no quota on that meter: nothing to spend");
    }

    #[test]
    fn an_identical_override_names_the_same_denied_quota() {
        let both_exhausted =
            |_: &Spend| SpendAnswer { spent: false, quotas: vec![usage(1000, true), usage(10, true)], credits: None };
        let plain = decide(SEARCH, &account("free"), both_exhausted);
        let same = Account { quota_overrides: vec![month(1000)], ..account("free") };
        let overridden = decide(SEARCH, &same, both_exhausted);
        assert_eq!(plain.denied_quota, overridden.denied_quota);
        assert_eq!(plain.verdict, overridden.verdict);
    }

    #[test]
    fn dry_run_is_passed_to_the_store() {
        let a = account("free");
        let Step::Spend(spend, _) = evaluate(&policy(), SEARCH, Caller::Known(&a), now(), true) else { panic!() };
        assert!(spend.dry_run);
    }

    #[test]
    fn unknown_plan_is_an_operator_error() {
        let a = account("gold");
        assert_eq!(code(eval(SEARCH, Caller::Known(&a))), Some(Code::PlanUnknown));
    }

    #[test]
    fn codes_round_trip_and_map_to_statuses() {
        for c in Code::ALL {
            assert_eq!(Code::parse(c.as_str()), Some(c));
            assert!(matches!(c.http_status(), 400..=599));
        }
        assert_eq!(Code::parse("nope"), None);
    }
}
