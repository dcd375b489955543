-- Gives a lease back (live or expired).
-- KEYS[5] lease records, KEYS[6] lease keys, KEYS[7..] every lease pool.
-- ARGV[2] the lease id.
-- Reply: 'released', version; or 'none', the current version.
local refusal = refused()
if refusal then return reply(refusal) end
local id = ARGV[2]
local raw = redis.call('HGET', KEYS[5], id)
if not raw then return reply({'none', redis.call('GET', KEYS[2]) or '0'}) end
local rec = lease_record(id, raw)
local key = nil
if rec then
  local k = rec.feature .. '\0' .. rec.user .. '\0' .. rec.holder
  if redis.call('HGET', KEYS[6], k) == id then key = k end
end
redis.call('HDEL', KEYS[5], id)
if key then redis.call('HDEL', KEYS[6], key) end
for i = 7, #KEYS do redis.call('ZREM', KEYS[i], id) end
local v = bump({'k', 'unlease', 'i', id})
return reply({'released', tostring(v)})
