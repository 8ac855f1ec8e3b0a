//! Charging for what was served, as pure functions: the charge a Check hands
//! Envoy in its dynamic metadata, and the [`Adjustment`] the access-log entry
//! of that request makes of it.
//!
//! A Check spends the route's `cost` up front (the reservation). When the
//! response is known — Envoy's access-log stream reports its status and the
//! headers it was told to log — [`settle`] works out what the request really
//! costs: nothing when its status class is not in `billing.charge_on`, the
//! value of the route's `cost_from_response` header when it names one, else
//! the reservation; the store then moves the counters by the difference, once
//! per charge id, in the windows the charge was made in.
//!
//! A charge is one signed string ([`Charge::seal`], HMAC-SHA256 with a key shared by
//! every replica through the store): an access-log entry can only adjust a
//! charge tollgate made, for the account, meter and amount it made it for,
//! whoever can reach the gRPC port. No I/O, no clock reads: `now` and the key
//! are arguments. Depends on `entitlement` and `usage`.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::entitlement::{Period, is_valid_account_id, is_valid_name};
use crate::usage::{Adjustment, MAX_COST};

/// The dynamic-metadata namespace Envoy files a Check's metadata under (the
/// ext_authz filter's name), where the access-log entry carries it back.
pub const NAMESPACE: &str = "envoy.filters.http.ext_authz";

/// The metadata field holding the charge (a string, [`Charge::seal`]).
pub const FIELD: &str = "charge";
/// The charge's header on the HTTP door for Envoy, and so its key in the
/// request's metadata there (Envoy's `dynamic_metadata_from_headers` keys
/// metadata by header name, in the same namespace).
pub const HTTP_HEADER: &str = "x-tollgate-charge";

/// The oldest charge settled: an entry for an older one is refused as stale,
/// which bounds how long settled ids are remembered. Envoy sends entries
/// within a second and drops what its buffer cannot hold while tollgate is
/// away; this leaves room for a long restart.
pub const MAX_AGE: Duration = Duration::from_secs(15 * 60);

/// Settled ids are kept per account and slot of issue (ms since the epoch ÷
/// this), each slot until its last charge is older than [`MAX_AGE`].
pub const SLOT_MS: i64 = 10 * 60 * 1000;

/// How far in the future a charge may claim to be issued (replicas' clocks differ).
pub const MAX_SKEW: Duration = Duration::from_secs(300);

/// The longest header name `cost_from_response` may name.
pub const MAX_HEADER_NAME: usize = 128;

/// The response classes that are charged (`billing.charge_on`): a set of
/// `1xx`..`5xx`. Responses outside it are refunded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChargeOn(u8);

impl Default for ChargeOn {
    fn default() -> Self {
        Self::ALL
    }
}

impl ChargeOn {
    /// Every class: nothing is refunded (the default).
    pub const ALL: ChargeOn = ChargeOn(0b11111);

    /// Parses a list like `[2xx, 3xx, 4xx]`; names the first entry that is not a class.
    pub fn parse<S: AsRef<str>>(classes: &[S]) -> Result<Self, String> {
        let mut bits = 0u8;
        for c in classes {
            let c = c.as_ref();
            match c.as_bytes() {
                [d @ b'1'..=b'5', b'x', b'x'] => bits |= 1 << (d - b'1'),
                _ => return Err(format!("{c:?} is not a response class (1xx, 2xx, 3xx, 4xx or 5xx)")),
            }
        }
        Ok(ChargeOn(bits))
    }

    /// Whether a response with status `code` is charged. A missing status
    /// (0: the client left before any response) is charged: the upstream may
    /// have done the work, and hanging up must not make it free.
    pub fn charges(self, code: u32) -> bool {
        match code {
            100..=599 => self.0 & (1 << (code / 100 - 1)) != 0,
            _ => true,
        }
    }

    /// Whether every class is charged (then only a response-reported cost needs settling).
    pub fn is_all(self) -> bool {
        self == Self::ALL
    }

    /// The classes, for the config summary (`2xx,3xx`).
    pub fn describe(self) -> String {
        (1..=5u8).filter(|d| self.0 & (1 << (d - 1)) != 0).map(|d| format!("{d}xx")).collect::<Vec<_>>().join(",")
    }
}

/// What one Check spent that its response may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// Unique per Check (the once-only key of its settlement).
    pub id: String,
    /// The account charged.
    pub account: String,
    /// When it was charged (whole milliseconds): picks the windows.
    pub issued: DateTime<Utc>,
    /// The meter spent (empty when only credits were).
    pub meter: String,
    /// The calendar periods of the quotas spent.
    pub periods: Vec<Period>,
    /// Units reserved on each quota (and in credits, when `credits`).
    pub cost: u64,
    /// Whether credits were spent.
    pub credits: bool,
    /// The response header that reports the actual cost, if the route names one.
    pub cost_header: Option<String>,
    /// Shadow mode let this request through: the code that would have
    /// denied it (usage events say so, for sinks that must not bill it).
    pub shadow: Option<crate::decision::Code>,
}

/// Why an access-log entry's charge was not applied: a label for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bad {
    /// The charge's signature does not verify: not made by tollgate with this store's key.
    Signature,
    /// A field is missing or out of bounds.
    Malformed,
    /// Issued longer ago than [`MAX_AGE`] (or further ahead than [`MAX_SKEW`]).
    Stale,
    /// The cost header is not a whole number of units within `0..=MAX_COST`.
    CostHeader,
}

impl Bad {
    /// Every reason (for metrics that export zeros).
    pub const ALL: [Bad; 4] = [Bad::Signature, Bad::Malformed, Bad::Stale, Bad::CostHeader];

    /// The label (`signature`, `malformed`, `stale`, `cost_header`).
    pub fn as_str(self) -> &'static str {
        match self {
            Bad::Signature => "signature",
            Bad::Malformed => "malformed",
            Bad::Stale => "stale",
            Bad::CostHeader => "cost_header",
        }
    }
}

impl fmt::Display for Bad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the access log reports of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served<'a> {
    /// The status sent to the client; 0 when none was.
    pub code: u32,
    /// The value of the charge's cost header, when the entry carries it.
    pub cost_header: Option<&'a str>,
}

/// The most bytes a charge token may have.
pub const MAX_TOKEN: usize = 2048;

/// `%` and `|` escaped, so `|` separates fields unambiguously (meter and
/// header names may contain it; ids and numbers cannot).
fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains(['%', '|']) { s.replace('%', "%25").replace('|', "%7C").into() } else { s.into() }
}

/// [`escape`] undone; `None` for a `%` that does not start one of its two escapes.
fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let code = rest.get(i..i + 3)?;
        out.push(match code {
            "%25" => '%',
            "%7C" => '|',
            _ => return None,
        });
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// The first 16 bytes of HMAC-SHA256 over the token's signed part.
fn mac(key: &[u8; 32]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(b"tollgate-charge:");
    mac
}

impl Charge {
    /// The charge as one metadata string (cheap for Envoy to copy into every
    /// access-log entry): `1|id|account|issued ms|meter|periods|cost|credits
    /// 0/1|header|sig`, `sig` the hex of the first 16 bytes of HMAC-SHA256
    /// over everything before it. A charge shadow mode let through is
    /// version 2, with the would-be code after the header (`2|…|header|code|sig`);
    /// the others stay version 1, which replicas of before shadow mode read.
    pub fn seal(&self, key: &[u8; 32]) -> String {
        let periods = self.periods.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(",");
        let mut token = format!(
            "{}|{}|{}|{}|{}|{periods}|{}|{}|{}",
            if self.shadow.is_some() { 2 } else { 1 },
            self.id,
            self.account,
            self.issued.timestamp_millis(),
            escape(&self.meter),
            self.cost,
            u8::from(self.credits),
            escape(self.cost_header.as_deref().unwrap_or("")),
        );
        if let Some(code) = self.shadow {
            token.push('|');
            token.push_str(code.as_str());
        }
        let mut m = mac(key);
        m.update(token.as_bytes());
        let tag = m.finalize().into_bytes();
        token.push('|');
        token.push_str(&hex::encode(&tag[..16]));
        token
    }

    /// The charge a token carries, if its signature verifies and every field is within bounds.
    pub fn open(token: &str, key: &[u8; 32]) -> Result<Charge, Bad> {
        if token.len() > MAX_TOKEN {
            return Err(Bad::Malformed);
        }
        let (signed, sig) = token.rsplit_once('|').ok_or(Bad::Malformed)?;
        let sig = hex::decode(sig).map_err(|_| Bad::Signature)?;
        if sig.len() != 16 {
            return Err(Bad::Signature);
        }
        let mut m = mac(key);
        m.update(signed.as_bytes());
        m.verify_truncated_left(&sig).map_err(|_| Bad::Signature)?;
        // Signed by us, so well-formed unless the key leaked or a bug; checked all the same.
        let fields: Vec<&str> = signed.split('|').collect();
        let (id, account, issued, meter, periods, cost, credits, header, shadow) = match fields[..] {
            ["1", id, account, issued, meter, periods, cost, credits, header] => {
                (id, account, issued, meter, periods, cost, credits, header, None)
            }
            ["2", id, account, issued, meter, periods, cost, credits, header, code] => {
                (id, account, issued, meter, periods, cost, credits, header, Some(code))
            }
            _ => return Err(Bad::Malformed),
        };
        let shadow = match shadow {
            None => None,
            Some(code) => Some(crate::decision::Code::parse(code).ok_or(Bad::Malformed)?),
        };
        let (meter, header) = (unescape(meter).ok_or(Bad::Malformed)?, unescape(header).ok_or(Bad::Malformed)?);
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(Bad::Malformed);
        }
        if !is_valid_account_id(account) || !(meter.is_empty() || is_valid_name(&meter)) {
            return Err(Bad::Malformed);
        }
        let issued = issued
            .parse::<i64>()
            .ok()
            .and_then(DateTime::<Utc>::from_timestamp_millis)
            .filter(|t| crate::entitlement::is_valid_time(*t))
            .ok_or(Bad::Malformed)?;
        let periods = match periods {
            "" => Vec::new(),
            s => s.split(',').map(Period::parse).collect::<Option<Vec<_>>>().ok_or(Bad::Malformed)?,
        };
        if periods.len() > 4 || (meter.is_empty() && !periods.is_empty()) {
            return Err(Bad::Malformed);
        }
        let cost = cost.parse::<u64>().ok().filter(|c| *c <= MAX_COST).ok_or(Bad::Malformed)?;
        let credits = match credits {
            "0" => false,
            "1" => true,
            _ => return Err(Bad::Malformed),
        };
        let cost_header = match header.as_str() {
            "" => None,
            h if is_header_name(h) => Some(header),
            _ => return Err(Bad::Malformed),
        };
        Ok(Charge {
            id: id.to_owned(),
            account: account.to_owned(),
            issued,
            meter,
            periods,
            cost,
            credits,
            cost_header,
            shadow,
        })
    }
}

/// Whether `name` can be a `cost_from_response` header: a lower-case HTTP
/// token of 1–128 bytes (Envoy logs header names in lower case).
pub fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HEADER_NAME
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parses a response-reported cost: decimal digits (ASCII spaces around
/// them allowed), at most [`MAX_COST`]. Signs, fractions, exponents, lists
/// and empty values are refused.
pub fn parse_cost(value: &str) -> Option<u64> {
    let v = value.trim_matches(' ');
    if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u64>().ok().filter(|c| *c <= MAX_COST)
}

/// What `charge` really costs now that `served` is known, as the adjustment
/// to make. One that costs what was reserved is an adjustment of 0 all the
/// same: the store records its id, so no later entry for the charge (a replay
/// claiming another status) can change it.
pub fn settle(charge: &Charge, served: Served<'_>, charge_on: ChargeOn, now: DateTime<Utc>) -> Result<Adjustment, Bad> {
    let age = now.signed_duration_since(charge.issued);
    let too_old = chrono::Duration::from_std(MAX_AGE).is_ok_and(|max| age > max);
    let too_new = chrono::Duration::from_std(MAX_SKEW).is_ok_and(|max| -age > max);
    if too_old || too_new {
        return Err(Bad::Stale);
    }
    let actual = if !charge_on.charges(served.code) {
        0
    } else {
        match (&charge.cost_header, served.cost_header) {
            // The response did not say (or the header was not logged): the reservation stands.
            (None, _) | (Some(_), None) => charge.cost,
            (Some(_), Some(v)) => parse_cost(v).ok_or(Bad::CostHeader)?,
        }
    };
    // Both within 0..=MAX_COST, so the difference fits with room to spare.
    let delta = i64::try_from(actual).unwrap_or(i64::MAX) - i64::try_from(charge.cost).unwrap_or(i64::MAX);
    // Ids are kept per account and slot of issue: until the last charge of
    // that slot is too old to settle.
    let slot_end = (charge.issued.timestamp_millis().div_euclid(SLOT_MS) + 1) * SLOT_MS;
    let remember_until = DateTime::<Utc>::from_timestamp_millis(slot_end).unwrap_or(charge.issued)
        + chrono::Duration::from_std(MAX_AGE + MAX_SKEW).unwrap_or_else(|_| chrono::Duration::hours(1));
    Ok(Adjustment {
        account: charge.account.clone(),
        charge: charge.id.clone(),
        issued: charge.issued,
        meter: charge.meter.clone(),
        periods: charge.periods.clone(),
        delta,
        credits: charge.credits,
        remember_until,
        event: None,
        marks: Vec::new(),
        outbox_limit: 0,
    })
}

#[cfg(test)]
mod tests;
