-- Appends one audit entry to its stream: KEYS[1] (the changes or the refusals,
-- each under a bound of its own, so refusals never displace a change), with
-- KEYS[2] the other stream and KEYS[3] the last id given to either. The id is
-- above every id of both streams, so ids are unique across the two and a
-- listing that merges them pages by id. Then trims KEYS[1] to ARGV[1] entries
-- and both streams to ids from ARGV[2] (ms) on (the age bound).
-- ARGV[3] the record. Returns the id.
local function parse(id)
  local ms, seq = string.match(id or '', '^(%d+)-(%d+)$')
  if ms then return tonumber(ms), tonumber(seq) end
  return nil
end
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq = 0
local function above(id)
  local lms, lseq = parse(id)
  if lms and (lms > ms or (lms == ms and lseq >= seq)) then
    ms, seq = lms, lseq + 1
  end
end
above(redis.call('GET', KEYS[3]))
-- Entries written before the last-id key existed (or by an older replica).
for i = 1, 2 do
  local top = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
  if top[1] then above(top[1][1]) end
end
local id = string.format('%.0f-%.0f', ms, seq)
redis.call('XADD', KEYS[1], 'MAXLEN', '=', ARGV[1], id, 'record', ARGV[3])
redis.call('XTRIM', KEYS[1], 'MINID', '=', ARGV[2])
redis.call('XTRIM', KEYS[2], 'MINID', '=', ARGV[2])
redis.call('SET', KEYS[3], id)
return id
