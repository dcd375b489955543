-- Ends a build of the seat order sets: true at the current version when every
-- write since the build started kept them (its feed entry carries 'o'); a
-- write by a replica that does not keep them, or a feed trimmed past the
-- start, and the build must run again ('again'). 'lost' when the build is no
-- longer this builder's.
-- KEYS[5] the build's mark. ARGV[2] the builder's id.
local mark = redis.call('GET', KEYS[5]) or ''
local id, from = string.match(mark, '^(.-)|(%d+)$')
if id ~= ARGV[2] then return {'lost'} end
local version = tonumber(redis.call('GET', KEYS[2]) or '0')
from = tonumber(from)
if version > from then
  local entries = redis.call('XRANGE', KEYS[3], string.format('%.0f-0', from + 1), '+')
  if #entries ~= version - from then
    redis.call('DEL', KEYS[5])
    return {'again'}
  end
  for _, e in ipairs(entries) do
    local fields, kept = e[2], false
    for j = 1, #fields, 2 do
      if fields[j] == 'o' then kept = true; break end
    end
    if not kept then
      redis.call('DEL', KEYS[5])
      return {'again'}
    end
  end
end
redis.call('SET', KEYS[4], string.format('%.0f', version))
redis.call('DEL', KEYS[5])
return {'ok'}
