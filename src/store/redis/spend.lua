local n = uint(ARGV[4], 1000)
if n == nil or #ARGV ~= 4 + 3 * n then return bad('quota count') end
local cost = uint(ARGV[1], MAX_COST)
if cost == nil then return bad('cost') end
local credit_cost = false
if ARGV[2] ~= '' then
  credit_cost = uint(ARGV[2], MAX_COST)
  if credit_cost == nil then return bad('credit cost') end
end
if ARGV[3] ~= '0' and ARGV[3] ~= '1' and ARGV[3] ~= '2' then return bad('mode') end
local dry, shadow = ARGV[3] == '1', ARGV[3] == '2'
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
    st[i] = {kind = kind, limit = limit, w = w, key = KEYS[nk]}
    nk = nk + 1
  else
    return bad('window kind')
  end
  if w == nil then return bad('window') end
end
if #KEYS ~= nk then return bad('key count') end
local ckey = KEYS[nk]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- A rolling window of p ms is counted in buckets (src/store/rolling.rs):
-- width ceil(p / 16) ms, count ceil(p / width) of them; at `now`, in bucket b,
-- the window holds buckets b - count ..= b. Exact in doubles (all < 2^53).
local function buckets(p)
  local width = math.floor((p + 15) / 16)
  local count = math.floor((p + width - 1) / width)
  local b = math.floor(now / width)
  if b * width > now then b = b - 1 elseif (b + 1) * width <= now then b = b + 1 end
  return width, count, b
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
    -- The hash holds at most count + 1 fields: every write drops those that fell out.
    local width, count, b = buckets(s.w)
    s.width, s.count, s.b, s.stale = width, count, b, {}
    local fields = redis.call('HGETALL', s.key)
    local live, used, newest = {}, 0, nil
    for j = 1, #fields, 2 do
      local idx, u = uint(fields[j], MAX_TIME_MS), uint(fields[j + 1], MAX_LIMIT)
      if idx == nil or u == nil or idx * width > MAX_TIME_MS then return corrupt('rolling buckets ' .. s.key) end
      if idx < b - count then
        s.stale[#s.stale + 1] = fields[j]
      else
        live[#live + 1] = {idx, u}
        used = used + u
        if newest == nil or idx > newest then newest = idx end
      end
    end
    if used > MAX_LIMIT then return corrupt('rolling buckets ' .. s.key) end
    s.used, s.newest, s.resets, s.retry = used, newest, now, now
    if newest ~= nil then s.resets = (newest + count + 1) * width end
    if used + cost > s.limit then
      -- The first instant enough old buckets have left for `cost` to fit.
      s.retry = s.resets
      table.sort(live, function(x, y) return x[1] < y[1] end)
      local left = used
      for _, e in ipairs(live) do
        left = left - e[2]
        if left + cost <= s.limit then
          s.retry = (e[1] + count + 1) * width
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
local spent = 0
if (ok or shadow) and not dry then
  spent = 1
  for i = 1, n do
    local s = st[i]
    -- A shadow spend goes past the limit, as far as the counters keep.
    if s.used + cost > MAX_LIMIT then
    elseif s.kind == 'c' then
      redis.call('INCRBY', s.key, str(cost))
      -- A minute past the window's end, and never less than a minute from
      -- now: a replica whose clock lags Redis's still spends into a window
      -- Redis has seen end, and must find its count there on its next spend
      -- (an expiry in the past would delete the counter at once).
      redis.call('PEXPIREAT', s.key, str(math.max(s.w, now) + 60000))
    elseif cost > 0 then
      if #s.stale > 0 then redis.call('HDEL', s.key, unpack(s.stale)) end
      redis.call('HINCRBY', s.key, str(s.b), str(cost))
      local newest = s.b
      if s.newest ~= nil and s.newest > newest then newest = s.newest end
      -- The key outlives its newest bucket by nothing: when it expires, the window is empty.
      s.resets = (newest + s.count + 1) * s.width
      redis.call('PEXPIREAT', s.key, str(s.resets))
    end
    if s.used + cost <= MAX_LIMIT then s.used = s.used + cost end
  end
  -- Shadow mode moves no money: credits are only checked.
  if credit_cost and not shadow then
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
