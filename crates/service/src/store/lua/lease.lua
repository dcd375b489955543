-- Takes the reconcile lease if free. KEYS[1] the lease, KEYS[2] the fencing counter.
-- ARGV[1] holder, ARGV[2] ttl in ms. Returns the new fencing token, or 0.
-- Tokens only grow, also across a data loss that took the counter with it: a
-- token is at least Redis's clock in milliseconds.
-- The counter is read (a corrupt one counts as 0: the clock still keeps tokens
-- growing) before the lease is taken, so a bad value never leaves a lease
-- taken without a token.
local last = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local token = math.max(last + 1, now)
  redis.call('SET', KEYS[2], string.format('%.0f', token))
  return token
end
return 0
