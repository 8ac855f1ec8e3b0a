//! `x402:` (and the `x402:` of plans and routes): where payments go, the
//! per-call prices, which routes take payment from callers without an account.
//!
//! Every string that goes into the challenge is bounded here (it reaches
//! clients base64-encoded in a header): CAIP-2 network, asset and payee of at
//! most 128 characters of `[A-Za-z0-9._:-]`, at most 8 `extra` pairs.
//! May use [`super::validate`]'s field rules and `x402`'s types.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::schema;
use super::validate::{Invalid, bounded, http_url, invalid};
use crate::route::RouteTable;
use crate::x402::{OnFacilitatorError, Price, RouteX402, Settings};

/// Most `x402.extra` pairs.
const MAX_EXTRA: usize = 8;

/// An identifier for the challenge: 1-128 characters of `[A-Za-z0-9._:-]`.
fn ident(value: &str, path: &str) -> Result<String, Invalid> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(value.to_owned())
    } else {
        Err(invalid(path, format!("{value:?}: 1-128 characters of A-Z a-z 0-9 . _ : -")))
    }
}

/// A CAIP-2 chain id: `namespace:reference` (`eip155:8453`, `solana:5eykt4…`).
fn network(value: &str) -> Result<String, Invalid> {
    let path = "x402.network";
    let ok = value.split_once(':').is_some_and(|(ns, reference)| {
        (3..=8).contains(&ns.len())
            && ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && (1..=32).contains(&reference.len())
            && reference.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if ok {
        Ok(value.to_owned())
    } else {
        Err(invalid(path, format!("{value:?} is not a CAIP-2 chain id (e.g. eip155:8453)")))
    }
}

/// A per-call price in atomic units.
pub(super) fn price(def: &schema::PriceDef, path: &str) -> Result<Price, Invalid> {
    let text = match def {
        schema::PriceDef::Text(s) => s.clone(),
        schema::PriceDef::Number(n) => n.to_string(),
    };
    Price::parse(&text).ok_or_else(|| {
        invalid(path, format!("{text:?}: a whole number of the asset's atomic units, 1 to {}", crate::x402::MAX_PRICE))
    })
}

/// A route's `x402:`; `public` routes take none, `payable` needs the route's own price.
pub(super) fn route(def: Option<schema::RouteX402Def>, public: bool, p: &str) -> Result<Option<RouteX402>, Invalid> {
    let Some(def) = def else { return Ok(None) };
    if public {
        return Err(invalid(format!("{p}.x402"), "a public route is free: it takes no payment"));
    }
    let price = def.price.as_ref().map(|d| price(d, &format!("{p}.x402.price"))).transpose()?;
    if def.payable && price.is_none() {
        return Err(invalid(
            format!("{p}.x402.payable"),
            "needs the route's own price (x402.price): a caller without an account has no plan",
        ));
    }
    if price.is_none() {
        return Err(invalid(
            format!("{p}.x402"),
            "set price (and payable: true to let callers without an account pay)",
        ));
    }
    Ok(Some(RouteX402 { price, payable: def.payable }))
}

/// `x402:`, the plans' prices; a plan or route that prices calls needs this section.
pub(super) fn settings(
    raw: Option<schema::X402Def>,
    plans: &BTreeMap<String, schema::PlanDef>,
    routes: &RouteTable,
) -> Result<Option<Arc<Settings>>, Invalid> {
    let Some(raw) = raw else {
        if let Some((name, _)) = plans.iter().find(|(_, p)| p.x402.is_some()) {
            return Err(invalid(
                format!("plans.{name}.x402"),
                "needs the top-level x402 section (facilitator, network, asset, pay_to)",
            ));
        }
        if let Some(r) = routes.routes().iter().find(|r| r.x402.is_some()) {
            return Err(invalid(
                format!("routes[{}].x402", r.index),
                "needs the top-level x402 section (facilitator, network, asset, pay_to)",
            ));
        }
        return Ok(None);
    };
    http_url(&raw.facilitator.url, "x402.facilitator.url")?;
    let timeout = bounded(
        raw.facilitator.timeout,
        Duration::from_secs(2),
        Duration::from_millis(10),
        Duration::from_secs(30),
        "x402.facilitator.timeout",
    )?;
    let scheme = raw.scheme.unwrap_or_else(|| "exact".into());
    if scheme != "exact" {
        return Err(invalid("x402.scheme", format!("{scheme:?}: only exact is supported")));
    }
    let max_timeout_seconds = bounded(raw.max_timeout_seconds, 60, 1, 3600, "x402.max_timeout_seconds")? as u32;
    if raw.extra.len() > MAX_EXTRA {
        return Err(invalid("x402.extra", format!("at most {MAX_EXTRA} entries")));
    }
    let mut extra = BTreeMap::new();
    for (k, v) in raw.extra {
        let path = format!("x402.extra.{k}");
        extra.insert(ident(&k, &path)?, ident(&v, &path)?);
    }
    let on_facilitator_error = match raw.on_facilitator_error.as_deref() {
        None | Some("unavailable") => OnFacilitatorError::Unavailable,
        Some("payment_required") => OnFacilitatorError::PaymentRequired,
        Some(other) => {
            return Err(invalid(
                "x402.on_facilitator_error",
                format!("{other:?}: unavailable (503) or payment_required (402)"),
            ));
        }
    };
    let mut plan_prices = BTreeMap::new();
    for (name, plan) in plans {
        if let Some(def) = &plan.x402 {
            plan_prices.insert(name.clone(), price(&def.price, &format!("plans.{name}.x402.price"))?);
        }
    }
    Ok(Some(Arc::new(Settings {
        facilitator: raw.facilitator.url,
        timeout,
        scheme,
        network: network(&raw.network)?,
        asset: ident(&raw.asset, "x402.asset")?,
        pay_to: ident(&raw.pay_to, "x402.pay_to")?,
        max_timeout_seconds,
        extra,
        on_facilitator_error,
        plan_prices,
    })))
}
