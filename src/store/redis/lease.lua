-- Lease mode (src/store/lease.rs). KEYS[1]: a calendar counter ('q': spent +
-- leased units, so exact spends by other replicas stay correct) or a credits
-- balance ('c': credits neither spent nor leased); KEYS[2]: its lease records,
-- a hash holder id -> "units:deadline" (units leased and perhaps unspent; the
-- Redis time in ms after which the holder may no longer spend them). Every
-- call reads and checks everything before it writes. Answers
-- {units granted / given back / leased, counter or balance after, units kept}.
local op = ARGV[1]
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

-- A record's units and deadline: 0, 0 when absent; nil when corrupt.
local function record(v)
  if v == false or v == nil then return 0, 0 end
  if type(v) ~= 'string' then return nil, nil end
  local u, d = string.match(v, '^(%d+):(%d+)$')
  if u == nil then return nil, nil end
  u = uint(u, MAX_CREDITS)
  d = uint(d, MAX_TIME_MS + 3600000)
  if u == nil or d == nil then return nil, nil end
  return u, d
end
-- A counter's expiry as the caller computed it (its window's end + 1 min,
-- by its clock), but never less than a minute from Redis's now: a replica
-- whose clock lags must find what it counted (a past expiry deletes at once).
local function expiry_at(expiry)
  return math.max(expiry, now_ms + 60000)
end
-- The units a holder may still spend: 0 when absent or past its deadline.
local function live(v)
  local u, d = record(v)
  if u == nil then return nil end
  if d <= now_ms then return 0 end
  return u
end
-- The live records' units, and the holders whose records expired (for the
-- caller to delete once everything is checked); nil when one is corrupt.
local function sum_live()
  local all = redis.call('HGETALL', KEYS[2])
  local sum, dead = 0, {}
  for i = 1, #all, 2 do
    local u, d = record(all[i + 1])
    if u == nil then return nil, nil end
    if d <= now_ms then dead[#dead + 1] = all[i] else sum = sum + u end
  end
  if sum > MAX_CREDITS then return nil, nil end
  return sum, dead
end
local function forget(dead)
  if #dead > 0 then redis.call('HDEL', KEYS[2], unpack(dead)) end
end
local function holder_ok(h) return type(h) == 'string' and #h > 0 and #h <= 64 end
-- The counter or balance; nil when corrupt.
local function current(kind)
  if kind == 'q' then return stored(redis.call('GET', KEYS[1]), MAX_LIMIT) end
  return stored(redis.call('GET', KEYS[1]), MAX_CREDITS)
end

if op == 'take' then
  -- ARGV: op, kind, holder, limit (q), need, max block, divisor, key expiry
  -- (ms; q), units the holder still holds unspent, lifetime (ms). The record
  -- becomes what it keeps plus the grant, with a new deadline (so a take
  -- also renews); it overstates the holder's unspent units by at most what
  -- the holder spent since its last take.
  if #ARGV ~= 10 then return bad('lease argument count') end
  local kind, holder = ARGV[2], ARGV[3]
  if (kind ~= 'q' and kind ~= 'c') or not holder_ok(holder) then return bad('lease kind or holder') end
  local limit = uint(ARGV[4], MAX_LIMIT)
  local need = uint(ARGV[5], MAX_COST)
  local max_block = uint(ARGV[6], MAX_COST)
  local divisor = uint(ARGV[7], MAX_COST)
  local expiry = uint(ARGV[8], MAX_TIME_MS + 60000)
  local holds = uint(ARGV[9], MAX_CREDITS)
  local lifetime = uint(ARGV[10], 3600000)
  if limit == nil or need == nil or max_block == nil or divisor == nil or divisor == 0 or expiry == nil
    or holds == nil or lifetime == nil or lifetime == 0 then
    return bad('lease arguments')
  end
  local held = live(redis.call('HGET', KEYS[2], holder))
  if held == nil then return corrupt('lease record ' .. KEYS[2]) end
  -- Units the holder claims beyond its live record (expired, deleted by a
  -- reset, or never there) are forfeit: they stay counted as spent.
  local kept = holds
  if holds > held then kept = 0 end
  local cur = current(kind)
  if cur == nil then return corrupt('lease counter ' .. KEYS[1]) end
  local free = cur
  if kind == 'q' then
    free = limit - cur
    if free < 0 then free = 0 end
  end
  local grant = 0
  if free >= need and free > 0 then
    -- Large far from the limit, 1 near it: the last units go one by one. A
    -- renewal (need 0) asks at most what tops the holder up to one block
    -- (max block 0: nothing).
    local block = math.floor(free / divisor)
    if block > max_block then block = max_block end
    if block < 1 and max_block > 0 then block = 1 end
    if block < need then block = need end
    if block > free then block = free end
    grant = block
  end
  if kept + grant > MAX_CREDITS then grant = 0 end
  if grant > 0 then
    if kind == 'q' then
      cur = redis.call('INCRBY', KEYS[1], str(grant))
      redis.call('PEXPIREAT', KEYS[1], str(expiry_at(expiry)))
    else
      cur = redis.call('DECRBY', KEYS[1], str(grant))
    end
  end
  if kept + grant == 0 then
    redis.call('HDEL', KEYS[2], holder)
  else
    redis.call('HSET', KEYS[2], holder, str(kept + grant) .. ':' .. str(now_ms + lifetime))
    -- A counter's records go with it; a balance's live as long as the
    -- newest (never shortened: holders may use different lifetimes).
    if kind == 'q' then
      redis.call('PEXPIREAT', KEYS[2], str(expiry_at(expiry)))
    elseif redis.call('PTTL', KEYS[2]) < lifetime then
      redis.call('PEXPIRE', KEYS[2], str(lifetime))
    end
  end
  return {grant, cur, kept}
elseif op == 'give' then
  -- ARGV: op, kind, holder, units. Gives back at most what the live record
  -- says the holder has: a second give-back, or one after the deadline,
  -- gives nothing.
  if #ARGV ~= 4 then return bad('lease argument count') end
  local kind, holder = ARGV[2], ARGV[3]
  if (kind ~= 'q' and kind ~= 'c') or not holder_ok(holder) then return bad('lease kind or holder') end
  local units = uint(ARGV[4], MAX_CREDITS)
  if units == nil then return bad('units') end
  local held = live(redis.call('HGET', KEYS[2], holder))
  if held == nil then return corrupt('lease record ' .. KEYS[2]) end
  local cur = current(kind)
  if cur == nil then return corrupt('lease counter ' .. KEYS[1]) end
  local back = units
  if back > held then back = held end
  if kind == 'q' and back > cur then return corrupt('lease record above its counter ' .. KEYS[2]) end
  if kind == 'c' and cur + back > MAX_CREDITS then back = MAX_CREDITS - cur end
  redis.call('HDEL', KEYS[2], holder)
  if back > 0 then
    if kind == 'q' then
      cur = redis.call('DECRBY', KEYS[1], str(back))
    else
      cur = redis.call('INCRBY', KEYS[1], str(back))
    end
  end
  return {back, cur, 0}
elseif op == 'reset' then
  -- ResetUsage of a calendar counter: spent goes to 0, units in live leases
  -- stay counted (their holders may still spend them without asking).
  -- ARGV: op, key expiry (ms).
  if #ARGV ~= 2 then return bad('lease argument count') end
  local expiry = uint(ARGV[2], MAX_TIME_MS + 60000)
  if expiry == nil then return bad('expiry') end
  local sum, dead = sum_live()
  if sum == nil then return corrupt('lease record ' .. KEYS[2]) end
  forget(dead)
  if sum == 0 then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], str(sum))
    redis.call('PEXPIREAT', KEYS[1], str(expiry_at(expiry)))
  end
  return {sum, sum, 0}
elseif op == 'cset' then
  -- SetCredits: the account has ARGV[2] credits, counting the units in live
  -- leases (their holders may spend them without asking), so the balance
  -- becomes the rest. When the leases hold more, they are void (deleted:
  -- their give-backs return nothing, their holders learn of it by the
  -- published change) and the balance is the new credits.
  if #ARGV ~= 2 then return bad('lease argument count') end
  local credits = uint(ARGV[2], MAX_CREDITS)
  if credits == nil then return bad('credits') end
  local sum, dead = sum_live()
  if sum == nil then return corrupt('lease record ' .. KEYS[2]) end
  local balance = credits - sum
  if balance < 0 then
    redis.call('DEL', KEYS[2])
    balance = credits
    sum = 0
  else
    forget(dead)
  end
  redis.call('SET', KEYS[1], str(balance))
  return {sum, balance, 0}
elseif op == 'cget' then
  -- The units in live leases, and the balance (read only).
  if #ARGV ~= 1 then return bad('lease argument count') end
  local sum = sum_live()
  if sum == nil then return corrupt('lease record ' .. KEYS[2]) end
  local cur = current('c')
  if cur == nil then return corrupt('credits ' .. KEYS[1]) end
  return {sum, cur, 0}
end
return bad('lease op')
