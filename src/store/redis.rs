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
//! | `P{acct}:keys` | set | SHA-256 hex of the account's API keys |
//! | `P{acct}:q:<meter>:<period>:<start ms>` | string (integer) | calendar counter; expires a minute after its window |
//! | `P{acct}:r:<meter>:<duration ms>` | sorted set | rolling log: member `<ms>:<seq>:<units>`, score = Redis time in ms |
//! | `P{acct}:r:<meter>:<duration ms>:m` | hash | rolling log's `used` sum and `seq` |
//! | `Pkey:<sha256 hex>` | string | API key hash → account id (a global index: looked up before the account is known) |
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

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{Invalidation, Store, StoreError};
use crate::entitlement::{Account, Period, Quota, Status, Window};
use crate::identity::{KeyHash, KeyMeta};
use crate::usage::{CreditBalance, QuotaUsage, Spend, SpendAnswer};

/// Check-and-spend of SPEC §4's atomicity paragraph. See the module doc for keys.
const SPEND_LUA: &str = r#"
local cost = tonumber(ARGV[1])
local credit_cost = tonumber(ARGV[2])
local dry = ARGV[3] == '1'
local n = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ok = true
local ki, ai = 1, 5
local st = {}
local function units(member)
  return tonumber(string.match(member, ':(%d+)$'))
end
for i = 1, n do
  local kind, limit, w = ARGV[ai], tonumber(ARGV[ai + 1]), tonumber(ARGV[ai + 2])
  ai = ai + 3
  if kind == 'c' then
    local key = KEYS[ki]
    ki = ki + 1
    local used = tonumber(redis.call('GET', key) or '0')
    local exceeded = used + cost > limit
    st[i] = {kind = kind, key = key, used = used, exceeded = exceeded, resets = w, retry = w, w = w}
  else
    local zkey, mkey = KEYS[ki], KEYS[ki + 1]
    ki = ki + 2
    local cutoff = now - w
    local used = tonumber(redis.call('HGET', mkey, 'used') or '0')
    local old = redis.call('ZRANGEBYSCORE', zkey, '-inf', cutoff)
    if #old > 0 then
      for _, m in ipairs(old) do used = used - units(m) end
      if used < 0 then used = 0 end
      redis.call('ZREMRANGEBYSCORE', zkey, '-inf', cutoff)
      redis.call('HSET', mkey, 'used', used)
    end
    local exceeded = used + cost > limit
    local resets = now
    local newest = redis.call('ZRANGE', zkey, -1, -1, 'WITHSCORES')
    if #newest > 0 then resets = tonumber(newest[2]) + w end
    local retry = now
    if exceeded then
      retry = resets
      local all = redis.call('ZRANGE', zkey, 0, -1, 'WITHSCORES')
      local left = used
      for j = 1, #all, 2 do
        left = left - units(all[j])
        if left + cost <= limit then
          retry = tonumber(all[j + 1]) + w
          break
        end
      end
    end
    st[i] = {kind = kind, key = zkey, mkey = mkey, used = used, exceeded = exceeded, resets = resets, retry = retry, w = w}
  end
  if st[i].exceeded then ok = false end
end
local ckey = KEYS[ki]
local balance, sufficient = -1, 1
if credit_cost >= 0 then
  balance = tonumber(redis.call('GET', ckey) or '0')
  if balance < credit_cost then
    sufficient = 0
    ok = false
  end
end
local spent = 0
if ok and not dry then
  spent = 1
  for i = 1, n do
    local s = st[i]
    if s.kind == 'c' then
      redis.call('INCRBY', s.key, cost)
      redis.call('PEXPIREAT', s.key, s.w + 60000)
    elseif cost > 0 then
      local seq = redis.call('HINCRBY', s.mkey, 'seq', 1)
      redis.call('ZADD', s.key, now, now .. ':' .. seq .. ':' .. cost)
      redis.call('HINCRBY', s.mkey, 'used', cost)
      redis.call('PEXPIRE', s.key, s.w + 1000)
      redis.call('PEXPIRE', s.mkey, s.w + 1000)
      s.resets = now + s.w
    end
    s.used = s.used + cost
  end
  if credit_cost >= 0 then
    balance = redis.call('DECRBY', ckey, credit_cost)
  end
end
local out = {spent, balance, sufficient}
for i = 1, n do
  local s = st[i]
  out[#out + 1] = s.used
  out[#out + 1] = s.exceeded and 1 or 0
  out[#out + 1] = s.resets
  out[#out + 1] = s.retry
end
return out
"#;

/// Writes an account unless the stored one applied a newer billing event.
const PUT_IF_NEWER_LUA: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, obj = pcall(cjson.decode, cur)
  if ok and type(obj) == 'table' and obj.billing_event_ms and tonumber(obj.billing_event_ms) > tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"#;

/// Adds to a balance unless it would go negative (-1: refused).
const ADD_CREDITS_LUA: &str = r#"
local v = tonumber(redis.call('GET', KEYS[1]) or '0') + tonumber(ARGV[1])
if v < 0 then return -1 end
redis.call('SET', KEYS[1], v)
return v
"#;

/// Removes a key from the index only if it belongs to the account.
const REVOKE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"#;

/// A connection to one Redis or a Redis Cluster; cheap to clone.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        p: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(p, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(p, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// How to reach the server(s).
enum Target {
    /// A `ConnectionManager`: multiplexed, reconnects by itself, connects lazily.
    Single(ConnectionManager),
    /// The cluster client connects on first use (it cannot connect lazily by
    /// itself), then keeps the connection, which follows slot moves and reconnects.
    Cluster { client: Box<ClusterClient>, conn: Mutex<Option<ClusterConnection>> },
}

/// The Redis-backed [`Store`].
pub struct RedisStore {
    target: Target,
    /// Plain (non-cluster) URLs to subscribe on; pub/sub messages reach every cluster node.
    subscribe_urls: Vec<String>,
    prefix: String,
    script: redis::Script,
    put_if_newer: redis::Script,
    add_credits: redis::Script,
    revoke: redis::Script,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    if e.is_timeout() || e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        StoreError::Unavailable(e.to_string())
    } else if e.kind() == redis::ErrorKind::Parse || e.kind() == redis::ErrorKind::UnexpectedReturnType {
        StoreError::Corrupt(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

/// Splits `redis+cluster://[user:pass@]h1:7000,h2:7001[/]` into one plain URL per node.
fn cluster_nodes(url: &str) -> Result<Vec<String>, StoreError> {
    let (scheme, rest) =
        url.split_once("://").ok_or_else(|| StoreError::Unavailable("store.url has no scheme".into()))?;
    let plain = if scheme.starts_with("rediss") { "rediss" } else { "redis" };
    let rest = rest.trim_end_matches('/');
    let (auth, hosts) = match rest.rfind('@') {
        Some(i) => (&rest[..=i], &rest[i + 1..]),
        None => ("", rest),
    };
    let nodes: Vec<String> =
        hosts.split(',').filter(|h| !h.trim().is_empty()).map(|h| format!("{plain}://{auth}{}", h.trim())).collect();
    if nodes.is_empty() {
        return Err(StoreError::Unavailable("store.url names no cluster node".into()));
    }
    Ok(nodes)
}

#[derive(Serialize, Deserialize)]
struct AccountRecord {
    plan: String,
    #[serde(default)]
    status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    past_due_since: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    blocked: bool,
    #[serde(default)]
    features: Vec<String>,
    #[serde(default)]
    quotas: Vec<QuotaRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stripe_customer: Option<String>,
    /// Milliseconds, so the put-if-newer script can compare without parsing dates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    billing_event_ms: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct QuotaRecord {
    meter: String,
    limit: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    period: Option<Period>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    per_ms: Option<u64>,
}

impl AccountRecord {
    fn of(a: &Account) -> Self {
        Self {
            plan: a.plan.clone(),
            status: a.status,
            past_due_since: a.past_due_since,
            expires_at: a.expires_at,
            blocked: a.blocked,
            features: a.extra_features.iter().cloned().collect(),
            quotas: a
                .quota_overrides
                .iter()
                .map(|q| QuotaRecord {
                    meter: q.meter.clone(),
                    limit: q.limit,
                    period: match q.window {
                        Window::Calendar(p) => Some(p),
                        Window::Rolling(_) => None,
                    },
                    per_ms: match q.window {
                        Window::Rolling(d) => Some(d.as_millis() as u64),
                        Window::Calendar(_) => None,
                    },
                })
                .collect(),
            stripe_customer: a.stripe_customer.clone(),
            billing_event_ms: a.billing_event_at.map(millis),
        }
    }

    fn into_account(self, id: &str) -> Result<Account, StoreError> {
        let mut quotas = Vec::with_capacity(self.quotas.len());
        for q in self.quotas {
            let window = match (q.period, q.per_ms) {
                (Some(p), None) => Window::Calendar(p),
                (None, Some(ms)) if ms > 0 => Window::Rolling(Duration::from_millis(ms)),
                _ => return Err(StoreError::Corrupt(format!("account {id}: quota {} has no valid window", q.meter))),
            };
            quotas.push(Quota { meter: q.meter, limit: q.limit, window });
        }
        Ok(Account {
            id: id.to_owned(),
            plan: self.plan,
            status: self.status,
            past_due_since: self.past_due_since,
            expires_at: self.expires_at,
            blocked: self.blocked,
            extra_features: self.features.into_iter().collect(),
            quota_overrides: quotas,
            stripe_customer: self.stripe_customer,
            billing_event_at: self.billing_event_ms.map(from_millis),
        })
    }
}

/// Account ids become hash tags: one with braces would escape its slot.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && !id.contains(['{', '}'])
}

fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or(DateTime::<Utc>::MIN_UTC)
}

impl RedisStore {
    /// A store for `url` (`redis://`, `rediss://`, `redis+cluster://`); does no
    /// I/O, so tollgate starts (NOT_SERVING) while Redis is still down.
    pub fn open(url: &str, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        let connect_timeout = timeout.max(Duration::from_millis(250));
        let cluster = url.contains("+cluster://");
        let (target, subscribe_urls) = if cluster {
            let nodes = cluster_nodes(url)?;
            let client = ClusterClient::builder(nodes.clone())
                .connection_timeout(connect_timeout)
                .retries(1)
                .build()
                .map_err(unavailable)?;
            (Target::Cluster { client: Box::new(client), conn: Mutex::new(None) }, nodes)
        } else {
            let client = redis::Client::open(url).map_err(unavailable)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            let manager = ConnectionManager::new_lazy_with_config(client, config).map_err(unavailable)?;
            (Target::Single(manager), vec![url.to_owned()])
        };
        Ok(Self {
            target,
            subscribe_urls,
            prefix: prefix.to_owned(),
            script: redis::Script::new(SPEND_LUA),
            put_if_newer: redis::Script::new(PUT_IF_NEWER_LUA),
            add_credits: redis::Script::new(ADD_CREDITS_LUA),
            revoke: redis::Script::new(REVOKE_LUA),
        })
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        match &self.target {
            Target::Single(m) => Ok(Conn::Single(m.clone())),
            Target::Cluster { client, conn } => {
                let mut guard = conn.lock().await;
                if let Some(c) = guard.as_ref() {
                    return Ok(Conn::Cluster(c.clone()));
                }
                let c = client.get_async_connection().await.map_err(unavailable)?;
                *guard = Some(c.clone());
                Ok(Conn::Cluster(c))
            }
        }
    }

    fn account_key(&self, id: &str) -> String {
        format!("{}{{{id}}}:account", self.prefix)
    }

    fn credits_key(&self, id: &str) -> String {
        format!("{}{{{id}}}:credits", self.prefix)
    }

    fn keys_key(&self, id: &str) -> String {
        format!("{}{{{id}}}:keys", self.prefix)
    }

    fn customer_key(&self, customer: &str) -> String {
        format!("{}customer:{customer}", self.prefix)
    }

    fn event_key(&self, id: &str) -> String {
        format!("{}event:{id}", self.prefix)
    }

    /// The keys of `q`'s current window: the calendar counter, or the rolling log's sums and log.
    fn window_keys(&self, id: &str, q: &Quota, now: DateTime<Utc>) -> Vec<String> {
        match q.window {
            Window::Calendar(p) => {
                let (start, _) = p.bounds(now);
                vec![format!("{}{{{id}}}:q:{}:{}:{}", self.prefix, q.meter, p.as_str(), millis(start))]
            }
            Window::Rolling(d) => {
                let log = format!("{}{{{id}}}:r:{}:{}", self.prefix, q.meter, d.as_millis());
                vec![log.clone(), format!("{log}:m")]
            }
        }
    }

    fn record_json(&self, account: &Account) -> Result<String, StoreError> {
        if !valid_id(&account.id) {
            return Err(StoreError::Corrupt(format!("account id {:?} cannot be a hash tag", account.id)));
        }
        serde_json::to_string(&AccountRecord::of(account)).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// Indexes the account's Stripe customer and tells every replica.
    async fn after_account_write(&self, conn: &mut Conn, account: &Account) -> Result<(), StoreError> {
        if let Some(customer) = &account.stripe_customer {
            redis::cmd("SET")
                .arg(self.customer_key(customer))
                .arg(&account.id)
                .query_async::<()>(conn)
                .await
                .map_err(unavailable)?;
        }
        self.publish(conn, Invalidation::Account(account.id.clone())).await
    }

    fn api_key_key(&self, key: &KeyHash) -> String {
        format!("{}key:{}", self.prefix, key.to_hex())
    }

    /// The pub/sub channel of cache invalidations.
    pub fn channel(&self) -> String {
        format!("{}invalidate", self.prefix)
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
        let urls = self.subscribe_urls.clone();
        let channel = self.channel();
        tokio::spawn(async move {
            let mut attempt = 0usize;
            loop {
                let url = &urls[attempt % urls.len()];
                attempt += 1;
                let subscribed = async {
                    let client = redis::Client::open(url.as_str())?;
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                };
                match tokio::time::timeout(Duration::from_secs(2), subscribed).await {
                    Ok(Ok(pubsub)) => {
                        tracing::debug!("subscribed to cache invalidations");
                        on_reconnect();
                        let mut messages = pubsub.into_on_message();
                        while let Some(msg) = messages.next().await {
                            let payload: String = msg.get_payload().unwrap_or_default();
                            if let Some(inv) = Invalidation::decode(&payload) {
                                on_message(inv).await;
                            }
                        }
                        tracing::warn!("invalidation subscription dropped; reconnecting");
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "cannot subscribe to invalidations yet"),
                    Err(_) => tracing::debug!("subscribing to invalidations timed out"),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn account_for_key(&self, key: &KeyHash) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("GET").arg(self.api_key_key(key)).query_async(&mut conn).await.map_err(unavailable)
    }

    async fn account(&self, id: &str) -> Result<Option<Arc<Account>>, StoreError> {
        if !valid_id(id) {
            return Ok(None);
        }
        let mut conn = self.conn().await?;
        let json: Option<String> =
            redis::cmd("GET").arg(self.account_key(id)).query_async(&mut conn).await.map_err(unavailable)?;
        let Some(json) = json else { return Ok(None) };
        let record: AccountRecord =
            serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(format!("account {id}: {e}")))?;
        Ok(Some(Arc::new(record.into_account(id)?)))
    }

    async fn spend(&self, spend: &Spend) -> Result<SpendAnswer, StoreError> {
        let id = &spend.account;
        if !valid_id(id) {
            return Err(StoreError::Corrupt(format!("account id {id:?} cannot be a hash tag")));
        }
        let mut inv = self.script.prepare_invoke();
        inv.arg(spend.cost)
            .arg(spend.credits.map_or(-1, |c| c as i64))
            .arg(u8::from(spend.dry_run))
            .arg(spend.quotas.len());
        let mut ends = Vec::with_capacity(spend.quotas.len());
        for q in &spend.quotas {
            for key in self.window_keys(id, q, spend.now) {
                inv.key(key);
            }
            match q.window {
                Window::Calendar(p) => {
                    let end = p.bounds(spend.now).1;
                    inv.arg("c").arg(q.limit).arg(millis(end));
                    ends.push(Some(end));
                }
                Window::Rolling(d) => {
                    inv.arg("r").arg(q.limit).arg(d.as_millis() as u64);
                    ends.push(None);
                }
            }
        }
        inv.key(self.credits_key(id));
        let mut conn = self.conn().await?;
        let out: Vec<i64> = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        if out.len() != 3 + 4 * spend.quotas.len() {
            return Err(StoreError::Corrupt(format!("spend script returned {} values", out.len())));
        }
        let quotas = out[3..]
            .chunks_exact(4)
            .zip(&ends)
            .map(|(c, end)| QuotaUsage {
                used: c[0].max(0) as u64,
                exceeded: c[1] == 1,
                resets_at: end.unwrap_or_else(|| from_millis(c[2])),
                retry_at: end.unwrap_or_else(|| from_millis(c[3])),
            })
            .collect();
        let credits = spend.credits.map(|_| CreditBalance { balance: out[1].max(0) as u64, sufficient: out[2] == 1 });
        Ok(SpendAnswer { spent: out[0] == 1, quotas, credits })
    }

    async fn put_account(&self, account: &Account) -> Result<(), StoreError> {
        let json = self.record_json(account)?;
        let mut conn = self.conn().await?;
        redis::cmd("SET")
            .arg(self.account_key(&account.id))
            .arg(json)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        self.after_account_write(&mut conn, account).await
    }

    async fn put_account_if_newer(&self, account: &Account) -> Result<bool, StoreError> {
        let json = self.record_json(account)?;
        let event_ms = account.billing_event_at.map_or(i64::MIN, millis);
        let mut conn = self.conn().await?;
        let written: i64 = self
            .put_if_newer
            .key(self.account_key(&account.id))
            .arg(json)
            .arg(event_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if written == 1 {
            self.after_account_write(&mut conn, account).await?;
        }
        Ok(written == 1)
    }

    async fn account_for_customer(&self, customer: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("GET").arg(self.customer_key(customer)).query_async(&mut conn).await.map_err(unavailable)
    }

    async fn put_key(&self, key: &KeyHash, account: &str, meta: &KeyMeta) -> Result<(), StoreError> {
        if !valid_id(account) {
            return Err(StoreError::Corrupt(format!("account id {account:?} cannot be a hash tag")));
        }
        let meta = serde_json::to_string(meta).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut conn = self.conn().await?;
        redis::cmd("HSET")
            .arg(self.keys_key(account))
            .arg(key.to_hex())
            .arg(meta)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        redis::cmd("SET")
            .arg(self.api_key_key(key))
            .arg(account)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        self.publish(&mut conn, Invalidation::Key(*key)).await
    }

    async fn revoke_key(&self, account: &str, key: &KeyHash) -> Result<bool, StoreError> {
        if !valid_id(account) {
            return Ok(false);
        }
        let mut conn = self.conn().await?;
        let removed: i64 =
            self.revoke.key(self.api_key_key(key)).arg(account).invoke_async(&mut conn).await.map_err(unavailable)?;
        redis::cmd("HDEL")
            .arg(self.keys_key(account))
            .arg(key.to_hex())
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        self.publish(&mut conn, Invalidation::Key(*key)).await?;
        Ok(removed == 1)
    }

    async fn list_keys(&self, account: &str) -> Result<Vec<(KeyHash, KeyMeta)>, StoreError> {
        if !valid_id(account) {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let all: std::collections::HashMap<String, String> =
            redis::cmd("HGETALL").arg(self.keys_key(account)).query_async(&mut conn).await.map_err(unavailable)?;
        let mut keys = Vec::with_capacity(all.len());
        for (hex, meta) in all {
            let hash = KeyHash::from_hex(&hex).ok_or_else(|| StoreError::Corrupt(format!("key id {hex:?}")))?;
            let meta: KeyMeta =
                serde_json::from_str(&meta).map_err(|e| StoreError::Corrupt(format!("key {hex}: {e}")))?;
            keys.push((hash, meta));
        }
        keys.sort_by(|a, b| a.1.created_at.cmp(&b.1.created_at).then(a.0.0.cmp(&b.0.0)));
        Ok(keys)
    }

    async fn set_credits(&self, account: &str, credits: u64) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("SET")
            .arg(self.credits_key(account))
            .arg(credits)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn credits(&self, account: &str) -> Result<u64, StoreError> {
        let mut conn = self.conn().await?;
        let v: Option<i64> =
            redis::cmd("GET").arg(self.credits_key(account)).query_async(&mut conn).await.map_err(unavailable)?;
        Ok(v.unwrap_or(0).max(0) as u64)
    }

    async fn add_credits(&self, account: &str, delta: i64) -> Result<Option<u64>, StoreError> {
        let mut conn = self.conn().await?;
        let v: i64 = self
            .add_credits
            .key(self.credits_key(account))
            .arg(delta)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(u64::try_from(v).ok())
    }

    async fn reset_usage(&self, account: &str, quotas: &[Quota], now: DateTime<Utc>) -> Result<(), StoreError> {
        if !valid_id(account) {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        for q in quotas {
            for key in self.window_keys(account, q, now) {
                redis::cmd("DEL").arg(key).query_async::<()>(&mut conn).await.map_err(unavailable)?;
            }
        }
        Ok(())
    }

    async fn remember_event(&self, id: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let set: Option<String> = redis::cmd("SET")
            .arg(self.event_key(id))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(set.is_some())
    }

    async fn forget_event(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("DEL").arg(self.event_key(id)).query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("PING").query_async::<()>(&mut conn).await.map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_split_into_nodes_keeping_credentials() {
        assert_eq!(
            cluster_nodes("redis+cluster://u:p@h1:7000,h2:7001/").unwrap(),
            vec!["redis://u:p@h1:7000".to_string(), "redis://u:p@h2:7001".to_string()]
        );
        assert_eq!(cluster_nodes("rediss+cluster://h1:7000").unwrap(), vec!["rediss://h1:7000".to_string()]);
    }

    #[test]
    fn invalidations_round_trip() {
        for inv in [Invalidation::Account("acct_1".into()), Invalidation::Key(KeyHash::of("k"))] {
            assert_eq!(Invalidation::decode(&inv.encode()), Some(inv));
        }
        assert_eq!(Invalidation::decode("key:zz"), None);
    }

    #[test]
    fn account_records_round_trip() {
        let a = Account {
            id: "a".into(),
            plan: "pro".into(),
            status: Status::PastDue,
            past_due_since: Some(Utc::now()),
            quota_overrides: vec![
                Quota { meter: "r".into(), limit: 5, window: Window::Rolling(Duration::from_secs(2)) },
                Quota { meter: "r".into(), limit: 9, window: Window::Calendar(Period::Day) },
            ],
            extra_features: ["x".to_string()].into(),
            ..Account::default()
        };
        let json = serde_json::to_string(&AccountRecord::of(&a)).unwrap();
        let back = serde_json::from_str::<AccountRecord>(&json).unwrap().into_account("a").unwrap();
        assert_eq!(back, a);
    }
}
