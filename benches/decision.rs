//! Benchmarks of the pure decision path: `decision::evaluate` (+ `settle` with
//! a precomputed store answer) and `problem::render`.
//!
//! No I/O and no clock reads: `now` is fixed, the store's answer is built once.
//! Run with `cargo bench --bench decision`.

use std::hint::black_box;

use chrono::{DateTime, Utc};
use criterion::Criterion;
use tollgate::config::{Config, DEMO_CONFIG};
use tollgate::decision::{self, Caller, Code, Decision, Policy, Step, Target, Verdict};
use tollgate::entitlement::{Account, Period, Window};
use tollgate::problem::{self, Context};
use tollgate::usage::{QuotaUsage, SpendAnswer};

/// A typical metered route: `/v1/search`, feature `search`, meter `requests`, cost 1.
const SEARCH: Target<'static> =
    Target::Metered { feature: Some("search"), meter: Some("requests"), cost: 1, shadow: None };
/// A route whose feature the free plan lacks.
const AI: Target<'static> = Target::Metered { feature: Some("ai"), meter: Some("requests"), cost: 10, shadow: None };

fn now() -> DateTime<Utc> {
    "2026-11-22T12:00:00Z".parse().expect("timestamp")
}

/// The demo config (`config/demo.yaml`): its free plan has a month quota (1,000) and a 1s rate quota (10).
fn demo() -> Config {
    Config::parse(DEMO_CONFIG, "<demo>").expect("demo config")
}

fn free_account() -> Account {
    Account { id: "acct_free".into(), plan: "free".into(), ..Account::default() }
}

/// What the store answers for the free plan's two quotas.
fn answer(month_used: u64, month_exceeded: bool) -> SpendAnswer {
    let t = now();
    SpendAnswer {
        spent: !month_exceeded,
        quotas: smallvec::smallvec![
            QuotaUsage {
                used: month_used,
                exceeded: month_exceeded,
                resets_at: "2026-12-01T00:00:00Z".parse().expect("timestamp"),
                retry_at: "2026-12-01T00:00:00Z".parse().expect("timestamp"),
            },
            QuotaUsage { used: 3, exceeded: false, resets_at: t + chrono::Duration::seconds(1), retry_at: t },
        ],
        credits: None,
    }
}

/// evaluate, then settle with `answer` if a spend is needed.
fn decide(policy: &Policy, target: Target<'_>, account: &Account, answer: &SpendAnswer) -> Decision {
    match decision::evaluate(policy, target, Caller::Known(account), now(), false) {
        Step::Done(d) => d,
        Step::Spend(spend, d) => decision::settle(&spend, answer, d),
    }
}

fn bench_decision(c: &mut Criterion) {
    let policy = demo().policy;
    let account = free_account();
    let allowed = answer(42, false);
    let t = now();

    // Sanity: the free plan is the month + rate pair `answer` speaks for, and the cases are what their names say.
    let windows: Vec<&Window> = policy.plans["free"].quotas.iter().map(|q| &q.window).collect();
    assert!(matches!(windows[..], [Window::Calendar(Period::Month), Window::Rolling(_)]), "{windows:?}");
    assert_eq!(decide(&policy, SEARCH, &account, &allowed).verdict, Verdict::Allow(decision::AllowKind::Allowed));
    assert_eq!(decide(&policy, AI, &account, &allowed).verdict, Verdict::Deny(Code::FeatureNotInPlan));

    let mut g = c.benchmark_group("decision");
    g.bench_function("evaluate+settle/allowed_metered", |b| {
        b.iter(|| {
            let step = decision::evaluate(
                black_box(&policy),
                black_box(SEARCH),
                Caller::Known(black_box(&account)),
                black_box(t),
                false,
            );
            match step {
                Step::Done(d) => d,
                Step::Spend(spend, d) => decision::settle(&spend, black_box(&allowed), d),
            }
        })
    });
    g.bench_function("evaluate/allowed_metered_spend_only", |b| {
        b.iter(|| {
            decision::evaluate(
                black_box(&policy),
                black_box(SEARCH),
                Caller::Known(black_box(&account)),
                black_box(t),
                false,
            )
        })
    });
    g.bench_function("evaluate/deny_feature_not_in_plan", |b| {
        b.iter(|| {
            decision::evaluate(
                black_box(&policy),
                black_box(AI),
                Caller::Known(black_box(&account)),
                black_box(t),
                false,
            )
        })
    });
    g.finish();
}

fn bench_render(c: &mut Criterion) {
    let config = demo();
    let account = free_account();
    let exhausted = decide(&config.policy, SEARCH, &account, &answer(1000, true));
    assert_eq!(exhausted.verdict, Verdict::Deny(Code::QuotaExhausted));
    let allowed = decide(&config.policy, SEARCH, &account, &answer(42, false));
    assert!(allowed.is_allowed());
    let strip = [problem::Text::Static("x-api-key")];
    let ctx = Context { removals: problem::Removals { strip: &strip, own_shown: false }, payment: None };
    let t = now();
    let sample = problem::render(&exhausted, &config, ctx, t);
    assert_eq!(sample.status, 402);
    assert!(sample.body.as_deref().is_some_and(|b| b.contains("quota_exhausted")));

    let mut g = c.benchmark_group("render");
    g.bench_function("deny_quota_exhausted", |b| {
        b.iter(|| problem::render(black_box(&exhausted), black_box(&config), ctx, black_box(t)))
    });
    g.bench_function("allowed_metered", |b| {
        b.iter(|| problem::render(black_box(&allowed), black_box(&config), ctx, black_box(t)))
    });
    g.finish();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench_decision(&mut criterion);
    bench_render(&mut criterion);
    criterion.final_summary();
}
