-- Stores a verified license document with everything it causes, or nothing.
-- KEYS[5] the applied license (hash: id, record), KEYS[6] the tryout record,
-- KEYS[7] the pending initialization, KEYS[8] the lease's fencing counter,
-- KEYS[9..] the purchased pool of each feature in ARGV's capacity list, each
-- as three keys: its hash and its two order sets (see the prelude).
-- ARGV[2] expected license id ('' = none), ARGV[3] new id, ARGV[4] new record,
-- ARGV[5] expected tryout record as read ('' = none), ARGV[6] new tryout record ('' = no change),
-- ARGV[7] pending initialization to consume ('' = none), ARGV[8] fence ('' = none),
-- ARGV[9..] feature, quantity pairs (aligned with KEYS[9..]).
-- Reads and checks everything first, then writes: a script that stops half-way
-- stays half-written (Redis does not roll back).
local refusal = refused()
if refusal then return reply(refusal) end
if (redis.call('HGET', KEYS[5], 'id') or '') ~= ARGV[2] then return reply({'conflict'}) end
-- Expected records are the text this replica read, not its re-encoding (see
-- RedisStore::expected_text), so a field a newer replica added does not conflict.
local change_tryout = ARGV[6] ~= ''
if change_tryout and (redis.call('GET', KEYS[6]) or '') ~= ARGV[5] then
  return reply({'conflict'})
end
if ARGV[7] ~= '' and (redis.call('GET', KEYS[7]) or '') ~= ARGV[7] then
  return reply({'conflict'})
end
if ARGV[8] ~= '' and (redis.call('GET', KEYS[8]) or '') ~= ARGV[8] then
  return reply({'fenced'})
end
local plans = {}
local k = 9
for i = 9, #ARGV, 2 do
  local plan = plan_flags(pool_keys(KEYS[k], KEYS[k + 1], KEYS[k + 2], ARGV[i]), tonumber(ARGV[i + 1]), nil)
  if not plan then return reply({'noindex', INDEXED and 'broken' or 'missing'}) end
  table.insert(plans, plan)
  k = k + 3
end

redis.call('HSET', KEYS[5], 'id', ARGV[3], 'record', ARGV[4])
-- Reply: 'ok', license version, tryout version or '', consumed-initialization
-- version or '', then the flag changes as quadruples.
local out = {'ok', tostring(bump({'k', 'license', 'd', ARGV[4]})), '', ''}
if change_tryout then
  redis.call('SET', KEYS[6], ARGV[6])
  out[3] = tostring(bump({'k', 'tryout', 'd', ARGV[6]}))
end
if ARGV[7] ~= '' then
  redis.call('DEL', KEYS[7])
  out[4] = tostring(bump({'k', 'init_used'}))
end
for _, plan in ipairs(plans) do write_flags(plan) end
for _, x in ipairs(flagged) do table.insert(out, x) end
return reply(out)
