//! The geometry of a rolling window (`per:`) as both stores count it: a
//! bucketed log with at most [`BUCKETS`] buckets per window, so its state and
//! the work of one check do not grow with the limit.
//!
//! A window of `P` ms has buckets of `width = ceil(P / BUCKETS)` ms and spans
//! `count = ceil(P / width)` of them (≤ [`BUCKETS`]; fewer when `P` is below
//! it). A spend at `t` ms lands in bucket `floor(t / width)`. At `t`, in bucket
//! `b`, usage is the sum of buckets `b - count ..= b`: the oldest of them is
//! only partly inside `(t - P, t]` and is counted whole, so usage is never
//! less than an exact log's and no window of length `P` ever holds more than
//! the limit. The price: a unit spent at `s` is counted until its bucket
//! leaves, at `(floor(s / width) + count + 1) * width`, which is after `s + P`
//! by at most `(count + 1) * width - P` (`width` when `width` divides `P`,
//! always under `2 * width`): refusals an exact log would not make are bounded
//! by the units of that one oldest bucket, for at most that long.
//!
//! The Redis spend script (`redis/spend.lua`) does the same arithmetic;
//! `tests/store_contract.rs` checks that both answer alike. Depends on nothing.

use std::time::Duration;

/// The most buckets one rolling window is counted in.
pub const BUCKETS: u64 = 16;

/// How one rolling window is cut into buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buckets {
    /// The width of one bucket, in ms (≥ 1).
    pub width_ms: i64,
    /// How many whole buckets cover the window (1..=[`BUCKETS`]); the window
    /// at `t` counts these and the bucket `t` is in.
    pub count: i64,
}

impl Buckets {
    /// The buckets of a window of `per` (whole ms); `None` below 1 ms or past `i64` ms.
    pub fn of(per: Duration) -> Option<Self> {
        let per_ms = u64::try_from(per.as_millis()).ok().filter(|ms| (1..=i64::MAX as u64).contains(ms))?;
        let width_ms = per_ms.div_ceil(BUCKETS);
        // width ≥ 1 and count ≤ BUCKETS: both fit an i64.
        Some(Self { width_ms: width_ms as i64, count: per_ms.div_ceil(width_ms) as i64 })
    }

    /// The bucket the instant `t_ms` (ms since the epoch) falls in.
    pub fn index(&self, t_ms: i64) -> i64 {
        t_ms.div_euclid(self.width_ms)
    }

    /// The oldest bucket still counted at `t_ms`.
    pub fn oldest_live(&self, t_ms: i64) -> i64 {
        self.index(t_ms).saturating_sub(self.count)
    }

    /// The instant (ms) bucket `j` stops being counted; saturating.
    pub fn leaves_at(&self, j: i64) -> i64 {
        j.saturating_add(self.count + 1).saturating_mul(self.width_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_hour_is_sixteen_buckets_of_225_seconds() {
        let b = Buckets::of(Duration::from_secs(3600)).unwrap();
        assert_eq!((b.width_ms, b.count), (225_000, 16));
        assert_eq!((b.index(225_000 * 7 + 3), b.oldest_live(225_000 * 20), b.leaves_at(4)), (7, 4, 225_000 * 21));
    }

    #[test]
    fn short_or_uneven_windows_use_fewer_buckets_that_still_cover_them() {
        assert_eq!(Buckets::of(Duration::from_millis(5)), Some(Buckets { width_ms: 1, count: 5 }));
        assert_eq!(Buckets::of(Duration::from_millis(1000)), Some(Buckets { width_ms: 63, count: 16 }));
        assert_eq!(Buckets::of(Duration::from_millis(17)), Some(Buckets { width_ms: 2, count: 9 }));
        assert_eq!(Buckets::of(Duration::ZERO), None);
        for per_ms in 1..2000u64 {
            let b = Buckets::of(Duration::from_millis(per_ms)).unwrap();
            let (w, k, p) = (b.width_ms, b.count, per_ms as i64);
            assert!(k as u64 <= BUCKETS && k * w >= p && (k - 1) * w < p, "{per_ms} ms: {b:?}");
        }
    }
}
