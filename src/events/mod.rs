//! Usage and threshold events as CloudEvents 1.0 JSON, built as pure
//! functions; [`delivery`] sends them.
//!
//! A settled charge makes one **usage** event (`com.tollgate.usage`) whose id
//! is the charge id, so a sink that deduplicates by id (OpenMeter does, by
//! id and source) counts each request once however often it is delivered.
//! Its `data.units` is what the request finally cost (after any refund or
//! reported cost); the sum of units over an account's events equals what the
//! settled charges left on its counters. **Threshold** events
//! (`com.tollgate.quota.threshold`, `com.tollgate.credits.low`) have ids
//! made of account, meter, window and level, and fire once per window (per
//! UTC day for credits) across replicas: the store sets a mark in the same
//! atomic step. No I/O, no clock reads. Depends on `settlement`, `usage`,
//! `entitlement` and `config` (the levels).

pub mod delivery;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::json;

use crate::config::Levels;
use crate::entitlement::Period;
use crate::settlement::Charge;
use crate::usage::Mark;

/// The type of a usage event.
pub const USAGE: &str = "com.tollgate.usage";
/// The type of a quota-threshold event.
pub const QUOTA_THRESHOLD: &str = "com.tollgate.quota.threshold";
/// The type of a low-credit event.
pub const CREDITS_LOW: &str = "com.tollgate.credits.low";
/// The type of an x402 payment event.
pub const PAYMENT: &str = "com.tollgate.payment";
/// The content type of a batch POST.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn envelope(kind: &str, id: &str, source: &str, subject: &str, time: DateTime<Utc>, data: serde_json::Value) -> String {
    json!({
        "specversion": "1.0",
        "type": kind,
        "id": id,
        "source": source,
        "subject": subject,
        "time": rfc3339(time),
        "datacontenttype": "application/json",
        "data": data,
    })
    .to_string()
}

/// The usage event of a settled charge: `units` is its final cost, `status`
/// the response's (0: none was sent), and `shadow` the would-be code when
/// shadow mode let a request through that the paywall would have denied.
pub fn usage(source: &str, charge: &Charge, status: u32, units: u64) -> String {
    let mut data = json!({
        "meter": charge.meter,
        "units": units,
        "reserved": charge.cost,
        "credits": if charge.credits { units } else { 0 },
        "status": status,
    });
    // Shadow mode let the request through: a sink that bills must know.
    if let (Some(code), Some(fields)) = (charge.shadow, data.as_object_mut()) {
        fields.insert("shadow".into(), code.as_str().into());
    }
    envelope(USAGE, &charge.id, source, &charge.account, charge.issued, data)
}

/// What an x402 payment settled, for its event.
#[derive(Debug, Clone, Copy)]
pub struct PaymentFacts<'a> {
    /// The event id (the payment's replay key: one event per payment).
    pub id: &'a str,
    /// The account the call was made for, when the caller had one.
    pub account: Option<&'a str>,
    /// The route (its matcher as configured).
    pub route: &'a str,
    /// Who paid, the transaction, where, what and how much (atomic units).
    pub payer: &'a str,
    /// The settlement's transaction.
    pub transaction: &'a str,
    /// CAIP-2 network.
    pub network: &'a str,
    /// The asset.
    pub asset: &'a str,
    /// Atomic units paid.
    pub amount: u64,
    /// When it settled.
    pub time: DateTime<Utc>,
}

/// The event of a settled x402 payment (one paid call); its subject is the
/// account, else the payer.
pub fn payment(source: &str, p: PaymentFacts<'_>) -> String {
    let mut data = json!({
        "route": p.route,
        "payer": p.payer,
        "transaction": p.transaction,
        "network": p.network,
        "asset": p.asset,
        "amount": p.amount.to_string(),
    });
    if let (Some(account), Some(fields)) = (p.account, data.as_object_mut()) {
        fields.insert("account".into(), account.into());
    }
    envelope(PAYMENT, p.id, source, p.account.unwrap_or(p.payer), p.time, data)
}

/// The threshold marks to test when `charge` settles: each level of `levels`
/// on each calendar quota it spent (`limits[i]` is the limit of
/// `charge.periods[i]`, `None` when the account has no such quota now), and
/// the credit level if it spent credits.
pub fn marks(source: &str, charge: &Charge, limits: &[Option<u64>], levels: &Levels, now: DateTime<Utc>) -> Vec<Mark> {
    let mut out = Vec::new();
    for (i, (period, limit)) in charge.periods.iter().zip(limits).enumerate() {
        let Some(limit) = *limit else { continue };
        let (start, end) = period.bounds(charge.issued);
        let start_ms = start.timestamp_millis();
        for &permille in &levels.quota {
            // limit ≤ MAX_LIMIT (10^15) and permille ≤ 1000: no overflow; rounded up.
            let at = (u128::from(limit) * u128::from(permille)).div_ceil(1000);
            let at = u64::try_from(at).unwrap_or(u64::MAX).max(1);
            let id = format!("{}/{}/{}/{start_ms}/{permille}", charge.account, charge.meter, period.as_str());
            let data = json!({
                "meter": charge.meter,
                "period": period.as_str(),
                "fraction": f64::from(permille) / 1000.0,
                "limit": limit,
                "threshold": at,
                "window_start": rfc3339(start),
                "resets_at": rfc3339(end),
            });
            out.push(Mark {
                counter: Some(i),
                at,
                name: format!("{}:{}:{start_ms}:{permille}", charge.meter, period.as_str()),
                until: end + chrono::Duration::minutes(1),
                event: envelope(QUOTA_THRESHOLD, &id, source, &charge.account, now, data),
            });
        }
    }
    if let (true, Some(level)) = (charge.credits, levels.credits_below) {
        let (day, next) = Period::Day.bounds(now);
        let day_ms = day.timestamp_millis();
        let id = format!("{}/credits/{level}/{day_ms}", charge.account);
        let data = json!({ "level": level, "day": rfc3339(day) });
        out.push(Mark {
            counter: None,
            at: level,
            name: format!("credits:{level}:{day_ms}"),
            until: next,
            event: envelope(CREDITS_LOW, &id, source, &charge.account, now, data),
        });
    }
    out
}

/// The body of a batch POST: the events as one JSON array.
pub fn batch<'a>(events: impl IntoIterator<Item = &'a str>) -> String {
    let mut body = String::from("[");
    for (i, e) in events.into_iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(e);
    }
    body.push(']');
    body
}

/// When an event happened (its `time`), for the delivery lag.
pub fn time_of(event: &str) -> Option<DateTime<Utc>> {
    #[derive(serde::Deserialize)]
    struct T {
        time: DateTime<Utc>,
    }
    serde_json::from_str::<T>(event).ok().map(|t| t.time)
}

/// The `Tollgate-Signature` header of a body sent at `t` (Unix seconds):
/// `t=<t>,v1=<hex HMAC-SHA256 over "<t>.<body>">`, Stripe's scheme, so a
/// receiver can reuse its verification code (and refuse old timestamps).
pub fn signature(secret: &str, t: i64, body: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests;
