-- Frees a user's seat of a feature, whatever its source; with a capacity, sets
-- the pool's over-capacity flags again (a freed seat makes room for a flagged one).
-- KEYS[4] purchased seats, KEYS[5] tryout seats, KEYS[6] the seat index,
-- KEYS[7] the applied license.
-- ARGV[2] user, ARGV[3] feature, ARGV[4] purchased capacity ('' = leave flags),
-- ARGV[5] the license id the capacity was read from: like an assignment, the
-- flags are set only against the stored license (otherwise 'moved': re-read).
local refusal = refused()
if refusal then return refusal end
if ARGV[4] ~= '' and (redis.call('HGET', KEYS[7], 'id') or '') ~= ARGV[5] then
  return {'moved'}
end
local removed = redis.call('HDEL', KEYS[4], ARGV[2]) + redis.call('HDEL', KEYS[5], ARGV[2])
if removed == 0 then return {'none'} end
redis.call('ZREM', KEYS[6], ARGV[3] .. '\0' .. ARGV[2])
local v = bump({'k', 'release', 'f', ARGV[3], 'u', ARGV[2]})
if ARGV[4] ~= '' then reflag(KEYS[4], ARGV[3], tonumber(ARGV[4])) end
local out = {'released', tostring(v)}
for _, x in ipairs(flagged) do table.insert(out, x) end
return out
