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
-- A version counter that is not a number, or behind the feed's last entry,
-- would make `bump` fail after the script's first write: refused before any.
local function refused()
  local epoch = redis.call('GET', KEYS[1])
  if not epoch then return {'noepoch'} end
  local version = redis.call('GET', KEYS[2]) or '0'
  if not string.match(version, '^%d+$') then return {'badversion'} end
  local top = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)[1]
  if top and tonumber(string.match(top[1], '^(%d+)-')) > tonumber(version) then
    return {'badversion'}
  end
  if FLOOR_EPOCH ~= '' then
    if epoch ~= FLOOR_EPOCH then return {'moved'} end
    if tonumber(version) < tonumber(FLOOR_VERSION) then
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

-- Stored records this script could not read, by name. A script never stops on
-- one: it reads and validates everything first, skips what is corrupt, then
-- writes; `reply` puts the names in front of the reply ('corrupt', count,
-- names..., then the script's own reply) so the replica logs and counts them.
local skipped = {}

local function reply(out)
  if #skipped == 0 then return out end
  local framed = {'corrupt', tostring(#skipped)}
  for _, name in ipairs(skipped) do table.insert(framed, name) end
  for _, x in ipairs(out) do table.insert(framed, x) end
  return framed
end

-- A stored user id as a name for `skipped`: as it is when printable ASCII,
-- otherwise in hex (the reply must stay valid text whatever the bytes).
local function printable(user)
  if string.match(user, '^[%w%p ]*$') then return user end
  return 'hex:' .. (string.gsub(user, '.', function(c) return string.format('%02x', string.byte(c)) end))
end

-- A time in milliseconds as the replicas read it (chrono's range), or nil.
local function millis(x)
  if type(x) == 'number' and x == math.floor(x) and math.abs(x) <= 8e15 then return x end
  return nil
end

-- A seat record (SeatRecordV1) decoded and checked, or nil when it does not
-- parse as one (then named in `skipped`). Never raises.
local function seat_record(name, raw)
  local ok, rec = pcall(cjson.decode, raw)
  if ok and type(rec) == 'table' and rec.v == 1
    and (rec.source == 'purchased' or rec.source == 'tryout')
    and millis(rec.assigned_at_ms) then
    local since = rec.over_capacity_since_ms
    if since == nil or since == cjson.null then
      rec.over_capacity_since_ms = nil
      return rec
    end
    if millis(since) then return rec end
  end
  table.insert(skipped, name)
  return nil
end

-- Seats whose flag a script moved, as (feature, user, record, version) quadruples
-- the script appends to its reply.
local flagged = {}

-- Plans the over-capacity flags of a purchased pool, reading only: exactly the
-- (count - quantity) most recently assigned seats are to be flagged (keeping an
-- existing flag's time), the others cleared. `leaving` is a user whose seat the
-- script removes before the flags are written (not counted). A corrupt record is
-- skipped but still counts as a seat in use: it is never flagged or cleared, so
-- it can only make the pool stricter, never let it exceed its quantity. Mirrors
-- domain::capacity::reflag. Returns the plan for `write_flags`.
local function plan_flags(pool, feature, quantity, leaving)
  local plan = {pool = pool, feature = feature, writes = {}}
  local flat = redis.call('HGETALL', pool)
  local seats, count, marked = {}, 0, 0
  for i = 1, #flat, 2 do
    local user = flat[i]
    if user ~= leaving then
      count = count + 1
      local rec = seat_record('seat ' .. feature .. '/' .. printable(user), flat[i + 1])
      if rec then
        table.insert(seats, {user = user, rec = rec})
        if rec.over_capacity_since_ms then marked = marked + 1 end
      end
    end
  end
  local excess = count - quantity
  if excess <= 0 and marked == 0 then return plan end
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
      table.insert(plan.writes, {s.user, value})
    end
  end
  return plan
end

-- Writes a plan of `plan_flags`: a feed entry per seat whose flag moved.
local function write_flags(plan)
  for _, w in ipairs(plan.writes) do
    local user, value = w[1], w[2]
    redis.call('HSET', plan.pool, user, value)
    local v = bump({'k', 'flag', 'f', plan.feature, 'u', user, 'd', value})
    for _, x in ipairs({plan.feature, user, value, tostring(v)}) do table.insert(flagged, x) end
  end
end
