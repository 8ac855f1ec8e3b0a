//! Validation: [`schema::Config`] → [`Config`], one function per section, and
//! the field rules more than one section shares.
//!
//! The sections run in a fixed order and the first error wins, so a file with
//! two mistakes always reports the same one: server (listeners, tokens, TLS,
//! limits), store, cache, identity, plans, accounts, routes, billing.stripe,
//! problems, billing.grace_period.
//!
//! May use [`super::schema`], [`super::policy`], the `validate_*` files and
//! `decision` (the [`Policy`] it assembles); the rules here use `bounds`.

use std::time::Duration;

use super::policy::BillingConfig;
use super::{Config, schema, validate_policy, validate_settings};
use crate::decision::Policy;

/// A rule broken: the field path and the reason.
pub(super) type Invalid = (String, String);

/// An [`Invalid`] from anything string-like.
pub(super) fn invalid(path: impl Into<String>, reason: impl Into<String>) -> Invalid {
    (path.into(), reason.into())
}

impl schema::Config {
    /// Checks every section in order; see the module doc.
    pub(super) fn validate(self) -> Result<Config, Invalid> {
        let server = validate_settings::server(&self.server)?;
        let store = validate_settings::store(self.store)?;
        let cache = validate_settings::cache(&self.cache)?;
        let identity = validate_settings::identity(self.identity)?;
        let plans = validate_policy::plans(&self.plans)?;
        let accounts = validate_policy::accounts(&self.accounts, &plans)?;
        let routes = validate_policy::routes(self.routes, &plans, &accounts)?;
        let stripe = validate_policy::stripe(self.billing.stripe, &plans)?;
        let problems = validate_policy::problems(self.problems)?;
        let grace_period = validate_policy::grace_period(self.billing.grace_period)?;
        let charge_on = validate_policy::charge_on(self.billing.charge_on)?;
        let events = super::events::validate(self.events, &plans)?;
        let tracing = validate_settings::tracing(self.tracing)?;
        let x402 = super::x402::settings(self.x402, &self.plans, &routes)?;
        Ok(Config {
            server,
            store,
            cache,
            identity,
            billing: BillingConfig { portal_url: self.billing.portal_url, stripe, charge_on },
            policy: Policy {
                plans,
                grace_period,
                unmatched: self.default.into(),
                shadow: self.shadow,
                shadow_security: self.shadow_security,
            },
            routes,
            non_http: self.non_http.into(),
            accounts,
            problems,
            events,
            tracing,
            x402,
        })
    }
}

/// A bounded setting, shown in errors as it is written in YAML.
pub(super) trait Bounded: PartialOrd + Copy {
    fn show(self) -> String;
}

macro_rules! bounded_number {
    ($($t:ty),*) => { $(impl Bounded for $t { fn show(self) -> String { self.to_string() } })* };
}
bounded_number!(u32, u64, usize);

impl Bounded for Duration {
    fn show(self) -> String {
        humantime::format_duration(self).to_string()
    }
}

/// `value` (or `default`) if it lies in `min..=max`.
pub(super) fn bounded<T: Bounded>(value: Option<T>, default: T, min: T, max: T, path: &str) -> Result<T, Invalid> {
    let v = value.unwrap_or(default);
    if v < min || v > max {
        return Err(invalid(path, format!("must be between {} and {}, got {}", min.show(), max.show(), v.show())));
    }
    Ok(v)
}

/// An `http://` or `https://` URL with a host, at most 2048 bytes (a place tollgate calls).
pub(super) fn http_url(url: &str, path: &str) -> Result<(), Invalid> {
    let ok = url.len() <= 2048
        && url
            .parse::<hyper::Uri>()
            .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some_and(|h| !h.is_empty()));
    if ok { Ok(()) } else { Err(invalid(path, format!("{url:?} is not an http:// or https:// URL"))) }
}

pub(super) fn positive(d: Duration, path: &str) -> Result<Duration, Invalid> {
    if d.is_zero() { Err(invalid(path, "must be greater than zero")) } else { Ok(d) }
}

/// A plan, meter or feature name: 1-128 bytes, no control characters (names become Redis key parts).
pub(super) fn name(value: &str, path: &str) -> Result<(), Invalid> {
    if !crate::bounds::is_valid_name(value) {
        return Err(invalid(path, format!("must be 1-{} bytes without control characters", crate::bounds::MAX_NAME)));
    }
    Ok(())
}

/// "unknown plan "x" (known: a, b)": a reference to something not defined.
pub(super) fn unknown<'a>(what: &str, name: &str, known: impl Iterator<Item = impl AsRef<str> + 'a>) -> String {
    let mut known: Vec<String> = known.map(|k| k.as_ref().to_owned()).collect();
    known.sort();
    format!("unknown {what} {name:?} (known: {})", known.join(", "))
}
