//! The lease script's calls (`store.counting: lease`, see [`crate::store::lease`]):
//! take a block of a calendar counter's units or of a credit balance, give
//! back what is unspent, and the balance-wide reads and writes that must count
//! the units in live leases. `lease.lua` checks everything before it writes.
//!
//! May use the Redis store's keys and connections, `entitlement`, `usage`.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::connection::unavailable;
use super::keys::{self, millis};
use super::{RedisStore, StoreError, bad_account_id};
use crate::entitlement::{Quota, Window, is_valid_account_id};
use crate::store::Invalidation;
use crate::usage::{MAX_COST, MAX_CREDITS};

/// What a lease is taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseTarget {
    /// A calendar counter (spent + leased units) under `limit`; its key
    /// expires at `expires` (the window's end plus a minute, as the spend
    /// script sets it).
    Counter {
        /// The counter's key.
        key: String,
        /// The quota's limit.
        limit: u64,
        /// When the counter key expires.
        expires: DateTime<Utc>,
    },
    /// An account's credit balance (credits neither spent nor leased).
    Credits {
        /// The balance's key.
        key: String,
    },
}

impl LeaseTarget {
    /// The counter's or balance's key: one lease per target and holder.
    pub fn key(&self) -> &str {
        match self {
            Self::Counter { key, .. } | Self::Credits { key } => key,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Counter { .. } => "q",
            Self::Credits { .. } => "c",
        }
    }
}

/// What one lease script call answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseAnswer {
    /// Units granted by a take, given back by a give, or held in live leases
    /// (a balance read or write).
    pub units: u64,
    /// The counter (spent + leased) or balance (free credits) after the call.
    pub counter: u64,
    /// Of the units the taker said it still holds, those it may keep
    /// spending: all of them, or 0 when its record had expired.
    pub kept: u64,
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

/// Reads the lease script's `{units, counter, kept}`, each within what the
/// call could have produced (`max_units`); anything else is corrupt.
fn lease_answer(out: &[i64], max_units: u64) -> Result<LeaseAnswer, StoreError> {
    let corrupt = || StoreError::Corrupt(format!("lease script answered {out:?}"));
    let [units, counter, kept] = out else { return Err(corrupt()) };
    let (Ok(units), Ok(counter), Ok(kept)) = (u64::try_from(*units), u64::try_from(*counter), u64::try_from(*kept))
    else {
        return Err(corrupt());
    };
    if units > max_units || counter > MAX_CREDITS || kept > MAX_CREDITS {
        return Err(corrupt());
    }
    Ok(LeaseAnswer { units, counter, kept })
}

impl RedisStore {
    /// The counter `quota` (a calendar one) uses at `now`; `None` for a rolling quota.
    pub fn counter_key(&self, account: &str, quota: &Quota, now: DateTime<Utc>) -> Option<String> {
        match quota.window {
            Window::Calendar(_) if is_valid_account_id(account) => self.keys.window(account, quota, now).pop(),
            _ => None,
        }
    }

    /// The key of `account`'s credit balance; `None` for an invalid id.
    pub fn credits_key(&self, account: &str) -> Option<String> {
        is_valid_account_id(account).then(|| self.keys.credits(account))
    }

    /// Takes a block of `target` for `holder`, which still holds `holds`
    /// unspent: all of `size.need` or nothing. The holder's record (kept units
    /// plus the grant) may be spent for `lifetime` from now, Redis time.
    pub async fn take_lease(
        &self,
        target: &LeaseTarget,
        holder: &str,
        holds: u64,
        size: BlockSize,
        lifetime: Duration,
    ) -> Result<LeaseAnswer, StoreError> {
        let (limit, expires) = match target {
            LeaseTarget::Counter { limit, expires, .. } => (*limit, millis(*expires)),
            LeaseTarget::Credits { .. } => (0, 0),
        };
        let mut conn = self.conn().await?;
        let out: Vec<i64> = self
            .lease
            .key(target.key())
            .key(keys::leases(target.key()))
            .arg("take")
            .arg(target.kind())
            .arg(holder)
            .arg(limit)
            .arg(size.need)
            .arg(size.max)
            .arg(size.divisor)
            .arg(expires)
            .arg(holds)
            .arg(u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let answer = lease_answer(&out, size.max.max(size.need).min(MAX_COST))?;
        if answer.kept > holds {
            return Err(StoreError::Corrupt(format!("lease script kept {} of {holds}", answer.kept)));
        }
        Ok(answer)
    }

    /// Gives back up to `units` of `holder`'s lease on `target` (never more
    /// than its live record says) and deletes the record.
    pub async fn give_lease(&self, target: &LeaseTarget, holder: &str, units: u64) -> Result<LeaseAnswer, StoreError> {
        let mut conn = self.conn().await?;
        let out: Vec<i64> = self
            .lease
            .key(target.key())
            .key(keys::leases(target.key()))
            .arg("give")
            .arg(target.kind())
            .arg(holder)
            .arg(units)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        lease_answer(&out, units)
    }

    /// Sets `account`'s credits counting the units in live leases: the
    /// balance becomes `credits` minus those (0 when they hold more).
    /// Answers the leased units and the balance.
    pub async fn set_leased_credits(&self, account: &str, credits: u64) -> Result<LeaseAnswer, StoreError> {
        let key = self.credits_key(account).ok_or_else(|| bad_account_id(account))?;
        if credits > MAX_CREDITS {
            return Err(StoreError::Corrupt(format!("credits {credits} are above MAX_CREDITS ({MAX_CREDITS})")));
        }
        let mut conn = self.conn().await?;
        let out: Vec<i64> = self
            .lease
            .key(&key)
            .key(keys::leases(&key))
            .arg("cset")
            .arg(credits)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let answer = lease_answer(&out, MAX_CREDITS)?;
        self.publish(&mut conn, Invalidation::Usage(account.to_owned())).await?;
        Ok(answer)
    }

    /// `account`'s free balance and the units in live leases of it.
    pub async fn leased_credits(&self, account: &str) -> Result<LeaseAnswer, StoreError> {
        let Some(key) = self.credits_key(account) else {
            return Ok(LeaseAnswer { units: 0, counter: 0, kept: 0 });
        };
        let mut conn = self.conn().await?;
        let out: Vec<i64> = self
            .lease
            .key(&key)
            .key(keys::leases(&key))
            .arg("cget")
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        lease_answer(&out, MAX_CREDITS)
    }
}
