-- Raises the high-water clock (the largest time decisions were made at) towards
-- ARGV[1] milliseconds, but never beyond Redis's own TIME: one replica whose
-- clock leaps ahead must not move every replica's time. ARGV[1] = 0 only reads.
-- Returns {stored mark, Redis TIME} in ms. KEYS[1] the clock.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- A value that is not a number is replaced, not kept (the snapshot reports it).
local hw = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local candidate = math.min(tonumber(ARGV[1]), now)
if candidate > hw then
  hw = candidate
  redis.call('SET', KEYS[1], string.format('%.0f', hw))
end
return {string.format('%.0f', hw), string.format('%.0f', now)}
