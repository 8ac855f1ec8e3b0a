use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::*;

fn end() -> DateTime<Utc> {
    "2026-12-31T00:00:00Z".parse().unwrap()
}

fn counter(limit: u64) -> LeaseTarget {
    LeaseTarget::Counter { key: "q".into(), limit, expires: end() + chrono::Duration::minutes(1) }
}

fn credits() -> LeaseTarget {
    LeaseTarget::Credits { key: "c".into() }
}

/// A lease of `units` taken at `t`: valid 27 s, renewed after 15 s (lifetime 30 s).
fn held(target: LeaseTarget, units: u64, counter: u64, t: Instant) -> Lease {
    Lease {
        units,
        counter,
        renew_at: t + Duration::from_secs(15),
        valid_until: t + Duration::from_secs(27),
        ..Lease::empty(target, t)
    }
}

fn account(leases: Vec<Lease>) -> AccountLeases {
    AccountLeases { leases: leases.into_iter().map(|l| (l.target.key().to_owned(), l)).collect(), last_used: None }
}

#[test]
fn held_valid_units_pay_without_redis_and_all_or_nothing() {
    let t = Instant::now();
    let mut a = account(vec![held(counter(100), 5, 50, t), held(credits(), 2, 10, t)]);
    let wants = [Want { target: counter(100), need: 3 }, Want { target: credits(), need: 2 }];
    assert_eq!(a.local(&wants, t), Local::Pay { renew: false });
    assert_eq!(a.pay(&wants, t), 5);
    let answer = a.answer(&wants, true, t);
    assert!(answer.spent);
    assert_eq!(answer.quotas[0].used, 98, "limit − units still held: never more remaining than held");
    assert_eq!(answer.credits.map(|c| (c.balance, c.sufficient)), Some((10, true)));
    // The credits are spent out: the next spend must ask, and pays nothing meanwhile.
    assert_eq!(a.local(&wants, t), Local::Ask);
    assert!(!a.reserve(&wants[1], t), "nothing to take aside");
    assert_eq!(a.leases["q"].units, 2, "nothing taken from the quota either");
    assert!(!a.reserve(&wants[0], t), "3 do not fit in 2");
    let two = Want { target: counter(100), need: 2 };
    assert!(a.reserve(&two, t));
    assert_eq!(a.leases["q"].units, 0);
    a.refund(&two);
    assert_eq!(a.leases["q"].units, 2, "a refused spend puts back what it took aside");
}

#[test]
fn a_lease_due_for_renewal_still_pays_and_one_past_its_validity_asks_redis() {
    let t = Instant::now();
    let mut a = account(vec![held(counter(100), 50, 50, t)]);
    let wants = [Want { target: counter(100), need: 1 }];
    assert_eq!(a.local(&wants, t + Duration::from_secs(16)), Local::Pay { renew: true }, "renewal due");
    assert_eq!(a.local(&wants, t + Duration::from_secs(28)), Local::Ask, "no longer valid");
    assert!(!a.reserve(&wants[0], t + Duration::from_secs(28)), "expired units are never paid from");
    assert!(a.reserve(&wants[0], t + Duration::from_secs(16)));
}

#[test]
fn a_lease_under_another_limit_is_not_paid_from_and_is_taken_out() {
    let t = Instant::now();
    let mut a = account(vec![held(counter(100), 50, 50, t)]);
    let wants = [Want { target: counter(200), need: 1 }];
    assert_eq!(a.local(&wants, t), Local::Ask);
    assert_eq!(a.take_stale(&wants).len(), 1);
    assert!(a.leases.is_empty());
}

#[test]
fn a_known_short_lease_refuses_locally_and_says_which() {
    let t = Instant::now();
    let mut short = held(counter(100), 1, 99, t);
    short.mark_exhausted(t + Duration::from_secs(2));
    let mut a = account(vec![short, held(credits(), 50, 100, t)]);
    let wants = [Want { target: counter(100), need: 3 }, Want { target: credits(), need: 1 }];
    assert_eq!(a.local(&wants, t), Local::Refuse, "1 held + 1 free < 3");
    let answer = a.answer(&wants, false, t);
    assert!(!answer.spent && answer.quotas[0].exceeded);
    assert_eq!(answer.quotas[0].used, 99);
    assert!(answer.credits.is_some_and(|c| c.sufficient), "the credits were not the reason");
    // A cheaper request still fits what is known to be left.
    let cheap = [Want { target: counter(100), need: 1 }, Want { target: credits(), need: 1 }];
    assert_eq!(a.local(&cheap, t), Local::Pay { renew: false });
    // The mark lapses: ask again.
    assert_eq!(a.local(&wants, t + Duration::from_secs(3)), Local::Ask);
    a.leases.clear();
    assert_eq!(a.local(&wants, t), Local::Ask);
}

#[test]
fn a_refusal_always_names_a_reason() {
    let t = Instant::now();
    // No mark anywhere (e.g. takes kept losing their units to concurrent spends).
    let a = account(vec![held(counter(100), 0, 60, t)]);
    let wants = [Want { target: counter(100), need: 1 }, Want { target: credits(), need: 1 }];
    let answer = a.answer(&wants, false, t);
    assert!(!answer.spent);
    assert!(answer.quotas[0].exceeded, "the first lease that cannot pay: {answer:?}");
    let only_credits = [Want { target: credits(), need: 1 }];
    let answer = account(vec![]).answer(&only_credits, false, t);
    assert!(answer.credits.is_some_and(|c| !c.sufficient), "{answer:?}");
}

#[test]
fn ended_windows_are_taken_out() {
    let t = Instant::now();
    let mut a = account(vec![held(counter(100), 5, 50, t), held(credits(), 5, 5, t)]);
    assert!(a.take_ended(end() - chrono::Duration::seconds(1)).is_empty());
    let ended = a.take_ended(end());
    assert_eq!(ended.len(), 1);
    assert_eq!(a.leases.len(), 1, "a balance has no window");
}
