//! The Lua scripts, exactly as the store sends them: public so they can be
//! audited, and called with `EVAL` and hostile arguments by tests.
//!
//! The Lua lives in `.lua` files next to this one, included at build time;
//! every script is `prelude.lua` followed by its own file. (The two newlines
//! keep each script byte-for-byte what it was when it was a Rust string, so
//! its SHA1, the name `EVALSHA` calls it by, did not change.) Depends on nothing.
//!
//! Every script is integer-only and strict (SPEC §10). It parses each argument
//! and each stored value it reads as a decimal integer within its bound (at
//! most 16 digits, so exact as a Lua number, a double), and answers an error
//! reply — `TOLLGATE_BADARG` for an argument, `TOLLGATE_CORRUPT` for a stored
//! value — *before its first write*: Redis keeps whatever a script wrote
//! before it failed, so all-or-nothing holds only if nothing can fail after
//! the first write. Numbers are written with `%d`, never `tostring`, which in
//! Redis's Lua 5.1 prints 10^15 as `1e+15`. The bounds at the top of
//! `prelude.lua` are the Rust constants (a unit test checks they agree).

/// `prelude.lua` then `$file`, as one string literal.
macro_rules! script {
    ($file:literal) => {
        concat!("\n", include_str!("prelude.lua"), "\n", include_str!($file))
    };
}

/// Check-and-spend of SPEC §4's atomicity paragraph. See the store's module doc for keys.
///
/// ARGV: cost, credit cost (`''` for none), mode (`0` spend, `1` dry run,
/// `2` shadow: quotas spent past their limits up to `MAX_LIMIT`, credits only
/// checked), quota count n, then per quota: kind (`c` calendar / `r`
/// rolling), hard limit (a soft quota's ceiling), and the
/// window's end (calendar, ms) or length (rolling, ms). KEYS: per quota its
/// counter (calendar) or bucket hash (rolling), then the credits key.
/// Answers `{spent, balance (-1 without credits), sufficient}` and per
/// quota `{used, exceeded, resets ms, retry ms}`.
pub const SPEND: &str = script!("spend.lua");

/// Writes an account unless the stored one applied a newer billing event.
///
/// ARGV: the record's JSON, the event's ms (`''` when it carries none).
/// A stored record whose event time cannot be read is replaced: the write repairs it.
pub const PUT_IF_NEWER: &str = script!("put_if_newer.lua");

/// Adds to a balance, refusing with no change when it would go below zero
/// (-1) or above `MAX_CREDITS` (-2). ARGV: the signed delta.
pub const ADD_CREDITS: &str = script!("add_credits.lua");

/// Removes a key from the index only if it belongs to the account. ARGV: the account id.
pub const REVOKE: &str = script!("revoke.lua");

/// Lease mode's take, give and reset (`store::lease`). KEYS: a calendar
/// counter or the credits key, then its lease records (a hash holder → units).
/// Answers `{units granted / given back / still leased, counter or balance after}`.
pub const LEASE: &str = script!("lease.lua");

/// Settles charges of one account that touch the same windows (`settlement`,
/// `super::settle`): per charge, records its id once and moves the counters
/// and credits by its delta, in the windows the charges were made in, and
/// queues its event; then tests the threshold marks once.
///
/// KEYS: the once-only hash (`P{acct}:settled:<slot>`), the credits key, the
/// outbox stream, the n calendar counters, the m marks. ARGV: remember-until
/// ms, the outbox cap, credits flag (`0`/`1`), n, the n window ends (ms), the
/// item count k, per item (charge id, signed delta, event or `''`), m, per
/// mark (target: 0 credits or counter i, level, until ms, event). A refund
/// never takes a counter or balance below 0 nor revives an expired counter;
/// an overage is added while the window's counter lives, and takes from the
/// balance what it holds. Answers per item `{applied (0: already settled),
/// credits unpaid, queued, dropped}` (the marks' events counted with the last
/// item applied).
pub const SETTLE: &str = script!("settle.lua");

/// Claims events of one account's outbox for a consumer: its own
/// unacknowledged ones, then new ones, then ones held by another consumer
/// longer than the reclaim time. KEYS: the stream. ARGV: consumer, count,
/// reclaim idle ms, idle-before ms. Answers `{'ok', id, payload, …}`,
/// `{'idle'}` (empty, last written before the given instant) or `{'gone'}`.
pub const OUTBOX_CLAIM: &str = script!("outbox_claim.lua");

/// Removes an account from the outbox index if its last write is older than
/// ARGV[2] ms (a writer indexes before it writes, so a fresh write keeps it).
/// KEYS: the index. ARGV: account, before ms. Answers 1 when removed.
pub const OUTBOX_FORGET: &str = script!("outbox_forget.lua");

/// Deletes an account's outbox stream (and its group) if it is empty. KEYS: the stream.
pub const OUTBOX_DROP: &str = script!("outbox_drop.lua");
