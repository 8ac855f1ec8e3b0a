//! Unit tests of the memory store: its arithmetic, bounds and locking. What every
//! store must do alike (all-or-nothing spends, windows, dry runs, credits, keys,
//! accounts, events) is in `tests/store_contract.rs`, which runs it on this store too.

use proptest::prelude::*;

use super::*;
use crate::entitlement::Period;
use crate::store::rolling::Buckets;
use crate::usage::MAX_LIMIT;

fn t(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn quota(limit: u64, window: Window) -> Quota {
    Quota { meter: "requests".into(), limit, window, ceiling: None }
}

fn spend(quotas: Vec<Quota>, cost: u64, credits: Option<u64>, now: DateTime<Utc>) -> Spend {
    Spend { account: "a".into(), quotas: quotas.into(), cost, credits, now, dry_run: false, shadow: false }
}

#[tokio::test]
async fn huge_costs_never_wrap_or_reset_an_exhausted_quota() {
    let s = MemoryStore::new();
    let now = t("2026-11-22T00:00:00Z");
    for window in [Window::Calendar(Period::Month), Window::Rolling(Duration::from_secs(3600))] {
        let q = vec![Quota { meter: format!("m-{}", window.label()).into(), limit: 3, window, ceiling: None }];
        assert!(s.spend(&spend(q.clone(), 3, None, now)).await.unwrap().spent);
        for cost in [u64::MAX, u64::MAX - 2, MAX_COST + 1, i64::MAX as u64, 1u64 << 63] {
            let a = s.spend(&spend(q.clone(), cost, None, now)).await.unwrap();
            assert!(!a.spent && a.quotas[0].exceeded, "cost {cost} must not fit ({window:?})");
            assert_eq!(a.quotas[0].used, 3, "cost {cost} reset the quota ({window:?})");
        }
        assert!(!s.spend(&spend(q.clone(), 1, None, now)).await.unwrap().spent, "still exhausted");
    }
}

/// A spend for a window older than the counter's (a Check that read the
/// clock just before another moved the counter on) counts in the current
/// window; it never zeroes the counter back to its own.
#[tokio::test]
async fn a_spend_for_an_older_window_never_zeroes_the_current_one() {
    let s = MemoryStore::new();
    let q = vec![quota(2, Window::Calendar(Period::Minute))];
    let (old, new) = (t("2026-11-22T00:00:59.999Z"), t("2026-11-22T00:01:00Z"));
    assert!(s.spend(&spend(q.clone(), 1, None, new)).await.unwrap().spent);
    let late = s.spend(&spend(q.clone(), 1, None, old)).await.unwrap();
    assert_eq!((late.spent, late.quotas[0].used, late.quotas[0].resets_at), (true, 2, t("2026-11-22T00:02:00Z")));
    let a = s.spend(&spend(q.clone(), 1, None, new)).await.unwrap();
    assert!(!a.spent && a.quotas[0].exceeded && a.quotas[0].used == 2, "the limit holds: {a:?}");
}

#[tokio::test]
async fn a_cost_above_max_cost_never_fits_even_under_a_huge_limit() {
    let s = MemoryStore::new();
    let q = vec![quota(MAX_LIMIT, Window::Calendar(Period::Day))];
    let now = t("2026-11-22T00:00:00Z");
    let a = s.spend(&spend(q.clone(), MAX_COST + 1, None, now)).await.unwrap();
    assert!(!a.spent && a.quotas[0].exceeded && a.quotas[0].used == 0);
    assert!(s.spend(&spend(q, MAX_COST, None, now)).await.unwrap().spent);
}

#[tokio::test]
async fn credit_costs_above_max_cost_are_insufficient_and_spend_nothing() {
    let s = MemoryStore::new();
    s.set_credits("a", MAX_CREDITS).await.unwrap();
    let now = t("2026-11-22T00:00:00Z");
    for cost in [MAX_COST + 1, i64::MAX as u64, u64::MAX] {
        let a = s.spend(&spend(vec![], 1, Some(cost), now)).await.unwrap();
        assert!(!a.spent);
        assert_eq!(a.credits, Some(CreditBalance { balance: MAX_CREDITS, sufficient: false }));
    }
    assert_eq!(s.credits("a").await.unwrap(), MAX_CREDITS);
}

#[tokio::test]
async fn spends_at_impossible_times_or_windows_are_refused_before_anything_moves() {
    let s = MemoryStore::new();
    s.set_credits("a", 10).await.unwrap();
    let ok_q = quota(10, Window::Calendar(Period::Day));
    for now in [DateTime::<Utc>::MAX_UTC, DateTime::<Utc>::MIN_UTC, t("+200000-01-01T00:00:00Z")] {
        let r = s.spend(&spend(vec![ok_q.clone()], 1, Some(1), now)).await;
        assert!(matches!(r, Err(StoreError::Corrupt(_))), "{now}: {r:?}");
    }
    let now = t("2026-11-22T00:00:00Z");
    for bad in [
        quota(10, Window::Rolling(Duration::MAX)),
        quota(10, Window::Rolling(crate::entitlement::MAX_WINDOW + Duration::from_secs(1))),
        quota(10, Window::Rolling(Duration::ZERO)),
        quota(MAX_LIMIT + 1, Window::Calendar(Period::Day)),
    ] {
        let r = s.spend(&spend(vec![ok_q.clone(), bad.clone()], 1, Some(1), now)).await;
        assert!(matches!(r, Err(StoreError::Corrupt(_))), "{bad:?}: {r:?}");
    }
    let twice = s.spend(&spend(vec![ok_q.clone(), ok_q.clone()], 1, Some(1), now)).await;
    assert!(matches!(twice, Err(StoreError::Corrupt(_))), "one counter spent twice: {twice:?}");
    let a = s.spend(&spend(vec![ok_q], 1, Some(1), now)).await.unwrap();
    assert_eq!((a.quotas[0].used, s.credits("a").await.unwrap()), (1, 9), "the refused spends moved nothing");
}

#[tokio::test]
async fn the_longest_window_at_the_latest_instant_does_not_panic() {
    let s = MemoryStore::new();
    let q = vec![quota(1, Window::Rolling(crate::entitlement::MAX_WINDOW))];
    let now = crate::entitlement::max_time();
    assert!(s.spend(&spend(q.clone(), 1, None, now)).await.unwrap().spent);
    let a = s.spend(&spend(q, 1, None, now)).await.unwrap();
    assert!(!a.spent && a.quotas[0].retry_at > now);
}

#[tokio::test]
async fn accounts_out_of_bounds_are_not_stored() {
    let s = MemoryStore::new();
    let good = Account { id: "acct_1".into(), plan: "pro".into(), ..Account::default() };
    let far = DateTime::<Utc>::MAX_UTC;
    let bad = [
        Account { past_due_since: Some(far), ..good.clone() },
        Account { expires_at: Some(DateTime::<Utc>::MIN_UTC), ..good.clone() },
        Account { billing_event_at: Some(far), ..good.clone() },
        Account { quota_overrides: vec![quota(u64::MAX, Window::Calendar(Period::Day))], ..good.clone() },
        Account { quota_overrides: vec![quota(1, Window::Rolling(Duration::MAX))], ..good.clone() },
        Account { stripe_customer: Some("cus 1".into()), ..good.clone() },
        Account { plan: "p".repeat(129).into(), ..good.clone() },
        Account { id: "{acct}".into(), ..good.clone() },
    ];
    for a in &bad {
        assert!(matches!(s.put_account(a).await, Err(StoreError::Corrupt(_))), "{a:?}");
        assert!(matches!(s.put_account_if_newer(a).await, Err(StoreError::Corrupt(_))), "{a:?}");
    }
    assert!(s.account("acct_1").await.unwrap().is_none());
    s.put_account(&good).await.unwrap();
}

#[tokio::test]
async fn remembering_an_event_for_longer_than_the_clock_can_say_does_not_panic() {
    let s = MemoryStore::new();
    assert!(s.remember_event("evt_1", Duration::MAX).await.unwrap());
    assert!(!s.remember_event("evt_1", Duration::MAX).await.unwrap(), "remembered for ever");
}

#[tokio::test]
async fn lapsed_event_ids_are_dropped_and_live_ones_are_not_scanned_on_every_insert() {
    use std::sync::atomic::Ordering;
    let s = MemoryStore::new();
    let hour = Duration::from_secs(3600);
    for i in 0..EVENTS_PRUNED_FROM {
        assert!(s.remember_event(&format!("evt_lapsed_{i}"), Duration::ZERO).await.unwrap());
    }
    std::thread::sleep(Duration::from_millis(2));
    assert!(s.remember_event("evt_next", hour).await.unwrap());
    assert_eq!(lock(&s.events).len(), 1, "the lapsed ids were dropped, the new one kept");
    assert!(s.remember_event("evt_lapsed_0", hour).await.unwrap(), "a dropped id is new again");
    // Live ids up to the floor: one scan keeps them all, and the next scan
    // waits until the map has doubled (it used to rescan on every insert).
    for i in 0..EVENTS_PRUNED_FROM {
        assert!(s.remember_event(&format!("evt_live_{i}"), hour).await.unwrap());
    }
    assert_eq!(lock(&s.events).len(), EVENTS_PRUNED_FROM + 2);
    assert_eq!(s.events_prune_at.load(Ordering::Relaxed), 2 * EVENTS_PRUNED_FROM);
    assert!(!s.remember_event("evt_live_0", hour).await.unwrap(), "a live id is still a replay");
    assert!(!s.remember_event("evt_next", hour).await.unwrap());
}

/// Runs a memory-store future, which never waits (its locks are std ones).
fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    use futures_util::FutureExt;
    f.now_or_never().expect("the memory store never waits")
}

fn any_cost() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..5u64,
        Just(MAX_COST),
        Just(MAX_COST + 1),
        Just(i64::MAX as u64),
        Just(u64::MAX),
        (u64::MAX - 5)..=u64::MAX,
        any::<u64>(),
    ]
}

fn any_limit() -> impl Strategy<Value = u64> {
    prop_oneof![0..12u64, Just(MAX_LIMIT), (MAX_LIMIT - 5)..=MAX_LIMIT, 0..=MAX_LIMIT]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Within one window, whatever the costs and limits: a spend that fits adds
    /// exactly its cost and stays within its limit; one that does not moves
    /// nothing; `used` never goes down; credits never go up or wrap.
    #[test]
    fn spends_never_wrap_pass_their_limit_or_undo_usage(
        steps in proptest::collection::vec((any_cost(), any_limit(), any_limit(), proptest::option::of(any_cost())), 1..48),
        credits in 0..=MAX_CREDITS,
    ) {
        let s = MemoryStore::new();
        run(s.set_credits("a", credits)).unwrap();
        let t0 = t("2026-11-01T00:00:00Z");
        let (mut month, mut rate, mut balance) = (0u64, 0u64, credits);
        for (i, (cost, month_limit, rate_limit, credit_cost)) in steps.into_iter().enumerate() {
            let q = vec![
                quota(month_limit, Window::Calendar(Period::Month)),
                quota(rate_limit, Window::Rolling(Duration::from_secs(86_400))),
            ];
            let now = t0 + chrono::Duration::seconds(i as i64);
            let a = run(s.spend(&spend(q, cost, credit_cost, now))).unwrap();
            let fits = |used: u64, limit: u64| cost <= MAX_COST && used.checked_add(cost).is_some_and(|s| s <= limit);
            let credit_fits = credit_cost.is_none_or(|c| c <= MAX_COST && c <= balance);
            prop_assert_eq!(a.spent, fits(month, month_limit) && fits(rate, rate_limit) && credit_fits);
            if a.spent {
                prop_assert_eq!((a.quotas[0].used, a.quotas[1].used), (month + cost, rate + cost));
                prop_assert!(a.quotas[0].used <= month_limit && a.quotas[1].used <= rate_limit);
                month += cost;
                rate += cost;
                balance -= credit_cost.unwrap_or(0);
            } else {
                prop_assert_eq!((a.quotas[0].used, a.quotas[1].used), (month, rate));
            }
            prop_assert_eq!(run(s.credits("a")).unwrap(), balance);
        }
    }

    /// A rolling window on a fake clock, hammered at random gaps and costs,
    /// against an exact log of what it allowed: no window of length `per`
    /// ever holds more than `limit` units; `used` is exactly the units of the
    /// buckets still counted; a refusal always has a reason within
    /// `(count + 1) * width` (the stated under-use bound: the refused cost would
    /// not fit on top of what that slightly longer window holds); and
    /// `retry_at` is the first bucket boundary at which it fits.
    #[test]
    fn a_rolling_window_never_holds_more_than_its_limit_and_refuses_only_within_one_bucket_more(
        per_ms in prop_oneof![1..40u64, 40..5_000u64, Just(3_600_000u64)],
        limit in 1..20u64,
        steps in proptest::collection::vec((0..400u64, 0..6u64), 1..120),
        scale in prop_oneof![Just(1u64), Just(100), Just(20_000)],
    ) {
        let s = MemoryStore::new();
        let per = Duration::from_millis(per_ms);
        let g = Buckets::of(per).unwrap();
        let q = vec![quota(limit, Window::Rolling(per))];
        let mut now = t("2026-11-01T00:00:00Z").timestamp_millis() + 12_345;
        let mut log: Vec<(i64, u64)> = Vec::new(); // (ms, units) of every allowed spend
        for (gap, cost) in steps {
            now += (gap * scale) as i64;
            let at = DateTime::from_timestamp_millis(now).unwrap();
            let a = run(s.spend(&spend(q.clone(), cost, None, at))).unwrap();
            let held = |log: &[(i64, u64)], from: i64| log.iter().filter(|(t, _)| *t > from).map(|(_, u)| u).sum::<u64>();
            if a.spent {
                log.push((now, cost));
            }
            let counted: u64 =
                log.iter().filter(|(t, _)| g.index(*t) >= g.oldest_live(now)).map(|(_, u)| u).sum();
            prop_assert_eq!(a.quotas[0].used, counted, "used after the spend (if any)");
            if a.spent {
                prop_assert!(held(&log, now - per_ms as i64) <= limit, "the window up to {} holds more than {}", now, limit);
            } else {
                let longer = (g.count + 1) * g.width_ms;
                prop_assert!(held(&log, now - longer) + cost > limit, "refused at {} though the last {} ms hold {}", now, longer, held(&log, now - longer));
                // Retry: the first boundary where the buckets left hold little enough.
                let retry = a.quotas[0].retry_at.timestamp_millis();
                let fits_at = |t: i64| {
                    log.iter().filter(|(e, _)| g.index(*e) >= g.oldest_live(t)).map(|(_, u)| u).sum::<u64>() + cost <= limit
                };
                if cost <= limit {
                    prop_assert!(retry > now && fits_at(retry) && !fits_at(retry - 1), "retry at {} for {} at {}", retry, cost, now);
                    prop_assert_eq!(retry % g.width_ms, 0);
                }
            }
        }
    }

    /// No instant, window, limit or cost makes a spend panic: it answers or refuses.
    #[test]
    fn no_spend_panics(
        secs in prop_oneof![0..=253_402_300_799i64, any::<i64>()],
        window_ms in any::<u64>(),
        limit in any::<u64>(),
        cost in any::<u64>(),
        credit in proptest::option::of(any::<u64>()),
    ) {
        let s = MemoryStore::new();
        let now = DateTime::from_timestamp(secs, 0).unwrap_or(DateTime::<Utc>::MAX_UTC);
        let q = vec![
            quota(limit, Window::Rolling(Duration::from_millis(window_ms))),
            quota(limit, Window::Calendar(Period::Month)),
        ];
        for _ in 0..3 {
            let _ = run(s.spend(&spend(q.clone(), cost, credit, now)));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_spends_never_exceed_the_limit() {
    let s = Arc::new(MemoryStore::new());
    let q = vec![quota(100, Window::Calendar(Period::Month)), quota(1000, Window::Rolling(Duration::from_secs(60)))];
    let now = t("2026-11-22T00:00:00Z");
    let tasks: Vec<_> = (0..500)
        .map(|_| {
            let (s, sp) = (s.clone(), spend(q.clone(), 1, None, now));
            tokio::spawn(async move { s.spend(&sp).await.unwrap().spent })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.unwrap() as u32;
    }
    assert_eq!(allowed, 100);
}
