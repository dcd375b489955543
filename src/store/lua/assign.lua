-- Gives a user a seat: capacity check and write in one step.
-- KEYS[4] purchased seats of the feature, KEYS[5] tryout seats of the feature,
-- KEYS[6] the seat index, KEYS[7] the applied license.
-- ARGV[2] user, ARGV[3] feature, ARGV[4] 'purchased' | 'tryout', ARGV[5] capacity,
-- ARGV[6] the license id the plan was made against (purchased only).
local refusal = refused()
if refusal then return refusal end
local user, feature, plan, capacity = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])

-- Idempotent: a retried assign finds its own seat.
local purchased = redis.call('HGET', KEYS[4], user)
if purchased then return {'existing', purchased} end
local tryout = redis.call('HGET', KEYS[5], user)
if tryout and plan == 'tryout' then return {'existing', tryout} end

local pool = KEYS[5]
if plan == 'purchased' then
  if redis.call('HGET', KEYS[7], 'id') ~= ARGV[6] then return {'license_changed'} end
  pool = KEYS[4]
end
local used = redis.call('HLEN', pool)
if used >= capacity then return {'exhausted', tostring(capacity), tostring(used)} end

local seat = string.format('{"v":1,"source":"%s","assigned_at_ms":%.0f}', plan, now_ms())
redis.call('HSET', pool, user, seat)
-- A purchased seat replaces the user's tryout seat.
if tryout then redis.call('HDEL', KEYS[5], user) end
redis.call('ZADD', KEYS[6], 0, feature .. '\0' .. user)
local v = bump({'k', 'seat', 'f', feature, 'u', user, 'd', seat})
return {'created', seat, tostring(v)}
