-- Builds the order sets of every purchased pool from its hash (see the
-- prelude), and notes them true at the current version. O(pool): run once on a
-- store written before the sets existed, or after a write by a replica that
-- does not keep them (the write scripts answer 'noindex' until then). Writes
-- nothing else, no feed entry: a replica's copy does not change.
-- KEYS[1] epoch, KEYS[2] version, KEYS[3] feed, KEYS[4] order-at, then each
-- purchased pool as three keys (hash, order, flagged), with its feature in
-- ARGV[1 + i]. ARGV[1] is unused (the prelude's place of the writer's floor).
-- Reads everything first, then writes.
local pools = {}
local k = 5
for i = 2, #ARGV do
  local p = pool_keys(KEYS[k], KEYS[k + 1], KEYS[k + 2], ARGV[i])
  local flat = redis.call('HGETALL', p.pool)
  p.seats = {}
  for j = 1, #flat, 2 do
    local rec = seat_record('seat ' .. p.feature .. '/' .. printable(flat[j]), flat[j + 1])
    if rec and rec.source == 'purchased' then table.insert(p.seats, {flat[j], rec}) end
  end
  table.insert(pools, p)
  k = k + 3
end
local version = redis.call('GET', KEYS[2]) or '0'

for _, p in ipairs(pools) do
  redis.call('DEL', p.order, p.flagged)
  local order, over = {}, {}
  local function flush(key, args)
    if #args > 0 then redis.call('ZADD', key, unpack(args)) end
  end
  for _, s in ipairs(p.seats) do
    local score = string.format('%.0f', s[2].assigned_at_ms)
    table.insert(order, score)
    table.insert(order, s[1])
    if s[2].over_capacity_since_ms then
      table.insert(over, score)
      table.insert(over, s[1])
    end
    if #order >= 1000 then flush(p.order, order); order = {} end
    if #over >= 1000 then flush(p.flagged, over); over = {} end
  end
  flush(p.order, order)
  flush(p.flagged, over)
end
redis.call('SET', KEYS[4], version)
return reply({'ok'})
