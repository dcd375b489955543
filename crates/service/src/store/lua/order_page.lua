-- One page of a build of the seat order sets: each named user's seat, as it is
-- now, into the sets (or out of them: gone, corrupt, not purchased). Every
-- write meanwhile keeps the sets itself, so a seat a page passed stays true.
-- 'lost' when the build is no longer this builder's (its mark expired, or was
-- taken), else 'ok', and the build's mark lives ARGV[3] ms longer.
-- KEYS[5] the build's mark, KEYS[6] the purchased pool, KEYS[7], KEYS[8] its
-- order and flagged sets. ARGV[2] the builder's id, ARGV[4] the feature, users
-- from ARGV[5].
local mark = redis.call('GET', KEYS[5]) or ''
if string.match(mark, '^(.-)|') ~= ARGV[2] then return reply({'lost'}) end
local p = pool_keys(KEYS[6], KEYS[7], KEYS[8], ARGV[4])
local recs = {}
for i = 5, #ARGV do
  local raw = redis.call('HGET', p.pool, ARGV[i])
  local rec = false
  if raw then
    rec = seat_record('seat ' .. p.feature .. '/' .. printable(ARGV[i]), raw) or false
    if rec and rec.source ~= 'purchased' then rec = false end
  end
  recs[i] = rec
end
for i = 5, #ARGV do index_seat(p, ARGV[i], recs[i] or nil) end
redis.call('PEXPIRE', KEYS[5], ARGV[3])
return reply({'ok'})
