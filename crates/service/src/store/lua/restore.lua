-- Re-creates a store that lost its data from a replica's last known state, and
-- starts a new epoch. Does nothing when an epoch exists.
-- KEYS[1] epoch, KEYS[2] version, KEYS[3] feed, KEYS[4] license, KEYS[5] tryout,
-- KEYS[6] reconcile, KEYS[7] seat index, KEYS[8] pending initialization,
-- KEYS[9] retired license, KEYS[10] high-water clock, KEYS[11] the version the
-- seat order sets are true at (see prelude.lua), KEYS[12..] the seat pools and
-- the order sets of the purchased ones.
-- ARGV[1] new epoch, ARGV[2] version, ARGV[3] license id, ARGV[4] license record,
-- ARGV[5] tryout record, ARGV[6] reconcile record, ARGV[7] pending initialization,
-- ARGV[8] retired license record ('' = none for each), ARGV[9] high-water clock
-- (ms, capped at Redis TIME), ARGV[10] the number L of lease arguments, the
-- leases from ARGV[11] as (lease pool key, id, lease key entry, expires_at_ms,
-- record), ARGV[11 + L] the index of the lease records key (the lease key
-- hash follows it), then seats from ARGV[12 + L] as (pool key, order key,
-- flagged key, feature, user, record, assigned_at_ms) with each key an index
-- into KEYS, 0 for none: a purchased seat goes into its pool's order set, and
-- into the flagged set when it is flagged.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
-- Read before the first write (a corrupt clock counts as 0).
local hw = tonumber(redis.call('GET', KEYS[10]) or '0') or 0
for i = 2, #KEYS do
  if i ~= 10 then redis.call('DEL', KEYS[i]) end
end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[4], 'id', ARGV[3], 'record', ARGV[4]) end
if ARGV[5] ~= '' then redis.call('SET', KEYS[5], ARGV[5]) end
if ARGV[6] ~= '' then redis.call('SET', KEYS[6], ARGV[6]) end
if ARGV[7] ~= '' then redis.call('SET', KEYS[8], ARGV[7]) end
if ARGV[8] ~= '' then redis.call('SET', KEYS[9], ARGV[8]) end
-- The replica's mark is kept, but never beyond Redis's TIME (see clock.lua).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mark = math.min(tonumber(ARGV[9]), now)
if mark > hw then redis.call('SET', KEYS[10], string.format('%.0f', mark)) end
local lease_args = tonumber(ARGV[10])
local lease_records = tonumber(ARGV[11 + lease_args])
for i = 11, 10 + lease_args, 5 do
  redis.call('HSET', KEYS[lease_records], ARGV[i + 1], ARGV[i + 4])
  redis.call('HSET', KEYS[lease_records + 1], ARGV[i + 2], ARGV[i + 1])
  redis.call('ZADD', KEYS[tonumber(ARGV[i])], ARGV[i + 3], ARGV[i + 1])
end
for i = 12 + lease_args, #ARGV, 7 do
  local user = ARGV[i + 4]
  redis.call('HSET', KEYS[tonumber(ARGV[i])], user, ARGV[i + 5])
  for j = 1, 2 do
    local set = tonumber(ARGV[i + j])
    if set > 0 then redis.call('ZADD', KEYS[set], ARGV[i + 6], user) end
  end
  redis.call('ZADD', KEYS[7], 0, ARGV[i + 3] .. '\0' .. user)
end
redis.call('SET', KEYS[2], ARGV[2])
-- Every seat was indexed: the order sets are true at this version.
redis.call('SET', KEYS[11], ARGV[2])
redis.call('SET', KEYS[1], ARGV[1])
return 1
