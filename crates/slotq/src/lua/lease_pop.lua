-- Reliable pop: reap expired leases and due delayed messages, then lease messages.
-- KEYS: 1 ready (LIST of frames), 2 leases (ZSET lease -> deadline ms), 3 inflight (HASH
--       lease -> the leased frame, or a msgpack array of them when more), 4 acks (HASH lease -> u16 count,
--       u16 settled, bitmap), 5 delayed (ZSET envelope -> due ms), 6 dead (LIST of
--       envelopes), 7 ready count (STRING: messages in 1)
-- ARGV: 1 messages wanted, 2 lease ms, 3 max attempts, 4 reap limit, 5 lease id (chosen
--       by the client: 128 random bits, so no two leases ever share a name, not even
--       across a failover that lost the last writes), 6 most bytes to lease (at least one
--       frame is taken)
-- Returns {leased (0/1), deadline ms, reaped, frame...}.
-- Frame: 0xA5 0x02, u16 BE message count, msgpack array of envelopes. Envelope: 0xA5 0x01,
-- 16 bytes id, u16 BE deliveries so far, u64 BE enqueue ms, payload.
--
-- Every key but the ready list always exists (a KEEP member, never removed): in a slot
-- that is being migrated, Redis serves a multi-key script only when all of its keys are on
-- the node, and answers TRYAGAIN for as long as some exist and others do not.
local KEEP = '~'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[4])
local max_attempts = tonumber(ARGV[3])
local MAX_LEASE = 16384

redis.call('ZADD', KEYS[2], 'NX', '+inf', KEEP)
redis.call('HSETNX', KEYS[3], KEEP, 1)
redis.call('HSETNX', KEYS[4], KEEP, 1)
redis.call('ZADD', KEYS[5], 'NX', '+inf', KEEP)
if redis.call('LINDEX', KEYS[6], 0) ~= KEEP then
  redis.call('LPUSH', KEYS[6], KEEP)
end
redis.call('SETNX', KEYS[7], 0)

local function is_frame(f)
  return string.byte(f, 1) == 0xA5 and string.byte(f, 2) == 0x02 and #f >= 5
end

local function count(f)
  return string.byte(f, 3) * 256 + string.byte(f, 4)
end

local function frame(list)
  local n = #list
  return string.char(0xA5, 0x02, math.floor(n / 256), n % 256) .. cmsgpack.pack(list)
end

local function bump(e)
  local a = string.byte(e, 19) * 256 + string.byte(e, 20) + 1
  if a > 65535 then a = 65535 end
  return string.sub(e, 1, 18) .. string.char(math.floor(a / 256), a % 256) .. string.sub(e, 21), a
end

-- Where the envelope at byte p of frame f ends (the byte after it), read from its msgpack
-- header alone; nil if p does not start a string.
local function skip(f, p)
  local b = string.byte(f, p)
  if b == nil then return nil end
  if b >= 0xa0 and b <= 0xbf then return p + 1 + (b - 0xa0) end
  if b == 0xd9 or b == 0xc4 then return p + 2 + string.byte(f, p + 1) end
  if b == 0xda or b == 0xc5 then
    local h, l = string.byte(f, p + 1, p + 2)
    return p + 3 + h * 256 + l
  end
  if b == 0xdb or b == 0xc6 then
    local a, b2, c, d = string.byte(f, p + 1, p + 4)
    return p + 5 + ((a * 256 + b2) * 256 + c) * 256 + d
  end
  return nil
end

-- A frame of n envelopes from their msgpack bytes, as they are.
local function reframe(n, body)
  local head
  if n < 16 then
    head = string.char(0x90 + n)
  else
    head = string.char(0xdc, math.floor(n / 256), n % 256)
  end
  return string.char(0xA5, 0x02, math.floor(n / 256), n % 256) .. head .. body
end

-- Splits frame f after its k-th envelope by walking the envelopes' headers and copying
-- bytes: no envelope is unpacked or packed again (that cost a frame of a thousand about
-- 0.3 ms each time a lease took part of it). Returns nil if the frame is not as expected.
local function split(f, k)
  local n = count(f)
  local b = string.byte(f, 5)
  local start
  if b >= 0x90 and b <= 0x9f then start = 6
  elseif b == 0xdc then start = 8
  elseif b == 0xdd then start = 10
  else return nil end
  local p = start
  for _ = 1, k do
    p = skip(f, p)
    if p == nil then return nil end
  end
  return reframe(k, string.sub(f, start, p - 1)), reframe(n - k, string.sub(f, p))
end

-- The frames of a lease as stored: one frame as it is, more as a msgpack array of frames.
local function frames_of(v)
  if is_frame(v) then return {v} end
  return cmsgpack.unpack(v)
end

local function settled(acks, i)
  local b = string.byte(acks, 4 + math.floor((i - 1) / 8) + 1)
  return b ~= nil and bit.band(b, bit.lshift(1, (i - 1) % 8)) ~= 0
end

local reaped = 0
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
-- Newest first: each goes to the head, so the oldest ends up first, as it was taken.
for e = #expired, 1, -1 do
  local lease = expired[e]
  local packed = redis.call('HGET', KEYS[3], lease)
  if packed then
    local acks = redis.call('HGET', KEYS[4], lease) or ''
    local back = {}
    local i = 0
    for _, f in ipairs(frames_of(packed)) do
      for _, e in ipairs(cmsgpack.unpack(string.sub(f, 5))) do
        i = i + 1
        if not settled(acks, i) then
          local e2, a = bump(e)
          if a >= max_attempts then
            redis.call('RPUSH', KEYS[6], e2)
          else
            back[#back + 1] = e2
          end
          reaped = reaped + 1
        end
      end
    end
    if #back > 0 then
      redis.call('LPUSH', KEYS[1], frame(back))
      redis.call('INCRBY', KEYS[7], #back)
    end
  end
  redis.call('HDEL', KEYS[3], lease)
  redis.call('HDEL', KEYS[4], lease)
  redis.call('ZREM', KEYS[2], lease)
end

local due = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, limit)
if #due > 0 then
  redis.call('RPUSH', KEYS[1], frame(due))
  redis.call('INCRBY', KEYS[7], #due)
  redis.call('ZREM', KEYS[5], unpack(due))
end

-- Lease the messages wanted, up to twice as many: the last frame taken is split when taking
-- it whole would lease more than that.
-- The ready list is never touched once it may be gone (after its last frame is popped):
-- in a migrating slot, touching a missing key fails the script halfway (Redis answers ASK
-- inside scripts), so the list's length is tracked here instead of asked.
local want = math.min(tonumber(ARGV[1]), MAX_LEASE)
local frames = {}
local total = 0
local avail = redis.call('LLEN', KEYS[1])
local max_bytes = tonumber(ARGV[6])
local bytes = 0
while total < want and avail > 0 and #frames < 256 and bytes < max_bytes do
  -- The last frame is read in place and popped only when taken whole.
  local last = avail == 1
  local f
  if last then
    f = redis.call('LINDEX', KEYS[1], 0)
  else
    f = redis.call('LPOP', KEYS[1])
    avail = avail - 1
  end
  local c = is_frame(f) and count(f) or 0
  -- A frame is taken whole when that at most doubles what was asked (splitting costs a
  -- walk over the envelopes taken); only a frame much larger than the rest of the ask is
  -- split.
  if c > 0 and total + c > 2 * want then
    local k = want - total
    local head, rest = split(f, k)
    if head == nil then
      -- Not laid out as expected: unpack and pack again (slow, never seen in practice).
      local envs = cmsgpack.unpack(string.sub(f, 5))
      local h, r = {}, {}
      for i = 1, #envs do
        if i <= k then h[#h + 1] = envs[i] else r[#r + 1] = envs[i] end
      end
      head, rest = frame(h), frame(r)
    end
    if last then
      redis.call('LSET', KEYS[1], 0, rest)
    else
      redis.call('LPUSH', KEYS[1], rest)
      avail = avail + 1
    end
    f = head
    c = k
  elseif last then
    redis.call('LPOP', KEYS[1])
    avail = 0
  end
  if is_frame(f) then
    frames[#frames + 1] = f
    total = total + c
    bytes = bytes + #f
  else
    -- Not written by a slotq producer: park it with the dead letters, never block the shard.
    redis.call('RPUSH', KEYS[6], f)
  end
end
if total > 0 then
  redis.call('DECRBY', KEYS[7], total)
end
if avail == 0 then
  -- An empty shard holds nothing: heal a count that a partly failed push left behind.
  redis.call('SET', KEYS[7], 0)
end
if total == 0 then
  return {0, 0, reaped}
end
local lease = ARGV[5]
local deadline = now + tonumber(ARGV[2])
-- One frame (most leases) is stored as it is: packing it would copy it once more.
redis.call('HSET', KEYS[3], lease, #frames == 1 and frames[1] or cmsgpack.pack(frames))
redis.call('HSET', KEYS[4], lease,
  string.char(math.floor(total / 256), total % 256, 0, 0) .. string.rep('\0', math.ceil(total / 8)))
redis.call('ZADD', KEYS[2], deadline, lease)
local out = {1, deadline, reaped}
for k = 1, #frames do
  out[k + 3] = frames[k]
end
return out
