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
use crate::bounds;
use crate::entitlement::{Account, MAX_WINDOW, Period, Quota, Status, Window, is_valid_account_id};
use crate::identity::{KeyHash, KeyMeta};
use crate::usage::{CreditBalance, MAX_COST, MAX_CREDITS, QuotaUsage, Spend, SpendAnswer};

/// The Lua scripts, exactly as the store sends them: public so they can be
/// audited, and called with `EVAL` and hostile arguments by tests.
///
/// Every script is integer-only and strict (SPEC §10). It parses each argument
/// and each stored value it reads as a decimal integer within its bound (at
/// most 16 digits, so exact as a Lua number, a double), and answers an error
/// reply — `TOLLGATE_BADARG` for an argument, `TOLLGATE_CORRUPT` for a stored
/// value — *before its first write*: Redis keeps whatever a script wrote
/// before it failed, so all-or-nothing holds only if nothing can fail after
/// the first write. Numbers are written with `%d`, never `tostring`, which in
/// Redis's Lua 5.1 prints 10^15 as `1e+15`.
pub mod lua {
    /// Bounds (the Rust constants, checked by a unit test) and parsers shared by every script.
    macro_rules! prelude {
        () => {
            r#"
local MAX_COST = 1000000000
local MAX_LIMIT = 1000000000000000
local MAX_CREDITS = 1000000000000000
local MAX_WINDOW_MS = 31622400000
local MAX_TIME_MS = 253402300799000
-- A decimal integer in [0, hi] given as a string; nil for anything else
-- (signs, dots, exponents, spaces, more than 16 digits, non-strings).
local function uint(s, hi)
  if type(s) ~= 'string' or #s == 0 or #s > 16 or not string.find(s, '^%d+$') then return nil end
  local n = tonumber(s)
  if n == nil or n > hi then return nil end
  return n
end
-- As uint, with an optional leading '-' down to lo.
local function int(s, lo, hi)
  if type(s) == 'string' and string.sub(s, 1, 1) == '-' then
    local n = uint(string.sub(s, 2), -lo)
    if n == nil then return nil end
    return -n
  end
  return uint(s, hi)
end
-- A stored integer (a GET/HGET reply; false when absent, which counts as 0).
local function stored(v, hi)
  if v == false or v == nil then return 0 end
  return uint(v, hi)
end
local function str(n) return string.format('%d', n) end
local function bad(what) return redis.error_reply('TOLLGATE_BADARG ' .. what) end
local function corrupt(what) return redis.error_reply('TOLLGATE_CORRUPT ' .. what) end
"#
        };
    }

    /// Check-and-spend of SPEC §4's atomicity paragraph. See the module doc for keys.
    ///
    /// ARGV: cost, credit cost (`''` for none), dry run (`0`/`1`), quota count
    /// n, then per quota: kind (`c` calendar / `r` rolling), limit, and the
    /// window's end (calendar, ms) or length (rolling, ms). KEYS: per quota its
    /// counter (calendar) or log and sums (rolling), then the credits key.
    /// Answers `{spent, balance (-1 without credits), sufficient}` and per
    /// quota `{used, exceeded, resets ms, retry ms}`.
    pub const SPEND: &str = concat!(
        prelude!(),
        r#"
local n = uint(ARGV[4], 1000)
if n == nil or #ARGV ~= 4 + 3 * n then return bad('quota count') end
local cost = uint(ARGV[1], MAX_COST)
if cost == nil then return bad('cost') end
local credit_cost = false
if ARGV[2] ~= '' then
  credit_cost = uint(ARGV[2], MAX_COST)
  if credit_cost == nil then return bad('credit cost') end
end
if ARGV[3] ~= '0' and ARGV[3] ~= '1' then return bad('dry run flag') end
local dry = ARGV[3] == '1'
local st, nk = {}, 1
for i = 1, n do
  local a = 2 + 3 * i
  local kind, limit, w = ARGV[a], uint(ARGV[a + 1], MAX_LIMIT), nil
  if limit == nil then return bad('limit') end
  if kind == 'c' then
    w = uint(ARGV[a + 2], MAX_TIME_MS)
    st[i] = {kind = kind, limit = limit, w = w, key = KEYS[nk]}
    nk = nk + 1
  elseif kind == 'r' then
    w = uint(ARGV[a + 2], MAX_WINDOW_MS)
    if w == 0 then w = nil end
    st[i] = {kind = kind, limit = limit, w = w, key = KEYS[nk], mkey = KEYS[nk + 1]}
    nk = nk + 2
  else
    return bad('window kind')
  end
  if w == nil then return bad('window') end
end
if #KEYS ~= nk then return bad('key count') end
local ckey = KEYS[nk]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function units(member)
  local u = string.match(member, '^%d+:%d+:(%d+)$')
  return u and uint(u, MAX_COST)
end

-- Read and check everything; nothing is written until all of it is known good.
local ok = true
for i = 1, n do
  local s = st[i]
  if s.kind == 'c' then
    s.used = stored(redis.call('GET', s.key), MAX_LIMIT)
    if s.used == nil then return corrupt('counter ' .. s.key) end
    s.resets, s.retry = s.w, s.w
  else
    s.cutoff = now - s.w
    local used = stored(redis.call('HGET', s.mkey, 'used'), MAX_LIMIT)
    local seq = stored(redis.call('HGET', s.mkey, 'seq'), MAX_LIMIT)
    if used == nil or seq == nil then return corrupt('rolling sums ' .. s.mkey) end
    local old = redis.call('ZRANGEBYSCORE', s.key, '-inf', str(s.cutoff))
    for _, m in ipairs(old) do
      local u = units(m)
      if u == nil then return corrupt('rolling log ' .. s.key) end
      used = used - u
    end
    if used < 0 then used = 0 end
    s.expired, s.used, s.resets, s.retry = #old > 0, used, now, now
    local newest = redis.call('ZRANGE', s.key, -1, -1, 'WITHSCORES')
    if #newest > 0 then
      local at = uint(newest[2], MAX_TIME_MS)
      if at == nil then return corrupt('rolling log ' .. s.key) end
      if at > s.cutoff then s.resets = at + s.w end
    end
    if used + cost > s.limit then
      -- The first instant enough old entries have aged out for `cost` to fit.
      s.retry = s.resets
      local live = redis.call('ZRANGEBYSCORE', s.key, '(' .. str(s.cutoff), '+inf', 'WITHSCORES')
      local left = used
      for j = 1, #live, 2 do
        local u, at = units(live[j]), uint(live[j + 1], MAX_TIME_MS)
        if u == nil or at == nil then return corrupt('rolling log ' .. s.key) end
        left = left - u
        if left + cost <= s.limit then
          s.retry = at + s.w
          break
        end
      end
    end
  end
  s.exceeded = s.used + cost > s.limit
  if s.exceeded then ok = false end
end
local balance, sufficient = -1, 1
if credit_cost then
  balance = stored(redis.call('GET', ckey), MAX_CREDITS)
  if balance == nil then return corrupt('credits ' .. ckey) end
  if balance < credit_cost then
    sufficient = 0
    ok = false
  end
end

-- Everything is checked: from here on nothing can fail half-way.
for i = 1, n do
  local s = st[i]
  if s.kind == 'r' and s.expired then
    redis.call('ZREMRANGEBYSCORE', s.key, '-inf', str(s.cutoff))
    redis.call('HSET', s.mkey, 'used', str(s.used))
  end
end
local spent = 0
if ok and not dry then
  spent = 1
  for i = 1, n do
    local s = st[i]
    if s.kind == 'c' then
      redis.call('INCRBY', s.key, str(cost))
      redis.call('PEXPIREAT', s.key, str(s.w + 60000))
    elseif cost > 0 then
      local seq = redis.call('HINCRBY', s.mkey, 'seq', 1)
      redis.call('ZADD', s.key, str(now), str(now) .. ':' .. str(seq) .. ':' .. str(cost))
      redis.call('HINCRBY', s.mkey, 'used', str(cost))
      redis.call('PEXPIRE', s.key, str(s.w + 1000))
      redis.call('PEXPIRE', s.mkey, str(s.w + 1000))
      s.resets = now + s.w
    end
    s.used = s.used + cost
  end
  if credit_cost then
    balance = redis.call('DECRBY', ckey, str(credit_cost))
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
"#
    );

    /// Writes an account unless the stored one applied a newer billing event.
    ///
    /// ARGV: the record's JSON, the event's ms (`''` when it carries none).
    /// A stored record whose event time cannot be read is replaced: the write repairs it.
    pub const PUT_IF_NEWER: &str = concat!(
        prelude!(),
        r#"
if #KEYS ~= 1 or #ARGV ~= 2 or ARGV[1] == '' then return bad('arguments') end
local event_ms = -1
if ARGV[2] ~= '' then
  event_ms = uint(ARGV[2], MAX_TIME_MS)
  if event_ms == nil then return bad('event time') end
end
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, obj = pcall(cjson.decode, cur)
  if ok and type(obj) == 'table' then
    local at = obj.billing_event_ms
    if type(at) == 'number' and at >= 0 and at <= MAX_TIME_MS and at > event_ms then return 0 end
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"#
    );

    /// Adds to a balance, refusing with no change when it would go below zero
    /// (-1) or above `MAX_CREDITS` (-2). ARGV: the signed delta.
    pub const ADD_CREDITS: &str = concat!(
        prelude!(),
        r#"
if #KEYS ~= 1 or #ARGV ~= 1 then return bad('arguments') end
local delta = int(ARGV[1], -MAX_CREDITS, MAX_CREDITS)
if delta == nil then return bad('delta') end
local cur = stored(redis.call('GET', KEYS[1]), MAX_CREDITS)
if cur == nil then return corrupt('credits ' .. KEYS[1]) end
local v = cur + delta
if v < 0 then return -1 end
if v > MAX_CREDITS then return -2 end
redis.call('SET', KEYS[1], str(v))
return v
"#
    );

    /// Removes a key from the index only if it belongs to the account. ARGV: the account id.
    pub const REVOKE: &str = concat!(
        prelude!(),
        r#"
if #KEYS ~= 1 or #ARGV ~= 1 or ARGV[1] == '' then return bad('arguments') end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"#
    );
}

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
    // Our scripts' own refusals: a bad argument is a bug here, a bad stored value a foreign writer.
    if matches!(e.code(), Some("TOLLGATE_BADARG" | "TOLLGATE_CORRUPT")) {
        return StoreError::Corrupt(e.to_string());
    }
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
                        Window::Rolling(d) => Some(window_ms(d)),
                        Window::Calendar(_) => None,
                    },
                })
                .collect(),
            stripe_customer: a.stripe_customer.clone(),
            billing_event_ms: a.billing_event_at.map(millis),
        }
    }

    /// The account, if every field is within [`bounds`]: a record written by
    /// another writer (or by hand) may hold anything, and what is read here
    /// later feeds time and counter arithmetic.
    fn into_account(self, id: &str) -> Result<Account, StoreError> {
        let corrupt = |why: String| StoreError::Corrupt(format!("account {id}: {why}"));
        if self.quotas.len() > bounds::MAX_ITEMS || self.features.len() > bounds::MAX_ITEMS {
            return Err(corrupt(format!("more than {} features or quotas", bounds::MAX_ITEMS)));
        }
        let mut quotas = Vec::with_capacity(self.quotas.len());
        for q in self.quotas {
            let window = match (q.period, q.per_ms) {
                (Some(p), None) => Window::Calendar(p),
                (None, Some(ms)) if (1..=window_ms(MAX_WINDOW)).contains(&ms) => {
                    Window::Rolling(Duration::from_millis(ms))
                }
                _ => return Err(corrupt(format!("quota {:?} has no valid window", q.meter))),
            };
            quotas.push(Quota { meter: q.meter, limit: q.limit, window });
        }
        let billing_event_at = match self.billing_event_ms {
            Some(ms) => Some(from_millis(ms).ok_or_else(|| corrupt(format!("billing_event_ms {ms} is out of range")))?),
            None => None,
        };
        let account = Account {
            id: id.to_owned(),
            plan: self.plan,
            status: self.status,
            past_due_since: self.past_due_since,
            expires_at: self.expires_at,
            blocked: self.blocked,
            extra_features: self.features.into_iter().collect(),
            quota_overrides: quotas,
            stripe_customer: self.stripe_customer,
            billing_event_at,
        };
        bounds::check_account(&account).map_err(StoreError::Corrupt)?;
        Ok(account)
    }
}

fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// The instant `ms` after the epoch; `None` outside chrono's range.
fn from_millis(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

/// A window's length in whole milliseconds, as keys and scripts carry it
/// (saturating: lengths past `MAX_WINDOW` are refused before they get here).
fn window_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A time the spend script answered, in ms; one outside chrono's range is corrupt.
fn script_time(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    from_millis(ms).ok_or_else(|| StoreError::Corrupt(format!("spend script answered the instant {ms}")))
}

/// What a spend that cannot fit answers without asking Redis: a cost or
/// credit cost above [`MAX_COST`] is exceeded / insufficient whatever the
/// counters hold, so the counters are not read (their `used` and the balance
/// show as 0).
fn oversized(spend: &Spend) -> SpendAnswer {
    let too_big = spend.cost > MAX_COST;
    let quotas = spend
        .quotas
        .iter()
        .map(|q| {
            let end = match q.window {
                Window::Calendar(p) => p.bounds(spend.now).1,
                Window::Rolling(d) => chrono::Duration::from_std(d)
                    .ok()
                    .and_then(|d| spend.now.checked_add_signed(d))
                    .unwrap_or(spend.now),
            };
            QuotaUsage { used: 0, exceeded: too_big, resets_at: end, retry_at: end }
        })
        .collect();
    let credits = spend.credits.map(|c| CreditBalance { balance: 0, sufficient: c <= MAX_COST });
    SpendAnswer { spent: false, quotas, credits }
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
            script: redis::Script::new(lua::SPEND),
            put_if_newer: redis::Script::new(lua::PUT_IF_NEWER),
            add_credits: redis::Script::new(lua::ADD_CREDITS),
            revoke: redis::Script::new(lua::REVOKE),
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
        bounds::check_account(account).map_err(StoreError::Corrupt)?;
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
        if !is_valid_account_id(id) {
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
        if !is_valid_account_id(id) {
            return Err(StoreError::Corrupt(format!("account id {id:?} cannot be a hash tag")));
        }
        // Checked here so the script's own checks are a second line, never the first.
        bounds::check_spend(spend).map_err(StoreError::Corrupt)?;
        if spend.cost > MAX_COST || spend.credits.is_some_and(|c| c > MAX_COST) {
            return Ok(oversized(spend));
        }
        let mut inv = self.script.prepare_invoke();
        inv.arg(spend.cost)
            .arg(spend.credits.map_or_else(String::new, |c| c.to_string()))
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
                    inv.arg("r").arg(q.limit).arg(window_ms(d));
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
        let mut quotas = Vec::with_capacity(spend.quotas.len());
        for (c, end) in out[3..].chunks_exact(4).zip(&ends) {
            let used = u64::try_from(c[0])
                .map_err(|_| StoreError::Corrupt(format!("spend script answered used = {}", c[0])))?;
            let (resets_at, retry_at) = match end {
                Some(end) => (*end, *end),
                None => (script_time(c[2])?, script_time(c[3])?),
            };
            quotas.push(QuotaUsage { used, exceeded: c[1] == 1, resets_at, retry_at });
        }
        let credits = match spend.credits {
            Some(_) => Some(CreditBalance {
                balance: u64::try_from(out[1])
                    .map_err(|_| StoreError::Corrupt(format!("spend script answered balance = {}", out[1])))?,
                sufficient: out[2] == 1,
            }),
            None => None,
        };
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
        // check_account (in record_json) keeps the event time within min_time..=max_time: never negative.
        let event_ms = account.billing_event_at.map_or_else(String::new, |t| millis(t).to_string());
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
        if !bounds::is_valid_customer_id(customer) {
            return Ok(None);
        }
        let mut conn = self.conn().await?;
        let id: Option<String> =
            redis::cmd("GET").arg(self.customer_key(customer)).query_async(&mut conn).await.map_err(unavailable)?;
        match id {
            Some(id) if !is_valid_account_id(&id) => {
                Err(StoreError::Corrupt(format!("customer {customer} maps to {id:?}")))
            }
            id => Ok(id),
        }
    }

    async fn put_key(&self, key: &KeyHash, account: &str, meta: &KeyMeta) -> Result<(), StoreError> {
        if !is_valid_account_id(account) {
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
        if !is_valid_account_id(account) {
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
        if !is_valid_account_id(account) {
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

    /// Refuses balances above [`MAX_CREDITS`]: callers validate first; this is the last line.
    async fn set_credits(&self, account: &str, credits: u64) -> Result<(), StoreError> {
        if !is_valid_account_id(account) {
            return Err(StoreError::Corrupt(format!("account id {account:?} cannot be a hash tag")));
        }
        if credits > MAX_CREDITS {
            return Err(StoreError::Corrupt(format!("credits {credits} are above MAX_CREDITS ({MAX_CREDITS})")));
        }
        let mut conn = self.conn().await?;
        redis::cmd("SET")
            .arg(self.credits_key(account))
            .arg(credits)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn credits(&self, account: &str) -> Result<u64, StoreError> {
        if !is_valid_account_id(account) {
            return Ok(0);
        }
        let mut conn = self.conn().await?;
        let v: Option<String> =
            redis::cmd("GET").arg(self.credits_key(account)).query_async(&mut conn).await.map_err(unavailable)?;
        let Some(v) = v else { return Ok(0) };
        // Digits only: a float, a sign or a balance past MAX_CREDITS was not written by us.
        v.parse::<u64>()
            .ok()
            .filter(|c| v.bytes().all(|b| b.is_ascii_digit()) && *c <= MAX_CREDITS)
            .ok_or_else(|| StoreError::Corrupt(format!("account {account}: credits {v:?}")))
    }

    async fn add_credits(&self, account: &str, delta: i64) -> Result<Option<u64>, StoreError> {
        if !is_valid_account_id(account) {
            return Err(StoreError::Corrupt(format!("account id {account:?} cannot be a hash tag")));
        }
        // Every balance is within 0..=MAX_CREDITS, so such a delta can only leave that range.
        if delta.unsigned_abs() > MAX_CREDITS {
            return Ok(None);
        }
        let mut conn = self.conn().await?;
        let v: i64 = self
            .add_credits
            .key(self.credits_key(account))
            .arg(delta)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        match v {
            // -1: below zero; -2: above MAX_CREDITS. Nothing changed.
            -2 | -1 => Ok(None),
            v => {
                u64::try_from(v).map(Some).map_err(|_| StoreError::Corrupt(format!("add-credits script answered {v}")))
            }
        }
    }

    async fn reset_usage(&self, account: &str, quotas: &[Quota], now: DateTime<Utc>) -> Result<(), StoreError> {
        if !is_valid_account_id(account) {
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
            // Events are remembered for days; a TTL past MAX_WINDOW is clipped, not overflowed.
            .arg(window_ms(ttl.min(MAX_WINDOW)).max(1))
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
    fn lua_bounds_match_the_rust_constants() {
        let want = [
            ("MAX_COST", MAX_COST),
            ("MAX_LIMIT", crate::usage::MAX_LIMIT),
            ("MAX_CREDITS", MAX_CREDITS),
            ("MAX_WINDOW_MS", window_ms(MAX_WINDOW)),
            ("MAX_TIME_MS", millis(crate::entitlement::max_time()) as u64),
        ];
        for script in [lua::SPEND, lua::PUT_IF_NEWER, lua::ADD_CREDITS, lua::REVOKE] {
            for (name, value) in want {
                assert!(script.contains(&format!("local {name} = {value}\n")), "{name} must be {value}");
            }
        }
    }

    /// Reads a stored record as `account` does: JSON, then bounds.
    fn read(json: &str) -> Result<Account, StoreError> {
        serde_json::from_str::<AccountRecord>(json)
            .map_err(|e| StoreError::Corrupt(e.to_string()))
            .and_then(|r| r.into_account("acct_x"))
    }

    #[test]
    fn stored_records_out_of_bounds_are_corrupt_not_panics() {
        let max_limit = crate::usage::MAX_LIMIT;
        let records = [
            r#"{"plan":"pro","quotas":[{"meter":"r","limit":5,"per_ms":9223372036854775808}]}"#.to_owned(),
            r#"{"plan":"pro","quotas":[{"meter":"r","limit":5,"per_ms":18446744073709551615}]}"#.to_owned(),
            r#"{"plan":"pro","quotas":[{"meter":"r","limit":5,"per_ms":0}]}"#.to_owned(),
            r#"{"plan":"pro","quotas":[{"meter":"r","limit":5,"per_ms":-1}]}"#.to_owned(),
            r#"{"plan":"pro","quotas":[{"meter":"r","limit":5,"per_ms":1.5}]}"#.to_owned(),
            format!(r#"{{"plan":"pro","quotas":[{{"meter":"r","limit":{},"period":"day"}}]}}"#, max_limit + 1),
            r#"{"plan":"pro","quotas":[{"meter":"r","limit":1e300,"period":"day"}]}"#.to_owned(),
            r#"{"plan":"pro","past_due_since":"+200000-01-01T00:00:00Z"}"#.to_owned(),
            r#"{"plan":"pro","past_due_since":"-0001-01-01T00:00:00Z"}"#.to_owned(),
            r#"{"plan":"pro","expires_at":"1969-12-31T23:59:59Z"}"#.to_owned(),
            r#"{"plan":"pro","billing_event_ms":9223372036854775807}"#.to_owned(),
            r#"{"plan":"pro","billing_event_ms":-9223372036854775808}"#.to_owned(),
            r#"{"plan":"pro","billing_event_ms":-1}"#.to_owned(),
            format!(r#"{{"plan":"{}"}}"#, "p".repeat(129)),
            r#"{"plan":""}"#.to_owned(),
            format!(r#"{{"plan":"pro","features":{:?}}}"#, vec!["f"; 257]),
            r#"{"plan":"pro","stripe_customer":"cus 1"}"#.to_owned(),
        ];
        for json in &records {
            assert!(matches!(read(json), Err(StoreError::Corrupt(_))), "{json} was accepted");
        }
        assert!(read(r#"{"plan":"pro","past_due_since":"9999-12-31T23:59:59Z"}"#).is_ok(), "max_time itself is fine");
    }

    #[tokio::test]
    async fn accounts_out_of_bounds_are_never_written() {
        let store = RedisStore::open("redis://127.0.0.1:1", "t:", Duration::from_millis(10)).unwrap();
        let good = Account { id: "acct_1".into(), plan: "pro".into(), ..Account::default() };
        assert!(store.record_json(&good).is_ok());
        for bad in [
            Account { past_due_since: Some(DateTime::<Utc>::MAX_UTC), ..good.clone() },
            Account { billing_event_at: Some(DateTime::<Utc>::MIN_UTC), ..good.clone() },
            Account {
                quota_overrides: vec![Quota { meter: "r".into(), limit: 1, window: Window::Rolling(Duration::MAX) }],
                ..good.clone()
            },
            Account { id: "{acct}".into(), ..good.clone() },
        ] {
            assert!(matches!(store.record_json(&bad), Err(StoreError::Corrupt(_))), "{bad:?}");
        }
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
