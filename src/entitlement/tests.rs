use super::*;

fn t(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

#[test]
fn calendar_windows_are_utc_truncations() {
    let now = t("2026-12-31T23:59:30.5Z");
    assert_eq!(Period::Minute.bounds(now), (t("2026-12-31T23:59:00Z"), t("2027-01-01T00:00:00Z")));
    assert_eq!(Period::Hour.bounds(now), (t("2026-12-31T23:00:00Z"), t("2027-01-01T00:00:00Z")));
    assert_eq!(Period::Day.bounds(now), (t("2026-12-31T00:00:00Z"), t("2027-01-01T00:00:00Z")));
    assert_eq!(Period::Month.bounds(now), (t("2026-12-01T00:00:00Z"), t("2027-01-01T00:00:00Z")));
    assert_eq!(Period::Month.bounds(t("2028-02-10T00:00:00Z")), (t("2028-02-01T00:00:00Z"), t("2028-03-01T00:00:00Z")));
}

#[test]
fn windows_at_the_end_of_time_do_not_panic() {
    for p in [Period::Minute, Period::Hour, Period::Day, Period::Month] {
        let (start, end) = p.bounds(DateTime::<Utc>::MAX_UTC);
        assert!(start <= end);
        let (start, end) = p.bounds(DateTime::<Utc>::MIN_UTC);
        assert!(start <= end);
    }
}

#[test]
fn policy_names_follow_the_window() {
    let q = |window| Quota { meter: "requests".into(), limit: 1, window, ceiling: None };
    assert_eq!(q(Window::Calendar(Period::Month)).policy_name(), "requests-month");
    assert_eq!(q(Window::Rolling(Duration::from_secs(1))).policy_name(), "requests-1s");
    assert_eq!(q(Window::Rolling(Duration::from_secs(90))).policy_name(), "requests-1m30s");
}

#[test]
fn quotas_are_built_within_bounds() {
    let q = Quota::new("requests", 10u64, Some(Period::Month), None).unwrap();
    assert_eq!(
        q,
        Quota { meter: "requests".into(), limit: 10, window: Window::Calendar(Period::Month), ceiling: None }
    );
    let q = Quota::new("requests", MAX_LIMIT, None, Some(MAX_WINDOW)).unwrap();
    assert_eq!((q.limit, q.window), (MAX_LIMIT, Window::Rolling(MAX_WINDOW)));
    assert!(Quota::new("requests", 1i64, None, Some(MIN_WINDOW)).is_ok());
}

#[test]
fn abusive_quotas_are_refused_naming_the_field() {
    let month = Some(Period::Month);
    let second = Some(Duration::from_secs(1));
    let cases: [(Result<Quota, QuotaError>, QuotaError, &str); 12] = [
        (Quota::new("", 1u64, month, None), QuotaError::MeterEmpty, "meter"),
        (Quota::new("  ", 1u64, month, None), QuotaError::MeterEmpty, "meter"),
        (Quota::new(&"m".repeat(MAX_NAME + 1), 1u64, month, None), QuotaError::MeterInvalid, "meter"),
        (Quota::new("re\nquests", 1u64, month, None), QuotaError::MeterInvalid, "meter"),
        (Quota::new("requests", 0u64, month, None), QuotaError::Limit(0), "limit"),
        (Quota::new("requests", -5i64, month, None), QuotaError::Limit(-5), "limit"),
        (Quota::new("requests", MAX_LIMIT + 1, month, None), QuotaError::Limit(i128::from(MAX_LIMIT) + 1), "limit"),
        (Quota::new("requests", u64::MAX, month, None), QuotaError::Limit(i128::from(u64::MAX)), "limit"),
        (Quota::new("requests", 1u64, None, Some(MAX_WINDOW + MIN_WINDOW)), QuotaError::WindowTooLong, "per"),
        (Quota::new("requests", 1u64, None, Some(Duration::from_micros(999))), QuotaError::WindowTooShort, "per"),
        (Quota::new("requests", 1u64, month, second), QuotaError::PeriodAndPer, ""),
        (Quota::new("requests", 1u64, None, None), QuotaError::NoWindow, ""),
    ];
    for (got, want, field) in cases {
        assert_eq!(got.as_ref().unwrap_err(), &want);
        assert_eq!(want.field(), field, "{want:?}");
    }
}

#[test]
fn quota_errors_read_the_same_under_any_path() {
    let e = Quota::new("requests", 0u64, Some(Period::Day), None).unwrap_err();
    assert_eq!(
        format!("{}: {e}", e.path("plans.free.quotas[0]")),
        format!("plans.free.quotas[0].limit: must be between 1 and {MAX_LIMIT}, got 0")
    );
    let e = Quota::new("requests", 1u64, None, None).unwrap_err();
    assert_eq!(
        format!("{}: {e}", e.path("entitlement.quota_overrides[2]")),
        "entitlement.quota_overrides[2]: needs period (minute|hour|day|month) or per (a duration)"
    );
    let e = Quota::new("", 1u64, None, None).unwrap_err();
    assert_eq!(format!("{}: {e}", e.path("q")), "q.meter: must not be empty", "the meter is checked first");
    let e = Quota::new("requests", 1u64, Some(Period::Day), Some(Duration::ZERO)).unwrap_err();
    assert_eq!(e, QuotaError::PeriodAndPer, "the window's shape before its length");
}

#[test]
fn account_overrides_replace_same_window_and_add_others() {
    let plan = Plan {
        name: "free".into(),
        quotas: vec![
            Quota { meter: "requests".into(), limit: 1000, window: Window::Calendar(Period::Month), ceiling: None },
            Quota {
                meter: "requests".into(),
                limit: 10,
                window: Window::Rolling(Duration::from_secs(1)),
                ceiling: None,
            },
            Quota { meter: "tokens".into(), limit: 5, window: Window::Calendar(Period::Day), ceiling: None },
        ],
        ..Plan::default()
    };
    let account = Account {
        quota_overrides: vec![
            Quota { meter: "requests".into(), limit: 5000, window: Window::Calendar(Period::Month), ceiling: None },
            Quota { meter: "requests".into(), limit: 100, window: Window::Calendar(Period::Day), ceiling: None },
        ],
        ..Account::default()
    };
    let limits: Vec<u64> = account.quotas_for(&plan, "requests").iter().map(|q| q.limit).collect();
    assert_eq!(limits, vec![5000, 10, 100], "an override keeps its plan quota's place");
    assert!(account.quotas_for(&plan, "none").is_empty());
}
