//! Validation of the billing rules: `plans:`, `accounts:`, `routes:`,
//! `billing.stripe`, `problems:` and `billing.grace_period`, one function per
//! section, each returning the first rule broken. Later sections check their
//! references against earlier ones (an account's plan, a route's feature, a
//! Stripe price's plan).
//!
//! May use [`super::schema`], [`super::policy`], [`super::secrets`], the shared
//! rules in [`super::validate`], [`super::validate_quotas`] and the domain
//! modules (`entitlement`, `route`, `decision`, `identity`, `bounds`, `usage`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::policy::{ProblemsConfig, SeedAccount, StripeConfig};
use super::schema::{self, AccountDef, PlanDef, RouteDef};
use super::secrets;
use super::validate::{Invalid, invalid, name, positive, unknown};
use super::validate_quotas::quotas;
use crate::decision::{Code, Plans};
use crate::entitlement::{Account, MAX_WINDOW, Plan, Status};
use crate::route::{Route, RouteMatch, RouteTable};
use crate::settlement::ChargeOn;
use crate::usage::{MAX_COST, MAX_CREDITS};

/// `plans:`: at least one, each with valid feature names and quotas.
pub(super) fn plans(raw: &BTreeMap<String, PlanDef>) -> Result<Plans, Invalid> {
    if raw.is_empty() {
        return Err(invalid("plans", "at least one plan is needed"));
    }
    let mut plans = Plans::default();
    for (plan_name, def) in raw {
        let p = format!("plans.{plan_name}");
        name(plan_name, &p)?;
        let mut features = BTreeSet::new();
        for (i, f) in def.features.iter().enumerate() {
            if f.trim().is_empty() {
                return Err(invalid(format!("{p}.features[{i}]"), "must not be empty"));
            }
            name(f, &format!("{p}.features[{i}]"))?;
            features.insert(f.clone());
        }
        let plan = Plan {
            name: plan_name.clone(),
            features,
            quotas: quotas(&def.quotas, &format!("{p}.quotas"))?,
            prepaid: def.prepaid,
            shadow: def.shadow,
        };
        plans.insert(plan_name.clone(), plan);
    }
    Ok(plans)
}

/// `accounts:`: unique ids and API keys, a known plan, bounded credits, dates and overrides.
pub(super) fn accounts(raw: &[AccountDef], plans: &Plans) -> Result<Vec<SeedAccount>, Invalid> {
    let mut accounts = Vec::with_capacity(raw.len());
    let mut ids = HashSet::new();
    let mut keys = HashSet::new();
    for (i, a) in raw.iter().enumerate() {
        let p = format!("accounts[{i}]");
        account_id(&a.id, &format!("{p}.id"))?;
        if !ids.insert(a.id.as_str()) {
            return Err(invalid(format!("{p}.id"), format!("duplicate account {:?}", a.id)));
        }
        if !plans.contains_key(&a.plan) {
            return Err(invalid(format!("{p}.plan"), unknown("plan", &a.plan, plans.keys())));
        }
        for (k, key) in a.api_keys.iter().enumerate() {
            if !crate::identity::is_valid_key(key) {
                return Err(invalid(
                    format!("{p}.api_keys[{k}]"),
                    format!("must be 1-{} visible ASCII characters, without spaces", crate::identity::MAX_KEY_BYTES),
                ));
            }
            if !keys.insert(key.as_str()) {
                // Never echo the key itself.
                return Err(invalid(format!("{p}.api_keys[{k}]"), "duplicate API key (already used above)"));
            }
        }
        if a.status == Status::PastDue && a.past_due_since.is_none() {
            return Err(invalid(format!("{p}.past_due_since"), "required when status is past_due"));
        }
        if a.credits < 0 || a.credits as u64 > MAX_CREDITS {
            return Err(invalid(format!("{p}.credits"), format!("must be between 0 and {MAX_CREDITS}")));
        }
        for (k, f) in a.features.iter().enumerate() {
            name(f, &format!("{p}.features[{k}]"))?;
        }
        if a.features.len() > crate::bounds::MAX_ITEMS || a.quotas.len() > crate::bounds::MAX_ITEMS {
            return Err(invalid(p, format!("at most {} features and quotas", crate::bounds::MAX_ITEMS)));
        }
        date(a.past_due_since, &format!("{p}.past_due_since"))?;
        if let Some(c) = a.stripe_customer.as_deref().filter(|c| !crate::bounds::is_valid_customer_id(c)) {
            return Err(invalid(format!("{p}.stripe_customer"), format!("{c:?} is not 1-255 of A-Z a-z 0-9 _")));
        }
        date(a.expires_at, &format!("{p}.expires_at"))?;
        accounts.push(SeedAccount {
            account: Account {
                id: a.id.as_str().into(),
                plan: a.plan.as_str().into(),
                status: a.status,
                past_due_since: a.past_due_since,
                expires_at: a.expires_at,
                blocked: a.blocked,
                extra_features: a.features.iter().cloned().collect(),
                quota_overrides: quotas(&a.quotas, &format!("{p}.quotas"))?,
                stripe_customer: a.stripe_customer.clone(),
                billing_event_at: None,
            },
            api_keys: a.api_keys.clone(),
            credits: a.credits as u64,
        });
    }
    Ok(accounts)
}

fn account_id(id: &str, path: &str) -> Result<(), Invalid> {
    if !crate::entitlement::is_valid_account_id(id) {
        return Err(invalid(path, format!("{id:?} is not a valid account id (1-128 of A-Z a-z 0-9 _ - . : @)")));
    }
    Ok(())
}

/// A date inside what every way in accepts.
fn date(t: Option<DateTime<Utc>>, path: &str) -> Result<Option<DateTime<Utc>>, Invalid> {
    match t {
        Some(t) if !crate::entitlement::is_valid_time(t) => {
            Err(invalid(path, "must be between 1970-01-01 and 9999-12-31"))
        }
        t => Ok(t),
    }
}

/// `routes:`: one normal-form path matcher (or a host), HTTP methods, a
/// feature some plan or account has, a bounded cost; public routes take none.
pub(super) fn routes(raw: Vec<RouteDef>, plans: &Plans, accounts: &[SeedAccount]) -> Result<RouteTable, Invalid> {
    let known_features: BTreeSet<&str> = plans
        .values()
        .flat_map(|p| p.features.iter())
        .chain(accounts.iter().flat_map(|a| a.account.extra_features.iter()))
        .map(String::as_str)
        .collect();
    let mut routes = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let p = format!("routes[{i}]");
        let m = r.matcher;
        for (name, v) in [("path_prefix", &m.path_prefix), ("path", &m.path), ("string_prefix", &m.string_prefix)] {
            if let Some(v) = v
                && let Err(e) = crate::route::check_path(v)
            {
                // A route in another form could never match: tollgate refuses such paths.
                return Err(invalid(format!("{p}.match.{name}"), format!("{v:?}: {e} (routes match normal paths)")));
            }
        }
        if [&m.path_prefix, &m.path, &m.string_prefix].iter().filter(|v| v.is_some()).count() > 1 {
            return Err(invalid(format!("{p}.match"), "set one of path_prefix, path, string_prefix"));
        }
        if m.path_prefix.is_none() && m.path.is_none() && m.string_prefix.is_none() && m.host.is_none() {
            return Err(invalid(
                format!("{p}.match"),
                "needs path_prefix, path, string_prefix or host (path_prefix: / matches all)",
            ));
        }
        let mut methods = Vec::with_capacity(m.methods.len());
        for (k, method) in m.methods.iter().enumerate() {
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
                return Err(invalid(format!("{p}.match.methods[{k}]"), format!("{method:?} is not an HTTP method")));
            }
            methods.push(method.to_ascii_uppercase());
        }
        if r.public && (r.feature.is_some() || r.meter.is_some() || r.cost.is_some() || r.cost_from_response.is_some())
        {
            return Err(invalid(p, "a public route takes no feature, meter, cost or cost_from_response"));
        }
        if r.public && r.shadow == Some(true) {
            return Err(invalid(format!("{p}.shadow"), "a public route has no paywall to shadow"));
        }
        if let Some(h) = &r.cost_from_response
            && !crate::settlement::is_header_name(h)
        {
            return Err(invalid(
                format!("{p}.cost_from_response"),
                format!(
                    "{h:?} is not a lower-case HTTP header name of at most {} bytes",
                    crate::settlement::MAX_HEADER_NAME
                ),
            ));
        }
        if let Some(f) = &r.feature
            && !known_features.contains(f.as_str())
        {
            return Err(invalid(format!("{p}.feature"), unknown("feature", f, known_features.iter())));
        }
        let cost = r.cost.unwrap_or(1);
        if cost < 0 || cost as u64 > MAX_COST {
            return Err(invalid(format!("{p}.cost"), format!("must be between 0 and {MAX_COST}")));
        }
        let matcher = RouteMatch {
            path_prefix: m.path_prefix,
            string_prefix: m.string_prefix,
            path: m.path,
            methods,
            host: m.host.map(|h| h.to_ascii_lowercase()),
        };
        let mut route = Route::new(i, matcher, r.public, r.feature, r.meter, cost as u64);
        route.cost_from_response = r.cost_from_response;
        route.shadow = r.shadow;
        route.x402 = super::x402::route(r.x402, r.public, &p)?;
        routes.push(route);
    }
    Ok(RouteTable::new(routes))
}

/// `billing.charge_on`: response classes (`2xx`); absent means all of them.
pub(super) fn charge_on(raw: Option<Vec<String>>) -> Result<ChargeOn, Invalid> {
    match raw {
        None => Ok(ChargeOn::ALL),
        // An empty list would refund every response: every request free.
        Some(list) if list.is_empty() => {
            Err(invalid("billing.charge_on", "name at least one class (e.g. [2xx, 3xx, 4xx])"))
        }
        Some(list) => ChargeOn::parse(&list).map_err(|e| invalid("billing.charge_on", e)),
    }
}

/// `billing.stripe`: prices name known plans; signing secrets are the
/// environment's then the listed ones ([`secrets::merge`]).
pub(super) fn stripe(raw: Option<schema::Stripe>, plans: &Plans) -> Result<Option<StripeConfig>, Invalid> {
    let Some(s) = raw else { return Ok(None) };
    for (price, plan) in &s.prices {
        if !plans.contains_key(plan) {
            return Err(invalid(format!("billing.stripe.prices.{price}"), unknown("plan", plan, plans.keys())));
        }
    }
    let account_from = s.account_from.unwrap_or_else(|| "customer".into());
    if account_from != "customer" && account_from.strip_prefix("metadata:").is_none_or(|k| k.is_empty()) {
        return Err(invalid("billing.stripe.account_from", "must be customer or metadata:<key>"));
    }
    let secrets =
        secrets::merge(&s.webhook_secrets, s.webhook_secrets_env.as_deref(), "TOLLGATE_STRIPE_WEBHOOK_SECRETS");
    Ok(Some(StripeConfig {
        webhook_secrets_env: secrets.env,
        webhook_secrets: secrets.secrets,
        features: s.features,
        tolerance: positive(s.tolerance.unwrap_or(Duration::from_secs(300)), "billing.stripe.tolerance")?,
        account_from,
        prices: s.prices,
    }))
}

/// `problems:`: overrides keyed by a known code.
pub(super) fn problems(raw: schema::Problems) -> Result<ProblemsConfig, Invalid> {
    let mut overrides = HashMap::new();
    for (code, o) in raw.overrides {
        let Some(c) = Code::parse(&code) else {
            let codes: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
            return Err(invalid(
                format!("problems.overrides.{code}"),
                format!("unknown code (known: {})", codes.join(", ")),
            ));
        };
        overrides.insert(c, o);
    }
    Ok(ProblemsConfig { type_base: raw.type_base.unwrap_or_else(|| "urn:tollgate:problem:".into()), overrides })
}

/// `billing.grace_period`: at most 366d; 72h when unset.
pub(super) fn grace_period(raw: Option<Duration>) -> Result<Duration, Invalid> {
    match raw {
        Some(g) if g > MAX_WINDOW => Err(invalid("billing.grace_period", "must be at most 366d")),
        g => Ok(g.unwrap_or(Duration::from_secs(72 * 3600))),
    }
}
