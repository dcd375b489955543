-- Appends a batch of audit entries, each to its stream: KEYS[1] the accepted
-- changes, KEYS[2] the refusals (each under a bound of its own, so refusals
-- never displace a change), KEYS[3] the last id given to either. Each id is
-- above every id of both streams and the one before it, so ids are unique
-- across the two and a listing that merges them pages by id; the batch keeps
-- its order. Each stream is kept to its bound (ARGV[1] changes, ARGV[2]
-- refusals) and both to ids from ARGV[3] (ms) on (the age bound).
-- ARGV[4..]: ('c' | 'r', record) pairs. Returns the ids in order.
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
local ids = {}
for i = 4, #ARGV, 2 do
  local id = string.format('%.0f-%.0f', ms, seq)
  if ARGV[i] == 'r' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '=', ARGV[2], id, 'record', ARGV[i + 1])
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '=', ARGV[1], id, 'record', ARGV[i + 1])
  end
  table.insert(ids, id)
  seq = seq + 1
end
redis.call('XTRIM', KEYS[1], 'MINID', '=', ARGV[3])
redis.call('XTRIM', KEYS[2], 'MINID', '=', ARGV[3])
if #ids > 0 then redis.call('SET', KEYS[3], ids[#ids]) end
return ids
