if #ARGV < 5 then return bad('argument count') end
local id = ARGV[1]
if type(id) ~= 'string' or #id == 0 or #id > 64 or not string.find(id, '^[%w%-]+$') then return bad('charge id') end
local until_ms = uint(ARGV[2], MAX_TIME_MS)
if until_ms == nil then return bad('remember until') end
local delta = int(ARGV[3], -MAX_COST, MAX_COST)
if delta == nil then return bad('delta') end
if ARGV[4] ~= '0' and ARGV[4] ~= '1' then return bad('credits flag') end
local with_credits = ARGV[4] == '1'
local n = uint(ARGV[5], 16)
if n == nil or #ARGV ~= 5 + n or #KEYS ~= 2 + n then return bad('counter count') end
local ends, used = {}, {}
for i = 1, n do
  ends[i] = uint(ARGV[5 + i], MAX_TIME_MS)
  if ends[i] == nil then return bad('window end') end
  used[i] = stored(redis.call('GET', KEYS[2 + i]), MAX_LIMIT)
  if used[i] == nil then return corrupt('counter ' .. KEYS[2 + i]) end
end
local balance = 0
if with_credits then
  balance = stored(redis.call('GET', KEYS[2]), MAX_CREDITS)
  if balance == nil then return corrupt('credits ' .. KEYS[2]) end
end
if redis.call('HEXISTS', KEYS[1], id) == 1 then return {0, 0} end

-- Everything is checked: from here on nothing can fail half-way.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], id, '1')
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 or now + ttl < until_ms then redis.call('PEXPIREAT', KEYS[1], str(until_ms)) end
for i = 1, n do
  local key, expires = KEYS[2 + i], ends[i] + 60000
  if delta < 0 then
    -- A refund never takes a counter below 0, and never revives an expired window.
    local back = math.min(used[i], -delta)
    if back > 0 then redis.call('DECRBY', key, str(back)) end
  elseif delta > 0 and now < expires then
    redis.call('INCRBY', key, str(delta))
    redis.call('PEXPIREAT', key, str(expires))
  end
end
local unpaid = 0
if with_credits then
  if delta < 0 then
    local back = math.min(-delta, MAX_CREDITS - balance)
    if back > 0 then redis.call('INCRBY', KEYS[2], str(back)) end
  elseif delta > 0 then
    local take = math.min(balance, delta)
    if take > 0 then redis.call('DECRBY', KEYS[2], str(take)) end
    unpaid = delta - take
  end
end
return {1, unpaid}
