-- Shared by every write script. In each of them KEYS[1] is the epoch key,
-- KEYS[2] the version counter and KEYS[3] the change feed (a stream); ARGV[1] is
-- how many feed entries to keep. All keys share the serial number's hash tag.

-- Redis's own clock, so replicas with skewed clocks agree.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A store without an epoch lost its data (or was never initialized): refuse writes
-- until a replica repairs it, so an empty Redis never looks like "no seats in use".
local function has_epoch()
  return redis.call('EXISTS', KEYS[1]) == 1
end

-- Counts the write and appends it to the feed; the entry id is the new version,
-- so a reader notices any gap.
local function bump(fields)
  local v = redis.call('INCR', KEYS[2])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], v .. '-0', unpack(fields))
  return v
end
