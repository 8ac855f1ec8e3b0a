use super::*;
use chrono::TimeZone;

fn charge() -> Charge {
    Charge {
        id: "0123456789abcdef-2a".into(),
        account: "acct_a".into(),
        issued: Utc.with_ymd_and_hms(2026, 12, 2, 10, 0, 0).unwrap(),
        meter: "tokens".into(),
        periods: vec![Period::Month, Period::Day],
        cost: 100,
        credits: true,
        cost_header: Some("x-usage-tokens".into()),
        shadow: None,
    }
}

#[test]
fn a_usage_event_says_when_shadow_mode_let_its_request_through() {
    let plain: serde_json::Value = serde_json::from_str(&usage("tollgate", &charge(), 200, 1)).unwrap();
    assert!(plain["data"].get("shadow").is_none());
    let c = Charge { shadow: Some(crate::decision::Code::QuotaExhausted), ..charge() };
    let e: serde_json::Value = serde_json::from_str(&usage("tollgate", &c, 200, 1)).unwrap();
    assert_eq!(e["data"]["shadow"], "quota_exhausted");
}

#[test]
fn a_usage_event_is_a_cloudevent_named_by_its_charge() {
    let e: serde_json::Value = serde_json::from_str(&usage("tollgate", &charge(), 200, 250)).unwrap();
    assert_eq!(e["specversion"], "1.0");
    assert_eq!(e["type"], USAGE);
    assert_eq!(e["id"], "0123456789abcdef-2a");
    assert_eq!(e["source"], "tollgate");
    assert_eq!(e["subject"], "acct_a");
    assert_eq!(e["time"], "2026-12-02T10:00:00.000Z");
    assert_eq!(e["data"], json!({ "meter": "tokens", "units": 250, "reserved": 100, "credits": 250, "status": 200 }));
    assert_eq!(time_of(&usage("s", &charge(), 200, 1)), Some(charge().issued));
}

#[test]
fn marks_cover_each_level_of_each_quota_and_the_credits() {
    let levels = Levels { quota: vec![800, 1000], credits_below: Some(50) };
    let now = charge().issued;
    let m = marks("tollgate", &charge(), &[Some(1001), None], &levels, now);
    // The day quota is gone from the account: only the month's levels, then credits.
    assert_eq!(m.len(), 3);
    assert_eq!((m[0].counter, m[0].at), (Some(0), 801), "0.8 × 1001 rounded up");
    assert_eq!((m[1].counter, m[1].at), (Some(0), 1001));
    let start = Period::Month.bounds(now).0.timestamp_millis();
    assert_eq!(m[0].name, format!("tokens:month:{start}:800"));
    assert_eq!(m[0].until, Utc.with_ymd_and_hms(2027, 1, 1, 0, 1, 0).unwrap(), "past the window's end");
    let e: serde_json::Value = serde_json::from_str(&m[0].event).unwrap();
    assert_eq!(e["type"], QUOTA_THRESHOLD);
    assert_eq!(e["id"], format!("acct_a/tokens/month/{start}/800"));
    assert_eq!(e["data"]["fraction"], 0.8);
    assert_eq!((m[2].counter, m[2].at), (None, 50));
    assert_eq!(m[2].until, Utc.with_ymd_and_hms(2026, 12, 3, 0, 0, 0).unwrap());
    assert_eq!(serde_json::from_str::<serde_json::Value>(&m[2].event).unwrap()["type"], CREDITS_LOW);
    // No credits spent: no credit mark. A tiny limit still needs at least one unit.
    let c = Charge { credits: false, ..charge() };
    let m = marks("t", &c, &[Some(1), Some(1)], &Levels { quota: vec![1], credits_below: Some(5) }, now);
    assert!(m.iter().all(|m| m.counter.is_some() && m.at == 1), "{m:?}");
}

#[test]
fn batches_and_signatures() {
    assert_eq!(batch(["{\"a\":1}", "{\"b\":2}"]), "[{\"a\":1},{\"b\":2}]");
    assert_eq!(batch([]), "[]");
    // Checked against Python's hmac module.
    assert_eq!(
        signature("whsec_test_secret_that_is_long_enough", 1_700_000_000, "[{\"a\":1}]"),
        "t=1700000000,v1=6139b6cef3156021d576bb7027d9b278ea4cb032537d0ddf5442cf20ff783812"
    );
}
