//! What a request asks the counters, and what they answer.
//!
//! The vocabulary shared by `decision` (which builds a [`Spend`] and reads the
//! [`SpendAnswer`]) and `store` (which carries it out atomically). Neither
//! knows the other; both know this.
//!
//! May use: `entitlement`.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::entitlement::{Few, Quota};

/// The most units one request may spend (a route's `cost`, `Authorize.cost`).
/// Far below the counters' ranges, so `used + cost` stays exact everywhere,
/// including in Redis Lua, whose numbers are doubles (exact to 2^53).
pub const MAX_COST: u64 = 1_000_000_000;

/// The largest quota limit: defined with `Quota::new`, which checks it.
pub use crate::entitlement::MAX_LIMIT;

/// The largest prepaid balance a store keeps; `SetCredits`/`AddCredits` past it
/// are refused. With [`MAX_COST`] it keeps every balance sum below 2^53.
pub const MAX_CREDITS: u64 = 1_000_000_000_000_000;

/// Everything one request would spend, checked and applied all-or-nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spend {
    /// The account whose counters and credits are touched (the account record's own string).
    pub account: Arc<str>,
    /// Every quota the request counts against; each gets `cost` units.
    pub quotas: Few<Quota>,
    /// Units the request spends on each quota.
    pub cost: u64,
    /// Credits the request spends (prepaid plans); `None` when it spends none.
    pub credits: Option<u64>,
    /// The instant the windows are computed for, from the caller's clock.
    pub now: DateTime<Utc>,
    /// Check only; spend nothing.
    pub dry_run: bool,
    /// Shadow mode (ignored on a dry run): every quota is spent whatever its
    /// limit, as far as [`MAX_LIMIT`] (usage is real; `exceeded` still says
    /// what would have been denied); credits are checked, never spent (a dry
    /// run of a paywall moves no money). The answer is `spent`.
    pub shadow: bool,
}

/// The counters' answer: how each quota stands, and whether anything was spent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendAnswer {
    /// True when every check passed and everything was spent, and for a
    /// shadow spend; false for a dry run. A store answering false (not a dry run) must mark a quota
    /// exceeded or the credits insufficient (`decision::settle` denies
    /// otherwise).
    pub spent: bool,
    /// One entry per [`Spend::quotas`], in the same order.
    pub quotas: Few<QuotaUsage>,
    /// The credit balance, when the spend touched credits.
    pub credits: Option<CreditBalance>,
}

/// One quota's state after the spend (or as it stands, when nothing was spent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaUsage {
    /// Units used in the current window.
    pub used: u64,
    /// Whether this request's cost would take `used` past the limit.
    pub exceeded: bool,
    /// When the window is fully restored: the calendar window's end, or for a
    /// rolling window when its newest bucket leaves it (see `store::rolling`).
    pub resets_at: DateTime<Utc>,
    /// When a request of this cost would first fit again (meaningful when `exceeded`).
    pub retry_at: DateTime<Utc>,
}

/// A prepaid balance after the spend (or as it stands).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditBalance {
    /// Credits left.
    pub balance: u64,
    /// Whether the balance covered the request's cost.
    pub sufficient: bool,
}

/// Lease mode's totals since start: what `store::lease` counts and the
/// metrics export (one type, so neither side copies the other's fields).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseTotals {
    /// Leases taken.
    pub taken: u64,
    /// Leases given back (idle, SIGTERM, reload, a new entitlement).
    pub returned: u64,
    /// Leases whose unspent units were forfeit (record expired, window ended).
    pub expired: u64,
    /// Units this replica holds, unspent.
    pub outstanding: u64,
    /// Spends through the lease store.
    pub spends: u64,
    /// Redis calls those spends made.
    pub redis_calls: u64,
}

/// What settling one charge does to the counters it was made on (the access
/// log reported the response, see `settlement`): `delta` units more (or, when
/// negative, fewer) on each calendar quota of `meter` in the windows that
/// held `issued`, and on the credits when `credits` is set; at most once per
/// `charge`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjustment {
    /// The account charged.
    pub account: String,
    /// The charge id (from the Check's dynamic metadata): the once-only key.
    pub charge: String,
    /// When the charge was made: picks the windows the adjustment goes to.
    pub issued: DateTime<Utc>,
    /// The meter whose quotas were spent.
    pub meter: String,
    /// The calendar periods of the quotas that were spent; rate (`per:`)
    /// windows are not adjusted (they limit load, and a failed request was load).
    pub periods: Vec<crate::entitlement::Period>,
    /// Units to add (positive: an overage) or give back (negative: a refund),
    /// within ±[`MAX_COST`].
    pub delta: i64,
    /// Whether the charge spent credits (a prepaid plan): they move by `delta` too.
    pub credits: bool,
    /// Until when the once-only record must last (after it, a replay is refused as stale).
    pub remember_until: DateTime<Utc>,
    /// The event (CloudEvents JSON) to put in the outbox with the adjustment, in the same atomic step.
    pub event: Option<String>,
    /// Threshold marks to test after the adjustment; each that is crossed
    /// and not yet set is set and puts its event in the outbox.
    pub marks: Vec<Mark>,
    /// The most events the outbox may hold (per account on Redis, in all in
    /// memory); beyond it events are dropped and counted.
    pub outbox_limit: u64,
}

/// A threshold that fires once: when the watched value is past `at`, the
/// mark `name` is set until `until` and `event` is queued; while it is set,
/// nothing more happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// What is watched: `Some(i)` the counter of the adjustment's `periods[i]`
    /// (fires at or above `at`), `None` the credit balance (fires at or below `at`).
    pub counter: Option<usize>,
    /// The level.
    pub at: u64,
    /// The mark's name among the account's marks (`requests:month:<start ms>:800`).
    pub name: String,
    /// When the mark lapses: the window's end (or the day's, for credits).
    pub until: DateTime<Utc>,
    /// The event queued when it fires.
    pub event: String,
}

/// An event waiting in the outbox, as a consumer claimed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// The account whose outbox holds it.
    pub account: String,
    /// Its position there (a Redis stream id, or the memory queue's number).
    pub id: String,
    /// The CloudEvents JSON.
    pub payload: String,
}

/// What a store did with an [`Adjustment`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Applied now. `unpaid` is the part of an overage the credit balance
    /// could not cover (balances stop at 0).
    Applied {
        /// Credits owed beyond the balance.
        unpaid: u64,
        /// Events put in the outbox.
        queued: u32,
        /// Events refused because the outbox was full.
        dropped: u32,
    },
    /// This charge was settled before (a replay): nothing changed.
    Duplicate,
}
