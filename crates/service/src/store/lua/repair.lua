-- Writes back what a replica holds and the store lost, only if the store is
-- still where the replica read it. Not refused by the writer's floor: this is how
-- a store that went back is brought forward again.
-- KEYS[4] license, KEYS[5] tryout, KEYS[6] reconcile, KEYS[7] pending
-- initialization, KEYS[8] seat index, KEYS[9] last incident, KEYS[10..] the seat
-- pools (feature by feature, purchased then tryout).
-- ARGV[2] expected epoch, ARGV[3] expected version, ARGV[4] version floor,
-- ARGV[5] license id, ARGV[6] license record, ARGV[7] tryout record, ARGV[8]
-- reconcile record ('' = leave each), ARGV[9] 'set' | 'del' | '' for the pending
-- initialization, ARGV[10] its record, ARGV[11] the incident record, then seat
-- operations as ('add' | 'del', pool index from 1, feature, user, record) from ARGV[12].
-- Reply: 'ok', then the version of each part in that order.
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[2]
  or (redis.call('GET', KEYS[2]) or '0') ~= ARGV[3] then
  return {'moved'}
end
if tonumber(ARGV[4]) > tonumber(ARGV[3]) then redis.call('SET', KEYS[2], ARGV[4]) end
local out = {'ok'}
for i = 12, #ARGV, 5 do
  local pool = 9 + tonumber(ARGV[i + 1])
  local feature, user = ARGV[i + 2], ARGV[i + 3]
  if ARGV[i] == 'add' then
    redis.call('HSET', KEYS[pool], user, ARGV[i + 4])
    redis.call('ZADD', KEYS[8], 0, feature .. '\0' .. user)
    table.insert(out, tostring(bump({'k', 'seat', 'f', feature, 'u', user, 'd', ARGV[i + 4]})))
  else
    redis.call('HDEL', KEYS[pool], user)
    redis.call('HDEL', KEYS[pool + 1], user)
    redis.call('ZREM', KEYS[8], feature .. '\0' .. user)
    table.insert(out, tostring(bump({'k', 'release', 'f', feature, 'u', user})))
  end
end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[4], 'id', ARGV[5], 'record', ARGV[6])
  table.insert(out, tostring(bump({'k', 'license', 'd', ARGV[6]})))
end
if ARGV[7] ~= '' then
  redis.call('SET', KEYS[5], ARGV[7])
  table.insert(out, tostring(bump({'k', 'tryout', 'd', ARGV[7]})))
end
if ARGV[8] ~= '' then
  redis.call('SET', KEYS[6], ARGV[8])
  table.insert(out, tostring(bump({'k', 'reconcile', 'd', ARGV[8]})))
end
if ARGV[9] == 'set' then
  redis.call('SET', KEYS[7], ARGV[10])
  table.insert(out, tostring(bump({'k', 'init', 'd', ARGV[10]})))
elseif ARGV[9] == 'del' then
  redis.call('DEL', KEYS[7])
  table.insert(out, tostring(bump({'k', 'init_used'})))
end
redis.call('SET', KEYS[9], ARGV[11])
table.insert(out, tostring(bump({'k', 'repair', 'd', ARGV[11]})))
return out
