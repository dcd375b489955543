-- Takes a lease of a concurrent feature: expiry, capacity check and write in
-- one step, with Redis's own clock.
-- KEYS[5] the applied license, KEYS[6] lease records, KEYS[7] lease keys,
-- KEYS[8] the feature's lease pool, KEYS[9] the lease usage (peaks and busy
-- counts per feature and day).
-- ARGV[2] user, ARGV[3] feature, ARGV[4] holder, ARGV[5] capacity, ARGV[6] the
-- license id the plan was made against, ARGV[7] the id of a new lease,
-- ARGV[8] the lease length (ms).
-- Reply: 'acquired', id, record, version, created ('1' | '0'), in use after
-- it, then the ids of the expired leases reclaimed;
-- or 'exhausted', capacity, in use; or 'license_changed'.
local refusal = refused()
if refusal then return reply(refusal) end
local user, feature, holder = ARGV[2], ARGV[3], ARGV[4]
local capacity, new_id, duration = tonumber(ARGV[5]), ARGV[7], tonumber(ARGV[8])
if redis.call('HGET', KEYS[5], 'id') ~= ARGV[6] then return reply({'license_changed'}) end
local now = now_ms()
local day = math.floor(now / 86400000)
local key = feature .. '\0' .. user .. '\0' .. holder

-- Idempotent per (user, feature, holder): the holder's live lease is renewed.
local own_id = redis.call('HGET', KEYS[7], key)
local own = nil
if own_id then
  local score = redis.call('ZSCORE', KEYS[8], own_id)
  if score and tonumber(score) > now then
    own = lease_record(own_id, redis.call('HGET', KEYS[6], own_id))
  end
end
-- Live leases: scored above now. Corrupt records count (they are in the pool).
local live = redis.call('ZCOUNT', KEYS[8], '(' .. string.format('%.0f', now), '+inf')
if not own and live >= capacity then
  redis.call('HINCRBY', KEYS[9], 'busy:' .. feature .. ':' .. day, 1)
  return reply({'exhausted', tostring(capacity), tostring(live)})
end

-- Read before the first write: the expired leases to reclaim and their keys.
local expired = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', string.format('%.0f', now))
local expired_keys = {}
for _, id in ipairs(expired) do
  local rec = lease_record(id, redis.call('HGET', KEYS[6], id))
  if rec then
    local k = rec.feature .. '\0' .. rec.user .. '\0' .. rec.holder
    if redis.call('HGET', KEYS[7], k) == id then table.insert(expired_keys, k) end
  end
end
local peak_field = 'peak:' .. feature .. ':' .. day
local peak = tonumber(redis.call('HGET', KEYS[9], peak_field) or '0') or 0

-- Writes.
for _, id in ipairs(expired) do redis.call('HDEL', KEYS[6], id) end
for _, k in ipairs(expired_keys) do redis.call('HDEL', KEYS[7], k) end
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', string.format('%.0f', now))
end
local id, acquired, in_use = new_id, now, live + 1
if own then
  id, acquired, in_use = own_id, own.acquired_at_ms, live
elseif own_id and redis.call('HGET', KEYS[7], key) == own_id then
  -- An unreadable record under the holder's key: replaced, not left behind.
  redis.call('HDEL', KEYS[6], own_id)
  redis.call('ZREM', KEYS[8], own_id)
end
local expires = now + duration
local record = lease_json(user, feature, holder, acquired, expires)
redis.call('HSET', KEYS[6], id, record)
redis.call('HSET', KEYS[7], key, id)
redis.call('ZADD', KEYS[8], string.format('%.0f', expires), id)
if in_use > peak then
  if peak == 0 then
    -- A new day: drop the usage older than 400 days (few fields, once a day).
    for _, f in ipairs(redis.call('HKEYS', KEYS[9])) do
      local d = tonumber(string.match(f, ':(%d+)$'))
      if d and d <= day - 400 then redis.call('HDEL', KEYS[9], f) end
    end
  end
  redis.call('HSET', KEYS[9], peak_field, in_use)
end
local v = bump({'k', 'lease', 'i', id, 'd', record, 'r', table.concat(expired, ',')})
local created = '1'
if own then created = '0' end
local out = {'acquired', id, record, tostring(v), created, tostring(in_use)}
for _, x in ipairs(expired) do table.insert(out, x) end
return reply(out)
