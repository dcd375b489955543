-- Shared by every write script. In each of them KEYS[1] is the epoch key,
-- KEYS[2] the version counter and KEYS[3] the change feed (a stream); ARGV[1] is
-- 'FEED_LEN|FLOOR_EPOCH|FLOOR_VERSION': how many feed entries to keep, and the
-- epoch and version the writing replica has seen ('' and '' = no floor). All keys
-- share the serial number's hash tag.
local FEED_LEN, FLOOR_EPOCH, FLOOR_VERSION = string.match(ARGV[1], '^(%d+)|([^|]*)|(%d*)$')

-- Redis's own clock, so replicas with skewed clocks agree.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Why this write must not run, or nil. A store without an epoch lost its data (or
-- was never initialized): refuse writes until a replica repairs it, so an empty
-- Redis never looks like "no seats in use". A store in another epoch, or below the
-- version the writer has seen, went back (older snapshot, lagging replica): refuse
-- until the writer has resynchronised, which writes back what the store lost.
local function refused()
  local epoch = redis.call('GET', KEYS[1])
  if not epoch then return {'noepoch'} end
  if FLOOR_EPOCH ~= '' then
    if epoch ~= FLOOR_EPOCH then return {'moved'} end
    if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(FLOOR_VERSION) then
      return {'moved'}
    end
  end
  return nil
end

-- Counts the write and appends it to the feed; the entry id is the new version,
-- so a reader notices any gap.
local function bump(fields)
  local v = redis.call('INCR', KEYS[2])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', FEED_LEN, v .. '-0', unpack(fields))
  return v
end

-- Seats whose flag a script moved, as (feature, user, record, version) quadruples
-- the script appends to its reply.
local flagged = {}

-- Sets the over-capacity flags of a purchased pool: exactly the (count - quantity)
-- most recently assigned seats are flagged (keeping an existing flag's time),
-- the others cleared; a feed entry per seat whose flag moved. Mirrors
-- domain::capacity::reflag.
local function reflag(pool, feature, quantity)
  local flat = redis.call('HGETALL', pool)
  local excess = #flat / 2 - quantity
  local marked = 0
  for i = 2, #flat, 2 do
    if string.find(flat[i], 'over_capacity_since_ms', 1, true) then marked = marked + 1 end
  end
  if excess <= 0 and marked == 0 then return end
  local seats = {}
  for i = 1, #flat, 2 do
    local rec = cjson.decode(flat[i + 1])
    table.insert(seats, {user = flat[i], rec = rec})
  end
  table.sort(seats, function(a, b)
    if a.rec.assigned_at_ms ~= b.rec.assigned_at_ms then
      return a.rec.assigned_at_ms > b.rec.assigned_at_ms
    end
    return a.user > b.user
  end)
  local now = now_ms()
  for i, s in ipairs(seats) do
    local flag = i <= excess
    local has = s.rec.over_capacity_since_ms ~= nil
    if flag ~= has then
      local value
      if flag then
        value = string.format('{"v":1,"source":"purchased","assigned_at_ms":%.0f,"over_capacity_since_ms":%.0f}',
          s.rec.assigned_at_ms, now)
      else
        value = string.format('{"v":1,"source":"purchased","assigned_at_ms":%.0f}', s.rec.assigned_at_ms)
      end
      redis.call('HSET', pool, s.user, value)
      local v = bump({'k', 'flag', 'f', feature, 'u', s.user, 'd', value})
      for _, x in ipairs({feature, s.user, value, tostring(v)}) do table.insert(flagged, x) end
    end
  end
end
