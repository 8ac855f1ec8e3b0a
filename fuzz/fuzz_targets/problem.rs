//! Problem rendering: any decision (every verdict and code, arbitrary
//! accounts, plans, quotas, dates anywhere in chrono's range, credits),
//! rendered at any `now`, with arbitrary override templates and portal URL,
//! removals, and x402 parts (a challenge or a receipt).
//!
//! Invariants (a panic is a counterexample):
//! - `render` never panics, whatever the dates;
//! - a deny has its code's status and a body that is valid JSON; an allow has no body.

#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use arbitrary::Arbitrary;
use chrono::{DateTime, Utc};
use libfuzzer_sys::fuzz_target;
use tollgate::config::{Config, DEMO_CONFIG, ProblemOverride};
use tollgate::decision::{AllowKind, Code, Decision, QuotaState, Verdict};
use tollgate::entitlement::{Period, Quota, Status, Window};
use tollgate::problem::{Context, Name, Payment, Removals, render};

/// An instant anywhere in chrono's range, with its two ends made likely.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Instant {
    Min,
    Max,
    Epoch,
    At { secs: i64, nanos: u32 },
}

impl Instant {
    fn get(self) -> DateTime<Utc> {
        let (min, max) = (DateTime::<Utc>::MIN_UTC.timestamp(), DateTime::<Utc>::MAX_UTC.timestamp());
        match self {
            Instant::Min => DateTime::<Utc>::MIN_UTC,
            Instant::Max => DateTime::<Utc>::MAX_UTC,
            Instant::Epoch => DateTime::<Utc>::UNIX_EPOCH,
            Instant::At { secs, nanos } => {
                let secs = min + secs.rem_euclid(max - min + 1);
                DateTime::from_timestamp(secs, nanos % 1_000_000_000).unwrap_or(DateTime::<Utc>::MAX_UTC)
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
enum WindowIn {
    Calendar(u8),
    Rolling { secs: u64, nanos: u32 },
}

#[derive(Arbitrary, Debug)]
struct QuotaIn {
    meter: String,
    limit: u64,
    window: WindowIn,
    used: u64,
    remaining: u64,
    resets_at: Instant,
    retry_at: Instant,
    ceiling: Option<u64>,
    overage: u64,
}

/// The x402 part of an answer (a challenge on a 402, a receipt on a paid call).
#[derive(Arbitrary, Debug)]
enum PaymentIn {
    Challenge { header: String, amount: String, network: String, asset: String, error: Option<String> },
    Paid { response: String, payer: String, receipt: String },
}

#[derive(Arbitrary, Debug)]
struct OverrideIn {
    title: Option<String>,
    detail: Option<String>,
    link: Option<String>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    verdict: u8,
    account: Option<String>,
    plan: Option<String>,
    quotas: Vec<QuotaIn>,
    denied_quota: Option<u8>,
    feature: Option<String>,
    status: Option<u8>,
    grace_until: Option<Instant>,
    cost: u64,
    credits: Option<u64>,
    now: Instant,
    strip: Vec<String>,
    own_shown: bool,
    shadow: bool,
    shadowed: Option<u8>,
    payment: Option<PaymentIn>,
    portal_url: Option<String>,
    type_base: Option<String>,
    override_texts: Option<OverrideIn>,
}

const ALLOWS: [AllowKind; 4] = [AllowKind::Public, AllowKind::Allowed, AllowKind::Grace, AllowKind::FailOpen];
const PERIODS: [Period; 4] = [Period::Minute, Period::Hour, Period::Day, Period::Month];

fn verdict(n: u8) -> Verdict {
    let n = usize::from(n) % (Code::ALL.len() + ALLOWS.len());
    match Code::ALL.get(n) {
        Some(code) => Verdict::Deny(*code),
        None => Verdict::Allow(ALLOWS[n - Code::ALL.len()]),
    }
}

fn quota(q: QuotaIn) -> QuotaState {
    let window = match q.window {
        WindowIn::Calendar(p) => Window::Calendar(PERIODS[usize::from(p) % PERIODS.len()]),
        WindowIn::Rolling { secs, nanos } => Window::Rolling(Duration::new(secs, nanos % 1_000_000_000)),
    };
    QuotaState {
        quota: Quota { meter: q.meter.into(), limit: q.limit, window, ceiling: q.ceiling },
        used: q.used,
        remaining: q.remaining,
        resets_at: q.resets_at.get(),
        retry_at: q.retry_at.get(),
        overage: q.overage,
    }
}

static CONFIG: OnceLock<Config> = OnceLock::new();

fuzz_target!(|input: Input| {
    let base = CONFIG.get_or_init(|| Config::parse(DEMO_CONFIG, "demo.yaml").expect("the demo config parses"));
    let verdict = verdict(input.verdict);
    let d = Decision {
        verdict,
        account: input.account.map(Into::into),
        plan: input.plan.map(Into::into),
        quotas: input.quotas.into_iter().map(quota).collect(),
        denied_quota: input.denied_quota.map(usize::from),
        feature: input.feature,
        status: input.status.map(|s| Status::ALL[usize::from(s) % Status::ALL.len()]),
        grace_until: input.grace_until.map(Instant::get),
        cost: input.cost,
        credits: input.credits,
        shadow: input.shadow,
        shadowed: input.shadowed.map(|n| Code::ALL[usize::from(n) % Code::ALL.len()]),
    };
    let now = input.now.get();

    let custom = input.portal_url.is_some() || input.type_base.is_some() || input.override_texts.is_some();
    let owned;
    let config = if custom {
        let mut c = base.clone();
        if input.portal_url.is_some() {
            c.billing.portal_url = input.portal_url;
        }
        if let Some(t) = input.type_base {
            c.problems.type_base = t;
        }
        if let (Verdict::Deny(code), Some(o)) = (verdict, input.override_texts) {
            c.problems.overrides.insert(code, ProblemOverride { title: o.title, detail: o.detail, link: o.link });
        }
        owned = c;
        &owned
    } else {
        base
    };

    let strip: Vec<Name> = input.strip.into_iter().map(Name::from).collect();
    let removals = Removals { strip: &strip, own_shown: input.own_shown };
    let payment = input.payment.as_ref().map(|p| match p {
        PaymentIn::Challenge { header, amount, network, asset, error } => Payment::Challenge {
            header,
            amount,
            network,
            asset,
            error: error.as_deref(),
        },
        PaymentIn::Paid { response, payer, receipt } => Payment::Paid { response, payer, receipt },
    });
    let r = render(&d, config, Context { removals, payment }, now);
    assert_eq!(r.status, verdict.http_status());
    match verdict {
        Verdict::Deny(_) => {
            let body = r.body.expect("a deny has a problem body");
            if let Err(e) = serde_json::from_str::<serde_json::Value>(&body) {
                panic!("problem body is not JSON ({e}): {body}");
            }
        }
        Verdict::Allow(_) => assert!(r.body.is_none(), "an allow has no body"),
    }
});
