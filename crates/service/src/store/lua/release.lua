-- Frees a user's seat of a feature, whatever its source; with a capacity, sets
-- the pool's over-capacity flags again (a freed seat makes room for a flagged one).
-- KEYS[4] purchased seats, KEYS[5] tryout seats, KEYS[6] the seat index,
-- KEYS[7] the applied license.
-- ARGV[2] user, ARGV[3] feature, ARGV[4] purchased capacity ('' = leave flags),
-- ARGV[5] the license id the capacity was read from: like an assignment, the
-- flags are set only against the stored license (otherwise 'moved': re-read).
-- Reads and checks everything first, then writes (Redis does not roll back a
-- script that stops half-way).
local refusal = refused()
if refusal then return reply(refusal) end
if ARGV[4] ~= '' and (redis.call('HGET', KEYS[7], 'id') or '') ~= ARGV[5] then
  return reply({'moved'})
end
local user, feature = ARGV[2], ARGV[3]
if redis.call('HEXISTS', KEYS[4], user) == 0 and redis.call('HEXISTS', KEYS[5], user) == 0 then
  return reply({'none'})
end
local plan = nil
if ARGV[4] ~= '' then plan = plan_flags(KEYS[4], feature, tonumber(ARGV[4]), user) end

redis.call('HDEL', KEYS[4], user)
redis.call('HDEL', KEYS[5], user)
redis.call('ZREM', KEYS[6], feature .. '\0' .. user)
local v = bump({'k', 'release', 'f', feature, 'u', user})
if plan then write_flags(plan) end
local out = {'released', tostring(v)}
for _, x in ipairs(flagged) do table.insert(out, x) end
return reply(out)
