-- Gives a user a seat: capacity check and write in one step.
-- KEYS[5] purchased seats of the feature, KEYS[6] tryout seats of the feature,
-- KEYS[7] the seat index, KEYS[8] the applied license, KEYS[9], KEYS[10] the
-- purchased pool's order sets (see the prelude).
-- ARGV[2] user, ARGV[3] feature, ARGV[4] 'purchased' | 'tryout', ARGV[5] capacity,
-- ARGV[6] the license id the plan was made against (purchased only).
local refusal = refused()
if refusal then return reply(refusal) end
local user, feature, plan, capacity = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local name = 'seat ' .. feature .. '/' .. printable(user)
local purchased_pool = pool_keys(KEYS[5], KEYS[9], KEYS[10], feature)

-- Idempotent: a retried assign finds its own seat. A corrupt record of the user
-- is no seat to give back: it is skipped here and replaced below, in its own slot.
-- The reply carries the version the seat is visible at (read your writes).
local current = redis.call('GET', KEYS[2]) or '0'
local purchased = redis.call('HGET', KEYS[5], user)
if purchased and seat_record(name, purchased) then return reply({'existing', purchased, current}) end
local tryout = redis.call('HGET', KEYS[6], user)
if tryout and seat_record(name, tryout) and plan == 'tryout' then
  return reply({'existing', tryout, current})
end

local pool, own = KEYS[6], tryout
if plan == 'purchased' then
  if redis.call('HGET', KEYS[8], 'id') ~= ARGV[6] then return reply({'license_changed'}) end
  pool, own = KEYS[5], purchased
end
-- Corrupt records count as seats in use. Replacing the user's own corrupt record
-- takes no new slot, but only while the others leave room for it: a pool
-- already over its quantity is not helped over it.
local used = redis.call('HLEN', pool)
local others = used
if own then others = used - 1 end
if others >= capacity then
  return reply({'exhausted', tostring(capacity), tostring(used)})
end

local at = now_ms()
local seat = string.format('{"v":1,"source":"%s","assigned_at_ms":%.0f}', plan, at)
redis.call('HSET', pool, user, seat)
if plan == 'purchased' then index_seat(purchased_pool, user, {assigned_at_ms = at}) end
-- A purchased seat replaces the user's tryout seat.
if tryout and plan == 'purchased' then redis.call('HDEL', KEYS[6], user) end
redis.call('ZADD', KEYS[7], 0, feature .. '\0' .. user)
local v = bump({'k', 'seat', 'f', feature, 'u', user, 'd', seat})
return reply({'created', seat, tostring(v)})
