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
