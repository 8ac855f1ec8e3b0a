local c = ARGV[1]
local n, idle, before = uint(ARGV[2], 10000), uint(ARGV[3], MAX_TIME_MS), uint(ARGV[4], MAX_TIME_MS)
if type(c) ~= 'string' or #c == 0 or #c > 64 or n == nil or n == 0 or idle == nil or before == nil then
  return bad('claim arguments')
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
local out = {'ok'}
local function got() return (#out - 1) / 2 end
local function take(entries)
  if type(entries) ~= 'table' then return end
  for _, e in ipairs(entries) do
    -- An entry deleted after it was read has no fields left: nothing to send.
    local fields = e[2]
    if type(fields) == 'table' and fields[2] then
      out[#out + 1] = e[1]
      out[#out + 1] = fields[2]
    end
  end
end
local function read(from)
  local r = redis.call('XREADGROUP', 'GROUP', 'tollgate', c, 'COUNT', n - got(), 'STREAMS', KEYS[1], from)
  if r and r[1] then take(r[1][2]) end
end
-- This consumer's own unacknowledged events first (a failed POST), then new
-- ones, then ones another consumer has held for `idle` ms (presumed dead).
read('0')
if got() < n then read('>') end
if got() < n then
  local r = redis.call('XAUTOCLAIM', KEYS[1], 'tollgate', c, idle, '0-0', 'COUNT', n - got())
  take(r[2])
end
if got() == 0 and redis.call('XLEN', KEYS[1]) == 0 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      local ms = tonumber(string.match(info[i + 1], '^(%d+)'))
      if ms ~= nil and ms < before then out[1] = 'idle' end
    end
  end
end
return out
