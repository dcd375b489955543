-- Frees a user's seat of a feature, whatever its source; with a capacity, sets
-- the pool's over-capacity flags again (a freed seat makes room for a flagged one).
-- KEYS[5] purchased seats, KEYS[6] tryout seats, KEYS[7] the seat index,
-- KEYS[8] the applied license, KEYS[9], KEYS[10] the purchased pool's order sets.
-- ARGV[2] user, ARGV[3] feature, ARGV[4] purchased capacity ('' = leave flags),
-- ARGV[5] the license id the capacity was read from: like an assignment, the
-- flags are set only against the stored license (otherwise 'moved': re-read).
-- Reads and checks everything first, then writes (Redis does not roll back a
-- script that stops half-way). The flags are planned from the order sets, so a
-- release costs the same in a pool of any size.
local refusal = refused()
if refusal then return reply(refusal) end
if ARGV[4] ~= '' and (redis.call('HGET', KEYS[8], 'id') or '') ~= ARGV[5] then
  return reply({'moved'})
end
local user, feature = ARGV[2], ARGV[3]
local purchased_pool = pool_keys(KEYS[5], KEYS[9], KEYS[10], feature)
if redis.call('HEXISTS', KEYS[5], user) == 0 and redis.call('HEXISTS', KEYS[6], user) == 0 then
  -- With the version the absence is visible at (read your writes).
  return reply({'none', redis.call('GET', KEYS[2]) or '0'})
end
local plan = nil
if ARGV[4] ~= '' then
  plan = plan_flags(purchased_pool, tonumber(ARGV[4]), user)
  if not plan then return reply({'noindex', INDEXED and 'broken' or 'missing'}) end
end

redis.call('HDEL', KEYS[5], user)
redis.call('HDEL', KEYS[6], user)
index_seat(purchased_pool, user, nil)
redis.call('ZREM', KEYS[7], feature .. '\0' .. user)
local v = bump({'k', 'release', 'f', feature, 'u', user})
if plan then write_flags(plan) end
local out = {'released', tostring(v)}
for _, x in ipairs(flagged) do table.insert(out, x) end
return reply(out)
