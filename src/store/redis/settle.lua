-- ARGV: remember-until ms, outbox cap, credits flag, counter count n, the n
-- window ends, item count k, per item (id, delta, event or ''), mark count
-- m, per mark (target, level, until ms, event). KEYS: once-only hash,
-- credits, outbox stream, the n counters, the m marks.
if #ARGV < 6 then return bad('argument count') end
local until_ms = uint(ARGV[1], MAX_TIME_MS)
if until_ms == nil then return bad('remember until') end
local cap = uint(ARGV[2], 10000000)
if cap == nil then return bad('outbox cap') end
if ARGV[3] ~= '0' and ARGV[3] ~= '1' then return bad('credits flag') end
local with_credits = ARGV[3] == '1'
local n = uint(ARGV[4], 16)
if n == nil then return bad('counter count') end
local ends, used = {}, {}
for i = 1, n do
  ends[i] = uint(ARGV[4 + i], MAX_TIME_MS)
  if ends[i] == nil then return bad('window end') end
end
local a = 5 + n
local k = uint(ARGV[a], 1000)
if k == nil or k == 0 then return bad('item count') end
local items = {}
for j = 1, k do
  local b = a + 1 + 3 * (j - 1)
  local id, delta, event = ARGV[b], int(ARGV[b + 1], -MAX_COST, MAX_COST), ARGV[b + 2]
  if type(id) ~= 'string' or #id == 0 or #id > 64 or not string.find(id, '^[%w%-]+$') then return bad('charge id') end
  if delta == nil then return bad('delta') end
  if type(event) ~= 'string' or #event > 8192 then return bad('event') end
  items[j] = {id = id, delta = delta, event = event}
end
a = a + 1 + 3 * k
local nm = uint(ARGV[a], 64)
if nm == nil or #ARGV ~= a + 4 * nm or #KEYS ~= 3 + n + nm then return bad('mark count') end
local marks = {}
for i = 1, nm do
  local b = a + 1 + 4 * (i - 1)
  local m = {target = uint(ARGV[b], n), at = uint(ARGV[b + 1], MAX_CREDITS), until_ms = uint(ARGV[b + 2], MAX_TIME_MS), event = ARGV[b + 3], key = KEYS[3 + n + i]}
  if m.target == nil or m.at == nil or m.until_ms == nil then return bad('mark') end
  if type(m.event) ~= 'string' or #m.event == 0 or #m.event > 8192 then return bad('mark event') end
  marks[i] = m
end
for i = 1, n do
  used[i] = stored(redis.call('GET', KEYS[3 + i]), MAX_LIMIT)
  if used[i] == nil then return corrupt('counter ' .. KEYS[3 + i]) end
end
-- The outbox must be a stream (or absent): a write to it must not fail later.
local outbox_type = redis.call('TYPE', KEYS[3])['ok']
if outbox_type ~= 'stream' and outbox_type ~= 'none' then return corrupt('outbox ' .. KEYS[3]) end
local balance = 0
if with_credits then
  balance = stored(redis.call('GET', KEYS[2]), MAX_CREDITS)
  if balance == nil then return corrupt('credits ' .. KEYS[2]) end
end

-- Everything is checked: from here on nothing can fail half-way. Each item's
-- first write records its id, or finds it recorded (a replay: nothing happens).
local now = nil
local function clock()
  if now == nil then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now
end
-- The outbox: this account's stream, read by the consumer group `tollgate`.
local queued, dropped = 0, 0
local function emit(payload)
  local len = redis.call('XLEN', KEYS[3])
  if len == 0 and redis.call('EXISTS', KEYS[3]) == 0 then
    redis.call('XGROUP', 'CREATE', KEYS[3], 'tollgate', '0', 'MKSTREAM')
  end
  if len >= cap then
    dropped = dropped + 1
  else
    redis.call('XADD', KEYS[3], '*', 'e', payload)
    queued = queued + 1
  end
end
local out, applied, last = {}, 0, 0
for j = 1, k do
  local it = items[j]
  local unpaid = 0
  queued, dropped = 0, 0
  if redis.call('HSETNX', KEYS[1], it.id, '1') == 1 then
    applied = applied + 1
    last = j
    local delta = it.delta
    for i = 1, n do
      local key, expires = KEYS[3 + i], ends[i] + 60000
      if delta < 0 then
        -- A refund never takes a counter below 0, and never revives an expired window.
        local back = math.min(used[i], -delta)
        if back > 0 then redis.call('DECRBY', key, str(back)) end
        used[i] = used[i] - back
      elseif delta > 0 and clock() < expires then
        -- An overage stops at the largest count a counter holds (as the memory store's does).
        local add = math.min(delta, MAX_LIMIT - used[i])
        if add > 0 then
          redis.call('INCRBY', key, str(add))
          redis.call('PEXPIREAT', key, str(expires))
          used[i] = used[i] + add
        end
      end
    end
    if with_credits then
      if delta < 0 then
        local back = math.min(-delta, MAX_CREDITS - balance)
        if back > 0 then redis.call('INCRBY', KEYS[2], str(back)) end
        balance = balance + back
      elseif delta > 0 then
        local take = math.min(balance, delta)
        if take > 0 then redis.call('DECRBY', KEYS[2], str(take)) end
        balance = balance - take
        unpaid = delta - take
      end
    end
    if #it.event > 0 then emit(it.event) end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
  out[#out + 1] = unpaid
  out[#out + 1] = queued
  out[#out + 1] = dropped
end
if applied > 0 then
  if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIREAT', KEYS[1], str(until_ms)) end
  -- Thresholds: a counter at or past its level, or the balance at or below
  -- its level, fires once: its mark lives until the window (or day) ends.
  -- Counted with the last item applied.
  queued, dropped = 0, 0
  for i = 1, nm do
    local m = marks[i]
    local crossed
    if m.target == 0 then crossed = with_credits and balance <= m.at else crossed = used[m.target] >= m.at end
    if crossed and m.until_ms > clock() and redis.call('SET', m.key, '1', 'NX', 'PXAT', str(m.until_ms)) then
      emit(m.event)
    end
  end
  local b = 4 * (last - 1)
  out[b + 3] = out[b + 3] + queued
  out[b + 4] = out[b + 4] + dropped
end
return out
