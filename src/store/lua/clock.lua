-- Raises the high-water clock (the largest time any replica has seen) to ARGV[1]
-- milliseconds if that is larger; returns the stored value. KEYS[1] the clock.
local hw = tonumber(redis.call('GET', KEYS[1]) or '0')
local t = tonumber(ARGV[1])
if t > hw then
  hw = t
  redis.call('SET', KEYS[1], ARGV[1])
end
return string.format('%.0f', hw)
