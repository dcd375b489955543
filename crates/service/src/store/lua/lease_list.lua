-- The live leases (read-only): KEYS[1] lease records, KEYS[2..] the lease
-- pools to list. Reply: (id, record) pairs; a member without a record is left out.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 2, #KEYS do
  local ids = redis.call('ZRANGEBYSCORE', KEYS[i], '(' .. string.format('%.0f', now), '+inf')
  for _, id in ipairs(ids) do
    local raw = redis.call('HGET', KEYS[1], id)
    if raw then
      table.insert(out, id)
      table.insert(out, raw)
    end
  end
end
return out
