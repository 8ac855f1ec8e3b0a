local MAX_COST = 1000000000
local MAX_LIMIT = 1000000000000000
local MAX_CREDITS = 1000000000000000
local MAX_WINDOW_MS = 31622400000
local MAX_TIME_MS = 253402300799000
-- A decimal integer in [0, hi] given as a string; nil for anything else
-- (signs, dots, exponents, spaces, more than 16 digits, non-strings).
local function uint(s, hi)
  if type(s) ~= 'string' or #s == 0 or #s > 16 or not string.find(s, '^%d+$') then return nil end
  local n = tonumber(s)
  if n == nil or n > hi then return nil end
  return n
end
-- As uint, with an optional leading '-' down to lo.
local function int(s, lo, hi)
  if type(s) == 'string' and string.sub(s, 1, 1) == '-' then
    local n = uint(string.sub(s, 2), -lo)
    if n == nil then return nil end
    return -n
  end
  return uint(s, hi)
end
-- A stored integer (a GET/HGET reply; false when absent, which counts as 0).
local function stored(v, hi)
  if v == false or v == nil then return 0 end
  return uint(v, hi)
end
local function str(n) return string.format('%d', n) end
local function bad(what) return redis.error_reply('TOLLGATE_BADARG ' .. what) end
local function corrupt(what) return redis.error_reply('TOLLGATE_CORRUPT ' .. what) end
