-- Reads everything at one instant (read-only).
-- KEYS[1] epoch, KEYS[2] version, KEYS[3] license, KEYS[4] tryout, KEYS[5] reconcile,
-- KEYS[6] pending initialization, KEYS[7] retired license, KEYS[8] high-water
-- clock, KEYS[9] last incident, KEYS[10..] the seat pools, in the order the caller knows.
-- The reply ends with the license's id, kept apart from its record (readable
-- also when the record is not).
local out = {
  redis.call('GET', KEYS[1]) or '',
  redis.call('GET', KEYS[2]) or '0',
  redis.call('HGET', KEYS[3], 'record') or '',
  redis.call('GET', KEYS[4]) or '',
  redis.call('GET', KEYS[5]) or '',
  redis.call('GET', KEYS[6]) or '',
  redis.call('GET', KEYS[7]) or '',
  redis.call('GET', KEYS[8]) or '0',
  redis.call('GET', KEYS[9]) or '',
}
for i = 10, #KEYS do
  table.insert(out, redis.call('HGETALL', KEYS[i]))
end
table.insert(out, redis.call('HGET', KEYS[3], 'id') or '')
return out
