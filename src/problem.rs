//! Turns a [`Decision`] into what the client and the upstream see: the RFC 9457
//! problem body, `Link`, `Retry-After`, `RateLimit`/`RateLimit-Policy`
//! (draft-ietf-httpapi-ratelimit-headers-10 Structured Fields), `WWW-Authenticate`,
//! and the headers for the upstream. Pure: `now` is an argument.
//!
//! The one place decisions become responses, so both transports (Envoy's
//! ext_authz and `tollgate.v1.Authorize`) answer with the same words.
//!
//! May use: `decision`, `entitlement`, `identity` (credential header names), `config`
//! (problem overrides, billing links), `x402` (its header names).

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::config::{Config, RemoveOwnHeaders};
use crate::decision::{AllowKind, Code, Decision, QuotaState, Verdict};
use crate::entitlement::{Period, Window};
use crate::identity::IdentitySource;

/// The prefix of every header tollgate sets; the client's copies never reach the upstream.
pub const HEADER_PREFIX: &str = "x-tollgate-";
/// Header telling the upstream which account is calling.
pub const ACCOUNT_HEADER: &str = "x-tollgate-account";
/// Header telling the upstream the account's plan.
pub const PLAN_HEADER: &str = "x-tollgate-plan";
/// Header warning the client (and upstream) of a failed payment inside its grace period.
pub const BILLING_WARNING_HEADER: &str = "x-tollgate-billing-warning";
/// Header marking a request let through because the store failed (`on_error: allow`).
pub const DEGRADED_HEADER: &str = "x-tollgate-degraded";
/// Header telling the upstream the code that would have denied a request shadow mode let through.
pub const SHADOW_HEADER: &str = "x-tollgate-shadow";
/// Header telling the upstream the request went past a soft quota's limit (overage).
pub const OVERAGE_HEADER: &str = "x-tollgate-overage";
/// Header telling the upstream who paid for a call through x402.
pub const PAYER_HEADER: &str = "x-tollgate-payer";
/// Header telling the upstream the x402 settlement (`network=…; transaction=…; amount=…`).
pub const PAYMENT_HEADER: &str = "x-tollgate-payment";
/// Every header tollgate may set for the upstream: an allow that does not
/// set one removes the client's copy (`server.remove_own_headers`).
pub const OWN_HEADERS: [&str; 8] = [
    ACCOUNT_HEADER,
    PLAN_HEADER,
    DEGRADED_HEADER,
    BILLING_WARNING_HEADER,
    SHADOW_HEADER,
    OVERAGE_HEADER,
    PAYER_HEADER,
    PAYMENT_HEADER,
];

/// The own headers an allow removes when it does not set them even when the
/// proxy shows tollgate every `x-tollgate-*` header (`remove_own_headers:
/// seen`, or `auto` on the proxy's word): routes match on them (route by
/// plan), and an answer that changes no header leaves Envoy on the route it
/// chose before its edge filter removed a client's forged copy
/// (`clear_route_cache` acts only on answers that change headers). An allow
/// of an account sets both, so only allows without one (public routes) pay
/// for the two removals.
pub const ROUTED_HEADERS: [&str; 2] = [ACCOUNT_HEADER, PLAN_HEADER];

/// A header name or value. tollgate's own names and fixed values live as
/// long as the program, an account's id and plan are shared with its record
/// and a configured header's name with the config: none of those is copied
/// per request. Only what is made for one request is owned. Compared,
/// hashed and shown as the text it holds, whatever holds it.
#[derive(Debug, Clone)]
pub enum Text {
    /// A name or value fixed in the program.
    Static(&'static str),
    /// Shared with what it came from (an account record, the config).
    Shared(Arc<str>),
    /// Made for this request.
    Owned(String),
}

impl Text {
    /// The text.
    pub fn as_str(&self) -> &str {
        match self {
            Text::Static(s) => s,
            Text::Shared(s) => s,
            Text::Owned(s) => s,
        }
    }

    /// The text as a `String` (a copy unless it was owned).
    pub fn into_owned(self) -> String {
        match self {
            Text::Owned(s) => s,
            other => other.as_str().to_owned(),
        }
    }
}

impl Default for Text {
    fn default() -> Self {
        Text::Static("")
    }
}

impl std::ops::Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Text {}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::hash::Hash for Text {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&'static str> for Text {
    fn from(s: &'static str) -> Self {
        Text::Static(s)
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Text::Owned(s)
    }
}

impl From<Arc<str>> for Text {
    fn from(s: Arc<str>) -> Self {
        Text::Shared(s)
    }
}

impl From<&Arc<str>> for Text {
    fn from(s: &Arc<str>) -> Self {
        Text::Shared(s.clone())
    }
}

/// A header name.
pub type Name = Text;

/// A rendered decision, free of any transport's types.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status the client sees.
    pub status: u16,
    /// The problem JSON on a deny.
    pub body: Option<String>,
    /// Headers for the client (on a deny: with the body; on an allow: added to the upstream's response).
    pub client_headers: Vec<(Name, Text)>,
    /// Headers set (overwriting) on the request to the upstream; allow only.
    pub upstream_headers: Vec<(Name, Text)>,
    /// Request headers removed before the upstream; allow only.
    pub upstream_remove: Vec<Name>,
}

/// What the caller sent that shapes the response.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context<'a> {
    /// What an allow asks the proxy to remove.
    pub removals: Removals<'a>,
    /// What x402 adds: a challenge on a 402 a payment cures, a receipt on a paid call.
    pub payment: Option<Payment<'a>>,
}

/// What an allow asks the proxy to remove from the request, besides the own
/// headers `server.remove_own_headers` says to remove unseen.
#[derive(Debug, Clone, Copy, Default)]
pub struct Removals<'a> {
    /// Request headers to remove before the upstream (credentials, forged
    /// `x-tollgate-*`), lower-case; those tollgate sets are overwritten instead.
    pub strip: &'a [Name],
    /// The proxy said it shows tollgate every `x-tollgate-*` header a client
    /// sends or removes them first (`config::OWN_HEADERS_SHOWN`), so under
    /// `remove_own_headers: auto` those `strip` lacks are not there.
    pub own_shown: bool,
}

/// The x402 part of an answer (built by `x402`, rendered here).
#[derive(Debug, Clone, Copy)]
pub enum Payment<'a> {
    /// A 402 that paying for the call cures.
    Challenge {
        /// The `PAYMENT-REQUIRED` value (base64 of the v2 object).
        header: &'a str,
        /// The price, in the asset's atomic units.
        amount: &'a str,
        /// CAIP-2 network.
        network: &'a str,
        /// The asset.
        asset: &'a str,
        /// Why the payment sent was refused, when one was.
        error: Option<&'a str>,
    },
    /// A call paid and settled.
    Paid {
        /// The `PAYMENT-RESPONSE` value.
        response: &'a str,
        /// Who paid.
        payer: &'a str,
        /// The upstream's `x-tollgate-payment` value.
        receipt: &'a str,
    },
}

/// The problem body's pointer to the x402 challenge.
#[derive(Serialize, Clone, Copy)]
struct X402Body<'a> {
    header: &'static str,
    version: u8,
    amount: &'a str,
    network: &'a str,
    asset: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: String,
    status: u16,
    detail: String,
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    link: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    feature: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subscription_status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grace_ended_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credits: Option<Credits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quota: Option<QuotaBody<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    x402: Option<X402Body<'a>>,
}

#[derive(Serialize)]
struct Credits {
    balance: u64,
    cost: u64,
}

#[derive(Serialize)]
struct QuotaBody<'a> {
    meter: &'a str,
    policy: String,
    limit: u64,
    used: u64,
    remaining: u64,
    resets_at: String,
    /// Units used past the limit (soft quotas only).
    #[serde(skip_serializing_if = "Option::is_none")]
    overage: Option<u64>,
    /// A soft quota's hard stop, when one is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    ceiling: Option<u64>,
}

/// RFC 3339 with seconds, `Z`: the one timestamp format of bodies and headers.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Whole seconds from `now` until `t`, rounded up, never negative.
fn secs_until(t: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    let ms = (t - now).num_milliseconds();
    if ms <= 0 { 0 } else { (ms as u64).div_ceil(1000) }
}

fn window_secs(state: &QuotaState, now: DateTime<Utc>) -> u64 {
    match state.quota.window {
        // UTC minutes, hours and days have one length.
        Window::Calendar(Period::Minute) => 60,
        Window::Calendar(Period::Hour) => 3_600,
        Window::Calendar(Period::Day) => 86_400,
        Window::Calendar(Period::Month) => {
            // Months differ: worked out once per UTC day and thread, not per request.
            thread_local! {
                static MONTH: std::cell::Cell<(i64, u64)> = const { std::cell::Cell::new((i64::MIN, 0)) };
            }
            let day = now.timestamp().div_euclid(86_400);
            MONTH.with(|m| match m.get() {
                (d, secs) if d == day => secs,
                _ => {
                    let (start, end) = Period::Month.bounds(now);
                    let secs = secs_until(end, start);
                    m.set((day, secs));
                    secs
                }
            })
        }
        Window::Rolling(d) => d.as_millis().div_ceil(1000).max(1) as u64,
    }
}

/// `RateLimit-Policy` and `RateLimit` for the quotas a request touched. The
/// `RateLimit` item is the quota that denied the request, else the one with
/// the fewest units left (the one a client must pace itself by).
fn ratelimit_headers(d: &Decision, now: DateTime<Utc>, out: &mut Vec<(Name, Text)>) {
    if d.quotas.is_empty() {
        return;
    }
    // Written in place: one string per header, no list joined afterwards,
    // sized for a name and two 13-digit numbers so it never grows.
    // Integers written by `itoa`: no formatter machinery per number.
    let mut n = itoa::Buffer::new();
    let mut policy = String::with_capacity(64 * d.quotas.len());
    for (i, q) in d.quotas.iter().enumerate() {
        if i > 0 {
            policy.push_str(", ");
        }
        policy.push('"');
        q.quota.write_policy_name(&mut policy);
        policy.push_str("\";q=");
        policy.push_str(n.format(q.quota.limit));
        policy.push_str(";w=");
        policy.push_str(n.format(window_secs(q, now)));
    }
    out.push(("ratelimit-policy".into(), policy.into()));
    let current = d.denying_quota().or_else(|| d.quotas.iter().min_by_key(|q| q.remaining));
    if let Some(q) = current {
        let mut value = String::with_capacity(64);
        value.push('"');
        q.quota.write_policy_name(&mut value);
        value.push_str("\";r=");
        value.push_str(n.format(q.remaining));
        value.push_str(";t=");
        value.push_str(n.format(secs_until(q.resets_at, now)));
        out.push(("ratelimit".into(), value.into()));
    }
}

fn period_title(p: Period) -> &'static str {
    match p {
        Period::Minute => "Per-minute quota exhausted",
        Period::Hour => "Hourly quota exhausted",
        Period::Day => "Daily quota exhausted",
        Period::Month => "Monthly quota exhausted",
    }
}

fn default_title(code: Code, d: &Decision) -> String {
    match code {
        Code::CredentialsMissing => "Credentials missing",
        Code::CredentialsInvalid => "Credentials invalid",
        Code::RouteNotAllowed => "Route not allowed",
        Code::AccountBlocked => "Account blocked",
        Code::SubscriptionInactive => "Subscription inactive",
        Code::PaymentOverdue => "Payment overdue",
        Code::FeatureNotInPlan => "Feature not in plan",
        Code::InsufficientCredits => "Insufficient credits",
        Code::QuotaExhausted => match d.denying_quota().map(|q| q.quota.window) {
            Some(Window::Calendar(p)) => period_title(p),
            _ => "Quota exhausted",
        },
        Code::RateLimited => "Rate limit exceeded",
        Code::StoreUnavailable => "Billing state unavailable",
        Code::RequestInvalid => "Request invalid",
        Code::PlanUnknown => "Plan not configured",
        Code::PaymentRequired => "Payment required",
        Code::PaymentUnavailable => "Payment service unavailable",
    }
    .to_owned()
}

fn per_window(w: Window) -> String {
    match w {
        Window::Calendar(p) => format!("per {}", p.as_str()),
        Window::Rolling(_) => format!("per {}", w.label()),
    }
}

fn default_detail(code: Code, d: &Decision, v: &Vars) -> String {
    let plan = v.get("plan");
    let account = v.get("account");
    match code {
        Code::CredentialsMissing => "This route needs credentials; none were sent.".into(),
        Code::CredentialsInvalid => "The credentials sent are not valid: unknown or revoked.".into(),
        Code::RouteNotAllowed => "No route allows this request.".into(),
        Code::AccountBlocked => format!("Account {account} is blocked. Contact support."),
        Code::SubscriptionInactive => {
            format!("The subscription of account {account} is {}; renew it to regain access.", v.get("status"))
        }
        Code::PaymentOverdue => format!(
            "A payment for account {account} failed and the grace period ended at {}; pay the open invoice to regain access.",
            v.get("grace_ends_at")
        ),
        Code::FeatureNotInPlan => {
            format!("Plan {plan} does not include the {} feature; upgrade to use it.", v.get("feature"))
        }
        Code::InsufficientCredits => format!(
            "This request costs {} credits; account {account} has {} left. Add credits to continue.",
            v.get("cost"),
            v.get("credits")
        ),
        Code::QuotaExhausted => match d.denying_quota() {
            Some(q) if q.quota.is_soft() => format!(
                "Plan {plan} includes {} {} {} and {} more as overage; all are used.",
                q.quota.limit,
                q.quota.meter,
                per_window(q.quota.window),
                q.quota.hard_limit().saturating_sub(q.quota.limit)
            ),
            Some(q) => format!(
                "Plan {plan} includes {} {} {}; all are used.",
                q.quota.limit,
                q.quota.meter,
                per_window(q.quota.window)
            ),
            None => "A quota is exhausted.".into(),
        },
        Code::RateLimited => match d.denying_quota() {
            Some(q) => format!(
                "Plan {plan} allows {} {} {}; retry in {}s.",
                q.quota.limit,
                q.quota.meter,
                per_window(q.quota.window),
                v.get("retry_after")
            ),
            None => "Too many requests.".into(),
        },
        Code::StoreUnavailable => "Billing state cannot be read right now; retry shortly.".into(),
        Code::RequestInvalid => "The request could not be read.".into(),
        Code::PlanUnknown => format!("Plan {plan} is not configured on this server."),
        Code::PaymentRequired => "This route is paid per call; pay with x402 or send credentials.".into(),
        Code::PaymentUnavailable => "The payment could not be verified or settled right now; retry shortly.".into(),
    }
}

/// Placeholder values for overridable texts (`{account}`, `{limit}`, ...).
struct Vars(Vec<(&'static str, String)>);

impl Vars {
    fn get(&self, name: &str) -> &str {
        self.0.iter().find(|(k, _)| *k == name).map_or("", |(_, v)| v.as_str())
    }

    fn fill(&self, template: &str) -> String {
        let mut out = template.to_owned();
        for (k, v) in &self.0 {
            out = out.replace(&format!("{{{k}}}"), v);
        }
        out
    }
}

fn vars(d: &Decision, link: Option<&str>, retry_after: Option<u64>) -> Vars {
    let mut v = Vec::with_capacity(16);
    let mut push = |k: &'static str, val: Option<String>| {
        if let Some(val) = val {
            v.push((k, val));
        }
    };
    push("account", d.account.as_deref().map(str::to_owned));
    push("plan", d.plan.as_deref().map(str::to_owned));
    push("feature", d.feature.clone());
    push("status", d.status.map(|s| s.to_string()));
    push("grace_ends_at", d.grace_until.map(timestamp));
    push("cost", Some(d.cost.to_string()));
    push("credits", d.credits.map(|c| c.to_string()));
    push("link", link.map(str::to_owned));
    push("retry_after", retry_after.map(|r| r.to_string()));
    if let Some(q) = d.denying_quota() {
        push("meter", Some(q.quota.meter.to_string()));
        push("limit", Some(q.quota.limit.to_string()));
        push("used", Some(q.used.to_string()));
        push("remaining", Some(q.remaining.to_string()));
        push("window", Some(q.quota.window.label()));
        push("resets_at", Some(timestamp(q.resets_at)));
        push("overage", Some(q.overage.to_string()));
        push("ceiling", q.quota.ceiling_set().map(|c| c.to_string()));
    }
    Vars(v)
}

/// The `WWW-Authenticate` challenges for the configured API-key sources.
fn challenges(identity: &[IdentitySource]) -> String {
    let mut out: Vec<String> = Vec::new();
    for source in identity {
        if let IdentitySource::ApiKey { header, scheme } = source {
            let c = match scheme {
                Some(s) => format!("{s} realm=\"tollgate\""),
                None => format!("ApiKey realm=\"tollgate\", header=\"{header}\""),
            };
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    if out.is_empty() {
        out.push("Bearer realm=\"tollgate\"".into());
    }
    out.join(", ")
}

/// Renders `d` as seen by the client and the upstream.
pub fn render(d: &Decision, config: &Config, ctx: Context<'_>, now: DateTime<Utc>) -> Response {
    match d.verdict {
        Verdict::Allow(kind) => render_allow(d, kind, config, ctx, now),
        Verdict::Deny(code) => render_deny(d, code, config, ctx.payment, now),
    }
}

fn render_allow(d: &Decision, kind: AllowKind, config: &Config, ctx: Context<'_>, now: DateTime<Utc>) -> Response {
    // Room for what an allow usually carries, so neither list grows.
    let mut r = Response {
        status: 200,
        upstream_headers: Vec::with_capacity(4),
        client_headers: Vec::with_capacity(4),
        ..Response::default()
    };
    if let (Some(account), Some(plan)) = (&d.account, &d.plan) {
        r.upstream_headers.push((ACCOUNT_HEADER.into(), account.into()));
        r.upstream_headers.push((PLAN_HEADER.into(), plan.into()));
    }
    if kind == AllowKind::FailOpen {
        r.upstream_headers.push((DEGRADED_HEADER.into(), Code::StoreUnavailable.as_str().into()));
    }
    if let Some(code) = d.shadowed {
        r.upstream_headers.push((SHADOW_HEADER.into(), code.as_str().into()));
    }
    // Billing warnings, one list: a failed payment inside its grace period,
    // and each soft quota this request went past the limit of.
    let mut warnings = Vec::new();
    if kind == AllowKind::Grace {
        let until = d.grace_until.map(timestamp).unwrap_or_default();
        warnings.push(format!("payment_overdue; grace_ends_at=\"{until}\""));
    }
    let mut overage = Vec::new();
    for q in d.overages() {
        let policy = q.quota.policy_name();
        let ceiling = q.quota.ceiling_set().map(|c| format!("; ceiling={c}")).unwrap_or_default();
        warnings.push(format!(
            "quota_overage; policy=\"{policy}\"; limit={}; overage={}{ceiling}",
            q.quota.limit, q.overage
        ));
        overage.push(format!("\"{policy}\";units={};overage={}", q.overage_of(d.cost), q.overage));
    }
    if !warnings.is_empty() {
        let warning = warnings.join(", ");
        r.client_headers.push((BILLING_WARNING_HEADER.into(), warning.clone().into()));
        r.upstream_headers.push((BILLING_WARNING_HEADER.into(), warning.into()));
        if let Some(link) = d.account.as_deref().and_then(|a| config.billing.portal_for(a)) {
            r.client_headers.push(("link".into(), format!("<{link}>; rel=\"payment\"").into()));
        }
    }
    if !overage.is_empty() {
        r.upstream_headers.push((OVERAGE_HEADER.into(), overage.join(", ").into()));
    }
    if let Some(Payment::Paid { response, payer, receipt }) = ctx.payment {
        r.upstream_headers.push((PAYER_HEADER.into(), payer.to_owned().into()));
        r.upstream_headers.push((PAYMENT_HEADER.into(), receipt.to_owned().into()));
        r.client_headers.push((crate::x402::RESPONSE_HEADER.into(), response.to_owned().into()));
    }
    // Our own headers are removed when not set (the proxy may not have
    // shown us the client's copy), unless the config or, under `auto`, the
    // proxy says it shows them all (then `strip` has those the client sent,
    // and only the two routes match on are removed unseen: see
    // ROUTED_HEADERS); a header we set is overwritten, never removed, since
    // Envoy applies removals after additions.
    let set = |name: &str| r.upstream_headers.iter().any(|(k, _)| k == name);
    let own: &[&'static str] = match (config.server.remove_own_headers, ctx.removals.own_shown) {
        (RemoveOwnHeaders::Always, _) | (RemoveOwnHeaders::Auto, false) => &OWN_HEADERS,
        (RemoveOwnHeaders::Seen, _) | (RemoveOwnHeaders::Auto, true) => &ROUTED_HEADERS,
    };
    let strip = ctx.removals.strip;
    let mut remove: Vec<Name> = Vec::with_capacity(own.len() + strip.len());
    remove.extend(own.iter().copied().filter(|h| !set(h)).map(Text::Static));
    // `strip` names each header once: checked against our own few names
    // alone, a flood of client names costs n, not n².
    let owned = remove.len();
    for h in strip {
        if !set(h) && !remove.iter().take(owned).any(|r| r == h) {
            remove.push(h.clone());
        }
    }
    r.upstream_remove = remove;
    ratelimit_headers(d, now, &mut r.client_headers);
    r
}

fn render_deny(
    d: &Decision,
    code: Code,
    config: &Config,
    payment: Option<Payment<'_>>,
    now: DateTime<Utc>,
) -> Response {
    let challenge = match payment {
        Some(Payment::Challenge { header, amount, network, asset, error }) if code.http_status() == 402 => {
            Some((header, X402Body { header: "PAYMENT-REQUIRED", version: 2, amount, network, asset, error }))
        }
        _ => None,
    };
    let status = code.http_status();
    let overrides = config.problems.overrides.get(&code);
    let retry_after = match code {
        Code::RateLimited => d.denying_quota().map(|q| secs_until(q.retry_at, now).max(1)),
        Code::QuotaExhausted => d.denying_quota().map(|q| secs_until(q.resets_at, now).max(1)),
        _ => None,
    };
    let portal = if status == 402 { d.account.as_deref().and_then(|a| config.billing.portal_for(a)) } else { None };
    let v = vars(d, portal.as_deref(), retry_after);
    let link = match overrides.and_then(|o| o.link.as_deref()) {
        Some(template) if status == 402 => Some(v.fill(template)),
        _ => portal,
    };
    let title = overrides.and_then(|o| o.title.as_deref()).map_or_else(|| default_title(code, d), |t| v.fill(t));
    let detail = overrides.and_then(|o| o.detail.as_deref()).map_or_else(|| default_detail(code, d, &v), |t| v.fill(t));
    let problem = Problem {
        kind: format!("{}{}", config.problems.type_base, code.as_str().replace('_', "-")),
        title,
        status,
        detail,
        code: code.as_str(),
        account: d.account.as_deref(),
        plan: d.plan.as_deref(),
        link: link.clone(),
        feature: d.feature.as_deref().filter(|_| code == Code::FeatureNotInPlan),
        subscription_status: d.status.filter(|_| code == Code::SubscriptionInactive).map(|s| s.as_str()),
        grace_ended_at: d.grace_until.filter(|_| code == Code::PaymentOverdue).map(timestamp),
        credits: (code == Code::InsufficientCredits).then(|| Credits { balance: d.credits.unwrap_or(0), cost: d.cost }),
        quota: d.denying_quota().map(|q| QuotaBody {
            meter: &q.quota.meter,
            policy: q.quota.policy_name(),
            limit: q.quota.limit,
            used: q.used,
            remaining: q.remaining,
            resets_at: timestamp(q.resets_at),
            overage: q.quota.is_soft().then_some(q.overage),
            ceiling: q.quota.ceiling_set(),
        }),
        retry_after,
        x402: challenge.map(|(_, body)| body),
    };
    // Serializing plain strings and numbers cannot fail; an empty object is the safe fallback.
    let body = serde_json::to_string(&problem).unwrap_or_else(|_| "{}".into());

    let mut h: Vec<(Name, Text)> =
        vec![("content-type".into(), "application/problem+json".into()), ("cache-control".into(), "no-store".into())];
    if let Some(link) = link {
        h.push(("link".into(), format!("<{link}>; rel=\"payment\"").into()));
    }
    if let Some(secs) = retry_after {
        h.push(("retry-after".into(), secs.to_string().into()));
    }
    if status == 401 {
        h.push(("www-authenticate".into(), challenges(&config.identity).into()));
    }
    if let Some((header, _)) = challenge {
        h.push((crate::x402::REQUIRED_HEADER.into(), header.to_owned().into()));
    }
    ratelimit_headers(d, now, &mut h);
    Response { status, body: Some(body), client_headers: h, ..Response::default() }
}
