-- Shared by every write script. In each of them KEYS[1] is the epoch key,
-- KEYS[2] the version counter, KEYS[3] the change feed (a stream) and KEYS[4]
-- the version the seat order indexes are true at (see "Seat order" below);
-- ARGV[1] is 'FEED_LEN|FLOOR_EPOCH|FLOOR_VERSION': how many feed entries to
-- keep, and the epoch and version the writing replica has seen ('' and '' = no
-- floor). All keys share the serial number's hash tag.
local FEED_LEN, FLOOR_EPOCH, FLOOR_VERSION = string.match(ARGV[1], '^(%d+)|([^|]*)|(%d*)$')

-- Seat order. Each purchased pool has two sorted sets beside its hash: `order`
-- (every readable seat, member the user id, score its assigned_at_ms) and
-- `flagged` (the seats of `order` flagged over capacity, same scores). Highest
-- first (ZREVRANGE) is the order of domain::capacity::reflag: most recently
-- assigned first, equal times by user id, higher first (Redis orders equal
-- scores by their bytes). A corrupt record is in neither: it counts as a seat
-- in use (HLEN) and is never flagged. Every script that writes seats keeps both
-- sets; the order-at key holds the version up to which every write did so. A
-- script that finds it behind the version (the sets were never built, or a
-- write by a replica that does not keep them came between) trusts no set:
-- where it needs them it answers 'noindex' ('missing'; 'broken' when they
-- looked true but disagree with a record), having written nothing, and the
-- replica builds them anew in the background, in pages (order_begin.lua,
-- order_page.lua, order_finish.lua: once, each page small), then tries again.
local INDEXED = redis.call('GET', KEYS[4]) == (redis.call('GET', KEYS[2]) or '0')

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
-- The order sets stay true at the new version when they were before.
-- Every entry carries 'o': written by a script that keeps the order sets (a
-- build of the sets in pages trusts the writes made meanwhile only then; see
-- order_finish.lua).
local function bump(fields)
  local v = redis.call('INCR', KEYS[2])
  table.insert(fields, 'o')
  table.insert(fields, '1')
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', FEED_LEN, v .. '-0', unpack(fields))
  if INDEXED then redis.call('SET', KEYS[4], v) end
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

-- A purchased pool as a script sees it: its hash, its two order sets, its feature.
local function pool_keys(pool, order, over, feature)
  return {pool = pool, order = order, flagged = over, feature = feature}
end

-- The stored text of a purchased seat, flagged since `since` (ms) or not (nil).
local function seat_text(assigned_at_ms, since)
  if since then
    return string.format('{"v":1,"source":"purchased","assigned_at_ms":%.0f,"over_capacity_since_ms":%.0f}',
      assigned_at_ms, since)
  end
  return string.format('{"v":1,"source":"purchased","assigned_at_ms":%.0f}', assigned_at_ms)
end

-- Keeps the order sets of a purchased pool for a seat written with `rec` (a
-- record as `seat_record` reads it) or removed (`rec` nil). Writes only.
local function index_seat(p, user, rec)
  if rec then
    local score = string.format('%.0f', rec.assigned_at_ms)
    redis.call('ZADD', p.order, score, user)
    if rec.over_capacity_since_ms then
      redis.call('ZADD', p.flagged, score, user)
    else
      redis.call('ZREM', p.flagged, user)
    end
  else
    redis.call('ZREM', p.order, user)
    redis.call('ZREM', p.flagged, user)
  end
end

-- A sorted set as it will be once the script has removed `leaving` (a member,
-- or nil): its size, ranks and ranges, highest first. Reads only.
local function view(key, leaving)
  local v = {key = key, card = redis.call('ZCARD', key), leaving = leaving}
  if leaving then
    v.gone = redis.call('ZREVRANK', key, leaving) or nil
    if v.gone then v.card = v.card - 1 end
  end
  return v
end

-- The rank of `member` in the view (0 = highest), or nil.
local function view_rank(v, member)
  local r = redis.call('ZREVRANK', v.key, member)
  if not r or member == v.leaving then return nil end
  if v.gone and v.gone < r then r = r - 1 end
  return r
end

-- The members at ranks a..b of the view, highest first, as {user, score} pairs.
local function view_range(v, a, b)
  local out = {}
  if b < a then return out end
  if v.gone and v.gone <= a then
    a, b = a + 1, b + 1
  elseif v.gone and v.gone <= b then
    b = b + 1
  end
  local flat = redis.call('ZREVRANGE', v.key, a, b, 'WITHSCORES')
  for i = 1, #flat, 2 do
    if flat[i] ~= v.leaving then table.insert(out, {flat[i], tonumber(flat[i + 1])}) end
  end
  return out
end

-- Plans the over-capacity flags of a purchased pool, reading only: exactly the
-- (count - quantity) most recently assigned readable seats are to be flagged
-- (keeping an existing flag's time), the others cleared; `count` is every
-- record in the pool (HLEN), corrupt ones included, so a corrupt record can
-- only make the pool stricter, never let it exceed its quantity. `leaving` is a
-- user whose seat the script removes before the flags are written (not
-- counted). Mirrors domain::capacity::reflag, but touches only what changes:
-- the flagged seats are F, the top e = count - quantity of the order set are T;
-- F is ordered as the order set, so the flagged seats within T are F's first m
-- (found by bisection on ranks), the ones to clear are the rest of F, and the
-- seats to flag are the gaps F leaves within T (found by bisecting F again):
-- O((changed + 1) * log^2 N) calls of O(log N), never a scan of the pool.
-- Returns the plan for `write_flags`, or nil when the order sets cannot be
-- trusted (then the script answers 'noindex', having written nothing).
local function plan_flags(p, quantity, leaving)
  if not INDEXED then return nil end
  local count = redis.call('HLEN', p.pool)
  if leaving and redis.call('HEXISTS', p.pool, leaving) == 1 then count = count - 1 end
  local O, F = view(p.order, leaving), view(p.flagged, leaving)
  local e = math.max(0, count - quantity)
  if e > O.card then e = O.card end
  local plan = {p = p, flag = {}, clear = {}}
  if e == 0 and F.card == 0 then return plan end
  local broken = false
  -- The rank in O of F's i-th member (0 = highest).
  local ranks = {}
  local function orank(i)
    if ranks[i] == nil then
      local at = view_range(F, i, i)[1]
      local r = at and view_rank(O, at[1])
      if not r then broken = true; r = -1 end
      ranks[i] = r
    end
    return ranks[i]
  end
  -- m: how many of F are within T.
  local m = 0
  if e > 0 and F.card > 0 then
    if orank(F.card - 1) < e then
      m = F.card
    else
      local lo, hi = 0, F.card - 1
      while lo < hi and not broken do
        local mid = math.floor((lo + hi) / 2)
        if orank(mid) < e then lo = mid + 1 else hi = mid end
      end
      m = lo
    end
  end
  if broken then return nil end
  -- The ranks of T that F leaves open: O ranks [lo_r, hi_r) hold exactly F's
  -- members lo_j .. hi_j - 1.
  local open = {}
  local function gaps(lo_r, hi_r, lo_j, hi_j)
    local n = hi_j - lo_j
    if broken or n == hi_r - lo_r then return end
    if n == 0 then table.insert(open, {lo_r, hi_r - 1}); return end
    if n > hi_r - lo_r then broken = true; return end
    if orank(hi_j - 1) == lo_r + n - 1 then
      table.insert(open, {lo_r + n, hi_r - 1})
      return
    end
    local mid = math.floor((lo_j + hi_j) / 2)
    local r = orank(mid)
    if r < lo_r or r >= hi_r then broken = true; return end
    gaps(lo_r, r, lo_j, mid)
    gaps(r + 1, hi_r, mid + 1, hi_j)
  end
  gaps(0, e, 0, m)
  if broken then return nil end
  for _, range in ipairs(open) do
    for _, s in ipairs(view_range(O, range[1], range[2])) do table.insert(plan.flag, s) end
  end
  plan.clear = view_range(F, m, F.card - 1)
  -- Each seat that changes is read and checked against its place in the sets.
  for _, list in ipairs({plan.flag, plan.clear}) do
    local want_flag = list == plan.flag
    for _, s in ipairs(list) do
      local raw = redis.call('HGET', p.pool, s[1])
      local rec = raw and seat_record('seat ' .. p.feature .. '/' .. printable(s[1]), raw)
      if not rec or rec.source ~= 'purchased' or rec.assigned_at_ms ~= s[2]
        or (rec.over_capacity_since_ms ~= nil) == want_flag then
        return nil
      end
    end
  end
  return plan
end

-- Writes a plan of `plan_flags`: a feed entry per seat whose flag moved.
local function write_flags(plan)
  local p = plan.p
  local now = nil
  if #plan.flag > 0 then now = now_ms() end
  local function moved(user, value)
    redis.call('HSET', p.pool, user, value)
    local v = bump({'k', 'flag', 'f', p.feature, 'u', user, 'd', value})
    for _, x in ipairs({p.feature, user, value, tostring(v)}) do table.insert(flagged, x) end
  end
  for _, s in ipairs(plan.clear) do
    redis.call('ZREM', p.flagged, s[1])
    moved(s[1], seat_text(s[2], nil))
  end
  for _, s in ipairs(plan.flag) do
    redis.call('ZADD', p.flagged, string.format('%.0f', s[2]), s[1])
    moved(s[1], seat_text(s[2], now))
  end
end

-- Leases of concurrent features (lease_acquire.lua, lease_renew.lua,
-- lease_release.lua, repair.lua). A lease record (LeaseRecordV1) is kept by id
-- in the lease record hash, its id by '<feature>\0<user>\0<holder>' in the
-- lease key hash, and the id in its feature's lease pool, a sorted set scored
-- by the expiry (ms, Redis TIME): the live leases are the members scored
-- above now, found in O(log N).
local function lease_json(user, feature, holder, acquired, expires)
  return string.format('{"v":1,"user":%s,"feature":%s,"holder":%s,"acquired_at_ms":%.0f,"expires_at_ms":%.0f}',
    cjson.encode(user), cjson.encode(feature), cjson.encode(holder), acquired, expires)
end

-- A lease record decoded and checked, or nil (then named in `skipped`).
local function lease_record(id, raw)
  if not raw then return nil end
  local ok, rec = pcall(cjson.decode, raw)
  if ok and type(rec) == 'table' and rec.v == 1 and type(rec.user) == 'string'
    and type(rec.feature) == 'string' and type(rec.holder) == 'string'
    and millis(rec.acquired_at_ms) and millis(rec.expires_at_ms) then
    return rec
  end
  table.insert(skipped, 'lease ' .. printable(id))
  return nil
end
