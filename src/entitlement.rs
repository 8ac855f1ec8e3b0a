//! The billing domain: what an account is entitled to.
//!
//! Plans come from config (they change with a deploy or reload); accounts come
//! from the store (they change with billing events). Nothing here does I/O or
//! reads the clock: windows are computed from a `now` the caller passes in.
//! A quota is built, from config or the internal API alike, by [`Quota::new`],
//! so the bounds it keeps (names, limits, windows) are defined here, with the
//! type, and re-exported by `bounds` and `usage`. Depends on nothing of ours.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};

/// Subscription status, as billing providers (Stripe first) report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Paid and current.
    #[default]
    Active,
    /// In a free trial: treated as active.
    Trialing,
    /// A payment failed; access continues for the grace period.
    PastDue,
    /// Ended by the customer or the operator.
    Canceled,
    /// Payment retries are exhausted.
    Unpaid,
    /// The first payment never completed (Stripe `incomplete_expired`), or the term ran out.
    Expired,
    /// Collection is paused (Stripe `paused`).
    Paused,
}

impl Status {
    /// Whether the subscription grants no access at all (→ `subscription_inactive`).
    pub fn is_inactive(self) -> bool {
        matches!(self, Status::Canceled | Status::Unpaid | Status::Expired | Status::Paused)
    }

    /// Every status.
    pub const ALL: [Status; 7] = [
        Status::Active,
        Status::Trialing,
        Status::PastDue,
        Status::Canceled,
        Status::Unpaid,
        Status::Expired,
        Status::Paused,
    ];

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The wire name, as in config and problem bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Trialing => "trialing",
            Status::PastDue => "past_due",
            Status::Canceled => "canceled",
            Status::Unpaid => "unpaid",
            Status::Expired => "expired",
            Status::Paused => "paused",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A calendar window in UTC: a paid allowance that resets at the window's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// From :00 of one minute to the next.
    Minute,
    /// From :00:00 of one hour to the next.
    Hour,
    /// From 00:00 UTC to the next midnight.
    Day,
    /// From the 1st 00:00 UTC to the 1st of the next month.
    Month,
}

impl Period {
    /// Parses a wire name (`month`).
    pub fn parse(s: &str) -> Option<Period> {
        [Period::Minute, Period::Hour, Period::Day, Period::Month].into_iter().find(|p| p.as_str() == s)
    }

    /// The wire name (`month`), used in policy names and counter keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Minute => "minute",
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// The window `[start, end)` that holds `now`.
    pub fn bounds(self, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let start = match self {
            Period::Minute => now.with_second(0).and_then(|t| t.with_nanosecond(0)),
            Period::Hour => now.with_minute(0).and_then(|t| t.with_second(0)).and_then(|t| t.with_nanosecond(0)),
            Period::Day => Utc.with_ymd_and_hms(now.year(), now.month(), now.day(), 0, 0, 0).single(),
            Period::Month => Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0).single(),
        }
        // Every UTC instant has a unique truncation; `None` cannot happen, but
        // falling back to `now` keeps this total.
        .unwrap_or(now);
        // Total even at the end of chrono's range (never reached from a real
        // clock, but `now` is an argument): the window then ends at the limit.
        let after = |d: chrono::Duration| start.checked_add_signed(d).unwrap_or(DateTime::<Utc>::MAX_UTC);
        let end = match self {
            Period::Minute => after(chrono::Duration::minutes(1)),
            Period::Hour => after(chrono::Duration::hours(1)),
            Period::Day => after(chrono::Duration::days(1)),
            Period::Month => {
                let (y, m) =
                    if start.month() == 12 { (start.year() + 1, 1) } else { (start.year(), start.month() + 1) };
                Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).single().unwrap_or_else(|| after(chrono::Duration::days(31)))
            }
        };
        (start, end)
    }
}

/// The earliest instant accepted on any way in (config, API, Stripe, stored records).
pub fn min_time() -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH
}

/// The latest instant accepted on any way in: 9999-12-31T23:59:59Z. Far from
/// chrono's limits, so adding any [`MAX_WINDOW`]-bounded duration cannot overflow.
pub fn max_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).single().unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Whether `t` lies in [`min_time`]..=[`max_time`]: dates outside are refused
/// before they are stored, so no later time arithmetic can overflow.
pub fn is_valid_time(t: DateTime<Utc>) -> bool {
    (min_time()..=max_time()).contains(&t)
}

/// The longest rolling window (`per:`) and grace period accepted: 366 days.
pub const MAX_WINDOW: Duration = Duration::from_secs(366 * 24 * 3600);

/// The shortest rolling window: windows are kept in whole milliseconds.
pub const MIN_WINDOW: Duration = Duration::from_millis(1);

/// Whether a rolling window's length is one a store keeps.
pub fn is_valid_window(d: Duration) -> bool {
    (MIN_WINDOW..=MAX_WINDOW).contains(&d)
}

/// The largest quota limit accepted from config, the API or a stored record.
pub const MAX_LIMIT: u64 = 1_000_000_000_000_000;

/// The longest plan, meter or feature name: names are config keys and
/// Redis key parts, never prose.
pub const MAX_NAME: usize = 128;

/// Whether `name` can be a plan, meter or feature name: 1–128 bytes,
/// no control characters.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME && !name.chars().any(char::is_control)
}

/// Whether `id` can be an account id: 1–128 of `A-Z a-z 0-9 _ - . : @`. Ids
/// become Redis hash tags and URL parts, so braces, slashes and spaces are out.
pub fn is_valid_account_id(id: &str) -> bool {
    let ok = |b: u8| b.is_ascii_alphanumeric() || b"_-.:@".contains(&b);
    !id.is_empty() && id.len() <= 128 && id.bytes().all(ok)
}

/// A short list kept inline: a Check touches few quotas (a plan has one or
/// two per meter), so the lists one Check makes (its quotas, the store's
/// answer, the states it reports) need no heap; a longer one spills over.
pub type Few<T> = smallvec::SmallVec<[T; 2]>;

/// How a quota counts: a calendar allowance or a rolling rate window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    /// A paid allowance per calendar window: exhausted → 402, paying lifts it.
    Calendar(Period),
    /// A rate limit over the last `Duration`: exceeded → 429, waiting lifts it.
    Rolling(Duration),
}

impl Window {
    /// Whether exceeding this window is a rate limit (429) rather than an exhausted allowance (402).
    pub fn is_rate(&self) -> bool {
        matches!(self, Window::Rolling(_))
    }

    /// The suffix of the policy name: `month`, or the duration as configured (`1s`, `10m`).
    pub fn label(&self) -> String {
        let mut out = String::new();
        self.write_label(&mut out);
        out
    }

    /// [`Window::label`] appended to `out` (no allocation for calendar windows).
    pub fn write_label(&self, out: &mut String) {
        match self {
            Window::Calendar(p) => out.push_str(p.as_str()),
            Window::Rolling(d) => {
                // `1h 30m` is written `1h30m`, straight into `out` (no string per request).
                use std::fmt::Write as _;
                let _ = write!(NoSpaces(out), "{}", humantime::format_duration(*d));
            }
        }
    }
}

/// Writes to a `String`, leaving out spaces.
struct NoSpaces<'a>(&'a mut String);

impl fmt::Write for NoSpaces<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend(s.chars().filter(|c| *c != ' '));
        Ok(())
    }
}

/// One limit on one meter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Quota {
    /// What is counted (`requests`, `ai_tokens`); routes name the meter they
    /// spend. Shared: a Check copies its quotas, never the name.
    pub meter: Arc<str>,
    /// Units allowed per window; validated to be at least 1.
    pub limit: u64,
    /// The window the limit applies to.
    pub window: Window,
    /// `Some` makes the quota soft (calendar windows only): past `limit`
    /// requests still pass, as overage, until `ceiling` units are used
    /// ([`MAX_LIMIT`] when no ceiling was set). Stores check against
    /// [`Quota::hard_limit`]; the decision reports use past `limit` as overage.
    pub ceiling: Option<u64>,
}

/// Why a quota cannot be built. [`field`](QuotaError::field) names the part
/// at fault relative to the quota, and `Display` gives the reason, so each
/// way in roots the same words at its own path: config says
/// `plans.free.quotas[0].limit: must be between 1 and …`, the internal API
/// `entitlement.quota_overrides[0].limit: must be between 1 and …`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    /// The meter is empty or blank.
    #[error("must not be empty")]
    MeterEmpty,
    /// The meter is not a valid name ([`is_valid_name`]).
    #[error("must be 1-{MAX_NAME} bytes without control characters")]
    MeterInvalid,
    /// The limit is below 1 or above [`MAX_LIMIT`]; carries what was given.
    #[error("must be between 1 and {MAX_LIMIT}, got {0}")]
    Limit(i128),
    /// `per` is longer than [`MAX_WINDOW`].
    #[error("must be at most 366d")]
    WindowTooLong,
    /// `per` is shorter than [`MIN_WINDOW`].
    #[error("must be at least 1ms")]
    WindowTooShort,
    /// Both a calendar `period` and a rolling `per` were given.
    #[error("set either period (a paid allowance) or per (a rate limit), not both")]
    PeriodAndPer,
    /// Neither a `period` nor a `per` was given.
    #[error("needs period (minute|hour|day|month) or per (a duration)")]
    NoWindow,
    /// `soft` on a rate limit (`per`): load has no overage.
    #[error("only a period quota (a paid allowance) can be soft; a rate limit (per) is always hard")]
    SoftRate,
    /// A `ceiling` without `soft: true`.
    #[error("needs soft: true (a hard quota stops at its limit)")]
    CeilingNotSoft,
    /// A `ceiling` at or below the limit, or above [`MAX_LIMIT`]; carries what was given and the limit.
    #[error("must be above the limit ({1}) and at most {MAX_LIMIT}, got {0}")]
    Ceiling(i128, u64),
}

impl QuotaError {
    /// The field at fault, relative to the quota: `meter`, `limit`, `per`, `soft`, `ceiling`, or
    /// `""` when the quota as a whole is (its window's shape).
    pub fn field(&self) -> &'static str {
        match self {
            QuotaError::MeterEmpty | QuotaError::MeterInvalid => "meter",
            QuotaError::Limit(_) => "limit",
            QuotaError::WindowTooLong | QuotaError::WindowTooShort => "per",
            QuotaError::PeriodAndPer | QuotaError::NoWindow => "",
            QuotaError::SoftRate => "soft",
            QuotaError::CeilingNotSoft | QuotaError::Ceiling(..) => "ceiling",
        }
    }

    /// The path of the field at fault, under the quota's own `path`
    /// (`plans.free.quotas[0]` → `plans.free.quotas[0].limit`).
    pub fn path(&self, path: &str) -> String {
        match self.field() {
            "" => path.to_owned(),
            field => format!("{path}.{field}"),
        }
    }
}

impl Quota {
    /// A quota as config or the API states it: a meter, a limit, and exactly
    /// one of a calendar `period` (an allowance) or a rolling `per` (a rate).
    /// The one place a new quota is checked: the meter is a name, the limit
    /// is 1..=[`MAX_LIMIT`] (taken as `i128` so that config's signed and the
    /// API's unsigned numbers are both reported as given), and `per` is
    /// within [`MIN_WINDOW`]..=[`MAX_WINDOW`]. Checked in that order, and the
    /// window's shape before its length.
    pub fn new(
        meter: &str,
        limit: impl Into<i128>,
        period: Option<Period>,
        per: Option<Duration>,
    ) -> Result<Quota, QuotaError> {
        if meter.trim().is_empty() {
            return Err(QuotaError::MeterEmpty);
        }
        if !is_valid_name(meter) {
            return Err(QuotaError::MeterInvalid);
        }
        let limit = limit.into();
        let limit =
            u64::try_from(limit).ok().filter(|l| (1..=MAX_LIMIT).contains(l)).ok_or(QuotaError::Limit(limit))?;
        let window = match (period, per) {
            (Some(period), None) => Window::Calendar(period),
            (None, Some(per)) if per > MAX_WINDOW => return Err(QuotaError::WindowTooLong),
            (None, Some(per)) if !is_valid_window(per) => return Err(QuotaError::WindowTooShort),
            (None, Some(per)) => Window::Rolling(per),
            (Some(_), Some(_)) => return Err(QuotaError::PeriodAndPer),
            (None, None) => return Err(QuotaError::NoWindow),
        };
        Ok(Quota { meter: meter.into(), limit, window, ceiling: None })
    }

    /// This quota made soft (`soft: true`), with a hard `ceiling` above the
    /// limit or none; `soft: false` keeps it hard, and then no ceiling may be
    /// given. Rate limits cannot be soft.
    pub fn soften(mut self, soft: bool, ceiling: Option<impl Into<i128>>) -> Result<Quota, QuotaError> {
        let ceiling = ceiling.map(Into::into);
        match (soft, ceiling) {
            (false, None) => return Ok(self),
            (false, Some(_)) => return Err(QuotaError::CeilingNotSoft),
            (true, _) if self.window.is_rate() => return Err(QuotaError::SoftRate),
            (true, ceiling) => {
                let c = match ceiling {
                    // A limit of MAX_LIMIT leaves no room above it for overage.
                    None if self.limit >= MAX_LIMIT => return Err(QuotaError::Ceiling(MAX_LIMIT.into(), self.limit)),
                    None => MAX_LIMIT,
                    Some(c) => u64::try_from(c)
                        .ok()
                        .filter(|c| *c > self.limit && *c <= MAX_LIMIT)
                        .ok_or(QuotaError::Ceiling(c, self.limit))?,
                };
                self.ceiling = Some(c);
            }
        }
        Ok(self)
    }

    /// Whether use past the limit passes as overage.
    pub fn is_soft(&self) -> bool {
        self.ceiling.is_some()
    }

    /// Where requests stop: the ceiling of a soft quota, else the limit.
    pub fn hard_limit(&self) -> u64 {
        self.ceiling.unwrap_or(self.limit)
    }

    /// The ceiling the operator set; `None` for a hard quota or a soft one without a ceiling.
    pub fn ceiling_set(&self) -> Option<u64> {
        self.ceiling.filter(|c| *c < MAX_LIMIT)
    }

    /// Units used past the limit on a soft quota, up to its ceiling (0 on a
    /// hard one): what shadow mode spends past the ceiling would have been
    /// denied, so it is not overage.
    pub fn overage(&self, used: u64) -> u64 {
        if self.is_soft() { used.min(self.hard_limit()).saturating_sub(self.limit) } else { 0 }
    }

    /// The name used in `RateLimit-Policy` and problem bodies: `requests-month`, `requests-1s`.
    pub fn policy_name(&self) -> String {
        let mut out = String::with_capacity(self.meter.len() + 8);
        self.write_policy_name(&mut out);
        out
    }

    /// [`Quota::policy_name`] appended to `out`.
    pub fn write_policy_name(&self, out: &mut String) {
        out.push_str(&self.meter);
        out.push('-');
        self.window.write_label(out);
    }
}

/// What a plan grants; plans live in config and are shared by many accounts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Plan name (the config key), shown to clients in `x-tollgate-plan` and problem bodies.
    pub name: String,
    /// Features the plan includes.
    pub features: BTreeSet<String>,
    /// Quotas of every meter; a route spends those of its own meter.
    pub quotas: Vec<Quota>,
    /// Whether each request also spends prepaid credits.
    pub prepaid: bool,
    /// Shadow mode for this plan's accounts (`shadow:` of the plan); a
    /// route's own setting wins over it, it wins over the config's.
    pub shadow: Option<bool>,
}

/// One account's billing state, as the store keeps it. Credits and usage are
/// counters, kept apart from this (they change on every request; this does not).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Account {
    /// Stable account id; also the Redis hash tag of all the account's keys.
    /// Shared: a Check's decision and spend hold it, never a copy.
    pub id: Arc<str>,
    /// Name of a plan in config; shared like `id`.
    pub plan: Arc<str>,
    /// Subscription status.
    pub status: Status,
    /// When the failed payment happened; the grace period counts from here.
    pub past_due_since: Option<DateTime<Utc>>,
    /// When access ends regardless of status (a fixed-term contract); `None` for open-ended.
    pub expires_at: Option<DateTime<Utc>>,
    /// Blocked by an operator for a reason other than billing (abuse, legal).
    pub blocked: bool,
    /// Features granted on top of the plan's.
    pub extra_features: BTreeSet<String>,
    /// Quotas that replace the plan's quota of the same meter and window, or add one.
    pub quota_overrides: Vec<Quota>,
    /// The Stripe customer id, to map webhook events to this account.
    pub stripe_customer: Option<String>,
    /// `created` of the newest billing event applied; older events arriving late are ignored.
    pub billing_event_at: Option<DateTime<Utc>>,
}

impl Account {
    /// Every quota that applies to this account, meter by meter.
    pub fn all_quotas(&self, plan: &Plan) -> Vec<Quota> {
        let mut meters: Vec<&str> = plan.quotas.iter().chain(&self.quota_overrides).map(|q| &*q.meter).collect();
        meters.sort_unstable();
        meters.dedup();
        meters.into_iter().flat_map(|m| self.quotas_for(plan, m)).collect()
    }

    /// Whether the plan or the account grants `feature`.
    pub fn has_feature(&self, plan: &Plan, feature: &str) -> bool {
        plan.features.contains(feature) || self.extra_features.contains(feature)
    }

    /// The quotas of `meter` that apply to this account: the plan's, with the
    /// account's overrides replacing those of the same window and adding the rest.
    pub fn quotas_for(&self, plan: &Plan, meter: &str) -> Few<Quota> {
        // An override takes its plan quota's place in the list, so a deny
        // names the same quota (policy, reset, Retry-After) as it would for
        // an account without the override.
        let same = |a: &Quota, b: &Quota| a.meter == b.meter && a.window == b.window;
        let mut quotas: Few<Quota> = plan
            .quotas
            .iter()
            .filter(|q| *q.meter == *meter)
            .map(|q| self.quota_overrides.iter().find(|o| same(o, q)).unwrap_or(q).clone())
            .collect();
        quotas.extend(
            self.quota_overrides
                .iter()
                .filter(|o| *o.meter == *meter && !plan.quotas.iter().any(|q| same(q, o)))
                .cloned(),
        );
        quotas
    }
}

#[cfg(test)]
mod tests;
