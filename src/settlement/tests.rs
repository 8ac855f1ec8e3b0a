use super::*;
use chrono::TimeZone;

const KEY: [u8; 32] = [7; 32];

fn charge() -> Charge {
    Charge {
        id: "00ff-1".into(),
        account: "acct_a".into(),
        issued: Utc.with_ymd_and_hms(2026, 11, 30, 23, 59, 59).unwrap(),
        meter: "requests".into(),
        periods: vec![Period::Month, Period::Day],
        cost: 10,
        credits: true,
        cost_header: Some("x-usage-tokens".into()),
        shadow: None,
    }
}

#[test]
fn a_shadowed_charge_is_version_2_and_carries_its_would_be_code() {
    use crate::decision::Code;
    let c = Charge { shadow: Some(Code::QuotaExhausted), ..charge() };
    let token = c.seal(&KEY);
    assert!(token.starts_with("2|"), "{token}");
    assert_eq!(fields(&token)[9], "quota_exhausted");
    assert_eq!(open(&token), Ok(c));
    assert!(charge().seal(&KEY).starts_with("1|"), "the others stay version 1");
    // A version that does not match its field count, or an unknown code: refused after the signature.
    let resign = |f: Vec<String>| {
        let signed = f.join("|");
        let mut m = mac(&KEY);
        m.update(signed.as_bytes());
        format!("{signed}|{}", hex::encode(&m.finalize().into_bytes()[..16]))
    };
    let mut f = fields(&token);
    f.pop();
    f[9] = "no_such_code".into();
    assert_eq!(open(&resign(f.clone())), Err(Bad::Malformed));
    f[0] = "1".into();
    f[9] = "quota_exhausted".into();
    assert_eq!(open(&resign(f.clone())), Err(Bad::Malformed), "version 1 has no code field");
    let mut v2 = fields(&charge().seal(&KEY));
    v2.pop();
    v2[0] = "2".into();
    assert_eq!(open(&resign(v2)), Err(Bad::Malformed), "version 2 needs its code");
}

fn open(token: &str) -> Result<Charge, Bad> {
    Charge::open(token, &KEY)
}

/// The token's fields, to alter one and join them again.
fn fields(token: &str) -> Vec<String> {
    token.split('|').map(str::to_owned).collect()
}

fn served(code: u32, header: Option<&str>) -> Served<'_> {
    Served { code, cost_header: header }
}

fn now() -> DateTime<Utc> {
    charge().issued + chrono::Duration::seconds(2)
}

#[test]
fn a_sealed_charge_opens_as_itself() {
    let c = charge();
    assert_eq!(open(&c.seal(&KEY)), Ok(c));
    let bare = Charge { periods: vec![], meter: String::new(), credits: true, cost_header: None, ..charge() };
    assert_eq!(open(&bare.seal(&KEY)), Ok(bare));
    // Separators and escapes inside names survive.
    let odd = Charge { meter: "a|b%7C%".into(), cost_header: Some("x|y".into()), ..charge() };
    assert_eq!(open(&odd.seal(&KEY)), Ok(odd));
}

#[test]
fn any_change_to_a_sealed_charge_breaks_its_signature() {
    let sealed = charge().seal(&KEY);
    let f = fields(&sealed);
    for i in 0..f.len() - 1 {
        let mut g = f.clone();
        g[i].push('0');
        assert_eq!(open(&g.join("|")), Err(Bad::Signature), "field {i}");
    }
    // Another key (another deployment's store) does not verify either.
    assert_eq!(Charge::open(&sealed, &[8; 32]), Err(Bad::Signature));
    // Nor does a forged, truncated, empty or non-hex signature.
    for sig in ["", "00", "zz", &"0".repeat(32), &"0".repeat(64)] {
        let mut g = f.clone();
        *g.last_mut().unwrap() = sig.to_owned();
        assert_eq!(open(&g.join("|")), Err(Bad::Signature), "sig {sig:?}");
    }
    // A field dropped or added breaks it too; no separator at all is malformed.
    let mut g = f.clone();
    g.remove(3);
    assert_eq!(open(&g.join("|")), Err(Bad::Signature));
    assert_eq!(open("garbage"), Err(Bad::Malformed));
    assert_eq!(open(""), Err(Bad::Malformed));
    assert_eq!(open(&"a|".repeat(2000)), Err(Bad::Malformed), "too long");
}

#[test]
fn fields_cannot_be_shifted_between_each_other() {
    // A `|` in a name is escaped: "a|b" + "c" never reads as "a" + "b|c".
    let a = Charge { meter: "a|b".into(), cost_header: Some("c".into()), ..charge() };
    let b = Charge { meter: "a".into(), cost_header: Some("b|c".into()), ..charge() };
    assert_ne!(fields(&a.seal(&KEY))[..9], fields(&b.seal(&KEY))[..9]);
    assert_eq!(open(&a.seal(&KEY)).unwrap().meter, "a|b");
}

#[test]
fn charge_on_classes() {
    let c = ChargeOn::parse(&["2xx", "3xx", "4xx"]).unwrap();
    for (code, charged) in [
        (200, true),
        (302, true),
        (404, true),
        (499, true),
        (500, false),
        (503, false),
        (599, false),
        (101, false),
        (0, true),
        (600, true),
        (99, true),
    ] {
        assert_eq!(c.charges(code), charged, "{code}");
    }
    assert!(ChargeOn::ALL.charges(500) && ChargeOn::ALL.is_all());
    assert!(!c.is_all());
    assert_eq!(c.describe(), "2xx,3xx,4xx");
    assert_eq!(ChargeOn::parse::<&str>(&[]).unwrap().describe(), "");
    for bad in ["6xx", "2XX", "200", "2xx ", "", "0xx", "x2x"] {
        assert!(ChargeOn::parse(&[bad]).is_err(), "{bad}");
    }
}

#[test]
fn an_uncharged_class_refunds_the_whole_reservation() {
    let on = ChargeOn::parse(&["2xx", "3xx", "4xx"]).unwrap();
    let adj = settle(&charge(), served(503, Some("999")), on, now()).unwrap();
    assert_eq!(adj.delta, -10);
    assert_eq!((adj.account.as_str(), adj.charge.as_str(), adj.issued), ("acct_a", "00ff-1", charge().issued));
    assert_eq!(adj.periods, vec![Period::Month, Period::Day]);
    assert!(adj.credits);
    assert!(adj.remember_until >= adj.issued + chrono::Duration::from_std(MAX_AGE).unwrap());
}

#[test]
fn a_reported_cost_replaces_the_reservation() {
    let on = ChargeOn::ALL;
    assert_eq!(settle(&charge(), served(200, Some("25")), on, now()).unwrap().delta, 15);
    assert_eq!(settle(&charge(), served(200, Some(" 3 ")), on, now()).unwrap().delta, -7);
    assert_eq!(settle(&charge(), served(200, Some("0")), on, now()).unwrap().delta, -10);
    let delta = |c: &Charge, s| settle(c, s, on, now()).map(|a| a.delta);
    // What was reserved: an adjustment of 0 (recorded, so no replay can change it).
    assert_eq!(delta(&charge(), served(200, Some("10"))), Ok(0));
    // Not reported (or not logged): the reservation stands.
    assert_eq!(delta(&charge(), served(200, None)), Ok(0));
    // A route without a cost header ignores any header value.
    let plain = Charge { cost_header: None, ..charge() };
    assert_eq!(delta(&plain, served(200, Some("junk"))), Ok(0));
    assert_eq!(delta(&plain, served(500, None)), Ok(0));
}

#[test]
fn garbage_costs_are_refused_not_applied() {
    for v in ["-5", "+5", "1.5", "1e3", "", " ", "5,7", "0x10", "1000000001", "99999999999999999999", "١٢", "5 5"] {
        assert_eq!(settle(&charge(), served(200, Some(v)), ChargeOn::ALL, now()), Err(Bad::CostHeader), "{v:?}");
    }
    assert_eq!(parse_cost("1000000000"), Some(MAX_COST));
}

#[test]
fn old_and_future_charges_are_stale() {
    let c = charge();
    let on = ChargeOn::parse(&["2xx"]).unwrap();
    let at = |secs: i64| c.issued + chrono::Duration::seconds(secs);
    assert!(settle(&c, served(500, None), on, at(900)).is_ok());
    assert_eq!(settle(&c, served(500, None), on, at(901)), Err(Bad::Stale));
    assert!(settle(&c, served(500, None), on, at(-300)).is_ok());
    assert_eq!(settle(&c, served(500, None), on, at(-301)), Err(Bad::Stale));
}

#[test]
fn a_charge_with_nothing_to_adjust_is_still_settled_once() {
    let c = Charge { periods: vec![], credits: false, ..charge() };
    let adj = settle(&c, served(500, None), ChargeOn::parse(&["2xx"]).unwrap(), now()).unwrap();
    assert_eq!((adj.delta, adj.periods.len(), adj.credits), (-10, 0, false));
}

#[test]
fn out_of_bounds_fields_are_malformed_even_when_signed() {
    let cases: Vec<Charge> = vec![
        Charge { id: String::new(), ..charge() },
        Charge { id: "a".repeat(65), ..charge() },
        Charge { id: "a b".into(), ..charge() },
        Charge { account: "a{b}".into(), ..charge() },
        Charge { cost: MAX_COST + 1, ..charge() },
        Charge { meter: String::new(), ..charge() },
        Charge { cost_header: Some("X-Upper".into()), ..charge() },
        Charge { cost_header: Some("a b".into()), ..charge() },
        Charge { periods: vec![Period::Month; 5], ..charge() },
    ];
    for c in cases {
        assert_eq!(open(&c.seal(&KEY)), Err(Bad::Malformed), "{c:?}");
    }
}

#[test]
fn header_names() {
    assert!(is_header_name("x-usage-tokens"));
    for bad in ["", "X-Usage", "a:b", "a b", "é", &"a".repeat(129)] {
        assert!(!is_header_name(bad), "{bad:?}");
    }
}
