-- The head of a snapshot (read-only, small): everything but the seats, at one
-- instant. The seat pools are read after it in pages and the feed since its
-- version replayed over them (store/redis_snapshot.rs).
-- KEYS[1] epoch, KEYS[2] version, KEYS[3] license, KEYS[4] tryout, KEYS[5] reconcile,
-- KEYS[6] pending initialization, KEYS[7] retired license, KEYS[8] high-water
-- clock, KEYS[9] last incident, KEYS[10] the version the seat order sets are
-- true at (see prelude.lua), KEYS[11] the lease records (few: at most the
-- concurrent quantities plus expired ones not yet reclaimed), KEYS[12..] the
-- seat pools.
-- The reply ends with the license's id, kept apart from its record (readable
-- also when the record is not), the order sets' version (behind the version:
-- the replica builds them, in the background), the lease records, then the
-- number of records in each pool (the replica makes room for them once).
local out = {
  redis.call('GET', KEYS[1]) or '',
  redis.call('GET', KEYS[2]) or '0',
  redis.call('HGET', KEYS[3], 'record') or '',
  redis.call('GET', KEYS[4]) or '',
  redis.call('GET', KEYS[5]) or '',
  redis.call('GET', KEYS[6]) or '',
  redis.call('GET', KEYS[7]) or '',
  redis.call('GET', KEYS[8]) or '0',
  redis.call('GET', KEYS[9]) or '',
  redis.call('HGET', KEYS[3], 'id') or '',
  redis.call('GET', KEYS[10]) or '',
  redis.call('HGETALL', KEYS[11]),
}
for i = 12, #KEYS do table.insert(out, redis.call('HLEN', KEYS[i])) end
return out
