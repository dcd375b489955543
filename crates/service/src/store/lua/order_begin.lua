-- Starts a build of the seat order sets (see the prelude, "Seat order") in
-- pages, or says why not: 'done' (they are true at the current version, and
-- ARGV[3] is not 'force': a write found them true but a record in them
-- unreadable), 'busy' (another replica is building them: its mark is alive).
-- Otherwise
-- empties the sets, takes their order-at mark away (no write trusts them until
-- the build ends: forced, they looked true) and marks the build as this
-- builder's, from the current version, for ARGV[2] ms (each page extends it):
-- 'started'.
-- KEYS[1] the version counter, KEYS[2] order-at, KEYS[3] the build's mark,
-- then the order and flagged sets of every purchased pool.
-- ARGV[1] the builder's id, ARGV[2] the mark's life (ms).
local version = redis.call('GET', KEYS[1]) or '0'
if ARGV[3] ~= 'force' and redis.call('GET', KEYS[2]) == version then return {'done'} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {'busy'} end
-- UNLINK: a large set is freed in the background, not in this call.
for i = 4, #KEYS do redis.call('UNLINK', KEYS[i]) end
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[3], ARGV[1] .. '|' .. version, 'PX', ARGV[2])
return {'started'}
