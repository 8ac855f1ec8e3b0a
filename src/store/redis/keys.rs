//! Key names (the table in the store's module doc) and the millisecond forms
//! in which keys, scripts and records carry instants and lengths.
//!
//! Every key of one account carries the hash tag `{<account>}`, so one account
//! lives in one cluster slot and one script can touch all of its counters; the
//! callers check the id with `is_valid_account_id` first (it cannot hold a
//! brace). Depends on `entitlement` and `identity` only.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::entitlement::{Period, Quota, Window};
use crate::identity::KeyHash;

/// The names of every key under one prefix (`store.key_prefix`).
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `P{acct}:account`: the entitlement record.
    pub(super) fn account(&self, id: &str) -> String {
        format!("{}{{{id}}}:account", self.prefix)
    }

    /// `P{acct}:credits`: the prepaid balance.
    pub(super) fn credits(&self, id: &str) -> String {
        format!("{}{{{id}}}:credits", self.prefix)
    }

    /// `P{acct}:keys`: key id → what operators may see of the key.
    pub(super) fn account_keys(&self, id: &str) -> String {
        format!("{}{{{id}}}:keys", self.prefix)
    }

    /// `Pkey:<hex>`: API key hash → account, a global index (looked up before the account is known).
    pub(super) fn api_key(&self, key: &KeyHash) -> String {
        format!("{}key:{}", self.prefix, key.to_hex())
    }

    /// `Pcustomer:<id>`: Stripe customer → account.
    pub(super) fn customer(&self, customer: &str) -> String {
        format!("{}customer:{customer}", self.prefix)
    }

    /// `Pevent:<id>`: a webhook event already handled.
    pub(super) fn event(&self, id: &str) -> String {
        format!("{}event:{id}", self.prefix)
    }

    /// `P{acct}:q:<meter>:<period>:<start ms>`: the calendar counter of the window starting at `start`.
    pub(super) fn calendar(&self, id: &str, meter: &str, p: Period, start: DateTime<Utc>) -> String {
        format!("{}{{{id}}}:q:{}:{}:{}", self.prefix, meter, p.as_str(), millis(start))
    }

    /// `P{acct}:settled:<slot>`: ids of the charges issued in that ten-minute slot
    /// (ms since the epoch / 600,000) that were settled; expires when they
    /// can no longer be replayed.
    pub(super) fn settled(&self, id: &str, issued: DateTime<Utc>) -> String {
        format!("{}{{{id}}}:settled:{}", self.prefix, millis(issued).div_euclid(crate::settlement::SLOT_MS))
    }

    /// `P{acct}:events`: the account's outbox, a stream read by the consumer group `tollgate`.
    pub(super) fn events(&self, id: &str) -> String {
        format!("{}{{{id}}}:events", self.prefix)
    }

    /// `P{acct}:th:<name>`: a threshold that fired, until its window ends.
    pub(super) fn mark(&self, id: &str, name: &str) -> String {
        format!("{}{{{id}}}:th:{name}", self.prefix)
    }

    /// `Poutbox`: accounts whose outbox may hold events, scored by their last write (ms).
    pub(super) fn outbox(&self) -> String {
        format!("{}outbox", self.prefix)
    }

    /// `Pcharge-key`: the secret every replica signs charges with (made once, by the first to need it).
    pub(super) fn charge_key(&self) -> String {
        format!("{}charge-key", self.prefix)
    }

    /// The pub/sub channel of cache invalidations.
    pub(super) fn channel(&self) -> String {
        format!("{}invalidate", self.prefix)
    }

    /// The keys of `q`'s window at `now`: the calendar counter, or the rolling
    /// window's buckets (`rb`, a hash: a name apart from the old `r` sorted
    /// set, so a key left by an older version can never be read as the wrong type).
    pub(super) fn window(&self, id: &str, q: &Quota, now: DateTime<Utc>) -> Vec<String> {
        match q.window {
            Window::Calendar(p) => vec![self.calendar(id, &q.meter, p, p.bounds(now).0)],
            Window::Rolling(d) => {
                vec![format!("{}{{{id}}}:rb:{}:{}", self.prefix, q.meter, d.as_millis())]
            }
        }
    }
}

/// `<counter>:leases`: a calendar counter's lease records (lease mode), a hash
/// holder id → units leased and not given back; in the counter's slot.
pub(super) fn leases(counter: &str) -> String {
    format!("{counter}:leases")
}

/// Milliseconds since the epoch.
pub(super) fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// The instant `ms` after the epoch; `None` outside chrono's range.
pub(super) fn from_millis(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

/// A window's length in whole milliseconds, as keys and scripts carry it
/// (saturating: lengths past `MAX_WINDOW` are refused before they get here).
pub(super) fn window_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
