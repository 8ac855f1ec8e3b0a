local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
local before = uint(ARGV[2], MAX_TIME_MS)
if before == nil then return bad('before') end
if s and tonumber(s) < before then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
