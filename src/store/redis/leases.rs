//! The lease script's calls (`store.counting: lease`, see [`crate::store::lease`]):
//! take a block of a calendar counter's units, give back what is unspent.
//! The counter means spent + leased, so exact spends by other replicas stay
//! correct; `lease.lua` checks everything before it writes.
//!
//! May use the Redis store's keys and connections, `entitlement`.

use chrono::{DateTime, Utc};

use super::connection::unavailable;
use super::keys::{self, millis};
use super::{RedisStore, StoreError};
use crate::entitlement::{Quota, Window, is_valid_account_id};

/// What one lease script call answered: units granted (or given back), and
/// the counter after it (spent + leased units).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseAnswer {
    /// Units granted by a take, or given back by a give.
    pub units: u64,
    /// The counter after the call.
    pub counter: u64,
}

/// How big a block a take asks for (see `store::lease`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Units the request needs now: granted in full or not at all.
    pub need: u64,
    /// The largest block.
    pub max: u64,
    /// A block is at most `free / divisor` (but at least `need` and 1).
    pub divisor: u64,
}

/// Reads the lease script's `{units, counter}`; anything else is corrupt.
fn lease_answer(out: &[i64]) -> Result<LeaseAnswer, StoreError> {
    match out {
        [units, counter] => match (u64::try_from(*units), u64::try_from(*counter)) {
            (Ok(units), Ok(counter)) => Ok(LeaseAnswer { units, counter }),
            _ => Err(StoreError::Corrupt(format!("lease script answered {out:?}"))),
        },
        _ => Err(StoreError::Corrupt(format!("lease script answered {} values", out.len()))),
    }
}

impl RedisStore {
    /// The counter `quota` (a calendar one) uses at `now`; `None` for a rolling quota.
    pub fn counter_key(&self, account: &str, quota: &Quota, now: DateTime<Utc>) -> Option<String> {
        match quota.window {
            Window::Calendar(_) if is_valid_account_id(account) => self.keys.window(account, quota, now).pop(),
            _ => None,
        }
    }

    /// Takes a block of units of `counter` for `holder`, which still holds
    /// `holds` unspent: all of `size.need` or nothing. `expires` is when the
    /// counter key expires (its window's end plus a minute, as the spend
    /// script sets it).
    pub async fn take_lease(
        &self,
        counter: &str,
        holder: &str,
        holds: u64,
        limit: u64,
        size: BlockSize,
        expires: DateTime<Utc>,
    ) -> Result<LeaseAnswer, StoreError> {
        let mut conn = self.conn().await?;
        let out: Vec<i64> = self
            .lease
            .key(counter)
            .key(keys::leases(counter))
            .arg("take")
            .arg(holder)
            .arg(limit)
            .arg(size.need)
            .arg(size.max)
            .arg(size.divisor)
            .arg(millis(expires))
            .arg(holds)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        lease_answer(&out)
    }

    /// Gives back up to `units` of `holder`'s lease on `counter` (never more
    /// than its record says) and deletes the record.
    pub async fn give_lease(&self, counter: &str, holder: &str, units: u64) -> Result<LeaseAnswer, StoreError> {
        let mut conn = self.conn().await?;
        let out: Vec<i64> = self
            .lease
            .key(counter)
            .key(keys::leases(counter))
            .arg("give")
            .arg(holder)
            .arg(units)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        lease_answer(&out)
    }
}
