-- Renews a holder's leases in one step, with Redis's own clock.
-- KEYS[5] lease records, KEYS[6..5+n] the lease pools of the features named
-- by ARGV[5..4+n].
-- ARGV[2] holder, ARGV[3] the lease length (ms), ARGV[4] n, then the ids.
-- Reply: version, expiry (ms), the number of renewed leases, each as (id,
-- record), then the lost ids. Nothing renewed: no write, the current version.
local refusal = refused()
if refusal then return reply(refusal) end
local holder, duration, n = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local pools = {}
for i = 1, n do pools[ARGV[4 + i]] = KEYS[5 + i] end
local now = now_ms()
local expires = now + duration
local renewed, lost, seen = {}, {}, {}
for i = 5 + n, #ARGV do
  local id = ARGV[i]
  if not seen[id] then
    seen[id] = true
    local raw = redis.call('HGET', KEYS[5], id)
    local rec = raw and lease_record(id, raw)
    local pool = rec and pools[rec.feature]
    local score = pool and redis.call('ZSCORE', pool, id)
    if pool and rec.holder == holder and score and tonumber(score) > now then
      table.insert(renewed, {id, rec, pool})
    else
      table.insert(lost, id)
    end
  end
end
local out = {}
if #renewed == 0 then
  out = {redis.call('GET', KEYS[2]) or '0', string.format('%.0f', expires), '0'}
else
  local ids = {}
  local records = {}
  for _, r in ipairs(renewed) do
    local id, rec, pool = r[1], r[2], r[3]
    local record = lease_json(rec.user, rec.feature, rec.holder, rec.acquired_at_ms, expires)
    redis.call('HSET', KEYS[5], id, record)
    redis.call('ZADD', pool, string.format('%.0f', expires), id)
    table.insert(ids, id)
    table.insert(records, record)
  end
  local v = bump({'k', 'renew', 'h', holder, 'e', string.format('%.0f', expires), 'i', table.concat(ids, ',')})
  out = {tostring(v), string.format('%.0f', expires), tostring(#renewed)}
  for i, id in ipairs(ids) do
    table.insert(out, id)
    table.insert(out, records[i])
  end
end
for _, id in ipairs(lost) do table.insert(out, id) end
return reply(out)
