-- Stores a verified license document, with the tryout change it causes.
-- KEYS[4] the applied license (hash: id, record), KEYS[5] the tryout record.
-- ARGV[2] expected license id ('' = none), ARGV[3] new id, ARGV[4] new record,
-- ARGV[5] expected tryout record ('' = none), ARGV[6] new tryout record ('' = no change).
if not has_epoch() then return {'noepoch'} end
if (redis.call('HGET', KEYS[4], 'id') or '') ~= ARGV[2] then return {'conflict'} end
local change_tryout = ARGV[6] ~= ''
if change_tryout and (redis.call('GET', KEYS[5]) or '') ~= ARGV[5] then
  return {'conflict'}
end
redis.call('HSET', KEYS[4], 'id', ARGV[3], 'record', ARGV[4])
local out = {'ok', tostring(bump({'k', 'license', 'd', ARGV[4]}))}
if change_tryout then
  redis.call('SET', KEYS[5], ARGV[6])
  table.insert(out, tostring(bump({'k', 'tryout', 'd', ARGV[6]})))
end
return out
