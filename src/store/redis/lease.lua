-- Lease mode (src/store/lease.rs). KEYS[1]: a calendar counter; KEYS[2]: its
-- lease records, a hash holder id -> units leased and not given back. The
-- counter counts spent + leased units, so spends in exact mode by other
-- replicas stay correct. Every call reads and checks everything before writing.
local op = ARGV[1]
if op == 'take' then
  -- ARGV: op, holder, limit, need, max block, divisor, key expiry (ms), units
  -- the holder still holds unspent (its record becomes that plus the grant,
  -- so a record overstates the holder's unspent units by at most what it spent
  -- since its last take).
  if #ARGV ~= 8 then return bad('lease argument count') end
  local holder = ARGV[2]
  if #holder == 0 or #holder > 64 then return bad('holder') end
  local limit = uint(ARGV[3], MAX_LIMIT)
  local need = uint(ARGV[4], MAX_COST)
  local max_block = uint(ARGV[5], MAX_COST)
  local divisor = uint(ARGV[6], MAX_COST)
  local expiry = uint(ARGV[7], MAX_TIME_MS + 60000)
  local holds = uint(ARGV[8], MAX_LIMIT)
  if limit == nil or need == nil or max_block == nil or divisor == nil or divisor == 0 or expiry == nil
    or holds == nil then
    return bad('lease arguments')
  end
  local held = stored(redis.call('HGET', KEYS[2], holder), MAX_LIMIT)
  if held == nil then return corrupt('lease record ' .. KEYS[2]) end
  -- The holder cannot hold more than it was leased: a smaller record is corrupt.
  if holds > held then return corrupt('lease record ' .. KEYS[2]) end
  local count = stored(redis.call('GET', KEYS[1]), MAX_LIMIT)
  if count == nil then return corrupt('counter ' .. KEYS[1]) end
  local free = limit - count
  if free < 0 then free = 0 end
  local grant = 0
  if free >= need and free > 0 then
    -- Large far from the limit, 1 near it: the last units go one by one.
    local block = math.floor(free / divisor)
    if block > max_block then block = max_block end
    if block < 1 then block = 1 end
    if block < need then block = need end
    if block > free then block = free end
    grant = block
  end
  if grant > 0 then
    count = redis.call('INCRBY', KEYS[1], str(grant))
    redis.call('HSET', KEYS[2], holder, str(holds + grant))
    redis.call('PEXPIREAT', KEYS[1], str(expiry))
    redis.call('PEXPIREAT', KEYS[2], str(expiry))
  elseif holds == 0 then
    redis.call('HDEL', KEYS[2], holder)
  elseif held ~= holds then
    redis.call('HSET', KEYS[2], holder, str(holds))
  end
  return {grant, count}
elseif op == 'give' then
  -- ARGV: op, holder, units. Gives back at most what the record says the
  -- holder has: a second return gives nothing.
  if #ARGV ~= 3 then return bad('lease argument count') end
  local holder = ARGV[2]
  local units = uint(ARGV[3], MAX_LIMIT)
  if units == nil then return bad('units') end
  local held = stored(redis.call('HGET', KEYS[2], holder), MAX_LIMIT)
  if held == nil then return corrupt('lease record ' .. KEYS[2]) end
  local count = stored(redis.call('GET', KEYS[1]), MAX_LIMIT)
  if count == nil then return corrupt('counter ' .. KEYS[1]) end
  local back = units
  if back > held then back = held end
  if back > count then back = count end
  redis.call('HDEL', KEYS[2], holder)
  if back > 0 then count = redis.call('DECRBY', KEYS[1], str(back)) end
  return {back, count}
elseif op == 'reset' then
  -- ResetUsage of a calendar counter: spent goes to 0, leased units that may
  -- be unspent (the records) stay counted: their holders may still spend them
  -- without asking. ARGV: op, key expiry (ms).
  if #ARGV ~= 2 then return bad('lease argument count') end
  local expiry = uint(ARGV[2], MAX_TIME_MS + 60000)
  if expiry == nil then return bad('expiry') end
  local vals = redis.call('HVALS', KEYS[2])
  local sum = 0
  for _, v in ipairs(vals) do
    local u = uint(v, MAX_LIMIT)
    if u == nil then return corrupt('lease record ' .. KEYS[2]) end
    sum = sum + u
  end
  if sum == 0 then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], str(sum))
    redis.call('PEXPIREAT', KEYS[1], str(expiry))
  end
  return {sum, sum}
end
return bad('lease op')
