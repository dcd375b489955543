-- Writes back what a replica holds and the store lost, only if the store is
-- still where the replica read it. Not refused by the writer's floor: this is how
-- a store that went back is brought forward again.
-- KEYS[5] license, KEYS[6] tryout, KEYS[7] reconcile, KEYS[8] pending
-- initialization, KEYS[9] seat index, KEYS[10] last incident, KEYS[11..] the seat
-- pools and the order sets of the purchased ones.
-- ARGV[2] expected epoch, ARGV[3] expected version, ARGV[4] version floor,
-- ARGV[5] license id, ARGV[6] license record, ARGV[7] tryout record, ARGV[8]
-- reconcile record ('' = leave each), ARGV[9] 'set' | 'del' | '' for the pending
-- initialization, ARGV[10] its record, ARGV[11] the incident record, then seat
-- operations from ARGV[12] as ('add' | 'del', pool key, other pool key, order
-- key, flagged key, feature, user, record), each key an index into KEYS (0 =
-- none): 'add' writes the record to the pool, 'del' removes the user from both
-- pools; a purchased seat's order sets are kept (see prelude.lua). A lease is
-- written back by the operation ('lease', lease records key, lease keys key,
-- lease pool key, id, lease key entry, expires_at_ms, record), and removed
-- again (a release the store lost) by ('unlease', the same three keys, id,
-- lease key entry, '', '').
-- Reply: 'ok', then the version of each part in that order.
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[2]
  or (redis.call('GET', KEYS[2]) or '0') ~= ARGV[3] then
  return {'moved'}
end
-- The records to add, read before the first write (a record this replica
-- encoded is always readable; one that is not stays out of the order sets).
local ops = {}
for i = 12, #ARGV, 8 do
  if ARGV[i] == 'unlease' then
    table.insert(ops, {unlease = true, records = tonumber(ARGV[i + 1]), keys = tonumber(ARGV[i + 2]),
      pool = tonumber(ARGV[i + 3]), id = ARGV[i + 4], key = ARGV[i + 5]})
  elseif ARGV[i] == 'lease' then
    table.insert(ops, {lease = true, records = tonumber(ARGV[i + 1]), keys = tonumber(ARGV[i + 2]),
      pool = tonumber(ARGV[i + 3]), id = ARGV[i + 4], key = ARGV[i + 5], expires = ARGV[i + 6],
      record = ARGV[i + 7]})
  else
  local op = {
    add = ARGV[i] == 'add', pool = tonumber(ARGV[i + 1]), other = tonumber(ARGV[i + 2]),
    feature = ARGV[i + 5], user = ARGV[i + 6], record = ARGV[i + 7],
  }
  local order, over = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  if order > 0 then op.index = pool_keys(KEYS[op.pool], KEYS[order], KEYS[over], op.feature) end
  if op.add and op.index then
    op.rec = seat_record('seat ' .. op.feature .. '/' .. printable(op.user), op.record)
  end
  table.insert(ops, op)
  end
end

if tonumber(ARGV[4]) > tonumber(ARGV[3]) then redis.call('SET', KEYS[2], ARGV[4]) end
local out = {'ok'}
for _, op in ipairs(ops) do
  local member = (op.feature or '') .. '\0' .. (op.user or '')
  if op.unlease then
    redis.call('HDEL', KEYS[op.records], op.id)
    if redis.call('HGET', KEYS[op.keys], op.key) == op.id then redis.call('HDEL', KEYS[op.keys], op.key) end
    redis.call('ZREM', KEYS[op.pool], op.id)
    table.insert(out, tostring(bump({'k', 'unlease', 'i', op.id})))
  elseif op.lease then
    redis.call('HSET', KEYS[op.records], op.id, op.record)
    redis.call('HSET', KEYS[op.keys], op.key, op.id)
    redis.call('ZADD', KEYS[op.pool], op.expires, op.id)
    table.insert(out, tostring(bump({'k', 'lease', 'i', op.id, 'd', op.record, 'r', ''})))
  elseif op.add then
    redis.call('HSET', KEYS[op.pool], op.user, op.record)
    if op.index then index_seat(op.index, op.user, op.rec) end
    redis.call('ZADD', KEYS[9], 0, member)
    table.insert(out, tostring(bump({'k', 'seat', 'f', op.feature, 'u', op.user, 'd', op.record})))
  else
    redis.call('HDEL', KEYS[op.pool], op.user)
    if op.other > 0 then redis.call('HDEL', KEYS[op.other], op.user) end
    if op.index then index_seat(op.index, op.user, nil) end
    redis.call('ZREM', KEYS[9], member)
    table.insert(out, tostring(bump({'k', 'release', 'f', op.feature, 'u', op.user})))
  end
end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[5], 'id', ARGV[5], 'record', ARGV[6])
  table.insert(out, tostring(bump({'k', 'license', 'd', ARGV[6]})))
end
if ARGV[7] ~= '' then
  redis.call('SET', KEYS[6], ARGV[7])
  table.insert(out, tostring(bump({'k', 'tryout', 'd', ARGV[7]})))
end
if ARGV[8] ~= '' then
  redis.call('SET', KEYS[7], ARGV[8])
  table.insert(out, tostring(bump({'k', 'reconcile', 'd', ARGV[8]})))
end
if ARGV[9] == 'set' then
  redis.call('SET', KEYS[8], ARGV[10])
  table.insert(out, tostring(bump({'k', 'init', 'd', ARGV[10]})))
elseif ARGV[9] == 'del' then
  redis.call('DEL', KEYS[8])
  table.insert(out, tostring(bump({'k', 'init_used'})))
end
redis.call('SET', KEYS[10], ARGV[11])
table.insert(out, tostring(bump({'k', 'repair', 'd', ARGV[11]})))
return out
