-- Writes the tryout record if it is still the expected one.
-- KEYS[5] the tryout record. ARGV[2] expected ('' = none), ARGV[3] the new record.
local refusal = refused()
if refusal then return refusal end
if (redis.call('GET', KEYS[5]) or '') ~= ARGV[2] then return {'conflict'} end
redis.call('SET', KEYS[5], ARGV[3])
local v = bump({'k', 'tryout', 'd', ARGV[3]})
return {'ok', tostring(v)}
