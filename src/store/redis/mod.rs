//! The Redis store: the source of truth shared by every replica, on one Redis
//! or a Redis Cluster.
//!
//! Key layout (prefix `P`, default `tollgate:`; every key of one account
//! carries the hash tag `{<account>}`, so one account lives in one cluster
//! slot and one Lua script can touch all of its counters atomically):
//!
//! | key | type | what |
//! |---|---|---|
//! | `P{acct}:account` | string (JSON) | the entitlement |
//! | `P{acct}:credits` | string (integer) | prepaid balance |
//! | `P{acct}:keys` | hash | SHA-256 hex of the account's API keys → what operators may see of them |
//! | `P{acct}:q:<meter>:<period>:<start ms>` | string (integer) | calendar counter; expires a minute after its window |
//! | `P{acct}:q:<meter>:<period>:<start ms>:leases` | hash | lease mode: holder id → units leased from that counter and not given back ([`super::lease`]); expires with the counter |
//! | `P{acct}:rb:<meter>:<duration ms>` | hash | rolling window's buckets ([`super::rolling`]): bucket index (Redis time ms / width) → units; at most 17 fields; expires when its newest bucket leaves the window |
//! | `Pkey:<sha256 hex>` | string | API key hash → account id (a global index: looked up before the account is known) |
//! | `Pcustomer:<id>` | string | Stripe customer → account id |
//! | `Pevent:<id>` | string | a webhook event already handled, for its TTL |
//! | `P{acct}:events` | stream | the account's outbox ([`outbox`]): CloudEvents JSON in field `e`, consumer group `tollgate`; deleted when empty and idle |
//! | `P{acct}:th:<meter>:<period>:<start ms>:<permille>` / `P{acct}:th:credits:<level>:<day ms>` | string | a threshold that fired; expires with its window (or day) |
//! | `Poutbox` | sorted set | accounts whose outbox may hold events, scored by last write (ms) |
//! | `P{acct}:settled:<slot>` | hash | charge id → 1 for charges issued in that ten-minute slot (ms ÷ 600,000) and settled from the access log; expires when such a charge is too old to settle |
//! | `Pcharge-key` | string (hex) | the secret charges are signed with, shared by every replica |
//! | `Pinvalidate` | pub/sub channel | `account:<id>` / `key:<hex>` on every change |
//!
//! Times: calendar windows come from the caller's clock (`Spend::now`): a
//! replica whose clock is off by δ counts a request made within δ of a window
//! boundary in the neighbouring window, nothing more. Rolling windows use Redis
//! `TIME` inside the script: all of an account's keys live on one server, so
//! every replica measures a rate against the same clock, whatever their skew.
//!
//! One allowed Check costs one round trip: `EVALSHA` of the spend script (the
//! entitlement and key lookups are cached above this store).
//!
//! | module | what | may use |
//! |---|---|---|
//! | [`lua`] (`*.lua`) | the scripts, as sent | nothing |
//! | `keys` | key names, millisecond forms | `entitlement`, `identity` |
//! | `records` | stored values: encode, decode, bounds | `keys`, `entitlement`, `identity`, `usage`, `bounds` |
//! | `connection` | single/cluster connections, pub/sub, error mapping | `store::{Invalidation, StoreError}` |
//! | `spend` | the spend script's arguments and answer | `keys`, `entitlement`, `usage` |
//! | this file | [`RedisStore`] and its [`Store`] impl | all of the above |

mod connection;
mod keys;
mod leases;
pub mod lua;
mod outbox;
mod records;
mod settle;
mod spend;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use self::connection::{Conn, Connections, unavailable};
use self::keys::{Keys, millis, window_ms};
pub use self::leases::{BlockSize, LeaseAnswer, LeaseTarget};
use super::{Invalidation, Reply, Store, StoreError};
use crate::bounds;
use crate::entitlement::{Account, MAX_WINDOW, Quota, is_valid_account_id};
use crate::identity::{KeyHash, KeyMeta};
use crate::usage::{Adjustment, MAX_CREDITS, OutboxEvent, Settled, Spend, SpendAnswer};

/// The Redis-backed [`Store`].
pub struct RedisStore {
    connections: Connections,
    keys: Keys,
    script: redis::Script,
    put_if_newer: redis::Script,
    add_credits: redis::Script,
    revoke: redis::Script,
    lease: redis::Script,
    settle: redis::Script,
    outbox: outbox::Scripts,
    sweep: std::sync::Mutex<outbox::Sweep>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore").field("prefix", &self.keys.prefix()).finish_non_exhaustive()
    }
}

/// The error for an id that cannot be a hash tag (nothing is written under it).
fn bad_account_id(id: &str) -> StoreError {
    StoreError::Corrupt(format!("account id {id:?} cannot be a hash tag"))
}

impl RedisStore {
    /// A store for `url` (`redis://`, `rediss://`, `redis+cluster://`); does no
    /// I/O, so tollgate starts (NOT_SERVING) while Redis is still down.
    pub fn open(url: &str, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        Ok(Self {
            connections: Connections::open(url, timeout)?,
            keys: Keys::new(prefix),
            script: redis::Script::new(lua::SPEND),
            put_if_newer: redis::Script::new(lua::PUT_IF_NEWER),
            add_credits: redis::Script::new(lua::ADD_CREDITS),
            revoke: redis::Script::new(lua::REVOKE),
            lease: redis::Script::new(lua::LEASE),
            settle: redis::Script::new(lua::SETTLE),
            outbox: outbox::Scripts::default(),
            sweep: std::sync::Mutex::new(outbox::Sweep::default()),
        })
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        self.connections.get().await
    }

    /// The pub/sub channel of cache invalidations.
    pub fn channel(&self) -> String {
        self.keys.channel()
    }

    /// Indexes the account's Stripe customer and tells every replica.
    async fn after_account_write(&self, conn: &mut Conn, account: &Account) -> Result<(), StoreError> {
        if let Some(customer) = &account.stripe_customer {
            redis::cmd("SET")
                .arg(self.keys.customer(customer))
                .arg(&*account.id)
                .query_async::<()>(conn)
                .await
                .map_err(unavailable)?;
        }
        self.publish(conn, Invalidation::Account(account.id.to_string())).await
    }

    async fn publish(&self, conn: &mut Conn, what: Invalidation) -> Result<(), StoreError> {
        redis::cmd("PUBLISH").arg(self.channel()).arg(what.encode()).query_async::<()>(conn).await.map_err(unavailable)
    }

    /// Listens for invalidations for as long as the returned task lives,
    /// reconnecting by itself (to the next node, on a cluster) when the
    /// subscription drops. `on_reconnect` runs after every (re)subscription:
    /// changes made while disconnected were missed, so callers flush their cache.
    pub fn spawn_listener<F, Fut>(
        &self,
        on_message: F,
        on_reconnect: impl Fn() + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn(Invalidation) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        self.connections.spawn_listener(self.channel(), on_message, on_reconnect)
    }
}

#[async_trait]
impl Store for RedisStore {
    fn account_for_key<'a>(&'a self, key: &'a KeyHash) -> Reply<'a, Result<Option<Arc<str>>, StoreError>> {
        Reply::later(async move {
            let mut conn = self.conn().await?;
            let id: Option<String> =
                redis::cmd("GET").arg(self.keys.api_key(key)).query_async(&mut conn).await.map_err(unavailable)?;
            Ok(id.map(Arc::from))
        })
    }

    fn account<'a>(&'a self, id: &'a str) -> Reply<'a, Result<Option<Arc<Account>>, StoreError>> {
        Reply::later(async move {
            if !is_valid_account_id(id) {
                return Ok(None);
            }
            let mut conn = self.conn().await?;
            let json: Option<String> =
                redis::cmd("GET").arg(self.keys.account(id)).query_async(&mut conn).await.map_err(unavailable)?;
            let Some(json) = json else { return Ok(None) };
            Ok(Some(Arc::new(records::decode_account(id, &json)?)))
        })
    }

    fn spend<'a>(&'a self, spend: &'a Spend) -> Reply<'a, Result<SpendAnswer, StoreError>> {
        Reply::later(async move {
            if !is_valid_account_id(&spend.account) {
                return Err(bad_account_id(&spend.account));
            }
            // Checked here so the script's own checks are a second line, never the first.
            bounds::check_spend(spend).map_err(StoreError::Corrupt)?;
            if spend::is_oversized(spend) {
                return Ok(spend::oversized(spend));
            }
            let (invocation, ends) = spend::invocation(&self.script, &self.keys, spend);
            let mut conn = self.conn().await?;
            let out: Vec<i64> = invocation.invoke_async(&mut conn).await.map_err(unavailable)?;
            spend::answer(&out, spend, &ends)
        })
    }

    async fn put_account(&self, account: &Account) -> Result<(), StoreError> {
        let json = records::encode_account(account)?;
        let mut conn = self.conn().await?;
        redis::cmd("SET")
            .arg(self.keys.account(&account.id))
            .arg(json)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        self.after_account_write(&mut conn, account).await
    }

    async fn put_account_if_newer(&self, account: &Account) -> Result<bool, StoreError> {
        let json = records::encode_account(account)?;
        let mut conn = self.conn().await?;
        let written: i64 = self
            .put_if_newer
            .key(self.keys.account(&account.id))
            .arg(json)
            .arg(records::billing_event_arg(account))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if written == 1 {
            self.after_account_write(&mut conn, account).await?;
        }
        Ok(written == 1)
    }

    async fn account_for_customer(&self, customer: &str) -> Result<Option<String>, StoreError> {
        if !bounds::is_valid_customer_id(customer) {
            return Ok(None);
        }
        let mut conn = self.conn().await?;
        let id: Option<String> =
            redis::cmd("GET").arg(self.keys.customer(customer)).query_async(&mut conn).await.map_err(unavailable)?;
        match id {
            Some(id) if !is_valid_account_id(&id) => {
                Err(StoreError::Corrupt(format!("customer {customer} maps to {id:?}")))
            }
            id => Ok(id),
        }
    }

    async fn put_key(&self, key: &KeyHash, account: &str, meta: &KeyMeta) -> Result<(), StoreError> {
        if !is_valid_account_id(account) {
            return Err(bad_account_id(account));
        }
        let meta = records::encode_key_meta(meta)?;
        let mut conn = self.conn().await?;
        redis::cmd("HSET")
            .arg(self.keys.account_keys(account))
            .arg(key.to_hex())
            .arg(meta)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        redis::cmd("SET")
            .arg(self.keys.api_key(key))
            .arg(account)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        self.publish(&mut conn, Invalidation::Key(*key)).await
    }

    async fn revoke_key(&self, account: &str, key: &KeyHash) -> Result<bool, StoreError> {
        if !is_valid_account_id(account) {
            return Ok(false);
        }
        let mut conn = self.conn().await?;
        let removed: i64 =
            self.revoke.key(self.keys.api_key(key)).arg(account).invoke_async(&mut conn).await.map_err(unavailable)?;
        redis::cmd("HDEL")
            .arg(self.keys.account_keys(account))
            .arg(key.to_hex())
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        self.publish(&mut conn, Invalidation::Key(*key)).await?;
        Ok(removed == 1)
    }

    async fn list_keys(&self, account: &str) -> Result<Vec<(KeyHash, KeyMeta)>, StoreError> {
        if !is_valid_account_id(account) {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let all: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.account_keys(account))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut keys = all.iter().map(|(hex, meta)| records::decode_key(hex, meta)).collect::<Result<Vec<_>, _>>()?;
        keys.sort_by(|a, b| a.1.created_at.cmp(&b.1.created_at).then(a.0.0.cmp(&b.0.0)));
        Ok(keys)
    }

    /// Refuses balances above [`MAX_CREDITS`]: callers validate first; this is the last line.
    async fn set_credits(&self, account: &str, credits: u64) -> Result<(), StoreError> {
        if !is_valid_account_id(account) {
            return Err(bad_account_id(account));
        }
        if credits > MAX_CREDITS {
            return Err(StoreError::Corrupt(format!("credits {credits} are above MAX_CREDITS ({MAX_CREDITS})")));
        }
        let mut conn = self.conn().await?;
        redis::cmd("SET")
            .arg(self.keys.credits(account))
            .arg(credits)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        self.publish(&mut conn, Invalidation::Usage(account.to_owned())).await
    }

    async fn credits(&self, account: &str) -> Result<u64, StoreError> {
        if !is_valid_account_id(account) {
            return Ok(0);
        }
        let mut conn = self.conn().await?;
        let v: Option<String> =
            redis::cmd("GET").arg(self.keys.credits(account)).query_async(&mut conn).await.map_err(unavailable)?;
        v.map_or(Ok(0), |v| records::decode_credits(account, &v))
    }

    async fn add_credits(&self, account: &str, delta: i64) -> Result<Option<u64>, StoreError> {
        if !is_valid_account_id(account) {
            return Err(bad_account_id(account));
        }
        // Every balance is within 0..=MAX_CREDITS, so such a delta can only leave that range.
        if delta.unsigned_abs() > MAX_CREDITS {
            return Ok(None);
        }
        let mut conn = self.conn().await?;
        let v: i64 = self
            .add_credits
            .key(self.keys.credits(account))
            .arg(delta)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        match v {
            // -1: below zero; -2: above MAX_CREDITS. Nothing changed.
            -2 | -1 => Ok(None),
            v => {
                let balance =
                    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("add-credits script answered {v}")))?;
                self.publish(&mut conn, Invalidation::Usage(account.to_owned())).await?;
                Ok(Some(balance))
            }
        }
    }

    async fn reset_usage(&self, account: &str, quotas: &[Quota], now: DateTime<Utc>) -> Result<(), StoreError> {
        if !is_valid_account_id(account) {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        for q in quotas {
            for key in self.keys.window(account, q, now) {
                match q.window {
                    // Units leased (lease mode) stay counted: their holders may
                    // still spend them. Without leases this is a DEL.
                    crate::entitlement::Window::Calendar(p) => {
                        let expires = p.bounds(now).1 + chrono::Duration::minutes(1);
                        let _: Vec<i64> = self
                            .lease
                            .key(&key)
                            .key(keys::leases(&key))
                            .arg("reset")
                            .arg(millis(expires))
                            .invoke_async(&mut conn)
                            .await
                            .map_err(unavailable)?;
                    }
                    crate::entitlement::Window::Rolling(_) => {
                        redis::cmd("DEL").arg(key).query_async::<()>(&mut conn).await.map_err(unavailable)?;
                    }
                }
            }
        }
        self.publish(&mut conn, Invalidation::Usage(account.to_owned())).await
    }

    async fn remember_event(&self, id: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let set: Option<String> = redis::cmd("SET")
            .arg(self.keys.event(id))
            .arg(1)
            .arg("NX")
            .arg("PX")
            // Events are remembered for days; a TTL past MAX_WINDOW is clipped, not overflowed.
            .arg(window_ms(ttl.min(MAX_WINDOW)).max(1))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(set.is_some())
    }

    async fn forget_event(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("DEL").arg(self.keys.event(id)).query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    async fn settle(&self, adj: &Adjustment) -> Result<Settled, StoreError> {
        let mut answers = self.settle_many(std::slice::from_ref(adj)).await?;
        answers.pop().ok_or_else(|| StoreError::Corrupt("settle script answered nothing".into()))
    }

    async fn settle_many(&self, adjustments: &[Adjustment]) -> Result<Vec<Settled>, StoreError> {
        let Some(first) = adjustments.first() else { return Ok(Vec::new()) };
        if !is_valid_account_id(&first.account) {
            return Err(bad_account_id(&first.account));
        }
        if adjustments.iter().any(|a| a.account != first.account) {
            return Err(StoreError::Corrupt("settle_many takes one account's adjustments".into()));
        }
        let calls = settle::calls(&self.settle, &self.keys, adjustments)?;
        let mut conn = self.conn().await?;
        if calls.iter().any(|c| c.events) {
            // Indexed first: a consumer finds every account that may have events.
            outbox::index(&mut conn, &self.keys, &self.sweep, &first.account).await?;
        }
        let mut answers = vec![None; adjustments.len()];
        for call in calls {
            let out: Vec<i64> = call.invocation.invoke_async(&mut conn).await.map_err(unavailable)?;
            settle::answer(&out, &call.positions, &mut answers)?;
        }
        answers
            .into_iter()
            .map(|a| a.ok_or_else(|| StoreError::Corrupt("settle script left an adjustment unanswered".into())))
            .collect()
    }

    async fn outbox_claim(
        &self,
        consumer: &str,
        max: usize,
        reclaim_after: Duration,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let mut conn = self.conn().await?;
        outbox::claim(&mut conn, &self.keys, &self.outbox, &self.sweep, consumer, max, reclaim_after).await
    }

    async fn outbox_ack(&self, events: &[OutboxEvent]) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        outbox::ack(&mut conn, &self.keys, &self.sweep, events).await
    }

    async fn record_settled(
        &self,
        account: &str,
        issued: DateTime<Utc>,
        ids: &[String],
        until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if !is_valid_account_id(account) {
            return Err(bad_account_id(account));
        }
        if ids.is_empty() {
            return Ok(());
        }
        let key = self.keys.settled(account, issued);
        let mut pipe = redis::pipe();
        let hset = pipe.cmd("HSET").arg(&key);
        for id in ids {
            hset.arg(id).arg(1);
        }
        hset.ignore();
        pipe.cmd("PEXPIREAT").arg(&key).arg(millis(until)).ignore();
        let mut conn = self.conn().await?;
        pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    async fn charge_key(&self) -> Result<[u8; 32], StoreError> {
        let mut conn = self.conn().await?;
        let mut fresh = [0u8; 32];
        getrandom::fill(&mut fresh).map_err(|e| StoreError::Unavailable(format!("no randomness: {e}")))?;
        // The first replica to ask makes it; every other one reads that one.
        let key = self.keys.charge_key();
        redis::cmd("SET")
            .arg(&key)
            .arg(hex::encode(fresh))
            .arg("NX")
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        let stored: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await.map_err(unavailable)?;
        stored
            .and_then(|s| hex::decode(s).ok())
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| StoreError::Corrupt(format!("{key} is not 32 bytes of hex")))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("PING").query_async::<()>(&mut conn).await.map_err(unavailable)
    }
}

#[cfg(test)]
mod tests;
