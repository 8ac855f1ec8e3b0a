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
