-- One page of seats in index order (read-only).
-- KEYS[1] the seat index; KEYS[2k], KEYS[2k+1] the purchased and tryout pools of
-- the feature named in ARGV[3+k]. ARGV[1], ARGV[2] the ZRANGEBYLEX bounds, ARGV[3] the limit.
local pools = {}
for i = 4, #ARGV do
  local k = i - 3
  pools[ARGV[i]] = {KEYS[2 * k], KEYS[2 * k + 1]}
end
local out = {}
local members = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], ARGV[2], 'LIMIT', 0, ARGV[3])
for _, m in ipairs(members) do
  local sep = string.find(m, '\0', 1, true)
  if sep then
    local feature, user = string.sub(m, 1, sep - 1), string.sub(m, sep + 1)
    local pool = pools[feature]
    if pool then
      local seat = redis.call('HGET', pool[1], user) or redis.call('HGET', pool[2], user)
      if seat then
        table.insert(out, feature)
        table.insert(out, user)
        table.insert(out, seat)
      end
    end
  end
end
return out
