-- Reads everything at one instant (read-only).
-- KEYS[1] epoch, KEYS[2] version, KEYS[3] license, KEYS[4] tryout, KEYS[5] reconcile,
-- KEYS[6] pending initialization, KEYS[7..] the seat pools, in the order the caller knows.
local out = {
  redis.call('GET', KEYS[1]) or '',
  redis.call('GET', KEYS[2]) or '0',
  redis.call('HGET', KEYS[3], 'record') or '',
  redis.call('GET', KEYS[4]) or '',
  redis.call('GET', KEYS[5]) or '',
  redis.call('GET', KEYS[6]) or '',
}
for i = 7, #KEYS do
  table.insert(out, redis.call('HGETALL', KEYS[i]))
end
return out
