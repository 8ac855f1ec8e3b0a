if #KEYS ~= 1 or #ARGV ~= 1 or ARGV[1] == '' then return bad('arguments') end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
