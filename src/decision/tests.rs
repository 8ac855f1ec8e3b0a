use super::*;
use crate::entitlement::{Period, Window};
use crate::usage::{CreditBalance, QuotaUsage};

fn now() -> DateTime<Utc> {
    "2026-11-22T12:00:00Z".parse().unwrap()
}

fn month(limit: u64) -> Quota {
    Quota { meter: "requests".into(), limit, window: Window::Calendar(Period::Month), ceiling: None }
}

fn per_second(limit: u64) -> Quota {
    Quota { meter: "requests".into(), limit, window: Window::Rolling(Duration::from_secs(1)), ceiling: None }
}

fn policy() -> Policy {
    let plan = |name: &str, features: &[&str], quotas: Vec<Quota>, prepaid| Plan {
        name: name.into(),
        features: features.iter().map(|f| f.to_string()).collect(),
        quotas,
        prepaid,
        shadow: None,
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
        shadow: false,
        shadow_security: false,
    }
}

fn account(plan: &str) -> Account {
    Account { id: format!("acct_{plan}").into(), plan: plan.into(), ..Account::default() }
}

const SEARCH: Target<'static> =
    Target::Metered { feature: Some("search"), meter: Some("requests"), cost: 1, shadow: None };
const AI: Target<'static> = Target::Metered { feature: Some("ai"), meter: Some("requests"), cost: 10, shadow: None };

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
        SpendAnswer {
            spent: false,
            quotas: Default::default(),
            credits: Some(CreditBalance { balance: 9, sufficient: false }),
        }
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
        quotas: smallvec::smallvec![usage(1000, true), usage(3, false)],
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
        quotas: smallvec::smallvec![usage(5, false), usage(10, true)],
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
    assert_eq!(code(eval(SEARCH, Caller::Known(&a))), Some(Code::SubscriptionInactive), "no spend is even attempted");
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
        quotas: smallvec::smallvec![usage(1000, true), usage(0, false)],
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
                shadow: None,
            },
        )]
        .into_iter()
        .collect(),
        ..policy()
    };
    let a = account("payg");
    let Step::Spend(spend, d) = evaluate(&payg_with_quotas, SEARCH, Caller::Known(&a), now(), false) else { panic!() };
    let everything_fails = SpendAnswer {
        spent: false,
        quotas: smallvec::smallvec![usage(1, true), usage(5, true)],
        credits: Some(CreditBalance { balance: 0, sufficient: false }),
    };
    assert_eq!(settle(&spend, &everything_fails, d.clone()).verdict, Verdict::Deny(Code::InsufficientCredits));
    let quotas_fail = SpendAnswer { credits: Some(CreditBalance { balance: 5, sufficient: true }), ..everything_fails };
    let s = settle(&spend, &quotas_fail, d);
    assert_eq!(s.verdict, Verdict::Deny(Code::QuotaExhausted), "the period quota is reported though it comes second");
    assert_eq!(s.denied_quota, Some(1));
}

#[test]
fn an_unspent_answer_without_a_reason_is_never_an_allow() {
    let a = account("free");
    let Step::Spend(spend, d) = eval(SEARCH, Caller::Known(&a)) else { panic!() };
    let no_reason = SpendAnswer {
        spent: false,
        quotas: spend.quotas.iter().map(|q| usage(q.limit - 1, false)).collect(),
        credits: None,
    };
    assert_eq!(settle(&spend, &no_reason, d.clone()).verdict, Verdict::Deny(Code::StoreUnavailable));
    let dry = Spend { dry_run: true, ..spend.clone() };
    assert!(matches!(settle(&dry, &no_reason, d.clone()).verdict, Verdict::Allow(_)), "a dry run spends nothing");
    let spent = SpendAnswer { spent: true, ..no_reason };
    assert!(matches!(settle(&spend, &spent, d).verdict, Verdict::Allow(_)));
}

#[test]
fn spend_covers_every_quota_of_the_meter_and_nothing_else() {
    let a = Account { quota_overrides: vec![month(5)], ..account("free") };
    let Step::Spend(spend, _) = eval(SEARCH, Caller::Known(&a)) else { panic!() };
    assert_eq!(spend.quotas.as_slice(), [month(5), per_second(10)], "the override keeps the plan quota's place");
    assert_eq!((spend.cost, spend.credits, spend.now, spend.dry_run), (1, None, now(), false));
    let other = Target::Metered { feature: None, meter: Some("tokens"), cost: 1, shadow: None };
    assert!(done(eval(other, Caller::Known(&a))).is_allowed(), "no quota on that meter: nothing to spend");
}

#[test]
fn an_identical_override_names_the_same_denied_quota() {
    let both_exhausted = |_: &Spend| SpendAnswer {
        spent: false,
        quotas: smallvec::smallvec![usage(1000, true), usage(10, true)],
        credits: None,
    };
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

// Shadow mode (issue 12): decided in full, then allowed, with the would-be code.

fn shadowed(route: Option<bool>) -> Target<'static> {
    Target::Metered { feature: Some("ai"), meter: Some("requests"), cost: 10, shadow: route }
}

fn shadow_policy(global: bool, plan: Option<bool>) -> Policy {
    let mut p = policy();
    p.shadow = global;
    if let Some(plan_free) = p.plans.get_mut("free") {
        plan_free.shadow = plan;
    }
    p
}

fn exhausted(spend: &Spend) -> SpendAnswer {
    SpendAnswer {
        spent: spend.shadow,
        quotas: spend.quotas.iter().map(|q| usage(q.limit, !q.window.is_rate())).collect(),
        credits: None,
    }
}

fn decide_with(p: &Policy, target: Target<'_>, a: &Account, answer: impl FnOnce(&Spend) -> SpendAnswer) -> Decision {
    match evaluate(p, target, Caller::Known(a), now(), false) {
        Step::Done(d) => d,
        Step::Spend(spend, d) => settle(&spend, &answer(&spend), d),
    }
}

#[test]
fn the_most_specific_shadow_setting_wins() {
    let free = account("free");
    // (global, plan, route) → shadowed?
    for (global, plan, route, on) in [
        (false, None, None, false),
        (true, None, None, true),
        (true, Some(false), None, false),
        (false, Some(true), None, true),
        (false, Some(true), Some(false), false),
        (true, Some(false), Some(true), true),
        (false, None, Some(true), true),
    ] {
        let d = decide_with(&shadow_policy(global, plan), shadowed(route), &free, exhausted);
        assert_eq!(d.shadow, on, "{global} {plan:?} {route:?}");
        if on {
            // The free plan lacks `ai`: the first row that would deny is the one reported.
            assert_eq!(d.verdict, Verdict::Allow(AllowKind::Allowed));
            assert_eq!(d.shadowed, Some(Code::FeatureNotInPlan));
        } else {
            assert_eq!(d.verdict, Verdict::Deny(Code::FeatureNotInPlan));
            assert_eq!(d.shadowed, None);
        }
    }
}

#[test]
fn a_shadowed_request_walks_on_and_spends_what_it_uses() {
    let p = shadow_policy(true, None);
    let canceled = Account { status: Status::Canceled, ..account("free") };
    let Step::Spend(spend, d) = evaluate(&p, shadowed(None), Caller::Known(&canceled), now(), false) else {
        panic!("a shadowed request past a would-be deny still spends")
    };
    assert!(spend.shadow && !spend.dry_run);
    assert_eq!(d.shadowed, Some(Code::SubscriptionInactive));
    let d = settle(&spend, &exhausted(&spend), d);
    assert!(d.is_allowed());
    assert_eq!(d.shadowed, Some(Code::SubscriptionInactive), "the first would-be code stays");
    assert_eq!(d.denied_quota, Some(0), "the quota that would also have denied is still shown");

    // Only the counters would have denied: that is the code reported.
    let pro = account("pro");
    let d = decide_with(&p, shadowed(None), &pro, exhausted);
    assert_eq!((d.verdict, d.shadowed), (Verdict::Allow(AllowKind::Allowed), Some(Code::QuotaExhausted)));
    let rate = |s: &Spend| SpendAnswer {
        spent: true,
        quotas: s.quotas.iter().map(|q| usage(q.limit, q.window.is_rate())).collect(),
        credits: None,
    };
    let d = decide_with(&p, SEARCH, &account("free"), rate);
    assert_eq!(d.shadowed, Some(Code::RateLimited));
    let broke = |s: &Spend| SpendAnswer {
        spent: true,
        quotas: Default::default(),
        credits: s.credits.map(|_| CreditBalance { balance: 3, sufficient: false }),
    };
    let mut pp = p.clone();
    pp.plans.get_mut("payg").unwrap().shadow = Some(true);
    let d = decide_with(&pp, AI, &account("payg"), broke);
    assert_eq!((d.is_allowed(), d.shadowed, d.credits), (true, Some(Code::InsufficientCredits), Some(3)));

    // Nothing would have denied: allowed, shadow on, nothing noted.
    let d = decide_with(&p, SEARCH, &account("pro"), all_fit);
    assert_eq!((d.is_allowed(), d.shadow, d.shadowed), (true, true, None));
}

#[test]
fn grace_stays_grace_and_overdue_is_shadowed_as_allowed() {
    let p = shadow_policy(true, None);
    let grace = Account { status: Status::PastDue, past_due_since: Some(now()), ..account("pro") };
    let d = decide_with(&p, shadowed(None), &grace, exhausted);
    assert_eq!((d.verdict, d.shadowed), (Verdict::Allow(AllowKind::Grace), Some(Code::QuotaExhausted)));
    let overdue = Account { past_due_since: Some(now() - chrono::Duration::days(30)), ..grace };
    let d = decide_with(&p, shadowed(None), &overdue, all_fit);
    assert_eq!((d.verdict, d.shadowed), (Verdict::Allow(AllowKind::Allowed), Some(Code::PaymentOverdue)));
}

#[test]
fn security_denials_stay_enforced_in_shadow_mode_unless_the_operator_opts_out() {
    let mut p = shadow_policy(true, None);
    let blocked = Account { blocked: true, ..account("pro") };
    let cases = |p: &Policy| {
        [
            evaluate(p, SEARCH, Caller::Missing, now(), false),
            evaluate(p, SEARCH, Caller::Invalid, now(), false),
            evaluate(p, SEARCH, Caller::Known(&blocked), now(), false),
            evaluate(p, Target::Unmatched, Caller::Known(&blocked), now(), false),
        ]
        .map(|step| match step {
            Step::Done(d) => d,
            // Let through, the walk goes on to the counters.
            Step::Spend(spend, d) => settle(&spend, &all_fit(&spend), d),
        })
    };
    for d in cases(&p) {
        assert!(d.shadow);
        assert!(!d.is_allowed(), "{d:?}");
        assert_eq!(d.shadowed, None);
    }
    p.shadow_security = true;
    let want = [Code::CredentialsMissing, Code::CredentialsInvalid, Code::AccountBlocked, Code::RouteNotAllowed];
    for (d, code) in cases(&p).into_iter().zip(want) {
        assert!(d.is_allowed(), "{d:?}");
        assert_eq!(d.shadowed, Some(code));
    }
    // A route that turns shadow off enforces even credentials.
    assert_eq!(
        code(evaluate(&p, shadowed(Some(false)), Caller::Missing, now(), false)),
        Some(Code::CredentialsMissing)
    );
    // Public routes are never shadowed (nothing to shadow) and store faults never are.
    assert!(!done(evaluate(&p, Target::Public, Caller::Missing, now(), false)).shadow);
    assert!(!Code::StoreUnavailable.shadowable(true) && !Code::RequestInvalid.shadowable(true));
}

#[test]
fn a_shadowed_unknown_plan_is_let_through_with_nothing_spent() {
    let p = shadow_policy(true, None);
    let d = done(evaluate(&p, SEARCH, Caller::Known(&account("gold")), now(), false));
    assert_eq!((d.is_allowed(), d.shadowed), (true, Some(Code::PlanUnknown)));
}

#[test]
fn without_shadow_nothing_changes_and_spends_are_not_shadow_spends() {
    let a = account("free");
    let Step::Spend(spend, d) = eval(SEARCH, Caller::Known(&a)) else { panic!() };
    assert!(!spend.shadow && !d.shadow);
}

// Soft quotas (issue 12): past the limit is overage, the ceiling is the stop.

fn soft(limit: u64, ceiling: Option<u64>) -> Quota {
    month(limit).soften(true, ceiling).unwrap()
}

#[test]
fn past_a_soft_limit_is_overage_and_the_ceiling_denies_with_it() {
    let a = Account { quota_overrides: vec![soft(10, Some(15))], ..account("free") };
    let at = |used: u64, exceeded: bool| {
        move |s: &Spend| SpendAnswer {
            spent: !exceeded,
            quotas: s
                .quotas
                .iter()
                .map(|q| usage(if q.window.is_rate() { 1 } else { used }, exceeded && !q.window.is_rate()))
                .collect(),
            credits: None,
        }
    };
    let d = decide(SEARCH, &a, at(10, false));
    assert_eq!((d.is_allowed(), d.quotas[0].overage, d.overages().count()), (true, 0, 0));
    let d = decide(SEARCH, &a, at(12, false));
    assert!(d.is_allowed());
    assert_eq!((d.quotas[0].overage, d.quotas[0].remaining, d.quotas[0].overage_of(d.cost)), (2, 0, 1));
    assert_eq!(d.overages().count(), 1);
    let d = decide(SEARCH, &a, at(15, true));
    assert_eq!(d.verdict, Verdict::Deny(Code::QuotaExhausted));
    assert_eq!(d.denying_quota().map(|q| (q.used, q.overage, q.remaining)), Some((15, 5, 0)));
    assert_eq!(d.overages().count(), 0, "a denied request spent no overage");
    // Hard quotas never report overage, whatever the counter says.
    let hard = decide(SEARCH, &account("free"), at(1200, false));
    assert_eq!(hard.quotas[0].overage, 0);
}

#[test]
fn soft_quotas_are_checked_when_built() {
    assert_eq!(soft(10, Some(15)).hard_limit(), 15);
    assert_eq!(soft(10, None).hard_limit(), crate::entitlement::MAX_LIMIT);
    assert_eq!(soft(10, None).ceiling_set(), None);
    assert_eq!(month(10).hard_limit(), 10);
    use crate::entitlement::QuotaError;
    assert_eq!(month(10).soften(true, Some(10)), Err(QuotaError::Ceiling(10, 10)));
    assert_eq!(month(10).soften(true, Some(9)), Err(QuotaError::Ceiling(9, 10)));
    assert_eq!(month(10).soften(true, Some(-1)), Err(QuotaError::Ceiling(-1, 10)));
    assert_eq!(month(10).soften(true, Some(i128::from(u64::MAX))), Err(QuotaError::Ceiling(u64::MAX.into(), 10)));
    assert_eq!(month(10).soften(false, Some(20)), Err(QuotaError::CeilingNotSoft));
    assert_eq!(per_second(10).soften(true, None::<u64>), Err(QuotaError::SoftRate));
    assert_eq!(month(10).soften(false, None::<u64>), Ok(month(10)));
}

#[test]
fn shadow_past_a_soft_ceiling_is_a_would_be_deny_not_more_overage() {
    let mut p = policy();
    p.shadow = true;
    let a = Account { quota_overrides: vec![soft(10, Some(15))], ..account("free") };
    let past = |s: &Spend| SpendAnswer {
        spent: true,
        quotas: s.quotas.iter().map(|q| usage(if q.window.is_rate() { 1 } else { 20 }, !q.window.is_rate())).collect(),
        credits: None,
    };
    let d = decide_with(&p, SEARCH, &a, past);
    assert_eq!((d.is_allowed(), d.shadowed), (true, Some(Code::QuotaExhausted)));
    assert_eq!(d.quotas[0].overage, 5, "overage stops at the ceiling: the rest would have been denied");
    assert_eq!(soft(10, None).overage(u64::MAX), crate::entitlement::MAX_LIMIT - 10);
    use crate::entitlement::{MAX_LIMIT, QuotaError};
    assert_eq!(
        month(MAX_LIMIT).soften(true, None::<u64>),
        Err(QuotaError::Ceiling(MAX_LIMIT.into(), MAX_LIMIT)),
        "no room above the largest limit"
    );
}

/// The decision allocates nothing for a known account on a metered route:
/// the account id and plan are the record's own (shared), the quota lists
/// inline (issue 16; `benches/check_allocs.rs` counts the whole handler).
#[test]
fn an_allowed_metered_request_is_decided_without_allocating() {
    let (policy, a) = (policy(), account("free"));
    let fits =
        SpendAnswer { spent: true, quotas: smallvec::smallvec![usage(1, false), usage(1, false)], credits: None };
    let mut allowed = false;
    let info = allocation_counter::measure(|| {
        if let Step::Spend(spend, d) = evaluate(&policy, SEARCH, Caller::Known(&a), now(), false) {
            let d = settle(&spend, &fits, d);
            allowed = d.is_allowed() && d.quotas.len() == 2 && d.account.is_some();
            std::hint::black_box(d);
        }
    });
    assert!(allowed, "the free plan's two quotas were spent and the request allowed");
    assert_eq!(info.count_total, 0, "allocations in evaluate + settle");
    // The counter counts (a zero above is not for want of counting).
    let one = allocation_counter::measure(|| drop(std::hint::black_box(a.id.to_string())));
    assert_eq!(one.count_total, 1);
}
