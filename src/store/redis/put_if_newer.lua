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
